"""What a method reads from the store, declared on the method class and read by stage one.

``extract --for METHOD`` writes exactly the arrays the methods' :class:`Needs` name; ``fit`` refuses
a store that lacks one. Tap names are generic (:mod:`fsl_cache.backbones.taps`). A method that
trains on views of its own augmentation declares the :class:`~fsl_cache.backbones.views.Policy` in
its :class:`ViewNeed`; the built-in policies are named by string.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backbones.views import Policy


@dataclass(frozen=True)
class ViewNeed:
    """Augmented train views: ``views`` per image under ``policy`` (view 0 is always center)."""

    policy: str
    views: int
    taps: tuple[str, ...]
    custom_policy: Policy | None = None
    """The crop policy when ``policy`` is not a built-in one (``tip``, ``ldc``, ``coop``, ``flip``)."""


@dataclass(frozen=True)
class Needs:
    """What a method reads: taps on the center view of every pool, augmented train views, raw text."""

    eval_taps: tuple[str, ...] = ("pooled",)
    train_views: tuple[ViewNeed, ...] = ()
    text_raw: tuple[str, ...] = ()
    """Template sets whose raw per-template text embeddings (``text_raw/<set>``) the method reads."""


DEFAULT_FOR = ("zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f")
"""What ``extract`` writes without ``--for``: the light pooled-embedding methods."""
