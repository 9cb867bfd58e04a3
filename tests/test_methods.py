"""The method contract and the baselines: formulas on hand-made tensors, options, the registry,
and one parametrized contract test over every registered method on a synthetic store."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsl_cache import api
from fsl_cache.datasets import make_demo_dataset
from fsl_cache.errors import UsageError
from fsl_cache.methods import ConfigError, Method, MethodConfig, get_method, list_methods
from fsl_cache.methods.linear_probe import fit_logreg, head_from_sklearn, search_c
from fsl_cache.methods.needs import Needs
from fsl_cache.methods.tip_adapter import (
    TIP_DEFAULT,
    TIP_TABLE,
    TipAdapterConfig,
    TipHead,
    build_keys,
    build_values,
    search_alpha_beta,
    search_grid,
    tip_logits,
)
from fsl_cache.methods.zero_shot import ZeroShotHead
from fsl_cache.runs import fitting
from fsl_cache.runs.record import load_head_tensors
from fsl_cache.store import FeatureStore
from fsl_cache.testing import make_synthetic_store, zero_shot_chance

SYNTH = dict(dataset="synthetic", model="synthetic", pretrained="none")
FAST = {"epochs": "3"}
"""Options that keep a trained method's contract run short (applied where the method has them)."""


def fast_options(name: str) -> dict:
    fields = {o.name for o in get_method(name).options()}
    return {k: v for k, v in FAST.items() if k in fields}


