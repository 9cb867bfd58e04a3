"""``fsl-cache plan``: store sizes from CoOp split files alone (no images, no weights)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from dataset_helpers import shared_dir

from fsl_cache.cli import main

ESTIMATED = {"imagenet", "food101", "fgvc_aircraft", "sun397"}  # no split file in shared/data/coop_splits
EUROSAT = {"test": 8100, "train_pool": 860, "val_pool": 434}  # 10 classes; union of 5 shots × 3 seeds


def plan(*args: str) -> list[dict]:
    splits = shared_dir() / "data" / "coop_splits"
    result = CliRunner().invoke(main, ["plan", "--splits", str(splits), "--json", *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_all_datasets_for_ldc_rn50_from_split_files_alone():
    *rows, total = plan("--dataset", "all", "--for", "ldc", "--model", "RN50")
    by_name = {r["dataset"]: r for r in rows}
    assert len(rows) == 11 and not any(r["missing"] for r in rows)
    assert {n for n, r in by_name.items() if r["estimated"]} == ESTIMATED
    assert "published split sizes" in by_name["food101"]["source"]
    food = by_name["food101"]  # 101 classes: 500 / 200 / 300 images each; shots 1-16 × 3 seeds draw ≤ 93 each
    assert food["pools"]["test"] == 30_300 and 16 * 101 < food["pools"]["train_pool"] <= 93 * 101
    # the published totals are those of the split files that are here (caltech101 counted from its file)
    assert sum(by_name["caltech101"]["pools"].values()) <= 4_128 + 1_649 + 2_465
    eurosat = by_name["eurosat"]
    assert eurosat["pools"] == EUROSAT and eurosat["classes"] == 10
    assert eurosat["encoded"] == sum(EUROSAT.values()) + 10 * EUROSAT["train_pool"]  # 10 ldc views
    # METHODS §3.1: LDC-RN50 is 3,012,608 bytes per view (4 maps + pooled), + zs logits, aug params, labels
    per_view = eurosat["raw_bytes"] / eurosat["encoded"]
    assert 3_012_608 < per_view < 3_012_608 + 200
    assert eurosat["expected_bytes"] < 0.6 * eurosat["raw_bytes"]  # the maps are zstd-compressed
    assert total["raw_bytes"] == sum(r["raw_bytes"] for r in rows)
    assert total["missing"] == [] and set(total["estimated"]) == ESTIMATED


def test_published_split_sizes_are_those_of_the_split_files_here():
    from fsl_cache.datasets.coop import LAYOUTS, read_split_json
    from fsl_cache.extraction.sizing import PUBLISHED_SPLITS

    here = list((shared_dir() / "data" / "coop_splits").glob("split_zhou_*.json"))
    assert len(here) == 7
    for name, layout in LAYOUTS.items():
        path = shared_dir() / "data" / "coop_splits" / str(layout.split_file)
        if path in here:
            splits, _ = read_split_json(path, num_classes=layout.num_classes)
            assert tuple(len(splits[s]) for s in ("train", "val", "test")) == PUBLISHED_SPLITS[name], name


@pytest.mark.parametrize(
    ("model", "method", "per_view"),
    [
        ("ViT-B-16", "ldc", 1_211_392),
        ("RN50", "safe", 200_704 + 2_048),
        ("ViT-B-16", "safe", 302_592 + 1_024),
    ],
)
def test_bytes_per_view_match_the_methods_table(model, method, per_view):
    """METHODS §3.1 bytes per image per view (fp16) for the heavy methods; view counts per method."""
    (eurosat, _) = plan("--dataset", "eurosat", "--for", method, "--model", model)
    assert per_view < eurosat["raw_bytes"] / eurosat["encoded"] < per_view + 200
    uncompressed = model.startswith("ViT")  # dense ViT tokens are stored without a codec
    assert (eurosat["expected_bytes"] == eurosat["raw_bytes"]) is uncompressed


def test_views_per_policy_seeds_and_int8_maps_shrink_the_plan():
    (full, _) = plan("--dataset", "eurosat", "--for", "ldc", "--model", "RN50")
    (small, _) = plan(
        "--dataset", "eurosat", "--for", "ldc", "--model", "RN50", "--views", "ldc=5", "--seeds", "1"
    )
    train = small["pools"]["train_pool"]
    assert train < full["pools"]["train_pool"]  # one seed's picks only
    assert small["encoded"] == small["pools"]["test"] + small["pools"]["val_pool"] + train + 5 * train
    (int8, _) = plan("--dataset", "eurosat", "--for", "ldc", "--model", "RN50", "--dense-precision", "int8")
    # one byte per map value instead of two, plus a float32 scale per channel: LDC-RN50 is almost all maps
    assert int8["encoded"] == full["encoded"] and 0.5 < int8["raw_bytes"] / full["raw_bytes"] < 0.51


def test_views_for_a_policy_no_method_uses_is_refused():
    splits = shared_dir() / "data" / "coop_splits"
    args = ["plan", "--splits", str(splits), "--dataset", "eurosat", "--for", "ldc", "--views", "tip=5"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "'tip'" in result.output and "ldc" in result.output


def test_method_options_that_add_a_tap_are_planned_and_typos_refused():
    """capt -o visual_depth=9 stores the ViT input tokens (197 × 768 fp16) of every view it prompts: the
    center view of each pool and the 21 coop views (view 0 centered) of each train image."""
    (text_only, _) = plan("--dataset", "eurosat", "--for", "capt", "--model", "ViT-B-16")
    (visual, _) = plan("--dataset", "eurosat", "--for", "capt", "--model", "ViT-B-16", "-o", "visual_depth=9")
    views = sum(visual["pools"].values()) + 21 * visual["pools"]["train_pool"]
    assert visual["encoded"] == text_only["encoded"] == views  # the same forward passes: one more tap kept
    assert visual["raw_bytes"] - text_only["raw_bytes"] == views * 197 * 768 * 2
    splits = shared_dir() / "data" / "coop_splits"
    for option, said in [
        ("visual_dpth=9", "Did you mean visual_depth"),
        ("coop.n_ctx=2", "scoped to 'coop'"),
    ]:
        args = ["plan", "--splits", str(splits), "--dataset", "eurosat", "--for", "capt", "-o", option]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and said in result.output, result.output
