"""Rebuilding a trained head from its saved tensors (``head.safetensors``), its config and the backbone.

Heads save only what was fitted plus small buffers (text weights, alpha/beta, scales); frozen parts
taken from the backbone (CoOp's text encoder, LDC's attention pooling, SAFE's frozen pooling tail)
are rebuilt from the re-loaded, fingerprint-checked backbone. How is each method's own business
(:meth:`~fsl_cache.methods.Method.rebuild_head`). Loading is strict: every saved tensor must land
in the head, and only the parts ``saved_state`` leaves out may be missing from the file.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UsageError
from ..methods import Method, get_method
from .bundle import HeadBundle


def rebuild_head(bundle: HeadBundle, backbone: Callable[[], object]) -> torch.nn.Module:
    """The fitted head of ``bundle`` in eval mode on CPU; ``backbone()`` loads the backbone when needed."""
    cls = get_method(bundle.method).cls
    if cls.rebuild_head.__func__ is Method.rebuild_head.__func__:
        raise UsageError(
            f"predict/export cannot rebuild {bundle.method} heads: the method has no rebuild_head()"
        )
    state = dict(bundle.state)
    head = cls.rebuild_head(bundle, state, backbone)
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
