"""Lossy int8 storage of dense maps (``extract --dense-precision int8``): symmetric, one scale per channel.

Each view of each image gets its own scale per channel (``max |x| / 127`` over the map's other axes),
so a row is quantised the moment it is encoded, shard by shard, and resumes like any other array.
The scales live beside the map as ``<prefix>/scale/<tap>``, shaped like the map with 1 on every axis
but the channel, so a selection on rows and views applies to both and the product broadcasts.
:class:`~fsl_cache.store.store.FeatureStore` hands readers a :class:`Dequantised` view in the store's
precision, so methods, the unpacked sidecars and the grid read the maps as they read fp16 ones.
"""

from __future__ import annotations

import numpy as np

DENSE_PRECISIONS = ("same", "int8")
"""``same``: dense maps in the store's ``--precision`` (the default); ``int8``: quantised as above."""
LEVELS = 127  # symmetric: -127..127, so the scale maps max |x| to a code exactly and 0 stays 0


def is_dense(tap_shape: tuple[int, ...]) -> bool:
    """Maps (RN ``C×H×W``, ViT ``tokens×C``) are dense; embeddings, logits and crop parameters are not."""
    return len(tap_shape) >= 2


def scale_name(name: str) -> str:
    """``images/P/views/V/rn/layer1`` → ``images/P/views/V/scale/rn/layer1``."""
    head, sep, tap = name.partition("/views/")
    policy, _, tap = tap.partition("/")
    return f"{head}{sep}{policy}/scale/{tap}"


def scale_shape(tap: str, tap_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-view scale shape: the channel axis kept (first for RN's ``C×H×W``, last for ViT tokens), others 1."""
    axis = 0 if tap.startswith("rn/") else len(tap_shape) - 1
    return tuple(n if i == axis else 1 for i, n in enumerate(tap_shape))


def quantise(data: np.ndarray, scale_rows_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(codes int8, scales float32)`` of a ``[rows, views, ...]`` block; the scales' shape after the
    first two axes is ``scale_rows_shape`` (see :func:`scale_shape`)."""
    x = np.asarray(data, dtype=np.float32)
    axes = tuple(i + 2 for i, n in enumerate(scale_rows_shape) if n == 1)
    scale = np.abs(x).max(axis=axes, keepdims=True) / LEVELS
    safe = np.where(scale > 0, scale, 1.0)  # an all-zero channel (dead ReLU) stays zero
    codes = np.clip(np.rint(x / safe), -LEVELS, LEVELS).astype(np.int8)
    return codes, scale.astype(np.float32)


class Dequantised:
    """A lazy int8 array and its scales read as one array of ``dtype``, indexed as the codes are (zarr or
    h5py) on the leading axes: rows, views."""

    def __init__(self, codes, scales, dtype: str) -> None:
        self.codes, self.scales, self.dtype = codes, scales, np.dtype(dtype)
        self.shape, self.ndim = tuple(codes.shape), len(codes.shape)

    def __getitem__(self, key):
        return self._apply(key, lambda arr, k: arr[k])

    def __getattr__(self, name: str):
        # readers pick zarr's orthogonal selection by hasattr: offer it only where the codes are zarr's
        codes = self.__dict__.get("codes")
        if name == "get_orthogonal_selection" and hasattr(codes, name):
            return lambda selection: self._apply(selection, lambda arr, k: arr.get_orthogonal_selection(k))
        raise AttributeError(name)

    def _apply(self, key, read):
        lead = self._leading(key)
        scales = read(self.scales, lead + (slice(None),) * (self.ndim - len(lead)))
        return (read(self.codes, key).astype(np.float32) * scales).astype(self.dtype)

    def _leading(self, key) -> tuple:
        """The part of ``key`` on rows and views; the channel-holding axes must be taken whole."""
        key = key if isinstance(key, tuple) else (key,)
        at = next((i for i, k in enumerate(key) if k is Ellipsis), None)  # keys may hold index arrays
        if at is not None:
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1 :]
        if not all(isinstance(k, slice) and k == slice(None) for k in key[2:]):
            raise NotImplementedError("an int8 dense map is read by rows and views, its maps whole")
        return key[:2]
