"""The views the backbone sees: the center view (open_clip's test transform) and augmented train views.

Augmentation policies are sampled reproducibly and stored as crop/flip parameters.

Each view's parameters come from a generator seeded by (store seed, policy, split, item, view), not
from a shared stream, so a view is the same whichever process computes it, in whatever order, and a
resumed extraction reproduces the views of the run it continues.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from open_clip.transform import image_transform
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..errors import UsageError


@dataclass(frozen=True)
class Policy:
    """A random-resized-crop + horizontal-flip policy (METHODS §1.2)."""

    name: str
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    source: str = ""


POLICIES: dict[str, Policy | None] = {
    "center": None,
    "flip": None,
    # [CODE] Tip-Adapter main.py: RandomResizedCrop(224, scale=(0.5, 1), BICUBIC) + HFlip
    "tip": Policy("tip", (0.5, 1.0), source="Tip-Adapter main.py"),
    # [CODE] LDC ldc_train.py MyTransform.transform_train: RandomResizedCrop(scale=(0.8, 1.0)) + HFlip
    "ldc": Policy("ldc", (0.8, 1.0), source="LDC ldc_train.py"),
    # [CODE] Dassl random_resized_crop (scale (0.08, 1.0)) + random_flip, CoOp configs
    "coop": Policy("coop", (0.08, 1.0), source="Dassl transforms"),
}
"""``center`` is the test preprocessing; ``flip`` is center + a deterministic horizontal flip."""

PARAM_FIELDS = ("top", "left", "height", "width", "flip")


def resolve_policy(policy: str | Policy) -> tuple[str, Policy | None]:
    """``(name, crop policy)`` of a built-in policy name or of a method's own :class:`Policy`."""
    if isinstance(policy, Policy):
        return policy.name, policy
    if policy not in POLICIES:
        raise UsageError(f"Unknown augmentation policy '{policy}'. Built-in: {', '.join(POLICIES)}")
    return policy, POLICIES[policy]


def view_rng(seed: int, policy: str, split: str, index: int, view: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(policy.encode()), zlib.crc32(split.encode()), index, view])


def center_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The region of the original image that resize-shortest + center-crop keeps."""
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


def sample_crop(
    rng: np.random.Generator, width: int, height: int, policy: Policy
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``, drawing from ``rng`` instead of torch's global RNG."""
    area = width * height
    log_ratio = (math.log(policy.ratio[0]), math.log(policy.ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*policy.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(policy.ratio):
        w, h = width, int(round(width / min(policy.ratio)))
    elif in_ratio > max(policy.ratio):
        h, w = height, int(round(height * max(policy.ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_params(
    policy: str | Policy, *, views: int, width: int, height: int, seed: int, split: str, index: int
) -> np.ndarray:
    """Crop box and flip bit of every view of one image: ``[views, 5]`` int32; view 0 is center."""
    params = np.zeros((views, len(PARAM_FIELDS)), dtype=np.int32)
    params[0, :4] = center_box(width, height)
    policy_name, policy = resolve_policy(policy)
    for v in range(1, views):
        if policy is None:  # 'flip': the center crop mirrored, identical for every extra view
            params[v] = (*center_box(width, height), 1)
            continue
        rng = view_rng(seed, policy_name, split, index, v)
        box = sample_crop(rng, width, height, policy)
        params[v] = (*box, int(rng.random() < 0.5))
    return params


class ViewRenderer:
    """Turns an RGB image and view parameters into normalised tensors, per the backbone's preprocessing.

    View 0 and ``flip`` views go through open_clip's own test transform, so the center view is exactly
    what ``preprocess_val`` gives whatever the resize mode; random views are cropped from the original
    image as torchvision's ``RandomResizedCrop`` does.
    """

    def __init__(self, preprocess_cfg: dict) -> None:
        size = preprocess_cfg["size"]
        self.size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.mean = tuple(preprocess_cfg["mean"])
        self.std = tuple(preprocess_cfg["std"])
        self.mode = InterpolationMode(preprocess_cfg.get("interpolation", "bicubic"))
        self.center = image_transform(
            self.size,
            is_train=False,
            mean=self.mean,
            std=self.std,
            resize_mode=preprocess_cfg.get("resize_mode"),
            interpolation=preprocess_cfg.get("interpolation"),
            fill_color=preprocess_cfg.get("fill_color", 0),
        )

    def render(self, img: Image.Image, params: np.ndarray, *, policy: str | Policy) -> torch.Tensor:
        """``[V, 3, size, size]`` float32 for the ``[V, 5]`` view parameters of ``img``."""
        center = self.center(img)
        crop = resolve_policy(policy)[1]
        out = []
        for v, (top, left, h, w, flip) in enumerate(params.tolist()):
            if v == 0 or crop is None:
                view = center
            else:
                crop = TF.resized_crop(img, top, left, h, w, [self.size, self.size], self.mode)
                view = TF.normalize(TF.to_tensor(crop), self.mean, self.std)
            out.append(torch.flip(view, dims=[-1]) if flip else view)
        return torch.stack(out)
