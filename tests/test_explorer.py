"""The live-demo explorer: every control changes what is shown, and what is shown is
exactly what the course's functions return."""
import re

import matplotlib
import numpy as np
import pytest

import cnnlib.widgets
import cnn_utils
from conftest import EXPLORER_METHODS, explorer_reference


@pytest.fixture(scope="module")
def app_and_data(mnist_model, mnist):
    _, (x_test, y_test) = mnist
    probs = mnist_model.predict(x_test, batch_size=1000, verbose=0)
    mistakes = cnn_utils.most_confident_mistakes(probs, y_test, k=5)
    keep = np.concatenate([np.arange(50), mistakes])  # 50 images, then 5 certain mistakes
    x, y = x_test[keep], y_test[keep]
    app = cnn_utils.explorer(mnist_model, x, y, class_names=cnn_utils.CLASS_NAMES["mnist"])
    return app, x, y


def _shown_heatmap(app):
    return app.images["heatmap"].value


def test_starts_with_grad_cam_of_the_predicted_class(app_and_data, mnist_model):
    app, x, _ = app_and_data
    assert app.last["method"] == "Grad-CAM" and app.last["index"] == 0
    expected = cnn_utils.grad_cam(mnist_model, x[:1])[0]
    np.testing.assert_allclose(app.last["heatmap"], expected, atol=1e-6)
    jet = matplotlib.colormaps["jet"]
    assert _shown_heatmap(app) == cnnlib.widgets._png(jet(expected)[..., :3], 8)
    assert "✔" in app.status.value


def test_the_menu_lists_every_method():
    assert tuple(cnn_utils.explorer_methods()) == EXPLORER_METHODS


@pytest.mark.parametrize("method", EXPLORER_METHODS)
def test_each_method_matches_its_function(app_and_data, mnist_model, method):
    app, x, _ = app_and_data
    app.controls["index"].value = 3
    before = _shown_heatmap(app)
    app.controls["method"].value = method
    assert app.last["method"] == method and "error" not in app.last, app.status.value
    expected = explorer_reference(mnist_model, x[3:4], method, app.last["class_index"], app.last["layer"])[0]
    np.testing.assert_allclose(app.last["heatmap"], expected, atol=1e-5)
    if method != "Grad-CAM":
        assert _shown_heatmap(app) != before
    app.controls["method"].value = "Grad-CAM"


def test_image_control_changes_image_and_heatmap(app_and_data):
    app, x, _ = app_and_data
    app.controls["index"].value = 0
    image, heat = app.images["image"].value, _shown_heatmap(app)
    app.controls["index"].value = 1
    assert app.last["index"] == 1
    assert app.images["image"].value != image and _shown_heatmap(app) != heat
    gray = np.repeat(x[1, ..., 0][..., None], 3, axis=-1)
    assert app.images["image"].value == cnnlib.widgets._png(gray, 8)


def test_target_class_control(app_and_data, mnist_model):
    app, x, _ = app_and_data
    app.controls["index"].value = 0
    app.controls["class_index"].value = 3
    assert app.last["class_index"] == 3
    np.testing.assert_allclose(app.last["heatmap"], cnn_utils.grad_cam(mnist_model, x[:1], class_index=3)[0],
                               atol=1e-6)
    app.controls["class_index"].value = -1  # back to "predicted"


def test_opacity_changes_only_the_overlay(app_and_data):
    app, _, _ = app_and_data
    overlay, heat = app.images["overlay"].value, _shown_heatmap(app)
    app.controls["alpha"].value = 0.9
    assert app.images["overlay"].value != overlay
    assert _shown_heatmap(app) == heat
    app.controls["alpha"].value = 0.4


def test_layer_activations(app_and_data, mnist_model):
    app, x, _ = app_and_data
    app.controls["index"].value = 2
    app.controls["method"].value = cnn_utils.ACTIVATIONS_METHOD
    app.controls["layer"].value = "conv1"
    assert "error" not in app.last, app.status.value
    conv1 = cnn_utils.get_activations(mnist_model, x[2:3], ["conv1"])["conv1"][0]
    np.testing.assert_allclose(app.last["heatmap"], cnnlib.widgets._tile_channels(conv1), atol=1e-6)
    shown = _shown_heatmap(app)
    app.controls["layer"].value = "conv3"
    assert _shown_heatmap(app) != shown
    app.controls["method"].value = "Grad-CAM"


