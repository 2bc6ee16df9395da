"""Training-free schedule search (Flexiffusion) and the AutoDiffusion-style step-wise peer."""

from .evolution import Search, SearchConfig, SearchResult, search_from_settings
from .space import SegmentSpace, StepwiseSpace

__all__ = ["Search", "SearchConfig", "SearchResult", "SegmentSpace", "StepwiseSpace", "search_from_settings"]
