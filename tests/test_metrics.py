"""Hand-computed checks of every score in lenpred.metrics."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from configuration_lenpred import make_bin_edges
from lenpred.metrics import (
    bin_index,
    bound_coverage,
    classification_scores,
    interval_coverage,
    kendall_within_sets,
    length_prediction_scores,
    noise_floor,
    nominal_coverage,
    per_group_mae,
    regression_scores,
    sanitise_lengths,
)


def test_bin_index_edges_and_open_last_bin():
    edges = make_bin_edges(500)  # [0, 500, ..., 3500]
    got = bin_index([0, 499.9, 500, 1200, 3499, 3500, 15000], edges)
    assert got.tolist() == [0, 0, 1, 2, 6, 7, 7]
    assert got.dtype.kind == "i"


def test_sanitise_clips_negatives_and_rejects_nan():
    assert sanitise_lengths([-3, 5]).tolist() == [0.0, 5.0]
    with pytest.raises(ValueError):
        sanitise_lengths([1.0, float("nan")])


def test_classification_scores_by_hand():
    # bin size 100: true lengths -> bins [0, 0, 1, 1, 2] (a negative mean is sanitised to 0 -> bin 0)
    true = [-4.0, 50.0, 150.0, 199.0, 250.0]
    pred = [0, 1, 1, 1, 0]
    s = classification_scores(true, pred, bin_size=100, max_tokens=300)
    assert s["accuracy"] == pytest.approx(3 / 5)
    # per class: c0 P=1/2 R=1/2 F=1/2 (support 2); c1 P=2/3 R=1 F=4/5 (support 2); c2 F=0 (support 1)
    assert s["f1"] == pytest.approx((2 * 0.5 + 2 * 0.8 + 1 * 0.0) / 5)


def test_classification_scores_perfect_and_length_mismatch():
    s = classification_scores([10, 700, 5000], [0, 1, 7], bin_size=500)
    assert s == {"accuracy": 1.0, "f1": 1.0}
    with pytest.raises(ValueError):
        classification_scores([10, 20], [0], bin_size=500)


def test_regression_scores_by_hand():
    s = regression_scores([100, 200, 300], [110, 180, 300])
    assert s["mae"] == pytest.approx((10 + 20 + 0) / 3)
    assert s["mse"] == pytest.approx((100 + 400 + 0) / 3)


def test_kendall_within_sets_weights_and_constant_group():
    true = [1, 2, 3, 4,   1, 2, 3,   5, 6,   9]
    pred = [1, 2, 3, 4,   7, 7, 7,   2, 1,   3]
    groups = ["a"] * 4 + ["b"] * 3 + ["c"] * 2 + ["d"]
    # a: perfectly concordant tau=1 (n=4); b: constant pred -> 0 (n=3); c: reversed pair tau=-1 (n=2);
    # d: a single item -> 0 (n=1). Weighted mean = (4*1 + 3*0 + 2*(-1) + 1*0) / 10
    assert kendall_within_sets(true, pred, groups) == pytest.approx(0.2)


def test_kendall_tau_b_with_ties_and_tuple_groups():
    # one group of 4 with a tie in pred: concordant 5, discordant 0, pred ties 1 -> tau_b = 5/sqrt(6*5)
    true, pred = [1, 2, 3, 4], [1, 1, 2, 3]
    groups = [("llm", "set")] * 4
    assert kendall_within_sets(true, pred, groups) == pytest.approx(5 / math.sqrt(30))


def test_interval_coverage_pooled_by_hand():
    samples = [np.array([8, 10, 12, 20]), np.array([0, 5]), None]
    # row 1: interval 10 ± 1*2 = [8, 12] -> 3 of 4 inside; row 2: 4 ± 1*1 = [3, 5] -> 1 of 2; row 3 skipped
    assert interval_coverage(samples, mean=[10, 4, 99], std=[2, 1, 1], k=1) == pytest.approx(4 / 6)
    # k=5: row 1 [0, 20] all 4; row 2 [-1, 9] both -> 6/6
    assert interval_coverage(samples, mean=[10, 4, 99], std=[2, 1, 1], k=5) == pytest.approx(1.0)
    # an unknown (NaN) std covers nothing
    assert interval_coverage(samples, mean=[10, 4, 0], std=[float("nan"), 1, 1], k=1) == pytest.approx(1 / 6)


def test_nominal_coverage():
    assert nominal_coverage(1) == pytest.approx(0.6827, abs=1e-4)
    assert nominal_coverage(2) == pytest.approx(0.9545, abs=1e-4)


def test_bound_coverage_scalar_and_per_row():
    samples = [[1, 2, 3], [10, 20], []]
    assert bound_coverage(samples, 2) == pytest.approx(2 / 5)
    assert bound_coverage(samples, [3, 15, 0]) == pytest.approx(4 / 5)


def test_noise_floor_two_rows_by_hand():
    rows = pd.DataFrame({"output_sizes": [[10, 20, 30], [5, 5], None]})
    nf = noise_floor(rows)
    # row 1: mean 20, |dev| = 10,0,10 -> MAE 20/3, MSE 200/3, std_ddof1 = 10
    # row 2: all equal -> 0, 0, 0
    assert nf["single_sample_mae"] == pytest.approx((20 / 3 + 0) / 2)
    assert nf["single_sample_mse"] == pytest.approx((200 / 3 + 0) / 2)
    assert nf["mean_sampling_mae"] == pytest.approx((10 / math.sqrt(3) * math.sqrt(2 / math.pi) + 0) / 2)
    assert nf["n_rows"] == 2
    # the same from plain lists
    assert noise_floor([[10, 20, 30], [5, 5]])["single_sample_mae"] == pytest.approx(10 / 3)


def test_per_group_mae_by_hand():
    got = per_group_mae([10, 20, 30, 40], [12, 20, 25, 50], ["x", "x", "y", "y"])
    assert got == {"x": pytest.approx(1.0), "y": pytest.approx(7.5)}
    assert list(got) == ["x", "y"]


def test_length_prediction_scores_by_hand():
    samples = [[100, 140], [700, 520], [35, 60]]  # means 120, 610, 47.5; stds 20, 90, 12.5
    s = length_prediction_scores([120, 610, 47.5], [120, 600, 40], samples=samples, true_std=[20, 90, 12.5],
                                 predicted_std=[10, 90, 20], predicted_bound=[130, 800, 50], bin_size=500)
    assert s["n"] == 3
    assert s["mae_mean"] == pytest.approx(17.5 / 3) and s["mse_mean"] == pytest.approx((100 + 56.25) / 3)
    assert s["mae_std"] == pytest.approx((10 + 0 + 7.5) / 3)
    assert s["accuracy"] == 1.0 and s["f1"] == 1.0  # every mean and prediction in its true 500-token bin
    assert s["kendall_tau_b"] == pytest.approx(1.0)
    assert s["bound_coverage"] == pytest.approx(4 / 6)  # 140 > 130, 60 > 50
    assert s["coverage_1sigma"] == pytest.approx(3 / 6)  # in: 520 (600 ± 90), 35 and 60 (40 ± 20); out: 100, 140, 700
    # what was not given is None, and bins given are scored instead of the bins of the mean
    bare = length_prediction_scores([120, 610, 47.5], [120, 600, 40], predicted_bins=[0, 0, 0])
    assert bare["accuracy"] == pytest.approx(2 / 3)
    assert bare["mae_std"] is None and bare["bound_coverage"] is None and bare["coverage_1sigma"] is None


@pytest.mark.parametrize("kwargs, message", [
    ({"predicted_mean": [1.0]}, "2 true lengths but 1 predictions"),
    ({"predicted_mean": [1.0, float("nan")]}, "non-finite"),
    ({"predicted_std": [1.0]}, "predicted_std has 1 values"),
    ({"groups": ["a"]}, "groups has 1 keys"),
    ({"samples": [[1.0]]}, "samples has 1 rows"),
])
def test_length_prediction_scores_rejects_mismatched_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        length_prediction_scores([10.0, 20.0], **{"predicted_mean": [10.0, 20.0], **kwargs})


def test_the_evaluate_module_loads_offline_and_rejects_bad_references(tmp_path, monkeypatch):
    import evaluate  # the Hugging Face package, though this repository's evaluate.py comes first on the path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hasattr(evaluate, "load") and "site-packages" in evaluate.__file__
    metric = evaluate.load(str(Path(__file__).resolve().parents[1] / "metrics" / "length_prediction"))
    got = metric.compute(predictions=[120.0, 600.0], references=[[100, 140], [700, 520]], groups=["a", "a"])
    assert got["mae_mean"] == pytest.approx(5.0) and got["kendall_tau_b"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="without any answer length"):
        metric.compute(predictions=[1.0, 2.0], references=[[3.0], []])
    with pytest.raises(ValueError, match="negative or non-finite"):
        metric.compute(predictions=[1.0, 2.0], references=[[3.0], [-1.0]])
