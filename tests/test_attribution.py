"""Attribution methods, checked against cases worked out by hand in NumPy.

The tiny models have weights set by hand, so every map can be recomputed
independently of TensorFlow: a linear model (the gradient is the weight), a
1x1-convolution model whose feature maps and class-score gradients are plain
array arithmetic, and the same with a 2x2 average pooling to check the bilinear
upsampling. The shipped MNIST model is used for Integrated Gradients'
completeness, SmoothGrad, the sanity check of Adebayo et al. (2018) and the
comparison with tf-keras-vis.
"""
import numpy as np
import pytest

import cnnlib.attribution
import cnnlib.geometry
import cnnlib.keras_engine
import cnnlib.keras_layers
import cnn_utils as cu
from model_zoo import (CAM_LAYER, batchnorm_residual, conv_stack, functional_softmax_output, nested_sequential,
                       variable_size)

RNG = np.random.default_rng(0)
W_LIN = RNG.normal(size=(4 * 4 * 2, 3)).astype(np.float32)
B_LIN = np.array([0.1, -0.2, 0.3], dtype=np.float32)
# 1x1 convolution with two channels: A1 = relu(x - 0.2), A2 = relu(0.8 - x)
K_CONV = np.array([1.0, -1.0], dtype=np.float32)
B_CONV = np.array([-0.2, 0.8], dtype=np.float32)
W_CAM = RNG.normal(size=(4 * 4 * 2, 3)).astype(np.float32)
W_POOL = RNG.normal(size=(2 * 2 * 2, 3)).astype(np.float32)
B_DENSE = np.array([0.05, -0.1, 0.2], dtype=np.float32)


def _keras():
    return cu._keras()


@pytest.fixture(scope="module")
def linear_model():
    """image (4,4,2) -> flatten -> logits (Dense 3) -> probabilities (Softmax)."""
    keras = _keras()
    inp = keras.Input((4, 4, 2), name="image")
    z = keras.layers.Flatten(name="flatten")(inp)
    logits = keras.layers.Dense(3, name="logits")(z)
    out = keras.layers.Softmax(name="probabilities")(logits)
    model = keras.Model(inp, out)
    model.get_layer("logits").set_weights([W_LIN, B_LIN])
    return model


def _conv_model(pool):
    keras = _keras()
    inp = keras.Input((4, 4, 1), name="image")
    a = keras.layers.Conv2D(2, 1, activation="relu", name="conv")(inp)
    z = keras.layers.AveragePooling2D(2, name="pool")(a) if pool else a
    z = keras.layers.Flatten(name="flatten")(z)
    logits = keras.layers.Dense(3, name="logits")(z)
    out = keras.layers.Softmax(name="probabilities")(logits)
    model = keras.Model(inp, out)
    model.get_layer("conv").set_weights([K_CONV.reshape(1, 1, 1, 2), B_CONV])
    model.get_layer("logits").set_weights([W_POOL if pool else W_CAM, B_DENSE])
    return model


@pytest.fixture(scope="module")
def conv_model():
    return _conv_model(pool=False)


@pytest.fixture(scope="module")
def pool_model():
    return _conv_model(pool=True)


@pytest.fixture(scope="module")
def digits(mnist):
    (_, _), (x_test, y_test) = mnist
    return x_test[:16], y_test[:16]


# --- NumPy versions of the tiny models -------------------------------------------------------

def np_features(x):
    """(N,4,4,1) -> conv feature maps (N,4,4,2)."""
    return np.maximum(x * K_CONV + B_CONV, 0.0)


def np_logits(x):
    a = np_features(x)
    return a.reshape(len(x), -1) @ W_CAM + B_DENSE


def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_minmax(m):
    m = np.asarray(m, dtype=np.float64)
    lo = m.min(axis=(1, 2), keepdims=True)
    span = m.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (m - lo) / np.where(span > 0, span, 1), 0.0)


def tiny_images(n=3, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, size=(n, 4, 4, 1)).astype(np.float32)


# --- saliency, SmoothGrad, Integrated Gradients ------------------------------------------------

def test_linear_saliency_is_abs_weight(linear_model):
    x = np.random.default_rng(2).uniform(size=(3, 4, 4, 2)).astype(np.float32)
    for c in range(3):
        expected = np.abs(W_LIN[:, c].reshape(4, 4, 2)).max(axis=-1)
        raw = cu.saliency_map(linear_model, x, class_index=c, normalize=False)
        assert raw.shape == (3, 4, 4) and raw.dtype == np.float32
        np.testing.assert_allclose(raw, np.broadcast_to(expected, (3, 4, 4)), rtol=1e-6)
        scaled = cu.saliency_map(linear_model, x, class_index=c)
        np.testing.assert_allclose(scaled, np_minmax(np.broadcast_to(expected, (3, 4, 4))), atol=1e-6)


