"""Activations, sparsity, dead filters and filter weights, on hand-worked cases."""
import numpy as np
import pytest

import cnn_utils


def tiny_model(dead_bias=None):
    """image(4,4,1) -> conv (2 filters 2x2, valid, relu) -> maxpool 3x3 -> flatten -> logits(2).

    Filter 0 has kernel [[1,0],[0,0]] (copies the top-left pixel), bias 0; filter 1 has
    kernel [[0,0],[0,-1]] and bias ``dead_bias`` (default 0).
    """
    keras = cnn_utils._keras()
    inp = keras.Input((4, 4, 1), name="image")
    x = keras.layers.Conv2D(2, 2, activation="relu", name="conv")(inp)
    x = keras.layers.MaxPooling2D(3, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    out = keras.layers.Dense(2, name="logits")(x)
    model = keras.Model(inp, out)
    k = np.zeros((2, 2, 1, 2), np.float32)
    k[0, 0, 0, 0] = 1.0
    k[1, 1, 0, 1] = -1.0
    b = np.array([0.0, dead_bias or 0.0], np.float32)
    model.get_layer("conv").set_weights([k, b])
    return model


IMAGE = np.arange(16, dtype=np.float32).reshape(4, 4, 1) / 16.0


def test_get_activations_equals_hand_computation():
    model = tiny_model()
    acts = cnn_utils.get_activations(model, IMAGE)
    assert list(acts) == ["conv", "pool"]           # conv and pool layers, in model order
    conv = acts["conv"][0]
    # filter 0 copies pixel (i, j): the top-left 3x3 block of the image
    np.testing.assert_allclose(conv[..., 0], IMAGE[:3, :3, 0])
    # filter 1 is -pixel(i+1, j+1) <= 0, so relu gives 0 everywhere
    np.testing.assert_array_equal(conv[..., 1], 0)
    # max-pool 3x3 of a 3x3 map: its maximum, the value at (2, 2) = pixel 10 / 16
    np.testing.assert_allclose(acts["pool"][0, 0, 0], [10 / 16, 0.0])


def test_get_activations_named_layers_and_batches():
    model = tiny_model()
    x = np.stack([IMAGE, -IMAGE, 2 * IMAGE])
    acts = cnn_utils.get_activations(model, x, ["pool", "logits"], batch_size=2, input_range=None)
    assert list(acts) == ["pool", "logits"]
    assert acts["logits"].shape == (3, 2)
    np.testing.assert_allclose(acts["pool"][:, 0, 0, 0], [10 / 16, 0.0, 20 / 16], rtol=1e-6)
    # filter 1 of -IMAGE is +pixel(i+1, j+1): max over the block = pixel 15 / 16
    np.testing.assert_allclose(acts["pool"][1, 0, 0, 1], 15 / 16, rtol=1e-6)


def test_get_activations_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"Unknown layer 'nope'.*conv \(Conv2D\).*pool"):
        cnn_utils.get_activations(model, IMAGE, ["nope"])
    with pytest.raises(ValueError, match=r"expects \(4, 4, 1\)"):
        cnn_utils.get_activations(model, np.zeros((2, 5, 5, 1)))
    with pytest.raises(ValueError, match="NaN"):
        cnn_utils.get_activations(model, np.full((4, 4, 1), np.nan))


def test_layer_helpers(mnist_model):
    assert cnn_utils.conv_layer_names(mnist_model) == ["conv1", "conv2", "conv3"]
    assert cnn_utils.conv_and_pool_layer_names(mnist_model) == ["conv1", "pool1", "conv2", "pool2", "conv3"]
    assert cnn_utils.last_conv_layer_name(mnist_model) == "conv3"
    keras = cnn_utils._keras()
    inp = keras.Input((3,))
    dense_only = keras.Model(inp, keras.layers.Dense(2, name="d")(inp))
    with pytest.raises(ValueError, match="no convolutional layer.*d \\(Dense\\)"):
        cnn_utils.last_conv_layer_name(dense_only)


def test_channel_sparsity_hand_case():
    a = np.zeros((2, 2, 2, 4), np.float32)
    a[0, 0, 0, 0] = 1.0          # image 0: channel 0 on, channels 1-3 all zero -> 3/4
    a[1, :, :, 1] = 2.0          # image 1: channel 1 on ...
    a[1, 1, 1, 3] = 0.5          # ... and channel 3 -> 2/4 zero
    np.testing.assert_allclose(cnn_utils.channel_sparsity(a, per_image=True), [0.75, 0.5])
    assert cnn_utils.channel_sparsity(a) == pytest.approx(0.625)
    assert cnn_utils.channel_sparsity(a[0]) == pytest.approx(0.75)
    np.testing.assert_array_equal(cnn_utils.dead_channels(a), [2])
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        cnn_utils.channel_sparsity(np.zeros((3, 4)))


