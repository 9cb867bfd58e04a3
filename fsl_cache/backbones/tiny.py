"""Tiny CLIP architectures for tests and the demo, registered with open_clip, and their weights.

``fsl-tiny-rn`` is RN50's ModifiedResNet shrunk to one bottleneck per stage and width 8 (64 px
input: layer1 32x16x16 … layer4 256x2x2, attention pooling to 64). ``fsl-tiny-vit`` is a 12-block
ViT of width 128 (64 px, patch 8: 64 patches + CLS) with a text tower of width 64 (the RN's: 128),
narrowed so that its ``shapes`` file stays under 10 MB. Both keep the 49,408-token vocabulary so the
standard tokenizer works. ``fsl-tiny-rn`` keeps OpenAI's head width of 64 everywhere, so
``open_clip.openai.load_openai_model`` infers it from a state dict exactly as it does RN50; the
ViT's text tower has 2 heads of 32, which that inference would read as one head, so its weights load
through open_clip's own loader (safetensors or state dict), not as an OpenAI TorchScript archive.

Besides ``--pretrained none`` (random weights) both have the pretrained tag ``shapes``: weights
trained by ``python -m fsl_cache.backbones.train_tiny`` on the synthetic shapes world
(:mod:`fsl_cache.datasets.shapes`), shipped in ``weights/`` and loaded like any open_clip tag
whose file is local.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

TINY_MODELS: tuple[str, ...] = ("fsl-tiny-rn", "fsl-tiny-vit")
CONFIG_DIR = Path(__file__).with_name("configs")
WEIGHTS_DIR = Path(__file__).with_name("weights")
SHAPES_TAG = "shapes"
SHAPES_NOTE = (
    "pretrained='shapes': {arch} was trained on a synthetic world of coloured, textured shapes; "
    "fine for demos and tests, not for real photos"
)


def shapes_weights_path(arch: str) -> Path:
    """The shipped ``shapes`` weights file of a tiny architecture."""
    return WEIGHTS_DIR / f"{arch}-{SHAPES_TAG}.safetensors"


def register_tiny_models() -> None:
    """Add the JSON configs in ``configs/`` and the shipped ``shapes`` weights to open_clip (idempotent)."""
    if not set(TINY_MODELS) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)
    # open_clip has no public call to add a pretrained tag; a 'file' entry is resolved without download.
    registry = open_clip.pretrained._PRETRAINED
    for arch in TINY_MODELS:
        path = shapes_weights_path(arch)
        if path.is_file():
            registry.setdefault(arch, {})[SHAPES_TAG] = {
                "file": str(path),
                "mean": OPENAI_DATASET_MEAN,
                "std": OPENAI_DATASET_STD,
            }


register_tiny_models()
