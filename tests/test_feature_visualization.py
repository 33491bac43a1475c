"""Total variation, activation maximization and deprocessing, on hand-worked cases."""
import numpy as np
import pytest

import cnn_utils


def linear_model(w):
    """image (H, W, 1) -> flatten -> logits (Dense, no bias): score_k = <W_k, x>."""
    keras = cnn_utils._keras()
    h, wd, k = w.shape
    inp = keras.Input((h, wd, 1), name="image")
    x = keras.layers.Flatten(name="flatten")(inp)
    out = keras.layers.Dense(k, use_bias=False, name="logits")(x)
    model = keras.Model(inp, out)
    model.get_layer("logits").set_weights([w.reshape(h * wd, k)])
    return model


def conv_model_with_dead_filter():
    """image(6,6,1) -> conv (2 filters 3x3, relu): filter 0 a real edge detector,
    filter 1 all-zero weights and bias -1 (never fires, whatever the input)."""
    keras = cnn_utils._keras()
    inp = keras.Input((6, 6, 1), name="image")
    out = keras.layers.Conv2D(2, 3, activation="relu", name="conv")(inp)
    model = keras.Model(inp, out)
    k = np.zeros((3, 3, 1, 2), np.float32)
    k[:, 0, 0, 0], k[:, 2, 0, 0] = -1.0, 1.0
    model.get_layer("conv").set_weights([k, np.array([0.0, -1.0], np.float32)])
    return model


def test_total_variation_hand_values():
    # varies only along columns: each row is [0, 1, 3] -> (1^2 + 2^2) per row, 2 rows
    x = np.tile(np.array([0.0, 1.0, 3.0], np.float32), (2, 1))[..., None]
    assert float(cnn_utils.total_variation(x)[0]) == pytest.approx(10.0)
    # the same transposed (varies only along rows) gives the same value
    assert float(cnn_utils.total_variation(x.transpose(1, 0, 2))[0]) == pytest.approx(10.0)
    # varies only across channels: spatially constant in each channel -> 0
    y = np.broadcast_to(np.array([0.0, 5.0, -2.0], np.float32), (4, 4, 3))
    assert float(cnn_utils.total_variation(y)[0]) == 0.0
    # a checkerboard 2x2: 2 row differences + 2 column differences of 1 -> 4; batched
    c = np.array([[0, 1], [1, 0]], np.float32)[..., None]
    np.testing.assert_allclose(cnn_utils.total_variation(np.stack([c, 2 * c])).numpy(), [4.0, 16.0])
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        cnn_utils.total_variation(np.zeros((3, 3)))


def test_activation_maximization_linear_model_follows_the_weights():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 4, 3)).astype(np.float32)
    model = linear_model(w)
    res = cnn_utils.activation_maximization(model, "logits", [0, 2], steps=20, lr=0.5,
                                            init_mean=0.0, init_std=0.0)
    # constant gradient W_k: after 20 normalised steps x = 20 * 0.5 * W_k / |W_k|
    for pos, k in enumerate([0, 2]):
        expected = 10.0 * w[..., k] / np.linalg.norm(w[..., k])
        np.testing.assert_allclose(res.images[pos, ..., 0], expected, rtol=1e-4, atol=1e-5)
        assert res.objective[pos] == pytest.approx(10.0 * np.linalg.norm(w[..., k]), rel=1e-4)
    np.testing.assert_array_equal(res.indices, [0, 2])
    assert res.history.shape == (21, 2) and not res.dead.any()
    # the objective grows by lr * |W_k| per step
    np.testing.assert_allclose(np.diff(res.history[:, 0]), 0.5 * np.linalg.norm(w[..., 0]), rtol=1e-3)


def test_activation_maximization_raises_objective_on_mnist(mnist_model):
    res = cnn_utils.activation_maximization(mnist_model, "logits", 3, steps=40, seed=0)
    assert res.objective[0] > res.start_objective[0] + 10.0
    res = cnn_utils.activation_maximization(mnist_model, "conv2", [0, 5, 7], steps=40, seed=0)
    assert np.all(res.objective > res.start_objective + 0.1)   # gains here: 0.16 to 0.29
    assert np.all(res.activation > 0)


def test_regularizers_lower_norm_and_total_variation(mnist_model):
    kw = dict(steps=60, seed=0, init_mean=0.0, init_std=0.1)
    plain = cnn_utils.activation_maximization(mnist_model, "conv2", [1, 2, 3], **kw)
    l2 = cnn_utils.activation_maximization(mnist_model, "conv2", [1, 2, 3], l2=0.05, **kw)
    tv = cnn_utils.activation_maximization(mnist_model, "conv2", [1, 2, 3], tv=0.02, **kw)
    norms = lambda r: np.linalg.norm(r.images.reshape(3, -1), axis=1)  # noqa: E731
    assert np.all(norms(l2) < 0.9 * norms(plain))
    tv_plain = cnn_utils.total_variation(plain.images).numpy()
    assert np.all(cnn_utils.total_variation(tv.images).numpy() < 0.7 * tv_plain)