def test_layer_sparsity_and_dead_filter():
    model = tiny_model(dead_bias=-1.0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (20, 4, 4, 1)).astype(np.float32)
    # filter 1 = relu(-pixel - 1) is zero for every image in [0, 1]: dead; filter 0 fires
    np.testing.assert_array_equal(cnn_utils.dead_filters(model, "conv", x), [1])
    sp = cnn_utils.layer_sparsity(model, x)
    assert sp == {"conv": 0.5, "pool": 0.5}
    with pytest.raises(ValueError, match="not a feature map"):
        cnn_utils.dead_filters(model, "logits", x)


def test_sparsity_grows_with_depth_on_mnist(mnist, mnist_model):
    (_, _), (x_test, _) = mnist
    sp = cnn_utils.layer_sparsity(mnist_model, x_test[:300])
    assert sp["conv1"] <= sp["conv2"] <= sp["conv3"]
    assert sp["conv3"] > sp["conv1"] + 0.1


def test_filter_weights(mnist_model):
    k, b = cnn_utils.get_filter_weights(mnist_model, "conv1")
    assert k.shape == (3, 3, 1, 32) and b.shape == (32,)
    np.testing.assert_array_equal(k, mnist_model.get_layer("conv1").get_weights()[0])
    with pytest.raises(ValueError, match="not a Conv2D layer.*conv1, conv2, conv3"):
        cnn_utils.get_filter_weights(mnist_model, "pool1")


def test_plots_draw(mnist_model):
    import matplotlib
    matplotlib.use("Agg")
    model = tiny_model()
    acts = cnn_utils.get_activations(model, IMAGE)
    fig = cnn_utils.plot_all_channels(acts["conv"][0], title="conv")
    assert fig._suptitle.get_text() == "conv" and len(fig.axes) == 3      # 2 maps + colour bar
    assert fig.axes[1].get_title() == "ch 1 (0)"                           # the all-zero channel
    k, b = cnn_utils.get_filter_weights(mnist_model, "conv1")
    fig = cnn_utils.plot_kernels(k, bias=b)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[0] == f"{k[0, 0, 0, 0]:.2f}" and len(texts) == 9
    norm = fig.axes[0].images[0].norm
    assert norm.vmin == -norm.vmax == -np.abs(k).max()                    # centred on 0
    fig = cnn_utils.plot_layer_sparsity({"a": 0.1, "b": 0.5})
    assert fig.axes[0].get_ylabel().startswith("channels all zero")
    import matplotlib.pyplot as plt
    plt.close("all")


def test_match_filters_by_hand():
    # kernel b holds a's filters in another order, one of them scaled and shifted, one negated
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3, 1, 4))
    b = np.stack([a[..., 2], 3 * a[..., 0] + 1, -a[..., 3], a[..., 1]], axis=-1)
    index, corr = cnn_utils.match_filters(a, b)
    # filter 0 of a is b's filter 1 (correlation ignores scale and offset), 1 -> 3, 2 -> 0
    np.testing.assert_array_equal(index[:3], [1, 3, 0])
    np.testing.assert_allclose(corr[:3], 1.0, atol=1e-12)
    # a's filter 3 only has its negative in b: its best match is something else, below 1
    assert index[3] != 2 and corr[3] < 1.0
    # the value is the Pearson correlation of the flattened weights
    assert corr[3] == pytest.approx(np.corrcoef(a[..., 3].ravel(), b[..., index[3]].ravel())[0, 1])
    with pytest.raises(ValueError, match="in_channels"):
        cnn_utils.match_filters(a, rng.normal(size=(3, 3, 2, 4)))
    with pytest.raises(ValueError, match="get_filter_weights"):
        cnn_utils.match_filters(a[..., 0], a)
    with pytest.raises(ValueError, match="constant"):
        cnn_utils.match_filters(np.ones((3, 3, 1, 2)), a)


def test_likeness_above_chance_reads_the_gap_as_printed():
    words = [cnn_utils.likeness_above_chance(g) for g in (0.16, 0.151, 0.15, 0.05, 0.046, 0.044, 0.004, 0.0, -0.2)]
    # 0.151 prints as 0.15 (not above 0.15); 0.046 prints as 0.05; 0.004 prints as 0.00
    assert words == ["clearly", "somewhat", "somewhat", "somewhat", "somewhat", "hardly", "no", "no", "no"]
    for bad in (float("nan"), [0.1], None):
        with pytest.raises(ValueError, match="gap must be"):
            cnn_utils.likeness_above_chance(bad)


def test_get_activations_for_a_torch_module_matches_its_forward_hooks():
    """One function for both frameworks: a PyTorch module's layer outputs, channels last."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 3)).eval()
    x = np.random.default_rng(0).random((5, 12, 12, 3), dtype=np.float32)
    got = cnn_utils.get_activations(net, x, batch_size=2)
    assert list(got) == ["0", "2"]
    with torch.no_grad():
        conv = net[0](torch.from_numpy(x).permute(0, 3, 1, 2))
        pooled = net[2](torch.relu(conv))
    np.testing.assert_allclose(got["0"], conv.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)  # before the in-place ReLU
    np.testing.assert_allclose(got["2"], pooled.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)
    assert cnn_utils.get_activations(net, x, "1")["1"].min() >= 0
    with pytest.raises(ValueError, match="Unknown layer 'conv9'"):
        cnn_utils.get_activations(net, x, "conv9")
