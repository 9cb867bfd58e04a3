"""``fit`` end to end: store lookup, run records (reuse, force), the CLI, and the errors users meet."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from fsl_cache import api
from fsl_cache.cli import main
from fsl_cache.errors import StoreError, UsageError
from fsl_cache.testing import make_synthetic_store

SYNTH = dict(dataset="synthetic", model="synthetic", pretrained="none", progress=False)


@pytest.fixture
def cache(tmp_path):
    root = tmp_path / "cache"
    make_synthetic_store(root, views={"tip": 21})
    return root


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ---------------------------------------------------------------------------- records


def test_a_finished_run_is_reused_and_force_redoes_it(cache, tmp_path):
    runs = tmp_path / "runs"
    first = api.fit(
        "tip_adapter_f", shots=2, seeds=[1, 2], options={"epochs": 3}, cache_dir=cache, runs_dir=runs, **SYNTH
    )
    assert [r.reused for r in first] == [False, False]
    record = first[0].run_dir / "record.json"
    stamp = record.stat().st_mtime_ns
    again = api.fit(
        "tip_adapter_f", shots=2, seeds=[1], options={"epochs": "3"}, cache_dir=cache, runs_dir=runs, **SYNTH
    )
    assert again[0].reused and again[0].run_dir == first[0].run_dir and record.stat().st_mtime_ns == stamp
    assert again[0].test_acc == first[0].test_acc
    forced = api.fit(
        "tip_adapter_f",
        shots=2,
        seeds=[1],
        options={"epochs": 3},
        cache_dir=cache,
        runs_dir=runs,
        force=True,
        **SYNTH,
    )
    assert (
        not forced[0].reused
        and record.stat().st_mtime_ns != stamp
        and forced[0].test_acc == first[0].test_acc
    )
    other = api.fit(
        "tip_adapter_f", shots=2, seeds=[1], options={"epochs": 4}, cache_dir=cache, runs_dir=runs, **SYNTH
    )
    assert other[0].run_dir != first[0].run_dir and not other[0].reused  # another config, another fingerprint


def test_record_holds_what_a_run_was(cache, tmp_path):
    (result,) = api.fit("tip_adapter", shots=4, seeds=[2], cache_dir=cache, runs_dir=tmp_path, **SYNTH)
    record = json.loads((result.run_dir / "record.json").read_text())
    assert (record["method"], record["dataset"], record["shots"], record["seed"], record["protocol"]) == (
        "tip_adapter",
        "synthetic",
        4,
        2,
        "coop",
    )
    assert record["config"]["search_scale"] == [12.0, 10.0]  # resolved per-dataset default, not None
    assert record["store"]["fingerprint"] == result.store_fingerprint
    assert (
        len(record["splits"]["train"]["split_index"]) == 16
        and len(record["splits"]["val"]["split_index"]) == 16
    )
    assert {"top1", "mean_per_class", "confusion"} <= set(record["metrics"]["test"]["main"])
    assert record["versions"]["torch"] and record["deviations"] and record["timings"]["total_s"] > 0
    assert (result.run_dir / "head.safetensors").is_file()
    assert not list(result.run_dir.glob("*.incomplete"))


def test_runs_dir_defaults_to_the_environment(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FSL_RUNS_DIR", str(tmp_path / "env-runs"))
    (result,) = api.fit("zero_shot", shots=1, seeds=[1], cache_dir=cache, **SYNTH)
    assert str(result.run_dir).startswith(str(tmp_path / "env-runs"))


def test_store_can_be_named_by_key(cache, tmp_path):
    key = next(cache.glob("*/*")).name.rsplit("-", 1)[1]
    (result,) = api.fit(
        "zero_shot",
        dataset="synthetic",
        shots=1,
        seeds=[1],
        store=key[:8],
        cache_dir=cache,
        runs_dir=tmp_path,
        progress=False,
    )
    assert result.store_fingerprint.startswith(key)


# ---------------------------------------------------------------------------- CLI


def test_cli_json_prints_one_line_per_run_on_stdout(cache, tmp_path):
    res = cli(
        "fit",
        "tip_adapter",
        "--dataset",
        "synthetic",
        "--model",
        "synthetic",
        "--pretrained",
        "none",
        "--shots",
        "2",
        "--seed",
        "1",
        "--seed",
        "3",
        "--cache-dir",
        str(cache),
        "--runs-dir",
        str(tmp_path),
        "--json",
    )
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [line["seed"] for line in lines] == [1, 3]
    for line in lines:
        assert {"method", "dataset", "shots", "seed", "protocol", "val_acc", "test_acc", "run_dir"} <= set(
            line
        )
        assert os.path.isdir(line["run_dir"]) and 0 <= line["test_acc"] <= 100


def test_cli_options_and_table(cache, tmp_path):
    res = cli(
        "fit",
        "tip_adapter_f",
        "--dataset",
        "synthetic",
        "--model",
        "synthetic",
        "--pretrained",
        "none",
        "--shots",
        "1",
        "--seed",
        "1,2",
        "-o",
        "epochs=2",
        "-o",
        "lr=0.01",
        "--cache-dir",
        str(cache),
        "--runs-dir",
        str(tmp_path),
    )
    assert res.exit_code == 0, res.output
    assert "mean" in res.stdout and "tip_adapter_f" in res.stdout  # the results table is a result: stdout


def test_cli_methods_lists_needs_and_defaults():
    res = cli("methods", "--json")
    rows = {json.loads(line)["name"]: json.loads(line) for line in res.stdout.splitlines()}
    assert {"zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f"} <= set(rows)
    tip_f = rows["tip_adapter_f"]
    assert tip_f["needs"]["train_views"][0]["policy"] == "tip"
    assert {o["name"]: o["default"] for o in tip_f["options"]}["batch_size"] == 256
    assert cli("methods").exit_code == 0
    assert cli("fit", "--help").exit_code == 0


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["fit", "tip-adaptor"], 2, "Did you mean tip_adapter"),
        (["fit", "tip_adapter_f", "-o", "lrr=1"], 2, "Did you mean lr"),
        (["fit", "tip_adapter_f", "-o", "epochs"], 2, "expected key=value"),
        (["fit", "tip_adapter_f", "-o", "epochs=x"], 2, "epochs takes int"),
        (["fit", "zero_shot", "--shots", "16"], 2, "not shots=16"),
        (["fit", "zero_shot", "--protocol", "papers"], 2, "papers"),
    ],
)
def test_cli_errors_are_one_line_with_the_right_exit_code(cache, tmp_path, args, code, message):
    base = [
        "--dataset",
        "synthetic",
        "--model",
        "synthetic",
        "--pretrained",
        "none",
        "--cache-dir",
        str(cache),
        "--runs-dir",
        str(tmp_path),
    ]
    shots = [] if "--shots" in args else ["--shots", "1"]
    res = cli(*args, *base, *shots)
    assert res.exit_code == code, res.output
    assert message in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------- errors


def test_a_store_without_the_needed_views_names_the_extract_command(tmp_path):
    root = make_synthetic_store(tmp_path / "c", views={})
    with pytest.raises(StoreError) as err:
        api.fit("tip_adapter", shots=1, seeds=[1], cache_dir=tmp_path / "c", runs_dir=tmp_path / "r", **SYNTH)
    message = str(err.value)
    assert "images/train_pool/views/tip/pooled" in message
    assert (
        "fsl-cache extract --dataset synthetic --model synthetic --pretrained none --for tip_adapter "
        "--shots 1,2,4 --cache-dir " + str(tmp_path / "c")
    ) in message
    res = cli(
        "fit",
        "tip_adapter",
        "--dataset",
        "synthetic",
        "--model",
        "synthetic",
        "--pretrained",
        "none",
        "--shots",
        "1",
        "--cache-dir",
        str(root.parents[1]),
        "--runs-dir",
        str(tmp_path / "r"),
    )
    assert (
        res.exit_code == 1 and "fsl-cache extract" in res.stderr and len(res.stderr.strip().splitlines()) <= 3
    )


def test_too_few_cached_views_are_refused_and_fewer_than_wanted_are_noted(tmp_path):
    make_synthetic_store(tmp_path / "few", views={"tip": 5})
    with pytest.raises(StoreError, match="needs at least 11"):
        api.fit(
            "tip_adapter", shots=1, seeds=[1], cache_dir=tmp_path / "few", runs_dir=tmp_path / "r", **SYNTH
        )
    make_synthetic_store(tmp_path / "some", views={"tip": 11})
    (result,) = api.fit(
        "tip_adapter_f",
        shots=1,
        seeds=[1],
        options={"epochs": 12},
        cache_dir=tmp_path / "some",
        runs_dir=tmp_path / "r",
        **SYNTH,
    )
    assert any("views repeat" in w for w in result.warnings) and any("wants 21" in w for w in result.warnings)


def test_missing_and_ambiguous_stores(cache, tmp_path):
    with pytest.raises(
        UsageError, match="fsl-cache extract --dataset synthetic --model RN50 --pretrained openai"
    ):
        api.fit("zero_shot", dataset="synthetic", shots=1, seeds=[1], cache_dir=cache, progress=False)
    with pytest.raises(UsageError, match="Did you mean eurosat"):
        api.fit("zero_shot", dataset="eurosta", shots=1, seeds=[1], cache_dir=cache, progress=False)
    make_synthetic_store(cache, views={"tip": 21}, precision="fp32")
    with pytest.raises(UsageError, match="Several stores hold synthetic.*Pass --store KEY"):
        api.fit("zero_shot", shots=1, seeds=[1], cache_dir=cache, runs_dir=tmp_path, **SYNTH)


def test_a_store_of_another_dataset_is_refused(cache, tmp_path):
    other = make_synthetic_store(cache, name="dtd", views={})
    with pytest.raises(StoreError, match="holds dataset 'dtd', not 'synthetic'"):
        api.fit(
            "zero_shot",
            dataset="synthetic",
            store=str(other),
            shots=1,
            seeds=[1],
            cache_dir=cache,
            runs_dir=tmp_path,
            progress=False,
        )


def test_an_altered_manifest_is_refused(cache, tmp_path):
    manifest_path = next(cache.glob("*/*")) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["fingerprint_parts"]["precision"] = "fp32"  # contents no longer hash to the key
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="fingerprint does not match"):
        api.fit("zero_shot", shots=1, seeds=[1], cache_dir=cache, runs_dir=tmp_path, **SYNTH)


def test_a_corrupted_array_is_refused(cache, tmp_path):
    chunk = next(
        p
        for p in (next(cache.glob("*/*")) / "arrays.zarr/images/val_pool/views/center/pooled").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    data = bytearray(chunk.read_bytes())
    data[4] ^= 0xFF
    chunk.write_bytes(data)
    with pytest.raises(StoreError, match="corrupted"):
        api.fit("zero_shot", shots=1, seeds=[1], cache_dir=cache, runs_dir=tmp_path, **SYNTH)


def test_cli_validation_none_shows_the_regime_and_methods_say_what_it_runs(cache, tmp_path):
    common = ["--dataset", "synthetic", "--model", "synthetic", "--pretrained", "none", "--shots", "2"]
    paths = ["--seed", "1", "--cache-dir", str(cache), "--runs-dir", str(tmp_path)]
    table = cli("fit", "tip_adapter", *common, *paths, "--validation", "none")
    assert table.exit_code == 0, table.output
    assert "validation" in table.stdout and "none" in table.stdout
    (line,) = cli("fit", "tip_adapter", *common, *paths, "--validation", "none", "--json").stdout.splitlines()
    assert json.loads(line).items() >= {"validation": "none", "val_acc": None}.items()
    refused = CliRunner().invoke(main, ["fit", "safe", *common, *paths, "--validation", "none"])
    assert refused.exit_code == 2 and "safe has no validation-free setting" in refused.output
    listed = {m["name"]: m for m in map(json.loads, cli("methods", "--json").stdout.splitlines())}
    assert listed["tip_adapter"]["validation_free"]["options"] == {"search": False}
    assert listed["safe"]["validation_free"]["options"] is None
