"""What a user can hand the Keras-side helpers by mistake: each case gets a ValueError or
TypeError that names the argument and says what to do, never a raw error from inside
NumPy / TensorFlow, and never a silently wrong result. (PyTorch cases: test_vgg16.py.)
"""
import numpy as np
import pytest

import cnn_utils


def keras():
    return cnn_utils._keras()


def tiny():
    k = keras()
    inp = k.Input((6, 6, 1), name="image")
    x = k.layers.Conv2D(2, 3, activation="relu", name="conv")(inp)
    x = k.layers.Flatten(name="flatten")(x)
    return k.Model(inp, k.layers.Dense(3, name="logits")(x), name="tiny")


MODEL = None


def model():
    global MODEL
    if MODEL is None:
        MODEL = tiny()
    return MODEL


GOOD = np.random.default_rng(0).uniform(0, 1, (2, 6, 6, 1)).astype(np.float32)


# --- pixel scale ---------------------------------------------------------------

def test_uint8_is_scaled_to_the_models_range():
    pixels = np.array([0, 51, 255] * 12, np.uint8).reshape(6, 6, 1)
    x = cnn_utils.as_image_batch(pixels, model())
    assert x.dtype == np.float32 and x.shape == (1, 6, 6, 1)
    np.testing.assert_allclose(x[0, 0, :3, 0], [0.0, 0.2, 1.0], rtol=1e-6)
    other = cnn_utils.set_input_range(tiny(), (-1, 1))
    np.testing.assert_allclose(cnn_utils.as_image_batch(pixels, other)[0, 0, :3, 0], [-1.0, -0.6, 1.0],
                               rtol=1e-6)
    # the same logits as the float image in [0, 1]: nothing silently on the wrong scale
    np.testing.assert_allclose(cnn_utils.predict_logits(model(), pixels),
                               cnn_utils.predict_logits(model(), pixels / np.float32(255)), rtol=1e-6)


