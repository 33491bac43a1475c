"""Notebook 01 runs top to bottom in a fresh kernel in fast mode, for both datasets; the
tests read the values it records (``cnn_utils.record``), not its printed sentences."""
import numpy as np
import pytest

import cnn_utils
from conftest import count_images, notebook_values, run_notebook

pytestmark = [pytest.mark.notebook]


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_notebook_01_loads_shipped_model(dataset, tmp_path):
    nb = run_notebook("01_train_mnist_cnn.ipynb", tmp_path, DATASET=dataset)
    v = notebook_values(nb)
    info = cnn_utils.model_info(dataset)
    assert v["test_accuracy"] == pytest.approx(info["test_accuracy"], abs=2e-4)
    assert v["test_errors"] == round((1 - v["test_accuracy"]) * 10_000)
    assert v["total_parameters"] == 130_890 and 0.5 < v["dense1_share"] < 0.6
    assert 1.0 <= v["class_count_ratio"] < 1.5
    # the shipped history: every epoch, the best validation epoch among them
    assert v["epochs"] == info["epochs"] and 1 <= v["best_val_epoch"] <= v["epochs"]
    assert 0 <= v["val_above_train_epochs"] <= v["epochs"]
    # confusions: five off-diagonal pairs, largest first, each counted at most once per class
    counts = [n for _, _, n in v["top_confusions"]]
    assert len(counts) == 5 and counts == sorted(counts, reverse=True) and counts[-1] > 0
    assert all(true != pred for true, pred, _ in v["top_confusions"])
    assert counts[0] <= v["most_class_errors"] <= v["test_errors"]
    assert 0 < v["worst_class_errors"] <= v["most_class_errors"] and 0 < v["worst_class_error_rate"] < 1
    assert 1 <= v["pairs_for_half_of_mistakes"] <= 90
    if dataset == "fashion_mnist":     # a few look-alike pairs (shirts, tops, pullovers, coats) hold half the mistakes
        assert v["pairs_for_half_of_mistakes"] <= 10
    a, b, ab, ba = v["asymmetric_pair"]
    assert a != b and ab > ba
    if dataset == "fashion_mnist":
        assert v["worst_class"] == "Shirt"
        assert set(v["worst_class_predicted_as"]) <= {"T-shirt/top", "Pullover", "Coat"}
    # confident predictions are right more often, yet some mistakes are confident
    assert v["accuracy_over_99"] > v["accuracy_under_99"] and v["mistakes_over_99"] > 0
    check_contrasting_runs(v, info)
    assert count_images(nb) == 5  # samples, curves, the three runs' curves, confusion matrix, mistakes


def test_notebook_01_trains_a_new_model(tmp_path):
    nb = run_notebook("01_train_mnist_cnn.ipynb", tmp_path, TRAIN_NEW_MODEL=True,
                      MODEL_OUT_DIR=str(tmp_path / "models"))
    v = notebook_values(nb)
    assert v["epochs"] == 1
    assert v["test_accuracy"] > 0.90  # one epoch on 6,000 images
    assert v["reloaded_same_scores"] is True
    assert v["fit_verdicts"]["course"] == "one epoch"
    assert (tmp_path / "models" / "mnist_cnn.keras").is_file()


def _expected_verdict(h, reference):
    """The section's rule, re-applied to the recorded curves."""
    loss, val_loss, acc = (np.array(h[k]) for k in ("loss", "val_loss", "accuracy"))
    best = int(np.argmin(val_loss)) + 1
    rise = val_loss[-1] / val_loss.min() - 1
    if best < len(loss) and rise >= 0.10 and loss[-1] < loss[best - 1]:
        return "over-fitting"
    if acc[-1] <= reference - 0.10:
        return "under-fitting"
    if best < len(loss):
        return "starting to over-fit" if rise >= 0.02 else "flat"
    start = len(loss) - 1 - len(loss) // 2      # levelled off: the last half of the epochs
    if len(loss) >= 4 and 1 - val_loss[-1] / val_loss[start] < 0.05 and 1 - loss[-1] / loss[start] > 0.20:
        return "levelling off"
    return "neither"


def check_contrasting_runs(v, info):
    """Section 3's two contrasting runs: each verdict is the one its curves give, and the two runs
    show what they are built to show (200 images over-fit, the tiny model under-fits)."""
    ref = v["contrast_reference_accuracy"]
    assert ref == pytest.approx(info["history"]["accuracy"][-1])
    over, under = v["contrast_histories"]["over"], v["contrast_histories"]["under"]
    assert len(over["loss"]) == 30 and len(under["loss"]) == 5
    verdicts = v["fit_verdicts"]
    assert verdicts["over"] == _expected_verdict(over, ref) == "over-fitting"
    assert verdicts["under"] == _expected_verdict(under, ref) == "under-fitting"
    # MNIST's validation loss still falls; Fashion-MNIST's has levelled off since epoch 8 (0.232 -> 0.226)
    expected_course = "neither" if info["dataset"] == "mnist" else "levelling off"
    assert verdicts["course"] == _expected_verdict(info["history"], ref) == expected_course
