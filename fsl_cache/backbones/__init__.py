"""CLIP backbones: loading from any open_clip source, frozen, with feature taps and identity."""

from fsl_cache.backbones.backbone import POOLED, Backbone
from fsl_cache.backbones.catalog import ModelInfo, list_models
from fsl_cache.backbones.loading import PRECISIONS, load_architecture, load_backbone
from fsl_cache.backbones.tiny import TINY_MODELS, register_tiny_models
from fsl_cache.backbones.weights import WeightsSource

__all__ = [
    "POOLED",
    "PRECISIONS",
    "TINY_MODELS",
    "Backbone",
    "ModelInfo",
    "WeightsSource",
    "list_models",
    "load_architecture",
    "load_backbone",
    "register_tiny_models",
]