BAD_IMAGES = {
    "0..255 floats": (GOOD * 255, ValueError, r"values from .* outside the model's input range \[0, 1\]\. "
                                               r"They look like pixel values 0\.\.255: divide by 255"),
    "[-1, 1] floats": (GOOD * 2 - 1, ValueError, r"outside the model's input range.*set_input_range"),
    "empty batch": (np.zeros((0, 6, 6, 1), np.float32), ValueError, "empty batch"),
    "channels first": (np.zeros((2, 1, 6, 6), np.float32), ValueError,
                       r"expects \(6, 6, 1\).*channels seem to come first"),
    "wrong size": (np.zeros((2, 7, 7, 1), np.float32), ValueError, r"model expects \(6, 6, 1\)"),
    "NaN": (np.full((6, 6, 1), np.nan, np.float32), ValueError, "NaN"),
    "text": ("a picture", TypeError, "array of numbers"),
    "ragged list": ([np.zeros((6, 6, 1)), np.zeros((5, 6, 1))], TypeError, "array of numbers"),
    "complex": (np.zeros((6, 6, 1), complex), TypeError, "array of numbers"),
    "1-D": (np.zeros(36), ValueError, r"batch \(N, H, W, C\)"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
@pytest.mark.parametrize("call", ["as_image_batch", "predict_logits", "get_activations"])
def test_bad_images_are_explained(case, call):
    images, error, message = BAD_IMAGES[case]
    fn = {"as_image_batch": lambda x: cnn_utils.as_image_batch(x, model()),
          "predict_logits": lambda x: cnn_utils.predict_logits(model(), x),
          "get_activations": lambda x: cnn_utils.get_activations(model(), x)}[call]
    with pytest.raises(error, match=message):
        fn(images)


def test_declared_range_and_per_call_override():
    m = cnn_utils.set_input_range(tiny(), (0, 255))
    assert m.input_range == (0.0, 255.0) and cnn_utils.model_input_range(m) == (0.0, 255.0)
    assert cnn_utils.as_image_batch(GOOD * 255, m).max() > 1      # accepted as is
    np.testing.assert_array_equal(cnn_utils.as_image_batch(np.full((6, 6, 1), 255, np.uint8), m), 255.0)
    off = cnn_utils.set_input_range(tiny(), None)
    assert cnn_utils.as_image_batch(GOOD * 1000 - 7, off).min() < 0
    with pytest.raises(ValueError, match="uint8.*input range is not declared"):
        cnn_utils.as_image_batch(np.zeros((6, 6, 1), np.uint8), off)
    # one call only: images outside the range on purpose (e.g. activation maximization)
    assert cnn_utils.get_activations(model(), GOOD * 3, ["conv"], input_range=None)["conv"].shape == (2, 4, 4, 2)
    assert cnn_utils.as_image_batch(GOOD * 2 - 1, model(), input_range=(-1, 1)).shape == (2, 6, 6, 1)
    # a rounding error past the bound is tolerated, 1 % is not
    assert cnn_utils.as_image_batch(np.full((6, 6, 1), 1.0005), model()).shape == (1, 6, 6, 1)
    with pytest.raises(ValueError, match="outside"):
        cnn_utils.as_image_batch(np.full((6, 6, 1), 1.01), model())


@pytest.mark.parametrize("bad, error", [((1, 0), ValueError), ((0, np.inf), ValueError), ("0-1", TypeError),
                                        ((0, 1, 2), TypeError), (3, TypeError)])
def test_set_input_range_refuses_nonsense(bad, error):
    with pytest.raises(error, match="input_range must be"):
        cnn_utils.set_input_range(tiny(), bad)


# --- models, layers and arguments ---------------------------------------------------

BAD_CALLS = {
    "model is a path": (lambda: cnn_utils.get_activations("mnist", GOOD), TypeError, "must be a Keras model"),
    "layer_names an int": (lambda: cnn_utils.get_activations(model(), GOOD, 3), TypeError, "layer_names must be"),
    "layer name not a string": (lambda: cnn_utils.get_activations(model(), GOOD, [0]), TypeError,
                                "layer_name must be a string"),
    "duplicate layer names": (lambda: cnn_utils.get_activations(model(), GOOD, ["conv", "conv"]), ValueError,
                              "a name twice"),
    "batch_size 0": (lambda: cnn_utils.get_activations(model(), GOOD, batch_size=0), ValueError,
                     "batch_size must be a positive integer"),
    "batch_size float": (lambda: cnn_utils.get_activations(model(), GOOD, batch_size=2.5), ValueError,
                         "batch_size must be a positive integer"),
    "sparsity of the dict": (lambda: cnn_utils.channel_sparsity({"conv": GOOD}), TypeError, "pick a layer"),
    "sparsity of a dense output": (lambda: cnn_utils.channel_sparsity(np.zeros((4, 3))), ValueError,
                                   "no feature maps"),
    "sparsity of nothing": (lambda: cnn_utils.channel_sparsity(np.zeros((0, 2, 2, 3))), ValueError, "empty"),
    "sparsity of NaN": (lambda: cnn_utils.channel_sparsity(np.full((1, 2, 2, 3), np.nan)), ValueError, "NaN"),
    "dead channels threshold text": (lambda: cnn_utils.dead_channels(np.zeros((1, 2, 2, 3)), "0"), ValueError,
                                     "threshold must be a finite number"),
    "dead filters of the input": (lambda: cnn_utils.dead_filters(model(), "image", GOOD), ValueError,
                                  "is the input layer"),
    "filter weights of a dense layer": (lambda: cnn_utils.get_filter_weights(model(), "logits"), ValueError,
                                        r"is a Dense, not a Conv2D layer.*Conv2D layers are: conv"),
    "AM of the input layer": (lambda: cnn_utils.activation_maximization(model(), "image", 0, steps=2),
                              ValueError, "is the input layer"),
    "AM index bool": (lambda: cnn_utils.activation_maximization(model(), "conv", True, steps=2),
                      TypeError, "index must be an int"),
    "AM index empty": (lambda: cnn_utils.activation_maximization(model(), "conv", [], steps=2),
                       TypeError, "index must be an int"),
    "AM index out of range": (lambda: cnn_utils.activation_maximization(model(), "conv", 2, steps=2),
                              ValueError, "valid indices are 0 to 1"),
    "AM steps text": (lambda: cnn_utils.activation_maximization(model(), "conv", 0, steps="10"),
                      ValueError, "steps must be an integer"),
    "AM steps 0": (lambda: cnn_utils.activation_maximization(model(), "conv", 0, steps=0),
                   ValueError, "steps must be an integer of at least 1"),
    "AM lr text": (lambda: cnn_utils.activation_maximization(model(), "conv", 0, steps=2, lr="0.1"),
                   ValueError, "lr must be a finite number"),
    "AM negative tv": (lambda: cnn_utils.activation_maximization(model(), "conv", 0, steps=2, tv=-1),
                       ValueError, "tv must be a finite number >= 0"),
    "AM jitter larger than the image": (lambda: cnn_utils.activation_maximization(model(), "conv", 0, steps=2,
                                                                                 jitter=3),
                                        ValueError, "jitter=3 pixels is too large for images of 6x6"),
    "AM image_shape of another size": (lambda: cnn_utils.activation_maximization(model(), "conv", 0, steps=2,
                                                                                image_shape=(8, 8, 1)),
                                       ValueError, "image_shape must be"),
    "AM seed": (lambda: cnn_utils.activation_maximization(model(), "conv", 0, steps=2, seed=1.5),
                ValueError, "seed must be None or an integer"),
    "deprocess nothing": (lambda: cnn_utils.deprocess_image([[]]), ValueError, "is empty"),
    "deprocess crop": (lambda: cnn_utils.deprocess_image(GOOD, crop=-1), ValueError, "crop must be an integer"),
    "total variation of text": (lambda: cnn_utils.total_variation("x"), TypeError, r"images must be an array of numbers \(N, H, W, C\)"),
    "tSNE pca_components": (lambda: cnn_utils.tsne_embedding(np.random.default_rng(0).normal(size=(40, 3)),
                                                            perplexity=5, pca_components=7),
                            ValueError, r"pca_components must be None or an integer from 2 to min\(N, D\) = 3"),
    "split with a class of one": (lambda: cnn_utils.train_val_split(np.zeros((5, 2)), np.array([0, 0, 1, 1, 2])),
                                  ValueError, "the rarest class here has 1"),
    "AM spatial": (lambda: cnn_utils.activation_maximization(model(), "conv", 0, spatial="centre"),
                   ValueError, "spatial must be"),
}


def raises_as_listed(table, case):
    call, error, message = table[case]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_are_explained(case):
    raises_as_listed(BAD_CALLS, case)


# --- data and saved models ------------------------------------------------------------

def test_load_model_names_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"legacy HDF5 \(.h5\) file.*model.save\('my_model.keras'\)"):
        cnn_utils.load_model(tmp_path / "mine.h5")
    with pytest.raises(ValueError, match=r"Cannot load 'my_model': name a shipped model"):
        cnn_utils.load_model("my_model")
    with pytest.raises(FileNotFoundError, match=r"No saved model at .*elsewhere.keras.*Check the path"):
        cnn_utils.load_model(tmp_path / "elsewhere.keras")
    with pytest.raises(TypeError, match="name must be a dataset name"):
        cnn_utils.load_model(3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(val_fraction=0.0), "val_fraction must be"), (dict(val_fraction=1.5), "val_fraction must be"),
    (dict(y=np.zeros(7, np.int64)), "same number of images and labels"),
])
def test_train_val_split_checks(kwargs, message):
    args = dict(x=np.zeros((20, 6, 6, 1)), y=np.repeat(np.arange(2), 10), val_fraction=0.2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        cnn_utils.train_val_split(**args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(epochs=0), "epochs must be a positive integer"), (dict(epochs=-1), "epochs must be"),
    (dict(epochs=1.5), "epochs must be"), (dict(batch_size=0), "batch_size must be"),
    (dict(y_train=np.zeros(3, np.int64)), "same number of images and labels"),
    (dict(y_train=np.full(4, 3)), r"y_train must lie in 0\.\.2"),
    (dict(x_train=np.full((4, 6, 6, 1), 255.0)), "outside the model's input range"),
])
def test_train_model_checks_before_training(kwargs, message):
    args = dict(x_train=np.zeros((4, 6, 6, 1), np.float32), y_train=np.zeros(4, np.int64), epochs=1, verbose=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        cnn_utils.train_model(tiny(), **args)


# --- confidence and embeddings ----------------------------------------------------------

LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.5, 0.0], [0.0, -2.0, 1.0]])
LABELS = np.array([0, 2, 0, 2])


