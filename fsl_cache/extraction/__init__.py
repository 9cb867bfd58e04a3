"""Stage one: run the frozen backbone once and write what the methods need into a store."""

from .pipeline import ExtractOptions, ExtractResult, PreparedExtraction, extract, prepare_extraction

__all__ = ["ExtractOptions", "ExtractResult", "PreparedExtraction", "extract", "prepare_extraction"]
