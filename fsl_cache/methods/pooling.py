"""CLIP's pooling tails as stacked, trainable modules: G copies evaluated in one batched pass.

SAFE (METHODS §2.7) fine-tunes the part of the image tower that turns the cached dense map into the
embedding: the ResNet attention pool (``P``, q/k/v, ``c_proj``) on ``layer4``, or the ViT's last block
plus ``ln_post`` and ``proj`` on the input of that block. Only output token 0 (RN) / the CLS token
(ViT) reaches the embedding, so only that query is computed; keys and values still cover every
token, which makes this exact (METHODS §1.1). Every parameter carries a leading grid axis ``G`` so a
whole lr × wd grid trains on the same batch in one forward/backward: ``forward(x [B, ...]) → [G, B, D]``.

With one query, the key and value projections are never applied token by token (:func:`attend_one`):
``q·(W_k z_j + b_k) = (W_kᵀ q)·z_j + const`` and ``Σ_j a_j (W_v z_j + b_v) = W_v (Σ_j a_j z_j) + b_v``,
so a sample costs two ``C×C`` products instead of ``2L`` (RN50: 15 instead of 430 MFLOP; ViT-B/16
5 instead of 230), the same function up to float rounding.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn

from ..errors import BackboneError

RN_PARAMS = ("pos", "wq", "bq", "wk", "bk", "wv", "bv", "wc", "bc")
VIT_PARAMS = (
    "ln1_w",
    "ln1_b",
    "w_qkv",
    "b_qkv",
    "wo",
    "bo",
    "ln2_w",
    "ln2_b",
    "w_fc",
    "b_fc",
    "w_out",
    "b_out",
    "lnp_w",
    "lnp_b",
    "proj",
)


class PoolingTail(nn.Module):
    """``G`` copies of a pooling tail (``kind`` ``rn`` or ``vit``), each parameter ``[G, ...]``."""

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        *,
        kind: str,
        heads: int,
        eps: float = 1e-5,
        quick_gelu: bool = False,
    ) -> None:
        super().__init__()
        names = RN_PARAMS if kind == "rn" else VIT_PARAMS
        if set(params) != set(names):
            raise ValueError(f"{kind} tail needs parameters {names}, got {sorted(params)}")
        self.kind, self.heads, self.eps, self.quick_gelu = kind, heads, eps, quick_gelu
        self.params = nn.ParameterDict({k: nn.Parameter(params[k].detach().float().clone()) for k in names})

    @classmethod
    def from_backbone(cls, backbone, *, copies: int = 1, trainable: bool = False) -> PoolingTail:
        """``copies`` stacked copies of ``backbone``'s pooling tail (its own weights, cast to fp32)."""
        visual = backbone.model.visual
        tail = _rn_tail(visual) if backbone.kind == "rn" else _vit_tail(visual)
        return tail.stacked(copies).requires_grad_(trainable)

    @property
    def copies(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def stacked(self, copies: int) -> PoolingTail:
        """A new tail holding ``copies`` copies of member 0 (``copies=1``: a single member)."""
        return self._like({k: p[:1].expand(copies, *p.shape[1:]) for k, p in self.params.items()})

    def member(self, index: int) -> PoolingTail:
        """A detached single-member tail holding member ``index``."""
        return self._like({k: p[index : index + 1] for k, p in self.params.items()})

    def _like(self, params: dict[str, torch.Tensor]) -> PoolingTail:
        return PoolingTail(
            params, kind=self.kind, heads=self.heads, eps=self.eps, quick_gelu=self.quick_gelu
        ).to(next(iter(self.params.values())).device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[G, B, D]`` of cached maps ``x``: RN ``[B, C, H, W]``, ViT ``[B, L, W]`` (CLS first)."""
        p = dict(self.params)
        if self.kind == "rn":
            return attnpool_query0(x, p, heads=self.heads)
        return vit_block_cls(x, p, heads=self.heads, eps=self.eps, quick_gelu=self.quick_gelu)


class AttnPoolToken0(nn.Module):
    """CLIP's ``AttentionPool2d`` as a frozen-weight module that computes output token 0 only (all that the
    embedding uses) instead of all ``HW + 1`` queries; input ``[B, C, H, W]`` → ``[B, D]``."""

    def __init__(self, attnpool: nn.Module) -> None:
        super().__init__()
        self.tail = _rn_tail(types.SimpleNamespace(attnpool=attnpool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(x)[0]


def tower_pooling(visual, kind: str) -> nn.Module | torch.Tensor:
    """The image tower's frozen pooling in float32: RN the attention pool (token 0 only), ViT ``proj`` ``[W, D]``."""
    if kind == "rn":
        return AttnPoolToken0(visual.attnpool).float()
    return visual.proj.detach().float().clone()


# ---------------------------------------------------------------------------- the math


def attnpool_query0(x: torch.Tensor, p: dict[str, torch.Tensor], *, heads: int) -> torch.Tensor:
    """CLIP's AttentionPool2d on ``layer4`` maps ``[B, C, H, W]``, output token 0 only → ``[G, B, D]``.

    ``Z = [mean(X); X] + P``; ``q`` from ``Z₀`` only; ``K``, ``V`` from all of ``Z`` (mean token included).
    """
    tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
    z = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # [B, L, C]
    z = z[None] + p["pos"][:, None]  # [G, B, L, C]
    q = linear(z[:, :, 0], p["wq"], p["bq"])  # [G, B, C]
    out = attend_one(q, z, p["wk"], p["wv"], p["bv"], heads=heads)
    return linear(out, p["wc"], p["bc"])  # [G, B, D]


def vit_block_cls(
    x: torch.Tensor, p: dict[str, torch.Tensor], *, heads: int, eps: float, quick_gelu: bool
) -> torch.Tensor:
    """The last ViT block, ``ln_post`` and ``proj`` on its input ``[B, L, W]``, CLS output only → ``[G, B, D]``."""
    width = x.shape[-1]
    h = affine(F.layer_norm(x, (width,), eps=eps)[None], p["ln1_w"], p["ln1_b"])  # [G, B, L, W]
    (wq, wk, wv), (bq, _, bv) = p["w_qkv"].split(width, dim=1), p["b_qkv"].split(width, dim=1)
    attn = attend_one(linear(h[:, :, 0], wq, bq), h, wk, wv, bv, heads=heads)
    cls = x[None, :, 0] + linear(attn, p["wo"], p["bo"])  # [G, B, W]
    hidden = linear(
        affine(F.layer_norm(cls, (width,), eps=eps), p["ln2_w"], p["ln2_b"]), p["w_fc"], p["b_fc"]
    )
    hidden = hidden * torch.sigmoid(1.702 * hidden) if quick_gelu else F.gelu(hidden)
    cls = cls + linear(hidden, p["w_out"], p["b_out"])
    cls = affine(F.layer_norm(cls, (width,), eps=eps), p["lnp_w"], p["lnp_b"])
    return torch.bmm(cls, p["proj"])  # [G, B, D]


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-member ``x Wᵀ + b``: ``x [G, ..., in]``, ``w [G, out, in]``, ``b [G, out]`` → ``[G, ..., out]``."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    return torch.baddbmm(b[:, None], flat, w.transpose(1, 2)).reshape(*x.shape[:-1], w.shape[1])


def affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-member LayerNorm affine: ``x [G, ..., W]``, ``w``, ``b`` ``[G, W]``."""
    shape = (w.shape[0],) + (1,) * (x.ndim - 2) + (w.shape[1],)
    return x * w.reshape(shape) + b.reshape(shape)


def attend_one(
    q: torch.Tensor, z: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor, *, heads: int
) -> torch.Tensor:
    """Multi-head attention of one query per image over tokens ``z``, keys and values projected implicitly.

    ``q [G, B, C]`` (projected), ``z [G, B, L, C]``, ``wk``/``wv`` ``[G, C, C]``, ``bv [G, C]`` → ``[G, B, C]``.
    The key bias adds the same logit to every token, which softmax ignores, so it does not appear.
    """
    g, b, length, c = z.shape
    d = c // heads
    wk_heads, wv_heads = wk.reshape(g, heads, d, c), wv.reshape(g, heads, d, c)
    query_in_tokens = torch.einsum("gbhd,ghdc->gbhc", q.reshape(g, b, heads, d), wk_heads)  # [G, B, h, C]
    logits = query_in_tokens @ z.transpose(-1, -2) / math.sqrt(d)  # [G, B, h, L]
    mixed = torch.softmax(logits, dim=-1) @ z  # [G, B, h, C]: attention-weighted tokens per head
    out = torch.einsum("gbhc,ghdc->gbhd", mixed, wv_heads)  # [G, B, h, d]
    return out.reshape(g, b, c) + bv[:, None]


# ---------------------------------------------------------------------------- from open_clip modules


def _rn_tail(visual) -> PoolingTail:
    pool = getattr(visual, "attnpool", None)
    if not isinstance(pool, AttentionPool2d):
        raise BackboneError(f"SAFE needs CLIP's AttentionPool2d, found {type(pool).__name__}")
    params = {
        "pos": pool.positional_embedding,
        "wq": pool.q_proj.weight,
        "bq": pool.q_proj.bias,
        "wk": pool.k_proj.weight,
        "bk": pool.k_proj.bias,
        "wv": pool.v_proj.weight,
        "bv": pool.v_proj.bias,
        "wc": pool.c_proj.weight,
        "bc": pool.c_proj.bias,
    }
    return PoolingTail({k: v.detach()[None] for k, v in params.items()}, kind="rn", heads=pool.num_heads)


def _vit_tail(visual) -> PoolingTail:
    block = visual.transformer.resblocks[-1]
    plain = (
        isinstance(block, ResidualAttentionBlock)
        and isinstance(block.ls_1, nn.Identity)
        and isinstance(block.ls_2, nn.Identity)
        and not hasattr(block, "ln_1_kv")
    )
    if (
        not plain
        or getattr(visual, "attn_pool", None) is not None
        or getattr(visual, "pool_type", "tok") != "tok"
        or visual.proj is None
    ):
        raise BackboneError(
            "SAFE supports CLIP-style ViTs only (plain last block, CLS pooling, ln_post + proj)"
        )
    act = block.mlp.gelu
    if not isinstance(act, (QuickGELU, nn.GELU)) or getattr(act, "approximate", "none") != "none":
        raise BackboneError(f"SAFE: unsupported MLP activation {act!r}")
    attn = block.attn
    params = {
        "ln1_w": block.ln_1.weight,
        "ln1_b": block.ln_1.bias,
        "w_qkv": attn.in_proj_weight,  # [3W, W]: q, k, v
        "b_qkv": attn.in_proj_bias,
        "wo": attn.out_proj.weight,
        "bo": attn.out_proj.bias,
        "ln2_w": block.ln_2.weight,
        "ln2_b": block.ln_2.bias,
        "w_fc": block.mlp.c_fc.weight,
        "b_fc": block.mlp.c_fc.bias,
        "w_out": block.mlp.c_proj.weight,
        "b_out": block.mlp.c_proj.bias,
        "lnp_w": visual.ln_post.weight,
        "lnp_b": visual.ln_post.bias,
        "proj": visual.proj,
    }
    eps = {block.ln_1.eps, block.ln_2.eps, visual.ln_post.eps}
    if len(eps) != 1:
        raise BackboneError(f"SAFE: LayerNorms with different eps {sorted(eps)}")
    return PoolingTail(
        {k: v.detach()[None] for k, v in params.items()},
        kind="vit",
        heads=attn.num_heads,
        eps=eps.pop(),
        quick_gelu=isinstance(act, QuickGELU),
    )
