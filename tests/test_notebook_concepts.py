"""The concepts notebook (TCAV, NMF, building blocks, ablation, VGG16) in FAST mode on both datasets.

The tests read the values the notebook stores with ``cnn_utils.record``, not its sentences.
"""
import json

import numpy as np
import pytest

import cnn_utils
from conftest import ROOT, count_images, notebook_values, run_notebook, stored_notebook

NB = "10_concepts.ipynb"


def test_concepts_notebook_is_stored_without_outputs():
    nb, markdown, code = stored_notebook(NB)
    assert "Learning objectives" in markdown
    parameters = "".join("".join(c["source"]) for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    for name in ("DATASET", "SEED", "LAYERS", "CONCEPTS", "N_RANDOM"):
        assert f"{name} =" in parameters
    # the cells that only write text are collapsed in JupyterLab and hidden in the HTML build
    hidden = [c for c in nb["cells"] if c["metadata"].get("jupyter", {}).get("source_hidden")]
    assert len(hidden) >= 5
    assert all("hide-input" in c["metadata"].get("tags", []) for c in hidden)
    assert all("say(" in "".join(c["source"]) for c in hidden)


def test_html_build_hides_the_text_cells_inputs(tmp_path):
    """course.to_html drops the input of cells tagged hide-input, keeps their output."""
    import nbformat

    import course

    nb = nbformat.v4.new_notebook()
    shown = nbformat.v4.new_code_cell("visible_source_marker = 1")
    hidden = nbformat.v4.new_code_cell("hidden_source_marker = 2", metadata={"tags": ["hide-input"]})
    hidden.outputs = [nbformat.v4.new_output("stream", text="hidden_output_marker")]
    nb.cells = [shown, hidden]
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, str(path))
    html = course.to_html(path).read_text()
    assert "visible_source_marker" in html and "hidden_output_marker" in html
    assert "hidden_source_marker" not in html


@pytest.mark.notebook
@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_concepts_notebook(tmp_path, dataset):
    if not any(p.is_file() for p in cnn_utils.dataset_search_paths(dataset)):
        pytest.skip(f"{dataset}.npz not found (set CNN_COURSE_DATA to a folder holding it)")
    nb = run_notebook(NB, tmp_path, DATASET=dataset)
    v = notebook_values(nb)
    assert v["dataset"] == dataset and v["fast"] is True
    # the plain lines equal the library
    assert v["cav_gap"] < 1e-6 and v["grad_gap"] < 1e-4 and v["attr_gap"] < 1e-4
    assert abs(v["tcav_by_hand"] - v["tcav_lib"]) <= 1 / 30
    # TCAV: every concept x layer x class tested, Bonferroni over all of them
    n_concepts, n_layers = len(v["concepts"]), 3
    assert v["n_tests"] == n_concepts * n_layers * 10 == len(v["tcav"])
    ps = np.array([t["p"] for t in v["tcav"].values()])
    corrected = np.array([t["p_corrected"] for t in v["tcav"].values()])
    np.testing.assert_allclose(corrected, np.minimum(1, ps * v["n_tests"]))
    flags = np.array([t["significant"] for t in v["tcav"].values()])
    np.testing.assert_array_equal(flags, corrected < 0.05)
    assert v["n_significant"] == flags.sum() <= v["n_uncorrected"] == (ps < 0.05).sum()
    assert all(0 <= t["mean"] <= 1 and 0 <= t["random_mean"] <= 1 for t in v["tcav"].values())
    # the lead counts only tests that can be read: CAVs at 60 % held-out accuracy, scores not all 0 or 1
    readable = [k for k, a in v["cav_accuracy"].items() if a >= 0.6 and k.split("|")[1] not in v["tcav_binary_layers"]]
    assert v["tcav_read_tests"] == 10 * len(readable)
    assert v["tcav_read_significant"] == sum(t["significant"] for k, t in v["tcav"].items()
                                             if "|".join(k.split("|")[:2]) in readable)
    # concept CAVs separate their concept better than random-vs-random CAVs separate anything
    assert np.mean(list(v["cav_accuracy"].values())) > np.mean(list(v["random_cav_accuracy"].values())) + 0.1
    # NMF: reproducible, and the factors rebuild the activations better than nothing
    assert v["nmf_repeat_gap"] == 0 and 0 < v["nmf_error"] < 1
    assert np.shape(v["factor_concept_rho"]) == (6, n_concepts)
    assert np.shape(v["factor_concept_p"]) == (6, n_concepts) and np.all((np.array(v["factor_concept_p"]) >= 0)
                                                                          & (np.array(v["factor_concept_p"]) <= 1))
    # building blocks: the top channels carry a positive share
    assert len(v["blocks_top"]) == 4 and 0 < v["blocks_share"] <= 1
    assert v["blocks_values"] == sorted(v["blocks_values"], reverse=True) and v["blocks_values"][0] > 0
    # ablation: 64 channels of conv3; drops are accuracy points; selectivity in [0, 1]
    assert len(v["importance"]) == len(v["selectivity"]) == 64
    assert all(0 <= s <= 1 for s in v["selectivity"])
    assert v["ablation_base"] > 0.8
    # the "most selective channel" fires on enough images to be called selective
    assert v["selective_channel_fires"] >= min(20, v["max_fires"])
    if v["rho_selectivity_importance"] is not None:
        assert -1 <= v["rho_selectivity_importance"] <= 1 and 0 <= v["p_selectivity_importance"] <= 1
    # VGG16 labelled by its weights
    assert v["vgg_weights"] in ("ImageNet", "RANDOM") and len(v["vgg_top"]) == 3
    assert count_images(nb) >= 7


@pytest.mark.notebook
def test_concepts_notebook_other_concepts_and_seed(tmp_path):
    """A student's choice: other concepts, another seed and a single layer run without a ClaimError."""
    nb = run_notebook(NB, tmp_path, DATASET="fashion_mnist", SEED=7, CONCEPTS=["bright", "slanted"],
                      LAYERS=["conv3"], ABLATION_MODE="mean", IMAGE_INDEX=3)
    v = notebook_values(nb)
    assert v["concepts"] == ["bright", "slanted"] and v["n_tests"] == 2 * 1 * 10


def test_notebook_11_points_to_the_concepts_notebook():
    nb = json.loads((ROOT / "notebooks" / "13_what_next.ipynb").read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"])
    assert "concepts notebook" in text
    assert "LogisticRegression" not in text and "random_cavs" not in text   # the old five-CAV demonstration is gone
