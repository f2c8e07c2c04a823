"""The studies, as functions returning dataclasses (with table/JSON/PNG helpers)."""
