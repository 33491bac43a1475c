"""The small VGG16 feature-map viewer (PyTorch): each control changes what is shown, and
what is shown is exactly ``vgg_feature_maps``' output. Never imports TensorFlow."""
import numpy as np
import pytest

import cnn_utils

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def viewer():
    from skimage import data

    model = cnn_utils.load_vgg16(pretrained=False, device="cpu")
    photos = {"chelsea": data.chelsea(), "coffee": data.coffee()}
    return cnn_utils.vgg_layer_explorer(model, photos, size=64, layer="relu1_2"), model, photos


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