def test_only_misclassified(app_and_data, mnist_model):
    app, x, y = app_and_data
    pred = mnist_model.predict(x, verbose=0).argmax(1)
    wrong = np.flatnonzero(pred != y)
    assert len(wrong) >= 5
    app.controls["method"].value = "Grad-CAM"
    app.controls["only_misclassified"].value = True
    assert app.last["index"] == wrong[0]
    assert app.controls["index"].max == len(wrong) - 1
    app.controls["index"].value = len(wrong) - 1
    assert app.last["index"] == wrong[-1] == len(x) - 1
    assert "✘ wrong" in app.children[0].children[1].value
    app.controls["only_misclassified"].value = False
    assert app.controls["index"].max == len(x) - 1


def test_error_in_a_callback_is_shown_in_the_app(app_and_data, monkeypatch):
    app, _, _ = app_and_data

    def broken(*args, **kwargs):
        raise ValueError("layer 'pool2' is not what this method needs")

    monkeypatch.setattr(cnn_utils, "score_cam", broken)
    app.controls["method"].value = "Score-CAM"
    assert "error" in app.last
    assert "ValueError" in app.status.value and "pool2" in app.status.value
    monkeypatch.undo()
    app.controls["method"].value = "Grad-CAM"
    assert "error" not in app.last and "✔" in app.status.value


def test_bad_input(mnist_model):
    with pytest.raises(ValueError, match="labels"):
        cnn_utils.explorer(mnist_model, np.zeros((3, 28, 28, 1)), [1, 2])
    with pytest.raises(ValueError, match="class_names"):
        cnn_utils.explorer(mnist_model, np.zeros((2, 28, 28, 1)), [1, 2], class_names=["a"])


@pytest.mark.notebook
@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_notebook_12_runs_for_both_datasets(dataset, tmp_path):
    from conftest import notebook_text, notebook_values, run_notebook

    nb = run_notebook("12_live_explorer.ipynb", tmp_path, DATASET=dataset)
    assert f"{cnn_utils.DATASET_TITLES[dataset]}: shipped model, 500 test images" in notebook_text(nb)
    views = [out for cell in nb.cells for out in cell.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in out.get("data", {})]
    assert len(views) == 1
    # issue 10 section 4: the executed notebook stores the widgets' state (images included) and
    # a static copy that an HTML page shows without a kernel or the internet
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    images = [w for w in state.values() if w["model_name"] == "ImageModel" and w.get("buffers")]
    assert len(images) >= 3
    snapshots = [out["data"]["text/html"] for cell in nb.cells for out in cell.get("outputs", [])
                 if "cnn-explorer-snapshot" in out.get("data", {}).get("text/html", "")]
    assert len(snapshots) == 1
    # every method, the runner-up class, the first and last conv layer's feature maps, the first mistake
    n_views = len(cnn_utils.explorer_methods()) + 4
    assert snapshots[0].count("data:image/png;base64,") == 3 * n_views
    assert "✘ wrong" in snapshots[0] and "Score-CAM for class" in snapshots[0]
    assert "feature maps of conv1" in snapshots[0] and "feature maps of conv3" in snapshots[0]
    # each heatmap has its colour scale: jet for the methods, viridis for the feature maps
    assert snapshots[0].count("<span>importance</span>") == n_views - 2
    assert snapshots[0].count("1 = largest shown") == 2
    values = notebook_values(nb)
    # the view after the methods explains the runner-up class; the mistake is explained for its prediction
    rows = snapshots[0].split("<hr>")
    assert len(rows) == n_views
    assert f"Grad-CAM for class {cnn_utils.CLASS_NAMES[dataset][values['runner_up']]}<" in rows[n_views - 4]
    predicted = re.search(r"predicted <b>(.*?)</b>", rows[-1]).group(1)
    assert f"Grad-CAM for class {predicted}<" in rows[-1]
    # what the "things to try" say about conv1 and conv3 on image 0 is measured
    assert set(values["fires"]) == {"conv1", "conv3"} and all(0 < f <= 1 for f in values["fires"].values())
    assert 0 < values["channels_on"]["conv3"] <= 64


