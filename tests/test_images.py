"""open_image: every stored mode becomes sensible 8-bit RGB; broken files fail with their path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fsl_cache.datasets import BadImageError, open_image
from fsl_cache.errors import DatasetError


def save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def pixel(path, xy=(0, 0)):
    img = open_image(path)
    assert img.mode == "RGB"
    return img.getpixel(xy)


def close_to(actual, expected, tol=3):
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


# ---------------------------------------------------------------------------- conversions


def test_rgb_is_returned_as_a_copy(tmp_path):
    path = save(Image.new("RGB", (4, 4), (10, 20, 30)), tmp_path / "a.png")
    assert pixel(path) == (10, 20, 30)


def test_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), tmp_path / "cyan.jpg", quality=95)
    assert close_to(pixel(path), (0, 255, 255), tol=8)


@pytest.mark.parametrize("mode, value", [("L", 77), ("1", 255)])
def test_greyscale(tmp_path, mode, value):
    path = save(Image.new(mode, (4, 4), value), tmp_path / "g.png")
    assert pixel(path) == (value, value, value)


def test_grey_with_alpha_onto_white(tmp_path):
    img = Image.new("LA", (2, 1))
    img.putpixel((0, 0), (0, 0))
    img.putpixel((1, 0), (0, 255))
    path = save(img, tmp_path / "la.png")
    assert pixel(path, (0, 0)) == (255, 255, 255) and pixel(path, (1, 0)) == (0, 0, 0)


def test_rgba_composited_onto_white(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red: white, not red or black
    img.putpixel((1, 0), (0, 0, 255, 255))
    img.putpixel((2, 0), (0, 0, 0, 128))
    path = save(img, tmp_path / "rgba.png")
    assert pixel(path, (0, 0)) == (255, 255, 255)
    assert pixel(path, (1, 0)) == (0, 0, 255)
    assert close_to(pixel(path, (2, 0)), (127, 127, 127), tol=1)


def test_palette_without_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 0), 1)
    path = save(img, tmp_path / "p.png")
    assert pixel(path, (1, 0)) == (200, 100, 50)


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_with_transparency(tmp_path, suffix):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 0), 1)
    path = save(img, tmp_path / f"pt{suffix}", transparency=0)
    assert pixel(path, (0, 0)) == (255, 255, 255)
    assert pixel(path, (1, 0)) == (200, 100, 50)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_is_rescaled_not_clipped(tmp_path, suffix):
    values = np.array([[0, 32896, 65535, 1028]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / f"g16{suffix}")
    assert Image.open(path).mode.startswith("I;16")
    img = open_image(path)
    assert [img.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 4]


def test_32_bit_integer_within_16_bit_range(tmp_path):
    path = save(Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32)), tmp_path / "i32.tif")
    assert Image.open(path).mode == "I"
    img = open_image(path)
    assert [img.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_in_unit_range(tmp_path):
    path = save(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), tmp_path / "f.tif")
    img = open_image(path)
    assert [img.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_outside_unit_range_uses_min_max(tmp_path):
    path = save(Image.fromarray(np.array([[-10.0, 0.0, 10.0]], dtype=np.float32)), tmp_path / "f.tif")
    img = open_image(path)
    assert [img.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


# ---------------------------------------------------------------------------- failures


def assert_bad(path, reason):
    with pytest.raises(BadImageError, match=reason) as err:
        open_image(path)
    assert err.value.path == path
    assert str(path) in str(err.value)
    assert isinstance(err.value, DatasetError)


def test_missing_file(tmp_path):
    assert_bad(tmp_path / "nope.jpg", "no such file")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    assert_bad(path, "empty file")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels")
    assert_bad(path, "not an image")


@pytest.mark.parametrize("fmt, suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_truncated_file(tmp_path, fmt, suffix):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, fmt)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert_bad(path, "truncated or corrupt")


def test_directory_is_not_an_image(tmp_path):
    assert_bad(tmp_path, "not a file")


def test_decompression_bomb(tmp_path, monkeypatch):
    path = save(Image.new("L", (64, 64)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 x limit: PIL raises
    assert_bad(path, "decompression bomb")
