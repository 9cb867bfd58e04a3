"""Prompt templates per dataset (METHODS §1.3).

Sets a dataset can carry:

- ``tip``: Tip-Adapter's hand-crafted templates, the default everywhere (also used by LDC and
  cross_modal). ImageNet and its shift sets use the 7-template ``IMAGENET_TEMPLATES_SELECT``.
- ``coop``: the single template of CoOp's ``zsclip.py`` and CLIP-Adapter: ``tip`` except ImageNet,
  which uses ``a photo of a {}.``.
- ``clip80`` and ``single``: ImageNet family only; CLIP's 80-template ensemble, and
  ``a photo of a {}.``.
"""

from __future__ import annotations

SINGLE = ("a photo of a {}.",)

# [CODE] CoOp trainers/imagenet_templates.py::IMAGENET_TEMPLATES_SELECT == Tip datasets/imagenet.py
IMAGENET_SELECT7 = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# [CODE] CoOp trainers/imagenet_templates.py::IMAGENET_TEMPLATES (CLIP's notebook ensemble)
CLIP80 = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

IMAGENET_FAMILY = ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")

# [CODE] Tip-Adapter datasets/*.py; CoOp zsclip.py::CUSTOM_TEMPLATES is the same except ImageNet
TIP_TEMPLATES: dict[str, tuple[str, ...]] = {
    "caltech101": ("a photo of a {}.",),
    "oxford_pets": ("a photo of a {}, a type of pet.",),
    "stanford_cars": ("a photo of a {}.",),
    "oxford_flowers": ("a photo of a {}, a type of flower.",),
    "food101": ("a photo of {}, a type of food.",),
    "fgvc_aircraft": ("a photo of a {}, a type of aircraft.",),
    "sun397": ("a photo of a {}.",),
    "dtd": ("{} texture.",),
    "eurosat": ("a centered satellite photo of {}.",),
    "ucf101": ("a photo of a person doing {}.",),
    **{name: IMAGENET_SELECT7 for name in IMAGENET_FAMILY},
}


def templates_for(dataset: str) -> dict[str, tuple[str, ...]]:
    """The template sets of the built-in dataset ``dataset`` (``tip`` first, the default)."""
    tip = TIP_TEMPLATES[dataset]
    if dataset in IMAGENET_FAMILY:
        return {"tip": tip, "coop": SINGLE, "clip80": CLIP80, "single": SINGLE}
    return {"tip": tip, "coop": tip}
