"""The studies, as functions returning dataclasses (with table/JSON/PNG helpers), and the demo.

`prb.experiments.stitching(...)` is the stitching study; the combinability studies live in their
modules: `combinability.combinability`, `transitivity.transitivity`, `robustness.robustness`,
`similarity_study.similarity_study`.

`import pyrebasin` does not load this package (`prb.experiments` does, on first touch), and no study
loads matplotlib before it plots. The studies load together here, so that `stitching` is always the
study function (a lazy load of the submodule would rebind the name to the module).
"""
from . import combinability, robustness, similarity_study, transitivity
from .combinability import CombinabilityStudy, combinability_section
from .demo import DemoConfig, DemoContext, Section, run_demo
from .robustness import RobustnessStudy, robustness_section
from .similarity_study import SimilarityStudy, similarity_section
from .stitching import StitchingStudy, stitching, stitching_section
from .transitivity import TransitivityStudy, transitivity_section

__all__ = [
    "combinability", "robustness", "similarity_study", "transitivity",
    "CombinabilityStudy", "combinability_section",
    "DemoConfig", "DemoContext", "Section", "run_demo",
    "RobustnessStudy", "robustness_section",
    "SimilarityStudy", "similarity_section",
    "StitchingStudy", "stitching", "stitching_section",
    "TransitivityStudy", "transitivity_section",
]
