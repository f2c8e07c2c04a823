"""pyrebasin: align neural networks modulo permutation symmetry and study what lies between them."""
from . import data, ops, reference, train, zoo
from ._backend import backend, native_available, use_backend
from .check import CheckReport, SpecCheckError, check_spec
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
from .trace import UnsupportedOpError, spec_difference, spec_equivalent, trace_spec

__version__ = "0.1.0"

__all__ = [
    "Blocked",
    "CheckReport",
    "SpecCheckError",
    "UnsupportedOpError",
    "check_spec",
    "spec_difference",
    "spec_equivalent",
    "trace_spec",
    "PermutationSpec",
    "apply_permutation",
    "backend",
    "check_permutations",
    "compose_permutations",
    "data",
    "identity_permutation",
    "invert_permutation",
    "native_available",
    "ops",
    "random_permutation",
    "reference",
    "train",
    "use_backend",
    "zoo",
]
