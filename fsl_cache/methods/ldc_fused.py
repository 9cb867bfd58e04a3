"""Fused exact LDC RN adapter: ``AvgPool_s(ReLU(BN2d(Conv1×1(x))))`` without the full-resolution output.

The plain :class:`~fsl_cache.methods.ldc_adapter.ConvAdapter` materialises ``y = Conv1×1(x)``
(``[B, 2048, H, W]``: 25.7 MB per image in fp32 for RN50 layer1) and keeps it, the BN output and the
ReLU mask for the backward pass, with some ten memory-bound passes over tensors of that size. Here:

- **statistics first** (training): BatchNorm's batch mean and biased variance of a linear map follow
  from the input's moments, ``mean_y = W μ_x`` and ``var_y = diag(W Σ_x Wᵀ)``, with ``Σ_x`` the
  ``C_in × C_in`` covariance of the centred input ``x_c = x − μ_x`` (one GEMM of ``C_in/C_out`` the
  conv's size; ``W Σ_x`` is kept for ``dW``);
- **then per tile** (a group of whole images): ``z = (γ/σ ∘ W) x_c + β`` as one 1×1 conv, ReLU, AvgPool,
  and the ReLU mask kept as one byte per element (layer1, batch 16: 103 MB, a quarter of one fp32 ``y``);
- **backward**: per tile ``g_z = mask ∘ upsample(g)/s²`` (the gradient at the BN output) and one
  weight-gradient GEMM ``G += Σ g_z x_cᵀ``, so the step runs the plain module's two conv-sized GEMMs
  (forward, ``dW``) plus the statistics. The exact BatchNorm backward then follows in closed form, with
  ``k1 = γ/σ``: ``dβ = Σ g_z``, ``dγ = rowdot(W, G)/σ``,
  ``dy = k1 g_z + k2 + k3 (y − μ_y)`` with ``k2 = −k1 dβ/N``, ``k3 = −k1 dγ/(N σ)``, hence
  ``dW = k1∘G + k3∘(W Σ_x N)`` (``Σ dy = 0``) and, only when the input needs a gradient (LDC's cached
  maps do not), ``dx = (k1∘W)ᵀ g_z`` (per tile) ``+ Wᵀk2 + Wᵀdiag(k3)W x_c`` (after the pass).
  In eval mode ``μ, σ`` are the running statistics, ``x`` is not centred and ``k2 = k3 = 0``.

The GEMMs are oneDNN 1×1 convolutions on channels-last tensors, like the plain module's (MKL's
``matmul`` is up to 2× slower on this AMD CPU). Running statistics are updated as ``nn.BatchNorm2d``
does (momentum or cumulative average, unbiased variance ``var·N/(N−1)``, ``num_batches_tracked += 1``).
The module is a :class:`ConvAdapter`, so its parameters, buffers and ``state_dict`` keys are the plain
module's. It falls back to the plain path where fusing does not pay, ``C_out < MIN_EXPANSION·C_in``
(RN50 layer3) or ``pool == 1`` (layer4: the output is no larger than the pooled outputs), under autocast
(mixed precision keeps the plain fp16 conv), and for a spatial size that is not a multiple of the pool.
Pure PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ldc_adapter import ConvAdapter

CL = torch.channels_last
"""Layout of every full-resolution tensor: oneDNN's native one (NCHW costs a reorder around each conv),
and the one where a pooling window's channels are contiguous."""

TILE_PIXELS = 16384
"""Target pixels per tile (whole images; RN50 layer1 at batch 16: four tiles of four images, 103 MB of
fp32 output each, against 411 MB for the batch). Few large tiles measured faster than many small ones:
each op is a thread hand-off (costly on a loaded machine) and oneDNN's weight gradient wants batch > 1."""


