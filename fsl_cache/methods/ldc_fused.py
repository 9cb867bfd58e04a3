"""Fused exact LDC RN adapter: ``AvgPool_s(ReLU(BN2d(Conv1×1(x))))`` without the full-resolution output.

The plain :class:`~fsl_cache.methods.ldc_modules.ConvAdapter` materialises ``y = Conv1×1(x)``
(``[B, 2048, H, W]``: 25.7 MB per image in fp32 for RN50 layer1) and keeps it, the BN output and the
ReLU mask for the backward pass. Here nothing of that size exists for the whole batch:

- **statistics first** (training): BatchNorm's batch mean and biased variance of a linear map follow
  from the input's moments, ``mean_y = W μ_x`` and ``var_y = diag(W Σ_x Wᵀ)``, with ``Σ_x`` the
  (centred) ``C_in × C_in`` covariance of the input pixels, accumulated tile by tile;
- **then per tile** (one image, a band of rows that is a whole number of pooling windows):
  ``z = (γ/σ)·W (x − μ_x) + β`` as one GEMM with the scale folded into W, ReLU, AvgPool;
- **backward** recomputes each tile's ``z`` (for the ReLU mask) instead of saving it and uses the
  exact BatchNorm backward in closed form. With ``g_z`` the gradient at the BN output, ``x_c = x − μ_x``,
  ``G = Σ g_z x_cᵀ`` (accumulated per tile) and ``k1 = γ/σ``:
  ``dβ = Σ g_z``, ``dγ = rowdot(W, G)/σ``,
  ``dy = k1 g_z + k2 + k3 (y − μ_y)`` with ``k2 = −k1 dβ/N``, ``k3 = −k1 dγ/(N σ)``, hence
  ``dW = k1∘G + k3∘(W Σ_x N)`` (``Σ dy = 0``) and
  ``dx = Wᵀ(k1 g_z)`` (per tile) ``+ Wᵀk2 + (Wᵀ diag(k3) W) x_c`` (after the pass).
  In eval mode ``μ, σ`` are the running statistics, ``μ_x = 0`` and ``k2 = k3 = 0``.

Running statistics are updated as ``nn.BatchNorm2d`` does (momentum or cumulative average, unbiased
variance ``var·N/(N−1)``, ``num_batches_tracked += 1``). The module is a :class:`ConvAdapter`, so its
parameters, buffers and ``state_dict`` keys are the plain module's. It falls back to the plain path
under autocast (mixed precision keeps the plain fp16 conv), for a spatial size that is not a multiple of
the pool, and with ``pool == 1`` (layer4: the output is no larger than the pooled outputs, nothing to
save). Pure PyTorch; the cost is one more GEMM of the conv's size (the recompute) plus
``C_in²·N``-sized statistics, against several memory-bound passes over ``[B, 2048, H, W]`` saved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ldc_modules import ConvAdapter

TILE_PIXELS = 4096
"""Target pixels per tile (a ``[2048, 4096]`` fp32 tile is 32 MB): large enough that the per-tile
elementwise ops and thread hand-offs stay cheap next to the GEMMs, small next to ``[B, 2048, H, W]``."""


def _tiles(batch: int, height: int, width: int, pool: int, tile_pixels: int) -> list[tuple[int, int, int, int]]:
    """Tiles ``(b0, b1, r0, r1)``: groups of whole images when one image is small, else row bands of one
    image made of whole pooling windows, each about ``tile_pixels`` pixels."""
    if height * width <= tile_pixels:
        k = max(1, tile_pixels // (height * width))
        return [(b0, min(b0 + k, batch), 0, height) for b0 in range(0, batch, k)]
    rows = max(pool, (max(1, tile_pixels // width) // pool) * pool)
    return [(b, b + 1, r0, min(r0 + rows, height)) for b in range(batch) for r0 in range(0, height, rows)]


def _tile(x: torch.Tensor, t: tuple[int, int, int, int]) -> torch.Tensor:
    """``x[b0:b1, :, r0:r1, :]`` as ``[k, C, (r1 − r0)·W]`` (a view: rows of one channel are contiguous)."""
    b0, b1, r0, r1 = t
    return x[b0:b1, :, r0:r1, :].reshape(b1 - b0, x.shape[1], -1)


class _FusedAdapterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, gamma, beta, running_mean, running_var, training: bool, momentum: float | None,
                eps: float, num_batches_tracked, pool: int, tile_pixels: int):
        B, C, H, Wd = x.shape
        O = weight.shape[0]
        w = weight.reshape(O, C)
        x = x.contiguous()
        tiles = _tiles(B, H, Wd, pool, tile_pixels)
        n = B * H * Wd
        with torch.no_grad():
            if training:
                # input moments: μ_x and the centred covariance Σ_x = E[x xᵀ] − μ μᵀ, one C×C GEMM per image
                mu_x = x.mean(dim=(0, 2, 3))  # [C]
                second = x.new_zeros(C, C)
                for b in range(B):
                    xb = x[b].view(C, -1)
                    second.addmm_(xb, xb.T)
                cov = second.div_(n).sub_(torch.outer(mu_x, mu_x))
                mean = w @ mu_x  # [O] = mean of y
                var = ((w @ cov) * w).sum(dim=1).clamp_min_(0)  # [O] = biased var of y, diag(W Σ Wᵀ)
                if running_mean is not None:
                    num_batches_tracked.add_(1)
                    factor = momentum if momentum is not None else 1.0 / float(num_batches_tracked)
                    running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                    running_var.mul_(1 - factor).add_(var * (n / max(n - 1, 1)), alpha=factor)
            else:
                cov, mean, var, mu_x = None, running_mean.clone(), running_var.clone(), None
            sigma = (var + eps).sqrt()
            k1 = gamma / sigma
            w_scaled = w * k1[:, None]  # z = W' x + shift, W' = diag(γ/σ) W
            shift = beta - k1 * mean
            out = x.new_empty(B, O, H // pool, Wd // pool)
            for t in tiles:
                b0, b1, r0, r1 = t
                z = torch.matmul(w_scaled, _tile(x, t)).add_(shift[:, None]).relu_()  # [k, O, rows·W]
                out[b0:b1, :, r0 // pool : r1 // pool] = F.avg_pool2d(z.view(b1 - b0, O, r1 - r0, Wd), pool)
        ctx.save_for_backward(x, weight, gamma, sigma, shift, cov, mu_x, mean)
        ctx.training, ctx.pool, ctx.tiles = training, pool, tiles
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, gamma, sigma, shift, cov, mu_x, mean = ctx.saved_tensors
        training, pool, tiles = ctx.training, ctx.pool, ctx.tiles
        B, C, H, Wd = x.shape
        O = weight.shape[0]
        w = weight.reshape(O, C)
        n = B * H * Wd
        k1 = gamma / sigma
        w_scaled = w * k1[:, None]
        grad_out = grad_out.contiguous() * (1.0 / (pool * pool))  # AvgPool spreads g/s² over its window
        need_x = ctx.needs_input_grad[0]
        dx = torch.empty_like(x) if need_x else None
        g_acc = x.new_zeros(O, C)  # G = Σ g_z xᵀ
        dbeta = x.new_zeros(O)
        wt_k1 = w_scaled.T.contiguous()  # Wᵀ diag(k1)
        wp = Wd // pool
        for t in tiles:
            b0, b1, r0, r1 = t
            k, rows = b1 - b0, r1 - r0
            xt = _tile(x, t)
            z = torch.matmul(w_scaled, xt).add_(shift[:, None])  # recomputed BN output, [k, O, rows·W]
            g = grad_out[b0:b1, :, r0 // pool : r1 // pool].view(k, O, rows // pool, 1, wp, 1)
            gz = torch.ops.aten.threshold_backward(g, z.view(k, O, rows // pool, pool, wp, pool), 0)
            gz = gz.view(k, O, -1)  # ReLU ∘ AvgPool backward: gradient at the BN output
            dbeta += gz.sum(dim=(0, 2))
            for i in range(k):
                g_acc.addmm_(gz[i], xt[i].T)
            if need_x:
                dx[b0:b1, :, r0:r1, :] = torch.matmul(wt_k1, gz).view(k, C, rows, Wd)
        if training:
            g_acc -= torch.outer(dbeta, mu_x)  # Σ g_z (x − μ_x)ᵀ
            dgamma = (w * g_acc).sum(dim=1) / sigma  # Σ g_z x̂
            k2 = -k1 * dbeta / n
            k3 = -k1 * dgamma / (n * sigma)
            dw = k1[:, None] * g_acc + k3[:, None] * (w @ cov) * n
            if need_x:
                m = w.T @ (k3[:, None] * w)  # [C, C] = Wᵀ diag(k3) W
                const = w.T @ k2 - m @ mu_x  # [C]
                for b in range(B):
                    dx[b].view(C, -1).addmm_(m, x[b].view(C, -1)).add_(const[:, None])
        else:
            dgamma = ((w * g_acc).sum(dim=1) - mean * dbeta) / sigma  # Σ g_z (y − running_mean)/σ
            dw = k1[:, None] * g_acc
        return (dx, dw.view_as(weight), dgamma, dbeta) + (None,) * 8


def fused_conv_bn_relu_pool(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, pool: int, *,
                            tile_pixels: int = TILE_PIXELS) -> torch.Tensor:
    """``AvgPool_pool(ReLU(bn(conv(x))))`` for a 1×1 bias-free ``conv``, computed tile by tile (see module doc)."""
    return _FusedAdapterFn.apply(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.training,
                                 bn.momentum, bn.eps, bn.num_batches_tracked, pool, tile_pixels)


class FusedConvAdapter(ConvAdapter):
    """:class:`ConvAdapter` (same parameters, buffers and state_dict) whose forward is the fused kernel."""

    def __init__(self, in_channels: int, out_channels: int, *, pool: int, tile_pixels: int = TILE_PIXELS) -> None:
        super().__init__(in_channels, out_channels, pool=pool)
        self.pool = pool
        self.tile_pixels = tile_pixels

    def can_fuse(self, x: torch.Tensor) -> bool:
        conv, bn = self[0], self[1]
        return (self.pool > 1 and x.dim() == 4 and x.shape[2] % self.pool == 0 and x.shape[3] % self.pool == 0
                and x.dtype == conv.weight.dtype and x.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled(x.device.type) and bn.affine and bn.track_running_stats
                and not (bn.training and x.shape[0] * x.shape[2] * x.shape[3] <= 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.can_fuse(x):
            return super().forward(x)
        return fused_conv_bn_relu_pool(x, self[0], self[1], self.pool, tile_pixels=self.tile_pixels)