def test_linear_saliency_uses_logits_not_probabilities(linear_model):
    """The softmax gradient would mix in the other classes' weights; the default must not."""
    x = np.random.default_rng(3).uniform(size=(1, 4, 4, 2)).astype(np.float32)
    raw = cu.saliency_map(linear_model, x, class_index=1, normalize=False)
    np.testing.assert_allclose(raw[0], np.abs(W_LIN[:, 1].reshape(4, 4, 2)).max(-1), rtol=1e-6)
    p = np_softmax(x.reshape(1, -1) @ W_LIN + B_LIN)[0]
    # d p_1 / d x = p_1 (W_1 - sum_j p_j W_j)
    grad_p = p[1] * (W_LIN[:, 1] - W_LIN @ p)
    prob = cu.saliency_map(linear_model, x, class_index=1, normalize=False, score="probability")
    np.testing.assert_allclose(prob[0], np.abs(grad_p.reshape(4, 4, 2)).max(-1), rtol=1e-4, atol=1e-7)


def test_predicted_class_and_per_image_classes(linear_model):
    x = np.random.default_rng(4).uniform(size=(3, 4, 4, 2)).astype(np.float32)
    predicted = np.argmax(x.reshape(3, -1) @ W_LIN + B_LIN, axis=1)
    scores, classes = cu.class_scores(linear_model, x)
    np.testing.assert_array_equal(classes, predicted)
    np.testing.assert_allclose(scores, (x.reshape(3, -1) @ W_LIN + B_LIN)[np.arange(3), predicted], rtol=1e-5)
    per_image = cu.saliency_map(linear_model, x, class_index=[2, 0, 1], normalize=False)
    for i, c in enumerate([2, 0, 1]):
        np.testing.assert_allclose(per_image[i], np.abs(W_LIN[:, c].reshape(4, 4, 2)).max(-1), rtol=1e-6)
    default = cu.saliency_map(linear_model, x, normalize=False)
    explicit = cu.saliency_map(linear_model, x, class_index=predicted, normalize=False)
    np.testing.assert_array_equal(default, explicit)


def test_single_image_is_a_batch_of_one(linear_model):
    x = np.random.default_rng(5).uniform(size=(4, 4, 2)).astype(np.float32)
    one = cu.saliency_map(linear_model, x, class_index=0)
    assert one.shape == (1, 4, 4)
    np.testing.assert_array_equal(one, cu.saliency_map(linear_model, x[None], class_index=0))