def _tiles(batch: int, height: int, width: int, tile_pixels: int) -> list[tuple[int, int]]:
    """Image ranges ``[b0, b1)`` of about ``tile_pixels`` pixels and equal sizes (the last may be smaller)."""
    n_tiles = -(-batch * height * width // tile_pixels)
    k = -(-batch // n_tiles)
    return [(b0, min(b0 + k, batch)) for b0 in range(0, batch, k)]


def _conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """1×1 convolution by a ``[n_out, C]`` matrix: oneDNN's conv, up to 2× faster than MKL's ``matmul`` on this
    AMD CPU (``C_in = 1024``), and with a channels-last input no layout reorder."""
    return F.conv2d(x, w[:, :, None, None], bias)


def _conv_wgrad(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``Σ_pixels g xᵀ`` (``[n_out, C]``), the weight gradient of a 1×1 conv, by oneDNN as in the plain backward.

    Called directly: ``nn.grad.conv2d_weight`` clones an expanded dummy weight on every call; the weight's
    values are not read, only its shape."""
    o, c = g.shape[1], x.shape[1]
    shape_only = x.new_empty(o, c, 1, 1)
    return torch.ops.aten.convolution_backward(
        g, x, shape_only, None, (1, 1), (0, 0), (1, 1), False, (0, 0), 1, (False, True, False)
    )[1].view(o, c)


MIN_EXPANSION = 4
"""Fuse only where ``C_out ≥ MIN_EXPANSION · C_in``: the statistics GEMMs cost ``C_in/C_out + C_in/N`` of
the conv's GEMM on top of the plain module's two, and buy back only the memory-bound passes over the
output. Measured on RN50 (batch 16, 2 loaded cores, fused vs plain speed): layer1 (1/8) 1.5×, layer2
(1/4) 1.15–1.2×, layer3 (1/2, whose output is small anyway) 0.6–0.7×."""


class _FusedAdapterFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        gamma,
        beta,
        running_mean,
        running_var,
        training: bool,
        momentum: float | None,
        eps: float,
        num_batches_tracked,
        pool: int,
        tile_pixels: int,
    ):
        B, C, H, Wd = x.shape
        n_out = weight.shape[0]
        w = weight.reshape(n_out, C)
        n = B * H * Wd
        with torch.no_grad():
            if training:
                mu_x = x.mean(dim=(0, 2, 3))
                # centred (no E[xxᵀ] − μμᵀ cancellation, and BN's −mean is in it) and channels last
                xc = torch.sub(x, mu_x[:, None, None], out=torch.empty_like(x, memory_format=CL))
                w_cov = w @ _conv_wgrad(xc, xc).div_(n)  # W Σ_x, kept for dW
                mean = w @ mu_x  # [n_out] = mean of y
                var = (w_cov * w).sum(dim=1).clamp_min_(0)  # [n_out] = biased var of y, diag(W Σ Wᵀ)
                if running_mean is not None:
                    num_batches_tracked.add_(1)
                    factor = momentum if momentum is not None else 1.0 / float(num_batches_tracked)
                    running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                    running_var.mul_(1 - factor).add_(var * (n / max(n - 1, 1)), alpha=factor)
            else:
                xc, w_cov = x.contiguous(memory_format=CL), None
                mean, var = running_mean.clone(), running_var.clone()
            sigma = (var + eps).sqrt()
            k1 = gamma / sigma
            shift = beta if training else beta - k1 * mean
            w_scaled = w * k1[:, None]  # z = diag(γ/σ) W x_c + shift
            tiles = _tiles(B, H, Wd, tile_pixels)
            mask = torch.empty(B, n_out, H, Wd, dtype=torch.bool, device=x.device, memory_format=CL)
            out = x.new_empty(B, n_out, H // pool, Wd // pool)
            for b0, b1 in tiles:
                z = _conv(xc[b0:b1], w_scaled, shift).relu_()
                mask[b0:b1].copy_(z)  # after the ReLU, z ≠ 0 ⇔ z > 0; a bool copy is a fast cast
                out[b0:b1] = F.avg_pool2d(z, pool)
        ctx.save_for_backward(xc, mask, weight, gamma, sigma, w_cov, mean)
        ctx.training, ctx.pool, ctx.tiles = training, pool, tiles
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, mask, weight, gamma, sigma, w_cov, mean = ctx.saved_tensors
        training, pool, tiles = ctx.training, ctx.pool, ctx.tiles
        B, C, H, Wd = xc.shape
        n_out = weight.shape[0]
        w = weight.reshape(n_out, C)
        n = B * H * Wd
        k1 = gamma / sigma
        hp, wp = H // pool, Wd // pool
        # channels last like the mask; AvgPool spreads g/s² over its window
        g = (grad_out * (1.0 / (pool * pool))).permute(0, 2, 3, 1).contiguous()
        need_x = ctx.needs_input_grad[0]
        dx = torch.empty_like(xc) if need_x else None
        g_acc = xc.new_zeros(n_out, C)  # G = Σ g_z x_cᵀ
        dbeta = xc.new_zeros(n_out)
        gz_buf = xc.new_empty(
            max(b1 - b0 for b0, b1 in tiles), hp, pool, wp, pool, n_out
        )  # reused by every tile
        for b0, b1 in tiles:
            k = b1 - b0
            # ReLU ∘ AvgPool backward: the pooled gradient broadcast over each window, masked. Cast the mask
            # (read as uint8, the faster cast) into the buffer, then multiply in place: 4× faster than
            # float × mask, which casts into a fresh full-size temporary.
            m = mask[b0:b1].permute(0, 2, 3, 1).view(k, hp, pool, wp, pool, n_out).view(torch.uint8)
            gz = gz_buf[:k].copy_(m).mul_(g[b0:b1].view(k, hp, 1, wp, 1, n_out))
            gz = gz.view(k, H, Wd, n_out).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
            dbeta += gz.sum(dim=(0, 2, 3))
            g_acc += _conv_wgrad(xc[b0:b1], gz)
            if need_x:
                dx[b0:b1] = _conv(gz, (w * k1[:, None]).T)
        if training:
            dgamma = (w * g_acc).sum(dim=1) / sigma  # Σ g_z x̂
            k2 = -k1 * dbeta / n
            k3 = -k1 * dgamma / (n * sigma)
            dw = k1[:, None] * g_acc + k3[:, None] * w_cov * n
            if need_x:
                dx += _conv(xc, w.T @ (k3[:, None] * w), w.T @ k2)  # Wᵀdiag(k3)W x_c + Wᵀk2
        else:
            dgamma = ((w * g_acc).sum(dim=1) - mean * dbeta) / sigma  # Σ g_z (y − running_mean)/σ
            dw = k1[:, None] * g_acc
        return (dx, dw.view_as(weight), dgamma, dbeta) + (None,) * 8


def fused_conv_bn_relu_pool(
    x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, pool: int, *, tile_pixels: int = TILE_PIXELS
) -> torch.Tensor:
    """``AvgPool_pool(ReLU(bn(conv(x))))`` for a 1×1 bias-free ``conv``, computed tile by tile (see module doc)."""
    return _FusedAdapterFn.apply(
        x,
        conv.weight,
        bn.weight,
        bn.bias,
        bn.running_mean,
        bn.running_var,
        bn.training,
        bn.momentum,
        bn.eps,
        bn.num_batches_tracked,
        pool,
        tile_pixels,
    )


class FusedConvAdapter(ConvAdapter):
    """:class:`ConvAdapter` (same parameters, buffers and state_dict) whose forward is the fused kernel."""

    def __init__(
        self, in_channels: int, out_channels: int, *, pool: int, tile_pixels: int = TILE_PIXELS
    ) -> None:
        super().__init__(in_channels, out_channels, pool=pool)
        self.pool = pool
        self.tile_pixels = tile_pixels

    def can_fuse(self, x: torch.Tensor) -> bool:
        conv, bn = self[0], self[1]
        return (
            self.pool > 1
            and conv.out_channels >= MIN_EXPANSION * conv.in_channels
            and x.dim() == 4
            and x.shape[2] % self.pool == 0
            and x.shape[3] % self.pool == 0
            and x.dtype == conv.weight.dtype
            and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(x.device.type)
            and bn.affine
            and bn.track_running_stats
            and not (bn.training and x.shape[0] * x.shape[2] * x.shape[3] <= 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.can_fuse(x):
            return super().forward(x)
        return fused_conv_bn_relu_pool(x, self[0], self[1], self.pool, tile_pixels=self.tile_pixels)
