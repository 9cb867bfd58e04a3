"""Decoding one image into 8-bit RGB, whatever mode it is stored in, or failing with its path."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fsl_cache.errors import DatasetError

# Transparent pixels are composited onto white: product photos and icons with an alpha channel are
# meant to be seen on a white page, while dropping alpha exposes whatever colour the transparent
# pixels happen to store (often black).
BACKGROUND = (255, 255, 255)
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class BadImageError(DatasetError):
    """An image file that is missing, empty, truncated, not an image, or too large to decode."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        super().__init__(f"Cannot read image {self.path}: {reason}")


def open_image(path: Path | str) -> Image.Image:
    """Decode ``path`` fully and return it as a new RGB image.

    Converts CMYK, L, LA, P (with or without transparency), RGBA (onto white), and 16-bit / 32-bit /
    float greyscale (rescaled to 8-bit, never clipped to white). EXIF orientation is not applied,
    as in CLIP's own ``Image.open(...).convert("RGB")``. Raises :class:`BadImageError`.
    """
    path = Path(path)
    _check_file(path)
    img = _decode(path)
    try:
        return to_rgb(img)
    except ValueError as err:  # e.g. LAB or multi-channel float modes PIL cannot convert
        raise BadImageError(path, f"unsupported image mode {img.mode} ({err})") from None


def _decode(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; it raises above, caught below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                # load() forces the full decode, so a truncated file fails here and not later in a
                # worker; ImageFile.LOAD_TRUNCATED_IMAGES stays False for the same reason.
                img.load()
                return img
    except Image.DecompressionBombError as err:
        raise BadImageError(path, f"refusing a possible decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file (unknown format)") from None
    except PermissionError:
        raise BadImageError(path, "permission denied") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(path, f"truncated or corrupt ({err})") from None


def _check_file(path: Path) -> None:
    if not path.exists():
        raise BadImageError(path, "no such file")
    if not path.is_file():
        raise BadImageError(path, "not a file")
    if path.stat().st_size == 0:
        raise BadImageError(path, "empty file (0 bytes)")


def to_rgb(img: Image.Image) -> Image.Image:
    """A new 8-bit RGB copy of a decoded image of any supported mode."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ALPHA_MODES:
        return _composite(img.convert("RGBA"))
    if img.mode in UINT16_MODES or img.mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    return img.convert("RGB")  # RGB (copied), L, 1, P, CMYK, YCbCr


def _composite(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Rescale a one-channel 16-bit, 32-bit or float image to 0..255 by its nominal range."""
    values = np.asarray(img, dtype=np.float64)
    low, high = _value_range(img.mode, values)
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    grey = np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _value_range(mode: str, values: np.ndarray) -> tuple[float, float]:
    """16-bit data spans 0..65535 and float data 0..1; anything outside those uses its min..max."""
    nominal = 1.0 if mode == "F" else 65535.0
    if values.size == 0:
        return 0.0, nominal
    low, high = float(values.min()), float(values.max())
    if mode in UINT16_MODES or (low >= 0.0 and high <= nominal):
        return 0.0, nominal
    return low, high
