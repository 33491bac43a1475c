"""VGG16 feature visualization (Olah et al. 2017 parametrisation and transformations),
receptive fields and top-activating crops, on random weights (the mechanics, not the pictures)."""
import numpy as np
import pytest

import cnnlib.feature_visualization
import cnn_utils

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def vgg():
    return cnn_utils.load_vgg16(pretrained=False, device="cpu")


def test_receptive_fields_by_hand(vgg):
    # 3x3 convs (padding 1) add 2 * stride; 2x2 poolings double the stride and shift by stride / 2
    assert cnn_utils.vgg_receptive_field(vgg, "conv1_1") == (3, 1, 0.0)
    assert cnn_utils.vgg_receptive_field(vgg, "relu1_2") == (5, 1, 0.0)
    assert cnn_utils.vgg_receptive_field(vgg, "pool1") == (6, 2, 0.5)
    assert cnn_utils.vgg_receptive_field(vgg, "conv3_3") == (40, 4, 1.5)
    assert cnn_utils.vgg_receptive_field(vgg, "conv5_3") == (196, 16, 7.5)
    assert cnn_utils.vgg_receptive_field(vgg, "pool5") == (212, 32, 15.5)


def test_fourier_parametrisation_by_hand():
    scale = cnnlib.feature_visualization._fourier_scale(4, 4)
    # DC term: 1 / (1/4) * sqrt(16) = 16; frequency (0, 1/4): 1 / 0.25 * 4 = 16; (1/2, 1/2): 4 / sqrt(0.5)
    assert scale.shape == (4, 3)
    np.testing.assert_allclose([scale[0, 0], scale[0, 1], scale[2, 2]], [16, 16, 4 / np.sqrt(0.5)], rtol=1e-6)
    zero = torch.zeros(2, 3, 8, 5, 2)
    s = torch.as_tensor(cnnlib.feature_visualization._fourier_scale(8, 8)).to(torch.complex64)
    img = cnnlib.feature_visualization._fourier_image(torch, zero, s, 8, 8, decorrelate=True)
    assert img.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(img.numpy(), 0.5)  # sigmoid(0)


@pytest.mark.parametrize("layer, unit", [("conv3_3", 7), ("relu2_1", 3), ("logits", 281)])
def test_recorded_objective_is_the_units_activation(vgg, layer, unit):
    # lr = 0 and no transformations: the image does not move and the objective recorded is
    # exactly the unit's mean activation (pre-ReLU for a relu layer) or class score on it
    r = cnn_utils.vgg_feature_visualization(vgg, layer, [unit, 0], size=32, steps=1, lr=0.0, jitter=0,
                                            scales=(), angles=(), pad=0, progress=False)
    img = r["images"]
    assert img.shape == (2, 32, 32, 3) and 0 < img.min() and img.max() < 1
    x = torch.from_numpy(img).permute(0, 3, 1, 2)
    with torch.no_grad():
        if layer == "logits":
            expected = vgg.classifier(torch.flatten(vgg.avgpool(vgg.features(cnn_utils.imagenet_normalize(x))), 1))[0, unit].item()
        else:
            pre = layer.replace("relu", "conv")
            expected = cnn_utils.vgg_layer_activations(vgg, img, pre)[0, unit].mean()
    np.testing.assert_allclose(r["objective"][0, 0], expected, rtol=1e-4, atol=1e-6)


def test_ascent_raises_every_units_objective(vgg):
    r = cnn_utils.vgg_feature_visualization(vgg, "conv2_2", [0, 5, 9], size=48, steps=12, lr=0.1,
                                            progress=False, seed=1)
    first, last = r["objective"][0], r["objective"][-3:].mean(axis=0)
    assert np.all(last > first), (first, last)
    assert r["layer"] == "conv2_2" and r["units"] == [0, 5, 9]


def test_bad_arguments(vgg):
    with pytest.raises(ValueError, match="Unknown layer 'conv9_1'.*conv1_1"):
        cnn_utils.vgg_feature_visualization(vgg, "conv9_1", 0, progress=False)
    with pytest.raises(ValueError, match="conv1_1 has 64 channels"):
        cnn_utils.vgg_feature_visualization(vgg, "conv1_1", [64], progress=False)
    with pytest.raises(ValueError, match="logits has 1000 classes"):
        cnn_utils.vgg_feature_visualization(vgg, "logits", 1000, progress=False)
    with pytest.raises(TypeError, match="units"):
        cnn_utils.vgg_feature_visualization(vgg, "conv1_1", [], progress=False)
    with pytest.raises(ValueError, match="size >= 32"):
        cnn_utils.vgg_feature_visualization(vgg, "conv1_1", 0, size=16, progress=False)


