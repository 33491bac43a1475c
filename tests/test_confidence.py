"""Confidence helpers: softmax, entropy, NLL, ECE, temperature scaling (hand-worked cases)."""
import numpy as np
import pytest

import cnn_utils as cu


def test_softmax_by_hand():
    # logits (0, ln 3): exp -> (1, 3), sum 4 -> (1/4, 3/4)
    np.testing.assert_allclose(cu.softmax([[0.0, np.log(3.0)]]), [[0.25, 0.75]], rtol=1e-12)
    # T = 2 halves the logits: (0, ln 3 / 2) -> (1, sqrt 3) / (1 + sqrt 3)
    s3 = np.sqrt(3.0)
    np.testing.assert_allclose(cu.softmax([0.0, np.log(3.0)], temperature=2.0),
                               [1 / (1 + s3), s3 / (1 + s3)], rtol=1e-12)
    # large logits do not overflow
    np.testing.assert_allclose(cu.softmax([[1000.0, 1000.0]]), [[0.5, 0.5]])


def test_entropy_by_hand():
    p = np.array([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    np.testing.assert_allclose(cu.entropy(p), [np.log(4), 0.0, np.log(2)], atol=1e-12)
    np.testing.assert_allclose(cu.entropy(p, base=2), [2.0, 0.0, 1.0], atol=1e-12)


def test_nll_by_hand():
    # label 1 has probability 3/4 -> -ln(3/4) = ln(4/3); label 0 has 1/4 -> ln 4
    z = np.array([[0.0, np.log(3.0)], [0.0, np.log(3.0)]])
    assert cu.negative_log_likelihood(z, [1, 0]) == pytest.approx((np.log(4 / 3) + np.log(4)) / 2)


def _binary(p0):
    """Rows (p0, 1 - p0)."""
    p0 = np.asarray(p0, dtype=float)
    return np.stack([p0, 1 - p0], axis=1)


def test_ece_perfectly_calibrated_exact_is_zero():
    # 10 predictions at confidence 0.9 of which 9 are right, 10 at confidence 0.7 of which
    # 7 are right: each bin's accuracy equals its mean confidence, so every gap is 0.
    probs = _binary([0.9] * 10 + [0.7] * 10)
    labels = np.array([0] * 9 + [1] + [0] * 7 + [1] * 3)
    assert cu.expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_perfectly_calibrated_sampled_is_about_zero():
    # confidence c uniform in (0.5, 1), right with probability exactly c
    rng = np.random.default_rng(0)
    c = rng.uniform(0.5, 1.0, size=200_000)
    right = rng.random(c.size) < c
    labels = np.where(right, 0, 1)
    assert cu.expected_calibration_error(_binary(c), labels) < 0.005
    # the same confidences, right only with probability c**4: clearly miscalibrated
    right4 = rng.random(c.size) < c ** 4
    assert cu.expected_calibration_error(_binary(c), np.where(right4, 0, 1)) > 0.1


def test_ece_miscalibrated_by_hand():
    # n_bins = 5: bins (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1].  N = 10 predictions:
    #  4 at confidence 0.90 (predict class 0), 3 right -> bin 5: acc 0.75, conf 0.90, gap 0.15
    #  2 at confidence 0.70 (predict class 1), 2 right -> bin 4: acc 1.00, conf 0.70, gap 0.30
    #  4 at confidence 0.55 (predict class 0), 1 right -> bin 3: acc 0.25, conf 0.55, gap 0.30
    # ECE = 4/10 * 0.15 + 2/10 * 0.30 + 4/10 * 0.30 = 0.06 + 0.06 + 0.12 = 0.24
    probs = _binary([0.9] * 4 + [0.3] * 2 + [0.55] * 4)
    labels = np.array([0, 0, 0, 1] + [1, 1] + [0, 1, 1, 1])
    ece, bins = cu.expected_calibration_error(probs, labels, n_bins=5, return_bins=True)
    assert ece == pytest.approx(0.24, abs=1e-12)
    np.testing.assert_array_equal(bins["counts"], [0, 0, 4, 2, 4])
    np.testing.assert_allclose(bins["accuracy"], [np.nan, np.nan, 0.25, 1.0, 0.75])
    np.testing.assert_allclose(bins["confidence"], [np.nan, np.nan, 0.55, 0.7, 0.9])
    np.testing.assert_allclose(bins["gap"], [0, 0, 0.3, 0.3, 0.15], atol=1e-12)
    np.testing.assert_allclose(bins["edges"], [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert bins["n"] == 10


def test_ece_bins_are_right_closed():
    # confidence exactly 1.0 goes to the last bin, 0.5 to bin (0.4, 0.5] of 10 bins
    bins = cu.calibration_bins(_binary([1.0, 0.5]), [0, 0], n_bins=10)
    np.testing.assert_array_equal(bins["counts"], [0, 0, 0, 0, 1, 0, 0, 0, 0, 1])


def _synthetic_logits(n, t_true, seed=0, classes=10):
    """Labels drawn from softmax(g); the 'model' reports g * t_true (so T = t_true undoes it)."""
    rng = np.random.default_rng(seed)
    g = rng.normal(0.0, 2.5, size=(n, classes))
    p = cu.softmax(g)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return g * t_true, labels


@pytest.mark.parametrize("t_true", [2.5, 0.5])
def test_fit_temperature_recovers_known_temperature(t_true):
    logits, labels = _synthetic_logits(20_000, t_true)
    assert cu.fit_temperature(logits, labels) == pytest.approx(t_true, rel=0.05)


def test_temperature_lowers_validation_nll_and_keeps_accuracy():
    logits, labels = _synthetic_logits(20_000, 3.0, seed=1)
    (z_val, y_val), (z_test, y_test) = cu.train_val_split(logits, labels, val_fraction=0.5)
    t = cu.fit_temperature(z_val, y_val)
    assert t > 1.5  # over-confident model -> T > 1
    nll_before = cu.negative_log_likelihood(z_val, y_val)
    nll_after = cu.negative_log_likelihood(z_val, y_val, t)
    assert nll_after < nll_before - 0.05
    # it is the minimum: a little either side is worse
    assert nll_after <= cu.negative_log_likelihood(z_val, y_val, t * 1.05)
    assert nll_after <= cu.negative_log_likelihood(z_val, y_val, t / 1.05)
    # and it carries over to the separate held-out half
    assert cu.negative_log_likelihood(z_test, y_test, t) < cu.negative_log_likelihood(z_test, y_test)
    # argmax (hence accuracy) does not move with T
    np.testing.assert_array_equal(cu.softmax(z_test, t).argmax(1), cu.softmax(z_test).argmax(1))
    ece_before = cu.expected_calibration_error(cu.softmax(z_test), y_test)
    ece_after = cu.expected_calibration_error(cu.softmax(z_test, t), y_test)
    assert ece_after < ece_before / 2


def test_confidence_groups_by_hand():
    # confidences 0.995 (right), 0.999 (wrong), 0.992 (wrong), 0.6 (right), 0.95 (right), 0.7 (wrong)
    probs = _binary([0.995, 0.999, 0.008, 0.6, 0.95, 0.3])
    labels = np.array([0, 1, 0, 0, 0, 0])
    g = cu.confidence_groups(probs, labels, high=0.99, low=0.9)
    np.testing.assert_array_equal(g["confident correct"], [0])
    np.testing.assert_array_equal(g["confident wrong"], [1, 2])  # most confident first
    np.testing.assert_array_equal(g["unsure correct"], [3])       # 0.95 is not below 0.9


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="sum to 1.*logits"):
        cu.expected_calibration_error(np.array([[2.0, 1.0]]), [0])
    with pytest.raises(ValueError, match=r"0\.\.1"):
        cu.expected_calibration_error(_binary([0.9]), [2])
    with pytest.raises(ValueError, match="shape"):
        cu.expected_calibration_error(_binary([0.9, 0.8]), [0])
    with pytest.raises(TypeError, match="integer"):
        cu.fit_temperature(np.zeros((2, 3)), [0.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        cu.softmax([[1.0, 2.0]], temperature=0)
    with pytest.raises(ValueError, match="n_bins"):
        cu.calibration_bins(_binary([0.9]), [0], n_bins=0)


def test_reliability_diagram_draws_the_bins():
    import matplotlib

    matplotlib.use("Agg")
    probs = _binary([0.9] * 4 + [0.3] * 2 + [0.55] * 4)
    labels = np.array([0, 0, 0, 1] + [1, 1] + [0, 1, 1, 1])
    bins = cu.calibration_bins(probs, labels, n_bins=5)
    fig = cu.plot_reliability_diagram([bins, bins], titles=["a", "b"])
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches[:5]]       # the accuracy bars come first
    np.testing.assert_allclose(heights, [0, 0, 0.25, 1.0, 0.75])
    assert "ECE = 24.00 %" in ax.texts[0].get_text()
    assert fig.axes[2].get_ylabel() == "predictions" and ax.get_ylabel() == "accuracy"
    with pytest.raises(ValueError, match="titles"):
        cu.plot_reliability_diagram([bins], titles=["a", "b"])


def test_format_probability_keeps_enough_digits():
    assert cu.format_probability(0.9997) == "99.97 %"
    assert cu.format_probability(0.99999) == "99.999 %"
    assert cu.format_probability(0.488) == "48.8 %"
    assert cu.format_probability(0.0004) == "0.04 %"
    assert cu.format_probability(np.float32(0.5), decimals=0) == "50 %"
    assert cu.format_probability(1.0) == "100.0 %" and cu.format_probability(0.0) == "0.0 %"
    # never reads 100 % (or 0 %) for a probability strictly between 0 and 1
    for p in (1 - 1e-12, 1e-12, np.nextafter(1.0, 0.0)):
        assert cu.format_probability(p) not in ("100.0 %", "0.0 %")
    for bad, err in ((1.2, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                     ([0.5], TypeError), ("0.5", TypeError)):
        with pytest.raises(err, match="p must be"):
            cu.format_probability(bad)


def test_format_probability_reads_as_a_bound_beyond_max_decimals():
    assert cu.format_probability(0.9999999996, max_decimals=4) == "over 99.9999 %"
    assert cu.format_probability(4e-10, max_decimals=4) == "under 0.0001 %"
    assert cu.format_probability(0.99997, max_decimals=4) == "99.997 %"          # fits: written out
    assert cu.format_probability(1.0, max_decimals=4) == "100.0 %"               # exactly 1 stays 1
    with pytest.raises(ValueError, match="max_decimals"):
        cu.format_probability(0.5, decimals=2, max_decimals=1)


def test_probability_decimals_three_for_a_flat_distribution():
    assert cu.probability_decimals(np.full(1000, 1e-3)) == 3          # random weights: every class near 0.1 %
    assert cu.probability_decimals([0.0099, 0.0098]) == 3
    assert cu.probability_decimals([0.01, 0.5]) == 1 and cu.probability_decimals([0.999]) == 1
    for bad in ([], [float("nan")]):
        with pytest.raises(ValueError, match="probs"):
            cu.probability_decimals(bad)


def test_format_correlation_never_minus_zero_and_shows_the_side_of_a_threshold():
    assert cu.format_correlation(0.4962) == "0.50"
    assert cu.format_correlation(0.4962, near=0.5) == "0.496"          # two decimals would hide "below 0.5"
    assert cu.format_correlation(-0.5049, near=0.5) == "-0.505"
    assert cu.format_correlation(0.47, near=0.5) == "0.47"             # clear of the threshold: two decimals
    assert cu.format_correlation(-0.004) == "0.00" and cu.format_correlation(-0.004, signed=True) == "0.00"
    assert cu.format_correlation(np.float32(0.42), signed=True) == "+0.42"
    assert cu.format_correlation(-0.76, signed=True) == "-0.76" and cu.format_correlation(-0.006) == "-0.01"
    for bad in (float("nan"), [0.3], "0.3", True):
        with pytest.raises(ValueError, match="r must be"):
            cu.format_correlation(bad)


def test_probability_bars_titles_keep_enough_digits():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = np.full((2, 10), 0.0003 / 9)
    p[0, 3] = 0.9997
    p[1] = 0.1
    fig = cu.plot_probability_bars(np.zeros((2, 28, 28)), p, np.array([3, 0]))
    titles = [ax.get_title() for ax in fig.axes]
    plt.close(fig)
    assert "max p = 99.97 %" in titles and "max p = 10.0 %" in titles
