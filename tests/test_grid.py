"""``grid``: expansion, skipping finished runs, resuming after a kill, claims that keep workers apart, recipes."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fsl_cache import api
from fsl_cache.cli import main
from fsl_cache.errors import UsageError
from fsl_cache.sweeps import GridSpec, expand, load_recipe, parse_option_grid, try_claim
from fsl_cache.sweeps.claims import claim_path
from fsl_cache.testing import make_synthetic_store

REPO = Path(__file__).resolve().parents[1]
SYNTH = dict(model="synthetic", pretrained="none")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid") / "cache"
    make_synthetic_store(root, views={"tip": 21})
    return root


def records(runs: Path) -> list[Path]:
    return sorted(runs.glob("*/*/*/*/record.json"))


# ---------------------------------------------------------------------------- expansion


def test_expansion_is_the_cross_product_with_options_only_where_they_apply():
    spec = GridSpec(
        methods=("zero_shot", "tip_adapter_f"),
        datasets=("a", "b"),
        shots=(1, 2),
        seeds=(1, 2, 3),
        options={"epochs": ("5", "10"), "tip_adapter_f.lr": ("1e-3",)},
    )
    trials = expand(spec)
    assert len(trials) == (1 + 2) * 2 * 2 * 3  # zero_shot has no epochs/lr: one variant; tip_adapter_f two
    assert {t.options for t in trials if t.method == "zero_shot"} == {()}
    assert {t.options for t in trials if t.method == "tip_adapter_f"} == {
        (("epochs", "5"), ("lr", "1e-3")),
        (("epochs", "10"), ("lr", "1e-3")),
    }
    assert len(set(trials)) == len(trials)


def test_option_values_parse_with_bracketed_tuples_and_typos_fail():
    assert parse_option_grid(["search_scale=[12,10],[7,3]", "epochs=5,10"]) == {
        "search_scale": ("12,10", "7,3"),
        "epochs": ("5", "10"),
    }
    with pytest.raises(UsageError, match="Did you mean epochs"):
        expand(GridSpec(methods=("tip_adapter_f",), datasets=("a",), options={"epoch": ("5",)}))
    with pytest.raises(UsageError, match="scoped to .*, which is not among"):
        expand(GridSpec(methods=("zero_shot",), datasets=("a",), options={"coop.n_ctx": ("4",)}))
    with pytest.raises(UsageError, match="'visual_depth' belongs to capt, not to zero_shot"):
        expand(GridSpec(methods=("zero_shot",), datasets=("a",), options={"visual_depth": ("9",)}))
    # refused before any store is looked for or extracted (there is none for this dataset)
    with pytest.raises(UsageError, match="Did you mean epochs"):
        api.grid(["tip_adapter_f"], datasets=["imagefolder:/nonexistent"], options={"epoch": ["5"]})


def test_recipes_load_and_the_main_table_recipe_has_the_papers_grid():
    demo = load_recipe(REPO / "pipelines" / "demo.yaml")
    assert demo.model == "fsl-tiny-rn" and demo.pretrained == "shapes" and len(expand(demo)) == 120
    main_table = load_recipe(REPO / "pipelines" / "main_table_rn50.yaml")
    assert (main_table.model, main_table.pretrained, main_table.shots, main_table.seeds) == (
        "RN50",
        "openai",
        (1, 2, 4, 8, 16),
        (1, 2, 3),
    )
    assert len(main_table.datasets) == 11 and set(main_table.methods) == {
        "zero_shot",
        "coop",
        "clip_adapter",
        "tip_adapter_f",
        "ldc",
        "safe",
        "safe_a",
        "capt_c",
    }


def test_demo_recipe_matches_the_demo_command():
    from fsl_cache.cli import DEMO_METHODS, DEMO_OPTIONS, DEMO_SEEDS, DEMO_SHOTS

    demo = load_recipe(REPO / "pipelines" / "demo.yaml")
    assert (demo.methods, demo.shots, demo.seeds) == (DEMO_METHODS, DEMO_SHOTS, DEMO_SEEDS)
    options = {
        k: tuple(tuple(v) if isinstance(v, list) else v for v in values) for k, values in demo.options.items()
    }
    assert options == DEMO_OPTIONS and demo.extract_for == DEMO_METHODS


# ---------------------------------------------------------------------------- skipping


def test_a_finished_grid_is_skipped_and_a_larger_one_runs_only_the_new_runs(cache, tmp_path):
    runs = tmp_path / "runs"
    grid = dict(datasets=["synthetic"], seeds=(1, 2), cache_dir=cache, runs_dir=runs, **SYNTH)
    first = api.grid(["zero_shot", "tip_adapter"], shots=(1, 2), **grid)
    assert first.count("done") == 8 and first.count("failed") == 0 and len(records(runs)) == 8
    stamps = {p: p.stat().st_mtime_ns for p in records(runs)}
    starts = []
    again = api.grid(
        ["zero_shot", "tip_adapter"], shots=(1, 2, 4), on_start=lambda p, r: starts.append((p, r)), **grid
    )
    assert starts == [(4, 8)] and again.count("reused") == 8 and again.count("done") == 4
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    # a run made by `fit` is the same run: the grid finds its record
    api.fit(
        "tip_adapter",
        dataset="synthetic",
        shots=4,
        seeds=[3],
        cache_dir=cache,
        runs_dir=runs,
        progress=False,
        **SYNTH,
    )
    third = api.grid(
        ["tip_adapter"],
        shots=(4,),
        seeds=(3,),
        datasets=["synthetic"],
        cache_dir=cache,
        runs_dir=runs,
        **SYNTH,
    )
    assert third.count("reused") == 1


def test_missing_store_fails_before_any_run_with_the_extract_command(cache, tmp_path):
    with pytest.raises(UsageError, match="fsl-cache extract --dataset eurosat"):
        api.grid(
            ["zero_shot"],
            datasets=["synthetic", "eurosat"],
            shots=(1,),
            seeds=(1,),
            cache_dir=cache,
            runs_dir=tmp_path,
            **SYNTH,
        )
    assert not records(tmp_path)


def test_two_worker_processes_share_the_grid(cache, tmp_path):
    result = api.grid(
        ["tip_adapter"],
        datasets=["synthetic"],
        shots=(1, 2),
        seeds=(1, 2),
        workers=2,
        cache_dir=cache,
        runs_dir=tmp_path,
        **SYNTH,
    )
    assert result.count("done") == 4 and len(records(tmp_path)) == 4
    assert not list((tmp_path / ".claims").glob("*.claim"))  # every claim released


# ---------------------------------------------------------------------------- claims


def _claim(args) -> bool:
    runs, key, barrier = args
    barrier.wait()
    return try_claim(Path(runs), key) is not None


def test_exactly_one_of_many_racing_processes_gets_a_claim(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Manager().Barrier(6)
    with ctx.Pool(6) as pool:
        won = pool.map(_claim, [(str(tmp_path), "k" * 64, barrier)] * 6)
    assert sum(won) == 1


def test_a_claim_of_a_dead_process_is_taken_over_and_a_live_one_is_not(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = claim_path(tmp_path, "a" * 64)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": 0, "token": "old"}))
    claim = try_claim(tmp_path, "a" * 64)
    assert claim is not None and json.loads(path.read_text())["pid"] == os.getpid()
    assert try_claim(tmp_path, "a" * 64) is None  # held by a live process (this one)
    claim.release()
    assert not path.exists()
    far = claim_path(tmp_path, "b" * 64)
    far.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0, "token": "t"}))
    assert try_claim(tmp_path, "b" * 64) is None  # another host's fresh claim
    os.utime(far, (time.time() - 10, time.time() - 10))
    assert try_claim(tmp_path, "b" * 64, stale_after=5) is not None  # ... until it is old


# ---------------------------------------------------------------------------- interruption and concurrency


def grid_command(cache: Path, runs: Path, *extra: str, epochs: str = "8,9") -> list[str]:
    return [
        sys.executable,
        "-m",
        "fsl_cache",
        "grid",
        "tip_adapter_f",
        "--dataset",
        "synthetic",
        "--shots",
        "1,2",
        "--seeds",
        "1,2,3",
        "-o",
        f"epochs={epochs}",
        "--model",
        "synthetic",
        "--pretrained",
        "none",
        "--cache-dir",
        str(cache),
        "--runs-dir",
        str(runs),
        *extra,
    ]


def test_a_killed_grid_resumes_without_redoing_or_duplicating(cache, tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.Popen(grid_command(cache, runs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(records(runs)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p: p.stat().st_mtime_ns for p in records(runs)}
    assert 2 <= len(before) < 12, "the grid should have been killed midway"
    resumed = api.grid(
        ["tip_adapter_f"],
        datasets=["synthetic"],
        shots=(1, 2),
        seeds=(1, 2, 3),
        options={"epochs": ("8", "9")},
        cache_dir=cache,
        runs_dir=runs,
        **SYNTH,
    )
    assert resumed.count("reused") == len(before) and resumed.count("done") == 12 - len(before)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    run_dirs = [p.parent for p in records(runs)]
    assert (
        len(run_dirs) == 12
        and len({(d.parent.name, d.name.split("-coop-")[0], d.name) for d in run_dirs}) == 12
    )
    assert not list(runs.rglob("*.incomplete"))


def test_two_grids_on_one_runs_folder_never_compute_a_run_twice(cache, tmp_path):
    runs = tmp_path / "runs"
    procs = [
        subprocess.Popen(
            grid_command(cache, runs, "--json", epochs="2,3"),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    outcomes = [json.loads(line) for out in outputs for line in out.splitlines() if line.startswith("{")]
    done = [(o["options"]["epochs"], o["shots"], o["seed"]) for o in outcomes if o["status"] == "done"]
    assert len(done) == len(set(done)), "a run was computed by both grids"
    # every run is recorded once; runs the other grid still held are reported busy, none failed
    assert len(records(runs)) == 12 and not [o for o in outcomes if o["status"] == "failed"]
    assert len(done) + sum(o["status"] == "busy" for o in outcomes) >= 12


# ---------------------------------------------------------------------------- optuna and the CLI


def test_optuna_engine_shares_a_journal_and_selects_on_val(cache, tmp_path):
    pytest.importorskip("optuna")
    import optuna

    journal = tmp_path / "study.journal"
    grid = dict(
        datasets=["synthetic"],
        shots=(2,),
        seeds=(1, 2),
        options={"epochs": ("1", "2")},
        engine="optuna",
        study_storage=journal,
        cache_dir=cache,
        runs_dir=tmp_path / "runs",
        **SYNTH,
    )
    result = api.grid(["tip_adapter_f"], **grid)
    (study,) = result.studies
    assert journal.is_file() and study.trials == 2 and result.count("done") == 4
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    loaded = optuna.load_study(study_name=study.study, storage=storage)
    values = {t.params["epochs"]: t.value for t in loaded.trials}
    assert set(values) == {"1", "2"} and study.best_val_acc == max(values.values())
    expected = [
        json.loads(p.read_text())["metrics"]["val_acc"]
        for p in records(tmp_path / "runs")
        if json.loads(p.read_text())["options"]["epochs"] == study.best_options["epochs"]
    ]
    assert study.best_val_acc == pytest.approx(sum(expected) / len(expected))
    again = api.grid(["tip_adapter_f"], **grid)  # the studies are complete: nothing runs again
    assert again.studies[0].trials == 2 and again.count("done") == 0


def test_ray_engine_without_ray_says_how_to_install(cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UsageError, match=r"pip install 'fsl-cache\[ray\]'"):
        api.grid(
            ["zero_shot"],
            datasets=["synthetic"],
            shots=(1,),
            seeds=(1,),
            engine="ray",
            cache_dir=cache,
            runs_dir=tmp_path,
            **SYNTH,
        )


def test_cli_grid_prints_json_lines_and_refuses_a_bad_call(cache, tmp_path):
    args = [
        "grid",
        "zero_shot,tip_adapter",
        "--dataset",
        "synthetic",
        "--shots",
        "1",
        "--seeds",
        "1,2",
        "--model",
        "synthetic",
        "--pretrained",
        "none",
        "--cache-dir",
        str(cache),
        "--runs-dir",
        str(tmp_path),
        "--json",
    ]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 4 and {line["status"] for line in lines} == {"done"}
    bad = CliRunner().invoke(main, ["grid", "zero_shot"])
    assert bad.exit_code == 2 and "--dataset" in bad.output
