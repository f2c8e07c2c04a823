"""Alignment of two models modulo permutation symmetry: weight, activation and learned (STE, Sinkhorn)
matching and the LAP solvers they share. Each returns a `MatchResult` whose perms align B to A.
"""
from .activation import Site, activation_matching, find_sites
from .lap import LapPolicy, LapState, available_solvers, default_solver, solve_lap
from .learned import sinkhorn_matching, soft_permute, ste_matching
from .weight import METHODS, MatchResult, weight_matching

__all__ = ["MatchResult", "weight_matching", "METHODS", "activation_matching", "ste_matching",
           "sinkhorn_matching", "soft_permute", "find_sites", "Site",
           "solve_lap", "LapState", "LapPolicy", "available_solvers", "default_solver"]
