"""Protocols: coop reads no test tensor before the final evaluation; paper reproduces each paper's quirks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fsl_cache import api
from fsl_cache.errors import UsageError
from fsl_cache.methods import list_methods
from fsl_cache.runs import fitting
from fsl_cache.runs.record import validation_of
from fsl_cache.splits.protocol import check_full_val, few_shot_indices, lpclip_indices
from fsl_cache.splits.sampling import sample_few_shot
from fsl_cache.store import FeatureStore
from fsl_cache.testing import make_synthetic_store

SYNTH = dict(dataset="synthetic", model="synthetic", pretrained="none", progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    make_synthetic_store(root, views={"tip": 21, "coop": 11})
    return root


@pytest.fixture
def store_reads(monkeypatch):
    """Every array name the store hands out, in order, with a FINAL marker where the final evaluation starts."""
    log: list[str] = []
    original_array, original_final = FeatureStore.array, fitting.final_evaluation

    def array(self, name):
        log.append(name)
        return original_array(self, name)

    def final_evaluation(*args, **kwargs):
        log.append("FINAL")
        return original_final(*args, **kwargs)

    monkeypatch.setattr(FeatureStore, "array", array)
    monkeypatch.setattr(fitting, "final_evaluation", final_evaluation)
    return log


def reads_before_final(log: list[str]) -> list[str]:
    return log[: log.index("FINAL")]


def assert_no_test_read_before_final(log: list[str]) -> None:
    early = [name for name in reads_before_final(log) if name.startswith("images/test/")]
    assert not early, f"test tensors read before the final evaluation: {early}"
    assert any(name.startswith("images/test/") for name in log[log.index("FINAL") :])


@pytest.mark.parametrize("name", ["zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f"])
def test_coop_protocol_reads_no_test_tensor_before_the_final_evaluation(name, cache, tmp_path, store_reads):
    api.fit(name, shots=2, seeds=[1], cache_dir=cache, runs_dir=tmp_path, **SYNTH)
    assert_no_test_read_before_final(store_reads)
    assert any(
        n.startswith("images/val_pool/") for n in reads_before_final(store_reads)
    )  # it did select on val


def test_the_read_log_catches_the_paper_protocol_test_oracle(cache, tmp_path, store_reads):
    (result,) = api.fit(
        "tip_adapter_f",
        shots=2,
        seeds=[1],
        protocol="paper",
        options={"epochs": 4},
        cache_dir=cache,
        runs_dir=tmp_path,
        **SYNTH,
    )
    assert any(n.startswith("images/test/") for n in reads_before_final(store_reads))
    record = json.loads((result.run_dir / "record.json").read_text())
    assert record["protocol"] == "paper" and "oracle" in record["protocol_notes"]
    assert record["selection"]["epoch_on"] == "test"
    # [CODE] main.py prints max(best oracle epoch, final): never below the final head's own test accuracy
    assert result.test_acc >= record["metrics"]["test"]["main"]["top1"]
    assert result.test_acc >= record["selection"]["epoch_acc"]


def test_coop_splits_are_the_stored_dassl_draws(cache, tmp_path):
    (result,) = api.fit("tip_adapter", shots=4, seeds=[3], cache_dir=cache, runs_dir=tmp_path, **SYNTH)
    record = json.loads((result.run_dir / "record.json").read_text())
    store = FeatureStore.open(next(cache.glob("*/*")))
    assert record["splits"]["train"]["split_index"] == store.read("splits/k4_s3/train").tolist()
    assert record["splits"]["val"]["split_index"] == store.read("splits/k4_s3/val").tolist()
    assert record["splits"]["test"]["n"] == len(store.read("images/test/labels"))
    store.close()


def test_paper_protocol_selects_on_the_full_val_split_when_the_store_has_it(tmp_path):
    full = make_synthetic_store(tmp_path / "full", full_val=True, views={"tip": 11})
    (result,) = api.fit(
        "tip_adapter",
        shots=2,
        seeds=[1],
        protocol="paper",
        cache_dir=full.parents[1],
        runs_dir=tmp_path / "runs",
        **SYNTH,
    )
    record = json.loads((result.run_dir / "record.json").read_text())
    assert record["splits"]["val"]["pool"] == "val_full" and record["splits"]["val"]["n"] == 4 * 8
    assert record["selection"]["search_n"] == 32
    (coop,) = api.fit(
        "tip_adapter", shots=2, seeds=[1], cache_dir=full.parents[1], runs_dir=tmp_path / "runs", **SYNTH
    )
    assert json.loads((coop.run_dir / "record.json").read_text())["splits"]["val"]["n"] == 4 * 2


def test_paper_protocol_without_full_val_falls_back_and_says_so(cache, tmp_path):
    (result,) = api.fit(
        "tip_adapter", shots=2, seeds=[1], protocol="paper", cache_dir=cache, runs_dir=tmp_path, **SYNTH
    )
    assert any("--full-val" in w for w in result.warnings)


def test_paper_protocol_on_imagenet_searches_alpha_beta_on_test(tmp_path):
    root = make_synthetic_store(tmp_path / "c", name="imagenet", views={"tip": 11})
    common = dict(
        dataset="imagenet",
        model="synthetic",
        pretrained="none",
        progress=False,
        shots=1,
        seeds=[1],
        cache_dir=root.parents[1],
        runs_dir=tmp_path / "runs",
    )
    (paper,) = api.fit("tip_adapter", protocol="paper", **common)
    (coop,) = api.fit("tip_adapter", **common)
    search_on = lambda r: json.loads((r.run_dir / "record.json").read_text())["selection"]["search_on"]  # noqa: E731
    assert search_on(paper) == "test" and search_on(coop) == "val"


def _official_lpclip_draw(train_label, val_label, num_shot, seed):
    """CoOp lpclip/linear_probe.py's sampling, transcribed (global np.random)."""
    np.random.seed(seed)
    selected, val_selected = [], []
    for label in np.unique(train_label):
        selected.extend(np.random.choice(np.where(train_label == label)[0], size=num_shot, replace=False))
    for label in np.unique(train_label):
        val_selected.extend(
            np.random.choice(
                np.where(val_label == label)[0], size={1: 1, 2: 2, 4: 4, 8: 4, 16: 4}[num_shot], replace=False
            )
        )
    return np.array(selected), np.array(val_selected)


