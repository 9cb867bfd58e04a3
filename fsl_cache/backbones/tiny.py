"""Tiny random-weight CLIP architectures for tests and the demo, registered with open_clip.

``fsl-tiny-rn`` is RN50's ModifiedResNet shrunk to one bottleneck per stage and width 8 (64 px
input: layer1 32x16x16 … layer4 256x2x2, attention pooling to 64). ``fsl-tiny-vit`` is a 12-block
ViT of width 128 (64 px, patch 8: 64 patches + CLS). Both keep OpenAI's head width of 64 so that
``open_clip.openai.load_openai_model`` infers them from a state dict exactly as it does RN50 or
ViT-B/16, and both keep the 49,408-token vocabulary so the standard tokenizer works.
"""

from __future__ import annotations

from pathlib import Path

import open_clip

TINY_MODELS: tuple[str, ...] = ("fsl-tiny-rn", "fsl-tiny-vit")
CONFIG_DIR = Path(__file__).with_name("configs")


def register_tiny_models() -> None:
    """Add the JSON configs in ``configs/`` to open_clip's registry (idempotent)."""
    if not set(TINY_MODELS) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)


register_tiny_models()