def runs_on_synthetic(name: str) -> bool:
    """Methods whose inputs a synthetic store can provide (pooled embeddings, no live backbone)."""
    info = get_method(name)
    needs = info.needs()
    taps = set(needs.eval_taps) | {t for v in needs.train_views for t in v.taps}
    online = info.cls.needs_backbone or "task.backbone()" in inspect.getsource(info.cls)
    return taps <= {"pooled"} and not online


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A real store: the demo images through the random-weight fsl-tiny-rn, for every registered method."""
    root = tmp_path_factory.mktemp("tiny")
    data = make_demo_dataset(root / "demo")
    api.extract(
        f"imagefolder:{data}",
        model="fsl-tiny-rn",
        pretrained="none",
        for_methods=list_methods(),
        cache_dir=root / "cache",
        shots=(2,),
        seeds=(1,),
        workers=0,
        progress=False,
    )
    return data, root / "cache"


def fit_on_tiny(name: str, data, cache, runs, **extra):
    """``name`` fitted at 2 shots, seed 1, with its quick options, on the tiny store of ``data`` in ``cache``."""
    return api.fit(
        name,
        dataset=f"imagefolder:{data}",
        model="fsl-tiny-rn",
        pretrained="none",
        shots=2,
        seeds=[1],
        options=fast_options(name),
        cache_dir=cache,
        runs_dir=runs,
        progress=False,
        **extra,
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    make_synthetic_store(root, num_classes=4, views={"tip": 21, "coop": 51, "flip": 2, "ldc": 10})
    return root


# ---------------------------------------------------------------------------- formulas


def test_zero_shot_head_is_100_cosine_with_text_weights():
    f = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    w = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]), dim=-1)
    expected = torch.tensor([[100 * 0.6, 100 * 0.8 / math.sqrt(2)], [0.0, 100 / math.sqrt(2)]])
    torch.testing.assert_close(ZeroShotHead(w, scale=100.0)({"pooled": f}), expected)


def test_tip_keys_average_raw_views_then_normalise():
    views = torch.tensor([[[1.0, 0.0], [0.0, 10.0]]])  # one image, two views of different norms
    keys = build_keys(views)
    torch.testing.assert_close(keys, F.normalize(torch.tensor([[0.5, 5.0]]), dim=-1))
    assert not torch.allclose(keys, F.normalize(F.normalize(views, dim=-1).mean(1), dim=-1))


def test_tip_logits_equal_the_formula_by_hand():
    f_hat = F.normalize(torch.tensor([[3.0, 4.0]]), dim=-1)  # [0.6, 0.8]
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    values = build_values(torch.tensor([0, 1, 1]), 2)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    alpha, beta = 2.0, 5.0
    a = [0.6, 0.8, 1.0]  # affinity f̂·k_j
    cache = [math.exp(-beta * (1 - a[0])), math.exp(-beta * (1 - a[1])) + math.exp(-beta * (1 - a[2]))]
    expected = torch.tensor([[100 * 0.6 + alpha * cache[0], 100 * 0.8 + alpha * cache[1]]])
    got = tip_logits(f_hat, keys, values, text, alpha=alpha, beta=beta)
    torch.testing.assert_close(got, expected)
    head = TipHead(keys, values, text, alpha=alpha, beta=beta, scale=100.0)
    torch.testing.assert_close(head({"pooled": torch.tensor([[3.0, 4.0]])}), expected)


def test_search_grids_follow_tip_search_hp():
    betas = search_grid(12, 200)
    assert (
        len(betas) == 200 and betas[0] == pytest.approx(0.1) and betas[1] == pytest.approx(0.1 + 11.9 / 200)
    )
    assert betas[-1] == pytest.approx(0.1 + 199 * 11.9 / 200) and betas[-1] < 12


def _official_search(affinity, clip, values, labels, betas, alphas):
    """Tip-Adapter utils.py::search_hp, transcribed loop for loop."""
    best_acc, best_beta, best_alpha = 0, 0, 0
    for beta in betas:
        for alpha in alphas:
            cache = ((-1) * (beta - beta * affinity)).exp() @ values
            acc = 100 * float((clip + cache * alpha).argmax(1).eq(labels).sum()) / len(labels)
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_beta, best_alpha, best_acc


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_beta_search_matches_the_official_loop(seed):
    g = torch.Generator().manual_seed(seed)
    n, k, c = 40, 12, 4
    affinity = torch.rand(n, k, generator=g)
    values = build_values(torch.arange(k) % c, c)
    clip = 3 * torch.randn(n, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    betas, alphas = search_grid(7, 30), search_grid(3, 8)
    assert search_alpha_beta(affinity, clip, values, labels, betas=betas, alphas=alphas) == pytest.approx(
        _official_search(affinity, clip, values, labels, betas, alphas)
    )


def test_alpha_beta_search_keeps_the_first_strict_maximum():
    # Two samples: the zero-shot branch gets sample 0 right; the cache decides sample 1 once alpha
    # is large enough. Every (beta, alpha) with alpha >= 1 ties at 100 %: the first one wins.
    clip = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    affinity = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    values = build_values(torch.tensor([0, 1]), 2)
    labels = torch.tensor([0, 1])
    beta, alpha, acc = search_alpha_beta(
        affinity, clip, values, labels, betas=[1.0, 2.0], alphas=[0.25, 1.0, 2.0]
    )
    assert (beta, alpha, acc) == (1.0, 1.0, 100.0)
    # nothing beats 0 % → the official defaults (0, 0)
    assert search_alpha_beta(affinity, clip, values, torch.tensor([1, 1]), betas=[1.0], alphas=[0.0]) == (
        0.0,
        0.0,
        0.0,
    )


def test_tip_per_dataset_table_and_default():
    assert TIP_TABLE["eurosat"].search_scale == (12, 10) and TIP_TABLE["eurosat"].epochs == 100
    assert TIP_TABLE["imagenet"].init_alpha == 1.17 and TIP_TABLE["fgvc_aircraft"].search_scale == (30, 30)
    assert all(row.epochs == 20 for name, row in TIP_TABLE.items() if name != "eurosat")
    resolved = TipAdapterConfig().resolved("imagefolder:/x")
    assert (resolved.search_scale, resolved.init_beta, resolved.init_alpha) == (
        TIP_DEFAULT.search_scale,
        1.0,
        2.0,
    )
    assert TipAdapterConfig(init_alpha=7.0).resolved("dtd").init_alpha == 7.0  # an explicit option wins
    tip_f = get_method("tip_adapter_f").config().resolved("eurosat")
    assert (
        tip_f.epochs == 100 and tip_f.batch_size == 256 and tip_f.eps == 1e-4 and tip_f.weight_decay == 0.01
    )


def _official_lpclip(x, y, xv, yv, steps):
    """CoOp lpclip/linear_probe.py, transcribed: grid, then the binary search; the last model counts."""
    search_list = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
    accs = [np.mean(fit_logreg(x, y, c=c, max_iter=1000).predict(xv) == yv) for c in search_list]
    peak = search_list[int(np.argmax(accs))]
    left, right = 0.1 * peak, 10 * peak
    for _ in range(steps):
        cl, cr = fit_logreg(x, y, c=left, max_iter=1000), fit_logreg(x, y, c=right, max_iter=1000)
        al, ar = np.mean(cl.predict(xv) == yv), np.mean(cr.predict(xv) == yv)
        if al < ar:
            final, c_final = cr, right
            left, right = 0.5 * (np.log10(right) + np.log10(left)), np.log10(right)
        else:
            final, c_final = cl, left
            right, left = 0.5 * (np.log10(right) + np.log10(left)), np.log10(left)
        left, right = np.power(10, left), np.power(10, right)
    return final, c_final


def test_linear_probe_search_matches_lpclip():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 6)) + np.repeat(np.eye(3, 6) * 1.5, 8, axis=0)
    y = np.repeat(np.arange(3), 8)
    xv = rng.normal(size=(12, 6)) + np.repeat(np.eye(3, 6) * 1.5, 4, axis=0)
    yv = np.repeat(np.arange(3), 4)
    clf, selection = search_c(
        (x, y), (xv, yv), grid=(1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6), steps=3, max_iter=1000
    )
    ref, c_ref = _official_lpclip(x, y, xv, yv, steps=3)
    assert selection["c"] == pytest.approx(c_ref)
    np.testing.assert_allclose(clf.coef_, ref.coef_)
    head = head_from_sklearn(clf, num_classes=3, dim=6)
    logits = head({"pooled": torch.from_numpy(xv).float()})
    np.testing.assert_array_equal(logits.argmax(1).numpy(), clf.predict(xv))


def test_linear_probe_head_handles_two_classes_and_unseen_classes():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(-2, 1, (10, 4)), rng.normal(2, 1, (10, 4))])
    y = np.array([0] * 10 + [2] * 10)  # class 1 never seen
    clf = fit_logreg(x, y, c=1.0, max_iter=1000)
    head = head_from_sklearn(clf, num_classes=3, dim=4)
    pred = head({"pooled": torch.from_numpy(x).float()}).argmax(1).numpy()
    np.testing.assert_array_equal(pred, clf.predict(x))
    assert 1 not in pred


# ---------------------------------------------------------------------------- options and registry


def test_registry_lists_the_baselines_and_suggests_on_typos():
    assert {"zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f"} <= set(list_methods())
    assert list_methods("tip_*") == [n for n in list_methods() if n.startswith("tip_")]
    with pytest.raises(UsageError, match="Did you mean tip_adapter"):
        get_method("tip-adaptor")


def test_options_parse_typed_values_and_reject_unknown_keys():
    info = get_method("tip_adapter_f")
    cfg = info.create(
        {"lr": "5e-4", "epochs": "7", "search_scale": "3,4", "amp": "true", "optimizer": "sgd"}
    ).config
    assert (cfg.lr, cfg.epochs, cfg.search_scale, cfg.amp, cfg.optimizer) == (
        5e-4,
        7,
        (3.0, 4.0),
        True,
        "sgd",
    )
    assert info.create({"epochs": 5}).config.epochs == 5  # typed API values pass through
    with pytest.raises(UsageError, match="Did you mean lr"):
        info.create({"lrr": "1"})
    with pytest.raises(UsageError, match="Did you mean adamw"):
        info.create({"optimizer": "adamww"})  # (adamx is as close to adam, the Dassl/TaskRes optimiser)
    with pytest.raises(ConfigError, match="epochs takes int"):
        info.create({"epochs": "ten"})
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        info.create({"batch_size": "0"})
    with pytest.raises(ConfigError, match="2 comma-separated"):
        info.create({"search_scale": "1,2,3"})


# ---------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", list_methods())
def test_method_declares_the_contract(name):
    info = get_method(name)
    assert info.description and info.paper_protocol
    assert dataclasses.is_dataclass(info.config) and issubclass(info.config, MethodConfig)
    assert info.config.__dataclass_params__.frozen
    assert isinstance(info.needs("eurosat"), Needs)
    assert info.cls.rebuild_head.__func__ is not Method.rebuild_head.__func__, "predict/export need it"
    for option in info.options():
        assert option.doc, f"{name} option {option.name} has no docstring"
    defaults = info.config()
    if dataclasses.fields(defaults):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(defaults, dataclasses.fields(defaults)[0].name, None)
    round_trip = {
        o.name: ",".join(map(str, o.default)) if isinstance(o.default, list) else str(o.default)
        for o in info.options()
    }
    assert info.create(round_trip).config == defaults
    assert all(d.startswith("[") for d in info.deviations), "deviations carry a [CODE]/[PROPOSED] tag"


@pytest.fixture
def store_reads(monkeypatch):
    """Array names the store hands out, in order, with ``FINAL`` where the engine's final evaluation starts."""
    log: list[str] = []
    original_array, original_final = FeatureStore.array, fitting.final_evaluation
    monkeypatch.setattr(FeatureStore, "array", lambda self, n: (log.append(n), original_array(self, n))[1])
    monkeypatch.setattr(
        fitting, "final_evaluation", lambda *a, **k: (log.append("FINAL"), original_final(*a, **k))[1]
    )
    return log