@pytest.mark.parametrize("shots,seed", [(1, 1), (4, 2), (8, 3)])
def test_lpclip_sampling_matches_the_official_draw(shots, seed):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 5, 200), rng.integers(0, 5, 80)
    ours = lpclip_indices(train, val, shots=shots, seed=seed)
    ref = _official_lpclip_draw(train, val, shots, seed)
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])


def test_linear_probe_paper_protocol_uses_lpclip_sampling_on_full_pools(tmp_path):
    root = make_synthetic_store(tmp_path / "c", full_train=True, full_val=True, views={})
    (result,) = api.fit(
        "linear_probe",
        shots=2,
        seeds=[2],
        protocol="paper",
        cache_dir=root.parents[1],
        runs_dir=tmp_path / "runs",
        **SYNTH,
    )
    record = json.loads((result.run_dir / "record.json").read_text())
    store = FeatureStore.open(root)
    train, val = store.read("images/train_full/labels"), store.read("images/val_full/labels")
    expected = _official_lpclip_draw(train, val, 2, 2)
    assert record["splits"]["train"]["split_index"] == expected[0].tolist()
    assert record["splits"]["val"]["split_index"] == expected[1].tolist()
    # a few-shot split missing from full pools is re-drawn exactly as Dassl would
    train_idx, val_idx = few_shot_indices(store, shots=3, seed=5)
    drawn = sample_few_shot(train.tolist(), val.tolist(), shots=3, seed=5)
    assert train_idx.tolist() == list(drawn.train) and val_idx.tolist() == list(drawn.val)
    store.close()


def test_shots_above_what_a_class_has_are_refused(tmp_path):
    root = make_synthetic_store(tmp_path / "c", per_class=(3, 2, 4), shots=(4,), seeds=(1,))
    with pytest.raises(UsageError, match="--shots 4 is more than class 'class 0' has: 3 train image"):
        api.fit(
            "zero_shot", shots=4, seeds=[1], cache_dir=root.parents[1], runs_dir=tmp_path / "runs", **SYNTH
        )


