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
    assert words == {"cheapest": ["a", "b"], "dearest": "c", "ratio": 3.0}
    assert cu.cost_words({"a": 1.0, "b": 1.3})["cheapest"] == ["a"]
    with pytest.raises(ValueError):
        cu.cost_words({"a": 1.0})