def test_integrated_gradients_of_linear_model_is_input_times_weight(linear_model):
    x = np.random.default_rng(6).uniform(size=(2, 4, 4, 2)).astype(np.float32)
    base = np.full((4, 4, 2), 0.5, dtype=np.float32)
    attr, gap = cu.integrated_gradients(linear_model, x, class_index=2, baseline=base, steps=3,
                                        return_gap=True)
    assert attr.shape == x.shape and attr.dtype == np.float32
    np.testing.assert_allclose(attr, (x - base) * W_LIN[:, 2].reshape(4, 4, 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gap, 0.0, atol=1e-4)
    zero = cu.integrated_gradients(linear_model, x, class_index=2)  # black baseline
    np.testing.assert_allclose(zero, x * W_LIN[:, 2].reshape(4, 4, 2), rtol=1e-5, atol=1e-6)


def test_integrated_gradients_completeness_on_mnist(mnist_model, digits):
    x, _ = digits
    attr, gap = cu.integrated_gradients(mnist_model, x, steps=64, return_gap=True)
    scores, classes = cu.class_scores(mnist_model, x)
    base_scores, _ = cu.class_scores(mnist_model, np.zeros_like(x), classes)
    diff = scores - base_scores
    np.testing.assert_allclose(attr.reshape(len(x), -1).sum(1) - diff, gap, atol=1e-3)
    assert np.all(np.abs(gap) < 0.01 * np.abs(diff)), (gap, diff)
    # With very few steps the Riemann/trapezoid error is visibly larger: the gap is a real check.
    _, gap2 = cu.integrated_gradients(mnist_model, x, steps=2, return_gap=True)
    assert np.abs(gap2).mean() > 5 * np.abs(gap).mean()


def test_smoothgrad_without_noise_equals_saliency(mnist_model, digits):
    x, _ = digits
    sal = cu.saliency_map(mnist_model, x)
    sg = cu.smoothgrad(mnist_model, x, samples=4, noise=0.0, seed=0)
    np.testing.assert_allclose(sg, sal, atol=1e-6)


def test_smoothgrad_seed_repeats_and_noise_changes_map(mnist_model, digits):
    x, _ = digits
    a = cu.smoothgrad(mnist_model, x[:4], samples=8, seed=3)
    b = cu.smoothgrad(mnist_model, x[:4], samples=8, seed=3)
    c = cu.smoothgrad(mnist_model, x[:4], samples=8, seed=4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    assert a.shape == (4, 28, 28) and a.dtype == np.float32
    np.testing.assert_allclose(a.min(axis=(1, 2)), 0.0)
    np.testing.assert_allclose(a.max(axis=(1, 2)), 1.0)


def test_smoothgrad_linear_model_ignores_noise(linear_model):
    """The gradient of a linear model is the same everywhere, so noise cannot change it."""
    x = np.random.default_rng(7).uniform(size=(2, 4, 4, 2)).astype(np.float32)
    sg = cu.smoothgrad(linear_model, x, class_index=0, samples=5, noise=0.5, seed=1, normalize=False)
    np.testing.assert_allclose(sg, np.broadcast_to(np.abs(W_LIN[:, 0].reshape(4, 4, 2)).max(-1), (2, 4, 4)),
                               rtol=1e-5)


# --- Grad-CAM, Grad-CAM++, Score-CAM on the tiny conv model -----------------------------------

def test_grad_cam_by_hand(conv_model):
    x = tiny_images()
    a = np_features(x)                                               # (N,4,4,2)
    for c in (0, 2):
        g = W_CAM[:, c].reshape(4, 4, 2)                             # d S_c / d A, same for every image
        w = g.mean(axis=(0, 1))                                      # (2,)
        cam = np.maximum(a @ w, 0.0)                                 # (N,4,4), same size as input
        raw, weights = cu.grad_cam(conv_model, x, class_index=c, normalize=False, return_weights=True)
        np.testing.assert_allclose(weights, np.broadcast_to(w, (3, 2)), rtol=1e-5)
        np.testing.assert_allclose(raw, cam, rtol=1e-5, atol=1e-6)
        maps = cu.grad_cam(conv_model, x, class_index=c, layer="conv")
        assert maps.dtype == np.float32 and maps.shape == (3, 4, 4)
        np.testing.assert_allclose(maps, np_minmax(cam), atol=1e-5)


def test_grad_cam_plus_plus_by_hand(conv_model):
    x = tiny_images()
    a = np_features(x)
    c = 1
    g = np.broadcast_to(W_CAM[:, c].reshape(4, 4, 2), a.shape).astype(np.float64)
    a_sum = a.sum(axis=(1, 2), keepdims=True)                        # sum_ab A^k_ab, (N,1,1,2)
    denom = 2 * g ** 2 + a_sum * g ** 3
    alpha = np.where(denom != 0, g ** 2 / np.where(denom != 0, denom, 1), 0.0)
    w = (alpha * np.maximum(g, 0)).sum(axis=(1, 2))                  # (N,2)
    cam = np.maximum(np.einsum("nhwk,nk->nhw", a, w), 0.0)
    raw, weights = cu.grad_cam_plus_plus(conv_model, x, class_index=c, normalize=False, return_weights=True)
    np.testing.assert_allclose(weights, w, rtol=1e-4)
    np.testing.assert_allclose(raw, cam, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cu.grad_cam_plus_plus(conv_model, x, class_index=c), np_minmax(cam), atol=1e-5)
    # the authors' code renormalises the alphas over space
    alpha_r = alpha / np.where(alpha.sum(axis=(1, 2), keepdims=True) != 0, alpha.sum(axis=(1, 2), keepdims=True), 1)
    w_r = (alpha_r * np.maximum(g, 0)).sum(axis=(1, 2))
    _, weights_r = cu.grad_cam_plus_plus(conv_model, x, class_index=c, return_weights=True,
                                         renormalize_alphas=True)
    np.testing.assert_allclose(weights_r, w_r, rtol=1e-4)


def test_cam_upsampling_is_bilinear_half_pixel(pool_model):
    """A 2x2 map is upsampled to 4x4 with weights [1, .75/.25, .25/.75, 1] along each axis."""
    x = tiny_images(2, seed=9)
    a = np_features(x)
    p = a.reshape(2, 2, 2, 2, 2, 2).mean(axis=(2, 4))                 # 2x2 average pooling, (N,2,2,2)
    c = 0
    w = W_POOL[:, c].reshape(2, 2, 2).mean(axis=(0, 1))
    cam = np.maximum(p @ w, 0.0)                                     # (N,2,2)
    u = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    up = np.einsum("ij,njk,lk->nil", u, cam, u)
    raw = cu.grad_cam(pool_model, x, class_index=c, layer="pool", normalize=False)
    np.testing.assert_allclose(raw, up, rtol=1e-5, atol=1e-6)


def test_score_cam_channel_scores_by_hand(conv_model):
    x = tiny_images()
    a = np_features(x)                                               # (N,4,4,2): both channels vary
    lo = a.min(axis=(1, 2), keepdims=True)
    masks = (a - lo) / (a.max(axis=(1, 2), keepdims=True) - lo)      # (N,4,4,2)
    classes = np.argmax(np_logits(x), axis=1)
    expected_w = np.empty((3, 2))
    for i in range(3):
        for k in range(2):
            masked = x[i:i + 1] * masks[i, :, :, k:k + 1]
            expected_w[i, k] = np_softmax(np_logits(masked))[0, classes[i]]
    cam = np.maximum(np.einsum("nhwk,nk->nhw", a, expected_w), 0.0)
    maps, weights = cu.score_cam(conv_model, x, return_weights=True)
    np.testing.assert_allclose(weights, expected_w, rtol=1e-5)
    np.testing.assert_allclose(maps, np_minmax(cam), atol=1e-5)
    raw = cu.score_cam(conv_model, x, class_index=2, normalize=False)
    assert raw.shape == (3, 4, 4) and raw.dtype == np.float32


def test_score_cam_constant_channel_gets_zero_weight():
    keras = _keras()
    inp = keras.Input((4, 4, 1), name="image")
    a = keras.layers.Conv2D(2, 1, activation="relu", name="conv")(inp)
    logits = keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(a))
    model = keras.Model(inp, logits)
    # channel 2 is relu(-x - 1) = 0 everywhere: a constant map, no mask
    model.get_layer("conv").set_weights([np.array([1.0, -1.0], np.float32).reshape(1, 1, 1, 2),
                                         np.array([0.0, -1.0], np.float32)])
    model.get_layer("logits").set_weights([W_CAM, B_DENSE])
    _, weights = cu.score_cam(model, tiny_images(), return_weights=True)
    assert np.all(weights[:, 1] == 0) and np.all(weights[:, 0] > 0)


def test_constant_map_gives_zeros_not_nan(conv_model):
    # a black image: every feature map is constant, so every CAM is constant -> zeros
    x = np.zeros((2, 4, 4, 1), np.float32)
    for f in (cu.grad_cam, cu.grad_cam_plus_plus, cu.score_cam, cu.saliency_map):
        m = f(conv_model, x)
        assert np.all(np.isfinite(m)), f.__name__
    np.testing.assert_array_equal(cu.grad_cam(conv_model, x), 0.0)
    np.testing.assert_array_equal(cu.normalize_maps(np.ones((2, 3, 3))), 0.0)
    np.testing.assert_allclose(cu.normalize_maps([[[1.0, 3.0]], [[-2.0, -1.0]]]), [[[0, 1]], [[0, 1]]])


def test_default_layer_is_last_conv(mnist_model, digits):
    x, _ = digits
    np.testing.assert_array_equal(cu.grad_cam(mnist_model, x[:3]), cu.grad_cam(mnist_model, x[:3], layer="conv3"))
    assert cu.last_conv_layer_name(mnist_model) == "conv3"


def test_maps_on_mnist_are_scaled_per_image(mnist_model, digits):
    x, _ = digits
    for f in (cu.saliency_map, cu.grad_cam, cu.grad_cam_plus_plus, cu.score_cam):
        m = f(mnist_model, x[:5])  # predicted classes
        assert m.shape == (5, 28, 28) and m.dtype == np.float32, f.__name__
        np.testing.assert_allclose(m.max(axis=(1, 2)), 1.0, err_msg=f.__name__)
        np.testing.assert_allclose(m.min(axis=(1, 2)), 0.0, err_msg=f.__name__)
    # For a class with no positive evidence, ReLU(sum_k w_k A^k) is 0 everywhere: a zero map, not NaN.
    m = cu.grad_cam(mnist_model, x[:5], class_index=3, normalize=False)
    scaled = cu.grad_cam(mnist_model, x[:5], class_index=3)
    empty = m.max(axis=(1, 2)) == 0
    assert empty.any() and not empty.all()
    np.testing.assert_array_equal(scaled[empty], 0.0)
    np.testing.assert_allclose(scaled[~empty].max(axis=(1, 2)), 1.0)


def test_batch_equals_one_by_one(mnist_model, digits):
    """Batching over images (and over Score-CAM's channel chunks) changes nothing."""
    x, _ = digits
    for f in (cu.saliency_map, cu.grad_cam, cu.score_cam):
        batch = f(mnist_model, x[:4])
        single = np.concatenate([f(mnist_model, x[i]) for i in range(4)])
        np.testing.assert_allclose(batch, single, atol=1e-5, err_msg=f.__name__)


# --- sanity check (Adebayo et al., 2018) ------------------------------------------------------

def test_sanity_check_randomised_model_changes_maps(mnist_model, digits):
    x, _ = digits
    _, classes = cu.class_scores(mnist_model, x)
    random_model = cu.randomize_weights(mnist_model, seed=0)
    # two runs on the trained model: SmoothGrad with two seeds
    repeat = cu.rank_correlation(cu.smoothgrad(mnist_model, x, samples=25, seed=1),
                                 cu.smoothgrad(mnist_model, x, samples=25, seed=2)).mean()
    sal = cu.rank_correlation(cu.saliency_map(mnist_model, x, classes),
                              cu.saliency_map(random_model, x, classes)).mean()
    cam = cu.rank_correlation(cu.grad_cam(mnist_model, x, classes),
                              cu.grad_cam(random_model, x, classes)).mean()
    assert repeat > 0.9
    assert sal < repeat - 0.2, (sal, repeat)
    assert cam < 0.5, (cam, repeat)
    # the re-initialised copy really differs, and keeping every layer keeps the maps
    same = cu.randomize_weights(mnist_model, layer_names=[], seed=0)
    np.testing.assert_allclose(cu.grad_cam(same, x, classes), cu.grad_cam(mnist_model, x, classes), atol=1e-5)
    np.testing.assert_allclose(cu.rank_correlation(x[:3, ..., 0], x[:3, ..., 0]), 1.0)
    np.testing.assert_allclose(cu.rank_correlation([[[1, 2, 3]], [[0, 0, 0]], [[0, 0, 0]]],
                                                   [[[3, 2, 1]], [[0, 0, 0]], [[1, 2, 5]]]), [-1, 1, 0])


# --- errors -------------------------------------------------------------------------------------

def test_errors(mnist_model, digits):
    x, _ = digits
    with pytest.raises(ValueError, match=r"\(28, 28, 1\)"):
        cu.saliency_map(mnist_model, np.zeros((2, 32, 32, 1), np.float32))
    with pytest.raises(ValueError, match="batch"):
        cu.grad_cam(mnist_model, np.zeros((1, 1, 28, 28, 1), np.float32))
    bad = x[:2].copy()
    bad[0, 3, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cu.grad_cam(mnist_model, bad)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        cu.saliency_map(mnist_model, x[:2], class_index=10)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        cu.score_cam(mnist_model, x[:2], class_index=[1, -1])
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        cu.grad_cam(mnist_model, x[:2], class_index=[1, 2, 3])
    with pytest.raises(TypeError, match="class_index"):
        cu.grad_cam(mnist_model, x[:2], class_index=1.5)
    with pytest.raises(ValueError, match=r"conv1 \(Conv2D\), pool1 \(MaxPooling2D\)"):
        cu.grad_cam(mnist_model, x[:2], layer="conv9")
    with pytest.raises(ValueError, match="Convolutional layers of this model: conv1, conv2, conv3"):
        cu.grad_cam_plus_plus(mnist_model, x[:2], layer="dense1")
    with pytest.raises(ValueError, match="spatial"):
        cu.score_cam(mnist_model, x[:2], layer="image")
    with pytest.raises(ValueError, match="baseline"):
        cu.integrated_gradients(mnist_model, x[:3], baseline=x[:2])
    with pytest.raises(ValueError, match="steps"):
        cu.integrated_gradients(mnist_model, x[:1], steps=0)
    with pytest.raises(ValueError, match="noise"):
        cu.smoothgrad(mnist_model, x[:1], noise=-1)
    with pytest.raises(ValueError, match="score"):
        cu.saliency_map(mnist_model, x[:1], score="softmax")
    with pytest.raises(TypeError, match="Keras model"):
        cu.saliency_map("mnist", x[:1])
    with pytest.raises(ValueError, match="heatmap"):
        cu.overlay_heatmap(x[0], np.zeros((27, 28)))
    with pytest.raises(ValueError, match="conv1"):
        cu.randomize_weights(mnist_model, ["nope"])


def test_overlay_heatmap():
    img = np.full((2, 3, 1), 0.5, np.float32)
    heat = np.zeros((2, 3), np.float32)
    out = cu.overlay_heatmap(img, heat, alpha=0.4, cmap="gray")
    assert out.shape == (2, 3, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.6 * 0.5)                     # gray(0) = black
    out = cu.overlay_heatmap(img[..., 0], np.ones((2, 3)), alpha=1.0, cmap="gray")
    np.testing.assert_allclose(out, 1.0)
    jet = cu.overlay_heatmap(np.zeros((1, 1)), np.ones((1, 1)), alpha=1.0)
    assert jet[0, 0, 0] > 0.4 and jet[0, 0, 2] < 0.1              # jet(1) is dark red


def test_plotting_helpers(mnist_model, digits):
    import matplotlib.pyplot as plt

    x, _ = digits
    maps = {"saliency": cu.saliency_map(mnist_model, x[:2]), "Grad-CAM": cu.grad_cam(mnist_model, x[:2])}
    fig = cu.plot_attribution_maps(x[:2], maps, image_titles=["a", "b"], title="t")
    assert len(fig.axes) == 2 * 3 + 1  # + colour bar
    assert fig.axes[0].get_ylabel() == "a" and fig.axes[1].get_title() == "saliency"
    plt.close(fig)
    fig = cu.plot_attribution_maps(x[:2], maps, image_titles=["a", "b"], transpose=True)
    assert fig.axes[0].get_title() == "a" and fig.axes[2].get_ylabel() == "saliency"
    plt.close(fig)
    fig = cu.plot_signed_attributions(x[:2], cu.integrated_gradients(mnist_model, x[:2], steps=8))
    assert len(fig.axes) == 2 * 2 + 2
    plt.close(fig)


# --- comparison with tf-keras-vis on the shipped model -----------------------------------------

@pytest.fixture(scope="module")
def tkv(mnist_model):
    pytest.importorskip("tf_keras_vis")
    from tf_keras_vis.utils.scores import CategoricalScore

    # tf-keras-vis' ReplaceToLinear cannot strip a separate Softmax layer: give it the logits model
    return cu.logits_model(mnist_model), CategoricalScore


def test_tf_keras_vis_saliency_identical(mnist_model, digits, tkv):
    from tf_keras_vis.saliency import Saliency

    x, _ = digits
    lm, Score = tkv
    _, classes = cu.class_scores(mnist_model, x)
    theirs = Saliency(lm)(Score(list(classes)), x)
    np.testing.assert_allclose(cu.saliency_map(mnist_model, x), theirs, atol=1e-5)


def test_tf_keras_vis_smoothgrad_agrees_as_well_as_two_seeds(mnist_model, digits, tkv):
    from tf_keras_vis.saliency import Saliency

    x, _ = digits
    lm, Score = tkv
    _, classes = cu.class_scores(mnist_model, x)
    theirs = Saliency(lm)(Score(list(classes)), x, smooth_samples=20, smooth_noise=0.2)
    ours = cu.smoothgrad(mnist_model, x, samples=20, noise=0.2, seed=1)
    ours2 = cu.smoothgrad(mnist_model, x, samples=20, noise=0.2, seed=2)
    self_rho = cu.rank_correlation(ours, ours2).mean()
    rho = cu.rank_correlation(ours, theirs).mean()
    assert rho > 0.95 and rho > self_rho - 0.02, (rho, self_rho)


def _upsample_like_us(cam_lowres, model, layer, size=(28, 28)):
    r_y, r_x = cu.cam_upsampling_matrices(model, layer, size)
    return cu.normalize_maps(np.einsum("ij,njk,lk->nil", r_y, np.asarray(cam_lowres, np.float32), r_x))


def _corner_aligned(model, layer, input_hw, map_hw=None):
    """tf-keras-vis's placement (scipy.ndimage.zoom): first and last cells on the corner pixels."""
    map_hw = map_hw or tuple(model.get_layer(layer).output.shape[1:3])
    return tuple(cnnlib.geometry._linear_interpolation_matrix(np.arange(m) * (s - 1) / (m - 1), s)
                 for m, s in zip(map_hw, input_hw))


@pytest.mark.parametrize("layer", ["conv3", "conv2"])
def test_tf_keras_vis_gradcam_same_before_upsampling(mnist_model, digits, tkv, layer, monkeypatch):
    """tf-keras-vis upsamples with scipy.ndimage.zoom (corner-aligned); we place each cell at
    its receptive-field centre. Upsampling their low-resolution map our way gives our map
    exactly, and with their placement their full map."""
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus

    x, _ = digits
    lm, Score = tkv
    _, classes = cu.class_scores(mnist_model, x)
    score = Score(list(classes))
    low = Gradcam(lm)(score, x, penultimate_layer=layer, expand_cam=False, normalize_cam=False)
    np.testing.assert_allclose(cu.grad_cam(mnist_model, x, layer=layer),
                               _upsample_like_us(low, mnist_model, layer), atol=1e-4)
    # Grad-CAM++: identical with the authors' alpha renormalisation, different without it
    low = GradcamPlusPlus(lm)(score, x, penultimate_layer=layer, expand_cam=False, normalize_cam=False)
    ours_r = cu.grad_cam_plus_plus(mnist_model, x, layer=layer, renormalize_alphas=True)
    np.testing.assert_allclose(ours_r, _upsample_like_us(low, mnist_model, layer), atol=1e-4)
    paper = cu.grad_cam_plus_plus(mnist_model, x, layer=layer)
    assert np.abs(paper - ours_r).max() > 0.05
    full = Gradcam(lm)(score, x, penultimate_layer=layer)
    monkeypatch.setattr(cu, "cam_upsampling_matrices", _corner_aligned)
    assert cu.rank_correlation(cu.grad_cam(mnist_model, x, layer=layer), full).mean() > 0.9


def test_tf_keras_vis_scorecam_high_correlation(mnist_model, digits, tkv, monkeypatch):
    """Their masks are upsampled with scipy zoom (placed here the same way) and a constant
    channel still gets a weight; otherwise the same method, so the maps agree closely but not
    exactly."""
    from tf_keras_vis.scorecam import Scorecam

    monkeypatch.setattr(cu, "cam_upsampling_matrices", _corner_aligned)
    x, _ = digits
    lm, Score = tkv
    _, classes = cu.class_scores(mnist_model, x)
    for layer, bound in (("conv3", 0.85), ("conv2", 0.95)):
        theirs = Scorecam(lm)(Score(list(classes)), x, penultimate_layer=layer)
        rho = cu.rank_correlation(cu.score_cam(mnist_model, x, layer=layer), theirs).mean()
        assert rho > bound, (layer, rho)


# --- instructors' own models (issue 13): every supported shape, one table ---------------------

MODEL_SHAPES = {  # name: builder (its default CAM layer: model_zoo.CAM_LAYER)
    "softmax Dense, no logits layer": functional_softmax_output,
    "nested base": nested_sequential,
    "variable input size": variable_size,
    "BatchNorm, residual": batchnorm_residual,
}


@pytest.mark.parametrize("shape", list(MODEL_SHAPES))
@pytest.mark.parametrize("method", ["saliency_map", "smoothgrad", "integrated_gradients", "grad_cam",
                                    "grad_cam_plus_plus", "score_cam", "occlusion"])
def test_supported_model_shapes(shape, method):
    build = MODEL_SHAPES[shape]
    default_layer = CAM_LAYER[build]
    cu._keras().utils.set_random_seed(0)
    model = build()
    x = np.random.default_rng(0).random((2, 8, 8, 1)).astype(np.float32)
    maps = getattr(cu, method)(model, x)
    assert maps.shape == (x.shape if method == "integrated_gradients" else x.shape[:3])
    assert np.all(np.isfinite(maps))
    if method in ("grad_cam", "grad_cam_plus_plus", "score_cam"):
        assert cnnlib.keras_layers._resolve_layer(cnnlib.keras_layers._flat_model(model), None).name == default_layer
        np.testing.assert_array_equal(maps, getattr(cu, method)(model, x, layer=default_layer))
        assert maps.max() == 1.0


def test_softmax_dense_model_is_explained_with_its_pre_softmax_scores():
    cu._keras().utils.set_random_seed(0)
    model = functional_softmax_output()
    twin = functional_softmax_output(softmax_layer=True)   # the same weights, a separate Softmax
    twin.set_weights(model.get_weights())
    x = np.random.default_rng(0).random((3, 8, 8, 1)).astype(np.float32)
    for method in ("saliency_map", "grad_cam", "score_cam"):
        np.testing.assert_allclose(getattr(cu, method)(model, x, normalize=False),
                                   getattr(cu, method)(twin, x, normalize=False), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cu.class_scores(model, x)[0], cu.class_scores(twin, x)[0], rtol=1e-5)


def test_variable_input_size_in_cam_methods():
    cu._keras().utils.set_random_seed(0)
    model = variable_size()
    for side in (8, 13):
        x = np.random.default_rng(side).random((2, side, side, 1)).astype(np.float32)
        for method in ("grad_cam", "grad_cam_plus_plus", "score_cam"):
            assert getattr(cu, method)(model, x).shape == (2, side, side)


def test_nested_model_layers_reachable_by_name():
    cu._keras().utils.set_random_seed(0)
    model = nested_sequential()
    x = np.random.default_rng(0).random((2, 8, 8, 1)).astype(np.float32)
    assert cu.last_conv_layer_name(model) == "bc2" and cu.conv_layer_names(model) == ["bc1", "bc2"]
    assert cu.grad_cam(model, x, layer="bc1").shape == (2, 8, 8)
    # the flat graph computes what the nested model computes
    np.testing.assert_allclose(cnnlib.keras_layers._flat_model(model).predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6)


def test_binary_sigmoid_model_is_two_classes():
    """Logit z of a sigmoid unit becomes scores [-z/2, z/2]: softmax of them is
    [1 - sigmoid(z), sigmoid(z)], so Score-CAM's weights are sigmoids, not all 1.0."""
    keras = _keras()
    inp = keras.Input((4, 4, 2))
    model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inp)))
    w = RNG.normal(size=(32, 1)).astype(np.float32)
    model.layers[-1].set_weights([w, np.zeros(1, np.float32)])
    x = tiny_images(3, seed=4).repeat(2, axis=-1)
    grad = np.abs(w[:, 0].reshape(4, 4, 2) / 2).max(axis=-1)
    for c in (0, 1):
        np.testing.assert_allclose(cu.saliency_map(model, x, class_index=c, normalize=False),
                                   np.broadcast_to(grad, (3, 4, 4)), rtol=1e-5)
    z = x.reshape(3, -1) @ w[:, 0]
    scores, classes = cu.class_scores(model, x)
    np.testing.assert_array_equal(classes, (z > 0).astype(int))
    np.testing.assert_allclose(scores, np.abs(z) / 2, rtol=1e-5)
    probs, _ = cu.class_scores(model, x, class_index=1, score="probability")
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-z)), rtol=1e-5)