def test_every_registered_method_declares_what_paper_changes():
    from fsl_cache.methods import get_method

    for name in list_methods():
        assert get_method(name).paper_protocol


# ---------------------------------------------------------------------------- validation regimes


def test_validation_full_selects_on_the_whole_val_split_and_is_keyed_apart(tmp_path):
    full = make_synthetic_store(tmp_path / "full", full_val=True, views={"tip": 11})
    common = dict(shots=2, seeds=[1], cache_dir=full.parents[1], runs_dir=tmp_path / "runs", **SYNTH)
    (whole,) = api.fit("tip_adapter", validation="full", **common)
    record = json.loads((whole.run_dir / "record.json").read_text())
    assert record["validation"] == "full" and record["selection"]["search_n"] == 4 * 8
    (kshot,) = api.fit("tip_adapter", **common)
    assert kshot.validation == "kshot" and kshot.run_dir != whole.run_dir
    assert json.loads((kshot.run_dir / "record.json").read_text())["selection"]["search_n"] == 4 * 2
    # an explicit regime equal to the protocol's own is the same run (keys recorded before regimes stay valid)
    (again,) = api.fit("tip_adapter", validation="kshot", **common)
    assert again.reused and again.run_dir == kshot.run_dir


def test_validation_full_is_refused_without_a_whole_val_split(cache, tmp_path):
    with pytest.raises(UsageError, match="lacks.*fsl-cache extract --dataset synthetic.*--full-val"):
        api.fit(
            "tip_adapter", shots=2, seeds=[1], validation="full", cache_dir=cache, runs_dir=tmp_path, **SYNTH
        )

    class NoValSplit:  # ImageNet in CoOp's layout: its "val" is the test set
        manifest = {"dataset": {"name": "imagenet", "split_sizes": {"train": 10, "val": 0, "test": 5}}}

    with pytest.raises(UsageError, match="imagenet has no val split.*test set"):
        check_full_val(NoValSplit())


def test_validation_none_drops_the_paper_test_oracle_and_reads_no_val(cache, tmp_path, store_reads):
    (result,) = api.fit(
        "tip_adapter_f",
        shots=2,
        seeds=[1],
        protocol="paper",
        validation="none",
        options={"epochs": 4},
        cache_dir=cache,
        runs_dir=tmp_path,
        **SYNTH,
    )
    assert_no_test_read_before_final(store_reads)
    assert not [n for n in store_reads if n.startswith("images/val")]
    record = json.loads((result.run_dir / "record.json").read_text())
    assert record["selection"]["epoch_on"] == "last" and record["validation"] == "none"


def test_validation_none_refuses_options_that_select_on_val(cache, tmp_path):
    with pytest.raises(UsageError, match="--validation none withholds"):
        api.fit(
            "tip_adapter",
            shots=2,
            seeds=[1],
            validation="none",
            options={"search": True},
            cache_dir=cache,
            runs_dir=tmp_path,
            **SYNTH,
        )


def test_records_from_before_regimes_read_as_their_regime():
    assert validation_of(
        {"method": "tip_adapter", "protocol": "coop", "splits": {"val": {"pool": "val_pool"}}}
    ) == ("kshot")
    paper = {"method": "tip_adapter", "protocol": "paper", "splits": {"val": {"pool": "val_full"}}}
    assert validation_of(paper) == "full"
    assert validation_of({**paper, "method": "linear_probe"}) == "kshot"  # lpclip draws its own K-shot val


def test_a_tuning_grid_cannot_run_without_validation(cache, tmp_path):
    with pytest.raises(UsageError, match="optuna.*--validation none"):
        api.grid(
            ["tip_adapter"],
            datasets=["synthetic"],
            shots=(1,),
            engine="optuna",
            validation="none",
            model="synthetic",
            pretrained="none",
            cache_dir=cache,
            runs_dir=tmp_path,
        )
