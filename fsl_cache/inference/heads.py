"""Rebuilding a trained head from its saved tensors (``head.safetensors``), its config and the backbone.

Heads save only what was fitted plus small buffers (text weights, alpha/beta, scales); frozen parts
taken from the backbone (CoOp's text encoder, LDC's attention pooling, SAFE's frozen pooling tail)
are rebuilt from the re-loaded, fingerprint-checked backbone. A method can take over with a
classmethod ``rebuild_head(bundle, state, backbone) -> Head``; otherwise the builder registered
here for the head's class is used. Loading is strict: every saved tensor must land in the head, and
only the parts ``saved_state`` leaves out may be missing from the file.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UsageError
from .bundle import HeadBundle

Builder = Callable[[HeadBundle, dict, Callable], torch.nn.Module]
_BUILDERS: dict[str, Builder] = {}


def head_builder(class_name: str):
    """Register a builder for heads of class ``class_name`` (the record's ``head.class``)."""

    def register(fn: Builder) -> Builder:
        _BUILDERS[class_name] = fn
        return fn

    return register


def rebuild_head(bundle: HeadBundle, backbone: Callable[[], object]) -> torch.nn.Module:
    """The fitted head of ``bundle`` in eval mode on CPU; ``backbone()`` loads the backbone when needed."""
    from ..methods import get_method

    cls = get_method(bundle.method).cls
    state = dict(bundle.state)
    class_name = bundle.meta["head"]["class"]
    if hasattr(cls, "rebuild_head"):
        head = cls.rebuild_head(bundle, state, backbone)
    elif class_name in _BUILDERS:
        head = _BUILDERS[class_name](bundle, state, backbone)
    else:
        raise UsageError(
            f"predict/export cannot rebuild {bundle.method} heads ({class_name}) yet; "
            f"supported: {', '.join(sorted(_BUILDERS))}"
        )
    load_strict(head, state)
    return head.float().eval()


def load_strict(head, state: dict[str, torch.Tensor]) -> None:
    result = head.load_state_dict(state, strict=False)
    left_out = set(head.state_dict()) - set(head.saved_state())
    missing = set(result.missing_keys) - left_out
    if result.unexpected_keys or missing:
        raise UsageError(
            f"The saved head does not fit a rebuilt {type(head).__name__}: unexpected "
            f"{sorted(result.unexpected_keys)[:3]}, missing {sorted(missing)[:3]}"
        )


def _f(state: dict, key: str) -> float:
    return float(state[key])


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@head_builder("ZeroShotHead")
def _zero_shot(bundle, state, backbone):
    from ..methods.zero_shot import ZeroShotHead

    return ZeroShotHead(state["text"], scale=_f(state, "scale"))


@head_builder("LinearHead")
def _linear(bundle, state, backbone):
    from ..methods.linear_probe import LinearHead

    return LinearHead(state["linear.weight"], state["linear.bias"])


@head_builder("TipHead")
def _tip(bundle, state, backbone):
    from ..methods.tip_adapter import TipHead

    return TipHead(
        state["adapter.weight"],
        state["values"],
        state["text"],
        alpha=_f(state, "alpha"),
        beta=_f(state, "beta"),
        scale=_f(state, "scale"),
    )


@head_builder("ClipAdapterHead")
def _clip_adapter(bundle, state, backbone):
    from ..methods.clip_adapter import ClipAdapterHead

    return ClipAdapterHead(
        state["text"],
        rho=_f(state, "rho"),
        scale=_f(state, "scale"),
        reduction=int(bundle.meta["config"].get("reduction", 4)),
    )


@head_builder("CoOpHead")
def _coop(bundle, state, backbone):
    from ..methods.coop import CoOpHead

    cfg, bb = bundle.meta["config"], backbone()
    return CoOpHead(
        bb.model,
        bb.tokenizer,
        bundle.classnames,
        n_ctx=int(cfg["n_ctx"]),
        csc=bool(cfg["csc"]),
        position=cfg["class_token_position"],
        scale=_f(state, "scale"),
        truncate=bool(cfg["truncate"]),
    )


@head_builder("LDCHead")
def _ldc(bundle, state, backbone):
    from ..methods.ldc import VIT_MAF_HIDDEN, LDCHead, build_trunk
    from ..methods.pooling import tower_pooling

    cfg, meta = bundle.meta["config"], bundle.meta["backbone"]
    kind, d, taps = meta.get("kind", "rn"), int(meta["embed_dim"]), bundle.inputs[1:]
    frozen = tower_pooling(backbone().model.visual, kind)
    shapes = [tuple(bundle.meta["tap_shapes"][t]) for t in taps]
    trunk = build_trunk(kind, shapes, frozen, embed_dim=d, fuse=cfg["fuse"], lite=bundle.method == "ldc_lite")
    return LDCHead(
        trunk,
        taps=taps,
        text=state["text"],
        scale=_f(state, "scale"),
        maf_hidden=d if kind == "rn" else VIT_MAF_HIDDEN,
        eval_batch_size=int(cfg["eval_batch_size"]),
    )


def _safe_head(bundle, state, backbone):
    from ..methods.pooling import PoolingTail
    from ..methods.safe import SafeHead

    bb = backbone()
    return SafeHead(
        PoolingTail.from_backbone(bb),
        PoolingTail.from_backbone(bb),
        state["text"],
        tap=bundle.inputs[0],
        beta=_f(state, "beta"),
        tau=_f(state, "tau"),
    )


head_builder("SafeHead")(_safe_head)


@head_builder("SafeAHead")
def _safe_a(bundle, state, backbone):
    from ..methods.safe_a import SafeAHead

    return SafeAHead(
        _safe_head(bundle, _sub(state, "safe."), backbone), _tip(bundle, _sub(state, "tip."), backbone)
    )