def test_fit_temperature_refuses_probabilities():
    with pytest.raises(ValueError, match=r"look like probabilities.*predict_logits"):
        cnn_utils.fit_temperature(cnn_utils.softmax(LOGITS), LABELS)
    # log-probabilities are logits (up to a constant per row): the same temperature
    assert cnn_utils.fit_temperature(np.log(cnn_utils.softmax(LOGITS)), LABELS) == pytest.approx(
        cnn_utils.fit_temperature(LOGITS, LABELS), rel=1e-4)


def test_fit_temperature_says_when_it_hits_a_bound():
    # labels opposite to the logits: the NLL keeps falling as T grows, the optimum is T -> inf
    wrong = np.array([2, 0, 2, 1])
    with pytest.raises(ValueError, match=r"search bound T = 20.*Widen bounds"):
        cnn_utils.fit_temperature(LOGITS, wrong)
    # confident and right: the optimum is T -> 0, below the lower bound
    with pytest.raises(ValueError, match=r"search bound T = 0.05"):
        cnn_utils.fit_temperature(LOGITS, LOGITS.argmax(1))
    # an interior optimum is returned as before, and equals the grid minimum
    t = cnn_utils.fit_temperature(LOGITS, LABELS)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    best = grid[np.argmin([cnn_utils.negative_log_likelihood(LOGITS, LABELS, g) for g in grid])]
    assert t == pytest.approx(best, rel=2e-3)


