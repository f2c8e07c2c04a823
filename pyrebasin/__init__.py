"""pyrebasin: align neural networks modulo permutation symmetry and study what lies between them."""
from . import data  # noqa: I001  (one import per line keeps merges clean)
from . import distributed
from . import io
from . import lmc
from . import matching
from . import ops
from . import reference
from . import shards
from . import train
from . import zoo
from ._backend import backend, native_available, use_backend
from .lmc import Curve, barrier, interpolate
from .matching import MatchResult, activation_matching, weight_matching
from .repair import endpoint_stats, repair, reset_bn
from .spec import (
    Blocked,
    PermutationSpec,
    apply_permutation,
    check_permutations,
    compose_permutations,
    identity_permutation,
    invert_permutation,
    random_permutation,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # `prb.experiments` (the demo and studies: plots, reports) loads on first use, keeping the core
    # import light. `prb.repair` is the REPAIR function; its module is `pyrebasin.repair` in imports.
    if name == "experiments":
        import importlib

        return importlib.import_module(f"{__name__}.experiments")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Curve",
    "barrier",
    "endpoint_stats",
    "experiments",
    "interpolate",
    "io",
    "lmc",
    "repair",
    "reset_bn",
    "Blocked",
    "MatchResult",
    "PermutationSpec",
    "activation_matching",
    "apply_permutation",
    "backend",
    "check_permutations",
    "compose_permutations",
    "data",
    "distributed",
    "identity_permutation",
    "invert_permutation",
    "matching",
    "native_available",
    "ops",
    "random_permutation",
    "reference",
    "shards",
    "train",
    "use_backend",
    "weight_matching",
    "zoo",
]
