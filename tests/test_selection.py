"""What a search selects is what the head uses: for every method with a selection step, a fit on a
store where the selection lands away from symmetric values (alpha != beta, not the grid's first point,
beta not 0, 1/2 or 1, a grid winner other than the first, ...), and a check that the fitted head, the
run's re-loaded head and the exported and re-loaded head all use exactly the values the record says,
and that those values are the ones an independent re-typing of the official search picks.

Why: a swap of two selected values (``set_alpha_beta(alpha=beta, beta=alpha)``, ``beta, acc = ...`` ↔
``acc, beta = ...``) is invisible when the search lands on equal values. Each test asserts first that
its landing is not such a degenerate one. ``tests/mutations.py`` checks that these tests catch swaps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fsl_cache import api
from fsl_cache.backbones import load_backbone
from fsl_cache.datasets import make_demo_dataset
from fsl_cache.inference import rebuild_head
from fsl_cache.inference.bundle import load_bundle
from fsl_cache.methods import FitTask, get_method, list_methods
from fsl_cache.methods.linear_probe import fit_logreg
from fsl_cache.runs.record import load_head_tensors
from fsl_cache.runs.request import task_info
from fsl_cache.splits import build_splits
from fsl_cache.store.store import FeatureStore
from fsl_cache.testing import make_synthetic_store

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(model="fsl-tiny-rn", pretrained="none")
FAST_SAFE = {"iterations": 30, "eval_every": 10, "warmup": 2, "lrs": "3e-2,3e-3", "wds": "0.05,0"}
"""On the tiny store the first grid points (lr 3e-2) score worse than a later one (lr 3e-3, wd 0.05)."""
SELECTING = {
    "linear_probe",
    "tip_adapter",
    "tip_adapter_f",
    "clip_adapter",
    "coop",
    "ldc",
    "ldc_lite",
    "safe",
    "safe_a",
    "capt_c",
    "capt",
    "promptkd",
    "lp_pp",
    "gda",
    "ape",
    "ape_t",
}
"""Methods with a selection step (a search over alpha/beta, C, rho, lr x wd, or a selected epoch)."""
LAST_EPOCH = {"zs_lp", "clap", "cross_modal", "taskres", "prolip"}
"""Methods whose official code selects nothing (one configuration, the last epoch): they read no val."""


def test_every_method_with_a_selection_step_is_covered_here():
    """zero_shot selects nothing; every other registered method must be in SELECTING (tests/README.md)."""
    assert set(list_methods()) - SELECTING - LAST_EPOCH == {"zero_shot"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The demo images through the random-weight fsl-tiny-rn, with what every method reads."""
    root = tmp_path_factory.mktemp("selection")
    data = make_demo_dataset(root / "demo")
    store = api.extract(
        f"imagefolder:{data}",
        for_methods=list_methods(),
        cache_dir=root / "cache",
        shots=(2,),
        seeds=(1,),
        workers=0,
        progress=False,
        **TINY,
    ).store
    return root, data, store


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A synthetic store (fsl_cache.testing) whose pooled features and half-aligned text weights make the
    searches of the pooled-feature methods land away from their first or symmetric values."""
    root = tmp_path_factory.mktemp("synth")
    store = make_synthetic_store(
        root / "cache",
        num_classes=4,
        dim=16,
        per_class=(8, 6, 6),
        shots=(4,),
        seeds=(1,),
        views={"tip": 21, "coop": 9},
        zero_shot=0.8,
        separation=1.0,
        noise=1.5,
        view_noise=0.6,
        preproj=True,
    )
    return root, None, store


def fit(where, method: str, options: dict, *, runs: str = "runs") -> tuple[dict, Path]:
    root, data, _ = where
    kw = (
        dict(dataset="synthetic", model="synthetic", pretrained="none", shots=4)
        if data is None
        else dict(dataset=f"imagefolder:{data}", shots=2, **TINY)
    )
    (run,) = api.fit(
        method,
        seeds=[1],
        options=options,
        cache_dir=root / "cache",
        runs_dir=root / runs,
        progress=False,
        **kw,
    )
    return json.loads((run.run_dir / "record.json").read_text()), run.run_dir


def heads(run_dir: Path, tmp_path: Path) -> list[torch.nn.Module]:
    """The run's head re-loaded from the run folder and from an export of it (no cache needed)."""
    out = api.export(run_dir, tmp_path / "export")
    backbone = lambda: load_backbone(*TINY.values())  # noqa: E731  (only the tiny store's heads ask)
    return [rebuild_head(load_bundle(path), backbone) for path in (run_dir, out)]


