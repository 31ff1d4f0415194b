"""report.py's pure readers: forgetting at equal skill along hand-made checkpoint curves."""
import pytest

import report


def test_value_at_accuracy_interpolates_at_the_first_crossing():
    curve = [(0, 0.0, 90.0), (10, 20.0, 80.0), (20, 60.0, 40.0), (30, 50.0, 30.0), (40, 80.0, 20.0)]
    assert report.value_at_accuracy(curve, 40.0) == pytest.approx(60.0)   # halfway between 80 and 40
    assert report.value_at_accuracy(curve, 20.0) == pytest.approx(80.0)   # exactly at a checkpoint
    assert report.value_at_accuracy(curve, 55.0) == pytest.approx(45.0)   # first crossing, not the later one
    assert report.value_at_accuracy(curve, 70.0) == pytest.approx(30 - 10 * 20 / 30)  # the 50 -> 80 segment
    assert report.value_at_accuracy(curve, 90.0) is None                  # never reached
    assert report.value_at_accuracy(curve, 0.0) == 90.0                   # the base already has it


def test_matched_forgetting_reads_every_method_at_the_same_accuracy():
    curves = {"rft": [(0, 2.0, 90.0), (50, 30.0, 89.0), (100, 60.0, 88.0)],
              "sft": [(0, 2.0, 90.0), (10, 80.0, 50.0), (20, 100.0, 40.0)]}
    levels = report.common_levels(curves, count=2)
    assert levels == [31.0, 60.0]  # up to the smaller best accuracy (RFT's 60), above the base's 2
    table = report.matched_forgetting(curves, levels)
    assert table["rft"][60.0] == pytest.approx(2.0)
    # SFT at 31%: between (2, 90) and (80, 50): 90 - 40 * 29/78
    assert table["sft"][31.0] == pytest.approx(40 * 29 / 78)
    assert table["sft"][60.0] == pytest.approx(40 * 58 / 78)
    assert report.common_levels({"a": [(0, 5.0, 1.0)], "b": [(0, 5.0, 1.0), (1, 9.0, 0.0)]}) == []


def test_prior_score_is_the_mean_of_percentage_benchmarks():
    results = {"benchmarks": {"jigsaw": {"metrics": {"accuracy": 50.0}, "unit": "%", "headline": "accuracy"},
                              "pope": {"metrics": {"accuracy": 80.0}, "unit": "%", "headline": "accuracy"},
                              "mmstar": {"metrics": {"accuracy": 60.0}, "unit": "%", "headline": "accuracy"},
                              "mme": {"metrics": {"total": 2000.0}, "unit": "/2800", "headline": "total"}}}
    assert report.prior_score(results) == pytest.approx(70.0)
    assert report.jigsaw_accuracy(results) == 50.0
