"""Confusion analytics (fsl_cache.evaluation.confusion): top pairs, CAPT's resolved-pairs measure, records."""

import pytest
import torch

from fsl_cache.evaluation.confusion import (
    analytics_from_record,
    confusion_analytics,
    resolved_pairs,
    top_confused_pairs,
)


def test_top_pairs_rank_off_diagonal_cells_by_count():
    cm = [[5, 3, 0], [1, 7, 4], [0, 3, 2]]
    pairs = top_confused_pairs(cm, ["a", "b", "c"], top=3)
    assert [(p["true"], p["pred"], p["count"]) for p in pairs] == [(1, 2, 4), (0, 1, 3), (2, 1, 3)]
    assert pairs[0]["true_name"] == "b" and pairs[0]["rate"] == pytest.approx(100 * 4 / 12)
    assert top_confused_pairs([[2, 0], [0, 2]]) == []


def test_resolved_pairs_on_a_hand_made_example():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    zs = torch.tensor([1, 1, 0, 0, 1, 1, 2, 0])  # zero-shot wrong on images 0, 1, 3, 5, 7
    pred = torch.tensor([0, 1, 0, 1, 0, 2, 2, 0])  # fixes 0, 3, 5; keeps 1, 7 wrong; breaks image 4
    out = resolved_pairs(pred, zs, labels, num_classes=3)
    assert out["confusable"] == 5 and out["resolved"] == 3 and out["resolved_share"] == pytest.approx(60.0)
    assert out["introduced"] == 1
    # zero-shot cells (0,1)=2, (1,0)=1, (2,1)=1, (2,0)=1; method: (0,1)=1, (1,0)=1, (2,1)=0, (2,0)=1
    assert out["pairs"] == 4 and out["pairs_cleared"] == 1 and out["pairs_reduced"] == 2


def test_resolved_share_is_none_when_zero_shot_makes_no_error():
    y = torch.tensor([0, 1])
    assert resolved_pairs(y, y, y, num_classes=2)["resolved_share"] is None


def test_analytics_carry_zero_shot_pairs_and_per_pair_resolution():
    labels = torch.tensor([0, 0, 1, 1])
    zs, pred = torch.tensor([1, 1, 1, 1]), torch.tensor([0, 1, 1, 1])
    out = confusion_analytics(pred, labels, num_classes=2, classnames=["cat", "dog"], zs_pred=zs)
    assert out["zero_shot"]["top1"] == pytest.approx(50.0)
    (pair,) = out["per_pair"]
    assert (
        pair["true_name"],
        pair["pred_name"],
        pair["zero_shot_count"],
        pair["method_count"],
        pair["resolved"],
    ) == ("cat", "dog", 2, 1, 1)
    assert confusion_analytics(pred, labels, num_classes=2)["top_pairs"][0]["count"] == 1


def test_analytics_from_an_old_record_fall_back_to_the_stored_matrix():
    record = {"metrics": {"headline": "main", "test": {"main": {"confusion": [[3, 1], [2, 4]]}}}}
    out = analytics_from_record(record)
    assert out["confusion"] == [[3, 1], [2, 4]] and out["resolved"] is None
    assert [(p["true"], p["pred"]) for p in out["top_pairs"]] == [(1, 0), (0, 1)]