def task_of(where, method: str) -> FitTask:
    """The task the engine builds for the run (for independent searches on its val)."""
    fs = FeatureStore.open(where[2])
    shots = 4 if where[1] is None else 2
    splits = build_splits(fs, get_method(method).cls, shots=shots, seed=1, protocol="coop")
    info = task_info(fs, shots=shots, seed=1, protocol="coop")
    return FitTask(fs, info, train=splits.train, val=splits.val)


def accuracy(logits: torch.Tensor, labels) -> float:
    return 100.0 * float((logits.argmax(dim=-1) == torch.as_tensor(labels)).float().mean())


# ---------------------------------------------------------------------------- linear probe


def lpclip_search(train, val, grid, steps):
    """CoOp lpclip/linear_probe.py: the grid, then the log-space binary search; the last step's C."""
    accs = [np.mean(fit_logreg(*train, c=c, max_iter=1000).predict(val[0]) == val[1]) for c in grid]
    peak = grid[int(np.argmax(accs))]
    left, right = np.log10(0.1 * peak), np.log10(10 * peak)
    chosen = None
    for _ in range(steps):
        a_left = np.mean(fit_logreg(*train, c=10**left, max_iter=1000).predict(val[0]) == val[1])
        a_right = np.mean(fit_logreg(*train, c=10**right, max_iter=1000).predict(val[0]) == val[1])
        if a_left < a_right:
            chosen, left = 10**right, 0.5 * (left + right)
        else:
            chosen, right = 10**left, 0.5 * (left + right)
    return chosen


