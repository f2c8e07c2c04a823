"""pyrebasin: align neural networks modulo permutation symmetry and study what lies between them.

`__all__` is the core: specs, matching, interpolation, REPAIR/RESET, combinations and the backend.
Everything else is a submodule, loaded on first use: `prb.zoo`, `prb.data`, `prb.train`,
`prb.experiments`, `prb.stitching`, `prb.similarity`, `prb.shards`, `prb.distributed`, `prb.io`, ...
(the layers: DEVELOPERS.md). Importing pyrebasin loads no experiment and no plotting library.
"""
import importlib

from ._backend import backend, native_available, use_backend
from .check import check_spec
from .combine import combine_states, evaluate_combinations, sample_coefficients
from .lmc import Curve, barrier, interpolate
from .maps import LossPlane, loss_plane
from .matching import MatchResult, activation_matching, sinkhorn_matching, ste_matching, weight_matching
from .merging import MergeResult, cycle_consistency_error, merge_many
from .repair import repair, reset_bn
from .spec import (
    Blocked,
    PermutationSpec,
    apply_permutation,
    compose_permutations,
    identity_permutation,
    invert_permutation,
    random_permutation,
)
from .trace import trace_spec

# More names of those topics, importable from here as before; their modules document them.
from .check import CheckReport, SpecCheckError  # noqa: F401, I001
from .combine import CoefficientLayout, Coefficients, CombinationResult, Distribution, coefficient_layout  # noqa: F401
from .repair import endpoint_stats  # noqa: F401
from .spec import check_permutations  # noqa: F401
from .trace import UnsupportedOpError, describe_spec, spec_difference, spec_equivalent  # noqa: F401

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022  (grouped by topic)
    # permutation specs: what to permute, and permutations as plain data
    "PermutationSpec", "Blocked", "trace_spec", "check_spec",
    "apply_permutation", "random_permutation", "invert_permutation", "compose_permutations",
    "identity_permutation",
    # aligning two models, and N models into one space
    "weight_matching", "activation_matching", "ste_matching", "sinkhorn_matching", "MatchResult",
    "merge_many", "MergeResult", "cycle_consistency_error",
    # what lies between them
    "interpolate", "barrier", "Curve", "repair", "reset_bn",
    "sample_coefficients", "evaluate_combinations", "combine_states", "loss_plane", "LossPlane",
    # which implementation runs
    "use_backend", "backend", "native_available",
]

# Submodules reachable as attributes, imported when first touched (PEP 562).
_SUBMODULES = ("combine", "data", "distributed", "experiments", "interop", "io", "lm", "lmc", "maps", "matching",
               "merging", "moments", "ops", "reference", "rng", "shards", "similarity", "spec", "stitching", "trace",
               "train", "zoo")


# Names of a higher layer, handed on when first touched: the connectivity map plots, so it is a study.
_FORWARDED = {"connectivity_map": "experiments.connectivity", "ConnectivityMap": "experiments.connectivity"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _FORWARDED:
        return getattr(importlib.import_module(f"{__name__}.{_FORWARDED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES) | set(_FORWARDED))
