"""The course's one reading of the sanity check and of cost (cnnlib.attribution)."""
import numpy as np
import pytest

import cnn_utils as cu


def test_sanity_verdict_reads_magnitude_of_the_mean():
    assert cu.sanity_verdict(0.49) == "passes"
    assert cu.sanity_verdict(0.5) == "fails"
    assert cu.sanity_verdict(-0.8) == "fails"          # a map that flips sign still follows the image
    assert cu.sanity_verdict(np.array([0.9, 0.0])) == "passes"   # mean 0.45
    assert cu.sanity_verdict(np.array([0.9, 0.2])) == "fails"    # mean 0.55
    assert cu.sanity_verdict(0.3, threshold=0.2) == "fails"


@pytest.mark.parametrize("rho, threshold", [(np.nan, None), ("high", None), (0.1, 0), (0.1, 2)])
def test_sanity_verdict_refuses_bad_input(rho, threshold):
    with pytest.raises((TypeError, ValueError)):
        cu.sanity_verdict(rho, threshold)


def test_sanity_borderline_is_within_the_margin_of_the_threshold():
    assert cu.SANITY_MARGIN == 0.1
    assert [cu.sanity_borderline(r) for r in (0.39, 0.41, 0.5, 0.59, 0.61)] == [False, True, True, True, False]
    assert cu.sanity_borderline(-0.45) and not cu.sanity_borderline(-0.35)          # magnitude, as the verdict
    assert cu.sanity_borderline(np.array([0.9, 0.1])) and not cu.sanity_borderline(np.array([0.9, 0.9]))
    assert cu.sanity_borderline(0.25, threshold=0.3, margin=0.06) and not cu.sanity_borderline(0.25, 0.3, 0.04)
    for bad in ((np.nan,), (0.5, None, -0.1), (0.5, None, 1.0), (0.5, 2.0)):
        with pytest.raises((TypeError, ValueError)):
            cu.sanity_borderline(*bad)


def test_median_seconds_counts_calls_and_returns_median():
    calls = []
    median, times = cu.median_seconds(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and median == float(np.median(times)) and median >= 0
    with pytest.raises(ValueError):
        cu.median_seconds(lambda: None, repeats=0)
    with pytest.raises(TypeError):
        cu.median_seconds(3)


def test_cost_words_ties_within_tolerance():
    words = cu.cost_words({"a": 1.0, "b": 1.2, "c": 3.0})
    assert words == {"cheapest": ["a", "b"], "dearest": ["c"], "ratio": 3.0}
    # ties at the dear end too: within 1.25x of the dearest is "about as dear"
    assert cu.cost_words({"a": 1.0, "b": 4.0, "c": 3.5, "d": 3.0})["dearest"] == ["b", "c"]
    assert cu.cost_words({"a": 1.0, "b": 1.3})["cheapest"] == ["a"]
    with pytest.raises(ValueError):
        cu.cost_words({"a": 1.0})
