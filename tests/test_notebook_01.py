"""Notebook 01 runs top to bottom in a fresh kernel in fast mode, for both datasets."""
import pytest

import cnn_utils
from conftest import count_images, find_number, notebook_text, run_notebook

pytestmark = [pytest.mark.notebook]


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_notebook_01_loads_shipped_model(dataset, tmp_path):
    nb = run_notebook("01_train_mnist_cnn.ipynb", tmp_path, DATASET=dataset)
    text = notebook_text(nb)
    acc = find_number(text, "Test accuracy") / 100
    assert acc == pytest.approx(cnn_utils.model_info(dataset)["test_accuracy"], abs=2e-4)
    assert "Most frequent confusions" in text
    assert count_images(nb) == 4  # samples, curves, confusion matrix, mistakes


def test_notebook_01_trains_a_new_model(tmp_path):
    nb = run_notebook("01_train_mnist_cnn.ipynb", tmp_path, TRAIN_NEW_MODEL=True,
                      MODEL_OUT_DIR=str(tmp_path / "models"))
    text = notebook_text(nb)
    assert find_number(text, "Test accuracy") > 90  # one epoch on 6,000 images
    assert "reloaded model gives the same predictions: True" in text