def _small_model(head):
    """A tiny CNN whose last layer outputs logits ("logits"), or adds a softmax layer
    ("softmax_layer") or a Dense with activation="softmax" ("softmax_activation")."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    h = keras.layers.Flatten()(h)
    if head == "softmax_activation":
        out = keras.layers.Dense(3, activation="softmax", name="probs")(h)
    else:
        out = keras.layers.Dense(3, name="logits")(h)
        if head == "softmax_layer":
            out = keras.layers.Softmax()(out)
    return keras.Model(inp, out)


@pytest.mark.parametrize("head", ["logits", "softmax_layer", "softmax_activation"])
def test_probabilities_whatever_the_model_outputs(head):
    # issue 13 item 5: a logits-output model was shown as "-1644.1 %"
    model = _small_model(head)
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype(np.float32) * 40  # large logits
    x = np.clip(x, 0, 1)
    out = model.predict(x, verbose=0)
    app = cnn_utils.explorer(model, x, [0, 1, 2, 0], class_names=["a", "b", "c"])
    expected = cnn_utils.softmax(out) if head == "logits" else out
    np.testing.assert_allclose(app.probabilities, expected, rtol=1e-5, atol=1e-7)
    assert app.model_outputs == ("logits" if head == "logits" else "probabilities")
    shown = app.texts["probabilities"].value
    values = [float(v) for v in re.findall(r"(-?[0-9.]+) %", shown)]
    assert len(values) == 3 and all(0 <= v <= 100 for v in values), values
    assert ("softmax of the logits" in shown) == (head == "logits")
    np.testing.assert_allclose(app.probabilities.sum(axis=1), 1.0, atol=1e-6)


def test_snapshot_is_static_html_of_the_views(app_and_data):
    app, _, _ = app_and_data
    before = {k: c.value for k, c in app.controls.items()}
    html = cnn_utils.explorer_snapshot(app, [{"index": 1, "method": "Saliency"},
                                             {"index": 2, "method": "Grad-CAM"}]).data
    assert html.count("data:image/png;base64,") == 6          # image, heatmap, overlay per view
    assert "Saliency for class" in html and "Grad-CAM for class" in html
    assert "test image #1" in html and "test image #2" in html
    assert {k: c.value for k, c in app.controls.items()} == before  # restored
    width = float(app.images["heatmap"].layout.width.removesuffix("px"))
    mosaic = cnn_utils.explorer_snapshot(app, [{"index": 1, "method": cnn_utils.ACTIVATIONS_METHOD}]).data
    assert f"width:{2 * width:g}px" in mosaic and "feature maps of" in mosaic   # feature maps twice as wide
    # feature maps have no overlay: that panel shows the plain input and says so
    assert "<b>input (no overlay for feature maps)</b>" in mosaic and "<b>overlay</b>" not in mosaic
    assert html.count("<b>overlay</b>") == 2
    assert {k: c.value for k, c in app.controls.items()} == before
    with pytest.raises(ValueError, match="unknown control"):
        cnn_utils.explorer_snapshot(app, [{"colour": 1}])


def test_flat_probabilities_get_enough_digits_to_rank():
    """Random weights give ~0.1 % to each of 1000 classes: three decimals, not "0.1 %" on every row."""
    from cnnlib.widgets import _probability_bars_html

    flat = np.full(1000, 1.0 / 1000)
    flat[:3] += [3e-5, 2e-5, 1e-5]
    flat /= flat.sum()
    rows = _probability_bars_html(flat, [f"c{k}" for k in range(1000)], 0, top_k=3)
    assert ">0.103 %</td>" in rows and ">0.1 %</td>" not in rows
    peaked = np.array([0.9, 0.06, 0.04])
    assert ">90.0 %</td>" in _probability_bars_html(peaked, ["a", "b", "c"], 0)
