"""The head: the small module a method fits on cached tensors and evaluation runs on every split."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class Head(nn.Module):
    """Maps a batch of cached tensors to class logits.

    ``inputs`` names the taps read per image (``pooled``, ``zs_logits/tip``, ``rn/layer4`` ...);
    ``forward`` gets ``{tap: float32 tensor [B, ...]}`` and returns logits ``[B, C]`` or, for a
    method with several heads, ``{head name: [B, C]}`` whose first entry is the headline.
    """

    inputs: tuple[str, ...] = ("pooled",)

    def outputs(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``forward`` as a dict of named logits (a single tensor is named ``main``)."""
        out = self(x)
        return out if isinstance(out, dict) else {"main": out}

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The tensors written to ``head.safetensors``; override to leave out frozen encoders."""
        return self.state_dict()


@contextlib.contextmanager
def seeded_init(generator: torch.Generator) -> Iterator[None]:
    """Build modules inside this block so their default (global-RNG) init follows ``generator``.

    The global RNG is forked and restored, so nothing outside the block is seeded.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
