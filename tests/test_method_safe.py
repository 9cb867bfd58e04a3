"""SAFE and SAFE-A: the pooling tails are exact, the grid trains in one pass, the methods fit end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from open_clip.modified_resnet import AttentionPool2d

from fsl_cache import api
from fsl_cache.backbones import load_backbone
from fsl_cache.cli import main
from fsl_cache.console import training_progress
from fsl_cache.datasets import make_demo_dataset
from fsl_cache.methods import get_method
from fsl_cache.methods.pooling import PoolingTail, _rn_tail
from fsl_cache.methods.safe import GridData, SafeConfig, SafeHead, StackedAdamW, train_grid
from fsl_cache.methods.tip_adapter import build_keys
from fsl_cache.runs.record import load_head_tensors
from fsl_cache.store import FeatureStore
from fsl_cache.sweeps.local import order_for_reuse
from fsl_cache.sweeps.spec import Trial
from fsl_cache.sweeps.trial import StoreCache, SweepContext
from fsl_cache.training import MemoryViews

ARCHS = ["fsl-tiny-rn", "fsl-tiny-vit"]
FAST = {"iterations": "6", "eval_every": "3", "lrs": "1e-3,1e-4", "wds": "0,0.01"}
FAST_A = {**FAST, "tip_epochs": "2"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """fp32 stores of the demo images through both tiny backbones, with what SAFE and SAFE-A read."""
    root = tmp_path_factory.mktemp("safe")
    data = make_demo_dataset(root / "demo")
    paths = {
        arch: api.extract(
            f"imagefolder:{data}",
            model=arch,
            pretrained="none",
            for_methods=["safe", "safe_a"],
            shots=(1, 2),
            seeds=(1,),
            precision="fp32",
            workers=0,
            progress=False,
            cache_dir=root / "cache",
        ).store
        for arch in ARCHS
    }
    return SimpleNamespace(data=data, cache=root / "cache", paths=paths)


def fit(stores, method, arch, tmp_path, force=False, **options):
    (run,) = api.fit(
        method,
        force=force,
        dataset=f"imagefolder:{stores.data}",
        model=arch,
        pretrained="none",
        shots=2,
        seeds=[1],
        options=options,
        cache_dir=stores.cache,
        runs_dir=tmp_path,
        progress=False,
    )
    return run, json.loads((run.run_dir / "record.json").read_text())


def read(store_dir, name, rows=None):
    store = FeatureStore.open(store_dir)
    try:
        return torch.from_numpy(store.read(name, rows)).float()
    finally:
        store.close()


# ---------------------------------------------------------------------------- exact pooling


def test_query0_equals_the_full_attention_pool():
    torch.manual_seed(0)
    pool = AttentionPool2d(7, 64, 4, 32).eval()  # 50 tokens, like RN50's 7x7 grid
    x = torch.randn(5, 64, 7, 7)
    tail = _rn_tail(SimpleNamespace(attnpool=pool)).stacked(2)
    with torch.no_grad():
        full = pool(x)  # every query, token 0 returned
    out = tail(x)
    assert out.shape == (2, 5, 32)
    torch.testing.assert_close(out[0], full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], full, rtol=1e-5, atol=1e-5)


def test_implicit_key_value_projections_give_the_attention_pool_gradients():
    """Keys and values are never formed token by token; the gradients still equal open_clip's module's."""
    torch.manual_seed(1)
    pool = AttentionPool2d(7, 64, 4, 32)
    x, target = torch.randn(5, 64, 7, 7), torch.randn(5, 32)
    (pool(x) * target).sum().backward()
    tail = _rn_tail(SimpleNamespace(attnpool=pool)).requires_grad_(True)
    (tail(x)[0] * target).sum().backward()
    reference = {
        "pos": pool.positional_embedding,
        "wq": pool.q_proj.weight,
        "bq": pool.q_proj.bias,
        "wk": pool.k_proj.weight,
        "wv": pool.v_proj.weight,
        "bv": pool.v_proj.bias,
        "wc": pool.c_proj.weight,
        "bc": pool.c_proj.bias,
    }
    for name, param in reference.items():
        torch.testing.assert_close(tail.params[name].grad[0], param.grad, rtol=1e-4, atol=1e-5, msg=name)
    # softmax ignores the key bias: open_clip's gradient is rounding noise, ours is exactly absent
    assert pool.k_proj.bias.grad.abs().max() < 1e-5 and tail.params["bk"].grad is None


def test_cls_only_equals_the_full_last_vit_block():
    backbone = load_backbone("fsl-tiny-vit", "none")
    visual = backbone.model.visual
    x = torch.randn(3, 65, 128)
    with torch.no_grad():
        full = visual.transformer.resblocks[-1](x)  # every token through the block
        expected = visual.ln_post(full[:, 0]) @ visual.proj
    torch.testing.assert_close(PoolingTail.from_backbone(backbone)(x)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_tail_on_cached_dense_maps_equals_the_cached_pooled_embedding(arch, stores):
    path = stores.paths[arch]
    tap = load_backbone(arch, "none").dense_tap
    dense = read(path, f"images/test/views/center/{tap}")[:, 0]
    pooled = read(path, "images/test/views/center/pooled")[:, 0]
    tail = PoolingTail.from_backbone(load_backbone(arch, "none"))
    torch.testing.assert_close(tail(dense)[0], pooled, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- at initialisation


@pytest.mark.parametrize("arch", ARCHS)
def test_untrained_safe_blends_one_plus_beta_times_pooled_and_predicts_like_zero_shot(arch, stores, tmp_path):
    path = stores.paths[arch]
    backbone = load_backbone(arch, "none")
    frozen = PoolingTail.from_backbone(backbone)
    head = SafeHead(
        frozen, frozen.stacked(1), read(path, "text/tip"), tap=backbone.dense_tap, beta=0.3, tau=100.0
    )
    x = {backbone.dense_tap: read(path, f"images/test/views/center/{backbone.dense_tap}")[:, 0]}
    torch.testing.assert_close(
        head.embed(x), 1.3 * read(path, "images/test/views/center/pooled")[:, 0], rtol=1e-4, atol=1e-4
    )
    zs, zs_record = fit(stores, "zero_shot", arch, tmp_path)
    safe, safe_record = fit(stores, "safe", arch, tmp_path, iterations=0)
    assert safe.test_acc == zs.test_acc
    assert (
        safe_record["metrics"]["test"]["main"]["confusion"]
        == zs_record["metrics"]["test"]["main"]["confusion"]
    )


def test_untrained_safe_a_keys_are_tip_adapter_keys(stores, tmp_path):
    path = stores.paths["fsl-tiny-rn"]
    run, record = fit(stores, "safe_a", "fsl-tiny-rn", tmp_path, iterations=0, tip_epochs=0, search=False)
    rows = np.array(record["splits"]["train"]["split_index"])
    store = FeatureStore.open(path)
    pool_rows = np.searchsorted(store.read("images/train_pool/split_index"), rows)
    store.close()
    tip_views = read(path, "images/train_pool/views/tip/pooled", pool_rows)[:, 1:11]
    keys = load_head_tensors(run.run_dir)["tip.adapter.weight"]
    torch.testing.assert_close(keys, build_keys(tip_views), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- the grid trainer


def test_stacked_adamw_is_torch_adamw_per_member():
    torch.manual_seed(0)
    lrs, wds = [1e-2, 1e-3, 0.0], [0.0, 0.1, 0.01]
    start = torch.randn(3, 4, 5)
    stacked = start.clone().requires_grad_(True)
    alone = [start[g].clone().requires_grad_(True) for g in range(3)]
    ours = StackedAdamW([stacked], weight_decays=wds, eps=1e-8)
    theirs = [torch.optim.AdamW([p], lr=lr, weight_decay=wd) for p, lr, wd in zip(alone, lrs, wds)]
    for step in range(5):
        grad = torch.randn(3, 4, 5)
        stacked.grad = grad.clone()
        factor = 1.0 / (step + 1)  # a changing schedule
        ours.step([lr * factor for lr in lrs])
        for g, (p, opt) in enumerate(zip(alone, theirs)):
            p.grad = grad[g].clone()
            opt.param_groups[0]["lr"] = lrs[g] * factor
            opt.step()
    for g in range(3):
        torch.testing.assert_close(stacked[g].detach(), alone[g].detach(), rtol=1e-6, atol=1e-7)


def separable_maps(
    n_per_class: int, *, classes: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, 2, 32, 3, 3]`` maps (view 1 is the mirror of view 0) whose class adds a fixed pattern."""
    patterns = 3.0 * torch.randn(classes, 32, 3, 3, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    maps = torch.randn(len(labels), 32, 3, 3, generator=generator) + patterns[labels]
    return torch.stack([maps, maps.flip(-1)], dim=1), labels


def grid_data(generator: torch.Generator, *, classes: int = 4) -> tuple[PoolingTail, GridData, tuple]:
    torch.manual_seed(1)
    pool = AttentionPool2d(3, 32, 2, 16).eval()
    frozen = _rn_tail(SimpleNamespace(attnpool=pool))
    train, y = separable_maps(4, classes=classes, generator=generator)
    val, yv = separable_maps(4, classes=classes, generator=generator)
    test, yt = separable_maps(20, classes=classes, generator=generator)
    text = F.normalize(torch.randn(classes, 16, generator=generator), dim=-1)
    data = GridData(
        MemoryViews({"rn/layer4": train}), y, MemoryViews({"rn/layer4": val[:, :1]}), yv, text, "rn/layer4"
    )
    return frozen, data, (test[:, 0], yt)


def test_the_grid_in_one_pass_equals_each_grid_point_trained_alone():
    frozen, data, _ = grid_data(torch.Generator().manual_seed(0))
    config = SafeConfig(iterations=24, eval_every=4, warmup=5, lrs=(1e-2, 1e-3, 1e-4), wds=(0.0, 0.5))
    points = config.grid()
    together = train_grid(frozen, data, config, points, generator=torch.Generator().manual_seed(7))
    assert len(set(together.best_iters)) > 1 or len(set(together.scores)) > 1  # the points really differ
    for g, point in enumerate(points):
        alone = train_grid(frozen, data, config, [point], generator=torch.Generator().manual_seed(7))
        assert alone.scores == [together.scores[g]] and alone.best_iters == [together.best_iters[g]]
        for name, p in alone.tuned.params.items():
            torch.testing.assert_close(p[0], together.tuned.params[name][g], rtol=1e-5, atol=1e-6)


def test_training_beats_zero_shot_on_a_separable_synthetic_task():
    frozen, data, (test, labels) = grid_data(torch.Generator().manual_seed(3))
    config = SafeConfig(iterations=80, eval_every=20, warmup=0, lrs=(1e-2, 3e-3), wds=(0.0,), beta=0.5)
    result = train_grid(frozen, data, config, config.grid(), generator=torch.Generator().manual_seed(0))
    tuned = result.tuned.member(result.winner)
    head = SafeHead(frozen, tuned, data.text, tap="rn/layer4", beta=0.5, tau=100.0)
    zero_shot = SafeHead(frozen, frozen.stacked(1), data.text, tap="rn/layer4", beta=0.5, tau=100.0)
    with torch.no_grad():
        acc = [
            100.0 * float((h({"rn/layer4": test}).argmax(1) == labels).float().mean())
            for h in (head, zero_shot)
        ]
    assert acc[0] >= acc[1] + 25, f"SAFE {acc[0]:.1f} vs zero-shot {acc[1]:.1f}"


def test_grid_chunks_give_the_same_fit(stores, tmp_path):
    whole, a = fit(stores, "safe", "fsl-tiny-rn", tmp_path / "a", **FAST, grid_chunk=4)
    chunked, b = fit(stores, "safe", "fsl-tiny-rn", tmp_path / "b", **FAST, grid_chunk=1)
    assert a["selection"]["grid"] == b["selection"]["grid"] and whole.test_acc == chunked.test_acc


# ---------------------------------------------------------------------------- the methods end to end


@pytest.mark.parametrize("arch", ARCHS)
def test_safe_and_safe_a_fit_and_record_their_choices(arch, stores, tmp_path):
    run, record = fit(stores, "safe", arch, tmp_path, **FAST)
    selection = record["selection"]
    assert len(selection["grid"]) == 4 and (selection["lr"], selection["wd"]) in {
        (1e-3, 0.0),
        (1e-3, 0.01),
        (1e-4, 0.0),
        (1e-4, 0.01),
    }
    assert record["head"]["inputs"] == [load_backbone(arch, "none").dense_tap]
    assert not any(k.startswith("frozen.") for k in record["head"]["tensors"])
    assert any("[PROPOSED] tau = 100" in d for d in record["deviations"])
    stored, lazy = (
        fit(stores, "safe_a", arch, tmp_path / str(p), **FAST_A, precompute=p) for p in (True, False)
    )
    assert (
        stored[0].test_acc == lazy[0].test_acc
        and stored[1]["selection"]["tip"] == lazy[1]["selection"]["tip"]
    )
    assert {"alpha", "beta", "search_on"} <= set(stored[1]["selection"]["tip"])
    assert stored[1]["selection"]["safe"] == selection  # stage 1 is SAFE itself


def test_options_parse_and_validate():
    cfg = get_method("safe").create({"lrs": "1e-4,1e-5", "wds": "0", "beta": "0.8", "tau": "54.6"}).config
    assert cfg.grid() == [(1e-4, 0.0), (1e-5, 0.0)] and cfg.beta == 0.8 and cfg.tau == 54.6
    defaults = SafeConfig()
    assert (defaults.iterations, defaults.batch_size, defaults.eval_every, len(defaults.grid())) == (
        12800,
        8,
        100,
        12,
    )
    with pytest.raises(Exception, match="tau must be > 0"):
        get_method("safe").create({"tau": "0"})
    tip = get_method("safe_a").create({}).resolve(SimpleNamespace(dataset="eurosat")).tip_config()
    assert tip.epochs == 100 and tip.search_scale == (12, 10) and tip.batch_size == 256


def test_cli_fits_safe(stores, tmp_path):
    args = [
        "fit",
        "safe",
        "--dataset",
        f"imagefolder:{stores.data}",
        "--model",
        "fsl-tiny-vit",
        "--pretrained",
        "none",
        "--shots",
        "1",
        "--seed",
        "1",
        "--cache-dir",
        str(stores.cache),
        "--runs-dir",
        str(tmp_path),
        "--json",
    ]
    for key, value in FAST.items():
        args += ["-o", f"{key}={value}"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[-1])["method"] == "safe"


def test_the_grid_announces_its_steps_and_estimate_and_logs_progress_off_a_terminal(capsys):
    frozen, data, _ = grid_data(torch.Generator().manual_seed(0))
    config = SafeConfig(iterations=12, eval_every=4, warmup=2, lrs=(1e-2, 1e-3), wds=(0.0,))
    with training_progress(True):
        train_grid(frozen, data, config, config.grid(), generator=torch.Generator().manual_seed(7))
    err = capsys.readouterr().err
    assert "safe: 2 grid points x 12 steps" in err and "estimate" in err and "ms per step, timed" in err
    assert "12/12 step (100%)" in err and "step/s" in err and "ETA" in err  # plain lines: not a terminal
    train_grid(frozen, data, config, config.grid(), generator=torch.Generator().manual_seed(7))
    assert capsys.readouterr().err == ""  # library calls stay quiet unless asked


def test_safe_a_starts_from_a_finished_safe_run_with_its_stage_1_settings(stores, tmp_path):
    """Reusing the safe run gives SAFE-A bit for bit what training stage 1 again gives; other settings,
    a forced fit, or a run made elsewhere (another device), do not reuse it."""
    fixed = {**FAST, "lrs": "1e-3", "wds": "0.01"}  # one grid point: no timed choice of chunking
    safe, safe_record = fit(stores, "safe", "fsl-tiny-rn", tmp_path / "shared", **fixed)
    reused, record = fit(stores, "safe_a", "fsl-tiny-rn", tmp_path / "shared", **fixed, tip_epochs="2")
    alone, alone_record = fit(stores, "safe_a", "fsl-tiny-rn", tmp_path / "alone", **fixed, tip_epochs="2")
    assert record["selection"]["safe_run"] == {
        "run_dir": str(safe.run_dir),
        "run_fingerprint": safe.run_fingerprint,
    }
    assert "safe_run" not in alone_record["selection"]
    assert record["selection"]["safe"] == alone_record["selection"]["safe"] == safe_record["selection"]
    assert record["selection"]["tip"] == alone_record["selection"]["tip"]
    assert record["history"] == alone_record["history"] and reused.test_acc == alone.test_acc
    a, b = load_head_tensors(reused.run_dir), load_head_tensors(alone.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other, other_record = fit(stores, "safe_a", "fsl-tiny-rn", tmp_path / "shared", **fixed, beta="0.3")
    assert "safe_run" not in other_record["selection"]
    _, forced = fit(stores, "safe_a", "fsl-tiny-rn", tmp_path / "shared", force=True, **fixed, tip_epochs="2")
    assert "safe_run" not in forced["selection"]  # a forced fit trains every part again
    elsewhere = json.loads((safe.run_dir / "record.json").read_text()) | {"device": "cuda:0"}
    (safe.run_dir / "record.json").write_text(json.dumps(elsewhere))
    _, again = fit(stores, "safe_a", "fsl-tiny-rn", tmp_path / "shared", **fixed, tip_epochs="3")
    assert "safe_run" not in again["selection"]


def test_grid_runs_a_safe_run_before_the_safe_a_runs_it_serves(stores, tmp_path):
    """Whatever order it is given, ``grid`` puts a pending safe run ahead of the safe_a runs with its
    stage-1 settings and makes them wait for it (not those with other settings); they then reuse it."""
    fixed = {**FAST, "lrs": "1e-3", "wds": "0.01"}
    dataset = f"imagefolder:{stores.data}"
    trial = lambda method, **o: Trial(method, dataset, 2, 1, tuple(sorted({**fixed, **o}.items())))  # noqa: E731
    safe, serves, other = trial("safe"), trial("safe_a", tip_epochs="2"), trial("safe_a", beta="0.3")
    context = SweepContext(stores.cache, tmp_path, model="fsl-tiny-rn", pretrained="none")
    cache = StoreCache(context)
    try:
        groups, after = order_for_reuse([[serves], [other], [safe]], cache)
    finally:
        cache.close()
    assert groups == [[other], [safe], [serves]] and after == [set(), set(), {1}]

    result = api.grid(
        ["safe_a", "safe"],
        datasets=[dataset],
        shots=[2],
        seeds=[1],
        options={k: [v] for k, v in fixed.items()} | {"safe_a.tip_epochs": ["2"]},
        model="fsl-tiny-rn",
        pretrained="none",
        extract=False,
        cache_dir=stores.cache,
        runs_dir=tmp_path,
    )
    runs = {o.trial.method: o.run_dir for o in result.outcomes}
    record = json.loads((runs["safe_a"] / "record.json").read_text())
    assert record["selection"]["safe_run"]["run_dir"] == str(runs["safe"])
