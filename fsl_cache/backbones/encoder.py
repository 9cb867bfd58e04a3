"""The backbone side of stage one, shared with ``predict``: taps of a batch in the store's precision.

``predict`` runs the very same encoder on new images, so a head sees on them exactly what its
cached evaluation saw (same taps, same derivations, same round trip through the store dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .taps import POOL7, derive, derived_tap

ZS_SCALE = 100.0
"""The released CLIP logit scale ([CODE] Tip-Adapter / LDC hard-code 100 · f̂ Wᵀ); random weights use it."""


@dataclass
class Encoder:
    """The backbone side of extraction: taps for a batch, zero-shot logits from ``pooled``."""

    backbone: object
    text: dict[str, torch.Tensor]
    store_dtype: np.dtype
    scale: float
    """The store's zero-shot logit scale (its manifest's ``zs_scale``)."""

    def __call__(self, images: torch.Tensor, taps: tuple[str, ...]) -> dict[str, np.ndarray]:
        bb = self.backbone
        x = images.to(device=bb.device, dtype=bb.dtype)
        base_taps = list(dict.fromkeys(derived_tap(t)[0] for t in taps))
        if any(derived_tap(t)[1] == POOL7 for t in taps) and "rn/layer4" not in base_taps:
            base_taps.append("rn/layer4")  # its grid is the pooling target
        out = bb.encode_taps(x, base_taps)
        grid = tuple(out["rn/layer4"].shape[-2:]) if "rn/layer4" in out else None
        arrays = {}
        for tap in taps:
            base, how = derived_tap(tap)
            arrays[tap] = self._store(derive(out[base], how, grid=grid))
        if "pooled" in out:
            f = torch.nn.functional.normalize(out["pooled"].float(), dim=-1)
            for name, weights in self.text.items():
                arrays[f"zs_logits/{name}"] = self._store(self.scale * f @ weights.to(f.device).T)
        return arrays

    def _store(self, t: torch.Tensor) -> np.ndarray:
        t = t.float()
        if self.store_dtype == np.float16:
            # Random-weight activations can exceed fp16's range; saturate rather than write inf.
            # torch casts to fp16 ~5x faster than numpy's astype (RN50 layer1 maps, 2 cores), same bits.
            return t.clamp(-65504.0, 65504.0).to(torch.float16).cpu().numpy()
        return t.cpu().numpy().astype(self.store_dtype)
