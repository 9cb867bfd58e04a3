"""A small synthetic dataset in ``imagefolder`` layout, so every command can be tried offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fsl_cache.errors import UsageError

SIZE = 64
COUNTS = {"train": 30, "val": 10, "test": 20}
"""Images per class and split: 300 in all."""
CLASSES = {
    "red_circle": "red circle",
    "blue_square": "blue square",
    "green_triangle": "green triangle",
    "striped_pattern": "striped pattern",
    "checkerboard": "checkerboard",
}
"""Folder name → class name. Shapes differ in form and hue, textures in pattern (random colours)."""
SHAPE_COLOURS = {
    "red_circle": (210, 40, 40),
    "blue_square": (40, 70, 210),
    "green_triangle": (40, 170, 60),
}
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")
MARKER = ".demo-complete"
VERSION = 2
"""Bump when the images change, so an old demo folder is not mistaken for a current one."""


def make_demo_dataset(out_dir: Path | str, *, seed: int = 0) -> Path:
    """Write the demo dataset to ``out_dir`` (``train/ val/ test/``, 5 classes, 300 PNGs of 64 px).

    Deterministic in ``seed`` and idempotent: a marker file written last records a complete run,
    and a second call with the same seed returns at once. Returns the dataset folder, ready for
    ``load_dataset(f"imagefolder:{path}")``.
    """
    out = Path(out_dir).expanduser().resolve()
    stamp = f"fsl-cache demo dataset v{VERSION} seed={seed}\n"
    marker = out / MARKER
    if marker.is_file():
        if marker.read_text() == stamp:
            return out
        raise UsageError(
            f"{out} already holds another demo dataset ({marker.read_text().strip()}); choose another folder"
        )
    _check_writable_here(out)
    for split_index, (split, count) in enumerate(COUNTS.items()):
        for label, key in enumerate(CLASSES):
            _write_class(out / split / key, key, count, [seed, split_index, label])
    # imagefolder reads classnames.txt in sorted folder order
    (out / "classnames.txt").write_text("".join(f"{CLASSES[key]}\n" for key in sorted(CLASSES)))
    (out / "templates.txt").write_text("".join(f"{t}\n" for t in TEMPLATES))
    marker.write_text(stamp)  # last, so an interrupted run is redone on the next call
    return out


def _check_writable_here(out: Path) -> None:
    """Refuse to write into a folder that holds anything the demo did not put there."""
    ours = {*COUNTS, "classnames.txt", "templates.txt"}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    if foreign:
        raise UsageError(
            f"{out} is not empty (holds {', '.join(foreign[:3])}); choose an empty folder "
            "for the demo dataset"
        )


def _write_class(folder: Path, key: str, count: int, entropy: list[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        rng = np.random.default_rng([*entropy, index])  # one stream per image: order-independent
        _draw(key, rng).save(folder / f"{index:03d}.png", compress_level=1)


def _draw(key: str, rng: np.random.Generator) -> Image.Image:
    if key in SHAPE_COLOURS:
        pixels = _shape(key, rng)
    elif key == "striped_pattern":
        pixels = _stripes(rng)
    else:
        pixels = _checkerboard(rng)
    noisy = pixels + rng.normal(0.0, 16.0, pixels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _shape(key: str, rng: np.random.Generator) -> np.ndarray:
    background = tuple(int(v) for v in rng.integers(70, 190, 3))
    img = Image.new("RGB", (SIZE, SIZE), background)
    colour = tuple(int(c) for c in np.clip(np.array(SHAPE_COLOURS[key]) + rng.integers(-30, 31, 3), 0, 255))
    half = rng.uniform(0.18, 0.38) * SIZE
    cx, cy = rng.uniform(half, SIZE - half, 2)
    box = (cx - half, cy - half, cx + half, cy + half)
    draw = ImageDraw.Draw(img)
    if key == "red_circle":
        draw.ellipse(box, fill=colour)
    elif key == "blue_square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    return np.asarray(img, dtype=np.float64)


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    dark = rng.integers(0, 90, 3)
    return dark, dark + rng.integers(120, 166, 3)


def _stripes(rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 14)
    phase = (x * np.cos(angle) + y * np.sin(angle) + rng.uniform(0, period)) // (period / 2)
    return _paint(phase % 2 == 0, *_two_colours(rng))


def _checkerboard(rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    cell = rng.integers(5, 13)
    dx, dy = rng.integers(0, cell, 2)
    return _paint(((x + dx) // cell + (y + dy) // cell) % 2 == 0, *_two_colours(rng))


def _paint(mask: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return np.where(mask[..., None], first, second).astype(np.float64)
