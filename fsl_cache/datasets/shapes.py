"""The shapes world: procedurally rendered scenes with captions, and held-out datasets drawn from it.

A scene is a shape × colour × texture × size × position on a background. :func:`sample_scenes`
draws scenes, :func:`render` paints them (64 px, batched, deterministic in a ``torch.Generator``)
and :func:`caption` describes them ("a photo of a small red striped triangle on grass"). The tiny
CLIP weights ``--pretrained shapes`` are trained on these pairs (``fsl_cache.backbones.train_tiny``).

:func:`make_shapes_dataset` writes an ``imagefolder`` evaluation set whose classes are colour ×
texture combinations seen under a domain shift that no caption ever showed (:data:`DEMO_SHIFT`: an
unseen background, pixel noise, washed-out colours), so zero-shot is imperfect and a few labelled
shots of the shifted domain help.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fsl_cache.errors import UsageError

SIZE = 64
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.10, 0.62, 0.18),
    "blue": (0.12, 0.28, 0.90),
    "yellow": (0.95, 0.85, 0.12),
    "purple": (0.55, 0.18, 0.72),
    "orange": (0.96, 0.50, 0.08),
    "white": (0.96, 0.96, 0.96),
    "black": (0.06, 0.06, 0.06),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
SIZES = {"small": (0.13, 0.17), "large": (0.22, 0.28)}
"""Object radius as a fraction of the image side."""
POSITIONS = {
    "on the left": (0.32, 0.5),
    "on the right": (0.68, 0.5),
    "at the top": (0.5, 0.32),
    "at the bottom": (0.5, 0.68),
    "in the center": (0.5, 0.5),
}
BACKGROUNDS = ("grass", "sand", "sky", "water", "snow")
"""The backgrounds captions name ("on grass"); the shifted datasets use others."""
SHIFT_BACKGROUNDS = ("night", "clutter", "bricks")
"""Backgrounds no training image or caption shows."""
_BACKGROUND_WORDS = {"grass": "on grass", "sand": "on sand", "sky": "in the sky", "water": "on water"}
_PREFIXES = ("a photo of a {}", "a {}", "an image of a {}", "a drawing of a {}", "a picture of a {}")


@dataclass(frozen=True)
class Shift:
    """How an evaluation domain departs from the training world (nothing here is ever captioned)."""

    backgrounds: tuple[str, ...] = BACKGROUNDS
    """Background kinds drawn uniformly; :data:`SHIFT_BACKGROUNDS` are never seen in training."""
    scale: tuple[float, float] = (1.0, 1.0)
    """Range of a factor on the object radius."""
    noise: float = 0.02
    """Std of Gaussian pixel noise (training: 0.02)."""
    saturation: float = 1.0
    """Object colours mixed towards grey: 1 keeps them, 0 makes them grey."""

    def __post_init__(self) -> None:
        unknown = set(self.backgrounds) - set(BACKGROUNDS) - set(SHIFT_BACKGROUNDS)
        if unknown:
            raise UsageError(
                f"Unknown background(s) {sorted(unknown)}: use {BACKGROUNDS + SHIFT_BACKGROUNDS}"
            )


TRAIN_WORLD = Shift()
DEMO_SHIFT = Shift(backgrounds=("clutter",), noise=0.05, saturation=0.8)
"""The domain of the demo and test datasets: every scene on colourful clutter (a background no caption
names), with more pixel noise and paler objects. One consistent shift, as when all photos of a task
come from one place: zero-shot drops, and a few labelled shots show what the domain looks like."""


@dataclass(frozen=True)
class Scenes:
    """A batch of scenes, one index per attribute (into the tuples/dicts above), each ``[B]``."""

    shape: torch.Tensor
    colour: torch.Tensor
    texture: torch.Tensor
    size: torch.Tensor
    position: torch.Tensor
    background: torch.Tensor

    def __len__(self) -> int:
        return len(self.shape)


def sample_scenes(n: int, *, generator: torch.Generator, world: Shift = TRAIN_WORLD) -> Scenes:
    """``n`` scenes with every attribute uniform (backgrounds from ``world.backgrounds``)."""
    kinds = BACKGROUNDS + SHIFT_BACKGROUNDS
    allowed = torch.tensor([kinds.index(b) for b in world.backgrounds])

    def draw(k: int) -> torch.Tensor:
        return torch.randint(k, (n,), generator=generator)

    return Scenes(
        shape=draw(len(SHAPES)),
        colour=draw(len(COLOURS)),
        texture=draw(len(TEXTURES)),
        size=draw(len(SIZES)),
        position=draw(len(POSITIONS)),
        background=allowed[draw(len(allowed))],
    )


# ------------------------------------------------------------------------------------------ captions


def caption(scenes: Scenes, index: int, *, rng: random.Random) -> str:
    """One caption of scene ``index``: the shape always, other attributes each with a probability."""
    words = []
    if rng.random() < 0.5:
        words.append(list(SIZES)[scenes.size[index]])
    if rng.random() < 0.8:
        words.append(list(COLOURS)[scenes.colour[index]])
    if rng.random() < 0.85:
        words.append(TEXTURES[scenes.texture[index]])
    words.append(SHAPES[scenes.shape[index]])
    if rng.random() < 0.35:
        words.append(list(POSITIONS)[scenes.position[index]])
    background = (BACKGROUNDS + SHIFT_BACKGROUNDS)[scenes.background[index]]
    if rng.random() < 0.5:
        words.append(_BACKGROUND_WORDS.get(background, f"on {background}"))
    return with_article(rng.choice(_PREFIXES).format(" ".join(words)))


def with_article(text: str) -> str:
    """'a' before a consonant sound, 'an' before a vowel: ``a orange`` → ``an orange``."""
    return " ".join(
        ("an" if w == "a" and nxt[:1] in "aeiou" else "a" if w == "an" and nxt[:1] not in "aeiou" else w)
        for w, nxt in zip(text.split(), [*text.split()[1:], ""], strict=True)
    )


# ------------------------------------------------------------------------------------------ rendering


def render(
    scenes: Scenes, *, generator: torch.Generator, world: Shift = TRAIN_WORLD, size: int = SIZE
) -> torch.Tensor:
    """Paint ``scenes`` as images ``[B, 3, size, size]`` in [0, 1], deterministic in ``generator``."""
    n = len(scenes)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    ys, xs = coords.view(1, -1, 1), coords.view(1, 1, -1)  # [1, H, 1], [1, 1, W]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    lows, highs = torch.tensor([r[0] for r in SIZES.values()]), torch.tensor([r[1] for r in SIZES.values()])
    radius = lows[scenes.size] + (highs - lows)[scenes.size] * torch.rand(n, generator=generator)
    radius = radius * uniform(*world.scale)
    centres = torch.tensor(list(POSITIONS.values()))[scenes.position]  # [B, 2]
    cx = (centres[:, 0] + uniform(-0.05, 0.05)).view(n, 1, 1)
    cy = (centres[:, 1] + uniform(-0.05, 0.05)).view(n, 1, 1)
    r = radius.view(n, 1, 1)
    dx = ((xs - cx) / r).expand(n, size, size)  # [B, H, W] in object radii
    dy = ((ys - cy) / r).expand(n, size, size)
    mask = _shape_masks(dx, dy).gather(0, scenes.shape.view(1, n, 1, 1).expand(1, n, size, size))[0]
    pattern = _patterns(dx, dy, scenes.texture, generator=generator)  # [B, H, W] in {0, 1}
    first, second = _object_colours(scenes.colour, generator=generator, saturation=world.saturation)
    obj = torch.where(pattern.unsqueeze(1) > 0, second.view(n, 3, 1, 1), first.view(n, 3, 1, 1))
    background = _backgrounds(scenes.background, generator=generator, size=size)
    m = mask.unsqueeze(1).float()
    image = background * (1 - m) + obj * m
    image = image * uniform(0.9, 1.1).view(n, 1, 1, 1)  # exposure
    image = image + world.noise * torch.randn(image.shape, generator=generator)
    return image.clamp(0, 1)


def _shape_masks(dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """``[len(SHAPES), B, H, W]`` booleans, shapes centred on 0 with radius 1."""
    ax, ay = dx.abs(), dy.abs()
    return torch.stack(
        [
            dx**2 + dy**2 < 1.0,  # circle
            torch.maximum(ax, ay) < 0.85,  # square
            (dy < 0.75) & (ax < (dy + 1.05) / 1.8 * 1.0),  # triangle, apex up
            ax + ay < 1.1,  # diamond
            ((ax < 0.36) & (ay < 1.0)) | ((ay < 0.36) & (ax < 1.0)),  # cross
        ]
    )


def _patterns(dx: torch.Tensor, dy: torch.Tensor, texture: torch.Tensor, *, generator) -> torch.Tensor:
    """Second-colour mask per texture: plain none, stripes at a random angle, dots, checks."""
    n = len(texture)
    angle = (torch.rand(n, generator=generator) * math.pi).view(n, 1, 1)
    phase = torch.rand(n, 2, generator=generator).view(n, 2, 1, 1)
    u = dx * torch.cos(angle) + dy * torch.sin(angle)
    stripes = torch.floor(u / 0.22 + phase[:, 0]) % 2
    gx, gy = dx / 0.5 + phase[:, 0], dy / 0.5 + phase[:, 1]
    dots = ((gx - gx.round()) ** 2 + (gy - gy.round()) ** 2 < 0.2**2 * 4).float()
    checks = (torch.floor(gx) + torch.floor(gy)) % 2
    stack = torch.stack([torch.zeros_like(dx), stripes, dots, checks])  # [T, B, H, W]
    return stack.gather(0, texture.view(1, n, 1, 1).expand(1, *dx.shape))[0]


def _object_colours(
    colour: torch.Tensor, *, generator, saturation: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The object's colour ``[B, 3]`` (jittered, optionally washed out) and its pattern colour."""
    base = torch.tensor(list(COLOURS.values()))[colour]
    base = (base + 0.06 * (torch.rand(base.shape, generator=generator) - 0.5)).clamp(0, 1)
    grey = base.mean(dim=1, keepdim=True)
    base = grey + saturation * (base - grey)
    light = base.mean(dim=1, keepdim=True) > 0.3
    second = torch.where(light, base * 0.3, base * 0.5 + 0.45)  # dark stripes on light, light on dark
    return base, second


