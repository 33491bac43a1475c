"""Dataset examples (the images that excite a filter most), honest confidence formatting,
and the plots that show them, on hand-worked cases."""
import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest

import cnn_utils


def sign_split_model():
    """image (4, 4, 1) -> 1x1 conv, 2 filters, ReLU: channel 0 = relu(x), channel 1 = relu(-x)."""
    keras = cnn_utils._keras()
    inp = keras.Input((4, 4, 1), name="image")
    out = keras.layers.Conv2D(2, 1, activation="relu", name="conv")(inp)
    flat = keras.layers.Flatten(name="flatten")(out)
    model = keras.Model(inp, flat)
    model.get_layer("conv").set_weights([np.array([[[[1.0, -1.0]]]], np.float32), np.zeros(2, np.float32)])
    return cnn_utils.set_input_range(model, None)   # hand-made pixels outside [0, 1]


def test_top_activating_images_hand_case():
    model = sign_split_model()
    images = np.stack([np.full((4, 4, 1), v, np.float32) for v in (0.2, -0.5, 0.9, 0.1)])
    images[3, 0, 0, 0] = 1.7                       # mean of relu(x) = (15 * 0.1 + 1.7) / 16 = 0.2
    idx, values = cnn_utils.top_activating_images(model, "conv", images, k=3)
    assert idx.shape == values.shape == (2, 3)
    # channel 0: means [0.2, 0, 0.9, 0.2] -> 2, then the tie 0 and 3 in image order
    np.testing.assert_array_equal(idx[0], [2, 0, 3])
    np.testing.assert_allclose(values[0], [0.9, 0.2, 0.2], atol=1e-6)
    # channel 1: means [0, 0.5, 0, 0] -> 1 first
    assert idx[1, 0] == 1 and values[1, 0] == pytest.approx(0.5)
    one, v1 = cnn_utils.top_activating_images(model, "conv", images, index=1, k=1)
    assert one.tolist() == [[1]] and v1[0, 0] == pytest.approx(0.5)


def test_top_activating_images_class_scores_and_errors():
    keras = cnn_utils._keras()
    inp = keras.Input((2, 2, 1), name="image")
    out = keras.layers.Dense(2, use_bias=False, name="logits")(keras.layers.Flatten()(inp))
    model = keras.Model(inp, out)
    model.get_layer("logits").set_weights([np.array([[1, 0], [0, 0], [0, 0], [0, 1]], np.float32)])
    cnn_utils.set_input_range(model, None)               # hand-made pixels outside [0, 1]
    images = np.zeros((3, 2, 2, 1), np.float32)
    images[0, 0, 0], images[1, 1, 1], images[2, 0, 0] = 2.0, 5.0, 3.0   # score 0 = x[0,0], score 1 = x[1,1]
    idx, values = cnn_utils.top_activating_images(model, "logits", images, k=2)
    np.testing.assert_array_equal(idx, [[2, 0], [1, 0]])
    np.testing.assert_allclose(values, [[3, 2], [5, 0]])
    with pytest.raises(ValueError, match="k must be an integer from 1"):
        cnn_utils.top_activating_images(model, "logits", images, k=4)
    with pytest.raises(ValueError, match="out of range"):
        cnn_utils.top_activating_images(model, "logits", images, index=5)


@pytest.mark.parametrize("p, text", [
    (0.55, "55 %"), (0.5, "50 %"), (0.994, "99 %"), (0.996, "99.6 %"), (0.9997, "99.97 %"),
    (0.99996, "99.996 %"), (1.0, "100 %"), (0.0, "0 %"), (1e-5, "0.001 %"),
    (1 - 1e-9, "99.9999999 %"), (1e-9, "0.0000001 %"),
])
def test_format_probability_never_rounds_to_certainty(p, text):
    assert cnn_utils.format_probability(p, decimals=0) == text


def test_format_probability_rejects_non_probabilities():
    for bad in (-0.1, 1.2, float("nan")):
        with pytest.raises(ValueError, match="probability"):
            cnn_utils.format_probability(bad)


def test_plot_dataset_examples_and_raw_plot_draw():
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    synthetic = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
    examples = rng.uniform(size=(2, 3, 8, 8, 1))
    fig = cnn_utils.plot_dataset_examples(synthetic, examples, np.ones((2, 3)), ["a", "b"],
                                          synthetic_values=[1.0, 2.0], title="t")
    assert len(fig.axes) == 2 * 4 + 1 and fig.axes[0].get_title().startswith("synthetic")   # one colour bar
    plt.close(fig)
    with pytest.raises(ValueError, match="same rows"):
        cnn_utils.plot_dataset_examples(synthetic, examples, np.ones((2, 2)), ["a", "b"])
    fig = cnn_utils.plot_raw_and_deprocessed(np.stack([synthetic[0], 0.1 * synthetic[0]]), ["big", "small"])
    lim = float(np.abs(synthetic[0]).max())
    for ax in fig.axes[:2]:                            # top row: one shared scale, the small image too
        assert ax.images[0].get_clim() == pytest.approx((-lim, lim))
    assert fig.axes[2].images[0].get_clim() == (0, 255)  # bottom row: each deprocessed
    plt.close(fig)