@pytest.mark.parametrize("base", [1, 1.0, 0.5, 0, -2, np.nan, "2", True])
def test_entropy_refuses_bases_not_above_one(base):
    with pytest.raises(ValueError, match="base must be None"):
        cnn_utils.entropy([[0.5, 0.5]], base=base)


def test_entropy_in_bits_by_hand():
    assert cnn_utils.entropy([[0.25] * 4], base=2)[0] == pytest.approx(2.0)
    assert cnn_utils.entropy([[0.5, 0.5, 0.0]], base=2)[0] == pytest.approx(1.0)


CONFIDENCE_CASES = {
    "temperature text": (lambda: cnn_utils.softmax(LOGITS, temperature="2"), ValueError, "temperature must be"),
    "temperature 0": (lambda: cnn_utils.softmax(LOGITS, temperature=0), ValueError, "temperature must be"),
    "one-hot labels": (lambda: cnn_utils.negative_log_likelihood(LOGITS, np.eye(3)[LABELS]), ValueError,
                       r"one-hot rows.*argmax\(axis=1\)"),
    "logits as probs": (lambda: cnn_utils.entropy(LOGITS), ValueError, "Did you pass logits"),
    "mistakes from logits": (lambda: cnn_utils.most_confident_mistakes(LOGITS, LABELS), ValueError,
                             "Did you pass logits"),
    "mistakes k negative": (lambda: cnn_utils.most_confident_mistakes(cnn_utils.softmax(LOGITS), LABELS, k=-1),
                            ValueError, "k must be an integer"),
    "text logits": (lambda: cnn_utils.softmax("abc"), TypeError, "logits must be an array"),
    "bounds text": (lambda: cnn_utils.fit_temperature(LOGITS, LABELS, bounds="ab"), TypeError,
                    "bounds must be a pair"),
    "groups thresholds text": (lambda: cnn_utils.confidence_groups(cnn_utils.softmax(LOGITS), LABELS, high="x"),
                               ValueError, "Thresholds must satisfy"),
}


@pytest.mark.parametrize("case", list(CONFIDENCE_CASES))
def test_confidence_bad_input(case):
    raises_as_listed(CONFIDENCE_CASES, case)


