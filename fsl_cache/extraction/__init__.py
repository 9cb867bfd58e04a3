"""Stage one: run the frozen backbone once and write what the methods need into a store."""

from .augment import POLICIES, ViewRenderer, sample_params
from .needs import DEFAULT_FOR, Needs, ViewNeed, known_methods, method_needs
from .pipeline import (
    ExtractOptions,
    ExtractResult,
    PreparedExtraction,
    default_cache_dir,
    extract,
    prepare_extraction,
)

__all__ = [
    "DEFAULT_FOR",
    "ExtractOptions",
    "ExtractResult",
    "Needs",
    "POLICIES",
    "PreparedExtraction",
    "ViewNeed",
    "ViewRenderer",
    "default_cache_dir",
    "extract",
    "known_methods",
    "method_needs",
    "prepare_extraction",
    "sample_params",
]
