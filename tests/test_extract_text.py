"""Stage one's text side: raw per-template embeddings beside the class weights, and APE's --descriptions file."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from dataset_helpers import write_images
from safetensors.torch import load_file

from fsl_cache import api
from fsl_cache.backbones import load_backbone
from fsl_cache.backbones.backbone import class_weights
from fsl_cache.cli import main
from fsl_cache.errors import UsageError
from fsl_cache.methods import get_method
from fsl_cache.runs.locate import missing_arrays
from fsl_cache.store import FeatureStore
from fsl_cache.store_extension import Extension, complete_store

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(model="fsl-tiny-rn", pretrained="none", shots=(1,), seeds=(1,), workers=0, progress=False)
SENTENCES = {
    "class0": ["a reddish square tile.", "red noise on a blue field."],
    "class1": ["a green patch."],
    "class2": ["a bluish picture.", "blue noise.", "mostly blue pixels with some red."],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("d"))


def read(path, name):
    store = FeatureStore.open(path)
    try:
        return torch.from_numpy(store.read(name))
    finally:
        store.close()


def test_fit_adds_raw_per_template_embeddings_that_reproduce_the_stored_class_weights(data, tmp_path):
    dataset, cache = f"imagefolder:{data}", tmp_path / "c"
    old = api.extract(dataset, cache_dir=cache, for_methods=["zero_shot"], **TINY)  # a store from before
    store = FeatureStore.open(old.store)
    try:
        assert "text_raw/coop" in missing_arrays(store, get_method("clap"), dataset=dataset)
        assert missing_arrays(store, get_method("zero_shot"), dataset=dataset) == []
    finally:
        store.close()

    model = {k: TINY[k] for k in ("model", "pretrained")}
    added = complete_store(
        cache,
        dataset=dataset,
        store=None,
        methods=["ape", "clap"],
        extension=Extension(progress=False),
        **model,
    )
    assert {"text_raw/tip", "text_raw/coop"} <= set(added.new_arrays) and "text/tip" not in added.new_arrays
    templates = json.loads((old.store / "manifest.json").read_text())["dataset"]["templates"]
    for name in ("tip", "coop"):
        raw = read(old.store, f"text_raw/{name}")
        assert raw.shape == (3, len(templates[name]), 64) and raw.dtype == torch.float32
        assert not torch.allclose(raw.norm(dim=-1), torch.ones(()))  # as the text encoder returns them
        weights = read(old.store, f"text/{name}")
        assert (class_weights(raw) - weights).abs().max() <= 1e-5

    # [CODE] the CLAP repo's probes start from the mean of the raw embeddings: with lr 0 they stay there
    (run,) = api.fit(
        "zs_lp", dataset=dataset, shots=1, seeds=[1], options={"epochs": 1, "lr": 0.0, "warmup_lr": 0.0},
        cache_dir=cache, runs_dir=tmp_path / "r", progress=False, **model,
    )  # fmt: skip
    prototypes = load_file(str(run.run_dir / "head.safetensors"))["prototypes"]
    assert torch.allclose(prototypes, read(old.store, "text_raw/coop").mean(1), atol=1e-6)


def described_store(data, cache, file=None):
    return api.extract(f"imagefolder:{data}", cache_dir=cache, for_methods=["ape"], descriptions=file, **TINY)


def test_descriptions_pool_with_the_templates_as_apes_code_and_make_another_store(data, tmp_path):
    file = tmp_path / "cupl.json"
    file.write_text(json.dumps(SENTENCES))
    cache, runs = tmp_path / "c", tmp_path / "r"
    plain, described = described_store(data, cache), described_store(data, cache, file)
    assert plain.fingerprint != described.fingerprint
    record = json.loads((described.store / "manifest.json").read_text())["descriptions"]
    assert record["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest() and record["sentences"] == 6
    # fit extends the described store with its own file (same key), not a plain one
    added = complete_store(
        cache, dataset=f"imagefolder:{data}", model="fsl-tiny-rn", pretrained="none",
        store=described.fingerprint[:16], methods=["zs_lp"], extension=Extension(progress=False),
    )  # fmt: skip
    assert added.store == described.store and "text_raw/coop" in added.new_arrays

    # [CODE] APE extract_text_feature: templates + sentences, each normalised, averaged together, normalised
    backbone = load_backbone("fsl-tiny-rn", "none")
    manifest = json.loads((described.store / "manifest.json").read_text())
    tip = manifest["dataset"]["templates"]["tip"]
    expected = []
    for name in manifest["dataset"]["classnames"]:
        texts = [t.format(name) for t in tip] + SENTENCES[name]
        expected.append(F.normalize(F.normalize(backbone.encode_texts(texts), dim=-1).mean(0), dim=0))
    expected = torch.stack(expected)

    heads = {}
    for result in (plain, described):
        (run,) = api.fit(
            "ape", dataset=f"imagefolder:{data}", shots=1, seeds=[1], store=result.fingerprint[:16],
            options={"search": False}, cache_dir=cache, runs_dir=runs, progress=False,
            model="fsl-tiny-rn", pretrained="none",
        )  # fmt: skip
        selection = json.loads((run.run_dir / "record.json").read_text())["selection"]
        heads[result is described] = (load_file(str(run.run_dir / "head.safetensors"))["text"], selection)
    text, selection = heads[True]
    assert (text - expected).abs().max() <= 1e-5
    assert selection["text_source"] == "templates:tip+descriptions"
    assert selection["descriptions_sha256"] == record["sha256"]
    plain_text, plain_selection = heads[False]
    assert plain_selection["text_source"] == "templates:tip"
    assert (plain_text - read(plain.store, "text/tip")).abs().max() <= 1e-6
    assert (plain_text - text).abs().max() > 1e-3


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not JSON"),
        ('["a", "b"]', "expected a JSON object"),
        (
            json.dumps({**SENTENCES, "class1": "a green patch."}),
            "class 'class1' must map to a non-empty list",
        ),
        (json.dumps({"class0": ["x"], "class2": ["y"]}), "no sentences for 1 of 3 classes: class1"),
    ],
)
def test_a_bad_description_file_is_refused_naming_the_file_and_the_problem(data, tmp_path, content, problem):
    file = tmp_path / "bad.json"
    file.write_text(content)
    with pytest.raises(UsageError, match=f"--descriptions {file}") as err:
        described_store(data, tmp_path / "c", file)
    assert problem in str(err.value)
    assert not list((tmp_path / "c").glob("*/*/manifest.json"))  # refused before anything is written


def test_cli_extract_takes_descriptions_and_names_a_missing_file(data, tmp_path):
    args = ["extract", "--dataset", f"imagefolder:{data}", "--model", "fsl-tiny-rn", "--pretrained", "none"]
    args += ["--shots", "1", "--seeds", "1", "--workers", "0", "--for", "zero_shot"]
    args += ["--cache-dir", str(tmp_path / "c")]
    missing = CliRunner().invoke(main, [*args, "--descriptions", str(tmp_path / "nope.json")])
    assert missing.exit_code == 2 and "nope.json: cannot read it" in missing.stderr  # a usage error