def test_linear_probe_head_is_the_model_at_the_recorded_c(synth, tmp_path):
    grid = (0.3, 0.03, 3.0)
    record, run_dir = fit(synth, "linear_probe", {"c_grid": ",".join(map(str, grid)), "search_steps": 3})
    sel = record["selection"]
    last = sel["search"][-1]
    assert last["val_left"] < last["val_right"], (
        "the last step kept the left end: the other branch is untested"
    )
    task = task_of(synth, "linear_probe")
    train = (task.center(task.train).double().numpy(), task.train.labels.numpy())
    val = (task.center(task.val).double().numpy(), task.val.labels.numpy())
    assert sel["c"] == pytest.approx(lpclip_search(train, val, grid, 3))
    clf = fit_logreg(*train, c=sel["c"], max_iter=1000)
    for head in heads(run_dir, tmp_path):
        np.testing.assert_allclose(head.linear.weight.detach().numpy(), clf.coef_, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(head.linear.bias.detach().numpy(), clf.intercept_, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- Tip-Adapter(-F), SAFE-A


def tip_search(f_hat, keys, values, text, labels, *, scale, steps):
    """Tip-Adapter utils.py::search_hp, loop for loop: beta-major, first strict maximum."""
    betas = [i * (scale[0] - 0.1) / steps[0] + 0.1 for i in range(steps[0])]
    alphas = [i * (scale[1] - 0.1) / steps[1] + 0.1 for i in range(steps[1])]
    clip = 100.0 * f_hat @ text.T
    affinity = f_hat @ keys.T
    best, best_beta, best_alpha = 0, 0.0, 0.0
    for beta in betas:
        for alpha in alphas:
            cache = ((-1) * (beta - beta * affinity)).exp() @ values
            acc = int(((clip + cache * alpha).argmax(1) == labels).sum())
            if acc > best:
                best, best_beta, best_alpha = acc, beta, alpha
    return best_beta, best_alpha, betas, alphas


TIP_SEARCH = {"search_scale": "9,4", "search_steps": "23,9"}


def check_tip_landing(sel: dict, betas: list[float], alphas: list[float]) -> None:
    assert sel["alpha"] != pytest.approx(sel["beta"]), "alpha = beta: a swap would go unseen"
    assert (sel["beta"], sel["alpha"]) != (betas[0], alphas[0]), "the search kept its first point"


def test_tip_adapter_uses_the_recorded_alpha_and_beta(synth, tmp_path):
    record, run_dir = fit(synth, "tip_adapter", TIP_SEARCH)
    sel, task = record["selection"], task_of(synth, "tip_adapter")
    keys = torch.nn.functional.normalize(task.train_views("tip", views=range(1, 11)).mean(dim=1), dim=-1)
    values = torch.nn.functional.one_hot(task.train.labels.long(), task.info.num_classes).float()
    f_hat = torch.nn.functional.normalize(task.center(task.val), dim=-1)
    beta, alpha, betas, alphas = tip_search(
        f_hat, keys, values, task.text("tip"), task.val.labels, scale=(9, 4), steps=(23, 9)
    )
    check_tip_landing(sel, betas, alphas)
    assert (sel["beta"], sel["alpha"]) == pytest.approx((beta, alpha))
    for head in heads(run_dir, tmp_path):
        assert (float(head.alpha), float(head.beta)) == pytest.approx((alpha, beta))


def test_tip_adapter_f_keeps_the_recorded_epoch_and_alpha_beta(synth, tmp_path):
    opts = {**TIP_SEARCH, "epochs": 6, "lr": 0.05, "init_alpha": 1.3, "init_beta": 2.9}
    record, run_dir = fit(synth, "tip_adapter_f", opts)
    sel, task = record["selection"], task_of(synth, "tip_adapter_f")
    scores = [h["select_acc"] for h in record["history"] if h.get("select_acc") is not None]
    assert sel["epoch"] == int(np.argmax(scores)) and sel["epoch_acc"] == max(scores)
    assert sel["epoch"] != len(scores) - 1, "best epoch = last epoch: keeping the wrong state would go unseen"
    val, labels = task.center(task.val), task.val.labels
    for head in heads(run_dir, tmp_path):
        assert (float(head.alpha), float(head.beta)) == pytest.approx((sel["alpha"], sel["beta"]))
        keys = head.adapter.weight.detach()
        f_hat = torch.nn.functional.normalize(val, dim=-1)
        beta, alpha, betas, alphas = tip_search(
            f_hat, keys, head.values, head.text, labels, scale=(9, 4), steps=(23, 9)
        )
        check_tip_landing(sel, betas, alphas)
        assert (sel["beta"], sel["alpha"]) == pytest.approx((beta, alpha))
        with torch.no_grad():
            head.set_alpha_beta(alpha=1.3, beta=2.9)  # the epoch was chosen with the init values
            assert accuracy(head({"pooled": val}), labels) == pytest.approx(sel["epoch_acc"])


def test_safe_a_uses_the_recorded_safe_point_and_alpha_beta(tiny, tmp_path):
    opts = {**FAST_SAFE, **TIP_SEARCH, "beta": 0.35, "tip_epochs": 2, "init_alpha": 1.3, "init_beta": 2.9}
    record, run_dir = fit(tiny, "safe_a", opts)
    sel = record["selection"]
    # the tiny backbone's embeddings barely separate the demo classes, so stage 2's search may land on its
    # first point; alpha/beta landing away from it is tip_adapter_f's test (same code), here the values
    # must only round-trip and match the independent search
    task = task_of(tiny, "safe_a")
    dense = task.center(task.val, tap=record["head"]["inputs"][0])
    for head in heads(run_dir, tmp_path):
        assert (float(head.tip.alpha), float(head.tip.beta)) == pytest.approx(
            (sel["tip"]["alpha"], sel["tip"]["beta"])
        )
        assert float(head.safe.beta) == pytest.approx(0.35)
        with torch.no_grad():
            f_hat = torch.nn.functional.normalize(head.safe.embed({head.inputs[0]: dense}), dim=-1)
        beta, alpha, betas, alphas = tip_search(
            f_hat,
            head.tip.adapter.weight,
            head.tip.values,
            head.tip.text,
            task.val.labels,
            scale=(9, 4),
            steps=(23, 9),
        )
        assert (sel["tip"]["beta"], sel["tip"]["alpha"]) == pytest.approx((beta, alpha))
    check_safe_winner(tiny, "safe_a", opts, record, run_dir, prefix="safe.")


# ---------------------------------------------------------------------------- SAFE


def check_safe_winner(
    tiny, method: str, opts: dict, record: dict, run_dir: Path, *, prefix: str = ""
) -> None:
    """The grid's winner is a later point, and its weights are those of that (lr, wd) trained alone."""
    sel = record["selection"]["safe"] if method == "safe_a" else record["selection"]
    points = [(g["lr"], g["wd"]) for g in sel["grid"]]
    win = points.index((sel["lr"], sel["wd"]))
    assert win != 0, "the grid's first point won: a wrong winner index would go unseen"
    assert sel["lr"] != sel["wd"]
    alone = {**opts, "lrs": str(sel["lr"]), "wds": str(sel["wd"])}
    if method == "safe_a":
        alone["tip_epochs"] = 0  # only stage 1 matters here
    _, alone_dir = fit(tiny, method, alone, runs="alone")
    grid_state, alone_state = load_head_tensors(run_dir), load_head_tensors(alone_dir)
    tuned = [k for k in grid_state if k.startswith(f"{prefix}tuned.")]
    assert tuned
    for k in tuned:
        torch.testing.assert_close(grid_state[k], alone_state[k], rtol=1e-5, atol=1e-6, msg=k)


def test_safe_head_is_the_recorded_grid_point(tiny, tmp_path):
    opts = {**FAST_SAFE, "beta": 0.35}
    record, run_dir = fit(tiny, "safe", opts)
    check_safe_winner(tiny, "safe", opts, record, run_dir)
    saved = load_head_tensors(run_dir)
    for head in heads(run_dir, tmp_path):
        assert (float(head.beta), float(head.tau)) == pytest.approx((0.35, 100.0))
        for k, v in head.saved_state().items():
            torch.testing.assert_close(v, saved[k].float(), msg=k)


# ---------------------------------------------------------------------------- CLIP-Adapter, CoOp, CAPT


def test_clip_adapter_uses_the_recorded_rho(synth, tmp_path):
    grid = (0.8, 0.15, 0.65, 0.35)
    opts = {"rho_grid": ",".join(map(str, grid)), "epochs": 8, "lr": 0.2, "batch_size": 4}
    record, run_dir = fit(synth, "clip_adapter", opts)
    sel = record["selection"]
    scores = sel["rho_val_acc"]
    assert sel["rho"] == grid[int(np.argmax(scores))] and sel["rho"] != grid[0], scores
    saved = load_head_tensors(run_dir)
    for head in heads(run_dir, tmp_path):
        assert float(head.rho) == pytest.approx(sel["rho"])
        for k in ("adapter.fc.0.weight", "adapter.fc.2.weight"):
            torch.testing.assert_close(head.state_dict()[k], saved[k].float(), msg=k)


def check_epoch(record: dict) -> None:
    scores = [h["select_acc"] for h in record["history"] if h.get("select_acc") is not None]
    sel = record["selection"]
    assert sel["epoch"] == int(np.argmax(scores)) and sel["val_acc"] == max(scores)


def test_coop_keeps_the_recorded_epoch(tiny, tmp_path):
    record, run_dir = fit(tiny, "coop", {"epochs": 4, "lr": 0.5, "n_ctx": 4, "batch_size": 4})
    check_epoch(record)
    task = task_of(tiny, "coop")
    for head in heads(run_dir, tmp_path):
        assert head.length == record["selection"]["text_length"]
        with torch.no_grad():
            acc = accuracy(head({"pooled": task.center(task.val)}), task.val.labels)
        assert acc == pytest.approx(record["selection"]["val_acc"])


def test_capt_c_keeps_the_recorded_epoch(tiny, tmp_path):
    """CAPT-C selects an epoch on val: a refit selects the same epoch, and the fitted, the re-loaded and the
    exported heads all score the recorded val accuracy."""
    from fsl_cache.testing import fit_method

    opts = {"epochs": 3, "lr": 0.02, "batch_size": 4, "bank_views": 2}
    record, run_dir = fit(tiny, "capt_c", opts)
    check_epoch(record)
    task = task_of(tiny, "capt_c")
    fitted = fit_method("capt_c", task, opts)
    assert fitted.selection["epoch"] == record["selection"]["epoch"]
    for head in [fitted.head.eval(), *heads(run_dir, tmp_path)]:
        with torch.no_grad():
            acc = accuracy(head({"pooled": task.center(task.val)})["capt"], task.val.labels)
        assert acc == pytest.approx(record["selection"]["val_acc"])


@pytest.mark.parametrize("method", ["capt", "promptkd"])
def test_prompt_tuning_methods_keep_the_recorded_epoch(tiny, tmp_path, method):
    """capt and promptkd select an epoch on val: the re-loaded and exported heads score the recorded val accuracy."""
    record, run_dir = fit(tiny, method, {"epochs": 3, "lr": 0.05, "batch_size": 4})
    check_epoch(record)
    task = task_of(tiny, method)
    for head in heads(run_dir, tmp_path):
        assert head.length == record["selection"]["text_length"]
        with torch.no_grad():
            acc = accuracy(head({"pooled": task.center(task.val)}), task.val.labels)
        assert acc == pytest.approx(record["selection"]["val_acc"])


# ---------------------------------------------------------------------------- LDC, LDC-lite


def ldc_search(maf, icd, labels, steps=50):
    """ldc_train.py Eval.search_hp: beta over 0..1 step 1/steps, first strict maximum."""
    best_beta, best = 0.0, 0
    for i in range(steps + 1):
        beta = i / steps
        right = int(((beta * maf + (1 - beta) * icd).argmax(-1) == labels).sum())
        if right > best:
            best, best_beta = right, beta
    return best_beta


LDC_OPTIONS = {
    "ldc": {"epochs": 4, "batch_size": 2, "lr": 0.03, "beta_steps": 37},
    "ldc_lite": {"epochs": 8, "batch_size": 2, "lr": 0.03, "beta_steps": 37},
}
"""Options under which beta lands inside (0, 1) and off 1/2 on the tiny store."""


@pytest.mark.parametrize("method", ["ldc", "ldc_lite"])
def test_ldc_uses_the_recorded_beta(tiny, tmp_path, method):
    record, run_dir = fit(tiny, method, LDC_OPTIONS[method])
    sel, task = record["selection"], task_of(tiny, method)
    assert sel["beta"] not in (0.0, 0.5, 1.0), "beta on a symmetric value: a swap would go unseen"
    for head in heads(run_dir, tmp_path):
        x = {t: task.center(task.val, tap=t) for t in head.inputs}
        with torch.no_grad():
            out = head(x)
        assert float(head.beta) == pytest.approx(sel["beta"])
        assert sel["beta"] == pytest.approx(ldc_search(out["maf"], out["icd"], task.val.labels, steps=37))
        torch.testing.assert_close(out["main"], sel["beta"] * out["maf"] + (1 - sel["beta"]) * out["icd"])


# ---------------------------------------------------------------------------- the cached-feature baselines (§2.10)


@pytest.mark.parametrize("method", sorted(LAST_EPOCH))
def test_validation_free_methods_keep_the_last_epoch_and_read_no_val(synth, tmp_path, method, monkeypatch):
    from fsl_cache.runs import fitting

    log: list[str] = []
    original_array, original_final = FeatureStore.array, fitting.final_evaluation
    monkeypatch.setattr(FeatureStore, "array", lambda self, n: (log.append(n), original_array(self, n))[1])
    monkeypatch.setattr(
        fitting, "final_evaluation", lambda *a, **k: (log.append("FINAL"), original_final(*a, **k))[1]
    )
    record, run_dir = fit(synth, method, {"epochs": 3}, runs=f"runs_{method}")
    # the engine builds the val split (indices, labels); its features are the fit's to read or not
    early = log[: log.index("FINAL")]
    assert not [n for n in early if n.startswith("images/val") and "/views/" in n], (
        "val features read by the fit"
    )
    assert record["selection"]["epoch"] == 2 and record["selection"]["select"] == "last"
    saved = load_head_tensors(run_dir)
    for head in heads(run_dir, tmp_path):
        for k, v in head.state_dict().items():
            torch.testing.assert_close(v, saved[k].to(v.dtype), msg=k)


def test_lp_pp_keeps_the_last_best_epoch_and_its_weights(synth, tmp_path):
    record, run_dir = fit(synth, "lp_pp", {"epochs": 60})
    sel, task = record["selection"], task_of(synth, "lp_pp")
    scores = [h["select_acc"] for h in record["history"]]
    best = max(scores)
    assert (
        sel["epoch"] == len(scores) - 1 - scores[::-1].index(best) and sel["val_acc"] == best
    )  # acc >= best
    assert sel["epoch"] != len(scores) - 1, "best epoch = last epoch: keeping the wrong state would go unseen"
    val = torch.nn.functional.normalize(task.center(task.val), dim=-1)
    for head in heads(run_dir, tmp_path):
        w, b, a, t = head.linear.weight, head.linear.bias, head.alpha, head.text
        logits = val @ w.T + b + a[None] * (val @ t.T)  # LP++'s logits, written out
        assert accuracy(logits, task.val.labels) == pytest.approx(sel["val_acc"])


def test_gda_uses_the_recorded_alpha(synth, tmp_path):
    import test_method_gda

    grid = (100.0, 0.03, 3.0, 30.0, 0.3)
    record, run_dir = fit(synth, "gda", {"alpha_grid": ",".join(map(str, grid))})
    sel, task = record["selection"], task_of(synth, "gda")
    vecs = torch.nn.functional.normalize(task.train_views("tip", views=range(1, 11)), dim=-1)
    vecs, labels = vecs.transpose(0, 1).reshape(-1, vecs.shape[-1]), task.train.labels.long().repeat(10)
    text = task.text("tip")
    _, _, W, b = test_method_gda._official(vecs, labels, text.T)
    val = torch.nn.functional.normalize(task.center(task.val), dim=-1)
    best_val_acc, best_alpha = 0, 0.1
    for alpha in grid:  # main_few_shots.py::run's search, re-typed
        acc = accuracy(100.0 * val @ text.T + alpha * (val @ W + b), task.val.labels)
        if acc > best_val_acc:
            best_val_acc, best_alpha = acc, alpha
    assert best_alpha != grid[0], "the search kept its first point"
    assert sel["alpha"] == best_alpha and sel["search_acc"] == pytest.approx(best_val_acc)
    for head in heads(run_dir, tmp_path):
        assert float(head.alpha) == pytest.approx(best_alpha)


def test_ape_uses_the_recorded_beta_alpha_gamma(synth, tmp_path):
    import test_method_ape

    record, run_dir = fit(synth, "ape", {"search_scale": "9,4,1.3", "search_steps": "11,6,5"})
    sel, task = record["selection"], task_of(synth, "ape")
    order = torch.argsort(task.train.labels, stable=True)  # the code's keys are class-major
    keys = torch.nn.functional.normalize(task.train_views("tip", views=range(1, 11)).mean(dim=1), dim=-1)[
        order
    ]
    labels = task.train.labels.long()[order]
    values = torch.nn.functional.one_hot(labels, task.info.num_classes).float()
    text = task.text("tip")
    _, indices = test_method_ape._official_criterion(text.T, keys, 4, (0.5, 0.5), sel["channels"])
    val = torch.nn.functional.normalize(task.center(task.val), dim=-1)
    betas = [i * (9 - 0.1) / 11 + 0.1 for i in range(11)]
    alphas = [i * (4 - 0.1) / 6 + 0.1 for i in range(6)]
    gammas = [i * 1.3 / 5 for i in range(5)]
    best = (0, 0, 0, 0)
    for beta in betas:  # main.py::APE's triple loop, re-typed
        for alpha in alphas:
            for gamma in gammas:
                logits = test_method_ape._official_ape_logits(
                    val, text.T, keys, values, indices, beta, alpha, gamma
                )
                acc = accuracy(logits, task.val.labels)
                if acc > best[0]:
                    best = (acc, beta, alpha, gamma)
    assert best[1] != best[2] and (best[1], best[2]) != (betas[0], alphas[0]), best
    assert (sel["beta"], sel["alpha"], sel["gamma"]) == pytest.approx(best[1:])
    for head in heads(run_dir, tmp_path):
        got = (float(head.beta), float(head.alpha), float(head.gamma))
        assert got == pytest.approx(best[1:])
        assert sorted(head.channels.tolist()) == sorted(indices.tolist())


def test_ape_t_keeps_the_recorded_epoch_and_beta_alpha(synth, tmp_path):
    record, run_dir = fit(synth, "ape_t", {"epochs": 8, "lr": 0.05, "search_steps": "23,9"})
    sel, task = record["selection"], task_of(synth, "ape_t")
    scores = [h["select_acc"] for h in record["history"] if h.get("select_acc") is not None]
    assert sel["epoch"] == int(np.argmax(scores)) and sel["val_acc"] == max(scores)
    val = torch.nn.functional.normalize(task.center(task.val), dim=-1)
    for head in heads(run_dir, tmp_path):
        assert (float(head.alpha), float(head.beta)) == pytest.approx((sel["alpha"], sel["beta"]))
        with torch.no_grad():
            keys, text, values = head.refined()
        beta, alpha, betas, alphas = tip_search(
            val, keys, values, text, task.val.labels, scale=(7, 7), steps=(23, 9)
        )
        check_tip_landing(sel, betas, alphas)
        assert (sel["beta"], sel["alpha"]) == pytest.approx((beta, alpha))