def test_jitter_and_seed_are_repeatable(mnist_model):
    a = cnn_utils.activation_maximization(mnist_model, "conv1", [0, 1], steps=10, jitter=2, seed=3)
    b = cnn_utils.activation_maximization(mnist_model, "conv1", [0, 1], steps=10, jitter=2, seed=3)
    c = cnn_utils.activation_maximization(mnist_model, "conv1", [0, 1], steps=10, jitter=2, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.allclose(a.images, c.images)


def test_dead_filter_detected():
    model = conv_model_with_dead_filter()
    res = cnn_utils.activation_maximization(model, "conv", None, steps=30, seed=0)
    np.testing.assert_array_equal(res.dead, [False, True])
    # the dead filter's (pre-ReLU) objective never moves from its bias
    np.testing.assert_allclose(res.history[:, 1], -1.0)
    assert res.activation[1] == 0.0 and res.activation[0] > 1.0
    x = np.random.default_rng(0).uniform(0, 1, (10, 6, 6, 1))
    np.testing.assert_array_equal(cnn_utils.dead_filters(model, "conv", x), [1])


def test_center_objective_finds_the_kernel():
    model = conv_model_with_dead_filter()
    res = cnn_utils.activation_maximization(model, "conv", 0, steps=5, lr=1.0, init_mean=0.0,
                                            init_std=0.0, spatial="center")
    # centre neuron of the 4x4 map is (2, 2): its receptive field is rows/cols 2..4;
    # the image moves along the kernel there (|k| = sqrt(6)) and stays 0 elsewhere
    expected = np.zeros((6, 6), np.float32)
    expected[2:5, 2:5] = np.array([[-1, 0, 1]] * 3) * 5.0 / np.sqrt(6)
    np.testing.assert_allclose(res.image[..., 0], expected, atol=1e-5)


def test_activation_maximization_errors(mnist_model):
    with pytest.raises(ValueError, match=r"out of range.*32 filters, valid indices are 0 to 31"):
        cnn_utils.activation_maximization(mnist_model, "conv1", 32, steps=1)
    with pytest.raises(ValueError, match=r"valid indices are 0 to 9"):
        cnn_utils.activation_maximization(mnist_model, "logits", [-1], steps=1)
    with pytest.raises(ValueError, match=r"Unknown layer 'conv9'.*conv1 \(Conv2D\)"):
        cnn_utils.activation_maximization(mnist_model, "conv9", 0, steps=1)
    with pytest.raises(TypeError, match="int or a list of ints"):
        cnn_utils.activation_maximization(mnist_model, "conv1", 1.5, steps=1)
    with pytest.raises(ValueError, match="tv must be"):
        cnn_utils.activation_maximization(mnist_model, "conv1", 0, steps=1, tv=-1)


def test_deprocess_image_hand_case():
    x = np.array([[0.0, 2.0], [4.0, 6.0]])[..., None]
    # mean 3, std sqrt(5): (x - 3) / sqrt(5) * 0.15 + 0.5, * 255, rounded
    out = cnn_utils.deprocess_image(x)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 1)
    np.testing.assert_array_equal(out[..., 0], [[76, 110], [145, 179]])
    # an outlier far beyond 3.3 std is clipped to 255; a constant image is mid-grey
    y = np.zeros((10, 10)); y[0, 0] = 100.0
    assert cnn_utils.deprocess_image(y)[0, 0] == 255
    np.testing.assert_array_equal(cnn_utils.deprocess_image(np.full((3, 3, 1), 7.0)), 128)
    # per image in a batch, and the border crop
    batch = cnn_utils.deprocess_image(np.stack([x, 10 * x + 5]), crop=0)
    np.testing.assert_array_equal(batch[0], batch[1])
    assert cnn_utils.deprocess_image(np.zeros((2, 6, 6, 1)), crop=1).shape == (2, 4, 4, 1)
    with pytest.raises(ValueError, match="crop"):
        cnn_utils.deprocess_image(np.zeros((4, 4)), crop=2)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        cnn_utils.deprocess_image(np.zeros(5))


def test_plot_feature_visualizations_marks_dead():
    import matplotlib
    matplotlib.use("Agg")
    model = conv_model_with_dead_filter()
    res = cnn_utils.activation_maximization(model, "conv", None, steps=5, seed=0)
    fig = cnn_utils.plot_feature_visualizations(res.images, labels=["f0", "f1"], dead=res.dead)
    assert [t.get_text() for t in fig.axes[1].texts] == ["dead"]
    assert list(fig.axes[0].texts) == []
    import matplotlib.pyplot as plt
    plt.close("all")


def test_readable_ascent_loop_equals_the_compiled_function(mnist_model):
    """The loop notebook 03 shows (GradientTape, regularizers, jitter, L2-normalised step),
    run step by step in eager mode, gives the compiled batched function's images."""
    tf, keras = cnn_utils._tf(), cnn_utils._keras()
    to_scores = keras.Model(mnist_model.inputs, mnist_model.get_layer("logits").output)
    targets, steps, lr, l2, tv, seed = [3, 7], 8, 0.1, 0.05, 0.05, 0
    rng = np.random.default_rng(seed)
    x = tf.constant(0.5 + 0.1 * rng.standard_normal((2, 28, 28, 1)), tf.float32)
    shifts = rng.integers(-1, 2, size=(steps, 2))
    for t in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(x)
            score = tf.gather(to_scores(tf.roll(x, shifts[t].tolist(), axis=[1, 2])), targets, axis=1, batch_dims=0)
            score = tf.linalg.diag_part(score)                     # image i's score for targets[i]
            objective = score - l2 * tf.reduce_sum(x ** 2, axis=[1, 2, 3]) - tv * cnn_utils.total_variation(x)
        g = tape.gradient(objective, x)
        x = x + lr * g / (tf.sqrt(tf.reduce_sum(g ** 2, axis=[1, 2, 3], keepdims=True)) + 1e-8)
    fast = cnn_utils.activation_maximization(mnist_model, "logits", targets, steps=steps, lr=lr, l2=l2,
                                             tv=tv, jitter=1, seed=seed)
    assert np.abs(x.numpy() - 0.5).max() > 0.2                     # the images really moved
    np.testing.assert_allclose(x.numpy(), fast.images, atol=1e-4)
