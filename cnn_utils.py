"""Helpers for the course "What convolutional networks learn".

One module, sections in the order data flows:

    data -> models -> activations and filters -> feature visualization ->
    attribution -> confidence and embeddings -> PyTorch inversion ->
    plotting -> widgets -> exercise checks -> command line

Importing this module is cheap: it imports neither TensorFlow nor PyTorch.
Each function imports its framework when it is called (see ``_tf()`` and
``_torch()``), and refuses with a clear error where the known crash would hit
(TensorFlow imported before torchvision in one process).

Conventions
-----------
* Images are float32 batches ``(N, H, W, C)`` in [0, 1] for Keras models;
  a single image ``(H, W, C)`` is accepted and treated as a batch of one.
* Attribution uses pre-softmax class scores (the ``logits`` layer) by default.
* Bad input raises ``ValueError`` / ``TypeError`` that says what was expected.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parent
DATA_DIR = PROJECT_DIR / "data"
MODELS_DIR = PROJECT_DIR / "saved_models"
NOTEBOOKS_DIR = PROJECT_DIR / "notebooks"
BUILD_DIR = PROJECT_DIR / "build"

#: Environment variable naming a directory with ``mnist.npz`` / ``fashion_mnist.npz``
#: (tests and CI point it at ``../shared/data``).
DATA_ENV_VAR = "CNN_COURSE_DATA"

DEFAULT_SEED = 42


# ---------------------------------------------------------------------------
# Frameworks: lazy imports and the TensorFlow/torchvision crash guard
# ---------------------------------------------------------------------------

class FrameworkOrderError(RuntimeError):
    """Raised instead of the segmentation fault of importing torchvision after TensorFlow."""


def _tf():
    """Import and return TensorFlow (quietly), after checking the import order."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: WPS433 (lazy on purpose)

    return tf


def _keras():
    _tf()
    import keras

    return keras


def _torch():
    """Import and return ``(torch, torchvision)``.

    With the pinned versions, importing torchvision after TensorFlow crashes the
    process (segmentation fault). Refuse with an explanation instead.
    """
    if "tensorflow" in sys.modules and "torchvision" not in sys.modules:
        raise FrameworkOrderError(
            "TensorFlow is already imported in this process, and importing torchvision "
            "after it crashes Python (segmentation fault) with the course's pinned versions. "
            "Restart the kernel and run the PyTorch code in a process that has not imported "
            "TensorFlow (the VGG16 notebook uses PyTorch only), or import torch and "
            "torchvision before TensorFlow."
        )
    import torch
    import torchvision

    return torch, torchvision


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

DATASETS = ("mnist", "fashion_mnist")

CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
}

_EXPECTED_SHAPES = {
    "x_train": (60000, 28, 28),
    "y_train": (60000,),
    "x_test": (10000, 28, 28),
    "y_test": (10000,),
}


class DataError(RuntimeError):
    """A dataset could not be found, read or validated."""


def _check_dataset_name(name):
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}. Choose one of: {', '.join(DATASETS)}."
        )


def dataset_search_paths(name):
    """Where ``load_dataset`` looks for ``<name>.npz``, in order."""
    _check_dataset_name(name)
    paths = []
    env_dir = os.environ.get(DATA_ENV_VAR)
    if env_dir:
        paths.append(Path(env_dir).expanduser() / f"{name}.npz")
    paths.append(DATA_DIR / f"{name}.npz")
    return paths


def _read_npz(path):
    """Read and validate a dataset file in Keras' ``mnist.npz`` layout."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in _EXPECTED_SHAPES}
    except KeyError as err:
        raise DataError(
            f"{path} is not a dataset file in the expected layout: missing array {err}. "
            f"Expected arrays {', '.join(_EXPECTED_SHAPES)}. Delete it and run "
            "`python -m cnn_utils prefetch` to download a fresh copy."
        ) from None
    except Exception as err:  # zipfile.BadZipFile, EOFError, OSError, ValueError ...
        raise DataError(
            f"{path} is corrupt or truncated and cannot be read ({type(err).__name__}: {err}). "
            "Delete it and run `python -m cnn_utils prefetch` to download a fresh copy."
        ) from None
    for key, shape in _EXPECTED_SHAPES.items():
        arr = arrays[key]
        if arr.shape != shape or arr.dtype != np.uint8:
            raise DataError(
                f"{path}: array {key} has shape {arr.shape} and dtype {arr.dtype}, "
                f"expected {shape} uint8. Delete the file and run `python -m cnn_utils prefetch`."
            )
    for key in ("y_train", "y_test"):
        if arrays[key].max() > 9:
            raise DataError(f"{path}: labels in {key} go beyond 9; the file is not MNIST-like.")
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def _download_dataset(name):
    """Download through the Keras loader (which caches under ~/.keras/datasets)."""
    keras = _keras()
    loader = {"mnist": keras.datasets.mnist, "fashion_mnist": keras.datasets.fashion_mnist}[name]
    try:
        return loader.load_data()
    except Exception as err:
        searched = ", ".join(str(p) for p in dataset_search_paths(name))
        raise DataError(
            f"The {name} dataset is not on this machine (looked in: {searched}) and "
            f"downloading it failed ({type(err).__name__}: {err}). Connect to the internet "
            f"and run `python -m cnn_utils prefetch`, or set {DATA_ENV_VAR} to a folder "
            f"holding {name}.npz."
        ) from None


def _raw_dataset(name):
    _check_dataset_name(name)
    for path in dataset_search_paths(name):
        if path.is_file():
            return _read_npz(path), path
    return _download_dataset(name), "download"


def load_dataset(name="mnist"):
    """Load MNIST or Fashion-MNIST.

    Looks in ``$CNN_COURSE_DATA``, then ``data/``, then downloads through Keras.

    Returns ``(x_train, y_train), (x_test, y_test)``: images float32 in [0, 1] of
    shape (N, 28, 28, 1), labels int64 in 0..9.
    """
    ((x_train, y_train), (x_test, y_test)), _ = _raw_dataset(name)

    def prep(x):
        return (x.astype(np.float32) / 255.0)[..., np.newaxis]

    return (prep(x_train), y_train.astype(np.int64)), (prep(x_test), y_test.astype(np.int64))


def train_val_split(x, y, val_fraction=0.1, seed=DEFAULT_SEED):
    """Stratified split of a training set into (x_fit, y_fit), (x_val, y_val)."""
    from sklearn.model_selection import train_test_split

    x_fit, x_val, y_fit, y_val = train_test_split(
        x, y, test_size=val_fraction, random_state=seed, stratify=y
    )
    return (x_fit, y_fit), (x_val, y_val)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

#: Name of the layer holding pre-softmax class scores in the course's models.
LOGITS_LAYER = "logits"


def set_seed(seed=DEFAULT_SEED):
    """Seed Python, NumPy and Keras/TensorFlow for repeatable runs."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    keras = _keras()
    keras.utils.set_random_seed(seed)


