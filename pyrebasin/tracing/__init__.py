"""Internals of `trace_spec`: atom union-find (atoms.py), graph front ends (frontends.py), the
frontend-neutral walk (engine.py), the op-rule table (registry.py) and the rules that fill it."""
from . import rules, rules_nn, rules_shape  # noqa: F401  (loading a rule module registers its rules)
