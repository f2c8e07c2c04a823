"""Alignment of two models modulo permutation symmetry: weight matching, activation matching and the
LAP solvers they share. Each returns a `MatchResult` whose perms, applied to model B, align it to A.
"""
from .activation import Site, activation_matching, find_sites
from .lap import LapPolicy, LapState, available_solvers, default_solver, solve_lap
from .weight import METHODS, MatchResult, weight_matching

__all__ = ["MatchResult", "weight_matching", "METHODS", "activation_matching", "find_sites", "Site",
           "solve_lap", "LapState", "LapPolicy", "available_solvers", "default_solver"]
