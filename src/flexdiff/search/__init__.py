"""Training-free schedule search (Flexiffusion) and the AutoDiffusion-style step-wise peer."""

from .evolution import Search, SearchConfig, SearchResult
from .space import SegmentSpace, StepwiseSpace
from .wiring import search_from_settings

__all__ = ["Search", "SearchConfig", "SearchResult", "SegmentSpace", "StepwiseSpace", "search_from_settings"]
