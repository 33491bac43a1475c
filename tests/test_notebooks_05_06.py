"""Notebooks 05 (prediction confidence) and 06 (feature space) in FAST mode, both datasets.

The tests read the values each notebook stores with ``cnn_utils.record`` (not its printed sentences).
"""
import math

import pytest

import cnn_utils
from conftest import count_images, notebook_values, run_notebook

pytestmark = pytest.mark.notebook


def _require(dataset):
    assert cnn_utils.model_path(dataset).is_file(), (
        f"saved_models/{dataset}_cnn.keras is missing (rebuild with `python -m course train --dataset {dataset}`)")
    for name in cnn_utils.DATASETS:  # 05 needs the other dataset for its out-of-distribution section
        if not any(p.is_file() for p in cnn_utils.dataset_search_paths(name)):
            pytest.skip(f"{name}.npz not found (set CNN_COURSE_DATA to a folder holding it)")


def _errors(nb):
    return [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]


def _check_05(nb, dataset):
    assert not _errors(nb)
    v = notebook_values(nb)
    n = v["n_test"]
    assert n == 10000
    assert v["softmax_vs_model"] < 1e-5  # cnn_utils.softmax of the logits is the model's own softmax
    assert v["test_accuracy"] == pytest.approx(cnn_utils.model_info(dataset)["test_accuracy"], abs=1e-4)
    assert v["n_mistakes"] == round(n * (1 - v["test_accuracy"]))
    # the three groups cover the whole test set and agree with the mistakes
    right = n - v["n_mistakes"]
    assert v["n_confident_correct"] + v["n_unsure_correct"] <= right
    assert v["n_confident_wrong"] + v["n_wrong_unsure"] <= v["n_mistakes"]
    assert v["n_confident_correct"] > 0.5 * n
    assert v["accuracy_confident"] > v["accuracy_unsure"]
    assert v["mean_conf_right"] > v["mean_conf_wrong"]
    # temperature fitted on held-out validation images, reported on the whole test set
    assert v["cal_source"] == "validation split of the training set (never trained on)"
    assert (v["n_cal"], v["eval_name"], v["n_eval"]) == (6000, "whole test set", 10000)
    assert 1 < v["temperature"] < 5
    assert v["nll_cal"][1] < v["nll_cal"][0]                  # the fit lowers the NLL it minimises
    assert v["accuracy_eval"][0] == v["accuracy_eval"][1] == pytest.approx(v["test_accuracy"])
    # what drives T > 1: the mistakes carry most of the NLL; softening lowers theirs, raises the right ones'
    assert v["nll_share_mistakes"] > 0.5
    assert v["nll_sum_mistakes"][1] < v["nll_sum_mistakes"][0]
    assert v["nll_sum_right"][1] > v["nll_sum_right"][0]
    assert v["temperature_train"] < v["temperature"]
    assert 0 <= v["ece_before"] < 0.2 and 0 <= v["ece_after"] < 0.2
    assert max(v["ece_by_bins"].values()) > min(v["ece_by_bins"].values())
    # out of distribution: lower confidence on average, yet some foreign images at >= 0.99
    assert v["n_ood"] == 2000
    assert v["mean_conf_ood"] < v["mean_conf_in"] and v["mean_entropy_ood"] > v["mean_entropy_in"]
    assert v["share99_ood"] > 0
    assert 0.5 < v["auroc_entropy"] <= 1
    assert count_images(nb) == 9
    return v


def test_05_prediction_confidence_mnist(tmp_path):
    _require("mnist")
    v = _check_05(run_notebook("05_prediction_confidence.ipynb", tmp_path), "mnist")
    # the digit model: the test images are easier than the validation images, and scaling does not lower the
    # test ECE; softening pushes more of the middle bins above the diagonal (under-confident)
    assert v["error_rate_eval"] < v["error_rate_cal"]
    assert v["ece_after"] >= v["ece_before"]
    (above_before, _), (above_after, _) = v["middle_bins_above_under"]
    assert above_after > above_before
    assert v["auroc_entropy"] > 0.9


def test_05_prediction_confidence_fashion_mnist(tmp_path):
    _require("fashion_mnist")
    v = _check_05(run_notebook("05_prediction_confidence.ipynb", tmp_path, DATASET="fashion_mnist"),
                  "fashion_mnist")
    # the clothes model is over-confident; temperature scaling repairs most of it on unseen test images
    assert v["ece_after"] < 0.5 * v["ece_before"]
    (_, under_before), (_, under_after) = v["middle_bins_above_under"]
    assert under_after < under_before
    assert v["auroc_entropy"] < 0.8           # digits fool the clothes model: entropy is a poor detector
    assert v["share99_ood"] > 0.3


def _check_06(nb):
    assert not _errors(nb)
    v = notebook_values(nb)
    assert v["n_test"] == 10000 and v["n_map"] == v["tsne_points"] == 1000
    assert v["trust_feat_tsne"] > 0.9 and v["trust_pix_tsne"] > 0.9
    assert v["trust_feat_tsne"] > v["trust_feat_pca"]
    assert v["map_mixing_tsne"] < v["map_mixing_pca"]
    # UMAP of the same points: as trustworthy as the notebook says, and its caveats table covers all three maps
    assert v["umap_points"] == 1000 and v["trust_feat_umap"] > max(0.9, v["trust_feat_pca"])
    assert v["map_mixing_umap"] < v["map_mixing_pca"]
    assert set(v["class_layout_rho"]) == {"PCA", "t-SNE", "UMAP"}
    assert all(-1 <= r <= 1 for r in v["class_layout_rho"].values())
    # the network's features group classes better than raw pixels, in 128-D and on the maps
    assert v["knn_disagreement_features"] < v["knn_disagreement_pixels"]
    assert v["map_mixing_tsne"] < v["map_mixing_pixels_tsne"]
    assert v["features_group_better_than_pixels"] is True and v["pca_fewest_neighbourhoods"] is True   # as the text says
    assert 0 < v["n_outliers"] < v["n_outliers_pixels"]
    assert v["n_outliers_neighbour_vote"] > v["n_outliers"] / 2
    assert v["n_outliers_misclassified"] <= v["n_mistakes"]
    assert 0 <= v["n_outliers_one_foreign_class"] <= v["n_outliers"]
    assert 0.9 < v["neighbours_same_prediction"] <= 1   # what the text claims of feature-space neighbours
    assert all(math.isfinite(x) for x in v["map_mixing_pca_per_class"])
    assert count_images(nb) == 4
    return v


def test_06_feature_space_mnist(tmp_path):
    _require("mnist")
    v = _check_06(run_notebook("06_feature_space.ipynb", tmp_path))
    assert v["knn_disagreement_features"] < 0.05


def test_06_feature_space_fashion_mnist(tmp_path):
    _require("fashion_mnist")
    v = _check_06(run_notebook("06_feature_space.ipynb", tmp_path, DATASET="fashion_mnist"))
    # the upper-body garments stay mixed: Shirt is in every one of the three most mixed pairs
    shirt = cnn_utils.CLASS_NAMES["fashion_mnist"].index("Shirt")
    assert all(shirt in pair for pair in v["mixed_pairs_features"])
