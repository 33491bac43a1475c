"""Small Keras models of every shape instructors bring, shared by the tests of activations,
feature visualization and attribution (``test_own_models.py``, ``test_attribution.py``).

Each builder returns a new model on 8 x 8 x 1 images with the layer names given in its
docstring; ``CAM_LAYER`` names the layer the CAM methods pick by default.
"""
import numpy as np

import cnn_utils


def keras():
    return cnn_utils._keras()


def images(n=3, size=8, channels=1, seed=1):
    """``n`` random images (n, size, size, channels) in [0, 1)."""
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, channels)).astype(np.float32)


def direct(model, layer):
    """The plain Keras sub-model from the model's input to ``layer``'s output (the reference)."""
    return keras().Model(model.inputs[0], model.get_layer(layer).output)


def conv_stack(inp):
    """Conv 'c1' (4 channels) and 'c2' (5 channels), 3 x 3 with built-in ReLU."""
    k = keras()
    h = k.layers.Conv2D(4, 3, activation="relu", name="c1")(inp)
    return k.layers.Conv2D(5, 3, activation="relu", name="c2")(h)


def sequential_with_input():
    """Sequential with an Input: c1, p1, f, logits."""
    k = keras()
    return k.Sequential([k.Input((8, 8, 1)), k.layers.Conv2D(3, 3, activation="relu", name="c1"),
                         k.layers.MaxPooling2D(2, name="p1"), k.layers.Flatten(name="f"),
                         k.layers.Dense(4, name="logits")], name="seq")


def sequential_built_later():
    """Sequential without an Input, built afterwards: c1, p1, f, logits."""
    k = keras()
    model = k.Sequential([k.layers.Conv2D(3, 3, activation="relu", name="c1"),
                          k.layers.MaxPooling2D(2, name="p1"), k.layers.Flatten(name="f"),
                          k.layers.Dense(4, name="logits")], name="seq_built")
    model.build((None, 8, 8, 1))
    return model


def functional_softmax_output(softmax_layer=False):
    """Softmax inside the last Dense layer 'out', no 'logits' layer (keras.applications' shape):
    c1, p1, f, out. ``softmax_layer=True``: the same network with 'out' giving the scores and a
    separate Softmax layer 'probabilities' (the same weights, ``set_weights(get_weights())``)."""
    k = keras()
    inp = k.Input((8, 8, 1))
    x = k.layers.Conv2D(3, 3, activation="relu", name="c1")(inp)
    x = k.layers.MaxPooling2D(2, name="p1")(x)
    x = k.layers.Flatten(name="f")(x)
    if softmax_layer:
        out = k.layers.Softmax(name="probabilities")(k.layers.Dense(4, name="out")(x))
        return k.Model(inp, out, name="softmax_layer")
    return k.Model(inp, k.layers.Dense(4, activation="softmax", name="out")(x), name="softmax_out")


def batchnorm_residual():
    """c1, bn1 (non-trivial statistics), r1, then a residual branch c2, bn2, r2 added to r1:
    add, gap, logits. The CAM layer is the block output: the add after the last convolution's
    BatchNorm and ReLU."""
    k = keras()
    inp = k.Input((8, 8, 1))
    x = k.layers.Conv2D(4, 3, padding="same", name="c1")(inp)
    x = k.layers.BatchNormalization(name="bn1")(x)
    x = k.layers.ReLU(name="r1")(x)
    y = k.layers.Conv2D(4, 3, padding="same", name="c2")(x)
    y = k.layers.BatchNormalization(name="bn2")(y)
    y = k.layers.ReLU(name="r2")(y)
    x = k.layers.Add(name="add")([x, y])
    x = k.layers.GlobalAveragePooling2D(name="gap")(x)
    model = k.Model(inp, k.layers.Dense(4, name="logits")(x), name="resnet_like")
    bn = model.get_layer("bn1")   # gamma 2, beta 0.5, moving mean 0.3, moving variance 4
    bn.set_weights([np.full(4, 2.0), np.full(4, 0.5), np.full(4, 0.3), np.full(4, 4.0)])
    return model


def variable_size():
    """Any input size: c1, c2 (``conv_stack``), gmp (global max pooling), logits."""
    k = keras()
    inp = k.Input((None, None, 1))
    x = k.layers.GlobalMaxPooling2D(name="gmp")(conv_stack(inp))
    return k.Model(inp, k.layers.Dense(4, name="logits")(x), name="any_size")


def base_model(name="base"):
    """A Sequential base: bc1 (3 channels), bc2 (5 channels), 3 x 3 with ReLU."""
    k = keras()
    return k.Sequential([k.Input((8, 8, 1)), k.layers.Conv2D(3, 3, activation="relu", name="bc1"),
                         k.layers.Conv2D(5, 3, activation="relu", name="bc2")], name=name)


def nested_sequential():
    """``Sequential([base, pooling, head])``, the usual transfer-learning shape: base (bc1, bc2), gap, logits."""
    k = keras()
    return k.Sequential([k.Input((8, 8, 1)), base_model(), k.layers.GlobalAveragePooling2D(name="gap"),
                         k.layers.Dense(4, name="logits")], name="transfer")


def nested_functional():
    """The base applied after a preprocessing layer (to_pm1: 2x - 1) inside a functional model."""
    k = keras()
    base = base_model()
    inp = k.Input((8, 8, 1))
    x = k.layers.Rescaling(2.0, offset=-1.0, name="to_pm1")(inp)
    x = base(x)
    x = k.layers.GlobalAveragePooling2D(name="gap")(x)
    return k.Model(inp, k.layers.Dense(4, name="logits")(x), name="transfer_fn")


#: The layer the CAM methods choose by default (the last convolution's output followed through
#: batch norm, its ReLU and a residual add: the block output).
CAM_LAYER = {
    functional_softmax_output: "c1",
    nested_sequential: "bc2",
    variable_size: "c2",
    batchnorm_residual: "add",
}
