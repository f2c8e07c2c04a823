"""The studies, as functions returning dataclasses (with table/JSON/PNG helpers)."""
from .stitching import StitchingStudy, stitching, stitching_section

__all__ = ["StitchingStudy", "stitching", "stitching_section"]
