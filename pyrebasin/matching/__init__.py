"""Alignment of two models modulo permutation symmetry: weight, activation and learned (STE, Sinkhorn)
matching and the LAP solvers they share. Each returns a `MatchResult` whose perms align B to A.
Transformers: two-level head matching (`heads`) and orthogonal residual-stream maps (`orthogonal`).
"""
from .activation import Site, activation_matching, find_sites
from .heads import HeadLayout, two_level_matching
from .lap import LapPolicy, LapState, available_solvers, default_solver, solve_lap
from .learned import sinkhorn_matching, soft_permute, ste_matching
from .orthogonal import apply_orthogonal, fold_norms, procrustes, residual_procrustes
from .weight import METHODS, MatchResult, weight_matching

__all__ = ["MatchResult", "weight_matching", "METHODS", "activation_matching", "ste_matching",
           "sinkhorn_matching", "soft_permute", "find_sites", "Site",
           "solve_lap", "LapState", "LapPolicy", "available_solvers", "default_solver",
           "HeadLayout", "two_level_matching", "apply_orthogonal", "fold_norms", "procrustes", "residual_procrustes"]
