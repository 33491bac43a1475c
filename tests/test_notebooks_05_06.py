"""Notebooks 05 (prediction confidence) and 06 (feature space) run in FAST mode; key outputs checked."""
import re

import pytest

import cnn_utils
from conftest import count_images, find_number, notebook_text, run_notebook

pytestmark = pytest.mark.notebook


def _before_after(text, label):
    """The two numbers of a printed 'label a -> b' line."""
    m = re.search(re.escape(label) + r"\s*(-?[0-9.]+)\s*%?\s*->\s*(-?[0-9.]+)", text)
    assert m, f"{label!r} with 'before -> after' not found in the notebook output"
    return float(m.group(1)), float(m.group(2))


def _require(dataset):
    if not cnn_utils.model_path(dataset).is_file():
        pytest.skip(f"saved_models/{dataset}_cnn.keras is not on this branch yet "
                    f"(rebuild with `python -m course train --dataset {dataset}`)")
    for name in cnn_utils.DATASETS:  # 05 needs the other dataset for its out-of-distribution section
        if not any(p.is_file() for p in cnn_utils.dataset_search_paths(name)):
            pytest.skip(f"{name}.npz not found (set CNN_COURSE_DATA to a folder holding it)")


def _check_05(nb, dataset):
    text = notebook_text(nb)
    assert "Traceback" not in text and "nan %" not in text.lower()
    n = 10000
    acc = find_number(text, "Test accuracy (whole test set, 10000 images):")
    assert acc == pytest.approx(100 * cnn_utils.model_info(dataset)["test_accuracy"], abs=0.011)
    mistakes = find_number(text, "Mistakes:")
    assert mistakes == pytest.approx(n * (1 - acc / 100), abs=0.6)
    # the three groups cover the whole test set, not a slice, and are consistent with the mistakes
    right_sure = find_number(text, "confident correct:")
    wrong_sure = find_number(text, "confident wrong:")
    right_unsure = find_number(text, "unsure correct:")
    wrong_unsure = find_number(text, "Mistakes with confidence below 0.9:")
    assert right_sure + right_unsure <= n - mistakes
    assert wrong_sure + wrong_unsure <= mistakes
    assert right_sure > 0.5 * n
    # temperature fitted on held-out validation images, reported on the whole test set
    assert "Temperature fitted on: validation split of the training set (never trained on), 6000 images" in text
    assert "Calibration reported on: whole test set, 10000 images" in text
    t = find_number(text, "Fitted temperature T =")
    assert 0.2 < t < 5
    nll_val = _before_after(text, "NLL validation (fit):")
    assert nll_val[1] <= nll_val[0]
    acc_before, acc_after = _before_after(text, "Accuracy whole test set:")
    assert acc_before == acc_after == pytest.approx(acc, abs=0.011)
    ece_before = find_number(text, "ECE before (whole test set, T = 1):")
    ece_after = find_number(text, f"ECE after (whole test set, T = {t:.2f}):")
    assert 0 <= ece_before < 20 and 0 <= ece_after < 20
    # out of distribution: lower confidence on average than on the model's own test images
    conf_in = find_number(text, "test, 10000 images): mean confidence")
    conf_out = find_number(text, "2000 images): mean confidence")
    assert conf_out < conf_in
    assert 0.5 < find_number(text, "AUROC of entropy as an out-of-distribution detector:") <= 1
    assert count_images(nb) == 9
    return ece_before, ece_after


def test_05_prediction_confidence_mnist(tmp_path):
    _require("mnist")
    nb = run_notebook("05_prediction_confidence.ipynb", tmp_path)
    _check_05(nb, "mnist")


def test_05_prediction_confidence_fashion_mnist(tmp_path):
    _require("fashion_mnist")
    nb = run_notebook("05_prediction_confidence.ipynb", tmp_path, DATASET="fashion_mnist")
    ece_before, ece_after = _check_05(nb, "fashion_mnist")
    # the clothes model is over-confident; temperature scaling repairs most of it on unseen test images
    assert ece_after < ece_before


def _check_06(nb):
    text = notebook_text(nb)
    assert "Traceback" not in text and " nan" not in text.lower()
    assert "t-SNE of 1000 feature vectors" in text
    t_feat_tsne = find_number(text, "Trustworthiness (k=10), features -> t-SNE:")
    t_feat_pca = find_number(text, "Trustworthiness (k=10), features -> PCA:")
    t_pix_tsne = find_number(text, "Trustworthiness (k=10), pixels -> t-SNE:")
    assert t_feat_tsne > 0.9 and t_pix_tsne > 0.9
    assert t_feat_tsne > t_feat_pca
    dis_pix = find_number(text, "Mean kNN label disagreement, pixels:")
    dis_feat = float(re.search(r"Mean kNN label disagreement, pixels: [0-9.]+ %; dense1 features: ([0-9.]+)",
                               text).group(1))
    assert dis_feat < dis_pix  # the network's features group classes better than raw pixels
    assert find_number(text, "Outliers (more than half of 10 neighbours carry another label):") > 0
    assert count_images(nb) == 4


def test_06_feature_space_mnist(tmp_path):
    _require("mnist")
    _check_06(run_notebook("06_feature_space.ipynb", tmp_path))


def test_06_feature_space_fashion_mnist(tmp_path):
    _require("fashion_mnist")
    _check_06(run_notebook("06_feature_space.ipynb", tmp_path, DATASET="fashion_mnist"))