def test_tsne_of_duplicate_rows_is_refused_not_nan():
    rows = np.ones((60, 4))
    for method in cnn_utils.TSNE_METHODS:
        with pytest.raises(ValueError, match=r"only 1 distinct rows \(of 60\).*Remove duplicates"):
            cnn_utils.tsne_embedding(rows, perplexity=5, method=method, n_iter=300)
    x = np.random.default_rng(0).normal(size=(60, 4))
    x[30:] = x[0]                       # 30 distinct rows: enough for perplexity 5, not for 15
    emb = cnn_utils.tsne_embedding(x, perplexity=5, n_iter=300)
    assert np.all(np.isfinite(emb))
    with pytest.raises(ValueError, match="only 30 distinct rows"):
        cnn_utils.tsne_embedding(x, perplexity=15, n_iter=300)
    with pytest.raises(TypeError, match="perplexity must be a number"):
        cnn_utils.tsne_embedding(x, perplexity="5")


# --- plotting: nothing silently clipped to white, no raw matplotlib errors ---------------

def test_overlay_of_a_uint8_image_equals_the_unit_scale_overlay():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
    heat = rng.uniform(0, 1, (6, 6))
    np.testing.assert_allclose(cnn_utils.overlay_heatmap(pixels, heat),
                               cnn_utils.overlay_heatmap(pixels / 255.0, heat), atol=1e-6)


PIXELS_255 = np.full((2, 6, 6, 1), 200.0)
PLOT_CASES = {
    "overlay of 0..255 floats": (lambda: cnn_utils.overlay_heatmap(PIXELS_255[0], np.zeros((6, 6))), ValueError,
                                 r"shown on the scale \[0, 1\].*Divide 0\.\.255 values by 255"),
    "attribution maps of 0..255 floats": (lambda: cnn_utils.plot_attribution_maps(
        PIXELS_255, {"m": np.zeros((2, 6, 6))}), ValueError, r"scale \[0, 1\]"),
    "image grid of 0..255 floats": (lambda: cnn_utils.plot_image_grid(PIXELS_255), ValueError, r"scale \[0, 1\]"),
    "image grid of nothing": (lambda: cnn_utils.plot_image_grid(np.zeros((0, 6, 6))), ValueError,
                              "at least one image"),
    "image grid titles": (lambda: cnn_utils.plot_image_grid(GOOD, titles=["a"]), ValueError,
                          "titles has 1 entries for 2 images"),
    "probability bars of 0..255": (lambda: cnn_utils.plot_probability_bars(
        PIXELS_255, cnn_utils.softmax(LOGITS[:2]), LABELS[:2]), ValueError, r"scale \[0, 1\]"),
    "signed attributions NaN": (lambda: cnn_utils.plot_signed_attributions(
        GOOD, np.full((2, 6, 6), np.nan)), ValueError, "NaN"),
    "all channels of the dict": (lambda: cnn_utils.plot_all_channels({"conv": GOOD[0]}), TypeError,
                                    "pick a layer"),
    "all channels of a batch": (lambda: cnn_utils.plot_all_channels(GOOD), ValueError, "pick one image"),
    "all channels NaN": (lambda: cnn_utils.plot_all_channels(np.full((3, 3, 2), np.nan)), ValueError,
                            "finite"),
    "sparsity not a dict": (lambda: cnn_utils.plot_layer_sparsity([0.1, 0.2]), TypeError, "non-empty dict"),
    "sparsity in percent": (lambda: cnn_utils.plot_layer_sparsity({"conv": 40.0}), ValueError, "fractions"),
    "kernels in_channel": (lambda: cnn_utils.plot_kernels(np.zeros((3, 3, 1, 2)), in_channel=1), ValueError,
                           "in_channel must be an integer from 0 to 0"),
    "objective history of nothing": (lambda: cnn_utils.plot_objective_history([]), ValueError,
                                     r"history must be \(steps, K\)"),
    "overlay alpha text": (lambda: cnn_utils.overlay_heatmap(GOOD[0], np.zeros((6, 6)), alpha="0.5"), ValueError,
                           "alpha must be in"),
}


@pytest.mark.parametrize("case", list(PLOT_CASES))
def test_plotting_bad_input(case):
    import matplotlib.pyplot as plt

    try:
        raises_as_listed(PLOT_CASES, case)
    finally:
        plt.close("all")