def test_binary_sigmoid_score_cam_weights_are_not_all_one():
    keras = _keras()
    cu._keras().utils.set_random_seed(1)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.GlobalAveragePooling2D()(conv_stack(inp))
    model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(h))
    x = np.random.default_rng(0).random((2, 8, 8, 1)).astype(np.float32)
    _, w = cu.score_cam(model, x, return_weights=True)
    assert np.all((w >= 0) & (w < 1)) and np.ptp(w[w > 0]) > 0


@pytest.mark.parametrize("case, error, match", [
    ("two outputs", ValueError, "2 outputs.*model.outputs\\[i\\]"),
    ("unbuilt Sequential", ValueError, "not built yet"),
    ("empty batch", ValueError, "empty"),
    ("layer for a gradient method", ValueError, "layer must be None"),
    ("bad score", ValueError, "score must be"),
    ("nested base in a functional model", ValueError, "Sequential\\(\\[base, pooling, head\\]\\)"),
])
def test_refused_clearly(case, error, match):
    keras = _keras()
    inp = keras.Input((4, 4, 1))
    h = keras.layers.Flatten()(inp)
    one = keras.Model(inp, keras.layers.Dense(3)(h))
    x = np.zeros((1, 4, 4, 1), np.float32)
    call = {
        "two outputs": lambda: cu.grad_cam(keras.Model(inp, [keras.layers.Dense(3)(h), keras.layers.Dense(2)(h)]), x),
        "unbuilt Sequential": lambda: cu.saliency_map(keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(3)]), x),
        "empty batch": lambda: cu.saliency_map(one, np.zeros((0, 4, 4, 1), np.float32)),
        "layer for a gradient method": lambda: cu.smoothgrad(one, x, layer="dense"),
        "bad score": lambda: cu.score_cam(one, x, score="softmax"),
        "nested base in a functional model": lambda: cu.grad_cam(_functional_with_nested_base(), x),
    }[case]
    with pytest.raises(error, match=match):
        call()


