"""The zero-shot logit scale comes from the checkpoint (``logit_scale.exp()``), 100 for random weights and the
tiny test models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from dataset_helpers import write_images

from fsl_cache import api
from fsl_cache.backbones import load_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stores_and_records_use_the_checkpoint_scale(tmp_path, monkeypatch):
    random = load_backbone("fsl-tiny-rn", "none")
    assert random.logit_scale == 100.0  # not open_clip's untrained init, 1/0.07
    state = random.model.state_dict()
    state["logit_scale"] = torch.tensor(math.log(50.0))
    torch.save(state, tmp_path / "tiny-50.pt")
    assert (
        load_backbone("fsl-tiny-rn", str(tmp_path / "tiny-50.pt")).logit_scale == 100.0
    )  # a tiny test model
    monkeypatch.setattr(
        "fsl_cache.backbones.backbone.TINY_MODELS", ()
    )  # from here on, as any CLIP checkpoint
    data, cache = write_images(tmp_path / "d"), tmp_path / "c"
    common = dict(dataset=f"imagefolder:{data}", model="fsl-tiny-rn", cache_dir=cache, progress=False)
    api.extract(pretrained=str(tmp_path / "tiny-50.pt"), shots=(1,), **common)
    (manifest_path,) = cache.glob("*/*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["zs_scale"] == pytest.approx(50.0) and manifest["zs_scale_from"].startswith("checkpoint")
    for method in ("zero_shot", "tip_adapter"):
        (run,) = api.fit(
            method,
            pretrained=str(tmp_path / "tiny-50.pt"),
            shots=1,
            seeds=[1],
            runs_dir=tmp_path / "r",
            **common,
        )
        record = json.loads((run.run_dir / "record.json").read_text())
        assert record["logit_scale"]["value"] == pytest.approx(50.0)
