"""The studies, as functions returning dataclasses (with table/JSON/PNG helpers)."""
from .demo import DemoConfig, DemoContext, Section, run_demo

__all__ = ["DemoConfig", "DemoContext", "Section", "run_demo"]