@pytest.mark.parametrize("name", list_methods())
def test_every_method_fits_records_and_reads_no_test_tensor_early(name, tiny_cache, tmp_path, store_reads):
    """The contract, on a real tiny store: a run record, a loadable head, and under --protocol coop no
    test array read before the engine's final evaluation."""
    data, cache = tiny_cache
    (result,) = fit_on_tiny(name, data, cache, tmp_path)
    final = store_reads.index("FINAL")
    assert not [n for n in store_reads[:final] if n.startswith("images/test/")], (
        "test read before the final evaluation"
    )
    assert any(n.startswith("images/test/") for n in store_reads[final:])
    assert 0 <= result.val_acc <= 100 and 0 <= result.test_acc <= 100
    record = json.loads((result.run_dir / "record.json").read_text())
    for key in (
        "run_fingerprint",
        "config",
        "splits",
        "metrics",
        "deviations",
        "versions",
        "timings",
        "selection",
    ):
        assert key in record
    assert record["deviations"] == list(get_method(name).deviations)
    assert len(record["splits"]["train"]["split_index"]) == 2 * 5  # 2 shots x 5 demo classes
    headline = record["metrics"]["headline"]
    assert sum(map(sum, record["metrics"]["test"][headline]["confusion"])) == record["splits"]["test"]["n"]
    tensors = load_head_tensors(result.run_dir)
    assert tensors and {k: list(v.shape) for k, v in tensors.items()} == record["head"]["tensors"]


