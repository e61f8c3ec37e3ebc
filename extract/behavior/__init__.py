"""Behaviour seen in video: the speaker's face, expression, head, posture and movement per utterance.

``BehaviorExtractor`` (modality "behavior") gives per utterance a statistics ``vector``, K temporal
``tokens`` for the LLM and an English ``description``; see :mod:`bemerc.extract.behavior.extractor`.
"""

from bemerc.extract.behavior.describe import DescriptionRules, VlmDescriber
from bemerc.extract.behavior.extractor import BehaviorExtractor, FrameMeasures, measure_names

__all__ = ["BehaviorExtractor", "DescriptionRules", "FrameMeasures", "VlmDescriber", "measure_names"]
