"""Notebooks 02 (layer activations) and 03 (filters and feature visualization) run top to
bottom in FAST mode and print what they should."""
import json
import re

import pytest

from conftest import ROOT, count_images, find_number, notebook_text, run_notebook

NB02 = "02_layer_activations.ipynb"
NB03 = "03_filters_and_feature_visualization.ipynb"


def _streams(nb):
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")


def _common(nb):
    text = notebook_text(nb)
    # NumPy prints a NaN as "nan" (the notebooks' own "NaN in ...: 0" lines are checks)
    assert not re.search(r"\bnan\b", text), "a NaN was printed"
    assert "retracing" not in _streams(nb)
    assert "doesn't match the expected structure" not in _streams(nb)
    return text


@pytest.mark.parametrize("name", [NB02, NB03])
def test_notebook_stored_clean_with_parameters_cell(name):
    nb = json.loads((ROOT / "notebooks" / name).read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    source = "".join(params[0]["source"])
    for line in ("FAST = False", 'DATASET = "mnist"', "SEED = 42"):
        assert line in source
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    assert "Discussion questions" in "".join("".join(c["source"]) for c in nb["cells"])


def _check_02(nb):
    text = _common(nb)
    sparsity = {layer: find_number(text, f"Sparsity {layer}:")
                for layer in ("conv1", "pool1", "conv2", "pool2", "conv3")}
    # sparsity grows with depth; pooling never switches a channel on
    assert sparsity["conv1"] <= sparsity["conv2"] <= sparsity["conv3"]
    assert sparsity["conv3"] > sparsity["conv1"] + 10           # percent
    assert sparsity["pool1"] >= sparsity["conv1"] and sparsity["pool2"] >= sparsity["conv2"]
    assert find_number(text, "NaN in activations:") == 0
    assert count_images(nb) >= 10
    return sparsity


def _check_03(nb):
    text = _common(nb)
    assert find_number(text, "Classes recognised:") >= 8
    assert find_number(text, "NaN in optimised images:") == 0
    assert find_number(text, "conv1 mean objective: start") < find_number(text, "-> end")
    m = re.search(r"none\s+score\s+([0-9.]+)\s+L2 norm\s+([0-9.]+)\s+TV\s+([0-9.]+)", text)
    l2 = re.search(r"L2\s+score\s+([0-9.]+)\s+L2 norm\s+([0-9.]+)", text)
    tv = re.search(r"TV\s+score\s+([0-9.]+)\s+L2 norm\s+([0-9.]+)\s+TV\s+([0-9.]+)", text)
    assert m and l2 and tv
    assert float(l2.group(2)) < float(m.group(2))               # L2 lowers the norm
    assert float(tv.group(3)) < float(m.group(3))               # TV lowers the total variation
    assert re.search(r"Dead filters in conv3 \(never fire on \d+ test images\): \[", text)
    assert count_images(nb) >= 8


@pytest.mark.notebook
def test_notebook_02_runs_fast_mnist(tmp_path):
    _check_02(run_notebook(NB02, tmp_path))


@pytest.mark.notebook
def test_notebook_03_runs_fast_mnist(tmp_path):
    _check_03(run_notebook(NB03, tmp_path))


@pytest.mark.notebook
def test_notebook_03_runs_fast_fashion_mnist(tmp_path):
    if not (ROOT / "saved_models" / "fashion_mnist_cnn.keras").is_file():
        pytest.skip("the Fashion-MNIST model (saved_models/fashion_mnist_cnn.keras) is not shipped yet")
    _check_03(run_notebook(NB03, tmp_path, DATASET="fashion_mnist"))