def _backgrounds(kind: torch.Tensor, *, generator, size: int) -> torch.Tensor:
    """``[B, 3, size, size]`` backgrounds, one of :data:`BACKGROUNDS` + :data:`SHIFT_BACKGROUNDS` each."""
    n = len(kind)
    coarse = F.interpolate(torch.randn(n, 3, 8, 8, generator=generator), size=size, mode="bilinear")
    fine = torch.randn(n, 3, size, size, generator=generator)
    out = torch.empty(n, 3, size, size)
    for index, paint in enumerate(_PAINTERS):
        rows = (kind == index).nonzero().flatten()
        if len(rows):
            out[rows] = paint(coarse[rows], fine[rows], size).expand(len(rows), 3, size, size)
    return out.clamp(0, 1)


def _flat(rgb) -> torch.Tensor:
    return torch.tensor(rgb).view(1, 3, 1, 1)


def _axis(size: int, dim: int) -> torch.Tensor:
    """Pixel centres in [0, 1] along height (``dim=2``) or width (``dim=3``), shaped to broadcast."""
    shape = [1, 1, 1, 1]
    shape[dim] = size
    return ((torch.arange(size) + 0.5) / size).view(shape)


def _water(coarse, fine, size):
    wobble = 0.15 * torch.sin(2 * math.pi * _axis(size, 3) * 3)
    return (
        _flat((0.10, 0.35, 0.62))
        + 0.10 * torch.sin(2 * math.pi * (_axis(size, 2) * 7 + wobble))
        + 0.03 * fine
    )


