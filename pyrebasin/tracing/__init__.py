"""Internals of `trace_spec`: atom union-find (atoms.py), graph front ends (frontends.py), the
frontend-neutral walk (engine.py) and the per-op rules (rules.py, rules_nn.py)."""
