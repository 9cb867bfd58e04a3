"""Tap names: generic ones a method asks for, the concrete ones a backbone gives, and derived taps.

Generic names: ``pooled`` (the embedding), ``multilevel`` (RN ``layer1..4`` or the ViT blocks LDC
adapts), ``multilevel_lite`` (the same maps average-pooled to layer4's 7×7 grid, or ViT block token
means: LDC-lite's approximation), ``dense`` (the map entering the pooling layer) and any concrete
tap (``dense_embed``, ``rn/layer4``, ...) passed through; ``vit/tokens`` is dropped for ResNets (the method
refuses them itself). :func:`resolve_taps` turns them into a
backbone's concrete taps; :func:`derive` computes a derived tap from the base tap it names.
"""

from __future__ import annotations

import torch.nn.functional as F

POOL7 = "pool7"
"""Derived tap suffix: a RN map average-pooled to layer4's grid (kernel = stride = its downsampling)."""
TOKENS = "vit/tokens"
"""A ViT's tokens entering ``ln_pre`` (patch embedding + class token + positional embedding, CLS first): the
deepest tensor deep visual prompts leave unchanged (CAPT ``visual_depth``, METHODS §2.9.2)."""
MEAN = "mean"
"""Derived tap suffix: a ViT block's mean over all tokens, CLS included (as LDC's PatchMean)."""


def derived_tap(tap: str) -> tuple[str, str | None]:
    """``(base tap, derivation)``: ``rn/layer1_pool7`` → ``(rn/layer1, pool7)``; plain taps → ``(tap, None)``."""
    base, _, suffix = tap.rpartition("_")
    return (base, suffix) if suffix in (POOL7, MEAN) else (tap, None)


def derived_shape(tap: str, base_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    base, how = derived_tap(tap)
    shape = tuple(base_shapes[base])
    if how == POOL7:
        return (shape[0],) + tuple(base_shapes["rn/layer4"][1:])
    if how == MEAN:
        return shape[1:]
    return shape


def derive(tensor, how: str | None, *, grid: tuple[int, int] | None = None):
    """Apply a derivation to a batch of base-tap tensors ``[B, ...]``."""
    if how == POOL7:
        return F.adaptive_avg_pool2d(tensor, grid)  # sizes divide exactly, so this is AvgPool2d(k=s=ratio)
    if how == MEAN:
        return tensor.mean(dim=1)
    return tensor


def resolve_taps(
    generic: tuple[str, ...], *, kind: str, dense_tap: str, vit_blocks: tuple[int, ...]
) -> tuple[str, ...]:
    """Concrete backbone taps for generic names, in a stable order without repeats."""
    out: list[str] = []
    for tap in generic:
        if tap == "multilevel":
            out += (
                [f"rn/layer{i}" for i in range(1, 5)]
                if kind == "rn"
                else [f"vit/block{b:02d}" for b in vit_blocks]
            )
        elif tap == "multilevel_lite":
            out += (
                [f"rn/layer{i}_{POOL7}" for i in range(1, 5)]
                if kind == "rn"
                else [f"vit/block{b:02d}_{MEAN}" for b in vit_blocks]
            )
        elif tap == "dense":
            out.append(dense_tap)
        elif tap == TOKENS and kind == "rn":
            continue
        else:
            out.append(tap)
    return tuple(dict.fromkeys(out))
