"""pyrebasin: align neural networks modulo permutation symmetry and study what lies between them."""
from . import data  # noqa: I001  (one import per line keeps merges clean)
from . import distributed
from . import io
from . import lmc
from . import matching
from . import moments
from . import ops
from . import reference
from . import shards
from . import similarity
from . import stitching
from . import train
from . import zoo
from . import experiments
from . import rng
from .combine import (
    CoefficientLayout,
    Coefficients,
    CombinationResult,
    Distribution,
    coefficient_layout,
    combine_states,
    evaluate_combinations,
    sample_coefficients,
)
from ._backend import backend, native_available, use_backend
from .check import CheckReport, SpecCheckError, check_spec
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
from .trace import UnsupportedOpError, describe_spec, spec_difference, spec_equivalent, trace_spec

__version__ = "0.1.0"


__all__ = [
    "Curve",
    "barrier",
    "endpoint_stats",
    "interpolate",
    "io",
    "lmc",
    "repair",
    "reset_bn",
    "CoefficientLayout",
    "Coefficients",
    "CombinationResult",
    "Distribution",
    "coefficient_layout",
    "combine_states",
    "evaluate_combinations",
    "rng",
    "sample_coefficients",
    "Blocked",
    "CheckReport",
    "SpecCheckError",
    "UnsupportedOpError",
    "check_spec",
    "describe_spec",
    "spec_difference",
    "spec_equivalent",
    "trace_spec",
    "MatchResult",
    "PermutationSpec",
    "activation_matching",
    "apply_permutation",
    "backend",
    "check_permutations",
    "compose_permutations",
    "data",
    "distributed",
    "experiments",
    "identity_permutation",
    "invert_permutation",
    "matching",
    "moments",
    "native_available",
    "ops",
    "random_permutation",
    "reference",
    "shards",
    "similarity",
    "stitching",
    "train",
    "use_backend",
    "weight_matching",
    "zoo",
]
