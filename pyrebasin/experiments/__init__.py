"""The studies, as functions returning dataclasses (with table/JSON/PNG helpers), and the demo."""
from .combinability import CombinabilityStudy, combinability, combinability_section
from .demo import DemoConfig, DemoContext, Section, run_demo
from .robustness import RobustnessStudy, robustness, robustness_section
from .similarity_study import SimilarityStudy, similarity_section, similarity_study
from .stitching import StitchingStudy, stitching, stitching_section
from .transitivity import TransitivityStudy, transitivity, transitivity_section

__all__ = [
    "CombinabilityStudy", "combinability", "combinability_section",
    "DemoConfig", "DemoContext", "Section", "run_demo",
    "RobustnessStudy", "robustness", "robustness_section",
    "SimilarityStudy", "similarity_section", "similarity_study",
    "StitchingStudy", "stitching", "stitching_section",
    "TransitivityStudy", "transitivity", "transitivity_section",
]