def build_mnist_cnn(input_shape=(28, 28, 1), num_classes=10, seed=DEFAULT_SEED):
    """The course's small CNN as a Keras 3 functional model with named layers.

    ``image -> conv1 -> pool1 -> conv2 -> pool2 -> conv3 -> flatten -> dense1
    -> dropout -> logits (pre-softmax class scores) -> probabilities (softmax)``
    """
    keras = _keras()
    from keras import layers

    set_seed(seed)
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(inputs)          # 26x26x32
    x = layers.MaxPooling2D(2, name="pool1")(x)                                 # 13x13x32
    x = layers.Conv2D(64, 3, activation="relu", name="conv2")(x)               # 11x11x64
    x = layers.MaxPooling2D(2, name="pool2")(x)                                 # 5x5x64
    x = layers.Conv2D(64, 3, activation="relu", name="conv3")(x)               # 3x3x64
    x = layers.Flatten(name="flatten")(x)                                       # 576
    x = layers.Dense(128, activation="relu", name="dense1")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    logits = layers.Dense(num_classes, name=LOGITS_LAYER)(x)
    outputs = layers.Softmax(name="probabilities")(logits)
    return keras.Model(inputs, outputs, name="mnist_cnn")


def train_model(model, x_train, y_train, epochs=4, batch_size=128, validation_data=None,
                learning_rate=3e-3, seed=DEFAULT_SEED, verbose="auto", callbacks=None):
    """Compile and train ``model`` with Adam and a cosine learning-rate decay.

    Returns the Keras ``History``. Deterministic for a given seed on one machine.
    """
    keras = _keras()
    set_seed(seed)
    steps = epochs * int(np.ceil(len(x_train) / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(steps, 1))
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model.fit(
        x_train, y_train, epochs=epochs, batch_size=batch_size,
        validation_data=validation_data, verbose=verbose, callbacks=callbacks,
        shuffle=True,
    )


def model_path(name):
    """Path of a shipped model, e.g. ``model_path("mnist")``."""
    _check_dataset_name(name)
    return MODELS_DIR / f"{name}_cnn.keras"


def load_model(name="mnist"):
    """Load a shipped model (``"mnist"`` or ``"fashion_mnist"``) with ``safe_mode=True``."""
    keras = _keras()
    path = Path(name) if str(name).endswith(".keras") else model_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"No saved model at {path}. Rebuild it with "
            f"`python -m cnn_utils train --dataset {path.stem.replace('_cnn', '')}`."
        )
    try:
        return keras.models.load_model(path, safe_mode=True)
    except Exception as err:
        raise DataError(
            f"Could not load the model at {path} ({type(err).__name__}: {err}). The file may be "
            "corrupt: rebuild it with `python -m cnn_utils train`."
        ) from None


def model_info(name="mnist"):
    """The metadata recorded beside a shipped model (test accuracy, epochs, seed, ...)."""
    path = model_path(name).with_suffix(".json")
    return json.loads(path.read_text())


def logits_model(model):
    """A model from the same input to the pre-softmax class scores."""
    keras = _keras()
    try:
        layer = model.get_layer(LOGITS_LAYER)
    except ValueError:
        raise ValueError(
            f"The model has no layer named {LOGITS_LAYER!r} (its layers: "
            f"{', '.join(l.name for l in model.layers)}). Build it with build_mnist_cnn()."
        ) from None
    return keras.Model(model.inputs, layer.output, name=f"{model.name}_logits")