def test_layer_activations_equal_the_feature_maps_of_notebook_07(vgg):
    photo = np.round(cnn_utils.sample_photos(["coffee"], size=48)["coffee"] * 255).astype(np.uint8)
    names = cnn_utils.vgg_layer_names(vgg)
    for layer in ("conv1_1", "pool2", "relu4_3"):
        i = names.index(layer)
        expected = cnn_utils.vgg_feature_maps(vgg, cnn_utils.preprocess_image(photo, 48), [i])[i]
        got = cnn_utils.vgg_layer_activations(vgg, photo / 255.0, layer)
        assert got.shape == (1,) + expected.shape
        np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-4)


def test_top_activating_crops(vgg):
    photos = cnn_utils.sample_photos(["chelsea", "coffee", "rocket"], size=64)
    crops = cnn_utils.top_activating_crops(vgg, photos, "relu3_3", 11, k=4, per_photo=2)
    maps = cnn_utils.vgg_layer_activations(vgg, np.stack(list(photos.values())), "relu3_3")[:, 11]
    values = [c["value"] for c in crops]
    assert len(crops) == 4 and values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(maps.max())
    assert max(sum(c["photo"] == n for c in crops) for n in photos) <= 2
    size, stride, offset = cnn_utils.vgg_receptive_field(vgg, "relu3_3")
    for c in crops:
        r, q = c["position"]
        assert c["value"] == pytest.approx(maps[list(photos).index(c["photo"]), r, q])
        top, left, bottom, right = c["box"]
        centre_y, centre_x = offset + r * stride, offset + q * stride
        assert top <= centre_y < bottom and left <= centre_x < right
        assert bottom - top <= size + 1 and right - left <= size + 1
        np.testing.assert_array_equal(c["crop"], photos[c["photo"]][top:bottom, left:right])
    several = cnn_utils.top_activating_crops(vgg, photos, "relu3_3", [11, 7], k=4, per_photo=2)
    assert len(several) == 2
    for got, ch in zip(several, [11, 7]):
        alone = cnn_utils.top_activating_crops(vgg, photos, "relu3_3", ch, k=4, per_photo=2)
        assert [(c["photo"], c["position"], c["box"]) for c in got] == [(c["photo"], c["position"], c["box"])
                                                                         for c in alone]
    assert [c["value"] for c in several[0]] == values
    with pytest.raises(ValueError, match="channel must be an int from 0 to 255"):
        cnn_utils.top_activating_crops(vgg, photos, "relu3_3", 256)
    with pytest.raises(ValueError, match="channel must be an int from 0 to 255"):
        cnn_utils.top_activating_crops(vgg, photos, "relu3_3", [3, 256])
    with pytest.raises(ValueError, match="non-empty"):
        cnn_utils.top_activating_crops(vgg, {}, "relu3_3", 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cnn_utils.vgg_layer_activations(vgg, np.full((8, 8, 3), 2.0), "conv1_1")


def test_one_family_with_the_keras_activation_maximization(vgg, mnist_model):
    """Both frameworks' feature visualizations take (model, layer, units, steps=, lr=, jitter=, seed=)
    and return a FeatureVisualization (the dict keys of the earlier VGG16 result still read)."""
    import inspect

    keras_args = list(inspect.signature(cnn_utils.activation_maximization).parameters)
    torch_args = list(inspect.signature(cnn_utils.vgg_feature_visualization).parameters)
    assert keras_args[:3] == torch_args[:3] == ["model", "layer", "units"]
    assert {"steps", "lr", "jitter", "seed"} <= set(keras_args) & set(torch_args)
    r_torch = cnn_utils.vgg_feature_visualization(vgg, "conv1_2", [3, 1], size=32, steps=2, progress=False)
    r_keras = cnn_utils.activation_maximization(mnist_model, "conv1", [3, 1], steps=2, seed=0)
    for r, layer in ((r_torch, "conv1_2"), (r_keras, "conv1")):
        assert isinstance(r, cnn_utils.FeatureVisualization)
        assert r.layer == layer and r.units.tolist() == [3, 1] and len(r.images) == 2
        assert r.objective.shape == r.start_objective.shape == (2,)
    assert r_torch["images"] is r_torch.images and r_torch["objective"] is r_torch.history
    assert r_torch.history.shape == (2, 2) and r_torch["seconds"] > 0
    with pytest.raises(KeyError, match="images"):
        r_torch["image_list"]
