"""The fused LDC RN adapter equals the plain Conv1×1 → BN2d → ReLU → AvgPool module (METHODS §2.6.1)."""

import copy

import pytest
import torch

from fsl_cache.methods.ldc_adapter import ConvAdapter
from fsl_cache.methods.ldc_fused import FusedConvAdapter, _tiles


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _pair(c_in, c_out, pool, tile_pixels, momentum=0.1):
    torch.manual_seed(0)
    plain = ConvAdapter(c_in, c_out, pool=pool)
    plain[1].momentum = momentum
    with torch.no_grad():
        plain[1].weight.uniform_(0.5, 1.5)
        plain[1].bias.uniform_(-0.5, 0.5)
    fused = FusedConvAdapter(c_in, c_out, pool=pool, tile_pixels=tile_pixels)
    fused[1].momentum = momentum
    fused.load_state_dict(plain.state_dict())
    return plain.double(), fused  # float64 reference, float32 fused


@pytest.mark.parametrize("pool,side,tile_pixels", [(8, 16, 40), (4, 16, 1000), (2, 8, 64)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_equals_plain_train_and_eval(pool, side, tile_pixels, momentum):
    plain, fused = _pair(12, 48, pool, tile_pixels, momentum)
    for step in range(2):  # two train steps: running statistics accumulate
        for mode in (True, False):
            plain.train(mode)
            fused.train(mode)
            x = (torch.randn(5, 12, side, side).relu_() + 0.2 * step).requires_grad_()
            assert fused.can_fuse(x)
            xr = x.detach().double().requires_grad_()
            y, yr = fused(x), plain(xr)
            assert y.shape == yr.shape == (5, 48, side // pool, side // pool)
            assert rel(y, yr) < 1e-4
            g = torch.randn_like(yr)
            for m in (plain, fused):
                m.zero_grad()
            (y * g.float()).sum().backward()
            (yr * g).sum().backward()
            assert rel(x.grad, xr.grad) < 1e-4
            for (name, p), pr in zip(fused.named_parameters(), plain.parameters()):
                assert rel(p.grad, pr.grad) < 1e-4, name
            for (name, b), br in zip(fused.named_buffers(), plain.buffers()):
                assert rel(b, br) < 1e-4 if b.is_floating_point() else torch.equal(b, br), name


def test_fused_without_input_grad_and_fallbacks():
    plain, fused = _pair(8, 32, 2, 32)
    plain.float()
    x = torch.randn(3, 8, 8, 8)
    assert fused.can_fuse(x)
    y, yr = fused(x), plain(x)
    y.sum().backward()
    yr.sum().backward()
    for (name, p), pr in zip(fused.named_parameters(), plain.parameters()):
        assert rel(p.grad, pr.grad) < 1e-4, name
    x_cl = x.contiguous(memory_format=torch.channels_last)  # the layout the fused path works in
    assert rel(fused(x_cl), plain(x_cl)) < 1e-4
    odd = torch.randn(2, 8, 7, 7)  # not a multiple of the pool: the plain path
    assert fused.can_fuse(odd) is False and torch.equal(fused(odd), plain(odd))
    assert FusedConvAdapter(8, 16, pool=1).can_fuse(x) is False  # layer4: nothing to save
    assert FusedConvAdapter(8, 16, pool=2).can_fuse(x) is False  # C_out < 4·C_in: the statistics cost more


def test_state_dict_is_the_plain_modules():
    plain, fused = ConvAdapter(4, 8, pool=2), FusedConvAdapter(4, 8, pool=2)
    assert list(plain.state_dict()) == list(fused.state_dict())
    copy.deepcopy(fused).load_state_dict(plain.state_dict())


def test_tiles_cover_every_image_once():
    for batch, h, w, tp in [(3, 56, 56, 1024), (5, 14, 14, 1024), (2, 16, 16, 10), (7, 4, 4, 40)]:
        seen = torch.zeros(batch, dtype=torch.int64)
        for b0, b1 in _tiles(batch, h, w, tp):
            assert b1 > b0
            seen[b0:b1] += 1
        assert bool((seen == 1).all())


def test_trunk_with_fused_adapters_equals_the_plain_trunk_and_the_option_parses():
    from open_clip.modified_resnet import AttentionPool2d

    from fsl_cache.methods.ldc_modules import RNMultiLevel
    from fsl_cache.methods.registry import get_method

    torch.manual_seed(1)
    args = ([4, 4, 8, 16], [8, 4, 2, 2])  # layers 1, 2 fused (C_out ≥ 4 C_in), 3 and 4 plain
    pool = AttentionPool2d(2, 16, 2, 6)
    plain = RNMultiLevel(*args, attnpool=copy.deepcopy(pool), embed_dim=6).train()
    fused = RNMultiLevel(*args, attnpool=copy.deepcopy(pool), embed_dim=6, fused=True).train()
    fused.load_state_dict(plain.state_dict())
    assert [type(a).__name__ for a in fused.adapters] == ["FusedConvAdapter"] * 4
    maps = [torch.randn(3, c, s, s).relu_() for c, s in zip(*args)]
    assert [a.can_fuse(x) for a, x in zip(fused.adapters, maps)] == [True, True, False, False]
    out_p, out_f = plain(maps), fused(maps)
    assert rel(out_f, out_p) < 1e-4
    out_p.square().sum().backward()
    out_f.square().sum().backward()
    for (name, p), pp in zip(fused.named_parameters(), plain.parameters()):
        if pp.grad is not None:
            assert rel(p.grad, pp.grad) < 1e-4, name
    info = get_method("ldc")
    assert info.config().fused is False and info.create({"fused": "true"}).config.fused is True
