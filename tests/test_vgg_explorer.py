"""The small VGG16 feature-map viewer (PyTorch): each control changes what is shown, and
what is shown is exactly ``vgg_feature_maps``' output. Never imports TensorFlow."""
import numpy as np
import pytest

import cnnlib.widgets
import cnn_utils
from conftest import EXPLORER_METHODS, explorer_reference

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def vgg():
    return cnn_utils.load_vgg16(pretrained=False, device="cpu")


@pytest.fixture()
def viewer(vgg):
    """A new viewer for each test (cheap at 64 px): no test depends on what an earlier one moved."""
    from skimage import data

    photos = {"chelsea": data.chelsea(), "coffee": data.coffee()}
    return cnn_utils.vgg_layer_explorer(vgg, photos, size=64, layer="relu1_2"), vgg, photos


def test_shows_the_layers_feature_map(viewer):
    app, model, photos = viewer
    index = cnn_utils.vgg_layer_names(model).index("relu1_2")
    pixels = cnn_utils.load_photo(photos["chelsea"], 64, fit="stretch")
    expected = cnn_utils.vgg_layer_activations(model, pixels, "relu1_2")[0]
    assert app.last["layer_index"] == index and app.last["channel"] == 0
    np.testing.assert_allclose(app.last["feature_map"], expected[0], atol=1e-6)
    assert app.controls["channel"].max == expected.shape[0] - 1 == 63
    assert "RANDOM weights" in app.status.value


def test_each_control_changes_the_display(viewer):
    app, model, _ = viewer
    shown = app.images["channel"].value
    app.controls["channel"].value = 5
    assert app.last["channel"] == 5 and app.images["channel"].value != shown

    shown, photo = app.images["channel"].value, app.images["photo"].value
    app.controls["photo"].value = "coffee"
    assert app.images["photo"].value != photo and app.images["channel"].value != shown

    names = cnn_utils.vgg_layer_names(model)
    app.controls["layer"].value = names.index("relu3_3")
    assert app.controls["channel"].max == 255
    assert app.last["feature_map"].shape == (16, 16)  # 64 px input, two poolings
    assert "error" not in app.last


def test_bad_input():
    model = cnn_utils.load_vgg16(pretrained=False, device="cpu")
    with pytest.raises(ValueError, match="at least one photo"):
        cnn_utils.vgg_layer_explorer(model, {})
    with pytest.raises(ValueError, match="Unknown layer 'relu9_9'.*conv1_1"):
        cnn_utils.vgg_layer_explorer(model, {"x": np.zeros((8, 8, 3))}, layer="relu9_9")


def test_module_names(viewer):
    _, model, _ = viewer
    assert cnn_utils.vgg_module_name(model, "relu5_3") == "features.29"
    assert cnn_utils.vgg_module_name(model, "conv1_1") == "features.0"
    with pytest.raises(ValueError, match="Unknown layer"):
        cnn_utils.vgg_module_name(model, "fc6")


@pytest.fixture(scope="module")
def photo_explorer(vgg):
    photos = cnn_utils.sample_photos(["chelsea", "coffee", "rocket"], size=64)
    x = np.stack(list(photos.values()))
    app = cnn_utils.explorer(vgg, x, class_names=vgg.class_names, samples=2)
    return app, vgg, x, dict(app.last)   # what the explorer showed first


@pytest.fixture()
def photo_app(photo_explorer):
    """The module's photo explorer put back on its first view (image 0, predicted class,
    Grad-CAM at relu5_3): the tests pass in any order (each update is cached, so cheap)."""
    app, model, x, _ = photo_explorer
    app.controls["all_classes"].value = False
    app.controls["index"].value = 0
    app.controls["class_index"].value = -1
    app.controls["method"].value = "Grad-CAM"
    app.controls["layer"].value = "relu5_3"
    return app, model, x


def test_photo_explorer_starts_with_grad_cam_and_true_probabilities(photo_explorer, photo_app):
    app, model, x = photo_app
    first = photo_explorer[3]
    assert first["method"] == "Grad-CAM" and first["layer"] == "relu5_3", app.status.value
    assert first["index"] == 0
    with torch.no_grad():
        logits = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(app.probabilities, cnn_utils.softmax(logits), rtol=1e-4, atol=1e-7)
    assert app.model_outputs == "logits"
    expected = cnn_utils.grad_cam(model, x[:1], int(logits[0].argmax()), layer="relu5_3")[0]
    np.testing.assert_allclose(first["heatmap"], expected, atol=1e-5)
    np.testing.assert_allclose(app.last["heatmap"], expected, atol=1e-5)
    assert "RANDOM weights" in app.texts["caption"].value and "RANDOM weights" in app.texts["heatmap_title"].value
    shown = app.texts["probabilities"].value
    assert "top 10 of 1000" in shown and shown.count("<tr>") == 10


def test_photo_explorer_class_list_is_top_k_then_all(photo_app):
    app, model, _ = photo_app
    app.controls["index"].value = 1
    options = app.controls["class_index"].options
    ranked = np.argsort(app.probabilities[1])[::-1]
    assert [v for _, v in options] == [-1] + [int(k) for k in ranked[:10]]
    assert options[2][0].startswith(f"#2 {model.class_names[ranked[1]]}")
    app.controls["class_index"].value = int(ranked[4])                    # the 5th class
    assert app.last["class_index"] == ranked[4] and "error" not in app.last
    app.controls["all_classes"].value = True
    assert len(app.controls["class_index"].options) == 1001
    app.controls["all_classes"].value = False
    app.controls["index"].value = 2                                       # the chosen class stays listed
    assert int(ranked[4]) in [v for _, v in app.controls["class_index"].options]


@pytest.mark.parametrize("method", EXPLORER_METHODS)
def test_photo_explorer_every_method(photo_app, method):
    app, model, x = photo_app
    app.controls["layer"].value = "relu4_3"
    app.controls["method"].value = method
    assert "error" not in app.last, app.status.value
    expected = explorer_reference(model, x[:1], method, app.last["class_index"], "relu4_3", samples=2)[0]
    np.testing.assert_allclose(app.last["heatmap"], expected, atol=1e-5)


def test_photo_explorer_layer_activations(photo_app):
    app, model, x = photo_app
    app.controls["method"].value = cnn_utils.ACTIVATIONS_METHOD
    app.controls["layer"].value = "conv5_3"
    assert "error" not in app.last and app.last["index"] == 0, app.status.value
    assert "64 strongest of 512" in app.texts["heatmap_title"].value
    maps = cnn_utils.vgg_layer_activations(model, x[:1], "conv5_3")[0]
    keep = np.sort(np.argsort(maps.mean(axis=(1, 2)))[::-1][:64])
    np.testing.assert_allclose(app.last["heatmap"], cnnlib.widgets._tile_channels(np.transpose(maps[keep], (1, 2, 0))),
                               atol=1e-6)
