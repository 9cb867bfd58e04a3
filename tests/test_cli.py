"""The command line as a user meets it: help, JSON on stdout, one-line errors, cache management."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from dataset_helpers import extract_argv

from fsl_cache import api
from fsl_cache.cli import main
from fsl_cache.datasets import make_demo_dataset

COMMANDS = [
    [],
    ["extract"],
    ["cache"],
    ["cache", "ls"],
    ["cache", "info"],
    ["cache", "verify"],
    ["cache", "rm"],
    ["datasets"],
    ["models"],
    ["plan"],
    ["demo"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "main")
def test_help_answers_for_every_command(command):
    result = CliRunner().invoke(main, command + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_help_does_not_import_torch():
    code = (
        "import sys; from fsl_cache.cli import main\n"
        "try: main(['extract', '--help'])\nexcept SystemExit: pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory):
    root = make_demo_dataset(tmp_path_factory.mktemp("data") / "demo")
    cache = tmp_path_factory.mktemp("cache")
    args = [
        "extract",
        "--dataset",
        f"imagefolder:{root}",
        "--model",
        "fsl-tiny-rn",
        "--pretrained",
        "none",
        "--shots",
        "1,2",
        "--seeds",
        "1",
        "--workers",
        "0",
        "--cache-dir",
        str(cache),
        "--json",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return cache, json.loads(result.stdout.strip().splitlines()[-1])


def test_extract_json_has_the_contract_keys(cli_store):
    _, record = cli_store
    assert {"store", "fingerprint", "arrays", "images_per_s"} <= set(record)
    pooled = record["arrays"]["images/test/views/center/pooled"]
    assert set(pooled) == {"shape", "dtype", "bytes"} and pooled["dtype"] == "float16"
    assert record["images_per_s"] > 0 and record["random_init"] is True


def test_cache_ls_info_verify_rm(cli_store):
    cache, record = cli_store
    key = record["fingerprint"][:8]
    runner = CliRunner()
    listed = [
        json.loads(line)
        for line in runner.invoke(
            main, ["cache", "ls", "--cache-dir", str(cache), "--json"]
        ).stdout.splitlines()
    ]
    assert [e["key"] for e in listed] == [record["fingerprint"]] and listed[0]["finished"]
    info = json.loads(runner.invoke(main, ["cache", "info", key, "--cache-dir", str(cache), "--json"]).stdout)
    assert (
        info["fingerprint"] == record["fingerprint"] and "images/test/views/center/pooled" in info["arrays"]
    )
    verified = runner.invoke(main, ["cache", "verify", key, "--cache-dir", str(cache), "--json"])
    assert verified.exit_code == 0 and json.loads(verified.stdout)["ok"]
    ambiguous = runner.invoke(main, ["cache", "info", "zz", "--cache-dir", str(cache)])
    assert ambiguous.exit_code == 2 and "too short" in ambiguous.output


def test_verify_fails_on_a_corrupted_chunk(cli_store, tmp_path):
    import shutil

    cache, record = cli_store
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    chunk = next(p for p in copy.rglob("arrays.zarr/images/test/views/center/pooled/c/**/*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0x01
    chunk.write_bytes(bytes(data))
    result = CliRunner().invoke(
        main, ["cache", "verify", record["fingerprint"][:8], "--cache-dir", str(copy)]
    )
    assert result.exit_code == 1
    assert "images/test/views/center/pooled rows 0.." in result.output


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["extract", "--dataset", "eurosta", "--root", "."], 2, "Did you mean eurosat?"),
        (
            [
                "extract",
                "--dataset",
                "imagefolder:/does/not/exist",
                "--model",
                "fsl-tiny-rn",
                "--pretrained",
                "none",
            ],
            1,
            "/does/not/exist",
        ),
        (
            ["extract", "--dataset", "imagefolder:{demo}", "--model", "fsl-tiny-rnn", "--pretrained", "none"],
            2,
            "fsl-tiny-rn",
        ),
        (
            [
                "extract",
                "--dataset",
                "imagefolder:{demo}",
                "--model",
                "fsl-tiny-rn",
                "--pretrained",
                "none",
                "--for",
                "tip_adaptor",
            ],
            2,
            "Did you mean tip_adapter?",
        ),
        (
            [
                "extract",
                "--dataset",
                "imagefolder:{demo}",
                "--model",
                "fsl-tiny-rn",
                "--pretrained",
                "/nope/weights.pt",
            ],
            1,
            "/nope/weights.pt",
        ),
    ],
)
def test_user_mistakes_get_one_line_and_no_traceback(args, code, message, tmp_path):
    demo = make_demo_dataset(tmp_path / "demo")
    args = [a.replace("{demo}", str(demo)) for a in args] + ["--cache-dir", str(tmp_path / "c")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_tables_and_listings_go_to_stdout_for_pipes(cli_store):
    cache, record = cli_store
    for args in (["cache", "ls"], ["cache", "info", record["fingerprint"][:8]]):
        result = CliRunner().invoke(main, [*args, "--cache-dir", str(cache)])
        assert result.exit_code == 0 and record["fingerprint"][:16] in result.stdout, result.output
    listings = {("methods",): "safe_a", ("datasets",): "imagefolder", ("models",): "fsl-tiny-rn"}
    for args, expected in listings.items():
        result = CliRunner().invoke(main, list(args))
        assert result.exit_code == 0 and expected in result.stdout and result.stderr == "", result.output


def test_methods_at_80_columns_keeps_every_option_value_whole(monkeypatch):
    import io

    from rich.console import Console

    from fsl_cache import api, render

    out = io.StringIO()
    monkeypatch.setattr(render, "out_console", Console(file=out, width=80, color_system=None))
    infos = api.methods()
    render.show_methods(infos)
    lines = out.getvalue().splitlines()
    for info in infos:
        for option in info.options():
            text = f"{option.name}={option.default}"
            assert any(text in line for line in lines), f"{text} is split across lines"


def test_an_unwritable_or_non_folder_cache_or_runs_folder_says_so(cli_store, tmp_path):
    demo = make_demo_dataset(tmp_path / "demo")
    (tmp_path / "file").write_text("not a folder")
    cases = [(str(tmp_path / "file" / "cache"), "is a file, not a folder")]
    if not os.access("/sys", os.W_OK) or sys.platform == "linux":  # /sys refuses new folders, even to root
        cases.append(("/sys/fslcache", "is not writable"))
    for cache_dir, message in cases:
        result = CliRunner().invoke(main, extract_argv(demo, cache_dir, workers=0))
        assert result.exit_code == 1 and message in result.output and "disk space" not in result.output
        assert "--cache-dir" in result.output and "Traceback" not in result.output
    cache, record = cli_store
    dataset = api.cache_info(record["fingerprint"][:12], cache_dir=cache)["dataset"]["name"]
    fit = ["fit", "zero_shot", "--dataset", dataset, "--store", record["fingerprint"][:12]]
    fit += ["--shots", "1", "--seed", "1"]
    result = CliRunner().invoke(
        main, [*fit, "--cache-dir", str(cache), "--runs-dir", str(tmp_path / "file" / "r")]
    )
    assert (
        result.exit_code == 1 and "is a file, not a folder" in result.output and "--runs-dir" in result.output
    )
