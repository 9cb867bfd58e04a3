"""The feature store: fingerprinted, append-only arrays in Zarr or HDF5 with one reader API."""

from .backend import FORMATS, ArraySpec
from .catalog import StoreEntry, VerifyProblem, find_store, list_stores, remove_store, verify_store
from .fingerprint import EXTRACTION_VERSION, fingerprint
from .store import FeatureStore, StoreWriter

__all__ = [
    "ArraySpec",
    "EXTRACTION_VERSION",
    "FORMATS",
    "FeatureStore",
    "StoreEntry",
    "StoreWriter",
    "VerifyProblem",
    "find_store",
    "fingerprint",
    "list_stores",
    "remove_store",
    "verify_store",
]