def _functional_with_nested_base():
    keras = _keras()
    inp = keras.Input((4, 4, 1))
    base = keras.Model(inp, keras.layers.Conv2D(3, 3, name="c")(inp), name="base")
    outer_in = keras.Input((4, 4, 1))
    h = keras.layers.GlobalAveragePooling2D()(base(outer_in))
    return keras.Model(outer_in, keras.layers.Dense(2)(h))


def test_memory_budget_splits_every_method(mnist_model, digits, monkeypatch):
    """With a tiny budget every call runs in many small chunks, and gives the same maps."""
    x, _ = digits
    x = x[:6]
    full = {m: getattr(cu, m)(mnist_model, x, **kw) for m, kw in CHUNK_CASES}
    calls = []

    def counted(original):
        def call(self, xb, *args):
            calls.append(len(xb))
            return original(self, xb, *args)
        return call
    for name in ("grad", "layer_grad", "forward", "features"):
        monkeypatch.setattr(cnnlib.keras_engine._KerasEngine, name, counted(getattr(cnnlib.keras_engine._KerasEngine, name)))
    monkeypatch.setattr(cu, "ATTRIBUTION_MEMORY_BUDGET", 1)        # one input per call
    for m, kw in CHUNK_CASES:
        calls.clear()
        np.testing.assert_allclose(getattr(cu, m)(mnist_model, x, **kw), full[m], rtol=1e-4, atol=1e-5, err_msg=m)
        assert calls and max(calls) == 1, (m, calls)


@pytest.mark.parametrize("value, mib", [("", 1024), ("256", 256), (" 64 ", 64)])
def test_memory_budget_from_the_environment(monkeypatch, value, mib):
    monkeypatch.setenv(cu.MEMORY_BUDGET_ENV_VAR, value)
    assert cnnlib.attribution._memory_budget_from_env() == mib << 20


@pytest.mark.parametrize("value", ["abc", "1.5", "8", "-256"])
def test_bad_memory_budget_warns_and_keeps_the_default(monkeypatch, value):
    monkeypatch.setenv(cu.MEMORY_BUDGET_ENV_VAR, value)
    with pytest.warns(UserWarning, match="CNN_COURSE_MEMORY_BUDGET_MB"):
        assert cnnlib.attribution._memory_budget_from_env() == 1024 << 20


CHUNK_CASES = [("saliency_map", {}), ("smoothgrad", dict(samples=3, seed=0)),
               ("integrated_gradients", dict(steps=4)), ("grad_cam", {}), ("grad_cam_plus_plus", {}),
               ("score_cam", {}), ("occlusion", dict(window=7, stride=7))]
