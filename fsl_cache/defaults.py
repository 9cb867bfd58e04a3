"""Every default that more than one command shares, stated once (importing this loads nothing else).

The CLI reads these for its option defaults without importing torch, so ``--help`` stays instant.
"""

DEFAULT_MODEL, DEFAULT_PRETRAINED = "RN50", "openai"
"""The backbone every command uses unless ``--model``/``--pretrained`` say otherwise."""
DEFAULT_SHOTS = (1, 2, 4, 8, 16)
"""The CoOp shot counts: few-shot pools are extracted for all of them and grids sweep them."""
DEFAULT_SEEDS = (1, 2, 3)
"""The CoOp seeds."""
DEFAULT_PROTOCOL = "coop"
"""CoOp/Dassl split, selection on the few-shot val, test read once (METHODS §1.5)."""
DEFAULT_VIT_BLOCKS = (6, 8, 10, 12)
"""ViT blocks tapped for multi-level maps unless ``--vit-blocks`` says otherwise (LDC's choice for 12 blocks)."""
CONFIRM_EXTRACT_BYTES = 2 * 2**30
"""Feature maps (RN layer1..4, ViT blocks, dense maps) ``fit``/``grid`` add to a store without asking."""
DEFAULT_TARGETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
"""``--protocol domain_shift`` targets unless ``--targets`` says otherwise (the papers' ImageNet shifts)."""