def _bricks(coarse, fine, size):
    rows = torch.arange(size).view(1, 1, size, 1)
    brick_x = (torch.arange(size).view(1, 1, 1, size) + 6 * ((rows // 8) % 2)) % 16
    mortar = ((rows % 8 == 0) | (brick_x == 0)).float()
    return _flat((0.62, 0.26, 0.18)) * (1 - mortar) + 0.75 * mortar + 0.04 * fine


_PAINTERS = (  # (coarse [b, 3, H, W], fine [b, 3, H, W], size) -> [b | 1, 3, H, W], in BACKGROUNDS order
    lambda c, f, s: _flat((0.25, 0.55, 0.18)) + 0.08 * c[:, :1] + 0.06 * f,  # grass
    lambda c, f, s: _flat((0.86, 0.76, 0.52)) + 0.04 * c[:, :1] + 0.05 * f,  # sand
    lambda c, f, s: (
        _flat((0.40, 0.60, 0.95)) + 0.35 * _axis(s, 2) * _flat((1.0, 0.7, 0.1)) + 0.15 * c[:, :1].clamp(min=0)
    ),  # sky
    _water,
    lambda c, f, s: _flat((0.92, 0.93, 0.96)) + 0.03 * c[:, :1] + 0.03 * f,  # snow
    lambda c, f, s: _flat((0.06, 0.06, 0.12)) + 0.05 * c[:, :1] + (f[:, :1] > 2.3).float() * 0.8,  # night
    lambda c, f, s: 0.5 + 0.14 * c,  # clutter: colourful blotches
    _bricks,
)


# ------------------------------------------------------------------------- held-out imagefolder sets

DATASET_COUNTS = {"train": 16, "val": 8, "test": 30}
"""Images per class and split of :func:`make_shapes_dataset`."""
DATASET_COLOURS = ("red", "green", "blue", "yellow")
DATASET_TEXTURES = ("plain", "striped", "dotted")
DATASET_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a drawing of a {}.")
MARKER = ".shapes-complete"
VERSION = 1
"""Bump when the images change, so an old folder is not mistaken for a current one."""


def dataset_classes() -> dict[str, str]:
    """Folder name → class name of the colour × texture classes (``red_striped`` → ``red striped shape``)."""
    # In folder-name order: imagefolder: reads classnames.txt in the sorted order of the sub-folders.
    return dict(sorted((f"{c}_{t}", f"{c} {t} shape") for c in DATASET_COLOURS for t in DATASET_TEXTURES))


def make_shapes_dataset(
    out_dir: Path | str,
    *,
    seed: int = 0,
    shift: Shift = DEMO_SHIFT,
    counts: dict[str, int] | None = None,
) -> Path:
    """Write a colour × texture classification set from the shifted world to ``out_dir``.

    ``train/ val/ test/`` with one folder per class (12 classes; shapes, sizes and positions vary
    freely), ``classnames.txt`` and ``templates.txt``. Deterministic in ``seed``, ``shift`` and
    ``counts``; idempotent (a marker written last records a complete run). Returns the folder, ready
    for ``load_dataset(f"imagefolder:{path}")``.
    """
    counts = dict(DATASET_COUNTS if counts is None else counts)
    out = Path(out_dir).expanduser().resolve()
    stamp = f"fsl-cache shapes dataset v{VERSION} seed={seed} shift={shift} counts={counts}\n"
    marker = out / MARKER
    if marker.is_file():
        if marker.read_text() == stamp:
            return out
        raise UsageError(f"{out} already holds another shapes dataset; choose another folder")
    if out.is_dir() and any(
        p.name not in {*counts, "classnames.txt", "templates.txt"} for p in out.iterdir()
    ):
        raise UsageError(f"{out} is not empty; choose an empty folder for the shapes dataset")
    classes = dataset_classes()
    for split_index, (split, count) in enumerate(counts.items()):
        for label, key in enumerate(classes):
            colour, texture = key.split("_")
            generator = torch.Generator().manual_seed(seed * 1_000_003 + split_index * 1009 + label)
            scenes = sample_scenes(count, generator=generator, world=shift)
            scenes = replace(
                scenes,
                colour=torch.full((count,), list(COLOURS).index(colour)),
                texture=torch.full((count,), TEXTURES.index(texture)),
            )
            _write_images(out / split / key, render(scenes, generator=generator, world=shift))
    (out / "classnames.txt").write_text("".join(f"{name}\n" for name in classes.values()))
    (out / "templates.txt").write_text("".join(f"{t}\n" for t in DATASET_TEMPLATES))
    marker.write_text(stamp)
    return out


def _write_images(folder: Path, images: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for index, array in enumerate(pixels):
        Image.fromarray(np.ascontiguousarray(array)).save(folder / f"{index:03d}.png", compress_level=1)
