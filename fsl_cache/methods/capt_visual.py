"""CAPT's deep visual prompts run on cached ``vit/tokens`` (the input of ``ln_pre``), METHODS §2.9.2.

[CODE] PromptSRC/PromptKD IVLP ``VisionTransformer`` (``VPT_shallow``, ``ResidualAttentionBlock_IVLP``):
the first prompt set joins the tokens before ``ln_pre``; before block ``i`` (``1 ≤ i < depth``) the
prompt positions are replaced by set ``i``; the prompts stay in the sequence through the later blocks.
Everything before ``ln_pre`` is unchanged by the prompts, so stage one caches it and no image is
decoded again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError


class PromptedImageEncoder(nn.Module):
    """``ln_post(resblocks(ln_pre([cls; prompts; patches])))[cls] @ proj`` of a frozen open_clip ViT."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise UsageError(
                "capt visual_depth > 0 needs a ViT pooled by its class token (CLIP's ln_post + proj)"
            )
        if getattr(visual, "final_ln_after_pool", False) or visual.proj is None:
            raise UsageError("capt visual_depth > 0 needs a ViT with ln_post on all tokens and a proj")
        self.ln_pre = visual.ln_pre
        self.transformer = visual.transformer
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.requires_grad_(False)

    @property
    def width(self) -> int:
        return int(self.ln_pre.weight.shape[0])

    @property
    def depth(self) -> int:
        return len(self.transformer.resblocks)

    def forward(self, tokens: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled embeddings ``[B, D]`` (un-normalised) of cached tokens ``[B, 1 + HW, W]`` with prompts
        ``[J, P, W]`` (``J ≤ depth``; ``None`` = the plain backbone)."""
        dtype = self.ln_pre.weight.dtype
        x = tokens.to(dtype)
        n = 0 if prompts is None else prompts.shape[1]
        if n:
            first = prompts[0].to(dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], first, x[:, 1:]], dim=1)  # after the class token
        x = self.ln_pre(x)
        batch_first = getattr(self.transformer, "batch_first", True)
        for i, block in enumerate(self.transformer.resblocks):
            if n and 1 <= i < len(prompts):
                deep = prompts[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], deep, x[:, 1 + n :]], dim=1)
            x = block(x if batch_first else x.transpose(0, 1))
            x = x if batch_first else x.transpose(0, 1)
        return self.ln_post(x[:, 0]) @ self.proj


class EncodedBank:
    """Bank rows of cached tokens, encoded with the prompts when :func:`widen_batch` picks them (gradients
    reach the prompts as in the code, whose widened batch runs through the student's image encoder)."""

    def __init__(self, tokens: torch.Tensor, encode, *, dim: int, device: torch.device) -> None:
        self.tokens = tokens  # [N, 1 + HW, W] on the CPU
        self.encode = encode
        self.dim = dim
        self.device = device

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, slice):
            rows = torch.arange(len(self.tokens))[rows]
        if not len(rows):
            return torch.zeros(0, self.dim, device=self.device)
        picked = self.tokens[rows.cpu()].to(self.device)
        return F.normalize(self.encode(picked).float(), dim=-1)
