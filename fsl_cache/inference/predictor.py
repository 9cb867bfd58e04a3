"""``predict``: images → the store's center-view preprocessing → backbone taps → the trained head → top-k.

The features go through exactly what stage one did to them: open_clip's test transform, the
backbone in the store's compute dtype, taps derived the same way (``Encoder``), and a round trip
through the store's precision (fp16 by default) before the head sees them, so a head gives on an
image the logits its cached evaluation gave on the same image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..backbones import load_backbone
from ..backbones.encoder import Encoder
from ..backbones.views import ViewRenderer
from ..datasets import BadImageError, open_image
from ..errors import BackboneError, UsageError
from .bundle import HeadBundle, load_bundle
from .heads import rebuild_head

STORE_DTYPES = {"fp16": np.float16, "fp32": np.float32}


@dataclass(frozen=True)
class Prediction:
    """Top-k classes of one image."""

    image: str
    top: list[tuple[str, float]]
    """``(class name, probability)``, most probable first."""

    def to_json(self) -> dict:
        return {"image": self.image, "top": [{"class": c, "prob": round(p, 6)} for c, p in self.top]}


class Predictor:
    """A trained head with its backbone, ready for image files.

    >>> predictor = Predictor.load("runs/.../k16-s1-coop-…")     # or an exported folder
    >>> predictor.predict(["cat.jpg"], top_k=3)[0].top           # [("cat", 0.91), ...]
    """

    def __init__(self, bundle: HeadBundle, *, device: str = "cpu", batch_size: int = 32) -> None:
        self.bundle = bundle
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._backbone = None
        self.head = rebuild_head(bundle, self.backbone).to(self.device)

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> Predictor:
        return cls(load_bundle(path), **kwargs)

    def backbone(self):
        """The backbone the store was extracted with, re-loaded; refuses one whose weights or preprocessing differ."""
        if self._backbone is None:
            meta = self.bundle.meta["backbone"]
            fp16 = self.device.type == "cuda" and meta.get("compute_dtype") == "float16"
            backbone = load_backbone(
                meta["arch"],
                meta["pretrained"],
                device=str(self.device),
                precision="fp16" if fp16 else "fp32",
            )
            check_backbone(backbone, meta)
            self._backbone = backbone
        return self._backbone

    def features(self, images: Sequence[str | Path]) -> dict[str, torch.Tensor]:
        """The head's input taps for ``images``, float32 ``{tap: [N, ...]}``, as the store would hold them."""
        bb = self.backbone()
        renderer = ViewRenderer(self.bundle.meta["backbone"]["preprocess_cfg"] or bb.preprocess_cfg)
        taps = tuple(t for t in self.bundle.inputs if not t.startswith("zs_logits/"))
        text = {k: v for k, v in self.bundle.text.items() if f"zs_logits/{k}" in self.bundle.inputs}
        dtype = np.dtype(STORE_DTYPES[self.bundle.meta.get("precision", "fp16")])
        encoder = Encoder(bb, text, dtype, scale=float(self.bundle.meta["zs_scale"]))
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([renderer.center(_open(p)) for p in images[start : start + self.batch_size]])
            for tap, array in encoder(batch, taps).items():
                parts.setdefault(tap, []).append(torch.from_numpy(array).float())
        return {tap: torch.cat(parts[tap]) for tap in self.bundle.inputs}

    @torch.no_grad()
    def logits(self, images: Sequence[str | Path]) -> dict[str, torch.Tensor]:
        """``{head name: [N, C]}`` logits (``main`` is the headline head)."""
        if not images:
            raise UsageError("No images given")
        x = {k: v.to(self.device) for k, v in self.features(images).items()}
        return {name: t.float().cpu() for name, t in self.head.outputs(x).items()}

    def predict(self, images: Sequence[str | Path], *, top_k: int = 5) -> list[Prediction]:
        if top_k < 1:
            raise UsageError(f"--top-k must be >= 1, got {top_k}")
        logits = next(iter(self.logits(images).values()))
        probs = logits.softmax(dim=-1)
        k = min(top_k, probs.shape[1])
        values, indices = probs.topk(k, dim=-1)
        names = self.bundle.classnames
        return [
            Prediction(str(path), [(names[i], float(p)) for p, i in zip(v.tolist(), ix.tolist())])
            for path, v, ix in zip(images, values, indices)
        ]


def check_backbone(backbone, meta: dict) -> None:
    """Refuse a backbone whose identity (weights hash, preprocessing, quick_gelu) is not the store's."""
    expected = meta.get("fingerprint_parts")
    got = json.loads(json.dumps(backbone.fingerprint_parts()))
    if expected is not None and got != expected:
        differs = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        raise BackboneError(
            f"The backbone {meta['arch']}/{meta['pretrained']} loaded now differs from the one the "
            f"store was built with ({', '.join(differs)} changed): this head was trained on other "
            "features. Use the original weights, or extract and fit again"
        )


def _open(path: str | Path):
    try:
        return open_image(path)
    except BadImageError as err:
        raise UsageError(str(err)) from err