@pytest.mark.parametrize("name", [n for n in list_methods() if n != "zero_shot" and runs_on_synthetic(n)])
def test_trained_methods_beat_zero_shot_when_features_separate_but_text_does_not(name, cache, tmp_path):
    (zs,) = api.fit(
        "zero_shot", shots=4, seeds=[1], cache_dir=cache, runs_dir=tmp_path, progress=False, **SYNTH
    )
    assert zs.test_acc == pytest.approx(zero_shot_chance(4))
    (fitted,) = api.fit(name, shots=4, seeds=[1], cache_dir=cache, runs_dir=tmp_path, progress=False, **SYNTH)
    assert fitted.test_acc >= zs.test_acc + 25, (
        f"{name}: {fitted.test_acc:.1f} vs zero-shot {zs.test_acc:.1f}"
    )


@pytest.mark.parametrize("name", [n for n in list_methods() if runs_on_synthetic(n)])
def test_same_seed_gives_the_same_numbers_and_weights(name, cache, tmp_path):
    runs = [
        api.fit(
            name,
            shots=2,
            seeds=[2],
            options=fast_options(name),
            cache_dir=cache,
            runs_dir=tmp_path / str(i),
            progress=False,
            **SYNTH,
        )[0]
        for i in range(2)
    ]
    assert runs[0].to_json()["val_acc"] == runs[1].to_json()["val_acc"]
    assert runs[0].test_acc == runs[1].test_acc and not runs[1].reused
    a, b = (load_head_tensors(r.run_dir) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_method_that_skips_a_required_hook_fails_naming_it():
    """The base class's hooks tell a method author exactly what is missing (users never reach them:
    the engine refuses base2novel for methods without ``base2novel = True``)."""
    from fsl_cache.methods.base import Method

    class Incomplete(Method):
        name = "incomplete"

    method = Incomplete()
    with pytest.raises(NotImplementedError, match="Incomplete must override fit\\(\\) or build_head\\(\\)"):
        method.build_head(None, generator=torch.Generator())
    with pytest.raises(NotImplementedError, match="Incomplete must override train_settings\\(\\)"):
        method.train_settings(None)
    with pytest.raises(NotImplementedError, match="incomplete cannot classify classes it was not trained on"):
        method.novel_head(None, None)
    assert not Incomplete.base2novel


@pytest.mark.parametrize("name", list_methods())
def test_every_method_honours_validation_none_or_refuses_it(name, tiny_cache, tmp_path, store_reads):
    """``--validation none``: the method's declared validation-free setting, not one val array read (not even
    to score the finished head), and the regime in the record; a method without such a setting is refused."""
    data, cache = tiny_cache
    setting = get_method(name).cls.validation_free
    if not setting.exists:
        with pytest.raises(UsageError, match=f"{name} has no validation-free setting.*--validation kshot"):
            fit_on_tiny(name, data, cache, tmp_path, validation="none")
        return
    (result,) = fit_on_tiny(name, data, cache, tmp_path, validation="none")
    assert not [n for n in store_reads if n.startswith("images/val")], "val read under --validation none"
    assert result.validation == "none" and result.val_acc is None and 0 <= result.test_acc <= 100
    record = json.loads((result.run_dir / "record.json").read_text())
    assert record["validation"] == "none" and record["validation_free"] == setting.setting
    assert record["splits"]["val"] is None and record["metrics"]["val"] == {}
    assert record["config"].items() >= {k: v for k, v in setting.options.items() if k not in FAST}.items()


@pytest.mark.parametrize("name", ["tip_adapter_f", "ape_t"])
def test_a_run_reads_only_the_views_its_method_declares(name, tiny_cache, tmp_path):
    """The tiny store holds 301 ``tip`` views (ProLIP's); a store extracted for ``name`` alone holds what it
    declares. Views are drawn per view index, so the runs must be equal: other methods' views change nothing."""
    data, shared = tiny_cache
    own = tmp_path / "own"
    api.extract(f"imagefolder:{data}", model="fsl-tiny-rn", pretrained="none", for_methods=[name], cache_dir=own,
                shots=(2,), seeds=(1,), workers=0, progress=False)  # fmt: skip
    stores = [FeatureStore.open(next(c.glob("*/*"))) for c in (shared, own)]
    declared = get_method(name).needs(stores[0].manifest["dataset"]["name"]).train_views[0].views
    held = [s.manifest["views"]["train_pool/tip"] for s in stores]
    assert held[0] > held[1] == declared
    runs = [fit_on_tiny(name, data, c, tmp_path / c.name)[0] for c in (shared, own)]
    assert runs[0].test_acc == runs[1].test_acc
    a, b = (load_head_tensors(r.run_dir) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
