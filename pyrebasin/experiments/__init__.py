"""The studies, as functions returning dataclasses (with table/JSON/PNG helpers)."""
from .combinability import CombinabilityStudy, combinability, combinability_section
from .robustness import RobustnessStudy, robustness, robustness_section
from .similarity_study import SimilarityStudy, similarity_section, similarity_study
from .transitivity import TransitivityStudy, transitivity, transitivity_section

__all__ = ["CombinabilityStudy", "combinability", "combinability_section", "RobustnessStudy", "robustness",
           "robustness_section", "SimilarityStudy", "similarity_study", "similarity_section", "TransitivityStudy",
           "transitivity", "transitivity_section"]
