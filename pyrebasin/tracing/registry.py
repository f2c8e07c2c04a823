"""The op-rule table of `trace_spec`: an aten op name -> rule(E, call). Rule modules fill it with
`@rule` / `@rule_pattern` when they load (pyrebasin/tracing/__init__.py loads them all); it imports none."""
from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["RULES", "rule", "rule_for", "rule_pattern"]

RULES: dict[str, Callable] = {}
_PATTERNS: list[tuple[re.Pattern, Callable]] = []  # (op-name pattern, match -> rule)


def rule(*names: str):
    """Register the decorated rule for each op name."""
    def deco(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return deco


def rule_pattern(pattern: str):
    """Register a family of op names (e.g. max_pool2d, avg_pool1d): the decorated function takes the
    regex match and returns the rule for that name."""
    def deco(make):
        _PATTERNS.append((re.compile(pattern), make))
        return make
    return deco


def rule_for(name: str) -> Callable | None:
    """The rule for an op name (an in-place variant `op_` shares `op`'s), or None when none is known."""
    if name in RULES:
        return RULES[name]
    if name.endswith("_") and name[:-1] in RULES:  # in-place variant: same axes
        return RULES[name[:-1]]
    for pattern, make in _PATTERNS:
        m = pattern.match(name)
        if m:
            return make(m)
    return None
