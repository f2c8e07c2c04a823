"""pyrebasin: align neural networks modulo permutation symmetry and study what lies between them."""
from . import data, ops, reference, train, zoo
from . import experiments, similarity, stitching
from ._backend import backend, native_available, use_backend
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

__all__ = [
    "Blocked",
    "PermutationSpec",
    "apply_permutation",
    "backend",
    "check_permutations",
    "compose_permutations",
    "data",
    "experiments",
    "identity_permutation",
    "invert_permutation",
    "native_available",
    "ops",
    "random_permutation",
    "reference",
    "similarity",
    "stitching",
    "train",
    "use_backend",
    "zoo",
]
