"""Which cached tensors each method needs, so ``extract --for METHOD`` writes only those.

Tap names here are generic: ``pooled`` (the embedding), ``multilevel`` (RN ``layer1..4`` or the ViT
blocks LDC adapts), ``multilevel_lite`` (the same maps average-pooled to layer4's 7×7 grid, or ViT
block token means: LDC-lite's approximation), ``dense`` (the map entering the pooling layer) and
``dense_embed`` (CAPT-C's projected tokens, optional). :func:`resolve_taps` turns them into a backbone's concrete
taps. The
table exists before the methods do: it is the contract between stage one and stage two.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import did_you_mean

# [CODE] Tip-Adapter configs/*.yaml: train_epoch 20, EuroSAT 100; the views needed are 1 + max(10, epochs)
TIP_F_EPOCHS = {"eurosat": 100}
TIP_F_DEFAULT_EPOCHS = 20


@dataclass(frozen=True)
class ViewNeed:
    """Augmented train views: ``views`` per image under ``policy`` (view 0 is always center)."""

    policy: str
    views: int
    taps: tuple[str, ...]


@dataclass(frozen=True)
class Needs:
    """What a method reads: taps on the center view of every pool, and augmented train views."""

    eval_taps: tuple[str, ...] = ("pooled",)
    train_views: tuple[ViewNeed, ...] = ()
    full_val: bool = False
    """The paper protocol of this method selects on the whole val split."""
    note: str = ""


def _tip_views(dataset: str) -> int:
    return 1 + max(10, TIP_F_EPOCHS.get(dataset, TIP_F_DEFAULT_EPOCHS))


def _needs_table(dataset: str) -> dict[str, Needs]:
    return {
        "zero_shot": Needs(note="METHODS §2.1"),
        "linear_probe": Needs(note="METHODS §2.2"),
        "tip_adapter": Needs(
            train_views=(ViewNeed("tip", 11, ("pooled",)),), note="10 tip views average into keys"
        ),
        "tip_adapter_f": Needs(
            train_views=(ViewNeed("tip", _tip_views(dataset), ("pooled",)),), note="1 + max(10, epochs)"
        ),
        # [PROPOSED] 1 + 200 views would match CoOp's 200 epochs exactly; 50 keeps stage one affordable
        "clip_adapter": Needs(train_views=(ViewNeed("coop", 51, ("pooled",)),)),
        "coop": Needs(train_views=(ViewNeed("coop", 51, ("pooled",)),)),
        "ldc": Needs(
            eval_taps=("pooled", "multilevel"), train_views=(ViewNeed("ldc", 10, ("pooled", "multilevel")),)
        ),
        # [PROPOSED] METHODS §2.6.7 ldc-lite: 376 KB instead of 3 MB per RN50 view; an approximation
        "ldc_lite": Needs(
            eval_taps=("pooled", "multilevel_lite"),
            train_views=(ViewNeed("ldc", 10, ("pooled", "multilevel_lite")),),
        ),
        "safe": Needs(eval_taps=("pooled", "dense"), train_views=(ViewNeed("flip", 2, ("pooled", "dense")),)),
        "safe_a": Needs(
            eval_taps=("pooled", "dense"),
            train_views=(
                ViewNeed("flip", 2, ("pooled", "dense")),
                ViewNeed("tip", _tip_views(dataset), ("pooled", "dense")),
            ),
        ),
        "capt": Needs(train_views=(ViewNeed("coop", 51, ("pooled",)),)),
    }


def method_needs(method: str, *, dataset: str = "") -> Needs:
    """The needs of ``method`` for ``dataset`` (some view counts follow per-dataset epochs)."""
    table = _needs_table(dataset)
    if method not in table:
        raise did_you_mean(method, table, what="method")
    return table[method]


def known_methods() -> list[str]:
    return sorted(_needs_table(""))


DEFAULT_FOR = ("zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f")
"""What ``extract`` writes without ``--for``: the light pooled-embedding methods."""


POOL7 = "pool7"
"""Derived tap suffix: a RN map average-pooled to layer4's grid (kernel = stride = its downsampling)."""
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
    import torch.nn.functional as F

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
        else:
            out.append(tap)
    return tuple(dict.fromkeys(out))
