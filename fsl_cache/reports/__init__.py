"""Reports over run records: the papers' mean ± std table in several formats, and PNG figures."""

from .formats import FORMATS, format_report
from .rows import Filters, RunRow, load_rows
from .table import AVERAGE, Cell, ReportTable, build_table

__all__ = [
    "AVERAGE",
    "FORMATS",
    "Cell",
    "Filters",
    "ReportTable",
    "RunRow",
    "build_table",
    "format_report",
    "load_rows",
]
