"""Instructors' own models: every supported shape works with get_activations and
activation_maximization, checked against the same computation done directly in Keras.

Shapes: Sequential (with an Input, or built later), functional, softmax- or logits-output,
BatchNorm and residual blocks, variable input size, nested transfer-learning models
(``Sequential([base, pooling, head])`` and a base inside a functional model), and a
``keras.applications`` model (MobileNetV2, weights=None, alpha=0.35, 32 x 32 input).
"""
import numpy as np
import pytest

import cnn_utils
import cnnlib.keras_engine
from model_zoo import (base_model, batchnorm_residual, direct, functional_softmax_output, images, keras,
                        nested_functional, nested_sequential, sequential_built_later, sequential_with_input,
                        variable_size)

# (builder, a layer name, the independent computation of that layer's output)
CASES = {
    "sequential": (sequential_with_input, "c1", lambda m, x: direct(m, "c1")(x)),
    "sequential built later": (sequential_built_later, "c1", lambda m, x: direct(m, "c1")(x)),
    "functional, softmax output": (functional_softmax_output, "c1", lambda m, x: direct(m, "c1")(x)),
    "batchnorm + residual": (batchnorm_residual, "add", lambda m, x: direct(m, "add")(x)),
    "nested sequential": (nested_sequential, "bc2",
                          lambda m, x: direct(m.get_layer("base"), "bc2")(x)),
    "nested functional": (nested_functional, "bc2",
                          lambda m, x: direct(m.get_layer("base"), "bc2")(2.0 * x - 1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_get_activations_equals_the_direct_computation(case):
    build, layer, reference = CASES[case]
    model = build()
    x = images()
    acts = cnn_utils.get_activations(model, x, [layer], batch_size=2)
    np.testing.assert_allclose(acts[layer], np.asarray(reference(model, x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_activation_maximization_raises_its_objective(case):
    build, layer, reference = CASES[case]
    model = build()
    fv = cnn_utils.activation_maximization(model, layer, [0, 1], steps=20, lr=0.2, seed=0)
    assert fv.images.shape == (2, 8, 8, 1)
    assert np.all(fv.objective > fv.start_objective)
    # the reported objective is the layer's mean output (or pre-ReLU mean) on the final images
    out = np.asarray(reference(model, fv.images))
    post = out.mean(axis=(1, 2))[np.arange(2), [0, 1]]
    np.testing.assert_allclose(fv.activation, post, rtol=1e-4, atol=1e-5)


def test_batchnorm_runs_in_inference_mode():
    model = batchnorm_residual()
    x = images()
    acts = cnn_utils.get_activations(model, x, ["c1", "bn1"])
    # inference: (x - moving_mean) / sqrt(moving_var + eps) * gamma + beta, gamma 2, beta 0.5
    expected = (acts["c1"] - 0.3) / np.sqrt(4.0 + 1e-3) * 2.0 + 0.5
    np.testing.assert_allclose(acts["bn1"], expected, rtol=1e-5, atol=1e-5)


def test_nested_layers_are_found_by_default_and_by_path():
    model = nested_sequential()
    assert cnn_utils.conv_and_pool_layer_names(model) == ["bc1", "bc2", "gap"]
    x = images()
    acts = cnn_utils.get_activations(model, x)
    assert list(acts) == ["bc1", "bc2", "gap"]
    assert acts["bc1"].shape == (3, 6, 6, 3) and acts["bc2"].shape == (3, 4, 4, 5)
    by_path = cnn_utils.get_activations(model, x, ["base/bc1"])["base/bc1"]
    np.testing.assert_array_equal(by_path, acts["bc1"])
    kernel, bias = cnn_utils.get_filter_weights(model, "bc2")
    assert kernel.shape == (3, 3, 3, 5) and bias.shape == (5,)
    assert len(cnn_utils.dead_filters(model, "bc2", x)) <= 5


def test_two_bases_with_the_same_layer_names_need_paths():
    k = keras()
    inp = k.Input((8, 8, 1))
    a = base_model("base_a")(inp)
    b = base_model("base_b")(inp)
    x = k.layers.Concatenate(name="cat")([a, b])
    model = k.Model(inp, k.layers.Dense(2, name="logits")(k.layers.Flatten(name="f")(x)))
    assert cnn_utils.conv_and_pool_layer_names(model) == ["base_a/bc1", "base_a/bc2", "base_b/bc1", "base_b/bc2"]
    with pytest.raises(ValueError, match=r"occurs in several nested models.*base_a/bc1, base_b/bc1"):
        cnn_utils.get_activations(model, images(), ["bc1"])
    acts = cnn_utils.get_activations(model, images(), ["base_a/bc2", "base_b/bc2"])
    np.testing.assert_allclose(acts["base_a/bc2"],
                               direct(model.get_layer("base_a"), "bc2")(images()), rtol=1e-5, atol=1e-6)


def test_unknown_nested_layer_lists_the_nested_layers():
    with pytest.raises(ValueError, match=r"Unknown layer 'bc9'.*base/bc1 \(Conv2D\).*base/bc2"):
        cnn_utils.get_activations(nested_sequential(), images(), ["bc9"])


def test_unbuilt_sequential_is_explained():
    k = keras()
    model = k.Sequential([k.layers.Conv2D(3, 3, name="c1"), k.layers.Flatten(), k.layers.Dense(2)])
    for call in (lambda: cnn_utils.get_activations(model, images()),
                 lambda: cnn_utils.activation_maximization(model, "c1", 0, steps=2),
                 lambda: cnn_utils.predict_logits(model, images())):
        with pytest.raises(ValueError, match=r"no defined input yet.*keras.Input.*model.build"):
            call()


def test_softmax_output_model_maximizes_the_pre_softmax_score():
    model = functional_softmax_output()
    fv = cnn_utils.activation_maximization(model, "out", [2], steps=15, seed=0)
    k = keras()
    features = k.Model(model.inputs[0], model.get_layer("f").output)(fv.images)
    w, b = model.get_layer("out").get_weights()
    logits = np.asarray(features) @ w + b
    np.testing.assert_allclose(fv.objective, logits[:, 2], rtol=1e-4, atol=1e-5)
    assert not fv.dead.any()


def test_variable_input_size():
    model = variable_size()
    for size in (7, 12):
        x = images(2, size)
        acts = cnn_utils.get_activations(model, x)
        assert acts["c1"].shape == (2, size - 2, size - 2, 4) and acts["c2"].shape == (2, size - 4, size - 4, 5)
        np.testing.assert_allclose(acts["gmp"], acts["c2"].max(axis=(1, 2)), rtol=1e-6)
    with pytest.raises(ValueError, match=r"any size.*image_shape=\(H, W, C\)"):
        cnn_utils.activation_maximization(model, "c1", 0, steps=2)
    for shape in ((10, 10, 1), (9, 14, 1)):
        fv = cnn_utils.activation_maximization(model, "c1", [0, 1], steps=10, seed=0, image_shape=shape,
                                               spatial="center")
        assert fv.images.shape == (2,) + shape
        assert np.all(fv.objective > fv.start_objective)
    with pytest.raises(ValueError, match="image_shape must be"):
        cnn_utils.activation_maximization(model, "c1", 0, steps=2, image_shape=(10, 10, 3))


@pytest.fixture(scope="module")
def mobilenet():
    k = keras()
    base = k.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                      include_top=False)
    model = k.Sequential([k.Input((32, 32, 3)), base, k.layers.GlobalAveragePooling2D(name="gap"),
                          k.layers.Dense(3, name="logits")], name="mobilenet_transfer")
    return cnn_utils.set_input_range(model, (-1.0, 1.0)), base


def test_keras_applications_model_nested(mobilenet):
    model, base = mobilenet
    k = keras()
    pixels = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    names = cnn_utils.conv_and_pool_layer_names(model)
    assert names[0] == "Conv1" and "gap" in names and len(names) > 30
    acts = cnn_utils.get_activations(model, pixels, ["Conv1", "out_relu"])
    # uint8 pixels are mapped onto the declared range [-1, 1]: MobileNetV2's own preprocessing
    x = k.applications.mobilenet_v2.preprocess_input(pixels.astype(np.float32))
    np.testing.assert_allclose(acts["Conv1"], direct(base, "Conv1")(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(acts["out_relu"], direct(base, "out_relu")(x), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match=r"outside the model's input range \[-1, 1\]"):
        cnn_utils.get_activations(model, pixels.astype(np.float32), ["Conv1"])
    fv = cnn_utils.activation_maximization(model, "block_1_expand", [0, 1], steps=10, seed=0)
    assert fv.images.shape == (2, 32, 32, 3)
    assert abs(float(fv.images.mean())) < 0.5          # started at the middle of [-1, 1]
    assert np.all(fv.objective > fv.start_objective)


def test_predict_logits_of_models_without_a_logits_layer():
    k = keras()
    inp = k.Input((8, 8, 1))
    x = k.layers.Flatten()(k.layers.Conv2D(2, 3, name="c1")(inp))
    scores = k.layers.Dense(4, name="scores")(x)
    raw = k.Model(inp, scores, name="raw_scores")                       # ends without softmax
    with_softmax = k.Model(inp, k.layers.Softmax(name="sm")(scores), name="with_softmax")
    x = images()
    direct_scores = np.asarray(raw(x))
    np.testing.assert_allclose(cnn_utils.predict_logits(raw, x), direct_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cnn_utils.predict_logits(with_softmax, x), direct_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cnn_utils.softmax(cnn_utils.predict_logits(with_softmax, x)),
                               with_softmax.predict(x, verbose=0), rtol=1e-4, atol=1e-6)


def test_a_batch_of_grey_images_without_channel_axis():
    model = sequential_with_input()
    x = images(5)
    np.testing.assert_array_equal(cnn_utils.as_image_batch(x[..., 0], model), x)       # (N, H, W)
    np.testing.assert_array_equal(cnn_utils.as_image_batch(x[0, ..., 0], model), x[:1])  # (H, W)


# --- instructors' own models, third round (issue 22) -------------------------------------------

def _head_model(tail, units=4):
    """conv c1, bn, a residual add and its ReLU ('block_out'), gap, Dense 'dense_out' (logits),
    then ``tail`` (a softmax written one way or another). Returns (model, logits sub-model)."""
    k = keras()
    inp = k.Input((8, 8, 3))
    h = k.layers.Conv2D(4, 3, padding="same", name="c0")(inp)
    y = k.layers.Conv2D(4, 3, padding="same", name="c1")(h)
    y = k.layers.BatchNormalization(name="bn")(y)
    h = k.layers.Add(name="add")([h, y])
    h = k.layers.Activation("relu", name="block_out")(h)
    z = k.layers.Dense(units, name="dense_out")(k.layers.GlobalAveragePooling2D(name="gap")(h))
    return k.Model(inp, tail(z)), k.Model(inp, z)


def _tape_saliency(fn, x, cls, probability=False):
    tf = cnn_utils._tf()
    t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(t)
        z = fn(t)
        z = tf.nn.softmax(z) if probability else z
        target = tf.reduce_sum(tf.gather(z, cls, axis=1, batch_dims=1))
    return np.abs(tape.gradient(target, t).numpy()).max(axis=-1)


@pytest.mark.parametrize("tail", ["keras.ops.softmax", "Activation('softmax')"])
def test_a_softmax_written_as_an_op_or_activation_gives_its_input_as_logits(tail):
    k = keras()
    fn = {"keras.ops.softmax": lambda z: k.ops.softmax(z),
          "Activation('softmax')": lambda z: k.layers.Activation("softmax")(z)}[tail]
    model, logits = _head_model(fn)
    x = images(2, channels=3)
    cls = np.array([1, 3])
    np.testing.assert_allclose(cnn_utils.predict_logits(model, x), logits(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cnn_utils.saliency_map(model, x, cls, normalize=False),
                               _tape_saliency(logits, x, cls), rtol=1e-4, atol=1e-8)
    # "probability": the model's own softmax, once
    np.testing.assert_allclose(cnn_utils.saliency_map(model, x, cls, score="probability", normalize=False),
                               _tape_saliency(logits, x, cls, probability=True), rtol=1e-4, atol=1e-9)


def test_a_softmax_hidden_in_a_lambda_is_recognised_from_the_values():
    k = keras()
    model, logits = _head_model(lambda z: k.layers.Lambda(lambda t: k.ops.softmax(t))(z))
    x = images(2, channels=3)
    cls = np.array([1, 3])
    with pytest.raises(ValueError, match="looks like probabilities"):
        cnn_utils.saliency_map(model, x, cls)
    with pytest.raises(ValueError, match="predict_logits cannot give"):
        cnn_utils.predict_logits(model, x)
    np.testing.assert_allclose(cnn_utils.saliency_map(model, x, cls, score="probability", normalize=False),
                               _tape_saliency(logits, x, cls, probability=True), rtol=1e-4, atol=1e-9)


def test_a_conv_named_logits_inside_the_network_is_not_the_class_scores():
    k = keras()
    inp = k.Input((8, 8, 3))
    h = k.layers.Conv2D(4, 1, name="logits")(k.layers.Conv2D(4, 3, name="c")(inp))
    z = k.layers.GlobalAveragePooling2D()(h)
    model = k.Model(inp, k.layers.Softmax()(z))
    x = images(2, channels=3)
    np.testing.assert_allclose(cnn_utils.predict_logits(model, x), k.Model(inp, z)(x), rtol=1e-5, atol=1e-6)


def test_default_cam_layer_is_the_block_output_after_the_add_and_relu():
    model, _ = _head_model(lambda z: z)
    x = images(2, channels=3)
    engine = cnnlib.keras_engine._KerasEngine(model, "logits")
    assert engine.resolve_layer(None, x) == "block_out"
    np.testing.assert_array_equal(cnn_utils.grad_cam(model, x), cnn_utils.grad_cam(model, x, layer="block_out"))


def test_layers_after_a_squeeze_excite_gate_have_cams():
    k = keras()
    inp = k.Input((8, 8, 3))
    h = k.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inp)
    g = k.layers.GlobalAveragePooling2D(name="se_squeeze")(h)
    g = k.layers.Reshape((1, 1, 4), name="se_reshape")(g)
    g = k.layers.Conv2D(4, 1, activation="sigmoid", name="se_expand")(g)
    h = k.layers.Multiply(name="se_scale")([h, g])
    h = k.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="c2")(h)
    model = k.Model(inp, k.layers.Dense(3)(k.layers.GlobalAveragePooling2D()(h)))
    rf = cnn_utils.receptive_fields(model, "c2")
    # the gate changes no position: TensorFlow's "same" padding at stride 2 pads after, centres 1, 3, 5, 7
    np.testing.assert_allclose(rf.y.centres, 1.0 + 2.0 * np.arange(4))
    maps = cnn_utils.grad_cam(model, images(2, channels=3))
    assert maps.shape == (2, 8, 8)
    np.testing.assert_array_equal(maps, cnn_utils.grad_cam(model, images(2, channels=3), layer="c2"))


def test_a_subclassed_model_that_was_called_is_not_called_unbuilt():
    k = keras()

    class Net(k.Model):
        def __init__(self):
            super().__init__()
            self.conv = k.layers.Conv2D(3, 3)
            self.head = k.layers.Dense(2)

        def call(self, x):
            return self.head(k.ops.mean(self.conv(x), axis=(1, 2)))

    net = Net()
    net(images(1, channels=3))
    for call in (lambda: cnn_utils.saliency_map(net, images(1, channels=3)),
                 lambda: cnn_utils.get_activations(net, images(1, channels=3))):
        with pytest.raises(ValueError, match="subclassed keras.Model.*built and called") as err:
            call()
        assert "not built yet" not in str(err.value)


def test_a_declared_range_reaches_the_cam_methods_of_a_nested_model():
    """The README's transfer-learning shape: Sequential([base, pooling, head]), range (-1, 1)."""
    model = nested_sequential()
    cnn_utils.set_input_range(model, (-1, 1))
    x = 2.0 * images() - 1.0                       # valid images in (-1, 1)
    maps = cnn_utils.grad_cam(model, x, layer="bc2")
    assert maps.shape == (3, 8, 8)
    u8 = (images() * 255).astype(np.uint8)        # uint8 mapped onto (-1, 1), not onto [0, 1]
    np.testing.assert_allclose(cnn_utils.grad_cam(model, u8, layer="bc2", normalize=False),
                               cnn_utils.grad_cam(model, u8 / np.float32(255) * 2 - 1, layer="bc2",
                                                  normalize=False), rtol=1e-5, atol=1e-7)


def test_smoothgrad_noise_is_fixed_per_image_by_the_seed():
    model = sequential_with_input()
    x = images(3)
    together = cnn_utils.smoothgrad(model, x, class_index=1, samples=4, seed=7, normalize=False)
    for i in range(3):
        alone = cnn_utils.smoothgrad(model, x[i:i + 1], class_index=1, samples=4, seed=7, normalize=False)
        np.testing.assert_allclose(together[i], alone[0], rtol=1e-6)
