"""The architectures fsl-cache can load, with their pretrained tags, for ``fsl-cache models``."""

from __future__ import annotations

from dataclasses import dataclass

import open_clip

from fsl_cache.backbones.tiny import TINY_MODELS


@dataclass(frozen=True)
class ModelInfo:
    """One loadable architecture."""

    name: str
    """open_clip architecture name, e.g. ``RN50``, ``ViT-B-16``."""
    kind: str
    """``rn`` (ModifiedResNet) or ``vit`` (VisionTransformer)."""
    tags: tuple[str, ...]
    """Pretrained tags open_clip knows for it; the tiny models list ``shapes`` and ``none``.

    ``none`` (random init) and a weights file are accepted by every architecture."""
    embed_dim: int
    """Dimension of the pooled image embedding."""
    image_size: int
    """Input side in pixels."""
    tiny: bool = False
    """One of fsl-cache's tiny models for tests and demos."""


def config_kind(model_cfg: dict) -> str | None:
    """``rn``/``vit`` for CLIP models with open_clip's own image towers, else ``None``.

    timm trunks have other intermediates, and CoCa pools attentionally: neither is covered by the
    taps (or tested), so both are left out.
    """
    vision = model_cfg.get("vision_cfg", {})
    if vision.get("timm_model_name") or "multimodal_cfg" in model_cfg:
        return None
    return "rn" if isinstance(vision.get("layers"), list | tuple) else "vit"


def list_models() -> list[ModelInfo]:
    """Every open_clip architecture with a ResNet or ViT image tower, plus the tiny ones."""
    infos = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        kind = config_kind(cfg)
        if kind is None:
            continue
        tiny = name in TINY_MODELS
        tags = tuple(open_clip.list_pretrained_tags_by_model(name))
        if tiny:
            tags += ("none",)
        size = cfg["vision_cfg"].get("image_size", 224)
        infos.append(
            ModelInfo(
                name=name,
                kind=kind,
                tags=tags,
                embed_dim=int(cfg["embed_dim"]),
                image_size=int(size if isinstance(size, int) else size[0]),
                tiny=tiny,
            )
        )
    return infos