def as_image_batch(images, model=None, name="images"):
    """Validate images and return a float32 batch (N, H, W, C).

    A single image (H, W, C) becomes a batch of one; a (H, W) image of a
    one-channel model gets its channel axis. With ``model``, the shape must match
    the model's input.
    """
    if hasattr(images, "numpy"):
        images = images.numpy()
    try:
        x = np.asarray(images, dtype=np.float32)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an array of numbers, got {type(images).__name__}.") from None
    expected = None
    if model is not None:
        expected = tuple(model.inputs[0].shape[1:])
    if expected is not None and x.ndim == len(expected) - 1 and expected[-1] == 1 and x.shape == expected[:-1]:
        x = x[..., np.newaxis]
    if expected is not None and x.ndim == len(expected):
        x = x[np.newaxis]
    elif expected is None and x.ndim == 3:
        x = x[np.newaxis]
    if x.ndim != 4:
        raise ValueError(
            f"{name} must be a batch (N, H, W, C) or a single image (H, W, C); got shape {x.shape}."
        )
    if expected is not None and any(e is not None and e != s for e, s in zip(expected, x.shape[1:])):
        raise ValueError(
            f"{name} have shape {x.shape[1:]} per image, but the model expects {expected}."
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contain NaN or infinite values.")
    return x


def predict_logits(model, images, batch_size=512):
    """Pre-softmax class scores for a batch, as a NumPy array."""
    x = as_image_batch(images, model)
    return np.asarray(logits_model(model).predict(x, batch_size=batch_size, verbose=0))


# ---------------------------------------------------------------------------
# Activations and filters
# ---------------------------------------------------------------------------

#: Layer types whose outputs ``get_activations`` returns by default.
_CONV_TYPES = ("Conv2D", "Conv1D", "Conv3D", "DepthwiseConv2D", "SeparableConv2D")
_POOL_TYPES = ("MaxPooling2D", "AveragePooling2D", "MaxPooling1D", "AveragePooling1D",
               "GlobalMaxPooling2D", "GlobalAveragePooling2D")


def _layer_type(layer):
    return type(layer).__name__


def conv_layer_names(model):
    """Names of the model's 2-D convolutional layers, in model order."""
    return [l.name for l in model.layers if _layer_type(l) in _CONV_TYPES
            and len(l.output.shape) == 4]


def conv_and_pool_layer_names(model):
    """Names of the model's convolutional and pooling layers, in model order."""
    return [l.name for l in model.layers
            if _layer_type(l) in _CONV_TYPES + _POOL_TYPES]


def last_conv_layer_name(model):
    """Name of the model's last convolutional layer (4-D output), found automatically.

    Raises ``ValueError`` listing the model's layers when there is none.
    """
    names = conv_layer_names(model)
    if not names:
        raise ValueError(
            f"The model {model.name!r} has no convolutional layer (its layers: "
            f"{_layer_list(model)})."
        )
    return names[-1]


def _layer_list(model):
    return ", ".join(f"{l.name} ({_layer_type(l)})" for l in model.layers)


def get_layer(model, layer_name):
    """``model.get_layer(layer_name)`` with an error that lists the model's layers."""
    if not isinstance(layer_name, str):
        raise TypeError(f"layer_name must be a string, got {type(layer_name).__name__}.")
    for layer in model.layers:
        if layer.name == layer_name:
            return layer
    raise ValueError(
        f"Unknown layer {layer_name!r}. The model's layers are: {_layer_list(model)}."
    )

# Sub-models are cached per model so repeated calls in a notebook do not rebuild them.
_SUBMODEL_CACHE = None


def _cached(model, key, build):
    """``build()`` once per (model, key); the cache forgets a model when it is deleted."""
    import weakref

    global _SUBMODEL_CACHE
    if _SUBMODEL_CACHE is None:
        _SUBMODEL_CACHE = weakref.WeakKeyDictionary()
    per_model = _SUBMODEL_CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = build()
    return per_model[key]


def _single_input(model):
    """The model's input tensor (models with one input), as Keras 3 expects it."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def activation_model(model, layer_names):
    """A multi-output Keras model from the model's input to the named layers' outputs."""
    keras = _keras()
    layer_names = tuple(layer_names)
    layers = [get_layer(model, name) for name in layer_names]
    return _cached(model, ("activations",) + layer_names,
                   lambda: keras.Model(_single_input(model), [l.output for l in layers],
                                       name=f"{model.name}_activations"))


def get_activations(model, images, layer_names=None, batch_size=256):
    """Outputs of the named layers for a batch of images, in one forward pass.

    ``layer_names=None`` means every convolutional and pooling layer, in model
    order. Returns a dict ``layer name -> np.ndarray`` (N, H, W, C) float32, in the
    order of ``layer_names``. A single image is treated as a batch of one.
    Unknown layer names raise ``ValueError`` listing the model's layers; a wrong
    image shape raises ``ValueError`` naming the expected shape.
    """
    x = as_image_batch(images, model)
    if layer_names is None:
        layer_names = conv_and_pool_layer_names(model)
    elif isinstance(layer_names, str):
        layer_names = [layer_names]
    layer_names = list(layer_names)
    if not layer_names:
        raise ValueError("layer_names is empty: name at least one layer, or pass None.")
    sub = activation_model(model, layer_names)
    outputs = [[] for _ in layer_names]
    for start in range(0, len(x), batch_size):
        out = sub(x[start:start + batch_size], training=False)
        if not isinstance(out, (list, tuple)):
            out = [out]
        for store, o in zip(outputs, out):
            store.append(np.asarray(o, dtype=np.float32))
    return {name: np.concatenate(parts) for name, parts in zip(layer_names, outputs)}


def channel_sparsity(activations, per_image=False):
    """Fraction of channels whose whole feature map is exactly zero, averaged over images.

    ``activations`` is (N, H, W, C) (or (H, W, C) for one image). With
    ``per_image=True`` returns the fraction for each image, shape (N,).
    """
    a = np.asarray(activations)
    if a.ndim == 3:
        a = a[np.newaxis]
    if a.ndim != 4:
        raise ValueError(
            f"activations must be (N, H, W, C) or (H, W, C); got shape {a.shape}."
        )
    zero = np.all(a == 0, axis=(1, 2))          # (N, C): the channel's map is all zero
    fractions = zero.mean(axis=1)
    return fractions if per_image else float(fractions.mean())


def layer_sparsity(model, images, layer_names=None, batch_size=256):
    """``channel_sparsity`` of each layer (default: conv and pooling layers) over ``images``.

    Returns a dict ``layer name -> fraction in [0, 1]``.
    """
    acts = get_activations(model, images, layer_names, batch_size=batch_size)
    return {name: channel_sparsity(a) for name, a in acts.items()}


def dead_channels(activations, threshold=0.0):
    """Indices of channels that never exceed ``threshold`` at any position of any image."""
    a = np.asarray(activations)
    if a.ndim == 3:
        a = a[np.newaxis]
    if a.ndim != 4:
        raise ValueError(f"activations must be (N, H, W, C); got shape {a.shape}.")
    return np.flatnonzero(a.max(axis=(0, 1, 2)) <= threshold)


def dead_filters(model, layer_name, images, threshold=0.0):
    """Filters of ``layer_name`` that never activate (output <= threshold) on ``images``.

    Returns their indices as an int array (empty when every filter fires somewhere).
    Use a few hundred real images: a filter silent on all of them is "dead" and its
    activation-maximization image would only show noise.
    """
    acts = get_activations(model, images, [layer_name])[layer_name]
    if acts.ndim != 4:
        raise ValueError(
            f"Layer {layer_name!r} has output shape {acts.shape[1:]}, not a feature map "
            f"(H, W, C); choose one of the convolutional layers: {', '.join(conv_layer_names(model))}."
        )
    return dead_channels(acts, threshold)


def get_filter_weights(model, layer_name):
    """The kernel (kh, kw, in_channels, out_channels) and bias (out_channels,) of a conv layer."""
    layer = get_layer(model, layer_name)
    if _layer_type(layer) != "Conv2D":
        raise ValueError(
            f"Layer {layer_name!r} is a {_layer_type(layer)}, not a Conv2D layer; the model's "
            f"convolutional layers are: {', '.join(conv_layer_names(model))}."
        )
    weights = layer.get_weights()
    kernel = np.asarray(weights[0], dtype=np.float32)
    bias = np.asarray(weights[1], dtype=np.float32) if len(weights) > 1 else np.zeros(kernel.shape[-1], np.float32)
    return kernel, bias


# ---------------------------------------------------------------------------
# Feature visualization
# ---------------------------------------------------------------------------

def total_variation(images):
    """Total variation of each image, as a TensorFlow tensor of shape (N,).

    The definition used throughout the course (squared, anisotropic; beta = 2 in
    Mahendran & Vedaldi's notation, which gives smooth gradients)::

        TV(x) = sum_{i,j,c} (x[i+1, j, c] - x[i, j, c])**2      # along rows (down)
              + sum_{i,j,c} (x[i, j+1, c] - x[i, j, c])**2      # along columns (across)

    Differences are taken along BOTH spatial axes and never across channels, so an
    image that only varies from channel to channel has TV 0. (``tf.image.total_variation``
    uses absolute differences instead.) Accepts (N, H, W, C) or one (H, W, C) image,
    NumPy or tensor; differentiable, so it serves as a regularizer.
    """
    return _total_variation(_tf(), images)


def _total_variation(tf, images):
    """``total_variation`` given the TensorFlow module (so tf.function can trace it)."""
    x = tf.convert_to_tensor(images, dtype=tf.float32)
    if x.shape.rank == 3:
        x = x[tf.newaxis]
    if x.shape.rank != 4:
        raise ValueError(
            f"total_variation expects images (N, H, W, C) or (H, W, C); got shape {tuple(x.shape)}."
        )
    down = x[:, 1:, :, :] - x[:, :-1, :, :]
    across = x[:, :, 1:, :] - x[:, :, :-1, :]
    return (tf.reduce_sum(tf.square(down), axis=[1, 2, 3])
            + tf.reduce_sum(tf.square(across), axis=[1, 2, 3]))


class FeatureVisualization:
    """What ``activation_maximization`` returns.

    Attributes
    ----------
    images : (K, H, W, C) float32, the optimised inputs (raw; see ``deprocess_image``).
    indices : (K,) the filters / classes, one per image.
    history : (steps + 1, K) the objective (without regularizers) during the ascent;
        row t < steps is measured at step t (on the jittered image when jitter > 0),
        the last row on the final image.
    start_objective, objective : (K,) the objective at the start and at the end.
    activation : (K,) the layer's mean output for the target channel / unit of the final
        image, after the layer's activation function (ReLU), i.e. what the network sees.
    dead : (K,) bool, True for a ReLU filter whose output is still exactly 0 for the
        optimised image: not even the best input found switches it on, so its image
        shows noise, not a feature. Always False for layers without ReLU (class scores).
    layer_name, params : the target layer and the settings used.
    """

    def __init__(self, images, indices, history, start_objective, objective, activation,
                 has_relu, layer_name, params):
        self.images = images
        self.indices = indices
        self.history = history
        self.start_objective = start_objective
        self.objective = objective
        self.activation = activation
        self.dead = (activation <= 0) if has_relu else np.zeros(len(indices), bool)
        self.layer_name = layer_name
        self.params = params

    @property
    def image(self):
        """The first (or only) optimised image, (H, W, C)."""
        return self.images[0]

    def __repr__(self):
        return (f"FeatureVisualization(layer={self.layer_name!r}, {len(self.indices)} images, "
                f"mean objective {self.start_objective.mean():.3g} -> {self.objective.mean():.3g}, "
                f"dead={int(self.dead.sum())})")


def _layer_units(model, layer_name):
    """(rank of the layer's output, number of channels / units) with clear errors."""
    layer = get_layer(model, layer_name)
    shape = tuple(layer.output.shape)
    if len(shape) not in (2, 4):
        raise ValueError(
            f"Layer {layer_name!r} has output shape {shape}; activation maximization needs a "
            f"convolutional layer (N, H, W, C) or a layer of class scores (N, K), e.g. "
            f"{', '.join(conv_layer_names(model) + [LOGITS_LAYER])}."
        )
    return len(shape), int(shape[-1])


def _check_unit_indices(index, n_units, layer_name, rank):
    what = "filters" if rank == 4 else "units"
    if index is None:
        return np.arange(n_units)
    idx = np.atleast_1d(np.asarray(index))
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"index must be an int or a list of ints (or None for all {what}); got {index!r}.")
    bad = idx[(idx < 0) | (idx >= n_units)]
    if bad.size:
        raise ValueError(
            f"index {bad.tolist()} out of range: layer {layer_name!r} has {n_units} {what}, "
            f"valid indices are 0 to {n_units - 1}."
        )
    return idx.astype(np.int64)


def _pre_activation(layer):
    """For a Dense/Conv layer with a built-in activation: (function of the layer's input
    giving its output BEFORE the activation, the activation). Otherwise (None, None)."""
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", "linear")
    if name == "linear" or not hasattr(layer, "kernel"):
        return None, None
    keras = _keras()
    if _layer_type(layer) == "Dense":
        def pre(x):
            out = keras.ops.matmul(x, layer.kernel)
            return out + layer.bias if layer.use_bias else out
    elif _layer_type(layer) == "Conv2D":
        def pre(x):
            out = layer.convolution_op(x, layer.kernel)
            return out + layer.bias if layer.use_bias else out
    else:
        return None, None
    return pre, activation


def _activation_maximization_fn(model, layer_name, spatial):
    """A compiled gradient ascent (all steps in one tf.function) for one target layer.

    For a layer with a built-in activation (conv + ReLU) the objective is the mean
    PRE-activation, so that the ascent has a gradient even where the ReLU is off.
    """
    tf = _tf()
    keras = _keras()
    layer = get_layer(model, layer_name)
    rank = len(layer.output.shape)
    pre, activation = _pre_activation(layer)
    if pre is None:
        sub = keras.Model(_single_input(model), layer.output, name=f"{model.name}_to_{layer_name}")
    else:
        sub = keras.Model(_single_input(model), layer.input, name=f"{model.name}_to_{layer_name}_input")

    def pre_and_post(x):
        out = sub(x, training=False)
        if pre is None:
            return out, out
        z = pre(out)
        return z, activation(z)

    def unit_mean(out, onehot):
        if rank == 4 and spatial == "center":
            out = out[:, out.shape[1] // 2, out.shape[2] // 2, :]   # the centre neuron only
        elif rank == 4:
            out = tf.reduce_mean(out, axis=[1, 2])    # mean over positions of each channel
        return tf.reduce_sum(out * onehot, axis=-1)   # the target channel / unit, per image

    @tf.function(reduce_retracing=True)
    def run(x0, onehot, shifts, lr, l2, tv):
        x = x0
        steps = tf.shape(shifts)[0]
        hist = tf.TensorArray(tf.float32, size=steps)
        for t in tf.range(steps):
            with tf.GradientTape() as tape:
                tape.watch(x)
                obj = unit_mean(pre_and_post(tf.roll(x, shift=shifts[t], axis=[1, 2]))[0], onehot)
                loss = (obj - l2 * tf.reduce_sum(tf.square(x), axis=[1, 2, 3])
                        - tv * _total_variation(tf, x))
            grad = tape.gradient(loss, x)
            norm = tf.sqrt(tf.reduce_sum(tf.square(grad), axis=[1, 2, 3], keepdims=True))
            x = x + lr * grad / (norm + 1e-8)                # L2-normalised step, per image
            hist = hist.write(t, obj)
        start = unit_mean(pre_and_post(x0)[0], onehot)
        z, a = pre_and_post(x)
        return x, hist.stack(), start, unit_mean(z, onehot), unit_mean(a, onehot)

    return run, pre is not None and getattr(activation, "__name__", "") == "relu"


def activation_maximization(model, layer_name, index, steps=100, lr=0.1, l2=0.0, tv=0.0,
                            jitter=0, seed=None, init_mean=0.5, init_std=0.1, spatial="mean"):
    """Gradient ascent in input space: the input that most excites a filter or a class.

    The objective is the mean over positions of channel ``index`` of a convolutional
    layer, taken before its ReLU (so that a filter that is off at the start still has a
    gradient), or, for a layer of class scores (``"logits"``, pre-softmax), the score
    of class ``index``. With ``spatial="center"`` a conv filter's objective is its
    activation at the centre position only (one neuron and its receptive field) instead
    of the mean over all positions. Starting from a small random image
    ``init_mean + init_std * N(0, 1)``, each of ``steps`` steps moves the image by
    ``lr`` along the L2-normalised gradient of

        objective(roll(x, jitter)) - l2 * sum(x**2) - tv * TV(x)

    (TV: ``total_variation``). ``index`` may be an int, a list of ints (one image per
    index, optimised together in one batch, much faster than one at a time) or None
    for every filter / class of the layer. ``jitter`` (pixels) shifts the image
    randomly (with wrap-around) before each step, so no single pixel alignment can be
    exploited. ``seed`` makes the start and the jitter repeatable. The image is not
    clipped; display it with ``deprocess_image``.

    Only the part of the model up to ``layer_name`` runs, and the whole ascent is one
    compiled TensorFlow function, cached per model and layer. Returns a
    ``FeatureVisualization`` (images, objective history, final ReLU activation, dead flags).
    Errors: unknown layer (lists the layers), index out of range (gives the valid range).
    """
    tf = _tf()
    if spatial not in ("mean", "center"):
        raise ValueError(f"spatial must be 'mean' or 'center', got {spatial!r}.")
    rank, n_units = _layer_units(model, layer_name)
    idx = _check_unit_indices(index, n_units, layer_name, rank)
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    for name, value in (("lr", lr), ("l2", l2), ("tv", tv), ("jitter", jitter), ("init_std", init_std)):
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    shape = tuple(model.inputs[0].shape[1:])
    rng = np.random.default_rng(seed)
    x0 = (init_mean + init_std * rng.standard_normal((len(idx),) + shape)).astype(np.float32)
    jitter = int(jitter)
    shifts = rng.integers(-jitter, jitter + 1, size=(steps, 2)).astype(np.int32)
    onehot = np.eye(n_units, dtype=np.float32)[idx]
    run, has_relu = _cached(model, ("activation_maximization", layer_name, spatial),
                            lambda: _activation_maximization_fn(model, layer_name, spatial))
    x, hist, start, final, post = run(
        tf.constant(x0), tf.constant(onehot), tf.constant(shifts),
        tf.constant(lr, tf.float32), tf.constant(l2, tf.float32), tf.constant(tv, tf.float32),
    )
    final = final.numpy()
    history = np.concatenate([hist.numpy(), final[np.newaxis]])
    params = dict(steps=steps, lr=lr, l2=l2, tv=tv, jitter=jitter, seed=seed,
                  init_mean=init_mean, init_std=init_std, spatial=spatial)
    return FeatureVisualization(x.numpy(), idx, history, start.numpy(), final, post.numpy(),
                                has_relu, layer_name, params)


def deprocess_image(x, crop=0, contrast=0.15):
    """Turn an optimised input into a displayable uint8 image.

    Per image: zero-centre, divide by the standard deviation, scale to the display
    range (``* contrast + 0.5``, so +-1 std becomes 0.35..0.65), clip to [0, 1], crop
    ``crop`` pixels from each border (where valid convolutions give pixels little
    gradient), then ``* 255`` rounded to uint8. Accepts (H, W), (H, W, C) or
    (N, H, W, C); a constant image becomes mid-grey.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim not in (2, 3, 4):
        raise ValueError(f"deprocess_image expects (H, W), (H, W, C) or (N, H, W, C); got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError("deprocess_image: the image contains NaN or infinite values.")
    axes = (1, 2, 3) if a.ndim == 4 else None
    a = a - a.mean(axis=axes, keepdims=True)
    a = a / (a.std(axis=axes, keepdims=True) + 1e-5)
    a = np.clip(a * contrast + 0.5, 0.0, 1.0)
    crop = int(crop)
    if crop:
        h_axis = 1 if a.ndim == 4 else 0
        if 2 * crop >= min(a.shape[h_axis], a.shape[h_axis + 1]):
            raise ValueError(f"crop={crop} would remove the whole image of shape {a.shape}.")
        sl = [slice(None)] * a.ndim
        sl[h_axis] = sl[h_axis + 1] = slice(crop, -crop)
        a = a[tuple(sl)]
    return np.round(a * 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Attribution
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Confidence and embeddings
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# PyTorch: VGG16 and feature inversion
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Plotting
# ---------------------------------------------------------------------------

def _grid(n, ncols, size, extra_width=0.0, title_space=0.5):
    """A figure with ``n`` small axes (constrained layout), all axis frames off."""
    import matplotlib.pyplot as plt

    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                             figsize=(size * ncols + extra_width, size * nrows + title_space))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes


def plot_feature_maps(maps, title=None, ncols=8, cmap="viridis", size=1.1, labels=None):
    """All channels of one image's feature maps (H, W, C), one panel per channel.

    One colour scale for all channels (0 .. the largest value), so panels compare
    honestly; channels that are zero everywhere are titled in grey with "(0)".
    """
    import matplotlib

    maps = np.asarray(maps)
    if maps.ndim == 4 and maps.shape[0] == 1:
        maps = maps[0]
    if maps.ndim != 3:
        raise ValueError(f"plot_feature_maps expects one image's maps (H, W, C); got shape {maps.shape}.")
    n = maps.shape[-1]
    vmin = min(0.0, float(maps.min()))
    vmax = max(float(maps.max()), vmin + 1e-6)
    fig, axes = _grid(n, ncols, size)
    im = None
    for c, ax in enumerate(axes.flat[:n]):
        im = ax.imshow(maps[..., c], cmap=matplotlib.colormaps[cmap], vmin=vmin, vmax=vmax)
        zero = not np.any(maps[..., c])
        label = labels[c] if labels is not None else f"ch {c}"
        ax.set_title(label + (" (0)" if zero else ""), fontsize=7, color="0.6" if zero else "black")
    fig.colorbar(im, ax=axes, shrink=0.8, label="activation")
    fig.suptitle(title or f"{n} feature maps ({maps.shape[0]}x{maps.shape[1]})")
    return fig


def plot_layer_sparsity(sparsity, spread=None, title=None):
    """Bar chart of the fraction of all-zero channels per layer (a dict name -> fraction).

    ``spread`` (optional dict name -> standard deviation over images) adds error bars.
    """
    import matplotlib.pyplot as plt

    names = list(sparsity)
    values = np.array([sparsity[n] for n in names]) * 100
    err = None if spread is None else np.array([spread[n] for n in names]) * 100
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.6), layout="constrained")
    bars = ax.bar(names, values, yerr=err, capsize=4, color="tab:blue")
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.1f} %", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xlabel("layer (input side -> output side)")
    ax.set_ylabel("channels all zero (%)")
    ax.set_ylim(0, max(10.0, float(values.max() + (0 if err is None else err.max())) * 1.2))
    ax.set_title(title or "Sparsity: fraction of channels that are off for an image")
    return fig


def _symmetric_norm(values):
    import matplotlib

    vmax = float(np.max(np.abs(values))) or 1.0
    return matplotlib.colors.TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax)


def plot_kernels(kernel, in_channel=0, annotate=True, ncols=8, size=1.25, title=None,
                 bias=None):
    """Each output filter's kernel slice as a red/blue heatmap centred on 0.

    ``kernel`` is (kh, kw, in_channels, out_channels) (as ``get_filter_weights``
    returns it); the slice for input channel ``in_channel`` is shown. With
    ``annotate`` each cell shows its weight. Red is positive, blue negative, white 0,
    on one symmetric scale for all filters.
    """
    import matplotlib

    k = np.asarray(kernel)
    if k.ndim != 4:
        raise ValueError(f"kernel must be (kh, kw, in_channels, out_channels); got shape {k.shape}.")
    if not 0 <= in_channel < k.shape[2]:
        raise ValueError(f"in_channel {in_channel} out of range: valid 0 to {k.shape[2] - 1}.")
    k = k[:, :, in_channel, :]
    n = k.shape[-1]
    norm = _symmetric_norm(k)
    cmap = matplotlib.colormaps["RdBu_r"]
    fig, axes = _grid(n, ncols, size)
    im = None
    for f, ax in enumerate(axes.flat[:n]):
        im = ax.imshow(k[..., f], cmap=cmap, norm=norm)
        label = f"filter {f}" + (f"\nbias {bias[f]:+.2f}" if bias is not None else "")
        ax.set_title(label, fontsize=7)
        if annotate:
            for (i, j), w in np.ndenumerate(k[..., f]):
                strong = abs(w) > 0.6 * norm.vmax
                ax.text(j, i, f"{w:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if strong else "black")
    fig.colorbar(im, ax=axes, shrink=0.8, label="weight")
    fig.suptitle(title or f"{n} kernels {k.shape[0]}x{k.shape[1]} (input channel {in_channel})")
    return fig


def plot_kernel_matrix(kernel, out_channels=None, in_channels=None, size=0.6, title=None):
    """Deeper-layer kernels as a matrix: one row per output filter, one column per input
    channel, each cell the (kh, kw) slice, on one symmetric red/blue scale.

    Every slice is shown as it is (no averaging over input channels, which would let
    positive and negative weights cancel and hide the structure).
    """
    import matplotlib

    k = np.asarray(kernel)
    if k.ndim != 4:
        raise ValueError(f"kernel must be (kh, kw, in_channels, out_channels); got shape {k.shape}.")
    outs = np.arange(k.shape[3]) if out_channels is None else np.asarray(out_channels)
    ins = np.arange(k.shape[2]) if in_channels is None else np.asarray(in_channels)
    sub = k[:, :, ins][:, :, :, outs]
    norm = _symmetric_norm(sub)
    cmap = matplotlib.colormaps["RdBu_r"]
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(outs), len(ins), squeeze=False, layout="constrained",
                             figsize=(size * len(ins) + 1.2, size * len(outs) + 0.6))
    im = None
    for r, o in enumerate(outs):
        for c, i in enumerate(ins):
            ax = axes[r, c]
            im = ax.imshow(sub[:, :, c, r], cmap=cmap, norm=norm)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"in {i}", fontsize=6)
            if c == 0:
                ax.set_ylabel(f"out {o}", fontsize=6)
    fig.colorbar(im, ax=axes, shrink=0.8, label="weight")
    fig.suptitle(title or "Kernels: rows = output filters, columns = input channels")
    return fig


def plot_feature_visualizations(images, labels=None, dead=None, ncols=8, size=1.2, crop=0,
                                title=None):
    """Optimised images (K, H, W, C), deprocessed, in a grid; dead ones are marked.

    ``dead`` is a boolean mask or a list of positions: those panels show the word
    "dead" instead of the (meaningless) noise image.
    """
    import matplotlib

    imgs = deprocess_image(images, crop=crop)
    if imgs.ndim == 3:
        imgs = imgs[np.newaxis]
    n = len(imgs)
    mask = np.zeros(n, bool)
    if dead is not None:
        dead = np.asarray(dead)
        if dead.dtype == bool:
            mask = dead
        else:
            mask[dead.astype(int)] = True
    fig, axes = _grid(n, ncols, size)
    gray = matplotlib.colormaps["gray"]
    im = None
    for i, ax in enumerate(axes.flat[:n]):
        label = labels[i] if labels is not None else str(i)
        if mask[i]:
            ax.imshow(np.full(imgs.shape[1:3], 128, np.uint8), cmap=gray, vmin=0, vmax=255)
            ax.text(0.5, 0.5, "dead", color="red", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, fontweight="bold")
            ax.set_title(str(label), fontsize=7, color="red")
            continue
        img = imgs[i, ..., 0] if imgs.shape[-1] == 1 else imgs[i]
        im = ax.imshow(img, cmap=gray, vmin=0, vmax=255)
        ax.set_title(str(label), fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8,
                     label="deprocessed (128 = mean, +-1 std = +-38)")
    fig.suptitle(title or "Activation maximization")
    return fig


def plot_objective_history(history, labels=None, title=None, max_lines=12):
    """The objective during gradient ascent (steps, K), one line per image (at most
    ``max_lines``, the rest summarised by the mean)."""
    import matplotlib.pyplot as plt

    h = np.asarray(history)
    if h.ndim == 1:
        h = h[:, np.newaxis]
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    steps = np.arange(len(h))
    for k in range(min(h.shape[1], max_lines)):
        ax.plot(steps, h[:, k], lw=1, label=None if labels is None else str(labels[k]))
    if h.shape[1] > max_lines:
        ax.plot(steps, h.mean(axis=1), color="black", lw=2, label=f"mean of all {h.shape[1]}")
    if labels is not None or h.shape[1] > max_lines:
        ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("step")
    ax.set_ylabel("objective")
    ax.set_title(title or "Gradient ascent: objective per step")
    return fig


def plot_maps_across_images(images, maps, labels=None, title=None, cmap="viridis", size=1.4):
    """Inputs (top row) and one channel's feature map for each (bottom row), one shared
    colour scale for the maps."""
    import matplotlib
    import matplotlib.pyplot as plt

    images = np.asarray(images)
    maps = np.asarray(maps)
    if images.ndim == 4:
        images = images[..., 0]
    if maps.ndim != 3 or len(maps) != len(images):
        raise ValueError(f"maps must be (N, h, w) with N = {len(images)} images; got shape {maps.shape}.")
    n = len(images)
    fig, axes = plt.subplots(2, n, squeeze=False, layout="constrained",
                             figsize=(size * n + 1.2, 2 * size + 0.6))
    vmax = max(float(maps.max()), 1e-6)
    im = None
    for i in range(n):
        axes[0, i].imshow(images[i], cmap="gray", vmin=0, vmax=1)
        im = axes[1, i].imshow(maps[i], cmap=matplotlib.colormaps[cmap], vmin=0, vmax=vmax)
        if labels is not None:
            axes[0, i].set_title(str(labels[i]), fontsize=8)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("input", fontsize=8)
    axes[1, 0].set_ylabel("feature map", fontsize=8)
    fig.colorbar(im, ax=axes[1, :], shrink=0.9, label="activation")
    fig.suptitle(title or "One filter on several inputs")
    return fig


def plot_image_grid(images, titles=None, ncols=10, cmap="gray", title=None, size=1.3,
                    title_colors=None, vmin=0.0, vmax=1.0):
    """Show images (N, H, W[, C]) in a grid with optional per-image titles.

    Returns the matplotlib Figure. ``title_colors`` colours each image's title
    (e.g. red for a mistake).
    """
    import matplotlib.pyplot as plt

    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    n = len(images)
    if n == 0:
        raise ValueError("plot_image_grid needs at least one image.")
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i], cmap=cmap, vmin=vmin, vmax=vmax)
        if titles is not None:
            color = title_colors[i] if title_colors is not None else "black"
            ax.set_title(str(titles[i]), fontsize=8, color=color)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig



# ---------------------------------------------------------------------------
# Widgets
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Exercise checks
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Command line: train, prefetch, run the notebook series
# ---------------------------------------------------------------------------

DEFAULT_EPOCHS = {"mnist": 4, "fashion_mnist": 12}


def train_and_save(dataset="mnist", epochs=None, seed=DEFAULT_SEED, out_dir=None, verbose="auto"):
    """Train the course CNN on ``dataset`` and save it with its measured test accuracy.

    This is the documented way to rebuild each file in ``saved_models/``.
    Returns the metadata dict written beside the model.
    """
    import time

    epochs = epochs or DEFAULT_EPOCHS[dataset]
    (x_train, y_train), (x_test, y_test) = load_dataset(dataset)
    model = build_mnist_cnn(seed=seed)
    start = time.perf_counter()
    train_model(model, x_train, y_train, epochs=epochs, seed=seed, verbose=verbose)
    train_seconds = time.perf_counter() - start
    _, test_acc = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
    out = Path(out_dir) if out_dir else MODELS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / model_path(dataset).name
    model.save(path)
    keras = _keras()
    info = {
        "dataset": dataset,
        "test_accuracy": round(float(test_acc), 4),
        "epochs": epochs,
        "seed": seed,
        "train_seconds": round(train_seconds, 1),
        "keras_version": keras.__version__,
        "command": f"python -m cnn_utils train --dataset {dataset}",
    }
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def prefetch(datasets=DATASETS, vgg16=True):
    """Download every dataset and weight file the course needs, ahead of a class.

    Datasets are saved as ``data/<name>.npz``; VGG16 weights go to torchvision's
    own cache. Runs the PyTorch part in a child process (see the import-order trap).
    """
    import subprocess

    DATA_DIR.mkdir(exist_ok=True)
    for name in datasets:
        target = DATA_DIR / f"{name}.npz"
        if target.is_file():
            _read_npz(target)
            print(f"{name}: already in {target}")
            continue
        (x_train, y_train), (x_test, y_test) = _download_dataset(name)
        np.savez_compressed(target, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
        print(f"{name}: saved to {target}")
    if vgg16:
        code = (
            "import torchvision; from torchvision.models import vgg16, VGG16_Weights; "
            "vgg16(weights=VGG16_Weights.IMAGENET1K_V1); print('VGG16 ImageNet weights: cached')"
        )
        result = subprocess.run([sys.executable, "-c", code])
        if result.returncode != 0:
            raise SystemExit(
                "Downloading the VGG16 weights failed (see above). Check the network and run "
                "`python -m cnn_utils prefetch` again."
            )


def notebook_paths():
    """The course notebooks, in teaching order."""
    return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def run_notebooks(names=None, out_dir=BUILD_DIR, parameters=None, html=True, kernel_name=None):
    """Execute the notebook series headless, in order, each in a fresh kernel.

    Writes the executed notebook and an HTML rendering of each to ``out_dir``.
    Raises ``SystemExit`` naming the notebook and the failing cell when one errors.
    """
    import time

    import papermill as pm

    paths = notebook_paths()
    if names:
        paths = [p for p in paths if any(n in p.name for n in names)]
        if not paths:
            raise SystemExit(f"No notebook matches {names}; notebooks: "
                             f"{', '.join(p.name for p in notebook_paths())}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = []
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.name}", flush=True)
        out_path = out_dir / path.name
        start = time.perf_counter()
        try:
            pm.execute_notebook(
                str(path), str(out_path), parameters=parameters or {},
                cwd=str(NOTEBOOKS_DIR), progress_bar=True, kernel_name=kernel_name,
            )
        except pm.PapermillExecutionError as err:
            raise SystemExit(
                f"\nFAILED: {path.name}, cell {err.exec_count} ({err.ename}: {err.evalue}).\n"
                f"The partly executed notebook is at {out_path}."
            ) from None
        seconds = time.perf_counter() - start
        timings.append((path.name, seconds))
        if html:
            _to_html(out_path)
        print(f"    done in {seconds:.0f} s -> {out_path}", flush=True)
    total = sum(s for _, s in timings)
    print(f"All {len(timings)} notebooks ran in {total:.0f} s. Output in {out_dir}/")
    return timings


def _to_html(ipynb_path):
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(ipynb_path), as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    Path(ipynb_path).with_suffix(".html").write_text(body, encoding="utf-8")


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cnn_utils", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a course CNN and save it in saved_models/")
    p_train.add_argument("--dataset", choices=DATASETS, default="mnist")
    p_train.add_argument("--epochs", type=int, default=None)
    p_train.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p_pre = sub.add_parser("prefetch", help="download datasets and VGG16 weights for offline use")
    p_pre.add_argument("--no-vgg16", action="store_true", help="skip the 528 MB VGG16 weights")
    p_run = sub.add_parser("run", help="execute the notebook series into build/")
    p_run.add_argument("names", nargs="*", help="only notebooks whose file name contains these")
    p_run.add_argument("--fast", action="store_true", help="run with FAST=True (as the tests do)")
    p_run.add_argument("--out", default=str(BUILD_DIR))
    args = parser.parse_args(argv)

    if args.command == "train":
        info = train_and_save(args.dataset, epochs=args.epochs, seed=args.seed)
        print(json.dumps(info, indent=2))
    elif args.command == "prefetch":
        prefetch(vgg16=not args.no_vgg16)
    elif args.command == "run":
        run_notebooks(args.names, out_dir=args.out, parameters={"FAST": True} if args.fast else None)


if __name__ == "__main__":
    main()
