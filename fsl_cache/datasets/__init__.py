"""Datasets: built-in CoOp loaders, user folders and CSVs, prompt templates, robust image loading."""

from fsl_cache.datasets.base import DatasetSpec
from fsl_cache.datasets.catalog import DatasetInfo, list_datasets, load_dataset
from fsl_cache.datasets.demo import make_demo_dataset
from fsl_cache.datasets.images import BadImageError, open_image
from fsl_cache.datasets.templates import templates_for

__all__ = [
    "BadImageError",
    "DatasetInfo",
    "DatasetSpec",
    "list_datasets",
    "load_dataset",
    "make_demo_dataset",
    "open_image",
    "templates_for",
]
