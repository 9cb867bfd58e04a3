"""Store fingerprints: a chained hash of everything that determines a store's contents.

Following huggingface/datasets, the key is a readable prefix plus a hash, and anything that cannot be
hashed is an error rather than a random key, so a cache is never silently reused for something else.
"""

from __future__ import annotations

import hashlib
import json
import re

EXTRACTION_VERSION = 1
"""Bump when extraction changes what a store holds for the same inputs."""


def canonical_json(obj) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"cannot fingerprint {obj!r}: {err}") from err


def fingerprint(parts: dict) -> str:
    """SHA-256 over the canonical JSON of ``parts`` (dataset, backbone, precision, version)."""
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


def slug(text: str) -> str:
    """A file-system-safe, readable fragment of ``text``."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-")[:60] or "x"


def store_dirname(*, arch: str, weights: str, precision: str, key: str) -> str:
    """E.g. ``RN50.openai-fp16-3f9a2c1e7b0d4e21`` (DESIGN §3)."""
    return f"{slug(arch)}.{slug(weights)}-{precision}-{key[:16]}"


def dataset_dirname(dataset_name: str) -> str:
    kind, _, rest = dataset_name.partition(":")
    if not rest:
        return slug(kind)
    return f"{kind}-{slug(rest.rstrip('/').split('/')[-1])}"
