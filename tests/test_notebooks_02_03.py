"""Notebooks 02 (layer activations) and 03 (filters and feature visualization) run top to
bottom in FAST mode for both datasets; the tests read the values they record
(``cnn_utils.record``), not their printed sentences."""
import re

import pytest

import cnn_utils
from conftest import count_images, notebook_text, notebook_values, run_notebook, stored_notebook

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
    nb, _, _ = stored_notebook(name)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    source = "".join(params[0]["source"])
    for line in ('DATASET = "mnist"', "SEED = 42"):
        assert line in source


@pytest.mark.parametrize("name", ["00_why_interpret.ipynb", "01_train_mnist_cnn.ipynb", NB02, NB03])
def test_notebook_calls_only_existing_helpers(name):
    """A branch the tests do not execute (01 with TRAIN_NEW_MODEL in full mode) must not name a missing helper."""
    _, _, code = stored_notebook(name)
    names = set(re.findall(r"\bcnn_utils\.([A-Za-z_]\w*)", code)) - {"py"}   # "cnn_utils.py" is the file
    assert names and not sorted(n for n in names if not hasattr(cnn_utils, n))


def _check_02(nb):
    _common(nb)
    v = notebook_values(nb)
    sp = v["sparsity"]
    # sparsity grows with depth; pooling never switches a channel on
    assert sp["conv1"] < sp["conv2"] < sp["conv3"] and sp["conv3"] > sp["conv1"] + 0.10
    assert sp["pool1"] >= sp["conv1"] and sp["pool2"] >= sp["conv2"]
    # the sparsity splits into dead channels (off for every image) and live channels off for an image:
    # sparsity = dead share + live sparsity x live share, per conv layer (in percent)
    for name, n_dead in ((n, len(c)) for n, c in v["dead_channels"].items()):
        width = 32 if name == "conv1" else 64
        dead_pc, live_pc = v["dead_share"][name], v["live_sparsity"][name]
        assert dead_pc == pytest.approx(100 * n_dead / width)
        assert 100 * sp[name] == pytest.approx(dead_pc + live_pc * (1 - dead_pc / 100), abs=1e-6)
        assert 0 <= live_pc <= 100
    ls = v["live_sparsity"]     # growth is read only with at least 2 points per layer
    assert v["live_sparsity_grows"] == (ls["conv2"] - ls["conv1"] >= 2 and ls["conv3"] - ls["conv2"] >= 2)
    assert v["conv3_most_specific"] == (ls["conv3"] - max(ls["conv1"], ls["conv2"]) >= 2)
    # the class-preference count leaves out dead channels (argmax of an all-zero row is 0)
    assert v["conv3_live"] == 64 - len(v["dead_channels"]["conv3"])
    assert sum(v["conv3_prefer_count"].values()) == v["conv3_live"]
    assert v["conv3_exclusive"] <= v["conv3_clear"] < v["conv3_live"] / 2 and v["conv3_median_ratio"] >= 1
    # the single image: conv3 switches off more channels than conv1
    zero = v["example_zero_channels"]
    assert zero["conv3"] > zero["conv1"] and zero["pool1"] == zero["conv1"]
    assert v["active_share"]["conv2"] < v["active_share"]["conv1"]
    assert 0 < v["conv2_filter_active_on"] <= 10 and v["conv1_filter_active_on"] >= 8
    # each conv1 map of the example is counted once: on the bright pixels, beside them, or zero everywhere
    assert v["conv1_maps_on_strokes"] + v["conv1_maps_beside"] + v["conv1_maps_silent"] == 32
    assert v["conv1_maps_silent"] == v["example_zero_channels"]["conv1"]
    assert 0 <= v["conv1_filter_follows_ink"] <= 10
    assert min(v["conv2_filter_mean"]) < 0.5 * max(v["conv2_filter_mean"])
    assert count_images(nb) >= 10


def _check_03(nb):
    _common(nb)
    v = notebook_values(nb)
    assert v["readable_vs_fast_diff"] < 1e-3            # the shown loop is the fast function
    assert v["conv1_map_by_hand_diff"] < 1e-4
    assert v["conv1_patch_kernel_corr_min"] > 0.9
    assert v["classes_recognised"] >= 8
    assert len(v["class_scores"]) == len(v["best_real_class_scores"]) == 10
    fv = v["feature_visualization"]
    assert fv["conv3"]["end"] > fv["conv3"]["start"] and fv["conv2"]["end"] > fv["conv2"]["start"]
    # the "(off)" filters were run again with 4 times the steps: no more switch on than were off
    for layer, (n_off, n_woken) in v["off_woken_by_longer_ascent"].items():
        assert n_off == fv[layer]["off"] and 0 <= n_woken <= n_off
    assert v["dead_filters"]["conv3"] > v["dead_filters"]["conv2"]
    assert v["dead_most_in_conv3"] == (v["dead_filters"]["conv3"] > v["dead_filters"]["conv2"])
    assert v["conv1_patch_is_kernel"] and set(v["ascent_raised"]) <= {"conv2", "conv3"}
    for layer, ex in v["dataset_examples"].items():
        assert len(set(ex["filters"])) == 8 and 0 <= ex["synthetic_beats_best_real"] <= 8
        # only filters that fire on the data and that the ascent switched on (an "(off)" image is blank grey)
        assert not set(ex["filters"]) & set(ex["left_out"])
        assert len(ex["left_out"]) == fv[layer]["silent"] + fv[layer]["off"]
    reg = v["regularizers"]
    assert reg["L2"]["norm"] < reg["none"]["norm"]      # L2 shrinks the image
    assert reg["TV"]["tv"] < reg["none"]["tv"]          # TV smooths it
    assert reg["all"]["score"] < reg["none"]["score"]   # both cost score
    # conv1 of the other dataset's model matches better than untrained filters; the shared start shows in
    # filters at the same position
    m = v["conv1_match_other"]
    assert m["median"] > m["untrained_median"] and m["above_09"] > m["untrained_above_09"]
    assert m["same_position_median"] > m["untrained_median"]
    # the same data from another start (the shipped seed-1 model, as in notebook 04, section 12)
    assert -1 <= m["seed1_median"] <= 1
    # receptive fields by hand: 3; pool 3 + 1 = 4; 4 + 2 * 2 = 8; 8 + 1 * 2 = 10; 10 + 2 * 4 = 18; conv4 18 + 2 * 4
    rf = v["receptive_fields"]
    assert [rf[n]["size"] for n in ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4")] == [3, 4, 8, 10, 18, 26]
    assert [rf[n]["cells"] for n in ("conv1", "conv2", "conv3", "conv4")] == [26, 11, 3, 1]
    assert count_images(nb) >= 10


@pytest.mark.notebook
@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_notebook_02_runs_fast(dataset, tmp_path):
    _check_02(run_notebook(NB02, tmp_path, DATASET=dataset))


@pytest.mark.notebook
@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_notebook_03_runs_fast(dataset, tmp_path):
    _check_03(run_notebook(NB03, tmp_path, DATASET=dataset))
