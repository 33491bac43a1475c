"""Helpers for the course "What convolutional networks learn".

One module, sections in the order data flows:

    data -> models -> activations and filters -> feature visualization ->
    attribution -> confidence and embeddings -> sample photos ->
    PyTorch (VGG16: inversion, feature visualization) ->
    plotting -> widgets -> exercise checks -> command line

Importing this module is cheap: it imports neither TensorFlow nor PyTorch.
Each function imports its framework when it is called (see ``_tf()`` and
``_torch()``), and refuses with a clear error where the known crash would hit
(TensorFlow imported before torchvision in one process).

Conventions
-----------
* Images are float32 batches ``(N, H, W, C)`` in the model's input range, [0, 1]
  for the course's models and by default (``set_input_range`` declares another;
  uint8 images are mapped onto it); a single image ``(H, W, C)`` is a batch of one.
* Layers inside nested models (a transfer-learning base) are reached by name.
* Attribution uses pre-softmax class scores (the ``logits`` layer) by default.
* Bad input raises ``ValueError`` / ``TypeError`` that says what was expected.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parent
DATA_DIR = PROJECT_DIR / "data"
MODELS_DIR = PROJECT_DIR / "saved_models"
NOTEBOOKS_DIR = PROJECT_DIR / "notebooks"
BUILD_DIR = PROJECT_DIR / "build"

#: Environment variable naming a directory with ``mnist.npz`` / ``fashion_mnist.npz``
#: (tests and CI point it at a folder of dataset files).
DATA_ENV_VAR = "CNN_COURSE_DATA"

DEFAULT_SEED = 42


# ---------------------------------------------------------------------------
# Frameworks: lazy imports and the TensorFlow/torchvision crash guard
# ---------------------------------------------------------------------------

class FrameworkOrderError(RuntimeError):
    """Raised instead of the segmentation fault of importing torchvision after TensorFlow."""


def _tf():
    """Import and return TensorFlow, quietly.

    TensorFlow's C++ start-up messages ("oneDNN custom operations are on", "Could not
    find cuda drivers", ...) go straight to file descriptor 2, past
    ``TF_CPP_MIN_LOG_LEVEL``, and would clutter every notebook; they are silenced
    while TensorFlow loads. Set ``TF_CPP_MIN_LOG_LEVEL=0`` to see them.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":
        import tensorflow as tf

        return tf
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf

        tf.constant(0.0) + 1.0  # the first operation initialises the (absent) GPU runtime
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
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


def _is_int(value):
    """True for an integer (Python or NumPy), not a bool: the test behind every count and index argument."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value):
    """True for a finite real number (not a bool, not a string)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
            and bool(np.isfinite(value)))


def _converted(value, name, expected, convert=lambda v: np.asarray(v, dtype=np.float64)):
    """``convert(value)`` (by default a float64 array), or a TypeError saying that ``name``
    must be ``expected`` (e.g. "an array of numbers (N, D)")."""
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}.") from None


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
            missing = [key for key in _EXPECTED_SHAPES if key not in f.files]
            arrays = {key: f[key] for key in _EXPECTED_SHAPES if key not in missing}
    except Exception as err:  # zipfile.BadZipFile, EOFError, OSError, ValueError ...
        raise DataError(
            f"{path} is corrupt or truncated and cannot be read ({type(err).__name__}: {err}). "
            "Delete it and run `python -m course prefetch` to download a fresh copy."
        ) from None
    if missing:
        raise DataError(
            f"{path} is not a dataset file in the expected layout: missing array "
            f"{', '.join(repr(m) for m in missing)}. "
            f"Expected arrays {', '.join(_EXPECTED_SHAPES)}. Delete it and run "
            "`python -m course prefetch` to download a fresh copy."
        )
    for key, shape in _EXPECTED_SHAPES.items():
        arr = arrays[key]
        if arr.shape != shape or arr.dtype != np.uint8:
            raise DataError(
                f"{path}: array {key} has shape {arr.shape} and dtype {arr.dtype}, "
                f"expected {shape} uint8. Delete the file and run `python -m course prefetch`."
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
            f"and run `python -m course prefetch`, or set {DATA_ENV_VAR} to a folder "
            f"holding {name}.npz."
        ) from None


def _raw_dataset(name):
    for path in dataset_search_paths(name):
        if path.is_file():
            return _read_npz(path)
        if path.exists():   # a folder (or other non-file) of that name: say so, do not download past it
            raise DataError(f"{path} is not a file; {name}.npz must be the dataset file itself. Remove it, "
                            "or point CNN_COURSE_DATA at the folder that holds the file.")
    return _download_dataset(name)


def load_dataset(name="mnist"):
    """Load MNIST or Fashion-MNIST.

    Looks in ``$CNN_COURSE_DATA``, then ``data/``, then downloads through Keras.

    Returns ``(x_train, y_train), (x_test, y_test)``: images float32 in [0, 1] of
    shape (N, 28, 28, 1), labels int64 in 0..9.
    """
    (x_train, y_train), (x_test, y_test) = _raw_dataset(name)

    def prep(x):
        x = x.astype(np.float32)
        x /= 255.0          # in place: one float32 copy of the training set in memory, not two
        return x[..., np.newaxis]

    return (prep(x_train), y_train.astype(np.int64)), (prep(x_test), y_test.astype(np.int64))


def train_val_split(x, y, val_fraction=0.1, seed=DEFAULT_SEED):
    """Stratified split of a training set into (x_fit, y_fit), (x_val, y_val)."""
    from sklearn.model_selection import train_test_split

    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (float, np.floating)) \
            or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a fraction strictly between 0 and 1, got {val_fraction!r}.")
    seed = _check_seed(seed)
    if len(x) != len(y):
        raise ValueError(f"x and y must hold the same number of images and labels; got {len(x)} and {len(y)}.")
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(f"y must hold one class label per image, shape ({len(x)},); got shape {labels.shape}"
                         + (" (one-hot rows: use y.argmax(axis=1))." if labels.ndim == 2 else "."))
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise ValueError("y must hold class labels (integers), not continuous values; got "
                         f"{labels[labels != np.round(labels)][0]!r}.")
    _, counts = np.unique(labels, return_counts=True)
    if counts.size == 0 or counts.min() < 2:
        raise ValueError("The split is stratified by label: every class needs at least 2 examples; "
                         f"the rarest class here has {counts.min() if counts.size else 0}.")

    x_fit, x_val, y_fit, y_val = train_test_split(
        x, y, test_size=val_fraction, random_state=seed, stratify=y
    )
    return (x_fit, y_fit), (x_val, y_val)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

#: Name of the layer holding pre-softmax class scores in the course's models.
LOGITS_LAYER = "logits"


def _check_seed(seed, name="seed", allow_none=False):
    """A random seed: an integer from 0 to 2**32 - 1 (or None where ``allow_none``)."""
    if seed is None and allow_none:
        return None
    if not _is_int(seed) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}an integer from 0 to 2**32 - 1, "
                         f"got {seed!r}.")
    return int(seed)


def set_seed(seed=DEFAULT_SEED):
    """Seed Python, NumPy and Keras/TensorFlow for repeatable runs."""
    import random

    seed = _check_seed(seed)
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

    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
    if (len(shape) != 3 or any(not _is_int(d) or d < 1 for d in shape)
            or min(shape[:2]) < 18):
        raise ValueError(f"input_shape must be (height, width, channels) with height and width of at least 18 "
                         f"pixels (three 3x3 convolutions and two poolings), e.g. (28, 28, 1); got {input_shape!r}.")
    if not _is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer of at least 2 (a softmax over one class is always 1), "
                         f"got {num_classes!r}.")
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
    Images are checked as by ``as_image_batch`` (uint8 scaled to the model's range),
    labels must be class indices of the model's output. The loss is the cross-entropy
    of the model's output as it is: probabilities (a last softmax or sigmoid) or logits
    (a last layer without activation); one output unit is a binary classifier (labels 0, 1).
    """
    keras = _keras()
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not _is_number(learning_rate) or learning_rate <= 0:
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}.")
    x_train = as_image_batch(x_train, model, name="x_train")
    _check_keras_model(model)
    units = int(model.outputs[0].shape[-1])
    n_classes = max(2, units)
    y_train = _as_labels(y_train, len(x_train), n_classes, "y_train")
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise TypeError("validation_data must be a pair (images, labels), e.g. (x_val, y_val); got "
                            f"{type(validation_data).__name__}.")
        x_val, y_val = validation_data
        x_val = as_image_batch(x_val, model, name="validation images")
        validation_data = (x_val, _as_labels(y_val, len(x_val), n_classes, "validation labels"))
    set_seed(seed)
    steps = epochs * int(np.ceil(len(x_train) / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(steps, 1))
    # the loss must know whether the model gives probabilities or logits, or it trains on nonsense
    ends = _keras_output_activation(model)
    if units == 1:
        loss = keras.losses.BinaryCrossentropy(from_logits=ends != "sigmoid")
        metric = keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.5 if ends == "sigmoid" else 0.0)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=ends != "softmax")
        metric = "accuracy"
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=[metric])
    return model.fit(
        x_train, y_train, epochs=epochs, batch_size=batch_size,
        validation_data=validation_data, verbose=verbose, callbacks=callbacks,
        shuffle=True,
    )


def model_path(name, seed=None):
    """Path of a shipped model, e.g. ``model_path("mnist")``; ``seed=1`` names the same
    CNN trained with another seed (``saved_models/mnist_cnn_seed1.keras``)."""
    _check_dataset_name(name)
    if seed is None or seed == DEFAULT_SEED:
        return MODELS_DIR / f"{name}_cnn.keras"
    if not _is_int(seed):
        raise TypeError(f"seed must be None or an integer, got {seed!r}.")
    return MODELS_DIR / f"{name}_cnn_seed{seed}.keras"


def load_model(name="mnist"):
    """Load a shipped model (``"mnist"`` or ``"fashion_mnist"``) or a ``.keras`` file
    (``safe_mode=True``, so a file cannot run code when it is loaded)."""
    keras = _keras()
    if isinstance(name, (str, os.PathLike)) and str(name) in DATASETS:
        path = model_path(str(name))
        rebuild = f"Rebuild it with `python -m course train --dataset {name} --replace`."
    elif isinstance(name, (str, os.PathLike)):
        path = Path(name).expanduser()
        if path.suffix != ".keras":
            if path.suffix in (".h5", ".hdf5"):
                raise ValueError(
                    f"{path} is a legacy HDF5 (.h5) file; load_model reads Keras 3 `.keras` files. "
                    "Load it with keras.models.load_model(path) in the Keras version that saved it "
                    "and save it again with model.save('my_model.keras')."
                )
            raise ValueError(
                f"Cannot load {str(name)!r}: name a shipped model ({', '.join(DATASETS)}) or the "
                "path of a `.keras` file."
            )
        rebuild = ("Check the path; the shipped models are rebuilt with "
                   "`python -m course train --dataset mnist`.")
    else:
        raise TypeError(f"name must be a dataset name ({', '.join(DATASETS)}) or the path of a "
                        f"`.keras` file, got {type(name).__name__}.")
    if not path.is_file():
        raise FileNotFoundError(f"No saved model at {path} (resolved: {path.resolve()}). {rebuild}")
    try:
        return keras.models.load_model(path, safe_mode=True)
    except Exception as err:
        raise DataError(
            f"Could not load the model at {path} ({type(err).__name__}: {err}). The file may be "
            f"corrupt or from another Keras version. {rebuild}"
        ) from None


def model_info(name="mnist", seed=None):
    """The metadata recorded beside a shipped model (test accuracy, epochs, seed, ...)."""
    path = model_path(name, seed).with_suffix(".json")
    return json.loads(path.read_text())


def logits_model(model):
    """A model from the same input to the pre-softmax class scores: the layer named
    ``"logits"`` (the course's models), the input of a final Softmax layer, or the
    output of a model that ends without a softmax (the attribution methods' rule)."""
    keras = _keras()
    _model_input_shape(model)
    _check_keras_model(model)     # one output: a second one would be ignored without a word
    scores = _score_output(model, "logits")
    return _cached(model, ("logits_model",),
                   lambda: keras.Model(_single_input(model), scores, name=f"{model.name}_logits"))


#: The input range of the course's models (and the default for every model): pixels in [0, 1].
DEFAULT_INPUT_RANGE = (0.0, 1.0)


def set_input_range(model, input_range):
    """Declare the pixel range a model takes, for every helper that feeds it images.

    The course's models take [0, 1] (the default for any model). For your own model
    trained on another range, declare it once, e.g. ``set_input_range(model, (-1, 1))``
    (``keras.applications.MobileNetV2``), ``(0, 255)`` (models with built-in
    preprocessing); ``None`` switches the range check off (e.g. standardised inputs).
    Float images outside the range are then refused, and uint8 images (0..255) are
    mapped linearly onto it. Stored as ``model.input_range``; not saved with the model.
    Returns the model.
    """
    if not (_is_torch_module(model) or isinstance(model, _keras().Model)):
        raise TypeError(f"model must be a Keras model or a PyTorch nn.Module, got {type(model).__name__}.")
    model.input_range = _check_input_range(input_range)
    return model


def _check_input_range(input_range):
    if input_range is None:
        return None
    try:
        low, high = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise TypeError(f"input_range must be a pair (low, high) or None, got {input_range!r}.") from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"input_range must be finite with low < high, got {input_range!r}.")
    return (low, high)


def model_input_range(model):
    """The pixel range ``model`` takes: ``model.input_range`` if declared
    (see ``set_input_range``), else [0, 1]; ``None`` when the check is switched off."""
    if model is None or not hasattr(model, "input_range"):
        return DEFAULT_INPUT_RANGE
    return _check_input_range(model.input_range)


def _model_input_shape(model):
    """The model's input shape without the batch axis; a clear error for unbuilt models."""
    keras = _keras()
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a Keras model, got {type(model).__name__}.")
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(
            f"The model {model.name!r} has no defined input yet (a Sequential model without an "
            "Input, never called on data). Start it with an input, "
            "keras.Sequential([keras.Input((28, 28, 1)), ...]), or build it once with "
            "model.build((None, 28, 28, 1))."
        )
    if len(inputs) != 1:
        raise ValueError(f"The helpers need a model with one image input; this one has {len(inputs)}.")
    return tuple(inputs[0].shape[1:])


def as_image_batch(images, model=None, name="images", input_range="model"):
    """Validate images and return a float32 batch (N, H, W, C) in the model's input range.

    A single image (H, W, C) becomes a batch of one; a (H, W) image of a
    one-channel model gets its channel axis. With ``model``, the shape must match
    the model's input (``None`` dimensions match any size).

    Pixel scale: ``input_range="model"`` uses the model's range (``set_input_range``;
    [0, 1] by default and for the course's models). uint8 images (0..255) are mapped
    linearly onto it; float images outside it are refused (1e-3 of the range is
    tolerated for rounding). Pass a pair ``(low, high)`` for this call only, or ``None``
    to accept any finite value (e.g. images found by activation maximization).
    """
    if hasattr(images, "numpy"):
        images = images.numpy()
    try:
        raw = np.asarray(images)
        x = raw.astype(np.float32)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an array of numbers, got {type(images).__name__}.") from None
    if raw.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be an array of numbers, got dtype {raw.dtype}.")
    expected = None
    if model is not None:
        expected = _model_input_shape(model)

    def matches(shape, target):
        return len(shape) == len(target) and all(e is None or e == s for e, s in zip(target, shape))

    if expected is not None and expected[-1] == 1 and (
            matches(x.shape, expected[:-1]) or (x.ndim == len(expected) and matches(x.shape[1:], expected[:-1])
                                                and not matches(x.shape, expected))):
        x = x[..., np.newaxis]      # one grey image (H, W) or a batch of them (N, H, W)
    if expected is not None and x.ndim == len(expected):
        x = x[np.newaxis]
    elif expected is None and x.ndim == 3:
        x = x[np.newaxis]
    if x.ndim != 4:
        raise ValueError(
            f"{name} must be a batch (N, H, W, C) or a single image (H, W, C); got shape {x.shape}."
        )
    if expected is not None and not matches(x.shape[1:], expected):
        hint = ""
        if x.shape[-1] != expected[-1] and x.shape[1] == expected[-1]:
            hint = " The channels seem to come first: move them last with np.moveaxis(images, 1, -1)."
        raise ValueError(
            f"{name} have shape {x.shape[1:]} per image, but the model expects {expected}.{hint}"
        )
    if len(x) == 0:
        raise ValueError(f"{name} is an empty batch (0 images); pass at least one image.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contain NaN or infinite values.")
    rng = model_input_range(model) if isinstance(input_range, str) and input_range == "model" \
        else _check_input_range(input_range)
    if raw.dtype == np.uint8:
        if rng is None:
            raise ValueError(
                f"{name} are uint8 (0..255) but the model's input range is not declared, so they "
                "cannot be scaled: convert them yourself, or declare the range with "
                "cnn_utils.set_input_range(model, (low, high))."
            )
        low, high = rng
        # x / 255 first: for [0, 1] exactly what load_dataset gives
        return ((x / np.float32(255.0)) * np.float32(high - low) + np.float32(low)).astype(np.float32)
    if rng is not None:
        low, high = rng
        tol = 1e-3 * (high - low)
        lo_x, hi_x = float(x.min()), float(x.max())
        if lo_x < low - tol or hi_x > high + tol:
            hint = ""
            if hi_x > 1.5 and hi_x <= 255.0 + tol and high <= 1.0 + tol and lo_x >= -tol:
                hint = ("They look like pixel values 0..255: divide by 255.0 (or pass them as "
                        "uint8, which is scaled automatically). ")
            raise ValueError(
                f"{name} hold values from {lo_x:.4g} to {hi_x:.4g}, outside the model's input range "
                f"[{low:g}, {high:g}]. {hint}If the model really takes another range, declare it "
                "once with cnn_utils.set_input_range(model, (low, high)) (None switches the check "
                "off); pass input_range=None for images that leave the range on purpose."
            )
    return x


def most_confident_mistakes(probs, labels, k=16):
    """Indices of the ``k`` misclassified images with the highest predicted probability.

    ``probs`` is (N, classes) softmax output, ``labels`` the true classes. Sorted
    from most to least confident.
    """
    probs = _as_probs(probs)
    labels = _as_labels(labels, len(probs), probs.shape[1])
    if not _is_int(k) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}.")
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != labels)
    order = np.argsort(-probs[wrong, pred[wrong]], kind="stable")
    return wrong[order[:k]]


def predict_logits(model, images, batch_size=512, input_range="model"):
    """Pre-softmax class scores for a batch, as a NumPy array (N, classes).

    ``input_range``: see ``as_image_batch`` (``None`` for images outside the model's
    range on purpose, e.g. from ``activation_maximization``).
    """
    batch_size = _check_batch_size(batch_size)
    x = as_image_batch(images, model, input_range=input_range)
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


def _all_layers(model):
    """The model's layers in order, the layers of nested models (a transfer-learning
    base inside ``Sequential([base, pooling, head])``) right after the nested model."""
    return [chain[-1] for _, chain in _nested_layers(model)]


def _check_layers_model(model):
    """A Keras model (built or not: its layers are what matters here), else TypeError."""
    if not isinstance(model, _keras().Model):
        raise TypeError(f"model must be a Keras model, got {type(model).__name__}"
                        + (" (a PyTorch module: use vgg_layer_names or model.named_modules())."
                           if _is_torch_module(model) else "."))


def conv_layer_names(model):
    """Names of the model's 2-D convolutional layers (nested models' included), in model order."""
    _check_layers_model(model)
    return [l.name for l in _all_layers(model) if _layer_type(l) in _CONV_TYPES
            and len(l.output.shape) == 4]


def conv_and_pool_layer_names(model):
    """Names of the model's convolutional and pooling layers, in model order.

    Layers inside nested models (``Sequential([base, pooling, head])``) are included,
    by their own name, or ``"base/name"`` where a name occurs twice.
    """
    _check_layers_model(model)
    return [name for name, chain in _nested_layers(model)
            if _layer_type(chain[-1]) in _CONV_TYPES + _POOL_TYPES]


def last_conv_layer_name(model):
    """Name of the model's last convolutional layer (4-D output), found automatically,
    inside a nested base model too.

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
    return ", ".join(f"{l.name} ({_layer_type(l)})" for l in _all_layers(model))


def get_layer(model, layer_name):
    """The layer named ``layer_name``, searching nested models too (by name, or by path
    ``"base/name"`` where a name occurs twice), with an error that lists the model's layers."""
    _check_layers_model(model)
    return _layer_chain(model, layer_name)[-1]


def _flat_model(model):
    """For ``Sequential([base, ...])`` whose first layer is a model: the same network as one
    functional graph from the base's input (``base`` layers, then the rest), so that layers
    inside the base can be reached. Other models are returned as they are.

    Gradients need this one graph: ``_symbolic`` (what ``get_activations`` uses, for any
    nesting) reaches a nested layer through a second call of a sub-model, which the class
    score does not depend on."""
    keras = _keras()
    if not (isinstance(model, keras.Sequential) and model.layers
            and isinstance(model.layers[0], keras.Model)):
        return model

    def build():
        base = model.layers[0]
        h = base.outputs[0]
        for layer in model.layers[1:]:
            h = layer(h)
        return keras.Model(base.inputs, h, name=f"{model.name}_flat")
    return _cached(model, ("flat",), build)


def _resolve_layer(model, layer_name, for_cam=True):
    """The layer for a CAM method: a named layer with a spatial map (N, h, w, k).

    ``None``: the last convolutional layer's output after its ReLU, i.e. the conv layer
    itself when the ReLU is built in, else the ReLU / Activation layer that follows it
    (through a BatchNormalization), as in keras.applications' ResNets.
    """
    keras = _keras()
    if layer_name is None:
        layers = _all_layers(model)
        last = get_layer(model, last_conv_layer_name(model))
        chosen = prev = last
        for layer in layers[layers.index(last) + 1:]:
            if getattr(layer, "input", None) is not prev.output:
                break
            if _layer_type(layer) == "BatchNormalization":
                prev = layer
                continue
            act = getattr(getattr(layer, "activation", None), "__name__", None)
            if _layer_type(layer) == "ReLU" or (_layer_type(layer) == "Activation" and act == "relu"):
                chosen = layer
            break
        return chosen
    layer = get_layer(model, layer_name)
    shape = tuple(layer.output.shape)
    if isinstance(layer, keras.layers.InputLayer) or len(shape) != 4:
        convs = conv_layer_names(model)
        raise ValueError(
            f"Layer {layer_name!r} ({type(layer).__name__}, output shape {shape}) has no spatial feature "
            "map (N, h, w, channels); CAM methods need a convolutional (or pooling) layer. "
            f"Convolutional layers of this model: {', '.join(convs) or 'none'}."
        )
    return layer

# Sub-models and compiled TensorFlow functions are cached per (model, key) so that a
# notebook or a live demo pays the building and tracing cost once. The cache holds at
# most _CACHE_SIZE entries (least recently used dropped); each entry keeps its model
# alive, so an id() cannot be reused while cached.
_CACHE = {}
_CACHE_SIZE = 32


def _cached(model, key, build):
    """``build()`` once per (model, key), kept in a small least-recently-used cache."""
    full_key = (id(model),) + tuple(key)
    entry = _CACHE.pop(full_key, None)
    if entry is None:
        built = build()
        # A compiled function per (model, layer, method) has a fixed input signature and
        # is traced once. TensorFlow's retracing detector keys on the source code, so it
        # would count the first trace for a new model (e.g. the sanity check's randomised
        # copies) as "retracing" and print a misleading warning: switch that warning off.
        if hasattr(built, "_omit_frequent_tracing_warning"):
            built._omit_frequent_tracing_warning = True
        entry = (model, built)
    _CACHE[full_key] = entry  # most recently used last
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    return entry[1]


def _single_input(model):
    """The model's input tensor (models with one input), as Keras 3 expects it."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def _is_model(layer):
    return hasattr(layer, "layers") and hasattr(layer, "inputs") and hasattr(layer, "_inbound_nodes")


def _nested_layers(model):
    """Every layer, nested models' layers right after the model holding them, as
    ``(name, chain)``; ``chain`` is ``[nested model, ..., layer]`` and ``name`` the
    layer's own name, or its path ``"base/name"`` when the name occurs twice."""
    found = []

    def walk(m, prefix, chain):
        for layer in m.layers:
            found.append((prefix + layer.name, chain + [layer]))
            if _is_model(layer):
                walk(layer, prefix + layer.name + "/", chain + [layer])

    walk(model, "", [])
    counts = {}
    for path, chain in found:
        counts[chain[-1].name] = counts.get(chain[-1].name, 0) + 1
    return [(chain[-1].name if counts[chain[-1].name] == 1 else path, chain) for path, chain in found]


def _layer_chain(model, layer_name):
    """``[nested model, ..., layer]`` for a layer of ``model`` or of a model nested in it,
    by name or by path ``"base/name"``; errors list every layer."""
    if not isinstance(layer_name, str):
        raise TypeError(f"layer_name must be a string, got {type(layer_name).__name__}.")
    top = [l for l in model.layers if l.name == layer_name]
    if top:
        return [top[0]]
    nested = _nested_layers(model)
    paths = {}
    for name, chain in nested:
        paths["/".join(l.name for l in chain)] = chain
    if layer_name in paths:
        return paths[layer_name]
    matches = [path for path, chain in paths.items() if chain[-1].name == layer_name]
    if len(matches) == 1:
        return paths[matches[0]]
    if matches:
        raise ValueError(f"Layer name {layer_name!r} occurs in several nested models; name it by its "
                         f"path, one of: {', '.join(matches)}.")
    listing = ", ".join(f"{path} ({_layer_type(chain[-1])})" for path, chain in paths.items())
    raise ValueError(f"Unknown layer {layer_name!r}. The model's layers are: {listing}.")


def _feeding_tensor(model, inner):
    """The symbolic tensor of ``model``'s graph that ``inner`` (a nested model) is applied to."""
    keras = _keras()
    for node in getattr(inner, "_inbound_nodes", []):
        tensors = list(node.input_tensors)
        feed = tensors[0] if len(tensors) == 1 else tensors
        try:
            keras.Model(_single_input(model), feed)
        except Exception:  # a node of another graph (e.g. the nested model's own input)
            continue
        return feed
    raise ValueError(f"Cannot trace the layers inside the nested model {inner.name!r} back to the "
                     f"input of {model.name!r}; build the model with the functional API.")


def _graph_tensor(model, layer, attr="output"):
    """``layer``'s ``output`` (or ``input``) at its call within ``model``'s graph. A layer
    called in two graphs (``_flat_model`` reuses a Sequential model's head) has a tensor per
    call, and ``layer.output`` is the first call's."""
    if len(layer._inbound_nodes) > 1:
        seen, todo = set(), list(model.outputs)
        while todo:
            tensor = todo.pop()
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            op, index, _ = tensor._keras_history
            node = op._inbound_nodes[index]
            if op is layer:
                found = node.output_tensors if attr == "output" else node.input_tensors
                return found[0] if len(found) == 1 else found
            todo.extend(node.input_tensors)
    return getattr(layer, attr)


def _symbolic(model, chain, attr="output"):
    """The symbolic ``input`` / ``output`` of ``chain[-1]`` in ``model``'s own graph
    (so that ``keras.Model(model.inputs, ...)`` reaches layers inside nested models)."""
    if len(chain) == 1:
        return getattr(chain[0], attr)
    keras = _keras()
    inner = chain[0]
    sub = keras.Model(_single_input(inner), _symbolic(inner, chain[1:], attr))
    return sub(_feeding_tensor(model, inner))


def activation_model(model, layer_names):
    """A multi-output Keras model from the model's input to the named layers' outputs
    (layers inside nested models included)."""
    keras = _keras()
    _model_input_shape(model)
    layer_names = (layer_names,) if isinstance(layer_names, str) else tuple(layer_names)
    chains = [_layer_chain(model, name) for name in layer_names]
    return _cached(model, ("activations",) + layer_names,
                   lambda: keras.Model(_single_input(model), [_symbolic(model, c) for c in chains],
                                       name=f"{model.name}_activations"))


def _check_batch_size(batch_size):
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return int(batch_size)


def _as_name_list(layer_names):
    """One layer name or an iterable of them, as a list."""
    if isinstance(layer_names, str):
        return [layer_names]
    try:
        return list(layer_names)
    except TypeError:
        raise TypeError(f"layer_names must be a layer name, a list of names or None, got "
                        f"{type(layer_names).__name__}.") from None


def get_activations(model, images, layer_names=None, batch_size=256, input_range="model"):
    """Outputs of the named layers for a batch of images, in one forward pass.

    ``layer_names=None`` means every convolutional and pooling layer, in model
    order, including those inside nested models (a transfer-learning base); a layer
    inside a nested model is named by its own name or by its path ``"base/name"``.
    Returns a dict ``layer name -> np.ndarray`` (N, H, W, C) float32, in the
    order of ``layer_names``. A single image is treated as a batch of one.
    Unknown layer names raise ``ValueError`` listing the model's layers; a wrong
    image shape raises ``ValueError`` naming the expected shape; ``input_range`` as in
    ``as_image_batch``. Models with a variable input size take any image size.
    """
    batch_size = _check_batch_size(batch_size)
    x = as_image_batch(images, model, input_range=input_range)
    if layer_names is None:
        layer_names = conv_and_pool_layer_names(model)
        if not layer_names:
            raise ValueError(f"The model {model.name!r} has no convolutional or pooling layer; name the "
                             f"layers you want with layer_names (its layers: {_layer_list(model)}).")
    layer_names = _as_name_list(layer_names)
    if not layer_names:
        raise ValueError("layer_names is empty: name at least one layer, or pass None.")
    if len(set(layer_names)) != len(layer_names):
        raise ValueError(f"layer_names contains a name twice: {layer_names}.")
    sub = activation_model(model, layer_names)
    outputs = [[] for _ in layer_names]
    for start in range(0, len(x), batch_size):
        out = sub(x[start:start + batch_size], training=False)
        if not isinstance(out, (list, tuple)):
            out = [out]
        for store, o in zip(outputs, out):
            store.append(np.asarray(o, dtype=np.float32))
    return {name: np.concatenate(parts) for name, parts in zip(layer_names, outputs)}


def _as_feature_maps(activations):
    """Activations as a non-empty, finite (N, H, W, C) array; (H, W, C) is one image."""
    if isinstance(activations, dict):
        raise TypeError("activations must be one layer's array (N, H, W, C), not the dict of "
                        "get_activations: pick a layer, e.g. acts['conv1'].")
    a = np.asarray(activations)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"activations must be an array of numbers, got dtype {a.dtype}.")
    if a.ndim == 3:
        a = a[np.newaxis]
    if a.ndim != 4:
        raise ValueError(
            f"activations must be feature maps (N, H, W, C) or (H, W, C); got shape {a.shape} "
            "(a dense layer's output has no feature maps: use a convolutional or pooling layer)."
        )
    if a.size == 0:
        raise ValueError(f"activations are empty (shape {a.shape}).")
    if not np.all(np.isfinite(a)):
        raise ValueError("activations contain NaN or infinite values.")
    return a


def channel_sparsity(activations, per_image=False):
    """Fraction of channels whose whole feature map is exactly zero, averaged over images.

    ``activations`` is (N, H, W, C) (or (H, W, C) for one image). With
    ``per_image=True`` returns the fraction for each image, shape (N,).
    """
    a = _as_feature_maps(activations)
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
    a = _as_feature_maps(activations)
    if not _is_number(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}.")
    return np.flatnonzero(a.max(axis=(0, 1, 2)) <= threshold)


def dead_filters(model, layer_name, images, threshold=0.0):
    """Filters of ``layer_name`` that never activate (output <= threshold) on ``images``.

    Returns their indices as an int array (empty when every filter fires somewhere).
    Use a few hundred real images: a filter silent on all of them is "dead" and its
    activation-maximization image would only show noise.
    """
    if _layer_type(get_layer(model, layer_name)) == "InputLayer":
        raise ValueError(f"{layer_name!r} is the input layer; choose one of the convolutional "
                         f"layers: {', '.join(conv_and_pool_layer_names(model))}.")
    acts = get_activations(model, images, [layer_name])[layer_name]
    if acts.ndim != 4:
        raise ValueError(
            f"Layer {layer_name!r} has output shape {acts.shape[1:]}, not a feature map "
            f"(H, W, C); choose one of the convolutional layers: {', '.join(conv_layer_names(model))}."
        )
    return dead_channels(acts, threshold)


def get_filter_weights(model, layer_name):
    """The kernel (kh, kw, in_channels, out_channels) and bias (out_channels,) of a conv layer
    (layers inside nested models included, by name or ``"base/name"``)."""
    layer = get_layer(model, layer_name)
    if _layer_type(layer) != "Conv2D":
        convs = [name for name, chain in _nested_layers(model) if _layer_type(chain[-1]) == "Conv2D"]
        raise ValueError(
            f"Layer {layer_name!r} is a {_layer_type(layer)}, not a Conv2D layer; the model's "
            f"Conv2D layers are: {', '.join(convs) or 'none'}."
        )
    weights = layer.get_weights()
    kernel = np.asarray(weights[0], dtype=np.float32)
    bias = np.asarray(weights[1], dtype=np.float32) if len(weights) > 1 else np.zeros(kernel.shape[-1], np.float32)
    return kernel, bias


def match_filters(kernel_a, kernel_b):
    """For each filter of ``kernel_a``, the filter of ``kernel_b`` whose weights correlate best.

    Kernels are (kh, kw, in_channels, out_channels), as ``get_filter_weights`` returns
    them, with the same (kh, kw, in_channels). Each filter is flattened and compared
    with every filter of the other kernel by Pearson correlation (so scale and offset
    do not count, the sign does: a filter and its negative detect opposite patterns).
    Returns ``(index, correlation)``: for filter ``i`` of ``kernel_a``, the best
    filter ``index[i]`` of ``kernel_b`` and their correlation, both (out_channels_a,).
    Two networks need not order their filters alike, so filters are compared by
    best match, never by position.
    """
    shapes = []
    for name, k in (("kernel_a", kernel_a), ("kernel_b", kernel_b)):
        k = np.asarray(k, dtype=np.float64)
        if k.ndim != 4:
            raise ValueError(f"{name} must be a conv kernel (kh, kw, in_channels, out_channels) as "
                             f"get_filter_weights returns it; got shape {k.shape}.")
        shapes.append(k)
    a, b = shapes
    if a.shape[:3] != b.shape[:3]:
        raise ValueError(f"kernel_a and kernel_b must have the same (kh, kw, in_channels) to be compared; "
                         f"got {a.shape[:3]} and {b.shape[:3]}.")
    a = a.reshape(-1, a.shape[-1]).T                      # (filters, weights)
    b = b.reshape(-1, b.shape[-1]).T
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    if np.any(norm_a == 0) or np.any(norm_b == 0):
        raise ValueError("a filter with all weights equal has no correlation with anything; "
                         "leave constant filters out before matching.")
    corr = (a / norm_a[:, None]) @ (b / norm_b[:, None]).T     # (filters_a, filters_b)
    index = corr.argmax(axis=1)
    return index, corr[np.arange(len(corr)), index]


def top_activating_images(model, layer_name, images, index=None, k=5, batch_size=256):
    """The ``k`` images that excite each filter (or class score) of ``layer_name`` most.

    A filter's response to an image is its mean activation over all positions
    (after the layer's ReLU: what the next layer sees), the objective that
    ``activation_maximization`` raises with ``spatial="mean"``; for a layer of
    class scores (N, K) it is the score itself. ``index``: an int, a list of ints or
    None (every filter). Returns ``(indices, values)``, both (n_filters, k), row
    ``i`` sorted by decreasing response: ``images[indices[i]]`` are the dataset
    examples to show beside the synthetic image (Zeiler & Fergus 2014; Olah et al. 2017).
    """
    acts = get_activations(model, images, [layer_name], batch_size=batch_size)[layer_name]
    if acts.ndim not in (2, 4):
        raise ValueError(f"Layer {layer_name!r} has output shape {acts.shape[1:]}; choose a "
                         f"convolutional layer or the class scores ({LOGITS_LAYER!r}).")
    response = acts.mean(axis=(1, 2)) if acts.ndim == 4 else acts          # (N, units)
    idx = _check_unit_indices(index, response.shape[1], layer_name, acts.ndim)
    if not _is_int(k) or not 1 <= k <= len(response):
        raise ValueError(f"k must be an integer from 1 to the number of images ({len(response)}); got {k!r}.")
    order = np.argsort(-response[:, idx], axis=0, kind="stable")[:k].T     # (filters, k)
    return order, np.take_along_axis(response[:, idx].T, order, axis=1)


# ---------------------------------------------------------------------------
# Feature visualization
# ---------------------------------------------------------------------------

def total_variation(images):
    """Total variation of each image, a TensorFlow tensor (N,): the sum of SQUARED differences
    between neighbouring pixels, down the rows and across the columns, never across channels::

        TV(x) = sum_{i,j,c} (x[i+1, j, c] - x[i, j, c])**2 + (x[i, j+1, c] - x[i, j, c])**2

    Squaring (beta = 2 in Mahendran & Vedaldi's notation) punishes large jumps most and has a
    smooth gradient. The course's other two definitions: the exercise (notebook 09) sums
    ABSOLUTE differences, like ``tf.image.total_variation``, which tolerates sharp edges; the
    PyTorch ``total_variation_norm(x, beta)`` (notebook 07) sums each pixel's squared gradient
    magnitude to the power beta/2 (beta = 2: this sum without the differences along the last
    row and column). ``images``: (N, H, W, C) or one (H, W, C), NumPy or tensor; differentiable.
    """
    tf = _tf()
    x = _converted(images, "images", "an array of numbers (N, H, W, C) or (H, W, C)",
                   lambda v: tf.convert_to_tensor(v, dtype=tf.float32))
    if x.shape.rank == 3:
        x = x[tf.newaxis]
    if x.shape.rank != 4:
        raise ValueError(f"images must be (N, H, W, C) or (H, W, C); got shape {tuple(x.shape)}.")
    down = x[:, 1:, :, :] - x[:, :-1, :, :]      # each pixel minus the one above it
    across = x[:, :, 1:, :] - x[:, :, :-1, :]    # each pixel minus the one to its left
    return tf.reduce_sum(down ** 2, axis=[1, 2, 3]) + tf.reduce_sum(across ** 2, axis=[1, 2, 3])


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
    _model_input_shape(model)
    layer = _layer_chain(model, layer_name)[-1]
    shape = tuple(layer.output.shape)
    if len(shape) not in (2, 4):
        raise ValueError(
            f"Layer {layer_name!r} has output shape {shape}; activation maximization needs a "
            f"convolutional layer (N, H, W, C) or a layer of class scores (N, K), e.g. "
            f"{', '.join(conv_and_pool_layer_names(model) + [LOGITS_LAYER])}."
        )
    if _layer_type(layer) == "InputLayer":
        raise ValueError(f"{layer_name!r} is the input layer; choose a convolutional layer or the "
                         "layer of class scores.")
    return len(shape), int(shape[-1])


def _check_unit_indices(index, n_units, layer_name, rank):
    what = "filters" if rank == 4 else "units"
    if index is None:
        return np.arange(n_units)
    idx = np.atleast_1d(np.asarray(index))
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or idx.dtype == bool or idx.size == 0:
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
    chain = _layer_chain(model, layer_name)
    layer = chain[-1]
    rank = len(layer.output.shape)
    pre, activation = _pre_activation(layer)
    if pre is None:
        sub = keras.Model(_single_input(model), _symbolic(model, chain, "output"),
                          name=f"{model.name}_to_{layer.name}")
    else:
        sub = keras.Model(_single_input(model), _symbolic(model, chain, "input"),
                          name=f"{model.name}_to_{layer.name}_input")

    def pre_and_post(x):
        out = sub(x, training=False)
        if pre is None:
            return out, out
        z = pre(out)
        return z, activation(z)

    def unit_mean(out, onehot):
        if rank == 4 and spatial == "center":                     # the centre neuron only
            out = out[:, tf.shape(out)[1] // 2, tf.shape(out)[2] // 2, :]
        elif rank == 4:
            out = tf.reduce_mean(out, axis=[1, 2])    # mean over positions of each channel
        return tf.reduce_sum(out * onehot, axis=-1)   # the target channel / unit, per image

    shape = _model_input_shape(model)      # None for a variable size: traced once for all sizes
    n_units = int(layer.output.shape[-1])
    spec = tf.TensorSpec

    # One trace per model and layer: batch size, step count and weights are all inputs.
    @tf.function(input_signature=[
        spec((None,) + shape, tf.float32), spec((None, n_units), tf.float32),
        spec((None, 2), tf.int32), spec((), tf.float32), spec((), tf.float32), spec((), tf.float32)])
    def run(x0, onehot, shifts, lr, l2, tv):
        x = x0
        steps = tf.shape(shifts)[0]
        hist = tf.TensorArray(tf.float32, size=steps)
        for t in tf.range(steps):
            with tf.GradientTape() as tape:
                tape.watch(x)
                obj = unit_mean(pre_and_post(tf.roll(x, shift=shifts[t], axis=[1, 2]))[0], onehot)
                loss = (obj - l2 * tf.reduce_sum(tf.square(x), axis=[1, 2, 3])
                        - tv * total_variation(x))
            grad = tape.gradient(loss, x)
            norm = tf.sqrt(tf.reduce_sum(tf.square(grad), axis=[1, 2, 3], keepdims=True))
            x = x + lr * grad / (norm + 1e-8)                # L2-normalised step, per image
            hist = hist.write(t, obj)
        start = unit_mean(pre_and_post(x0)[0], onehot)
        z, a = pre_and_post(x)
        return x, hist.stack(), start, unit_mean(z, onehot), unit_mean(a, onehot)

    return run, pre is not None and getattr(activation, "__name__", "") == "relu"


def activation_maximization(model, layer_name, index, steps=100, lr=0.1, l2=0.0, tv=0.0,
                            jitter=0, seed=None, init_mean=None, init_std=0.1, spatial="mean",
                            image_shape=None):
    """Gradient ascent in input space: the input that most excites a filter or a class.

    The objective is the mean over positions of channel ``index`` of a convolutional
    layer, taken before its ReLU (so that a filter that is off at the start still has a
    gradient), or, for a layer of class scores (``"logits"``, pre-softmax), the score
    of class ``index``. Layers inside nested models are reached by name (or
    ``"base/name"``). With ``spatial="center"`` a conv filter's objective is its
    activation at the centre position only (one neuron and its receptive field) instead
    of the mean over all positions. Starting from a small random image
    ``init_mean + init_std * N(0, 1)`` (``init_mean=None``: the middle of the model's
    input range, 0.5 for the course's models), each of ``steps`` steps moves the image by
    ``lr`` along the L2-normalised gradient of

        objective(roll(x, jitter)) - l2 * sum(x**2) - tv * TV(x)

    (TV: ``total_variation``). ``index`` may be an int, a list of ints (one image per
    index, optimised together in one batch, much faster than one at a time) or None
    for every filter / class of the layer. ``jitter`` (pixels) shifts the image
    randomly (with wrap-around) before each step, so no single pixel alignment can be
    exploited. ``seed`` makes the start and the jitter repeatable. The image is not
    clipped; display it with ``deprocess_image``. ``image_shape`` (H, W, C) is the size
    of the image to optimise, required for a model with a variable input size
    (``Input((None, None, 3))``), by default the model's input shape.

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
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an integer of at least 1, got {steps!r}.")
    steps = int(steps)
    if init_mean is None:
        span = model_input_range(model) or DEFAULT_INPUT_RANGE
        init_mean = 0.5 * (span[0] + span[1])
    if not _is_int(jitter) or jitter < 0:
        raise ValueError(f"jitter must be a whole number of pixels >= 0, got {jitter!r}.")
    for name, value in (("lr", lr), ("l2", l2), ("tv", tv), ("init_std", init_std), ("init_mean", init_mean)):
        if not _is_number(value) or (value < 0 and name != "init_mean"):
            raise ValueError(f"{name} must be a finite number{'' if name == 'init_mean' else ' >= 0'}, "
                             f"got {value!r}.")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}.")
    shape = _model_input_shape(model)
    if image_shape is not None:
        if not isinstance(image_shape, (tuple, list)):
            raise TypeError(f"image_shape must be a shape (H, W, C), e.g. {tuple(d or 64 for d in shape)}; "
                            f"got {image_shape!r}.")
        image_shape = tuple(image_shape)
        if len(image_shape) != len(shape) or any(
                not isinstance(d, (int, np.integer)) or d < 1 or (e is not None and e != d)
                for d, e in zip(image_shape, shape)):
            raise ValueError(f"image_shape must be a shape (H, W, C) of positive integers that the "
                             f"model accepts, {shape}; got {image_shape!r}.")
        shape = tuple(int(d) for d in image_shape)
    elif any(d is None for d in shape):
        raise ValueError(f"The model accepts images of any size {shape}: say which size to optimise "
                         "with image_shape=(H, W, C), e.g. image_shape=(64, 64, 3).")
    if jitter and 2 * int(jitter) >= min(shape[0], shape[1]):
        raise ValueError(f"jitter={jitter} pixels is too large for images of {shape[0]}x{shape[1]}.")
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
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"deprocess_image expects an image array of numbers, got {type(x).__name__}.") from None
    if a.ndim not in (2, 3, 4):
        raise ValueError(f"deprocess_image expects (H, W), (H, W, C) or (N, H, W, C); got shape {a.shape}.")
    if a.size == 0:
        raise ValueError(f"deprocess_image: the image is empty (shape {a.shape}).")
    if not np.all(np.isfinite(a)):
        raise ValueError("deprocess_image: the image contains NaN or infinite values.")
    axes = (1, 2, 3) if a.ndim == 4 else None
    a = a - a.mean(axis=axes, keepdims=True)
    a = a / (a.std(axis=axes, keepdims=True) + 1e-5)
    a = np.clip(a * contrast + 0.5, 0.0, 1.0)
    if not _is_int(crop) or crop < 0:
        raise ValueError(f"crop must be an integer >= 0 (pixels per border), got {crop!r}.")
    if not _is_number(contrast) or contrast <= 0:
        raise ValueError(f"contrast must be a positive number, got {contrast!r}.")
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
#
# One API for Keras models and PyTorch modules:
#
#     f(model, images, class_index=None, *, layer=None, score="logits", normalize=True, ...)
#
# ``images`` are NumPy (N, H, W, C) (or one (H, W, C)) in the model's input range;
# maps come back as float32 (N, H, W). Each method is written once, in NumPy, from
# what a framework "engine" gives it: the class scores of a batch, their gradient
# with respect to the input, or a layer's feature maps A (N, h, w, k, channels last)
# and the gradient dS_c/dA. The formulas below (``grad_cam_weights``, ...) accept
# NumPy arrays, TensorFlow tensors and PyTorch tensors alike, so a notebook can show
# them on its own GradientTape or autograd code.

#: The environment variable that sets ATTRIBUTION_MEMORY_BUDGET in MiB (default 1024); the
#: course's JupyterHub sets 256 so that a class fits one server (README, sizing the hub).
MEMORY_BUDGET_ENV_VAR = "CNN_COURSE_MEMORY_BUDGET_MB"


def _memory_budget_from_env(default_mib=1024):
    value = os.environ.get(MEMORY_BUDGET_ENV_VAR, "").strip()
    if not value:
        return default_mib << 20
    try:
        mib = int(value)
        if mib < 16:
            raise ValueError
    except ValueError:
        import warnings

        warnings.warn(f"{MEMORY_BUDGET_ENV_VAR}={value!r} is not a whole number of MiB >= 16; "
                      f"using {default_mib}. Set it to e.g. 256, or unset it.", stacklevel=2)
        return default_mib << 20
    return mib << 20


#: Bytes of intermediate values (activations, their gradients) one call into the
#: model may hold. Every method splits its batch (and Score-CAM / occlusion their
#: masked copies) into calls below this, so memory stays bounded whatever the batch.
#: 1 GiB unless $CNN_COURSE_MEMORY_BUDGET_MB says otherwise; assignable at run time.
ATTRIBUTION_MEMORY_BUDGET = _memory_budget_from_env()


class _Ops:
    """The few tensor operations the attribution formulas use, for NumPy, TF or torch."""

    def __init__(self, kind):
        self.kind = kind
        if kind == "torch":
            import torch

            self.sum = lambda a, axis, keepdims=False: torch.sum(a, dim=axis, keepdim=keepdims)
            self.mean = lambda a, axis, keepdims=False: torch.mean(a, dim=axis, keepdim=keepdims)
            self.amax = lambda a, axis, keepdims=False: torch.amax(a, dim=axis, keepdim=keepdims)
            self.amin = lambda a, axis, keepdims=False: torch.amin(a, dim=axis, keepdim=keepdims)
            self.relu, self.where, self.einsum, self.abs = torch.relu, torch.where, torch.einsum, torch.abs
        elif kind == "tensorflow":
            tf = _tf()
            self.sum = lambda a, axis, keepdims=False: tf.reduce_sum(a, axis=axis, keepdims=keepdims)
            self.mean = lambda a, axis, keepdims=False: tf.reduce_mean(a, axis=axis, keepdims=keepdims)
            self.amax = lambda a, axis, keepdims=False: tf.reduce_max(a, axis=axis, keepdims=keepdims)
            self.amin = lambda a, axis, keepdims=False: tf.reduce_min(a, axis=axis, keepdims=keepdims)
            self.relu, self.where, self.einsum, self.abs = tf.nn.relu, tf.where, tf.einsum, tf.abs
        else:
            self.sum = lambda a, axis, keepdims=False: np.sum(a, axis=axis, keepdims=keepdims)
            self.mean = lambda a, axis, keepdims=False: np.mean(a, axis=axis, keepdims=keepdims)
            self.amax = lambda a, axis, keepdims=False: np.max(a, axis=axis, keepdims=keepdims)
            self.amin = lambda a, axis, keepdims=False: np.min(a, axis=axis, keepdims=keepdims)
            self.relu = lambda a: np.maximum(a, 0)
            self.where, self.einsum, self.abs = np.where, np.einsum, np.abs


_OPS = {}


def _ops(x):
    kind = type(x).__module__.split(".")[0]
    kind = kind if kind in ("torch", "tensorflow") else "numpy"
    if kind not in _OPS:
        _OPS[kind] = _Ops(kind)
    return _OPS[kind]


def _min_max_scaled(a, axes):
    """``(a - min a) / (max a - min a)`` over ``axes`` (NumPy, TF or torch), and where the
    slice ``varies``; a constant slice becomes all zeros. The course's one min-max scaling."""
    o = _ops(a)
    lo = o.amin(a, axes, keepdims=True)
    span = o.amax(a, axes, keepdims=True) - lo
    varies = span > 0
    return o.where(varies, (a - lo) / o.where(varies, span, 1.0 + 0.0 * span), 0.0 * span), varies


def saliency_from_gradients(grads):
    """Simonyan et al. (2014): ``M_ij = max_c |dS/dx_ijc|``; (N, H, W, C) -> (N, H, W)."""
    o = _ops(grads)
    return o.amax(o.abs(grads), -1)


def grad_cam_weights(activations, grads):
    """Grad-CAM channel weights (Selvaraju et al., 2017, eq. 1):
    ``w_k = mean_ij dS_c / dA^k_ij``. ``activations`` and ``grads`` (N, h, w, k) -> (N, k)."""
    return _ops(grads).mean(grads, (1, 2))


def grad_cam_plus_plus_weights(activations, grads, renormalize_alphas=False):
    """Grad-CAM++ channel weights (Chattopadhay et al., 2018, eq. 19), for ``Y_c = exp(S_c)``:

    ``alpha^k_ij = g^2 / (2 g^2 + sum_ab A^k_ab g^3)`` (0 where the denominator is 0),
    ``w_k = sum_ij alpha^k_ij ReLU(g)``, with ``g = dS_c / dA^k_ij``. The positive
    factor ``exp(S_c)`` is left out (it scales an image's weights alike).
    ``renormalize_alphas``: divide each channel's alphas by their spatial sum, as the
    authors' code and tf-keras-vis do. (N, h, w, k) -> (N, k).
    """
    o = _ops(grads)
    g2 = grads * grads
    denom = 2.0 * g2 + o.sum(activations, (1, 2), keepdims=True) * g2 * grads
    alpha = o.where(denom != 0, g2 / o.where(denom != 0, denom, 1.0), 0.0 * g2)
    if renormalize_alphas:
        total = o.sum(alpha, (1, 2), keepdims=True)
        alpha = alpha / o.where(total != 0, total, 1.0 + 0.0 * total)
    return o.sum(alpha * o.relu(grads), (1, 2))


def class_activation_map(activations, weights):
    """``L = ReLU(sum_k w_k A^k)``: (N, h, w, k) and (N, k) -> (N, h, w)."""
    o = _ops(activations)
    return o.relu(o.einsum("nhwk,nk->nhw", activations, weights))


def score_cam_masks(upsampled):
    """Score-CAM masks (Wang et al., 2020): each upsampled map min-max scaled to [0, 1],
    ``M^k = (A^k - min A^k) / (max A^k - min A^k)``. (N, H, W, k) -> (masks, varies (N, k));
    a constant channel has no mask (all zeros, ``varies`` False)."""
    masks, varies = _min_max_scaled(upsampled, (1, 2))
    return masks, varies[:, 0, 0, :]


def score_cam_weights(masked_scores, cls, varies, weighting="probability", probabilities=False):
    """Score-CAM channel weights from the class scores of the masked inputs.

    ``masked_scores`` (N, k, K): pre-softmax scores ``S(x * M^k)``. With
    ``weighting="probability"`` (the authors' code, tf-keras-vis):
    ``w_k = softmax(S(x * M^k))_c``; with ``"channel_softmax"`` (the paper's
    Algorithm 1 without a baseline, pytorch-grad-cam): ``w = softmax_k(S_c(x * M^k))``.
    ``probabilities=True``: the scores are probabilities already, used as they are.
    Constant channels (``varies`` False) get weight 0. NumPy; returns (N, k).
    """
    s = np.asarray(masked_scores, dtype=np.float64)
    target = np.take_along_axis(s, np.asarray(cls)[:, None, None], axis=2)[..., 0]     # (N, k)
    if weighting == "probability" and probabilities:
        w = target
    elif weighting == "probability":
        w = 1.0 / np.exp(s - target[..., None]).sum(axis=2)              # softmax_c, stable
    elif weighting == "channel_softmax":
        t = np.where(varies, target, -np.inf)
        t = t - t.max(axis=1, keepdims=True)
        w = np.exp(t) / np.exp(t).sum(axis=1, keepdims=True)
    else:
        raise ValueError(f"weighting must be 'probability' or 'channel_softmax', got {weighting!r}.")
    return np.where(varies, w, 0.0).astype(np.float32)


def occlusion_windows(input_hw, window, stride):
    """Top-left corners of Zeiler & Fergus' occluding windows: every ``stride`` pixels
    while the window fits (as captum's ``Occlusion``). Returns (rows, cols, (wh, ww))."""
    H, W = input_hw
    win = (window, window) if np.isscalar(window) else tuple(window)
    st = (stride, stride) if np.isscalar(stride) else tuple(stride)
    for name, value, limit in (("window", win, (H, W)), ("stride", st, (H, W))):
        if len(value) != 2 or any(not _is_int(v) or v < 1
                                  for v in value):
            raise ValueError(f"{name} must be a positive int or a pair (height, width) of positive ints; "
                             f"got {value!r}.")
    if win[0] > H or win[1] > W:
        raise ValueError(f"window {win} is larger than the images ({H}, {W}): choose a smaller window.")
    rows = np.arange(0, H - win[0] + 1, st[0])
    cols = np.arange(0, W - win[1] + 1, st[1])
    return rows, cols, win


def occlusion_map(drops, input_hw, rows, cols, win):
    """Zeiler & Fergus (2014): the map at a pixel is the mean score drop
    ``S_c(x) - S_c(x occluded)`` over the windows covering it (0 where none does).
    ``drops`` (N, len(rows), len(cols)) -> (N, H, W)."""
    N = len(drops)
    total = np.zeros((N,) + tuple(input_hw), np.float64)
    count = np.zeros(tuple(input_hw), np.float64)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            total[:, r:r + win[0], c:c + win[1]] += drops[:, i, j, None, None]
            count[r:r + win[0], c:c + win[1]] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


def normalize_maps(maps):
    """Min-max scale each map of a batch (N, ...) to [0, 1], as float32.

    A constant map (including all zeros) becomes all zeros rather than NaN.
    """
    m = _converted(maps, "maps", "an array of numbers (N, H, W[, C])",
                   lambda v: np.asarray(v, dtype=np.float32))
    if m.ndim < 2:
        raise ValueError(f"maps must be a batch (N, H, W[, C]); got shape {m.shape}.")
    if not np.all(np.isfinite(m)):
        raise ValueError("maps contain NaN or infinite values.")
    return _min_max_scaled(m, tuple(range(1, m.ndim)))[0].astype(np.float32)


# --- CAM geometry: where each feature-map cell sits in the input ---------------------------
#
# A cell of a convolutional feature map depends on a window of input pixels, its receptive
# field. Along one axis, a chain of window operations (convolution or pooling with kernel k,
# stride s, dilation d and p padding cells before the first) is described exactly by
#   centre of unit j = start + j * jump,   jump <- jump * s,
#   start <- start + jump * ((k - 1) * d / 2 - p),   size <- size + (k - 1) * d * jump
# in input-pixel coordinates (pixel i covers [i - 0.5, i + 0.5]). Naive resizing places unit
# j at (j + 0.5) * H / h - 0.5 instead, which agrees only for same-padded chains whose pools
# divide the input exactly (VGG16); valid convolutions shift the centres inwards and can leave
# border pixels that no unit sees.

class AxisGeometry(NamedTuple):
    """Receptive-field geometry of a layer along one input axis.

    ``centres`` (n,) float: input-pixel coordinate of each unit's receptive-field centre
    (pixel ``i`` covers ``[i - 0.5, i + 0.5]``); ``size``: receptive-field span in pixels,
    padding included; ``stride``: pixels between neighbouring centres; ``seen`` (N,) bool:
    input pixels inside the receptive field of at least one unit.
    """
    centres: np.ndarray
    size: int
    stride: int
    seen: np.ndarray


class ReceptiveFields(NamedTuple):
    """``receptive_fields`` result: one ``AxisGeometry`` per axis (``y`` rows, ``x`` columns)."""
    y: AxisGeometry
    x: AxisGeometry

    @property
    def seen(self):
        """(H, W) bool: pixels that at least one unit of the layer sees."""
        return np.outer(self.y.seen, self.x.seen)


class _Axis:
    """Geometry of a tensor along one axis while walking a network from its input."""

    def __init__(self, n):
        self.n, self.start, self.jump, self.size = n, 0.0, 1, 1
        self.dep = np.eye(n, dtype=bool)           # (units, input pixels) dependence

    def window(self, k, s, d, pad, n_out):
        """A convolution/pooling window (also padding/cropping: k = s = d = 1)."""
        if n_out < 1:
            raise ValueError(f"the layer leaves no output units along an axis (input {self.n}, "
                             f"kernel {k}, stride {s}, dilation {d}); the input is too small.")
        out = _Axis.__new__(_Axis)
        out.n = n_out
        out.start = self.start + self.jump * ((k - 1) * d / 2.0 - pad)
        out.jump = self.jump * s
        out.size = self.size + (k - 1) * d * self.jump
        out.dep = np.zeros((n_out, self.dep.shape[1]), dtype=bool)
        for t in range(k):
            src = np.arange(n_out) * s - pad + t * d
            ok = (src >= 0) & (src < self.n)
            out.dep[ok] |= self.dep[src[ok]]
        return out

    def same_as(self, other):
        return (self.n, self.start, self.jump) == (other.n, other.start, other.jump)

    def merged(self, other):
        out = _Axis.__new__(_Axis)
        out.n, out.start, out.jump = self.n, self.start, self.jump
        out.size, out.dep = max(self.size, other.size), self.dep | other.dep
        return out

    def result(self):
        return AxisGeometry(self.start + self.jump * np.arange(self.n), int(self.size),
                            int(self.jump), self.dep.any(axis=0))


def _conv_output_size(n, k, s, d, padding):
    """(output size, padding before) of a window with Keras/TensorFlow padding rules."""
    span = (k - 1) * d + 1
    if padding == "valid":
        return (n - span) // s + 1, 0
    if padding == "same":
        n_out = -(-n // s)
        total = max((n_out - 1) * s + span - n, 0)
        return n_out, total // 2
    raise ValueError(f"padding {padding!r} is not supported (expected 'valid' or 'same').")


def _torch_output_size(n, k, s, d, p, ceil_mode=False):
    """Output size of a PyTorch convolution/pooling with ``p`` padding cells on each side."""
    num = n + 2 * p - (k - 1) * d - 1
    n_out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (n_out - 1) * s >= n + p:   # PyTorch: the last window must start inside
        n_out -= 1
    return n_out


_KERAS_PASS_THROUGH = {
    "InputLayer", "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "ThresholdedReLU",
    "BatchNormalization", "Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout",
    "AlphaDropout", "Rescaling", "Identity", "ActivityRegularization",
}
_KERAS_PER_POSITION = {"Softmax", "LayerNormalization", "Normalization", "Concatenate"}
_KERAS_MERGE = {"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate"}
_KERAS_WINDOWS = {"Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D"}


def _pair(v):
    return (int(v), int(v)) if np.ndim(v) == 0 else tuple(int(a) for a in v)


def _keras_layer_geometry(layer, inputs):
    """The (y, x) geometry after ``layer`` from the geometries of its inputs."""
    kind = type(layer).__name__
    if kind in _KERAS_PER_POSITION:
        axes = getattr(layer, "axis", -1)
        axes = [axes] if np.ndim(axes) == 0 else list(axes)
        if any(int(a) not in (-1, 3) for a in axes):
            raise ValueError(f"Layer {layer.name!r} ({kind}) works along axis {axes}, across positions; "
                             "receptive fields are defined only for layers that act per position.")
    if kind in _KERAS_MERGE:
        y, x = inputs[0]
        for gy, gx in inputs[1:]:
            if not (y.same_as(gy) and x.same_as(gx)):
                raise ValueError(
                    f"Layer {layer.name!r} ({kind}) merges branches whose cells sit at different input "
                    "positions, so its cells have no single receptive-field centre.")
            y, x = y.merged(gy), x.merged(gx)
        return y, x
    if len(inputs) != 1:
        raise ValueError(f"Layer {layer.name!r} ({kind}) has {len(inputs)} inputs; receptive fields are "
                         "traced through single-input layers and Add/Concatenate-style merges only.")
    y, x = inputs[0]
    if kind in _KERAS_PASS_THROUGH or kind in _KERAS_PER_POSITION:
        return y, x
    if kind in _KERAS_WINDOWS:
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise ValueError(f"Layer {layer.name!r} uses data_format={layer.data_format!r}; "
                             "receptive fields are traced for channels_last models.")
        if "Pooling" in kind:
            k, s, d = _pair(layer.pool_size), _pair(layer.strides or layer.pool_size), (1, 1)
        else:
            k, s, d = _pair(layer.kernel_size), _pair(layer.strides), _pair(layer.dilation_rate)
        out = []
        for g, ka, sa, da in zip((y, x), k, s, d):
            n_out, pad = _conv_output_size(g.n, ka, sa, da, layer.padding)
            out.append(g.window(ka, sa, da, pad, n_out))
        return tuple(out)
    if kind in ("ZeroPadding2D", "Cropping2D"):
        amount = layer.padding if kind == "ZeroPadding2D" else layer.cropping
        sign = 1 if kind == "ZeroPadding2D" else -1
        return tuple(g.window(1, 1, 1, sign * int(before), g.n + sign * (int(before) + int(after)))
                     for g, (before, after) in zip((y, x), amount))
    raise ValueError(
        f"Cannot trace receptive fields through layer {layer.name!r} ({kind}): only convolution, "
        "pooling, padding/cropping, per-position layers (activations, batch normalisation, dropout) and "
        "merges of equal geometry are understood. Pick a layer before it.")


def _keras_receptive_fields(model, layer_name, input_hw):
    model = _flat_model(model)   # Sequential([base, ...]): the base's layers in one graph
    _check_keras_model(model)
    keras = _keras()
    if isinstance(layer_name, keras.layers.Layer):
        layer_name = layer_name.name
    target = get_layer(model, layer_name)
    model_input = model.inputs[0]
    memo = {}

    def geometry(tensor):
        if id(tensor) in memo:
            return memo[id(tensor)]
        op, node_index, _ = tensor._keras_history
        if tensor is model_input:
            result = (_Axis(input_hw[0]), _Axis(input_hw[1]))
        elif isinstance(op, keras.layers.InputLayer):
            raise ValueError(f"Layer {layer_name!r} depends on an input other than the model's image input.")
        elif isinstance(op, keras.Model):
            raise ValueError(f"Layer {layer_name!r} lies behind the nested model {op.name!r}; receptive fields "
                             "are traced through the layers of one functional model.")
        else:
            node = op._inbound_nodes[node_index]
            result = _keras_layer_geometry(op, [geometry(t) for t in node.input_tensors])
        memo[id(tensor)] = result
        return result

    try:
        y, x = geometry(target.output)
    except ValueError as err:
        raise ValueError(f"Receptive fields of layer {layer_name!r}: {err}") from None
    shape = tuple(target.output.shape)
    if len(shape) != 4:
        raise ValueError(f"Layer {layer_name!r} has output shape {shape}; receptive fields need a spatial "
                         "feature map (N, h, w, channels).")
    static = tuple(model_input.shape[1:3])
    if static == tuple(input_hw) and None not in shape[1:3] and tuple(shape[1:3]) != (y.n, x.n):
        raise ValueError(f"Traced a {y.n}x{x.n} map for layer {layer_name!r}, but it is "
                         f"{shape[1]}x{shape[2]}: a layer changes geometry in a way this tracer misses.")
    return y, x


_TORCH_PASS_THROUGH = {
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish",
    "Hardswish", "Hardsigmoid", "Hardtanh", "Sigmoid", "Tanh", "Softplus", "Softsign",
    "BatchNorm2d", "Dropout", "Dropout2d", "Identity", "LocalResponseNorm", "Softmax2d",
}


def _torch_module_geometry(name, module, y, x):
    kind = type(module).__name__
    if kind in _TORCH_PASS_THROUGH:
        return y, x
    if kind in ("Conv2d", "MaxPool2d", "AvgPool2d"):
        k = _pair(module.kernel_size)
        s = _pair(module.stride if module.stride is not None else module.kernel_size)
        d = _pair(getattr(module, "dilation", 1))
        ceil_mode = bool(getattr(module, "ceil_mode", False))
        padding = module.padding
        out = []
        for i, (g, ka, sa, da) in enumerate(zip((y, x), k, s, d)):
            if padding == "valid":
                p = 0
            elif padding == "same":
                p = (ka - 1) * da // 2
                n_out = g.n
            else:
                p = _pair(padding)[i]
            if padding != "same":
                n_out = _torch_output_size(g.n, ka, sa, da, p, ceil_mode)
            out.append(g.window(ka, sa, da, p, n_out))
        return tuple(out)
    if kind in ("ZeroPad2d", "ConstantPad2d"):
        left, right, top, bottom = module.padding
        return (y.window(1, 1, 1, top, y.n + top + bottom), x.window(1, 1, 1, left, x.n + left + right))
    raise ValueError(
        f"Cannot trace receptive fields through module {name!r} ({kind}): only Conv2d, MaxPool2d, "
        "AvgPool2d, padding and per-position modules (activations, BatchNorm2d, dropout) are understood. "
        "Pick a module before it.")


def _torch_receptive_fields(model, layer_name, input_hw):
    if not isinstance(layer_name, str):
        raise TypeError(f"layer must be a module name from model.named_modules(), got {layer_name!r}.")
    modules = dict(model.named_modules())
    if layer_name not in modules or layer_name == "":
        names = [n for n in modules if n][:40]
        raise ValueError(f"Unknown module {layer_name!r}. Names from model.named_modules(): "
                         f"{', '.join(names)}{' ...' if len(modules) > 41 else ''}.")
    leaves = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    inside = [i for i, (n, _) in enumerate(leaves) if n == layer_name or n.startswith(layer_name + ".")]
    if not inside:
        raise ValueError(f"Module {layer_name!r} holds no layers.")
    # The chain: every leaf module registered up to the target, applied in that order
    # (true of nn.Sequential and of torchvision's VGG).
    y, x = _Axis(input_hw[0]), _Axis(input_hw[1])
    for name, module in leaves[:inside[-1] + 1]:
        try:
            y, x = _torch_module_geometry(name, module, y, x)
        except ValueError as err:
            raise ValueError(f"Receptive fields of module {layer_name!r}: {err}") from None
    return y, x


def _is_torch_module(model):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def _check_hw(value, name):
    try:
        hw = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        hw = ()
    if len(hw) != 2 or min(hw) < 1 or any(int(v) != v for v in value):
        raise ValueError(f"{name} must be (height, width), two positive integers; got {value!r}.")
    return hw


def receptive_fields(model, layer, input_hw=None):
    """Where each cell of ``layer``'s feature map looks in the input.

    ``model``: a Keras functional model (``layer`` a layer name; the graph is walked
    from the input) or a PyTorch module (``layer`` a name from ``named_modules()``;
    the leaf modules registered up to it are taken as the chain applied to the input,
    as in ``nn.Sequential`` and torchvision's VGG). Convolutions and pooling of any
    kernel, stride, padding and dilation are traced; per-position layers
    (activations, batch normalisation, dropout) and merges of equal geometry pass
    through; anything else raises ``ValueError``. ``input_hw`` is (H, W) (Keras:
    defaults to the model's input size).

    Returns ``ReceptiveFields(y, x)``, one ``AxisGeometry(centres, size, stride, seen)``
    per axis, with ``centre_j = start + j * stride`` in pixel coordinates (pixel ``i``
    covers ``[i - 0.5, i + 0.5]``); ``.seen`` is the (H, W) mask of pixels that at
    least one unit sees. (Araujo et al., "Computing receptive fields of CNNs", Distill 2019.)
    """
    torch_model = _is_torch_module(model)
    if not torch_model and not isinstance(model, _keras().Model):
        raise TypeError(f"model must be a Keras model or a PyTorch nn.Module, got {type(model).__name__}.")
    if input_hw is None:
        if torch_model:
            raise ValueError("input_hw is required for a PyTorch model: pass the image size (height, width).")
        _check_keras_model(model)
        input_hw = tuple(model.inputs[0].shape[1:3])
        if None in input_hw:
            raise ValueError("The model's input size is not fixed; pass input_hw=(height, width).")
    input_hw = _check_hw(input_hw, "input_hw")
    if torch_model and isinstance(layer, str) and layer not in dict(model.named_modules()):
        layer = _vgg_alias_names(model).get(layer, layer)     # VGG's names (relu5_3), as attribution takes
    trace = _torch_receptive_fields if torch_model else _keras_receptive_fields
    y, x = trace(model, layer, input_hw)
    return ReceptiveFields(y.result(), x.result())


def _linear_interpolation_matrix(centres, size, seen=None):
    """(size, len(centres)) float32: row p holds the linear-interpolation weights that
    give pixel ``p`` from values sitting at the (increasing) positions ``centres``;
    pixels beyond the first/last centre take the edge value; rows of pixels that are
    not ``seen`` (bool (size,)) are zero."""
    centres = np.asarray(centres, dtype=np.float64)
    m = np.zeros((size, len(centres)), dtype=np.float32)
    for p in range(size):
        if len(centres) == 1 or p <= centres[0]:
            m[p, 0] = 1.0
        elif p >= centres[-1]:
            m[p, -1] = 1.0
        else:
            j = int(np.searchsorted(centres, p, side="right")) - 1
            t = (p - centres[j]) / (centres[j + 1] - centres[j])
            m[p, j], m[p, j + 1] = 1.0 - t, t
    if seen is not None:
        m[~np.asarray(seen, dtype=bool)] = 0.0
    return m


def naive_upsampling_matrices(map_hw, input_hw):
    """What bilinear resizing (``tf.image.resize``, half-pixel centres) does, as matrices:
    cell ``i`` of ``h`` placed at ``(i + 0.5) * H / h - 0.5``. Shown for comparison only."""
    (h, w), (H, W) = _check_hw(map_hw, "map_hw"), _check_hw(input_hw, "input_hw")
    return (_linear_interpolation_matrix((np.arange(h) + 0.5) * H / h - 0.5, H),
            _linear_interpolation_matrix((np.arange(w) + 0.5) * W / w - 0.5, W))


def cam_upsampling_matrices(model, layer, input_hw, map_hw=None):
    """Matrices ``(R_y (H, h), R_x (W, w))`` that bring a map ``(h, w)`` of ``layer`` to
    the input grid: ``up = R_y @ cam @ R_x.T``. ``model`` is a Keras model or a PyTorch
    module, ``layer`` a layer name (PyTorch: a name from ``model.named_modules()``).

    Each cell sits at its receptive-field centre (``receptive_fields``); pixels between
    centres are interpolated linearly, pixels beyond the outermost centres take the
    edge cell's value, and pixels that no unit of the layer sees (``receptive_fields(
    ...).seen`` is False: e.g. the last two rows and columns of the course CNN, lost
    to valid convolutions and flooring pools) are 0. For same-padded networks whose
    pools divide the input (VGG16) this equals bilinear resizing with half-pixel
    centres. ``map_hw``, if given (e.g. measured in a forward pass), is checked
    against the traced size.
    """
    rf = receptive_fields(model, layer, input_hw)
    H, W = _check_hw(input_hw, "input_hw")
    if map_hw is not None:
        map_hw = _check_hw(map_hw, "map_hw")
        traced = (len(rf.y.centres), len(rf.x.centres))
        if map_hw != traced:
            raise ValueError(
                f"Layer {layer!r} gives a {map_hw[0]}x{map_hw[1]} map, but tracing its chain of "
                f"layers predicts {traced[0]}x{traced[1]}: the model does not apply its modules in "
                "registration order (or uses an operation that is not a module), so its geometry is unknown.")
    return (_linear_interpolation_matrix(rf.y.centres, H, rf.y.seen),
            _linear_interpolation_matrix(rf.x.centres, W, rf.x.seen))


def _upsample(maps, R_y, R_x):
    """``R_y @ map @ R_x.T`` for each map: (N, h, w) -> (N, H, W), or (N, h, w, k) -> (N, H, W, k)."""
    if maps.ndim == 3:
        return np.matmul(np.matmul(R_y, maps), R_x.T)
    out = np.tensordot(maps, R_x, axes=([2], [1]))                       # (N, h, k, W)
    out = np.tensordot(R_y, out, axes=([1], [1]))                        # (H, N, k, W)
    return np.ascontiguousarray(out.transpose(1, 0, 3, 2))               # (N, H, W, k)


def _chunks(n, bytes_per_item):
    """Slices of n items so that each slice holds at most ATTRIBUTION_MEMORY_BUDGET bytes."""
    step = int(max(1, ATTRIBUTION_MEMORY_BUDGET // max(1, int(bytes_per_item))))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _first_copies(x):
    """For each image of the batch x, the index of its first identical copy in x: the
    class-independent passes (Score-CAM's masks, occlusion's windows) run once per photo."""
    import hashlib

    seen = {}
    return np.array([seen.setdefault(hashlib.blake2b(np.ascontiguousarray(xi).tobytes(), digest_size=16).digest(), i)
                     for i, xi in enumerate(x)], dtype=np.int64)


def _class_indices(class_index, n, num_classes):
    """Per-image target classes as int32 (N,), with -1 meaning 'the predicted class'."""
    if class_index is None:
        return np.full(n, -1, dtype=np.int32)
    arr = np.asarray(class_index)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"class_index must be None, an int or one int per image; got {class_index!r}.")
    if arr.ndim == 0:
        arr = np.full(n, int(arr))
    elif arr.shape != (n,):
        raise ValueError(
            f"class_index must be None, an int, or one int per image (shape ({n},)); got shape {arr.shape}."
        )
    bad = (arr < 0) | (arr >= num_classes)
    if np.any(bad):
        raise ValueError(
            f"class_index {arr[bad][0]} is out of range: the model has {num_classes} classes (0..{num_classes - 1})."
        )
    return arr.astype(np.int32)


def _check_score(score):
    if score not in ("logits", "probability"):
        raise ValueError(f"score must be 'logits' (pre-softmax, the default) or 'probability', got {score!r}.")


def _check_flags(**flags):
    """Options that are True or False (a string such as "no" would count as True)."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}.")


def _as_model_images(images, model, name):
    """``as_image_batch`` for a Keras model or a PyTorch module (its declared input range)."""
    if _is_torch_module(model):
        return as_image_batch(images, None, name=name, input_range=model_input_range(model))
    return as_image_batch(images, model, name=name)


def _baseline_value(value, model):
    """A baseline given as one number: finite and inside the model's input range."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"baseline must be a number or an image, got {value!r}.")
    if not np.isfinite(value):
        raise ValueError(f"baseline contains NaN or infinite values ({value!r}).")
    rng = model_input_range(model)
    if rng is not None and not rng[0] - 1e-3 * (rng[1] - rng[0]) <= value <= rng[1] + 1e-3 * (rng[1] - rng[0]):
        raise ValueError(f"baseline {value!r} lies outside the model's input range [{rng[0]:g}, {rng[1]:g}]; "
                         f"choose a pixel value inside it (e.g. {rng[0]:g} for black).")
    return float(value)


def _no_layer(layer, method):
    if layer is not None:
        raise ValueError(f"{method} attributes to the input pixels: layer must be None, got {layer!r} "
                         "(layer chooses the feature maps of the CAM methods).")


# -- Keras engine -----------------------------------------------------------------

def _check_keras_model(model):
    keras = _keras()
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a Keras model or a PyTorch nn.Module, got {type(model).__name__}.")
    try:
        model.inputs
    except (AttributeError, ValueError):
        raise ValueError(
            f"The model {model.name!r} is not built yet (a Sequential model without an Input layer "
            "has no input shape): build it first, e.g. model.build((None, 28, 28, 1)) or start it "
            "with keras.Input(shape), or call it once on a batch of images."
        ) from None
    if len(model.inputs) != 1:
        raise ValueError(f"The helpers need a model with one image input; this one has {len(model.inputs)}.")
    if len(model.outputs) != 1:
        raise ValueError(
            f"The model {model.name!r} has {len(model.outputs)} outputs; the helpers need one output of "
            "class scores. Choose it explicitly: keras.Model(model.inputs, model.outputs[i])."
        )


def _score_output(model, score):
    """The symbolic tensor of class scores (N, K): pre-softmax (``"logits"``) or the model's
    output (``"probability"``). For ``"logits"``: the layer named ``LOGITS_LAYER``, else the
    input of a final Softmax layer, else the pre-activation of a final Dense layer with a
    softmax or sigmoid activation, else the output itself (already unnormalised scores)."""
    keras = _keras()
    _check_score(score)
    out = model.outputs[0]
    if score == "probability":
        # probabilities as the model gives them, or of its logits when it ends without a softmax
        ends = _keras_output_activation(model)
        if ends in ("softmax", "sigmoid") or len(tuple(out.shape)) != 2:
            return out
        return keras.ops.sigmoid(out) if out.shape[-1] == 1 else keras.ops.softmax(out, axis=-1)
    last = model.layers[-1]
    if LOGITS_LAYER in [layer.name for layer in model.layers]:
        return _graph_tensor(model, model.get_layer(LOGITS_LAYER))
    if isinstance(last, keras.layers.Softmax):
        return _graph_tensor(model, last, "input")
    activation = getattr(getattr(last, "activation", None), "__name__", "linear")
    if activation in ("softmax", "sigmoid"):
        pre, _ = _pre_activation(last)
        if pre is None:
            raise ValueError(
                f"The model's last layer {last.name!r} applies a {activation} and its pre-activation "
                f"cannot be recovered; add a layer named {LOGITS_LAYER!r} holding pre-softmax scores, "
                "or pass score='probability'.")
        return pre(_graph_tensor(model, last, "input"))
    return out


def _keras_output_activation(model):
    """``"softmax"`` or ``"sigmoid"`` when the model's last layer applies it (a Softmax layer,
    or ``activation=...`` on the last layer), else None (the model outputs unnormalised scores)."""
    last = model.layers[-1] if model.layers else None
    if _layer_type(last) == "Softmax":
        return "softmax"
    name = getattr(getattr(last, "activation", None), "__name__", None)
    return name if name in ("softmax", "sigmoid") else None


def _two_classes(scores, score, ops_kind):
    """A model with one output unit (binary, sigmoid) as two classes: logit z becomes
    scores ``[-z/2, z/2]`` (softmax of which is ``[1 - sigmoid(z), sigmoid(z)]``), a
    probability p becomes ``[1 - p, p]``. Class 1 is the positive class."""
    if ops_kind == "tensorflow":
        tf = _tf()
        return tf.concat([-scores / 2, scores / 2] if score == "logits" else [1.0 - scores, scores], axis=1)
    import torch

    return torch.cat([-scores / 2, scores / 2] if score == "logits" else [1.0 - scores, scores], dim=1)


def _keras_scores_model(model, score, layer=None):
    """A cached Keras model: image -> class scores (N, K), or with ``layer``
    image -> (the layer's feature maps, class scores)."""
    keras = _keras()

    def build():
        out = _score_output(model, score)
        if len(tuple(out.shape)) != 2:
            raise ValueError(f"The model's output has shape {tuple(out.shape)}; attribution needs class "
                             "scores (N, classes).")
        outputs = out if layer is None else [get_layer(model, layer).output, out]
        try:
            return keras.Model(_single_input(model), outputs)
        except ValueError as err:  # a layer of a nested model that this graph cannot reach
            raise ValueError(
                f"Cannot compute layer {layer!r} and the class scores of {model.name!r} in one graph "
                f"({err}). Nested models are supported as the first layer of a Sequential model "
                "(Sequential([base, pooling, head])); for other shapes build one functional model "
                "from the base's input, e.g. keras.Model(base.inputs, head(base.outputs[0]))."
            ) from None
    return _cached(model, ("scores_model", score, layer), build)


def _keras_fn(model, score, kind, layer=None):
    """Compiled TensorFlow functions, cached per model:
    ``"grad"``: (x, cls) -> (target score, class, dS_c/dx);
    ``"cam"``: (x, cls) -> (target, class, A, dS_c/dA);
    ``"forward"``: x -> scores; ``"features"``: x -> (A, scores)."""
    def build():
        tf = _tf()
        sub = _keras_scores_model(model, score, layer)
        spec = tf.TensorSpec([None] + list(model.inputs[0].shape[1:]), tf.float32)
        cls_spec = tf.TensorSpec([None], tf.int32)

        def scores_of(out):
            return _two_classes(out, score, "tensorflow") if out.shape[-1] == 1 else out

        def pick(scores, cls):
            cls = tf.where(cls < 0, tf.argmax(scores, axis=-1, output_type=tf.int32), cls)
            return cls, tf.gather(scores, cls, axis=1, batch_dims=1)

        if kind == "grad":
            @tf.function(input_signature=[spec, cls_spec], autograph=False)
            def fn(x, cls):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    cls, target = pick(scores_of(sub(x, training=False)), cls)
                return target, cls, tape.gradient(target, x)
        elif kind == "cam":
            @tf.function(input_signature=[spec, cls_spec], autograph=False)
            def fn(x, cls):
                with tf.GradientTape() as tape:
                    feats, out = sub(x, training=False)
                    tape.watch(feats)
                    cls, target = pick(scores_of(out), cls)
                return target, cls, feats, tape.gradient(target, feats)
        elif kind == "forward":
            @tf.function(input_signature=[spec], autograph=False)
            def fn(x):
                return scores_of(sub(x, training=False))
        else:
            @tf.function(input_signature=[spec], autograph=False)
            def fn(x):
                feats, out = sub(x, training=False)
                return feats, scores_of(out)
        return fn
    return _cached(model, ("attribution", kind, score, layer), build)


class _KerasEngine:
    """What the attribution methods need from a Keras model (NumPy in, NumPy out)."""

    def __init__(self, model, score):
        _check_keras_model(model)
        _check_score(score)
        model = _flat_model(model)
        self.model, self.score = model, score
        out = _keras_scores_model(model, score).outputs[0]
        self.num_classes = max(2, int(out.shape[-1]))

    def images(self, images):
        return as_image_batch(images, self.model)

    def bytes_per_image(self, x):
        keras = _keras()
        n = 0
        for layer in _all_layers(self.model):
            if isinstance(layer, keras.Model):
                continue
            try:
                shapes = layer.output.shape
            except (AttributeError, ValueError):
                continue
            dims = [d for d in tuple(shapes)[1:]]
            size = int(np.prod([d for d in dims if d is not None] or [1]))
            if any(d is None for d in dims):
                size *= int(np.prod(x.shape[1:3]))
            n += size
        return 4 * max(n, int(np.prod(x.shape[1:])))

    def grad(self, x, cls):
        tf = _tf()
        t, c, g = _keras_fn(self.model, self.score, "grad")(tf.constant(x), tf.constant(cls))
        return t.numpy(), c.numpy(), g.numpy()

    def layer_grad(self, x, cls, layer):
        tf = _tf()
        t, c, a, g = _keras_fn(self.model, self.score, "cam", layer)(tf.constant(x), tf.constant(cls))
        return t.numpy(), c.numpy(), a.numpy(), g.numpy()

    def forward(self, x):
        return _keras_fn(self.model, self.score, "forward")(_tf().constant(x)).numpy()

    def features(self, x, layer):
        a, s = _keras_fn(self.model, self.score, "features", layer)(_tf().constant(x))
        return a.numpy(), s.numpy()

    def resolve_layer(self, layer, x):
        return _resolve_layer(self.model, layer).name

    def channels(self, layer, x):
        return int(get_layer(self.model, layer).output.shape[-1])


# -- PyTorch engine ---------------------------------------------------------------

def _is_torch_module(model):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def _vgg_alias_names(model):
    """VGG's conventional names (``conv5_3``, ``relu5_3``, ``pool5``, ...) -> names in
    ``model.named_modules()`` (``features.28`` ...), for a model with VGG's ``features``."""
    features = getattr(model, "features", None)
    if features is None or not hasattr(features, "__len__"):
        return {}
    return {name: f"features.{i}" for i, name in enumerate(vgg_layer_names(model))}


class _TorchEngine:
    """What the attribution methods need from a PyTorch module mapping (N, C, H, W) to
    class scores (N, K). Images come in as NumPy (N, H, W, C)."""

    def __init__(self, model, score):
        torch, _ = _torch()
        _check_score(score)
        self.torch, self.model, self.score = torch, model, score
        params = list(model.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        self.dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
        self.num_classes = None

    def images(self, images):
        conv = next((m for m in self.model.modules() if isinstance(m, self.torch.nn.Conv2d)), None)
        if conv is not None and conv.in_channels == 1 and np.ndim(images) in (2, 3) and np.shape(images)[-1] != 1:
            images = np.asarray(images)[..., np.newaxis]   # grey (H, W) or (N, H, W) for a 1-channel model
        x = as_image_batch(images, None, input_range=model_input_range(self.model))
        if conv is not None and x.ndim == 4 and x.shape[-1] != conv.in_channels:
            raise ValueError(f"images have {x.shape[-1]} channels (last axis of (N, H, W, C)), but the "
                             f"model's first convolution takes {conv.in_channels}; pass images channels-last.")
        if len(x):
            def count():
                with self.torch.no_grad():
                    return max(2, int(self._call(self._tensor(x[:1])).shape[1]))
            self.num_classes = _cached(self.model, ("classes", self.score, x.shape[1:]), count)
        return x

    def _tensor(self, x):
        return self.torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.device, self.dtype)

    def _final_softmax(self):
        """The model's last registered module when it is an ``nn.Softmax``, else None."""
        last = list(self.model.modules())[-1]
        return last if isinstance(last, self.torch.nn.Softmax) else None

    def _call(self, t, raw=False):
        """The class scores (N, K) the engine explains (``raw``: the model's output as it is)."""
        training = self.model.training
        final = None if raw else self._final_softmax()
        kept = {}
        handle = final.register_forward_hook(lambda m, i, o: kept.update(inp=i[0], out=o)) if final else None
        self.model.eval()  # as Keras' training=False: no dropout, BatchNorm's running statistics
        try:
            out = self.model(t)
        except RuntimeError as err:  # e.g. "mat1 and mat2 shapes cannot be multiplied"
            raise ValueError(
                f"The model cannot run on images of {t.shape[2]} x {t.shape[3]} pixels with {t.shape[1]} "
                f"channel(s) ({str(err).splitlines()[0]}). Pass images of the size and channels it was built "
                "for, channels last (N, H, W, C).") from None
        finally:
            self.model.train(training)
            if handle is not None:
                handle.remove()
        if not isinstance(out, self.torch.Tensor):
            raise TypeError(
                f"The model returned a {type(out).__name__}; attribution needs one tensor of class "
                "scores (N, classes). Wrap the model so that forward returns the output to explain, "
                "e.g. torch.nn.Sequential(model, SelectOutput(0)) or a lambda module.")
        if out.ndim != 2:
            raise ValueError(f"The model's output has shape {tuple(out.shape)}; attribution needs class "
                             "scores (N, classes).")
        if raw:
            return out
        if kept.get("out") is out:  # the model ends in nn.Softmax: its input holds the logits
            return kept["inp"] if self.score == "logits" else out
        return self._scores(out)

    def _scores(self, out):
        if self.score == "probability":
            out = self.torch.sigmoid(out) if out.shape[1] == 1 else self.torch.softmax(out, dim=1)
        return _two_classes(out, self.score, "torch") if out.shape[1] == 1 else out

    def _pick(self, scores, cls):
        c = self.torch.as_tensor(cls, device=scores.device, dtype=self.torch.long)
        c = self.torch.where(c < 0, scores.argmax(dim=1), c)
        return c, scores.gather(1, c[:, None])[:, 0]

    def bytes_per_image(self, x):
        key = ("bytes", tuple(x.shape[1:]))
        return _cached(self.model, key, lambda: self._probe_bytes(x))

    def _probe_bytes(self, x):
        total = [0]

        def hook(module, inputs, output):
            if isinstance(output, self.torch.Tensor):
                total[0] += output[0].numel()
        handles = [m.register_forward_hook(hook) for m in self.model.modules()
                   if not list(m.children())]
        try:
            with self.torch.no_grad():
                self._call(self._tensor(x[:1]))
        finally:
            for h in handles:
                h.remove()
        return 4 * max(total[0], int(np.prod(x.shape[1:])))

    def grad(self, x, cls):
        t = self._tensor(x).requires_grad_(True)
        c, target = self._pick(self._call(t), cls)
        (g,) = self.torch.autograd.grad(target.sum(), t)
        return (target.detach().cpu().numpy(), c.cpu().numpy().astype(np.int32),
                g.permute(0, 2, 3, 1).cpu().numpy())

    def _hooked(self, layer, t):
        module = dict(self.model.named_modules())[layer]
        kept = {}

        def hook(mod, inputs, output):
            if not isinstance(output, self.torch.Tensor):
                raise ValueError(f"Layer {layer!r} returns a {type(output).__name__}, not a feature map tensor.")
            kept["a"] = output
            return output.clone()  # later in-place layers (ReLU(inplace=True)) must not change it
        handle = module.register_forward_hook(hook)
        try:
            out = self._call(t)
        finally:
            handle.remove()
        if "a" not in kept:
            raise ValueError(f"Layer {layer!r} did not run in the model's forward pass.")
        return kept["a"], out

    def layer_grad(self, x, cls, layer):
        with self.torch.enable_grad():
            a, out = self._hooked(layer, self._tensor(x))
            if not a.requires_grad:
                raise ValueError(f"Layer {layer!r}'s output does not depend on trainable computation; "
                                 "choose a layer after the first convolution.")
            c, target = self._pick(out, cls)
            (g,) = self.torch.autograd.grad(target.sum(), a)
        self._check_map(a, layer)
        return (target.detach().cpu().numpy(), c.cpu().numpy().astype(np.int32),
                a.detach().permute(0, 2, 3, 1).cpu().numpy(), g.permute(0, 2, 3, 1).cpu().numpy())

    def _check_map(self, a, layer):
        if a.ndim != 4:
            raise ValueError(f"Layer {layer!r} has output shape {tuple(a.shape)}, not a spatial feature map "
                             "(N, channels, h, w); CAM methods need a convolutional (or pooling) layer.")

    def forward(self, x):
        with self.torch.no_grad():
            return self._call(self._tensor(x)).cpu().numpy()

    def channels(self, layer, x):
        return _cached(self.model, ("channels", layer, tuple(x.shape[1:])),
                       lambda: self.features(x[:1], layer)[0].shape[-1])

    def features(self, x, layer):
        with self.torch.no_grad():
            a, out = self._hooked(layer, self._tensor(x))
        self._check_map(a, layer)
        return a.permute(0, 2, 3, 1).cpu().numpy(), out.cpu().numpy()

    def resolve_layer(self, layer, x):
        """A name from ``model.named_modules()`` (VGG's ``conv5_3`` etc. translated);
        ``None``: the last convolution's output after its ReLU."""
        if layer is None:
            return _cached(self.model, ("default_layer", tuple(x.shape[1:])), lambda: self._last_conv(x))
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a layer name (a string), got {type(layer).__name__}.")
        named = dict(self.model.named_modules())
        aliases = _vgg_alias_names(self.model)
        if layer not in named and layer in aliases:
            return aliases[layer]
        if layer not in named or layer == "":
            convs = [n for n, m in named.items() if isinstance(m, self.torch.nn.Conv2d)]
            extra = f" VGG names such as {', '.join(list(aliases)[-5:])} work too." if aliases else ""
            raise ValueError(f"Unknown layer {layer!r}. The model's convolutional layers are: "
                             f"{', '.join(convs) or 'none'} (any name from model.named_modules() works)."
                             + extra)
        return layer

    def _last_conv(self, x):
        """The last Conv2d to run, or the activation (ReLU ...) applied right after it
        (through a BatchNorm) when there is one: its name in named_modules()."""
        torch = self.torch
        calls = []
        names = {id(m): n for n, m in self.model.named_modules()}

        def hook(module, inputs, output):
            calls.append((module, inputs[0] if inputs else None, output))
        handles = [m.register_forward_hook(hook) for m in self.model.modules() if not list(m.children())]
        try:
            with torch.no_grad():
                self._call(self._tensor(x[:1]))
        finally:
            for h in handles:
                h.remove()
        last = max((i for i, (m, _, _) in enumerate(calls) if isinstance(m, torch.nn.Conv2d)), default=None)
        if last is None:
            raise ValueError(f"The model {type(self.model).__name__} has no Conv2d layer; pass layer= the "
                             "name of a layer with a spatial feature map (from model.named_modules()).")
        chosen, prev_out = last, calls[last][2]
        for i in range(last + 1, len(calls)):
            m, inp, out = calls[i]
            if inp is not prev_out and not (inp is not None and inp.data_ptr() == prev_out.data_ptr()
                                            and inp.shape == prev_out.shape):
                break
            if isinstance(m, (torch.nn.BatchNorm2d,)):
                prev_out = out
                continue
            if isinstance(m, (torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.ReLU6, torch.nn.ELU,
                              torch.nn.GELU, torch.nn.SiLU)):
                chosen = i
            break
        return names[id(calls[chosen][0])]


def _engine(model, score):
    if _is_torch_module(model):
        return _TorchEngine(model, score)
    return _KerasEngine(model, score)


class _Explained:
    """Validated arguments of one attribution call: engine, images x, classes cls."""

    def __init__(self, model, images, class_index, score):
        self.engine = _engine(model, score)
        self.x = self.engine.images(images)
        if len(self.x) == 0:
            raise ValueError("images is empty: pass at least one image (N >= 1).")
        self.cls = _class_indices(class_index, len(self.x), self.engine.num_classes)
        self.per_image = self.engine.bytes_per_image(self.x)

    def chunks(self, copies=1, factor=3):
        """Slices of the batch whose ``copies`` inputs per image fit the memory budget
        (``factor``: activations kept for the backward pass, and their gradients)."""
        return _chunks(len(self.x), copies * factor * self.per_image)

    def fix_classes(self):
        """Resolve 'predicted class' (-1) on the clean images, chunk by chunk."""
        if np.any(self.cls < 0):
            for part in self.chunks(factor=1):
                scores = self.engine.forward(self.x[part])
                self.cls[part] = np.where(self.cls[part] < 0, scores.argmax(axis=1), self.cls[part])
        return self.cls


def class_scores(model, images, class_index=None, score="logits"):
    """Target class scores and classes: returns ``(scores (N,), classes (N,))``.

    ``class_index=None`` picks each image's predicted class. Scores are
    pre-softmax by default (``score="probability"`` for softmax outputs).
    Keras model or PyTorch module.
    """
    e = _Explained(model, images, class_index, score)
    cls = e.fix_classes()
    out = np.empty(len(e.x), np.float32)
    for part in e.chunks(factor=1):
        s = e.engine.forward(e.x[part])
        out[part] = s[np.arange(len(s)), cls[part]]
    return out, cls.astype(np.int64)


def _input_gradients(e, x=None, cls=None, copies=1):
    """(targets, classes, dS_c/dx) for the batch, in memory-bounded calls."""
    x = e.x if x is None else x
    cls = e.cls if cls is None else cls
    targets = np.empty(len(x), np.float32)
    classes = np.empty(len(x), np.int32)
    grads = np.empty(x.shape, np.float32)
    for part in _chunks(len(x), 3 * e.per_image):
        targets[part], classes[part], grads[part] = e.engine.grad(x[part], cls[part])
    return targets, classes, grads


def saliency_map(model, images, class_index=None, *, layer=None, score="logits", normalize=True):
    """Vanilla gradient saliency (Simonyan et al., 2014).

    ``M_ij = max_c |dS_c / dx_ijc|`` for the pre-softmax score ``S_c`` of
    ``class_index`` (``None``: each image's predicted class; an int or one per image).
    Keras model or PyTorch module; ``images`` (N, H, W, C) or (H, W, C).
    Returns float32 (N, H, W), each map min-max scaled to [0, 1] (``normalize=False``:
    the raw maximum absolute gradient). Batched, in memory-bounded calls.
    """
    _no_layer(layer, "saliency_map")
    _check_flags(normalize=normalize)
    e = _Explained(model, images, class_index, score)
    out = np.empty(e.x.shape[:3], np.float32)
    for part in e.chunks():
        _, _, g = e.engine.grad(e.x[part], e.cls[part])
        out[part] = saliency_from_gradients(g)
    return normalize_maps(out) if normalize else out


def smoothgrad(model, images, class_index=None, *, layer=None, score="logits", normalize=True,
               samples=50, noise=0.2, seed=None):
    """SmoothGrad (Smilkov et al., 2017): saliency averaged over noisy copies.

    ``M(x) = max_channels (1/n) sum_i | d S_c(x + e_i) / d x |``, ``e_i ~ N(0, s^2)``
    with ``s = noise * (max(x) - min(x))`` for each image. The class is fixed on
    the clean image (``None``: its predicted class). ``noise=0`` gives exactly
    ``saliency_map``. The noisy copies go through the model in batched,
    memory-bounded calls. Returns float32 (N, H, W) in [0, 1] per image
    (``normalize=False``: raw).
    """
    _no_layer(layer, "smoothgrad")
    _check_flags(normalize=normalize)
    if not _is_int(samples) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}.")
    if not _is_number(noise) or noise < 0:
        raise ValueError(f"noise must be a non-negative number (a fraction of each image's range), got {noise!r}.")
    seed = _check_seed(seed, allow_none=True)
    e = _Explained(model, images, class_index, score)
    x, cls = e.x, e.fix_classes()
    rng = np.random.default_rng(seed)
    sigma = noise * (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)))
    out = np.empty(x.shape[:3], dtype=np.float32)
    for part in e.chunks(copies=samples):
        xb = x[part]
        nb = len(xb)
        noisy = np.repeat(xb[:, None], samples, axis=1)
        if noise > 0:
            noisy += rng.standard_normal(noisy.shape, dtype=np.float32) * sigma[part, None, None, None, None]
        noisy = noisy.reshape((nb * samples,) + x.shape[1:])
        _, _, g = _input_gradients(e, noisy, np.repeat(cls[part], samples).astype(np.int32))
        g = np.abs(g).reshape((nb, samples) + x.shape[1:])
        out[part] = g.mean(axis=1).max(axis=-1)
    return normalize_maps(out) if normalize else out


def integrated_gradients(model, images, class_index=None, *, layer=None, score="logits",
                         baseline=None, steps=50, return_gap=False):
    """Integrated Gradients (Sundararajan et al., 2017).

    ``IG_i(x) = (x_i - x'_i) * integral_0^1 d S_c(x' + a (x - x')) / d x_i da``,
    the integral taken with the trapezoidal rule on ``steps`` intervals
    (``steps + 1`` points along the straight path, in batched, memory-bounded calls).
    ``baseline`` is ``None`` (a black image), a number, one image or one per image.
    The class is fixed on the input (``None``: its predicted class).

    Returns the attributions, float32 with the input's shape (N, H, W, C),
    unnormalised and signed. With ``return_gap=True`` returns
    ``(attributions, gap)`` where ``gap = sum(attributions) - (S_c(x) - S_c(x'))``
    per image (N,): Completeness says it tends to 0 as ``steps`` grows.
    """
    _no_layer(layer, "integrated_gradients")
    _check_flags(return_gap=return_gap)
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    e = _Explained(model, images, class_index, score)
    x = e.x
    if baseline is None:
        base = np.zeros_like(x)
    else:
        if np.ndim(baseline) == 0:
            base = np.full_like(x, _baseline_value(baseline, model))
        else:
            b = _as_model_images(baseline, model, "baseline")      # uint8 mapped, range checked
            if len(b) not in (1, len(x)) or b.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"baseline must be one image or one per image ({len(x)}) of shape {x.shape[1:]}; "
                    f"got {b.shape}."
                )
            base = np.broadcast_to(b, x.shape).astype(np.float32)
    if not np.all(np.isfinite(base)):
        raise ValueError("baseline contains NaN or infinite values.")
    cls = e.fix_classes()
    alphas = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
    weights = np.full(steps + 1, 1.0 / steps, dtype=np.float32)
    weights[[0, -1]] *= 0.5  # trapezoidal rule
    k = steps + 1
    attributions = np.empty_like(x)
    target_x = np.empty(len(x), dtype=np.float32)
    target_base = np.empty(len(x), dtype=np.float32)
    for part in e.chunks(copies=k):
        xb, bb = x[part], base[part]
        nb = len(xb)
        path = bb[:, None] + alphas[None, :, None, None, None] * (xb - bb)[:, None]
        t, _, g = _input_gradients(e, path.reshape((nb * k,) + x.shape[1:]),
                                   np.repeat(cls[part], k).astype(np.int32))
        avg = np.tensordot(g.reshape((nb, k) + x.shape[1:]), weights, axes=([1], [0]))
        attributions[part] = ((xb - bb) * avg).astype(np.float32)
        t = t.reshape(nb, k)
        target_base[part], target_x[part] = t[:, 0], t[:, -1]
    if not return_gap:
        return attributions
    gap = attributions.reshape(len(x), -1).sum(axis=1) - (target_x - target_base)
    return attributions, gap.astype(np.float32)


def _cam(weights_fn, model, images, class_index, layer, score, normalize, return_weights):
    """Grad-CAM-style maps: ``ReLU(sum_k w_k A^k)`` with ``w = weights_fn(A, dS_c/dA)``,
    brought to the input grid with ``cam_upsampling_matrices``."""
    _check_flags(normalize=normalize, return_weights=return_weights)
    e = _Explained(model, images, class_index, score)
    name = e.engine.resolve_layer(layer, e.x)
    maps = np.empty(e.x.shape[:3], np.float32)
    weights = None
    mats = {}
    for part in e.chunks():
        _, _, a, g = e.engine.layer_grad(e.x[part], e.cls[part], name)
        w = weights_fn(a, g)
        if weights is None:
            weights = np.empty((len(e.x), a.shape[-1]), np.float32)
        weights[part] = w
        hw = a.shape[1:3]
        if hw not in mats:
            mats[hw] = cam_upsampling_matrices(e.engine.model, name, e.x.shape[1:3], map_hw=hw)
        maps[part] = _upsample(class_activation_map(a, w), *mats[hw])
    if normalize:
        maps = normalize_maps(maps)
    return (maps, weights) if return_weights else maps


def grad_cam(model, images, class_index=None, *, layer=None, score="logits", normalize=True,
             return_weights=False):
    """Grad-CAM (Selvaraju et al., 2017).

    With feature maps ``A^k`` of ``layer`` (``None``: the last convolutional layer's
    output, after its ReLU) and ``S_c`` the pre-softmax score of class ``c``:
    ``w_k = mean_ij d S_c / d A^k_ij`` (``grad_cam_weights``), ``L = ReLU(sum_k w_k A^k)``,
    brought to the input grid by ``cam_upsampling_matrices``. Keras model or PyTorch
    module. Returns float32 (N, H, W), each map min-max scaled to [0, 1] (a constant
    map gives zeros); with ``return_weights=True`` also the channel weights (N, k).
    """
    return _cam(grad_cam_weights, model, images, class_index, layer, score, normalize, return_weights)


def grad_cam_plus_plus(model, images, class_index=None, *, layer=None, score="logits",
                       normalize=True, return_weights=False, renormalize_alphas=False):
    """Grad-CAM++ (Chattopadhay et al., 2018) with the paper's alpha weights
    (``grad_cam_plus_plus_weights``): ``L = ReLU(sum_k w_k A^k)``, brought to the input
    grid as in ``grad_cam``. The paper explains ``Y_c = exp(S_c)``, for which the
    higher derivatives reduce to powers of ``g = d S_c / d A``. By default the alphas
    are used as the paper's equation gives them (as pytorch-grad-cam does); the
    authors' code and tf-keras-vis also divide each channel's alphas by their spatial
    sum (``renormalize_alphas=True``), which changes the relative channel weights.
    Returns float32 (N, H, W) in [0, 1] per image (``return_weights``: also (N, k)).
    """
    def weights_fn(a, g):
        return grad_cam_plus_plus_weights(a, g, renormalize_alphas=renormalize_alphas)
    return _cam(weights_fn, model, images, class_index, layer, score, normalize, return_weights)


def score_cam(model, images, class_index=None, *, layer=None, score="logits", normalize=True,
              return_weights=False, weighting="probability", max_masks=None):
    """Score-CAM (Wang et al., 2020).

    Each feature map ``A^k`` of ``layer`` (``None``: the last convolutional layer's
    output, after its ReLU) is brought to the input grid (``cam_upsampling_matrices``)
    and min-max scaled to a mask ``M^k`` (``score_cam_masks``); the channel weight
    comes from the class scores of the masked input ``x * M^k`` (``score_cam_weights``):
    by default ``w_k = softmax(S(x * M^k))_c`` (the authors' code; the baseline term
    ``f(x_b)`` is left out); ``weighting="channel_softmax"`` gives the paper's
    Algorithm 1, ``w = softmax_k(S_c(x * M^k))``, as pytorch-grad-cam. ``score`` chooses
    which scores ``S`` are read: pre-softmax (``"logits"``) or the model's
    probabilities (``"probability"``, used as they are). A constant channel gets
    weight 0. ``L = ReLU(sum_k w_k up(A^k))``, min-max scaled per image.
    ``max_masks`` (Faster Score-CAM, tf-keras-vis' ``max_N``): only the ``max_masks``
    channels whose feature maps vary most (spatial variance, per image) are masked and
    scored; the others get weight 0. ``None``: every channel.
    The masked inputs go through the model in memory-bounded batches, only for channels
    that have a mask, and once per photo when a batch repeats it (one photo explained
    for several classes).
    With ``return_weights=True`` also returns the channel weights (N, k).
    """
    _check_flags(normalize=normalize, return_weights=return_weights)
    e = _Explained(model, images, class_index, score)
    name = e.engine.resolve_layer(layer, e.x)
    x, cls = e.x, e.cls
    if max_masks is not None and (not _is_int(max_masks) or max_masks < 1):
        raise ValueError(f"max_masks must be a positive int (the number of channels to mask) or None "
                         f"(every channel); got {max_masks!r}.")
    maps = np.empty(x.shape[:3], np.float32)
    k = e.engine.channels(name, x)
    weights, mats = np.zeros((len(x), k), np.float32), {}
    first = _first_copies(x)
    unique = np.flatnonzero(first == np.arange(len(x)))
    for images_part in _chunks(len(unique), e.per_image * k):         # masked copies of n images
        u = unique[images_part]
        a, s = e.engine.features(x[u], name)                           # (n, h, w, k), scores
        copies = [np.flatnonzero(first == i) for i in u]               # the same photo, other classes
        for c, scores_c in zip(copies, s):
            cls[c] = np.where(cls[c] < 0, scores_c.argmax(), cls[c])
        hw = a.shape[1:3]
        if hw not in mats:
            mats[hw] = cam_upsampling_matrices(e.engine.model, name, x.shape[1:3], map_hw=hw)
        up = _upsample(a, *mats[hw])                                    # (n, H, W, k)
        masks, varies = score_cam_masks(up)
        if max_masks is not None and max_masks < k:                    # Faster Score-CAM
            spread = np.where(varies, a.reshape(len(a), -1, k).var(axis=1), -1.0)
            kept = np.zeros_like(varies)
            np.put_along_axis(kept, np.argsort(-spread, axis=1, kind="stable")[:, :max_masks], True, axis=1)
            varies = varies & kept
        # only channels with a mask: a constant one gets weight 0 whatever its scores
        pairs = np.argwhere(varies)                                     # (image, channel)
        scores = np.zeros((len(u), k, s.shape[1]), np.float32)
        for part in _chunks(len(pairs), e.per_image):
            i, ch = pairs[part, 0], pairs[part, 1]
            scores[i, ch] = e.engine.forward(x[u[i]] * masks[i, :, :, ch][..., None])
        for j, c in enumerate(copies):                                  # the masked scores serve every class
            w = score_cam_weights(np.repeat(scores[j:j + 1], len(c), axis=0), cls[c],
                                  np.repeat(varies[j:j + 1], len(c), axis=0), weighting,
                                  probabilities=score == "probability")
            weights[c] = w
            for row, w_row in zip(c, w):
                maps[row] = class_activation_map(up[j:j + 1], w_row[None])[0]
    if normalize:
        maps = normalize_maps(maps)
    return (maps, weights) if return_weights else maps


def occlusion(model, images, class_index=None, *, layer=None, score="logits", normalize=True,
              window=None, stride=None, baseline=0.0):
    """Occlusion sensitivity (Zeiler & Fergus, 2014).

    A ``window`` (int or (height, width); default an eighth of the image side) filled
    with ``baseline`` (a number, or an image (H, W, C) whose pixels replace the
    occluded ones) slides over the image every ``stride`` pixels (default half the
    window) while it fits, as captum's ``Occlusion``. The raw map at a pixel is the
    mean drop ``S_c(x) - S_c(x occluded)`` of the target score over all windows that
    cover the pixel (``occlusion_map``; 0 for pixels no window covers). A photo repeated
    in the batch (explained for several classes) is occluded once. Keras model or
    PyTorch module. Returns float32 (N, H, W): min-max scaled per image, or signed raw
    drops with ``normalize=False``.
    """
    _no_layer(layer, "occlusion")
    _check_flags(normalize=normalize)
    e = _Explained(model, images, class_index, score)
    x, cls = e.x, e.fix_classes()
    H, W = x.shape[1:3]
    if window is None:
        window = max(1, min(H, W) // 8)
    if stride is None:
        stride = max(1, (window if np.isscalar(window) else min(window)) // 2)
    rows, cols, win = occlusion_windows((H, W), window, stride)
    if np.ndim(baseline) == 0:
        fill = np.float32(_baseline_value(baseline, model))
    else:
        fill = np.asarray(baseline)
        if fill.ndim != 3 or fill.shape != x.shape[1:]:
            raise ValueError(f"baseline must be a finite number or one image of shape {x.shape[1:]}; "
                             f"got shape {fill.shape}.")
        fill = _as_model_images(fill, model, "baseline")[0]          # uint8 mapped, range checked
    fill = np.broadcast_to(fill, x.shape[1:])
    corners = [(r, c) for r in rows for c in cols]
    clean = np.empty(len(x), np.float32)
    for part in e.chunks(factor=1):
        clean[part] = e.engine.forward(x[part])[np.arange(part.stop - part.start), cls[part]]
    first = _first_copies(x)                         # a repeated photo is occluded once, for all its classes
    unique = np.flatnonzero(first == np.arange(len(x)))
    copies = [np.flatnonzero(first == i) for i in unique]
    pairs = [(u, j) for u in range(len(unique)) for j in range(len(corners))]  # (photo, window)
    drops = np.empty((len(x), len(corners)), np.float32)
    for part in _chunks(len(pairs), e.per_image):
        idx = np.asarray(pairs[part])
        batch = x[unique[idx[:, 0]]]
        for b, j in enumerate(idx[:, 1]):
            r, c = corners[j]
            batch[b, r:r + win[0], c:c + win[1]] = fill[r:r + win[0], c:c + win[1]]
        s = e.engine.forward(batch)
        for u in np.unique(idx[:, 0]):
            rows_u = idx[:, 0] == u
            c = copies[u]
            drops[c[:, None], idx[rows_u, 1][None]] = clean[c][:, None] - s[rows_u][:, cls[c]].T
    maps = occlusion_map(drops.reshape(len(x), len(rows), len(cols)), (H, W), rows, cols, win)
    return normalize_maps(maps) if normalize else maps


def randomize_weights(model, layer_names=None, seed=0):
    """A copy of ``model`` whose ``layer_names`` (``None``: all) are re-initialised.

    The other layers keep the trained weights. Used for the model-randomisation
    sanity check of Adebayo et al. (2018), including its cascading form
    (re-initialise from the top layer down, one more layer each time). Layers inside
    a nested model are named as everywhere (``"Conv1"`` or ``"base/Conv1"``); naming the
    nested model re-initialises all of its layers.
    """
    keras = _keras()
    _check_layers_model(model)
    seed = _check_seed(seed)
    if layer_names is None:
        chosen = list(model.layers)
    else:
        chosen = [get_layer(model, name) for name in _as_name_list(layer_names)]
    fresh = set()
    for layer in chosen:
        fresh.add(id(layer))
        if _is_model(layer):
            fresh.update(id(chain[-1]) for _, chain in _nested_layers(layer))
    keras.utils.set_random_seed(seed)
    clone = keras.models.clone_model(model)
    copies = dict(_nested_layers(clone))
    for name, chain in _nested_layers(model):
        layer = chain[-1]
        if not _is_model(layer) and id(layer) not in fresh and layer.weights:
            copies[name][-1].set_weights(layer.get_weights())
    return clone


def rank_correlation(maps_a, maps_b):
    """Spearman rank correlation of two batches of maps, one value per image (N,).

    A constant map (e.g. an empty Grad-CAM) has no ranking: two constant maps
    count as agreeing (1.0), a constant map against a varying one as 0.0.
    """
    from scipy.stats import spearmanr

    try:
        a = np.asarray(maps_a, dtype=np.float64)
        b = np.asarray(maps_b, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"maps_a and maps_b must be arrays of numbers (N, H, W), got {type(maps_a).__name__} "
                        f"and {type(maps_b).__name__}.") from None
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"maps_a and maps_b must be batches of the same shape; got {a.shape} and {b.shape}.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("maps_a and maps_b must not contain NaN or infinite values (a map has no ranking then).")
    out = []
    for u, v in zip(a.reshape(len(a), -1), b.reshape(len(b), -1)):
        if np.ptp(u) == 0 or np.ptp(v) == 0:
            out.append(1.0 if np.ptp(u) == np.ptp(v) == 0 else 0.0)
        else:
            out.append(spearmanr(u, v).statistic)
    return np.asarray(out, dtype=np.float64)


# ---------------------------------------------------------------------------
# Confidence and embeddings
# ---------------------------------------------------------------------------

# -- Confidence: softmax, entropy, likelihood --------------------------------

def _as_class_matrix(values, name):
    """``values`` as float64 (N, num_classes), at least 2 classes, finite."""
    z = _converted(values, name, "an array of numbers (N, num_classes)")
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"{name} must be a 2-D array (N, num_classes) with at least 2 classes; "
                         f"got shape {z.shape}.")
    if not np.all(np.isfinite(z)):
        raise ValueError(f"{name} contain NaN or infinite values.")
    return z


def _as_logits(logits, name="logits"):
    return _as_class_matrix(logits, name)


def _as_labels(labels, n, num_classes, name="labels"):
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape == (n, num_classes):
        raise ValueError(f"{name} must be class indices of shape ({n},); got one-hot rows {y.shape}: "
                         "use labels.argmax(axis=1).")
    if y.ndim == 1 and len(y) != n:
        raise ValueError(f"There must be the same number of images and labels (one label per row): "
                         f"{n} rows, but {name} has {len(y)} (shape {y.shape}).")
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), one per row; got shape {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name} must be integer class indices, got dtype {y.dtype}.")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} must lie in 0..{num_classes - 1}; got {y.min()}..{y.max()}.")
    return y.astype(np.int64)


def _as_probs(probs):
    p = _as_class_matrix(probs, "probs")
    if p.size and p.min() < 0:
        raise ValueError(f"probs must be non-negative (softmax outputs); got values down to {p.min():.4g}. "
                         "Did you pass logits? Use cnn_utils.softmax(logits) first.")
    sums = p.sum(axis=1)
    if len(p) and not np.allclose(sums, 1.0, atol=1e-3):
        raise ValueError("Each row of probs must sum to 1 (softmax outputs); "
                         f"row sums range from {sums.min():.4g} to {sums.max():.4g}. "
                         "Did you pass logits? Use cnn_utils.softmax(logits) first.")
    return p


def _check_temperature(temperature):
    if not _is_number(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}.")


def softmax(logits, temperature=1.0):
    """Class probabilities ``softmax(logits / T)`` row by row (numerically stable).

    ``logits`` is (N, K) (a single row (K,) is accepted); T > 1 softens, T < 1 sharpens.
    The arg-max is the same for every T, so accuracy does not depend on T.
    """
    _check_temperature(temperature)
    z = _converted(logits, "logits", "an array of numbers (N, num_classes)")
    single = z.ndim == 1
    z = _as_logits(z[np.newaxis] if single else z)
    z = z / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    return p[0] if single else p


def entropy(probs, base=None):
    """Predictive entropy ``-sum_k p_k log p_k`` of each row of ``probs`` (N, K).

    In nats by default (``base=2`` for bits; any base > 1). 0 for a one-hot row,
    ``log K`` for a uniform one. Terms with p = 0 count as 0.
    """
    if base is not None and (not _is_number(base) or base <= 1):
        raise ValueError(f"base must be None (nats) or a number > 1, e.g. 2 for bits; got {base!r}.")
    p = _as_probs(probs)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    h = -terms.sum(axis=1)
    if base is not None:
        h = h / np.log(base)
    return np.maximum(h, 0.0)


def _refuse_probabilities(z, function):
    """Logits (N, K) that are really probabilities (rows in [0, 1] summing to 1) are refused."""
    if len(z) and z.min() >= 0 and z.max() <= 1 and np.allclose(z.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError(f"logits look like probabilities (each row is in [0, 1] and sums to 1). {function} "
                         "takes the pre-softmax scores: pass cnn_utils.predict_logits(model, x), or np.log(probs).")


def negative_log_likelihood(logits, labels, temperature=1.0):
    """Mean negative log-likelihood (cross-entropy, nats) of ``labels`` under softmax(logits/T)."""
    _check_temperature(temperature)
    z = _as_logits(logits)
    _refuse_probabilities(z, "negative_log_likelihood")
    if len(z) == 0:
        raise ValueError("negative_log_likelihood needs at least one example (logits has 0 rows).")
    z = z / temperature
    y = _as_labels(labels, len(z), z.shape[1])
    zmax = z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
    return float(np.mean(log_norm - z[np.arange(len(z)), y]))


def fit_temperature(logits, labels, bounds=(0.05, 20.0)):
    """Temperature scaling (Guo et al., 2017): the T > 0 minimising the mean NLL.

    Fit it on held-out validation logits, never on the test set you report on.
    The NLL is convex in 1/T, so a bounded 1-D search over log T finds the
    global minimum. Returns T as a float (T > 1: the model was over-confident).
    Refuses probabilities passed as logits, and raises when the minimum lies at
    a bound of the search (the NLL still falls beyond it: widen ``bounds``).
    """
    from scipy.optimize import minimize_scalar

    z = _as_logits(logits)
    y = _as_labels(labels, len(z), z.shape[1])
    if len(z) == 0:
        raise ValueError("fit_temperature needs at least one validation example.")
    _refuse_probabilities(z, "Temperature scaling")
    if np.allclose(z, z[:, :1]):
        raise ValueError("Every row of logits is constant, so every temperature gives the same likelihood "
                         "and there is nothing to fit; check that these are the model's logits.")
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise TypeError(f"bounds must be a pair (low, high) of numbers, got {bounds!r}.") from None
    if not 0 < lo < hi < np.inf:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}.")
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(z, y, float(np.exp(log_t))),
        bounds=(np.log(lo), np.log(hi)), method="bounded", options={"xatol": 1e-6},
    )
    t = float(np.exp(result.x))
    for bound in (lo, hi):
        if abs(np.log(t) - np.log(bound)) < 2e-2:   # the bounded search stops near, not at, a bound
            # the minimiser of a convex function sits at the bound: check the NLL still falls there
            inside = bound * (1.01 if bound == lo else 1 / 1.01)
            if negative_log_likelihood(z, y, bound) < negative_log_likelihood(z, y, inside):
                raise ValueError(
                    f"The best temperature lies at the search bound T = {bound:g} (the NLL still "
                    f"falls beyond it), so it is not the minimum. Widen bounds (now {bounds}); a "
                    "temperature this extreme usually means the logits do not belong to the labels."
                )
    return t


# -- Calibration -------------------------------------------------------------

def calibration_bins(probs, labels, n_bins=15):
    """Per-bin data of a reliability diagram (Guo et al., 2017).

    Each prediction's confidence (its largest probability) falls in one of
    ``n_bins`` equal-width bins ``((m-1)/M, m/M]``. Returns a dict of arrays of
    length ``n_bins``: ``edges`` (n_bins + 1), ``counts``, ``accuracy`` and
    ``confidence`` (mean, NaN for an empty bin), ``gap`` = |accuracy - confidence|
    (0 for an empty bin), ``weight`` = counts / N; and ``n`` the number of predictions.
    """
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    p = _as_probs(probs)
    y = _as_labels(labels, len(p), p.shape[1])
    if len(p) == 0:
        raise ValueError("calibration needs at least one prediction.")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin m holds (edges[m], edges[m+1]]: searchsorted(side="left") on the inner edges
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / counts
        confidence = np.bincount(idx, weights=conf, minlength=n_bins) / counts
    gap = np.where(counts > 0, np.abs(accuracy - confidence), 0.0)
    return {"edges": edges, "counts": counts, "accuracy": accuracy, "confidence": confidence,
            "gap": gap, "weight": counts / len(p), "n": len(p)}


def expected_calibration_error(probs, labels, n_bins=15, return_bins=False):
    """Expected calibration error: ``sum_m |B_m|/N * |acc(B_m) - conf(B_m)|``.

    Equal-width confidence bins as in Guo et al. (2017). A fraction in [0, 1]
    (multiply by 100 for percent). With ``return_bins=True`` also returns the
    per-bin dict of :func:`calibration_bins` (for :func:`plot_reliability_diagram`).
    """
    bins = calibration_bins(probs, labels, n_bins)
    ece = float(np.sum(bins["weight"] * bins["gap"]))
    return (ece, bins) if return_bins else ece


def confidence_groups(probs, labels, high=0.99, low=0.9):
    """Split predictions by confidence (largest probability) and correctness.

    Returns a dict of index arrays: ``"confident correct"`` (confidence >= high,
    right), ``"confident wrong"`` (confidence >= high, wrong; most confident first)
    and ``"unsure correct"`` (confidence < low, right; least confident first).
    """
    if not (_is_number(low) and _is_number(high)) or not 0 < low <= high <= 1:
        raise ValueError(f"Thresholds must satisfy 0 < low <= high <= 1, got low={low}, high={high}.")
    p = _as_probs(probs)
    y = _as_labels(labels, len(p), p.shape[1])
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    order_desc = np.argsort(-conf, kind="stable")
    order_asc = np.argsort(conf, kind="stable")
    return {
        "confident correct": order_desc[(conf >= high)[order_desc] & correct[order_desc]],
        "confident wrong": order_desc[(conf >= high)[order_desc] & ~correct[order_desc]],
        "unsure correct": order_asc[(conf < low)[order_asc] & correct[order_asc]],
    }


def format_probability(p, decimals=1):
    """A probability as a percentage with enough decimals not to round to 0 % or 100 %.

    ``decimals`` is the least number of decimals; more are added while the rounded
    value would read 100 (or 0) for ``0 < p < 1``: 0.9997 -> ``"99.97 %"``,
    0.488 -> ``"48.8 %"``, 1.0 -> ``"100.0 %"``.
    """
    if isinstance(p, (bool, np.bool_)) or not np.isscalar(p) or not np.isreal(p):
        raise TypeError(f"p must be one probability (a real number), got {p!r}.")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}.")
    if not _is_int(decimals) or decimals < 0:
        raise ValueError(f"decimals must be a non-negative integer, got {decimals!r}.")
    for d in range(int(decimals), 17):
        text = f"{100 * p:.{d}f}"
        if (p in (0.0, 1.0)) or 0.0 < float(text) < 100.0:
            return f"{text} %"
    return f"{100 * p:.17g} %"


# -- Embeddings --------------------------------------------------------------

#: The layer whose activations serve as the learned feature space (penultimate layer).
FEATURE_LAYER = "dense1"


def extract_features(model, images, layer=FEATURE_LAYER, batch_size=512, input_range="model"):
    """Activations of ``layer`` (default the penultimate ``dense1``) for a batch, flattened.

    Returns a float32 array (N, D) (D = 128 for ``dense1`` of the course CNN).
    Dropout is inactive at inference, so this is what the logits layer sees.
    """
    feats = get_activations(model, images, [layer], batch_size=batch_size, input_range=input_range)[layer]
    return feats.reshape(len(feats), -1)


def _as_points(x, name):
    a = _converted(x, name, "an array of numbers (N, D)")
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D), one row per point; got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contain NaN or infinite values.")
    return a


TSNE_METHODS = ("opentsne", "sklearn")


def _check_pca_components(pca_components, x):
    if pca_components is not None and (not _is_int(pca_components) or not 2 <= pca_components <= min(x.shape)):
        raise ValueError(f"pca_components must be None or an integer from 2 to min(N, D) = {min(x.shape)}, "
                         f"got {pca_components!r}.")


def _pca_reduce(x, pca_components, seed):
    if not pca_components:
        return x
    from sklearn.decomposition import PCA

    return PCA(n_components=pca_components, random_state=seed).fit_transform(x)


def tsne_embedding(features, perplexity=30.0, method="opentsne", n_iter=750, seed=DEFAULT_SEED,
                   n_jobs=2, pca_components=None):
    """2-D t-SNE of ``features`` (N, D); returns a float64 array (N, 2).

    ``method="opentsne"`` (Policar et al.; FFT-accelerated gradients from 10,000
    points on, Barnes-Hut below; the faster one here, see benchmarks/bench_tsne.py)
    or ``"sklearn"`` (Barnes-Hut). Both start
    from the PCA initialisation, with ``n_iter`` iterations in all (the first 250
    with early exaggeration; 750 is openTSNE's default schedule, 250 + 500). ``pca_components`` first reduces D with PCA (the
    usual step for raw pixels, e.g. 50).
    """
    x = _as_points(features, "features")
    if method not in TSNE_METHODS:
        raise ValueError(f"Unknown t-SNE method {method!r}; choose one of {', '.join(TSNE_METHODS)}.")
    if not _is_number(perplexity) or not _is_int(n_iter):
        raise TypeError(f"perplexity must be a number and n_iter an integer; got {perplexity!r}, {n_iter!r}.")
    if not 1 <= perplexity < len(x):
        raise ValueError(f"perplexity must be at least 1 and below the number of points ({len(x)}), "
                         f"got {perplexity}.")
    if n_iter <= 250:
        raise ValueError(f"n_iter counts the 250 early-exaggeration iterations too; it must exceed 250, "
                         f"got {n_iter}.")
    seed = _check_seed(seed)
    if not _is_int(n_jobs) or n_jobs == 0 or n_jobs < -1:
        raise ValueError(f"n_jobs must be a positive number of threads, or -1 for all cores; got {n_jobs!r}.")
    _check_pca_components(pca_components, x)
    n_distinct = len(np.unique(x, axis=0))
    if n_distinct < 3 * perplexity + 1:
        raise ValueError(
            f"features have only {n_distinct} distinct rows (of {len(x)}); t-SNE with perplexity "
            f"{perplexity} needs at least 3 * perplexity + 1 = {int(3 * perplexity + 1)} distinct "
            "points (duplicates have zero distance and break the perplexity calibration). Remove "
            "duplicates (np.unique(features, axis=0)) or lower perplexity."
        )
    x = _pca_reduce(x, pca_components, seed)
    if method == "opentsne":
        from openTSNE import TSNE

        emb = TSNE(n_components=2, perplexity=perplexity, early_exaggeration_iter=250,
                   n_iter=n_iter - 250, initialization="pca", negative_gradient_method="auto",
                   n_jobs=n_jobs, random_state=seed, verbose=False).fit(x)
        emb = np.asarray(emb, dtype=np.float64)
    else:
        from sklearn.manifold import TSNE

        emb = TSNE(n_components=2, perplexity=perplexity, max_iter=n_iter, init="pca",
                   learning_rate="auto", n_jobs=n_jobs, random_state=seed).fit_transform(x).astype(np.float64)
    if not np.all(np.isfinite(emb)):
        raise FloatingPointError(f"t-SNE ({method}) produced NaN coordinates; check features for "
                                 "near-duplicate rows or a constant column, or lower perplexity.")
    return emb


def _umap_class():
    """umap-learn's ``UMAP``, imported without its ``parametric_umap`` module.

    ``import umap`` also imports ``umap.parametric_umap``, which imports TensorFlow and
    then torchvision: the crash ``FrameworkOrderError`` guards against. The course uses
    plain UMAP only, so that module is kept out while the package loads (``umap.ParametricUMAP``
    is then umap-learn's own placeholder, which raises ImportError when used).
    """
    import warnings

    if "umap" not in sys.modules:
        blocked = "umap.parametric_umap" not in sys.modules
        if blocked:
            sys.modules["umap.parametric_umap"] = None        # makes `from .parametric_umap import` fail
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ImportWarning)
                import umap  # noqa: F401
        finally:
            if blocked and sys.modules.get("umap.parametric_umap", 0) is None:
                del sys.modules["umap.parametric_umap"]
    from umap.umap_ import UMAP

    return UMAP


def umap_embedding(features, n_neighbors=15, min_dist=0.1, seed=DEFAULT_SEED, pca_components=None):
    """2-D UMAP of ``features`` (N, D) (McInnes et al. 2018, ``umap-learn``); returns float64 (N, 2).

    Like t-SNE it keeps each point's nearest neighbours (``n_neighbors`` of them
    build the neighbour graph); ``min_dist`` sets how tightly points may pack on the
    map. Spectral initialisation, Euclidean distance, a fixed ``seed`` (which makes
    umap-learn run on one thread). The first call in a Python process compiles
    umap-learn's numba code, which takes seconds. ``pca_components`` first reduces D
    with PCA, as in ``tsne_embedding``.
    """
    x = _as_points(features, "features")
    if not _is_int(n_neighbors) or not 2 <= n_neighbors < len(x):
        raise ValueError(f"n_neighbors must be an integer from 2 to N - 1 = {len(x) - 1}, got {n_neighbors!r}.")
    if not _is_number(min_dist) or not 0 <= min_dist <= 1:
        raise ValueError(f"min_dist must be a number from 0 to 1, got {min_dist!r}.")
    seed = _check_seed(seed)
    _check_pca_components(pca_components, x)
    x = _pca_reduce(x, pca_components, seed)
    import warnings

    with warnings.catch_warnings():   # "n_jobs overridden to 1 by setting random_state": that is the point
        warnings.filterwarnings("ignore", message=".*n_jobs value.*overridden.*", category=UserWarning)
        emb = _umap_class()(n_components=2, n_neighbors=int(n_neighbors), min_dist=float(min_dist), init="spectral",
                   random_state=seed).fit_transform(x)
    emb = np.asarray(emb, dtype=np.float64)
    if not np.all(np.isfinite(emb)):
        raise FloatingPointError("UMAP produced NaN coordinates; check features for duplicate rows or a "
                                 "constant column.")
    return emb


def trustworthiness(features, embedding, n_neighbors=10, chunk_size=500):
    """Trustworthiness of an embedding (Venna & Kaski), as ``sklearn.manifold.trustworthiness``.

    1 when every point's ``n_neighbors`` nearest neighbours on the map are also
    near it in the original space; unexpected map neighbours are penalised by
    their rank in the original space. Same definition and value as scikit-learn's
    (tested), but computed in chunks of rows: scikit-learn's builds three N x N
    arrays (about 2.4 GB for 10,000 points); this needs ``chunk_size`` x N.
    """
    from sklearn.neighbors import NearestNeighbors

    x = _as_points(features, "features")
    e = _as_points(embedding, "embedding")
    for name, value in (("n_neighbors", n_neighbors), ("chunk_size", chunk_size)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    n, k = len(x), int(n_neighbors)
    if len(e) != n:
        raise ValueError(f"features have {n} rows but the embedding has {len(e)}; they must match.")
    if not 1 <= k < n / 2:
        raise ValueError(f"n_neighbors must be at least 1 and below n / 2 = {n / 2}, got {n_neighbors}.")
    map_nb = NearestNeighbors(n_neighbors=k).fit(e).kneighbors(return_distance=False)  # (n, k)
    sq = np.einsum("ij,ij->i", x, x)
    penalty = 0.0
    for start in range(0, n, chunk_size):
        rows = np.arange(start, min(start + chunk_size, n))
        d = sq[rows, None] - 2.0 * x[rows] @ x.T + sq[None, :]     # squared distances
        d[np.arange(len(rows)), rows] = np.inf                      # a point is not its own neighbour
        d_nb = np.take_along_axis(d, map_nb[rows], axis=1)          # (chunk, k)
        # rank of j among i's neighbours in the original space: 1 + points strictly closer
        rank = 1 + (d[:, None, :] < d_nb[:, :, None]).sum(axis=2)
        penalty += np.clip(rank - k, 0, None).sum()
    return float(1.0 - 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0)) * penalty)


def knn_label_disagreement(features, labels, n_neighbors=10):
    """For each point, how many of its nearest neighbours in feature space carry another label.

    Returns a dict: ``disagreement`` (N,) the fraction of the ``n_neighbors``
    neighbours (the point itself excluded) whose label differs; ``vote`` (N,) the
    most common neighbour label (ties to the smaller label); ``neighbors`` (N, k)
    their indices, nearest first. Points with disagreement > 0.5 sit inside
    another class's cluster: outliers, mislabelled or ambiguous examples.
    """
    from sklearn.neighbors import NearestNeighbors

    x = _as_points(features, "features")
    y = np.asarray(labels)
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise ValueError(f"labels must be non-negative integers of shape ({len(x)},); "
                         f"got shape {y.shape}, dtype {y.dtype}.")
    if not _is_int(n_neighbors):
        raise ValueError(f"n_neighbors must be an integer, got {n_neighbors!r}.")
    _, y = np.unique(y, return_inverse=True)   # labels 0..K-1 (e.g. 3, 7, 1000000000 -> 0, 1, 2)
    classes = np.unique(np.asarray(labels))
    k = int(n_neighbors)
    if not 1 <= k < len(x):
        raise ValueError(f"n_neighbors must be between 1 and N - 1 = {len(x) - 1}, got {n_neighbors}.")
    nb = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(return_distance=False)
    nb_labels = y[nb]
    counts = np.apply_along_axis(np.bincount, 1, nb_labels, minlength=int(y.max()) + 1)
    return {"disagreement": (nb_labels != y[:, None]).mean(axis=1),
            "vote": classes[counts.argmax(axis=1)], "neighbors": nb}


# ---------------------------------------------------------------------------
# Sample photos
# ---------------------------------------------------------------------------

#: The course's sample photographs: name -> function of ``skimage.data`` that ships the
#: picture inside scikit-image (no download). ``stereo_motorcycle`` returns a stereo pair;
#: the left view is used. scikit-image ships no dog: use ``USER_IMAGES`` for one.
SAMPLE_PHOTOS = {"chelsea": "chelsea", "coffee": "coffee", "rocket": "rocket",
                 "astronaut": "astronaut", "motorcycle": "stereo_motorcycle"}

#: Largest photo (pixels) that ``load_photo`` decodes; beyond it, resize the file first.
MAX_PHOTO_PIXELS = 60_000_000


def _photo_size(size):
    """``size`` as (height, width) or None; raises on anything else."""
    if size is None:
        return None
    pair = (size, size) if np.isscalar(size) else tuple(size)
    if (len(pair) != 2 or any(not _is_int(v) for v in pair)
            or min(pair) < 1):
        raise ValueError(f"size must be a positive int, a pair (height, width) or None; got {size!r}.")
    return int(pair[0]), int(pair[1])


def _centre_crop_box(height, width, aspect):
    """(left, top, right, bottom) of the largest centred box of ``aspect`` = width / height."""
    w = min(width, max(1, round(height * aspect)))
    h = min(height, max(1, round(width / aspect)))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _photo_from_file(path, name):
    """Decode an image file into a PIL image (EXIF orientation applied) or a float array."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        where = "a folder" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{name}: {path} is {where} (resolved: {path.resolve()}); give the path "
                                "of an image file (JPEG, PNG, ...).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PHOTO_PIXELS:
                    raise ValueError(
                        f"{name}: {path.name} has {img.width} x {img.height} pixels, more than "
                        f"MAX_PHOTO_PIXELS = {MAX_PHOTO_PIXELS:,}; resize it (e.g. to 2000 px) first.")
                img.draft("RGB", (1024, 1024))  # JPEG: decode at a reduced scale, much faster
                img = ImageOps.exif_transpose(img)  # phone photos: the orientation tag
                img.load()
                return _pil_to_photo(img)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{name}: {path.name} is not an image file Pillow can read "
                         f"({type(err).__name__}: {err}).") from None
    except (OSError, SyntaxError) as err:  # truncated or corrupt data
        raise ValueError(f"{name}: {path.name} could not be decoded; the file is damaged or truncated "
                         f"({type(err).__name__}: {err}).") from None


def _pil_to_photo(img):
    """A PIL image as an 8-bit RGB PIL image, or a float32 (H, W, 3) array for 16/32-bit modes.
    Transparent pixels are put on white."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode != "F" or arr.max() > 1 else 1.0
        return np.repeat(np.clip(arr / top, 0, 1)[..., None], 3, axis=-1)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _photo_from_array(arr, name):
    """An array photo as float32 (H, W, 3) in [0, 1]; clear errors for every other shape/scale."""
    if hasattr(arr, "detach"):
        raise TypeError(f"{name}: got a torch tensor; pass an array (H, W, 3) in [0, 1] "
                        "(e.g. tensor.permute(1, 2, 0).numpy()).")
    a = np.asarray(arr)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise TypeError(f"{name} must be a path, a PIL image or an array of numbers; got "
                        f"{type(arr).__name__} of dtype {a.dtype}.")
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} has shape {a.shape}: channels first. Pass (H, W, 3) "
                         "(e.g. np.transpose(image, (1, 2, 0))).")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"{name} must have shape (H, W), (H, W, 3) or (H, W, 4); got {a.shape}.")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} is empty (shape {a.shape}).")
    if a.dtype == bool:
        x = a.astype(np.float32)
    elif a.dtype == np.uint8:
        x = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        x = a.astype(np.float32) / 65535.0
    elif np.issubdtype(a.dtype, np.floating):
        x = a.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} contains NaN or infinite values.")
        if x.min() < 0 or x.max() > 1:
            hint = (" It looks like 0..255: divide by 255 or pass uint8." if x.min() >= 0 and x.max() <= 255
                    else "")
            raise ValueError(f"{name}: a float photo must hold values in [0, 1]; got {x.min():.4g} .. "
                             f"{x.max():.4g}.{hint}")
    else:
        raise TypeError(f"{name} has dtype {a.dtype}; pass uint8 (0..255), uint16 (0..65535) or "
                        "floats in [0, 1] (e.g. image.astype(np.uint8)).")
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.shape[-1] == 4:  # alpha: put the photo on white
        alpha = x[..., 3:]
        x = x[..., :3] * alpha + (1.0 - alpha)
    return x


def load_photo(photo, size=224, *, fit="crop", name="photo"):
    """A photo as float32 RGB ``(H, W, 3)`` in [0, 1], the input range of the course's models.

    ``photo``: a path to an image file (EXIF orientation applied; transparency on white;
    16-bit files scaled by 65535), a PIL image, or an array ``(H, W[, 3 or 4])`` of uint8,
    uint16, bool or floats in [0, 1]. ``size``: an int (square), ``(height, width)``, or
    None (keep the size). ``fit="crop"`` cuts the largest centred box of the target's
    aspect ratio, then resizes (bicubic); ``fit="stretch"`` resizes the whole picture.
    A file that is missing, not an image, damaged or huge raises an error saying so.
    """
    from PIL import Image

    if fit not in ("crop", "stretch"):
        raise ValueError(f"fit must be 'crop' or 'stretch', got {fit!r}.")
    hw = _photo_size(size)
    if isinstance(photo, (str, Path)):
        src = _photo_from_file(photo, name)
    elif isinstance(photo, Image.Image):
        src = _pil_to_photo(photo)
    else:
        src = _photo_from_array(photo, name)
    height, width = (src.height, src.width) if isinstance(src, Image.Image) else src.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"{name} is empty ({width} x {height} pixels).")
    if hw is None:
        hw = (height, width)
    box = (_centre_crop_box(height, width, hw[1] / hw[0]) if fit == "crop" else (0, 0, width, height))
    if isinstance(src, Image.Image):
        if box != (0, 0, width, height) or hw != (height, width):
            src = src.resize((hw[1], hw[0]), Image.Resampling.BICUBIC, box=box)
        return np.asarray(src, dtype=np.float32) / 255.0
    if box == (0, 0, width, height) and hw == (height, width):
        return np.ascontiguousarray(src, dtype=np.float32)
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(src[..., c])).resize(
        (hw[1], hw[0]), Image.Resampling.BICUBIC, box=box), dtype=np.float32) for c in range(3)]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def sample_photos(names=None, size=224, *, fit="crop"):
    """The course's sample photographs (``SAMPLE_PHOTOS``, shipped inside scikit-image).

    Returns ``{name: float32 (H, W, 3) in [0, 1]}`` in the order asked, each through
    ``load_photo(..., size, fit=fit)``. ``names``: None (all) or a list of keys of
    ``SAMPLE_PHOTOS``.
    """
    from skimage import data

    if names is None:
        names = list(SAMPLE_PHOTOS)
    elif isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in SAMPLE_PHOTOS]
    if unknown:
        raise ValueError(f"Unknown sample photo(s) {', '.join(map(repr, unknown))}; the samples are "
                         f"{', '.join(SAMPLE_PHOTOS)}. For your own photo use load_photo(path).")
    out = {}
    for n in names:
        img = getattr(data, SAMPLE_PHOTOS[n])()
        if isinstance(img, tuple):  # stereo pair: the left view
            img = img[0]
        out[n] = load_photo(img, size, fit=fit, name=n)
    return out


def composite_photo(left, right, size=224, split=0.5):
    """Two photos side by side in one ``(size, size, 3)`` image: the several-objects test.

    ``left`` fills the left ``split`` of the width, ``right`` the rest; each is the
    centred crop of its photo with its part's aspect ratio (``load_photo(..., fit="crop")``),
    so neither is distorted. ``left``/``right``: anything ``load_photo`` takes.
    Returns float32 in [0, 1].
    """
    hw = _photo_size(size)
    if hw is None:
        raise ValueError("size must be a positive int or a pair (height, width) for a composite, got None.")
    if not _is_number(split) or not 0.0 < float(split) < 1.0:
        raise ValueError(f"split must lie strictly between 0 and 1 (the left part's share of the width), "
                         f"got {split!r}.")
    w_left = int(round(hw[1] * float(split)))
    if not 1 <= w_left < hw[1]:
        raise ValueError(f"split={split} leaves an empty part at width {hw[1]}; choose a split nearer 0.5.")
    a = load_photo(left, (hw[0], w_left), name="left")
    b = load_photo(right, (hw[0], hw[1] - w_left), name="right")
    return np.concatenate([a, b], axis=1)


# ---------------------------------------------------------------------------
# PyTorch: VGG16 and feature inversion
# ---------------------------------------------------------------------------

#: ImageNet channel statistics that torchvision's VGG16 weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _imagenet_statistics(x):
    """``IMAGENET_MEAN`` and ``IMAGENET_STD`` as (3, 1, 1) tensors of ``x``'s dtype and device."""
    torch, _ = _torch()
    _check_tensor(x, "x")
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"x must be RGB images (N, 3, H, W) or (3, H, W); got shape {tuple(x.shape)}.")
    return tuple(torch.tensor(v, dtype=x.dtype, device=x.device).view(3, 1, 1)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))


def imagenet_normalize(x):
    """RGB in [0, 1] to the input VGG16's ImageNet weights expect: ``(x - IMAGENET_MEAN) /
    IMAGENET_STD`` channel by channel. ``x``: a float tensor (N, 3, H, W) or (3, H, W)."""
    mean, std = _imagenet_statistics(x)
    return (x - mean) / std


def imagenet_denormalize(x):
    """The inverse of ``imagenet_normalize``: ``x * IMAGENET_STD + IMAGENET_MEAN`` (no clipping)."""
    mean, std = _imagenet_statistics(x)
    return x * std + mean

#: Set this environment variable to ``1`` to never try a download (use the cache or
#: fall back to random weights at once), e.g. for tests on a machine with a network.
OFFLINE_ENV_VAR = "CNN_COURSE_OFFLINE"


def _vgg16_weights_enum():
    _, torchvision = _torch()
    return torchvision.models.VGG16_Weights.IMAGENET1K_V1


def vgg16_weights_path():
    """Where torchvision's own cache keeps the VGG16 ImageNet weights (the file
    ``python -m course prefetch`` downloads): ``<torch hub dir>/checkpoints/<file>``."""
    from urllib.parse import urlparse

    torch, _ = _torch()
    filename = os.path.basename(urlparse(_vgg16_weights_enum().url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def imagenet_class_names():
    """The 1000 ImageNet class names, from torchvision's weight metadata (no download)."""
    return list(_vgg16_weights_enum().meta["categories"])


def torch_device(device=None):
    """``device`` as a ``torch.device``; by default the GPU when there is one, else the CPU."""
    torch, _ = _torch()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be None, 'cpu', 'cuda', 'cuda:0', 'mps' ... or a torch.device; got "
                         f"{device!r} ({str(err).splitlines()[0][:120]}).") from None


def _download_vgg16_state_dict(timeout=10.0, progress=True):
    """Load the VGG16 state dict through torchvision's loader and cache.

    Downloads (528 MB) when the file is not cached. ``timeout`` bounds each network
    operation (not the whole download), so an offline machine fails in seconds.
    """
    import socket

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        return _vgg16_weights_enum().get_state_dict(
            progress=progress, check_hash=True, weights_only=True
        )
    finally:
        socket.setdefaulttimeout(old)


_VGG16_CLASS = None


def _vgg16_class():
    """``ImageNetVGG16``: torchvision's VGG16 whose ``forward`` takes RGB in [0, 1].

    Built on first use (``import cnn_utils`` must not import torch). The ImageNet
    normalisation is applied in ``forward`` (no extra weights: the state dict is torchvision's).
    """
    global _VGG16_CLASS
    if _VGG16_CLASS is not None:
        return _VGG16_CLASS
    torch, torchvision = _torch()
    from torchvision.models import vgg

    class ImageNetVGG16(vgg.VGG):
        """torchvision's VGG16 (``features``, ``avgpool``, ``classifier`` unchanged) with
        ``forward(x)`` for RGB ``x`` (N, 3, H, W) in [0, 1]: it applies the ImageNet
        normalisation itself. ``forward_normalized(x)`` is torchvision's forward, for
        ImageNet-normalised input such as ``preprocess_image`` gives."""

        def __init__(self, init_weights=True):
            super().__init__(vgg.make_layers(vgg.cfgs["D"], batch_norm=False), init_weights=init_weights)

        def forward(self, x):
            return super().forward(imagenet_normalize(x))

        def forward_normalized(self, x):
            return super().forward(x)

    ImageNetVGG16.__module__ = __name__
    _VGG16_CLASS = ImageNetVGG16
    globals()["ImageNetVGG16"] = ImageNetVGG16  # so that a model can be pickled by name
    return ImageNetVGG16


def _normalized_forward(model):
    """The function that takes ImageNet-normalised input (``preprocess_image``'s tensors):
    ``model.forward_normalized`` for the course's VGG16, the model itself otherwise."""
    return getattr(model, "forward_normalized", model)


def load_vgg16(pretrained=True, device=None, seed=DEFAULT_SEED, timeout=10.0):
    """torchvision's VGG16, in eval mode, on ``device`` (default: GPU if available), whose
    ``forward`` takes RGB images (N, 3, H, W) in [0, 1] and applies the ImageNet
    normalisation itself, so the attribution functions get images in [0, 1] as for
    the MNIST models. ``model.forward_normalized`` is torchvision's own forward (for
    ``preprocess_image``'s normalised tensors); ``model.features``, ``avgpool`` and
    ``classifier`` are torchvision's layers, fed normalised input as before.

    With ``pretrained=True`` the ImageNet weights come from torchvision's cache
    (``vgg16_weights_path()``), downloaded there when missing. If they cannot be had
    (no network, a corrupt file), a plain message says what happened and how to
    prefetch them, and the model keeps randomly initialised weights (seeded with
    ``seed``, the same weights as ``torchvision.models.vgg16(weights=None)``) so that
    everything downstream still runs.

    The returned model carries two extra attributes: ``pretrained`` (True only when
    the ImageNet weights were loaded) and ``class_names`` (the 1000 ImageNet classes).
    """
    torch, torchvision = _torch()
    seed = _check_seed(seed)
    device = torch_device(device)       # a mistyped device fails before the 528 MB of weights load
    weights_enum = _vgg16_weights_enum()
    model, loaded = None, False
    if pretrained:
        path = vgg16_weights_path()
        problem = None
        if not path.is_file() and os.environ.get(OFFLINE_ENV_VAR, "") not in ("", "0"):
            problem = (f"they are not in torchvision's cache ({path}) and {OFFLINE_ENV_VAR} "
                       "is set, so no download was tried")
        else:
            try:
                state = _download_vgg16_state_dict(timeout=timeout)
                # no (slow) random initialisation: the weights overwrite it
                model = _vgg16_class()(init_weights=False)
                model.load_state_dict(state)
                loaded = True
            except Exception as err:  # URLError, socket.timeout, a corrupt or truncated file ...
                if path.is_file():
                    problem = (f"the cached file {path} could not be read "
                               f"({type(err).__name__}: {err}); delete it and prefetch again")
                else:
                    problem = (f"they are not in torchvision's cache ({path}) and downloading "
                               f"them from {weights_enum.url} failed ({type(err).__name__}: "
                               f"{err}); this machine is probably offline")
        if problem:
            print(
                "NOTE: Could not load the VGG16 ImageNet weights: " + problem + ".\n"
                "The model therefore has RANDOM weights. Every cell still runs, but its "
                "predictions are meaningless and its filters are noise: every map, image and "
                "inversion made with it shows an untrained network.\n"
                "To use the real weights: on a machine with internet, run `make prefetch` (or "
                "`python -m course prefetch`) in the course folder, which saves them (528 MB) "
                f"to {path}; then restart the kernel.",
                flush=True,
            )
    if not loaded:
        torch.manual_seed(seed)
        model = _vgg16_class()()
    model.pretrained = loaded
    model.class_names = list(weights_enum.meta["categories"])
    return model.eval().to(torch_device(device))


def vgg_layer_names(model):
    """Names of ``model.features`` in VGG's convention: conv1_1, relu1_1, ..., pool1, conv2_1 ..."""
    torch, _ = _torch()
    if not hasattr(getattr(model, "features", None), "__iter__"):
        raise TypeError("model must be torchvision's VGG16 (with a `features` sequence), as load_vgg16() "
                        f"returns; got {type(model).__name__}.")
    names, block, conv = [], 1, 0
    for layer in model.features:
        if isinstance(layer, torch.nn.Conv2d):
            conv += 1
            names.append(f"conv{block}_{conv}")
        elif isinstance(layer, torch.nn.ReLU):
            names.append(f"relu{block}_{conv}")
        elif isinstance(layer, torch.nn.MaxPool2d):
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            names.append(type(layer).__name__.lower())
    return names


def _check_layer_index(model, layer_index):
    features = getattr(model, "features", None)
    if features is None or not hasattr(features, "__len__"):
        raise TypeError("The model must have a `features` attribute (an nn.Sequential of layers), "
                        f"as torchvision's VGG16 has; got {type(model).__name__}.")
    n = len(features)
    if not _is_int(layer_index):
        raise TypeError(f"layer_index must be an integer from 0 to {n - 1}, got {layer_index!r}.")
    if not 0 <= layer_index < n:
        listing = ", ".join(f"{i} {name}" for i, name in enumerate(vgg_layer_names(model)))
        raise ValueError(f"layer_index {layer_index} is out of range: valid indices are 0 to "
                         f"{n - 1}. The model's feature layers are: {listing}.")
    return int(layer_index)


#: The largest photo ``preprocess_image`` accepts, in pixels (height x width): 50 megapixels
#: (a phone's full-resolution photo fits; a 20,000 x 20,000 scan would take minutes and
#: tens of GB). Shrink larger images first, e.g. ``img.thumbnail((4000, 4000))``.
MAX_IMAGE_PIXELS = 50_000_000


def _check_image_size(height, width, what):
    if height < 1 or width < 1:
        raise ValueError(f"{what} is empty ({height} x {width} pixels).")
    if height * width > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{what} has {height} x {width} = {height * width / 1e6:.0f} megapixels, more than the "
            f"limit of {MAX_IMAGE_PIXELS / 1e6:.0f} (cnn_utils.MAX_IMAGE_PIXELS). It is resized to "
            "224 x 224 anyway: shrink it first, e.g. img.thumbnail((4000, 4000)) with Pillow."
        )


def _open_photo(path):
    """A photo file as an upright PIL image (EXIF orientation applied), 16-bit kept as float."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No image file at {path} (resolved: {path.resolve()}).")
    try:
        with Image.open(path) as img:
            _check_image_size(img.height, img.width, f"The image {path}")
            img.load()
            img = ImageOps.exif_transpose(img)      # phone photos: stored sideways + EXIF tag
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image file Pillow can read (JPEG, PNG, ...).") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{path} could not be read: the file is truncated or corrupt ({err}).") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey: Pillow's convert("RGB") would clip every value above 255 to white
        arr = np.asarray(img, dtype=np.float64) / 65535.0
        if arr.max() > 1.0:
            raise ValueError(f"{path}: a {img.mode} image with values above 65535 is not a photo.")
        return arr
    if img.mode == "F":
        return np.asarray(img, dtype=np.float64)
    return img


def preprocess_image(image, size=224):
    """A photo as VGG16 input: a float32 tensor (1, 3, size, size), ImageNet-normalised.

    ``image`` is a PIL image, a path to an image file, or an array (H, W, 3) / (H, W)
    of uint8 in 0..255, uint16 in 0..65535 or floats in [0, 1] (other integer arrays
    must hold 0..255). A file's EXIF orientation is applied (phone photos come upright)
    and 16-bit PNGs keep their range. It is resized (bicubic, Pillow's
    ``Image.Resampling``) to ``size`` x ``size`` (``size`` may also be ``(height, width)``),
    scaled to [0, 1] and normalised with ``IMAGENET_MEAN`` / ``IMAGENET_STD``.
    Images above ``MAX_IMAGE_PIXELS`` are refused. ``recreate_image`` is its inverse.
    """
    from PIL import Image

    torch, _ = _torch()
    try:
        height, width = (size, size) if np.isscalar(size) else tuple(size)
        if isinstance(height, bool) or isinstance(width, bool) or height != int(height) or width != int(width):
            raise ValueError
        height, width = int(height), int(width)
    except (TypeError, ValueError):
        raise ValueError(f"size must be an integer or a pair (height, width) of integers, got {size!r}.") from None
    if height < 1 or width < 1 or height * width > MAX_IMAGE_PIXELS:
        raise ValueError(f"size must be positive and at most {MAX_IMAGE_PIXELS} pixels, got {size!r}.")
    if isinstance(image, (str, os.PathLike)):
        image = _open_photo(image)
    if isinstance(image, Image.Image):
        _check_image_size(image.height, image.width, "The image")
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            image = np.asarray(image, dtype=np.float64) / (1.0 if image.mode == "F" else 65535.0)
        else:
            pil = image.convert("RGB")
    if not isinstance(image, Image.Image):
        if hasattr(image, "detach"):
            image = image.detach().cpu().numpy()
        arr = np.asarray(image)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise TypeError("image must be a PIL image, a path or an array of numbers, "
                            f"got {type(image).__name__}.")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            raise ValueError(f"image has shape {arr.shape}, channels first; pass it channels last "
                             "(H, W, 3), e.g. np.moveaxis(image, 0, -1).")
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
            hint = " (drop the alpha channel with image[..., :3])" if arr.ndim == 3 and arr.shape[-1] == 4 else ""
            raise ValueError(f"image must have shape (H, W, 3) (RGB, channels last) or (H, W); "
                             f"got shape {arr.shape}{hint}.")
        _check_image_size(arr.shape[0], arr.shape[1], "The image")
        if arr.dtype != np.uint8:
            if arr.dtype == np.uint16:
                arr = arr.astype(np.float32) / 65535.0
            elif arr.dtype.kind in "iu":
                if arr.min() < 0 or arr.max() > 255:
                    raise ValueError(f"An integer image must hold 0..255 (or be uint16, 0..65535); got "
                                     f"values from {arr.min()} to {arr.max()}.")
                arr = arr.astype(np.float32) / 255.0
            arr = arr.astype(np.float32)
            if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
                hint = " They look like 0..255: divide by 255 or pass uint8." if np.nanmax(arr) <= 255 else ""
                raise ValueError("A float image must hold values in [0, 1] (or pass uint8 in 0..255); "
                                 f"got values from {np.nanmin(arr):.3g} to {np.nanmax(arr):.3g}.{hint}")
            arr = np.round(arr * 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., np.newaxis], 3, axis=-1)
        pil = Image.fromarray(arr)
    pil = pil.resize((width, height), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return imagenet_normalize(x).unsqueeze(0).contiguous()


def recreate_image(tensor):
    """Inverse of ``preprocess_image``: un-normalise, clip to [0, 1], uint8 (H, W, 3)."""
    torch, _ = _torch()
    if isinstance(tensor, torch.Tensor):
        x = tensor.detach().cpu().float()
    else:
        x = _converted(tensor, "tensor", "a torch tensor or array (1, 3, H, W) or (3, H, W)",
                       lambda v: torch.as_tensor(np.asarray(v, dtype=np.float32)))
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3 or x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"recreate_image expects a tensor (1, 3, H, W) or (3, H, W) as made by "
                         f"preprocess_image; got shape {tuple(x.shape)}.")
    if not torch.isfinite(x).all():
        raise ValueError("recreate_image: the tensor contains NaN or infinite values.")
    x = imagenet_denormalize(x).clamp(0, 1)
    return np.round(x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _check_tensor(x, name):
    torch, _ = _torch()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__} "
                        "(convert with torch.as_tensor).")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}.")


def _check_positive(value, name):
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")


def euclidian_loss(target, current):
    """Relative squared error ||current - target||^2 / ||target||^2 (Mahendran & Vedaldi):
    ``target`` the features of the original image, ``current`` those of the reconstruction,
    tensors of the same shape (no broadcasting)."""
    _check_tensor(target, "target")
    _check_tensor(current, "current")
    if tuple(target.shape) != tuple(current.shape):
        raise ValueError(f"target and current must have the same shape; got {tuple(target.shape)} "
                         f"and {tuple(current.shape)} (features of two different layers or images?).")
    return (current - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


def alpha_norm(x, alpha=6):
    """Sum of |x|^alpha (the absolute value matters for odd alpha)."""
    _check_tensor(x, "x")
    _check_positive(alpha, "alpha")
    return x.abs().pow(alpha).sum()


def total_variation_norm(x, beta=2, eps=1e-8):
    """Sum over pixels of ((x[i+1, j] - x[i, j])^2 + (x[i, j+1] - x[i, j])^2)^(beta/2).

    ``x`` is (N, C, H, W) or (C, H, W): differences run along the two spatial axes
    (H and W), never across channels. ``eps`` keeps the gradient finite for
    ``beta < 2`` where neighbours are equal; it is subtracted again, so a constant
    image has exactly zero variation.
    """
    _check_tensor(x, "x")
    _check_positive(beta, "beta")
    if not _is_number(eps) or eps < 0 or (eps == 0 and beta < 2):
        raise ValueError(f"eps must be a small number >= 0 (> 0 when beta < 2, where the gradient of an "
                         f"equal neighbour pair is infinite at 0); got {eps!r}.")
    if x.ndim not in (3, 4):
        raise ValueError(f"Expected (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}.")
    d_rows = x[..., 1:, :-1] - x[..., :-1, :-1]
    d_cols = x[..., :-1, 1:] - x[..., :-1, :-1]
    squared = d_rows.pow(2) + d_cols.pow(2)
    if beta == 2:
        return squared.sum()
    floor = squared.new_full((), eps).pow(beta / 2)  # same dtype: constant images give exactly 0
    return ((squared + eps).pow(beta / 2) - floor).sum()


def _as_model_input(image, size=224):
    """A (1, 3, H, W) float tensor from a tensor, or via ``preprocess_image`` otherwise."""
    torch, _ = _torch()
    if not isinstance(image, torch.Tensor):
        return preprocess_image(image, size=size)
    x = image.detach().float()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError("image must be a tensor (1, 3, H, W) or (3, H, W) as made by "
                         f"preprocess_image; got shape {tuple(image.shape)}.")
    if not torch.isfinite(x).all():
        raise ValueError("image contains NaN or infinite values.")
    return x


def top_k_predictions(model, image, k=5):
    """The ``k`` most probable ImageNet classes: a list of (class name, probability).

    ``image``: a tensor from ``preprocess_image`` (ImageNet-normalised), or anything
    ``preprocess_image`` accepts (a photo, an array in [0, 1] or uint8)."""
    torch, _ = _torch()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a PyTorch model (torchvision's VGG16), got {type(model).__name__}.")
    device = next(model.parameters()).device
    x = _as_model_input(image).to(device)
    with torch.no_grad():
        probs = torch.softmax(_normalized_forward(model)(x), dim=1)[0].cpu()
    if not _is_int(k) or not 1 <= k <= len(probs):
        raise ValueError(f"k must be an integer from 1 to the number of classes ({len(probs)}), got {k!r}.")
    values, indices = probs.topk(int(k))
    names = getattr(model, "class_names", None) or imagenet_class_names()
    return [(names[i], float(p)) for p, i in zip(values, indices.tolist())]


def vgg_feature_maps(model, image, layer_indices):
    """Outputs of ``model.features[i]`` for each ``i`` in ``layer_indices``, in one pass.

    Returns ``{i: array (C, H, W)}``. Runs the layers one by one (no hooks) and
    copies each output, so VGG's in-place ReLUs cannot overwrite a conv layer's map.
    """
    torch, _ = _torch()
    if isinstance(layer_indices, (int, np.integer)):
        layer_indices = [layer_indices]
    if not isinstance(layer_indices, (list, tuple, set, range, np.ndarray)):
        raise TypeError(f"layer_indices must be a list of indices of model.features, got {layer_indices!r}.")
    indices = sorted({_check_layer_index(model, i) for i in layer_indices})
    if not indices:
        raise ValueError("layer_indices is empty: give at least one index of model.features.")
    device = next(model.parameters()).device
    x = _as_model_input(image).to(device)
    maps = {}
    with torch.no_grad():
        for i, layer in enumerate(model.features[: indices[-1] + 1]):
            x = layer(x)
            if i in indices:
                maps[i] = x[0].cpu().numpy().copy()
    return maps


def gradient_saliency(model, image, class_index=None):
    """Vanilla gradient saliency (Simonyan et al. 2014) of a class's pre-softmax score,
    with respect to the normalised input tensor (``preprocess_image``'s), via ``saliency_map``.

    Returns ``(saliency (H, W) array, class_index)``: the largest absolute gradient over
    the three colour channels; ``class_index`` defaults to the predicted class.
    """
    torch, _ = _torch()
    x = _as_model_input(image)
    forward = _normalized_forward(model)
    # normalised tensors have no fixed pixel range: no range check on this wrapper
    net = set_input_range(_forward_module(forward), None)
    n_classes = None
    if class_index is not None:
        with torch.no_grad():
            n_classes = int(forward(x.to(next(model.parameters()).device)).shape[1])
        if not _is_int(class_index) or not 0 <= class_index < n_classes:
            raise ValueError(f"class_index must be an int from 0 to {n_classes - 1}, got {class_index!r}.")
    image_hwc = x.permute(0, 2, 3, 1).cpu().numpy()
    _, cls = class_scores(net, image_hwc, class_index)
    sal = saliency_map(net, image_hwc, class_index=cls, normalize=False)
    return sal[0], int(cls[0])


def _forward_module(fn):
    """An ``nn.Module`` whose forward is ``fn`` (which may belong to another module)."""
    torch, _ = _torch()

    class Forward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = getattr(fn, "__self__", None)

        def forward(self, x):
            return fn(x)
    return Forward()


def feature_inversion(model, image, layer_index, iterations=200, lr=0.1, optimizer="adam",
                      alpha=6, alpha_weight=1e-5, tv_beta=2, tv_weight=0.3, n_snapshots=6,
                      seed=DEFAULT_SEED, progress=True, size=224):
    """Reconstruct an image from its features at ``model.features[layer_index]``.

    Mahendran & Vedaldi (2015): starting from noise, gradient descent on the image x for

        euclidian_loss(target, features(x)) + alpha_weight * mean(|x|^alpha)
                                            + tv_weight * mean TV_beta(x)

    (the regularizers ``alpha_norm`` and ``total_variation_norm`` averaged per value, so
    the weights do not depend on the image size). The target features are computed
    once, without gradients; only the layers up to the target run
    (``model.features[:layer_index + 1]``), and the model's weights are frozen during the
    optimisation so no weight gradients are computed. The learning rate decays along a
    cosine from ``lr`` to zero.

    ``image``: a (1, 3, H, W) tensor from ``preprocess_image`` (or anything it accepts,
    resized to ``size``). ``optimizer``: ``"adam"`` or ``"sgd"`` (momentum 0.9).

    Returns a dict: ``image`` (the reconstruction, uint8 H x W x 3), ``tensor`` (the same,
    normalised, 1 x 3 x H x W), ``snapshots`` (uint8 images at regular steps) with their
    ``snapshot_steps``, ``loss`` and ``feature_loss`` (per step, NumPy arrays),
    ``layer_index``, ``layer_name``, ``seconds`` (wall clock) and ``cpu_seconds`` (CPU
    time of all threads).
    """
    import time

    from tqdm.auto import tqdm

    torch, _ = _torch()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a PyTorch model (torchvision's VGG16), got {type(model).__name__}.")
    layer_index = _check_layer_index(model, layer_index)
    for name, value in (("iterations", iterations), ("n_snapshots", n_snapshots), ("seed", seed)):
        if not _is_int(value) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be an integer of at least {0 if name == 'seed' else 1}, got {value!r}.")
    for name, value in (("lr", lr), ("alpha", alpha), ("tv_beta", tv_beta)):
        _check_positive(value, name)
    for name, value in (("alpha_weight", alpha_weight), ("tv_weight", tv_weight)):
        if not _is_number(value) or value < 0:
            raise ValueError(f"{name} must be a number >= 0 (0 switches the regularizer off), got {value!r}.")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}.")
    device = next(model.parameters()).device
    x0 = _as_model_input(image, size=size).to(device)
    trunk = model.features[: layer_index + 1]
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            target = trunk(x0).clone()
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = 0.5 + 0.1 * torch.randn(x0.shape, generator=gen)  # grey-ish noise in pixel space
        x = imagenet_normalize(noise).to(device).requires_grad_(True)
        opt = (torch.optim.Adam([x], lr=lr) if optimizer == "adam"
               else torch.optim.SGD([x], lr=lr, momentum=0.9))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(iterations))
        n_values = x.numel()
        n_snap = max(1, min(int(n_snapshots), int(iterations)))
        snap_at = {int(round(iterations * (k + 1) / n_snap)) for k in range(n_snap)}
        snapshots, snapshot_steps, losses, feature_losses = [], [], [], []
        start, cpu_start = time.perf_counter(), time.process_time()
        bar = tqdm(range(1, int(iterations) + 1), disable=not progress,
                   desc=f"inverting {vgg_layer_names(model)[layer_index]}")
        for step in bar:
            opt.zero_grad(set_to_none=True)
            feature_loss = euclidian_loss(target, trunk(x))
            loss = feature_loss
            if alpha_weight:
                loss = loss + alpha_weight * alpha_norm(x, alpha) / n_values
            if tv_weight:
                loss = loss + tv_weight * total_variation_norm(x, tv_beta) / n_values
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
            feature_losses.append(feature_loss.item())
            if step in snap_at:
                snapshots.append(recreate_image(x))
                snapshot_steps.append(step)
            if step % 10 == 0 or step == 1:
                bar.set_postfix(feature_loss=f"{feature_losses[-1]:.3g}")
        bar.close()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    if not np.isfinite(losses[-1]):
        raise FloatingPointError(f"The inversion diverged (loss {losses[-1]}); try a smaller lr.")
    return {
        "image": recreate_image(x), "tensor": x.detach().cpu(),
        "snapshots": snapshots, "snapshot_steps": snapshot_steps,
        "loss": np.array(losses), "feature_loss": np.array(feature_losses),
        "layer_index": layer_index, "layer_name": vgg_layer_names(model)[layer_index],
        "seconds": seconds, "cpu_seconds": cpu_seconds,
    }


def _as_unit_image(image, name):
    """An image as float64 in [0, 1]: uint8 / 255, floats checked to lie in [0, 1]."""
    a = np.asarray(image)
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}).")
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be uint8 (0..255) or float in [0, 1], got dtype {a.dtype}.")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    if a.min() < 0 or a.max() > 1:
        raise ValueError(f"{name} is float with values from {np.nanmin(a):.3g} to {np.nanmax(a):.3g}; "
                         "a float image must lie in [0, 1] (divide 0..255 values by 255, or pass uint8).")
    return a


def image_similarity(original, reconstruction):
    """SSIM (Wang et al., 2004) and PSNR (dB) of two images, via scikit-image.

    Images (H, W, 3) or (H, W), each uint8 (0..255) or float in [0, 1] (the two may
    differ), at least 7 x 7; compared on the [0, 1] scale (``data_range=1``). Returns
    ``(ssim, psnr)``; SSIM is 1 and PSNR infinite for identical images, SSIM near 0
    for independent noise.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = _as_unit_image(original, "original")
    b = _as_unit_image(reconstruction, "reconstruction")
    if a.shape != b.shape or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"Expected two images of the same shape, (H, W, 3) or (H, W); got "
                         f"{a.shape} and {b.shape}.")
    if min(a.shape[:2]) < 7:
        raise ValueError(f"SSIM needs images of at least 7 x 7 pixels; got {a.shape[:2]}.")
    ssim = structural_similarity(a, b, channel_axis=-1 if a.ndim == 3 else None, data_range=1.0)
    with np.errstate(divide="ignore"):
        psnr = peak_signal_noise_ratio(a, b, data_range=1.0)
    return float(ssim), float(psnr)


# -- VGG16 feature visualization ---------------------------------------------

#: Colour decorrelation of Olah et al. (2017, lucid): the square root of ImageNet's RGB
#: covariance (from its SVD). The optimised colours live in this decorrelated space.
_COLOR_CORRELATION_SVD_SQRT = np.array([[0.26, 0.09, 0.02],
                                        [0.27, 0.00, -0.05],
                                        [0.27, -0.09, 0.03]], dtype=np.float32)

#: Pseudo-layer name of the classifier's output (pre-softmax class scores).
VGG_LOGITS = "logits"


class _StopForward(Exception):
    """Raised by a forward hook once the wanted layer has run: the rest is not computed."""


def _vgg_features_and_input(model):
    """``(features, to_model_input)``: VGG's ``features`` and the map from pixels in [0, 1]
    to the input the features expect (ImageNet normalisation)."""
    features = getattr(model, "features", None)
    if features is None or not hasattr(features, "__len__"):
        raise TypeError("model must be torchvision's VGG16 (with a `features` attribute), as "
                        f"load_vgg16() returns; got {type(model).__name__}.")
    return features, imagenet_normalize


def vgg_module_name(model, layer):
    """The name in ``model.named_modules()`` of VGG16's layer ``layer`` (e.g. 'relu5_3' ->
    'features.29'), for hooks (the attribution functions take 'relu5_3' directly)."""
    names = _vgg_alias_names(model)
    if layer not in names:
        raise ValueError(f"Unknown layer {layer!r}; VGG16's layers are: {', '.join(names) or 'none'}.")
    return names[layer]


def _vgg_layer_module(model, layer):
    """The module of ``model.features`` whose output is ``layer`` (a name like 'conv4_3'),
    and its index. For a 'relu' layer the conv before it is returned, with ``relu=True``:
    activation maximization ascends the pre-ReLU value (Olah et al.), which keeps a
    gradient where the unit is off."""
    names = vgg_layer_names(model)
    if layer not in names:
        raise ValueError(f"Unknown layer {layer!r}; VGG16's layers are: {', '.join(names)} "
                         f"(and {VGG_LOGITS!r} for the class scores).")
    index = names.index(layer)
    relu = layer.startswith("relu")
    if relu:
        index -= 1
    return model.features[index], index, relu


def vgg_layer_activations(model, images, layer, *, batch_size=16):
    """Activations of one VGG16 layer for photos in [0, 1]: (N, C, h, w) float32 array.

    ``images``: (N, H, W, 3) float in [0, 1] (or one photo). Only the layers up to
    ``layer`` run. ``layer``: a name of ``vgg_layer_names`` (a 'relu' layer gives the
    rectified map).
    """
    torch, _ = _torch()
    batch_size = _check_batch_size(batch_size)
    x = _photo_batch(images)
    features, to_input = _vgg_features_and_input(model)
    names = vgg_layer_names(model)
    if layer not in names:
        raise ValueError(f"Unknown layer {layer!r}; VGG16's layers are: {', '.join(names)}.")
    trunk = features[: names.index(layer) + 1]
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[i: i + batch_size]).permute(0, 3, 1, 2).contiguous().to(device)
            out.append(trunk(to_input(xb)).cpu().numpy().copy())
    return np.concatenate(out).astype(np.float32)


def _photo_batch(images, name="images"):
    """(N, H, W, 3) float32 in [0, 1] from a batch or one photo; clear errors otherwise."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] == 0:
        raise ValueError(f"{name} must be photos (N, H, W, 3) or one photo (H, W, 3), RGB in [0, 1]; "
                         f"got shape {x.shape}.")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
        raise ValueError(f"{name} must hold values in [0, 1] (cnn_utils.load_photo gives that); got "
                         f"{np.nanmin(x):.4g} .. {np.nanmax(x):.4g}.")
    return x


def vgg_receptive_field(model, layer):
    """Receptive field of a unit of ``layer``: ``(size, stride, offset)`` in input pixels.

    Unit ``i`` (along an axis) sees the input pixels centred on ``offset + i * stride``,
    a window ``size`` wide. Computed from the chain of convolutions and poolings:
    ``size += (k - 1) * stride``, ``offset += ((k - 1) / 2 - padding) * stride``,
    ``stride *= s`` (VGG16's 3 x 3 convolutions have padding 1 and keep the offset).
    """
    torch, _ = _torch()
    names = vgg_layer_names(model)
    if layer not in names:
        raise ValueError(f"Unknown layer {layer!r}; VGG16's layers are: {', '.join(names)}.")
    size, stride, offset = 1, 1, 0.0
    for module in model.features[: names.index(layer) + 1]:
        if isinstance(module, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
            k, s, p = (v if isinstance(v, int) else v[0]
                       for v in (module.kernel_size, module.stride, module.padding))
            size += (k - 1) * stride
            offset += ((k - 1) / 2 - p) * stride
            stride *= s
    return size, stride, offset


def top_activating_crops(model, photos, layer, channel, k=4, *, per_photo=1):
    """The photo patches that drive one channel of ``layer`` hardest (dataset examples).

    For every photo (dict name -> (H, W, 3) in [0, 1], all of one size) the channel's map
    is computed; the ``k`` strongest units overall (at most ``per_photo`` per photo, the
    others at least a stride apart) are cut out as the patch of their receptive field
    (``vgg_receptive_field``; clipped to the photo). Returns a list of dicts, strongest
    first: ``photo``, ``value``, ``position`` (unit row, column), ``box`` (top, left,
    bottom, right in pixels) and ``crop`` (float32 patch). ``channel`` may be a list of
    channels: then one such list per channel, from one pass over the photos.
    """
    if not isinstance(photos, dict):
        raise TypeError("photos must be a dict {name: photo (H, W, 3) in [0, 1]}, e.g. cnn_utils.sample_photos(); "
                        f"got {type(photos).__name__}.")
    if not photos:
        raise ValueError("photos must be a non-empty dict {name: photo (H, W, 3) in [0, 1]}.")
    for name, value in (("k", k), ("per_photo", per_photo)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    names = list(photos)
    batch = [_photo_batch(photos[n], f"photos[{n!r}]")[0] for n in names]
    sizes = {n: b.shape[:2] for n, b in zip(names, batch)}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"photos must all have one size (load them with the same size=...); got {sizes}.")
    x = np.stack(batch)
    maps = vgg_layer_activations(model, x, layer)
    n_channels = maps.shape[1]
    channels = list(channel) if isinstance(channel, (list, tuple)) else [channel]
    for ch in channels:
        if not _is_int(ch) or not 0 <= ch < n_channels:
            raise ValueError(f"channel must be an int from 0 to {n_channels - 1} ({layer} has {n_channels} "
                             f"channels), or a list of such ints; got {ch!r}.")
    size, stride, offset = vgg_receptive_field(model, layer)
    height, width = x.shape[1:3]
    half = size // 2
    results = []
    for ch in channels:
        found = []
        for i, name in enumerate(names):
            m = maps[i, ch]
            order = np.argsort(m, axis=None)[::-1]
            taken = []
            for flat in order:
                if len(taken) >= per_photo:
                    break
                r, c = np.unravel_index(flat, m.shape)
                if any(abs(r - r0) <= 1 and abs(c - c0) <= 1 for r0, c0 in taken):
                    continue
                taken.append((int(r), int(c)))
                cy, cx = offset + r * stride, offset + c * stride
                top, left = int(max(0, round(cy - half))), int(max(0, round(cx - half)))
                bottom, right = int(min(height, round(cy + half + 1))), int(min(width, round(cx + half + 1)))
                found.append({"photo": name, "value": float(m[r, c]), "position": (int(r), int(c)),
                              "box": (top, left, bottom, right), "crop": x[i, top:bottom, left:right].copy()})
        found.sort(key=lambda d: -d["value"])
        results.append(found[: int(k)])
    return results if isinstance(channel, (list, tuple)) else results[0]


def _fourier_scale(height, width, decay=1.0):
    """Per-frequency scale 1 / max(f, 1 / max(H, W))^decay of an rfft2 grid, times sqrt(HW)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    freqs = np.sqrt(fy ** 2 + fx ** 2)
    return (1.0 / np.maximum(freqs, 1.0 / max(height, width)) ** decay * np.sqrt(height * width)).astype(np.float32)


def _fourier_image(torch, spectrum, scale, height, width, decorrelate):
    """Olah et al.'s parametrisation: spectrum (B, 3, H, W//2+1, 2) -> pixels (B, 3, H, W) in (0, 1).

    Scaled 1/f spectrum -> inverse FFT -> (optionally) decorrelated colours -> sigmoid.
    """
    spec = torch.view_as_complex(spectrum) * scale
    img = torch.fft.irfft2(spec, s=(height, width)) / 4.0
    if decorrelate:
        c = torch.as_tensor(_COLOR_CORRELATION_SVD_SQRT / np.max(np.linalg.norm(
            _COLOR_CORRELATION_SVD_SQRT, axis=0)), device=img.device)
        img = torch.einsum("ij,bjhw->bihw", c, img)
    return torch.sigmoid(img)


def _random_transform(torch, img, gen, jitter, scales, angles, pad):
    """The transformation robustness of Olah et al.: pad, jitter, scale, rotate, jitter
    (one random draw per step, the same for the whole batch)."""
    import torch.nn.functional as F

    def rand_int(n):
        return int(torch.randint(n, (1,), generator=gen))

    if pad:
        img = F.pad(img, (pad,) * 4, mode="constant", value=0.5)
    if jitter:
        dy, dx = rand_int(2 * jitter + 1) - jitter, rand_int(2 * jitter + 1) - jitter
        img = torch.roll(img, (dy, dx), dims=(2, 3))
    s = scales[rand_int(len(scales))] if scales else 1.0
    a = np.deg2rad(angles[rand_int(len(angles))]) if angles else 0.0
    if s != 1.0 or a != 0.0:
        theta = torch.tensor([[np.cos(a) / s, -np.sin(a) / s, 0.0],
                              [np.sin(a) / s, np.cos(a) / s, 0.0]], dtype=img.dtype, device=img.device)
        grid = F.affine_grid(theta.expand(len(img), 2, 3), list(img.shape), align_corners=False)
        img = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if jitter:
        dy, dx = rand_int(jitter // 2 * 2 + 1) - jitter // 2, rand_int(jitter // 2 * 2 + 1) - jitter // 2
        img = torch.roll(img, (dy, dx), dims=(2, 3))
    return img


def vgg_feature_visualization(model, layer, units, *, size=128, steps=128, lr=0.05, decorrelate=True,
                              jitter=8, scales=(1.0, 0.975, 1.025, 0.95, 1.05), angles=tuple(range(-8, 9)),
                              pad=12, seed=DEFAULT_SEED, progress=True):
    """Activation maximization on VGG16 with the robustness of Olah et al., "Feature
    Visualization" (Distill, 2017), all ``units`` optimised together in one batch.

    Objective per image b: the mean over positions of channel ``units[b]`` of ``layer``
    (a 'relu' layer is ascended on its pre-ReLU conv output), or with
    ``layer="logits"`` the pre-softmax score of class ``units[b]``. Only the layers up to
    ``layer`` run. Regularisation by parametrisation and transformation, not penalties:
    the image is a 1/f-scaled Fourier spectrum, with colours in ImageNet's decorrelated
    colour space (``decorrelate``), squashed to (0, 1) by a sigmoid; every step sees it
    padded, jittered, rescaled and rotated at random. Adam with rate ``lr``.

    Returns a dict: ``images`` float32 (B, size, size, 3) in [0, 1], ``objective`` (steps,
    B) history, ``units``, ``layer``, ``seconds``.
    """
    import time

    from tqdm.auto import tqdm

    torch, _ = _torch()
    units = [units] if isinstance(units, (int, np.integer)) else list(units)
    if not units or any(not _is_int(u) for u in units):
        raise TypeError(f"units must be an int or a non-empty list of ints (channels or classes); got {units!r}.")
    for name, value, least in (("steps", steps, 1), ("size", size, 32), ("jitter", jitter, 0), ("pad", pad, 0)):
        if not _is_int(value) or value < least:
            raise ValueError(f"{name} must be an integer, {name} >= {least}"
                             f"{' (VGG16 pools five times)' if name == 'size' else ''}; got {value!r}.")
    if not _is_number(lr) or lr < 0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}.")
    seed = _check_seed(seed)
    try:
        scales, angles = [float(v) for v in scales], [float(v) for v in angles]
    except (TypeError, ValueError):
        raise TypeError(f"scales and angles must be lists of numbers, got {scales!r} and {angles!r}.") from None
    if any(not np.isfinite(v) or v <= 0 for v in scales) or not all(np.isfinite(angles)):
        raise ValueError(f"scales must be positive numbers and angles finite; got {scales!r} and {angles!r}.")
    features, to_input = _vgg_features_and_input(model)
    if layer == VGG_LOGITS:
        module, n_units = None, int(model.classifier[-1].out_features)
    else:
        module, index, _ = _vgg_layer_module(model, layer)
        n_units = int(next(m.out_channels for m in reversed(features[: index + 1]) if hasattr(m, "out_channels")))
    bad = [u for u in units if not 0 <= u < n_units]
    if bad:
        raise ValueError(f"{layer} has {n_units} {'classes' if module is None else 'channels'} "
                         f"(0..{n_units - 1}); got {bad[0]}.")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    b, h, w = len(units), int(size), int(size)
    spectrum = (0.01 * torch.randn((b, 3, h, w // 2 + 1, 2), generator=gen)).to(device).requires_grad_(True)
    scale = torch.as_tensor(_fourier_scale(h, w), device=device)[..., None].expand(h, w // 2 + 1, 1)
    scale = torch.view_as_complex(torch.cat([scale, torch.zeros_like(scale)], -1).contiguous())
    idx = torch.as_tensor(units, device=device)
    captured = {}

    def hook(_module, _inputs, output):
        captured["out"] = output
        raise _StopForward

    opt = torch.optim.Adam([spectrum], lr=lr)
    history = np.empty((int(steps), b), dtype=np.float32)
    requires = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    start = time.perf_counter()
    # everything that changes the model sits inside try/finally: an error leaves no hook behind
    handle = module.register_forward_hook(hook) if module is not None else None
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        bar = tqdm(range(int(steps)), disable=not progress, desc=f"visualising {layer}")
        for step in bar:
            img = _fourier_image(torch, spectrum, scale, h, w, decorrelate)
            x = to_input(_random_transform(torch, img, gen, jitter, scales, angles, pad))
            if module is None:  # torchvision's VGG.forward, on the normalised input
                logits = model.classifier(torch.flatten(model.avgpool(features(x)), 1))
                obj = logits[torch.arange(b), idx]
            else:
                try:
                    features(x)
                except _StopForward:
                    pass
                obj = captured.pop("out")[torch.arange(b), idx].mean(dim=(1, 2))
            opt.zero_grad(set_to_none=True)
            (-obj.sum()).backward()
            opt.step()
            history[step] = obj.detach().cpu().numpy()
            if step % 8 == 0:
                bar.set_postfix(objective=f"{history[step].mean():.3g}")
        bar.close()
    finally:
        if handle is not None:
            handle.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    with torch.no_grad():
        images = _fourier_image(torch, spectrum, scale, h, w, decorrelate)
    return {"images": images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32), "objective": history,
            "units": units, "layer": layer, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------
# Plotting
# ---------------------------------------------------------------------------

def _display_images(images, name="images"):
    """Images for display on the [0, 1] scale: uint8 / 255; floats must lie in [0, 1]
    (so that nothing is silently clipped to white or black)."""
    a = np.asarray(images)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be an array of numbers, got dtype {a.dtype}.")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}).")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255.0)
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contain NaN or infinite values.")
    if a.min() < -1e-3 or a.max() > 1 + 1e-3:
        raise ValueError(
            f"{name} are shown on the scale [0, 1], but hold values from {a.min():.4g} to {a.max():.4g}. "
            "Divide 0..255 values by 255 (uint8 images are scaled automatically); show optimised "
            "images with deprocess_image."
        )
    return np.clip(a, 0.0, 1.0)


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


def plot_all_channels(maps, title=None, ncols=8, cmap="viridis", size=1.1, labels=None):
    """Every channel of one image's feature maps (H, W, C), Keras' layout, one panel each.

    One colour scale for all channels (0 .. the largest value), so panels compare
    honestly; channels that are zero everywhere are titled in grey with "(0)".
    """
    import matplotlib

    if isinstance(maps, dict):
        raise TypeError("maps must be one layer's array (H, W, C), not the dict of get_activations: "
                        "pick a layer and an image, e.g. acts['conv1'][0].")
    maps = np.asarray(maps)
    if maps.ndim == 4 and maps.shape[0] == 1:
        maps = maps[0]
    if maps.ndim != 3:
        raise ValueError(f"plot_all_channels expects one image's maps (H, W, C); got shape {maps.shape} "
                         "(a batch: pick one image, e.g. maps[0]).")
    if maps.size == 0 or not np.all(np.isfinite(maps)):
        raise ValueError("maps must be non-empty and finite (no NaN or infinite values).")
    if labels is not None and len(labels) != maps.shape[-1]:
        raise ValueError(f"labels has {len(labels)} entries for {maps.shape[-1]} channels.")
    n = maps.shape[-1]
    vmin = min(0.0, float(maps.min()))
    vmax = max(float(maps.max()), vmin + 1e-6)
    fig, axes = _grid(n, ncols, size)
    im = None
    for c, ax in enumerate(axes.flat[:n]):
        im = ax.imshow(maps[..., c], cmap=colormap(cmap), vmin=vmin, vmax=vmax)
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

    if not isinstance(sparsity, dict) or not sparsity:
        raise TypeError("sparsity must be a non-empty dict {layer name: fraction}, as layer_sparsity returns.")
    names = list(sparsity)
    values = np.array([sparsity[n] for n in names], dtype=np.float64) * 100
    if not np.all((values >= 0) & (values <= 100)):
        raise ValueError("sparsity values must be fractions in [0, 1].")
    if spread is not None and set(spread) != set(names):
        raise ValueError("spread must have the same layer names as sparsity.")
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
    if not _is_int(in_channel) or not 0 <= in_channel < k.shape[2]:
        raise ValueError(f"in_channel must be an integer from 0 to {k.shape[2] - 1}, got {in_channel!r}.")
    if bias is not None and np.shape(bias) != (k.shape[-1],):
        raise ValueError(f"bias must have one value per filter, shape ({k.shape[-1]},); got {np.shape(bias)}.")
    if bias is not None and np.asarray(bias).dtype.kind not in "iuf":
        raise TypeError(f"bias must hold numbers, got dtype {np.asarray(bias).dtype}.")
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
    outs = np.arange(k.shape[3]) if out_channels is None else np.atleast_1d(np.asarray(out_channels))
    ins = np.arange(k.shape[2]) if in_channels is None else np.atleast_1d(np.asarray(in_channels))
    for name, idx, n in (("out_channels", outs, k.shape[3]), ("in_channels", ins, k.shape[2])):
        if idx.size == 0 or idx.dtype.kind not in "iu" or idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"{name} must be indices from 0 to {n - 1}; got {idx.tolist()}.")
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
    _check_titles(labels, n, "labels")
    if dead is not None:
        dead = np.asarray(dead)
        if dead.dtype == bool and dead.shape == (n,):
            mask = dead
        elif dead.dtype.kind in "iu" and dead.ndim == 1 and (dead.size == 0 or (dead.min() >= 0 and dead.max() < n)):
            mask[dead] = True
        else:
            raise ValueError(f"dead must be a boolean mask of {n} entries or positions 0..{n - 1}; got {dead!r}.")
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

    h = np.asarray(getattr(history, "history", history), dtype=np.float64)
    if h.ndim == 1:
        h = h[:, np.newaxis]
    if h.ndim != 2 or len(h) == 0:
        raise ValueError(f"history must be (steps, K), as FeatureVisualization.history; got shape {h.shape}.")
    _check_titles(labels, h.shape[1], "labels")
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


def _two_row_figure(n, size, extra_width, extra_height):
    """A (2, n) grid of axes without ticks (images on top, maps below)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, n, squeeze=False, layout="constrained",
                             figsize=(size * n + extra_width, 2 * size + extra_height))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def plot_maps_across_images(images, maps, labels=None, title=None, cmap="viridis", size=1.4):
    """Inputs (top row) and one channel's feature map for each (bottom row), one shared
    colour scale for the maps."""
    import matplotlib

    images = _display_images(images)
    maps = np.asarray(maps)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if maps.ndim != 3 or len(maps) != len(images) or not np.all(np.isfinite(maps)):
        raise ValueError(f"maps must be (N, h, w) with N = {len(images)} images; got shape {maps.shape}.")
    n = len(images)
    fig, axes = _two_row_figure(n, size, extra_width=1.2, extra_height=0.6)
    vmax = max(float(maps.max()), 1e-6)
    im = None
    for i in range(n):
        axes[0, i].imshow(images[i], cmap="gray", vmin=0, vmax=1)
        im = axes[1, i].imshow(maps[i], cmap=colormap(cmap), vmin=0, vmax=vmax)
        if labels is not None:
            axes[0, i].set_title(str(labels[i]), fontsize=8)
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
    if images.ndim < 3 or len(images) == 0:
        raise ValueError(f"plot_image_grid needs a batch of at least one image (N, H, W[, C]); got shape "
                         f"{images.shape}.")
    if (vmin, vmax) == (0.0, 1.0):      # the default grey scale: refuse images on another scale
        images = _display_images(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    n = len(images)
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles has {len(titles)} entries for {n} images.")
    _check_titles(title_colors, n, "title_colors")
    colormap(cmap)
    if not _is_int(ncols) or ncols < 1:
        raise ValueError(f"ncols must be a positive integer, got {ncols!r}.")
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    title_lines = max((str(t).count("\n") + 1 for t in titles), default=0) if titles is not None else 0
    row_height = size + 0.17 * title_lines
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, row_height * nrows + 0.5),
                             squeeze=False)
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


def plot_training_curves(history, title="Training curves"):
    """Loss and accuracy per epoch, training vs validation.

    ``history`` is a Keras ``History``, its ``.history`` dict, or the ``history``
    recorded in a shipped model's JSON (``model_info(name)["history"]``).
    """
    import matplotlib.pyplot as plt

    hist = getattr(history, "history", history)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "accuracy", "accuracy")):
        if metric not in hist:
            raise ValueError(f"history has no {metric!r}; it has {sorted(hist)}")
        epochs = np.arange(1, len(hist[metric]) + 1)
        ax.plot(epochs, hist[metric], "o-", label="training")
        if f"val_{metric}" in hist:
            ax.plot(epochs, hist[f"val_{metric}"], "s--", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label.capitalize())
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(cm, class_names, title="Confusion matrix", normalize=False):
    """A seaborn heatmap of a confusion matrix (rows: true class, columns: predicted)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    cm = np.asarray(cm)
    class_names = list(class_names)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.dtype.kind not in "iuf":
        raise ValueError(f"cm must be a square matrix of counts (true class x predicted class), e.g. "
                         f"sklearn.metrics.confusion_matrix(y_true, y_pred); got shape {cm.shape}.")
    if len(class_names) != len(cm):
        raise ValueError(f"class_names has {len(class_names)} names for a {len(cm)} x {len(cm)} matrix.")
    if not np.all(np.isfinite(cm)) or cm.min() < 0:
        raise ValueError("cm must hold non-negative finite counts.")
    rows = cm.sum(axis=1, keepdims=True)
    data = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0) if normalize else cm
    integer = not normalize and np.all(cm == np.round(cm))
    data = data.astype(int) if integer else data
    fig, ax = plt.subplots(figsize=(7.5, 6.2))
    sns.heatmap(
        data, annot=True, fmt="d" if integer else ".2f", cmap="Blues", square=True, ax=ax,
        xticklabels=class_names, yticklabels=class_names,
        cbar_kws={"label": "fraction of the true class" if normalize else "number of test images"},
        annot_kws={"fontsize": 7},
    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def overlay_heatmap(image, heatmap, alpha=0.4, cmap="jet"):
    """Blend a heatmap (H, W) in [0, 1] over an image for display.

    ``image`` is (H, W), (H, W, 1) or (H, W, 3) in [0, 1]; returns an RGB float32
    array (H, W, 3) in [0, 1]: ``(1 - alpha) * image + alpha * cmap(heatmap)``.
    """
    import matplotlib

    img = _display_images(image, "image")
    heat = np.asarray(heatmap, dtype=np.float32)
    if img.ndim == 4 and img.shape[0] == 1:
        img = img[0]
    if heat.ndim == 3 and heat.shape[0] == 1:
        heat = heat[0]
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3); got shape {np.shape(image)}.")
    if heat.ndim != 2 or heat.shape != img.shape[:2]:
        raise ValueError(f"heatmap must be (H, W) = {img.shape[:2]} like the image; got shape {np.shape(heatmap)}.")
    if not (np.all(np.isfinite(img)) and np.all(np.isfinite(heat))):
        raise ValueError("image and heatmap must not contain NaN or infinite values.")
    _check_unit_maps(heat, "heatmap")
    if not _is_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
    colored = colormap(cmap)(np.clip(heat, 0.0, 1.0))[..., :3].astype(np.float32)
    return np.clip((1.0 - alpha) * img + alpha * colored, 0.0, 1.0).astype(np.float32)


def _check_unit_maps(maps, name):
    """Maps drawn on the colour scale [0, 1] must lie in it (nothing silently clipped)."""
    m = np.asarray(maps, dtype=np.float64)
    if m.size and (m.min() < -1e-3 or m.max() > 1 + 1e-3):
        raise ValueError(f"{name} are drawn on the scale [0, 1] but hold values from {m.min():.4g} to "
                         f"{m.max():.4g}; scale them first with cnn_utils.normalize_maps(maps) (raw or signed "
                         "maps: plot_signed_attributions).")


def _check_titles(titles, n, name):
    if titles is not None and (isinstance(titles, str) or len(titles) != n):
        raise ValueError(f"{name} must be a list of {n} entries, one per image; got "
                         f"{titles!r}"[:200] + ".")


def plot_attribution_maps(images, maps, image_titles=None, overlay=True, alpha=0.5, cmap="jet",
                          title=None, size=1.6, transpose=False):
    """Each image beside its maps: ``maps`` is a dict method name -> (N, H, W).

    One row per image and one column per method (``transpose=True``: one column
    per image, one row per method). Maps are shown in [0, 1], overlaid on the
    image when ``overlay``, with one shared colour bar. Returns the Figure.
    """
    import matplotlib
    import matplotlib.pyplot as plt

    images = _display_images(images)
    if images.ndim == 3:
        images = images[..., None]
    if not isinstance(maps, dict) or not maps:
        raise ValueError("maps must be a non-empty dict: method name -> maps (N, H, W).")
    n = len(images)
    colormap(cmap)
    _check_titles(image_titles, n, "image_titles")
    for name, m in maps.items():
        if np.shape(m) != images.shape[:3]:
            raise ValueError(f"maps[{name!r}] has shape {np.shape(m)}; expected {images.shape[:3]}.")
        _check_unit_maps(m, f"maps[{name!r}]")
    names = list(maps)
    shape = (n, len(names) + 1) if not transpose else (len(names) + 1, n)
    fig, axes = plt.subplots(*shape, figsize=(size * shape[1] + 0.9, size * shape[0] + 0.5), squeeze=False)

    def ax_at(i, j):  # image i, column j (0 = the input)
        return axes[j, i] if transpose else axes[i, j]

    gray = images[..., 0] if images.shape[-1] == 1 else images
    for i in range(n):
        ax_at(i, 0).imshow(gray[i], cmap="gray", vmin=0, vmax=1)
        for j, name in enumerate(names, 1):
            m = np.asarray(maps[name][i], dtype=np.float32)
            if overlay:
                ax_at(i, j).imshow(overlay_heatmap(images[i], m, alpha=alpha, cmap=cmap))
            else:
                ax_at(i, j).imshow(m, cmap=cmap, vmin=0, vmax=1)
        for j in range(len(names) + 1):
            ax_at(i, j).set_xticks([])
            ax_at(i, j).set_yticks([])
        if image_titles is not None:
            if transpose:
                ax_at(i, 0).set_title(str(image_titles[i]), fontsize=8)
            else:
                ax_at(i, 0).set_ylabel(str(image_titles[i]), fontsize=8)
    for j, name in enumerate(["input"] + names):
        if transpose:
            ax_at(0, j).set_ylabel(name, fontsize=8)
        else:
            ax_at(0, j).set_title(name, fontsize=9)
    sm = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=colormap(cmap))
    height = fig.get_size_inches()[1]
    top_space = (0.55 if title else 0.1) + (0.3 if image_titles is not None and transpose else 0.25)
    fig.subplots_adjust(left=0.06, right=0.86, bottom=0.02, top=1 - top_space / height,
                        wspace=0.08, hspace=0.45 if transpose and image_titles is not None else 0.15)
    cbar = fig.colorbar(sm, ax=axes, fraction=0.025, pad=0.02)
    cbar.set_label("attribution (scaled per image)")
    if title:
        fig.suptitle(title, y=1 - 0.15 / height, va="top")
    return fig


def plot_signed_attributions(images, attributions, image_titles=None, title=None, size=1.8):
    """Signed attributions (e.g. Integrated Gradients) on a diverging red/blue map.

    ``attributions`` (N, H, W[, C]) are summed over channels; red pushes the class
    score up, blue down; each image uses a symmetric range around 0. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    images = _display_images(images)
    attr = np.asarray(attributions, dtype=np.float32)
    if not np.all(np.isfinite(attr)):
        raise ValueError("attributions contain NaN or infinite values.")
    if attr.ndim == 4:
        attr = attr.sum(axis=-1)
    if images.ndim == 4:
        images = images[..., 0] if images.shape[-1] == 1 else images.mean(axis=-1)
    if attr.shape != images.shape[:3]:
        raise ValueError(f"attributions have shape {attr.shape}; expected {images.shape[:3]} (one per image).")
    n = len(images)
    _check_titles(image_titles, n, "image_titles")
    fig, axes = plt.subplots(2, n, figsize=(size * n + 0.6, 2 * size + 0.6), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(images[i], cmap="gray", vmin=0, vmax=1)
        lim = float(np.abs(attr[i]).max()) or 1.0
        im = axes[1, i].imshow(attr[i], cmap="RdBu_r", vmin=-lim, vmax=lim)
        fig.colorbar(im, ax=axes[1, i], fraction=0.046, pad=0.04)
        if image_titles is not None:
            axes[0, i].set_title(str(image_titles[i]), fontsize=8)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("attribution\n(red +, blue -)")
    if title:
        fig.suptitle(title)
    return fig


def plot_probability_bars(images, probs, labels, class_names=None, title=None):
    """Each image above a bar chart of its class probabilities.

    The predicted class's bar is green when right and red when wrong; the true
    class's bar is outlined in black. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    p = _as_probs(probs)
    y = _as_labels(labels, len(p), p.shape[1])
    imgs = _display_images(images)
    if imgs.ndim == 4 and imgs.shape[-1] == 1:
        imgs = imgs[..., 0]
    if len(imgs) != len(p):
        raise ValueError(f"Got {len(imgs)} images but {len(p)} rows of probabilities.")
    k = p.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} names; probs has {k} classes.")
    n = len(p)
    fig, axes = plt.subplots(2, n, figsize=(2.1 * n, 4.4), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1.15]})
    for i in range(n):
        pred = int(p[i].argmax())
        ok = pred == y[i]
        axes[0, i].imshow(imgs[i], cmap="gray", vmin=0, vmax=1)
        axes[0, i].axis("off")
        axes[0, i].set_title(f"true {names[y[i]]}\npred {names[pred]} {'(right)' if ok else '(WRONG)'}",
                             fontsize=8, color="green" if ok else "red")
        colors = ["lightgray"] * k
        colors[pred] = "tab:green" if ok else "tab:red"
        bars = axes[1, i].bar(np.arange(k), p[i], color=colors)
        bars[y[i]].set_edgecolor("black")
        bars[y[i]].set_linewidth(1.5)
        axes[1, i].set_ylim(0, 1)
        axes[1, i].set_xticks(np.arange(k))
        axes[1, i].set_xticklabels(names, rotation=90, fontsize=7)
        axes[1, i].set_xlabel("class", fontsize=8)
        if i == 0:
            axes[1, i].set_ylabel("probability")
        else:
            axes[1, i].set_yticklabels([])
        axes[1, i].set_title(f"max p = {format_probability(p[i].max())}", fontsize=8)
    fig.suptitle(title or "Predicted class probabilities (black outline: true class)")
    fig.tight_layout()
    return fig


def plot_reliability_diagram(bins, titles=None, title=None):
    """Reliability diagram(s) from :func:`calibration_bins` dicts.

    ``bins`` is one dict or a list of them (e.g. before and after temperature
    scaling), one column each: top, accuracy per confidence bin against the
    diagonal of perfect calibration with the gap shaded and the ECE written in;
    bottom, how many predictions fall in each bin (log scale). Returns the Figure.
    """
    import matplotlib.pyplot as plt

    bins_list = [bins] if isinstance(bins, dict) else list(bins)
    needed = {"edges", "counts", "accuracy", "confidence", "gap", "weight", "n"}
    if not bins_list or any(not isinstance(b, dict) or not needed <= set(b) for b in bins_list):
        raise ValueError("bins must be what calibration_bins (or expected_calibration_error(..., return_bins=True)) "
                         "returns, or a list of those.")
    titles = list(titles) if titles is not None else [None] * len(bins_list)
    if len(titles) != len(bins_list):
        raise ValueError(f"Got {len(titles)} titles for {len(bins_list)} diagrams.")
    n = len(bins_list)
    fig, axes = plt.subplots(2, n, figsize=(4.6 * n, 6.2), squeeze=False, sharex=True,
                             gridspec_kw={"height_ratios": [3, 1.2]})
    for col, (b, t) in enumerate(zip(bins_list, titles)):
        edges = b["edges"]
        width = np.diff(edges)
        left = edges[:-1]
        has = b["counts"] > 0
        acc = np.where(has, b["accuracy"], 0.0)
        conf = np.where(has, b["confidence"], 0.0)
        ax = axes[0, col]
        ax.bar(left, acc, width=width, align="edge", color="tab:blue", edgecolor="black",
               linewidth=0.5, label="accuracy in bin")
        ax.bar(left[has], (conf - acc)[has], bottom=acc[has], width=width[has], align="edge",
               color="tab:red", alpha=0.35, hatch="//", edgecolor="tab:red", linewidth=0.5,
               label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ece = float(np.sum(b["weight"] * b["gap"]))
        ax.text(0.04, 0.93, f"ECE = {100 * ece:.2f} %\nn = {b['n']}", transform=ax.transAxes,
                va="top", fontsize=9, bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(t or "Reliability diagram")
        ax.legend(loc="lower right", fontsize=8)
        axc = axes[1, col]
        axc.bar(left, b["counts"], width=width, align="edge", color="gray", edgecolor="black",
                linewidth=0.5)
        if b["counts"].max() > 0:
            axc.set_yscale("log")
        axc.set_xlabel("confidence (largest probability)")
        axc.set_ylabel("predictions")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_histograms(samples, xlabel, title, bins=30, range=None, log=False):
    """Overlaid density histograms of several samples, e.g. confidence in and out of distribution.

    ``samples`` maps a legend label to a 1-D array. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    if not isinstance(samples, dict) or not samples:
        raise TypeError("samples must be a non-empty dict {label: 1-D array}.")
    arrays = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in samples.items()}
    for k, a in arrays.items():
        if a.size == 0 or not np.all(np.isfinite(a)):
            raise ValueError(f"samples[{k!r}] must be a non-empty array of finite numbers; got {a.size} values"
                             f"{'' if a.size == 0 else ' with NaN or infinite ones'}.")
    if not _is_int(bins) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}.")
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if range is None:
        lo = min(a.min() for a in arrays.values())
        hi = max(a.max() for a in arrays.values())
        range = (lo, hi if hi > lo else lo + 1)
    for label, a in arrays.items():
        ax.hist(a, bins=bins, range=range, density=True, alpha=0.55, label=f"{label} (n={len(a)})",
                log=log)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density (log scale)" if log else "density")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def spread_out_indices(points, n, seed=DEFAULT_SEED):
    """``n`` indices of ``points`` (N, 2) far apart from each other (greedy farthest-point)."""
    pts = _as_points(points, "points")
    if not _is_int(n) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}.")
    n = min(int(n), len(pts))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(pts)))]
    dist = np.linalg.norm(pts - pts[chosen[0]], axis=1)
    for _ in range(n - 1):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(pts - pts[nxt], axis=1))
    return np.array(chosen, dtype=np.int64)


def plot_embedding(embeddings, labels, class_names=None, images=None, n_thumbnails=0,
                   title=None, point_size=3, seed=DEFAULT_SEED, highlight=None):
    """Scatter 2-D embeddings coloured by class, one panel per embedding.

    ``embeddings`` is an (N, 2) array or a dict ``{panel title: (N, 2) array}``.
    With ``images`` (N, H, W[, 1]) and ``n_thumbnails``, that many images, spread
    over each map, are drawn at their points (framed in their class colour).
    ``highlight`` (indices) circles chosen points, e.g. outliers. Returns the Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    if not isinstance(embeddings, dict):
        embeddings = {"embedding": embeddings}
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0)):
        raise ValueError(f"labels must be class indices, non-negative integers (N,); got dtype {y.dtype}, "
                         f"shape {y.shape}.")
    if highlight is not None and len(highlight) and (np.min(highlight) < 0 or np.max(highlight) >= len(y)):
        raise ValueError(f"highlight holds indices of points, 0..{len(y) - 1}; got {list(highlight)[:10]}.")
    if images is not None and n_thumbnails and len(images) != len(y):
        raise ValueError(f"images has {len(images)} images for {len(y)} points; give one per point.")
    num_classes = int(y.max()) + 1 if len(y) else 1
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) < num_classes:
        raise ValueError(f"labels go up to {num_classes - 1} but only {len(names)} class names were given.")
    num_classes = len(names)  # every class in the legend, even one absent from this sample
    cmap = colormaps["tab10"]
    imgs = None
    if images is not None:
        imgs = np.asarray(images)
        if imgs.ndim == 4 and imgs.shape[-1] == 1:
            imgs = imgs[..., 0]
    n = len(embeddings)
    fig, axes = plt.subplots(1, n, figsize=(6.4 * n, 6.0), squeeze=False)
    for ax, (panel, emb) in zip(axes[0], embeddings.items()):
        e = _as_points(emb, "embedding")
        if e.shape != (len(y), 2):
            raise ValueError(f"embedding {panel!r} has shape {e.shape}, expected ({len(y)}, 2).")
        ax.scatter(e[:, 0], e[:, 1], c=cmap(y % 10), s=point_size, linewidths=0, alpha=0.8)
        if highlight is not None and len(highlight):
            h = np.asarray(highlight)
            ax.scatter(e[h, 0], e[h, 1], s=60, facecolors="none", edgecolors="black",
                       linewidths=1.2, label="highlighted")
        if imgs is not None and n_thumbnails:
            for i in spread_out_indices(e, n_thumbnails, seed=seed):
                box = AnnotationBbox(OffsetImage(imgs[i], cmap="gray_r", zoom=0.9), e[i],
                                     frameon=True, pad=0.1,
                                     bboxprops={"edgecolor": cmap(y[i] % 10), "linewidth": 1.5})
                ax.add_artist(box)
        ax.set_title(panel)
        ax.set_xlabel("dimension 1")
        ax.set_ylabel("dimension 2")
    handles = [Line2D([], [], marker="o", linestyle="", color=cmap(c % 10), label=names[c])
               for c in range(num_classes)]
    fig.legend(handles=handles, loc="center right", title="class", fontsize=8, markerscale=1.2)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.9 if n > 1 else 0.82, 1))
    return fig


# --- PyTorch / VGG16 figures (notebook 07) ---

def plot_top_predictions(images, predictions, titles=None, title="Top-5 predictions"):
    """Each photo (uint8 H x W x 3) beside a bar chart of its (class, probability) list.

    The axis runs from 0 to 100 % unless every probability is below 20 %: then it is scaled
    to the largest one (and says so), so near-uniform predictions stay visible. Labels are
    ``format_probability`` with 3 decimals when every probability is below 1 %.
    """
    import matplotlib.pyplot as plt

    n = len(images)
    if n == 0 or n != len(predictions):
        raise ValueError(f"Need as many prediction lists as images (got {n} images, "
                         f"{len(predictions)} prediction lists, at least one).")
    images = [_display_images(img, "images") for img in images]
    for preds in predictions:
        if not all(isinstance(p, (tuple, list)) and len(p) == 2 and _is_number(p[1]) for p in preds):
            raise ValueError("predictions must be lists of (class name, probability) pairs, as "
                             f"top_k_predictions returns; got {preds!r}"[:200] + ".")
    fig, axes = plt.subplots(n, 2, figsize=(9, 2.4 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.2]})
    largest = max(float(p) for preds in predictions for _, p in preds)
    xmax = 100.0 if largest >= 0.2 else 150 * largest or 1.0
    decimals = 1 if largest >= 0.01 else 3
    for i, (img, preds) in enumerate(zip(images, predictions)):
        axes[i, 0].imshow(img)
        axes[i, 0].axis("off")
        if titles is not None:
            axes[i, 0].set_title(str(titles[i]), fontsize=9)
        names = [name for name, _ in preds][::-1]
        probs = [100 * p for _, p in preds][::-1]
        axes[i, 1].barh(range(len(names)), probs, color="tab:blue")
        axes[i, 1].set_yticks(range(len(names)), names, fontsize=8)
        axes[i, 1].set_xlim(0, xmax)
        axes[i, 1].set_xlabel("probability (%)" if xmax == 100 else "probability (%; axis scaled to the largest)")
        for y, (_, p) in enumerate(preds[::-1]):
            axes[i, 1].text(min(100 * p + 0.01 * xmax, 0.88 * xmax), y, format_probability(p, decimals),
                            va="center", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_rgb_filters(weights, ncols=16, title="First-layer filters as RGB images", size=0.7):
    """First-layer conv filters (F, 3, k, k) as small RGB images.

    Each filter is scaled to its own min..max, so the colours show the pattern a
    filter looks for, not its strength (RGB images need no colour bar).
    """
    import matplotlib.pyplot as plt

    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"Expected weights (F, 3, k, k) of a layer that sees RGB, got shape {w.shape}.")
    rgb = _min_max_scaled(w, (1, 2, 3))[0].transpose(0, 2, 3, 1)
    n = len(rgb)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(rgb[i], interpolation="nearest")
            ax.set_title(str(i), fontsize=6)
    fig.suptitle(f"{title}\n(each filter scaled to its own range)", fontsize=10)
    fig.tight_layout()
    return fig


def _strongest_channels(maps, n):
    return list(np.argsort(maps.reshape(len(maps), -1).mean(axis=1))[::-1][:n])


def plot_strongest_channels(maps, channels=None, n=16, ncols=8, layer_name="layer", cmap="viridis", size=1.3):
    """The ``n`` channels with the largest mean activation (or the given ``channels``) of one
    image's feature maps (C, H, W), PyTorch's layout, on one colour scale
    (``plot_all_channels`` draws them)."""
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"Expected feature maps (C, H, W), got shape {maps.shape}.")
    if maps.shape[0] == maps.shape[1] != maps.shape[2]:
        raise ValueError(f"Feature maps of shape {maps.shape} look like (H, W, C), the Keras layout; this "
                         "function takes PyTorch's (C, H, W): pass np.moveaxis(maps, -1, 0).")
    channels = _strongest_channels(maps, n) if channels is None else list(np.atleast_1d(channels))
    if not channels or any(not _is_int(c) or not 0 <= c < len(maps)
                           for c in channels):
        raise ValueError(f"channels must be indices from 0 to {len(maps) - 1}; got {channels}.")
    return plot_all_channels(
        np.moveaxis(maps[channels], 0, -1), ncols=ncols, cmap=cmap, size=size,
        labels=[f"channel {c}" for c in channels],
        title=f"{layer_name}: {len(channels)} of {len(maps)} channels, "
              f"{maps.shape[1]} x {maps.shape[2]} each")


def plot_feature_maps_by_depth(maps_by_layer, n=6, cmap="viridis", size=1.4):
    """One row per layer (``{name: (C, H, W)}``): its ``n`` strongest channels, each row on
    its own colour scale with its colour bar, so the maps shrink and sparsify with depth."""
    import matplotlib.pyplot as plt

    if not isinstance(maps_by_layer, dict) or not maps_by_layer:
        raise TypeError("maps_by_layer must be a non-empty dict {layer name: (C, H, W) array}.")
    names = list(maps_by_layer)
    bad = {k: np.shape(v) for k, v in maps_by_layer.items() if np.ndim(v) != 3}
    if bad:
        raise ValueError(f"maps_by_layer must hold feature maps (C, H, W); got shapes {bad}.")
    fig, axes = plt.subplots(len(names), n, figsize=(size * n + 1.2, size * len(names) + 0.6), squeeze=False)
    for row, name in enumerate(names):
        maps = np.asarray(maps_by_layer[name])
        channels = _strongest_channels(maps, n)
        vmax = float(maps[channels].max()) or 1.0
        im = None
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(channels):
                im = ax.imshow(maps[channels[col]], cmap=colormap(cmap), vmin=0, vmax=vmax)
                ax.set_title(f"ch {channels[col]}", fontsize=7)
        axes[row, 0].set_ylabel(f"{name}\n{maps.shape[1]}x{maps.shape[2]}x{maps.shape[0]}", fontsize=8)
        zero = 100 * float(np.mean(maps <= 0))
        axes[row, -1].text(1.05, 0.5, f"{zero:.0f}% zero", transform=axes[row, -1].transAxes,
                           fontsize=7, va="center")
        fig.colorbar(im, ax=axes[row].tolist(), shrink=0.9, pad=0.08)
    fig.suptitle("Feature maps by depth (strongest channels; rows: H x W x C)")
    return fig


def plot_inversion(result, original=None, title=None):
    """A feature inversion's progress: snapshots at regular steps and the loss curves."""
    import matplotlib.pyplot as plt

    needed = {"snapshots", "snapshot_steps", "loss", "feature_loss", "layer_name", "layer_index"}
    if not isinstance(result, dict) or not needed <= set(result):
        raise ValueError("result must be what feature_inversion returns (a dict with "
                         f"{', '.join(sorted(needed))}).")
    snaps = result["snapshots"]
    extra = 1 if original is not None else 0
    ncols = len(snaps) + extra + 1
    fig, axes = plt.subplots(1, ncols, figsize=(1.6 * ncols + 1.5, 2.4),
                             gridspec_kw={"width_ratios": [1] * (ncols - 1) + [1.8]})
    if original is not None:
        axes[0].imshow(original)
        axes[0].set_title("original", fontsize=8)
    for ax, img, step in zip(axes[extra:], snaps, result["snapshot_steps"]):
        ax.imshow(img)
        ax.set_title(f"step {step}", fontsize=8)
    for ax in axes[:-1]:
        ax.axis("off")
    ax = axes[-1]
    steps = np.arange(1, len(result["loss"]) + 1)
    ax.semilogy(steps, result["loss"], label="total")
    ax.semilogy(steps, result["feature_loss"], label="feature (relative)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (log scale)")
    ax.legend(fontsize=7)
    fig.suptitle(title or f"Inverting {result['layer_name']} (features[{result['layer_index']}])")
    fig.tight_layout()
    return fig


def plot_reconstructions(original, results, scores=None, title="What each depth keeps"):
    """The original beside reconstructions from several layers; ``scores`` are (SSIM, PSNR)."""
    import matplotlib.pyplot as plt

    if not results or any(not isinstance(r, dict) or not {"image", "layer_name"} <= set(r) for r in results):
        raise ValueError("results must be a non-empty list of feature_inversion results (dicts with 'image' "
                         "and 'layer_name').")
    if scores is not None and len(scores) != len(results):
        raise ValueError(f"scores needs one (SSIM, PSNR) pair per result: {len(results)}, got {len(scores)}.")
    n = len(results) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.9), layout="constrained")  # room for the suptitle
    axes[0].imshow(original)
    axes[0].set_title("original", fontsize=9)
    for i, res in enumerate(results):
        axes[i + 1].imshow(res["image"])
        label = res["layer_name"]
        if scores is not None:
            label += f"\nSSIM {scores[i][0]:.2f}, PSNR {scores[i][1]:.1f} dB"
        axes[i + 1].set_title(label, fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    return fig


def plot_quality_vs_depth(layer_names, ssim, psnr, title="How much of the image each depth keeps"):
    """SSIM (left axis) and PSNR (right axis) of the reconstructions against depth."""
    import matplotlib.pyplot as plt

    if not len(layer_names) == len(ssim) == len(psnr) or not len(layer_names):
        raise ValueError(f"layer_names, ssim and psnr need one entry per layer; got {len(layer_names)}, "
                         f"{len(ssim)} and {len(psnr)}.")
    x = np.arange(len(layer_names))
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.plot(x, ssim, "o-", color="tab:blue", label="SSIM")
    ax.set_ylabel("SSIM (1 = identical)", color="tab:blue")
    ax.set_ylim(min(0.0, float(np.min(ssim)) - 0.05), 1.0)
    ax.set_xticks(x, layer_names)
    ax.set_xlabel("layer inverted (deeper to the right)")
    ax2 = ax.twinx()
    ax2.plot(x, psnr, "s--", color="tab:red", label="PSNR")
    ax2.set_ylabel("PSNR (dB)", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_saliency(image, saliency, title="Gradient saliency", cmap="hot"):
    """A photo (uint8 H x W x 3), its saliency map (H, W) with a colour bar, and an overlay."""
    import matplotlib.pyplot as plt

    sal = np.asarray(saliency, dtype=np.float64)
    if sal.shape != np.asarray(image).shape[:2]:
        raise ValueError(f"saliency {sal.shape} must match the image's H x W {np.asarray(image).shape[:2]}.")
    if not np.all(np.isfinite(sal)):
        raise ValueError("saliency contains NaN or infinite values.")
    image = _display_images(image, "image")
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=9)
    im = axes[1].imshow(sal, cmap=colormap(cmap))
    axes[1].set_title("|d score / d pixel| (max over RGB)", fontsize=9)
    fig.colorbar(im, ax=axes[1], shrink=0.85, label="gradient magnitude")
    axes[2].imshow(image)
    axes[2].imshow(sal / (sal.max() or 1.0), cmap=colormap(cmap), alpha=0.55)
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_units_with_crops(images, crops, titles, title="Feature visualization", size=1.5):
    """One row per unit: its synthesised image (from ``vgg_feature_visualization``) beside
    the photo patches that drive it hardest (``top_activating_crops``).

    ``images``: (K, H, W, 3) in [0, 1]; ``crops``: K lists of dicts with ``crop``, ``photo``
    and ``value``; ``titles``: K row labels. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    images = np.asarray(images, dtype=np.float32)
    if len(images) != len(crops) or len(images) != len(titles):
        raise ValueError(f"images, crops and titles must have one entry per unit; got {len(images)}, "
                         f"{len(crops)} and {len(titles)}.")
    ncols = 1 + max((len(c) for c in crops), default=0)
    fig, axes = plt.subplots(len(images), ncols, figsize=(size * ncols + 0.4, size * len(images) + 0.6),
                             squeeze=False)
    for i, (img, row) in enumerate(zip(images, crops)):
        axes[i, 0].imshow(np.clip(img, 0, 1))
        axes[i, 0].set_ylabel(str(titles[i]), fontsize=8)
        for j in range(1, ncols):
            if j - 1 < len(row):
                axes[i, j].imshow(np.clip(row[j - 1]["crop"], 0, 1))
                axes[i, j].set_title(f"{row[j - 1]['photo']}: {row[j - 1]['value']:.3g}", fontsize=7)
            else:
                axes[i, j].axis("off")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("synthesised", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def colormap(name):
    """A matplotlib colormap by name (the current ``matplotlib.colormaps`` registry)."""
    import difflib

    import matplotlib

    if not isinstance(name, str) or name not in matplotlib.colormaps:
        close = difflib.get_close_matches(str(name), list(matplotlib.colormaps), n=3)
        raise ValueError(f"Unknown colour map {name!r}; use a name of matplotlib.colormaps, e.g. "
                         f"{', '.join(close or ['viridis', 'gray', 'jet'])}.")
    return matplotlib.colormaps[name]


def plot_dataset_examples(synthetic, examples, values, labels, synthetic_values=None, crop=0,
                          size=1.2, title=None):
    """One row per filter or class: its activation-maximization image (deprocessed), then
    the real images that excite it most, each titled with its response.

    ``synthetic`` (F, H, W, 1) raw optimised images; ``examples`` (F, k, H, W, 1) images in
    [0, 1]; ``values`` (F, k) their responses; ``labels`` F row names;
    ``synthetic_values`` (F,) the synthetic images' responses (optional).
    """
    import matplotlib.pyplot as plt

    examples = np.asarray(examples)
    values = np.asarray(values)
    n, k = examples.shape[:2]
    if len(synthetic) != n or values.shape != (n, k) or len(labels) != n:
        raise ValueError(f"synthetic ({len(synthetic)}), examples {examples.shape[:2]}, values "
                         f"{values.shape} and labels ({len(labels)}) must describe the same rows.")
    shown = deprocess_image(synthetic, crop=crop)
    fig, axes = plt.subplots(n, k + 1, squeeze=False, layout="constrained",
                             figsize=(size * (k + 1) + 1.6, size * n + 0.8))
    im_syn = im_real = None
    for r in range(n):
        ax = axes[r, 0]
        im_syn = ax.imshow(shown[r, ..., 0], cmap="gray", vmin=0, vmax=255)
        extra = "" if synthetic_values is None else f"\nresponse {synthetic_values[r]:.2f}"
        ax.set_title(f"synthetic{extra}", fontsize=7, color="tab:blue")
        ax.set_ylabel(str(labels[r]), fontsize=8)
        for c in range(k):
            im_real = axes[r, c + 1].imshow(examples[r, c, ..., 0], cmap="gray", vmin=0, vmax=1)
            axes[r, c + 1].set_title(f"{values[r, c]:.2f}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im_syn, ax=axes[:, 0], shrink=0.6, location="left", pad=0.08,
                 label="synthetic, deprocessed")
    fig.colorbar(im_real, ax=axes[:, 1:], shrink=0.6, label="pixel value (test images)")
    fig.suptitle(title or f"Synthetic image and the {k} test images with the largest response")
    return fig


def plot_raw_and_deprocessed(images, labels, title=None, size=1.8, crop=0):
    """Optimised images (K, H, W, 1) twice: top row raw, on ONE shared grey scale (so a
    regularizer that shrinks the image shows as fainter); bottom row each image
    deprocessed on its own (``deprocess_image``: the pattern, whatever its size)."""

    raw = np.asarray(images, dtype=np.float32)
    if raw.ndim != 4 or raw.shape[-1] != 1 or len(labels) != len(raw):
        raise ValueError(f"images must be (K, H, W, 1) with one label each; got {raw.shape} "
                         f"and {len(labels)} labels.")
    if not _is_int(crop) or crop < 0 \
            or 2 * crop >= min(raw.shape[1:3]):
        raise ValueError(f"crop must be an integer >= 0 that leaves part of the {raw.shape[1]}x{raw.shape[2]} "
                         f"images; got {crop!r}.")
    if crop:
        raw = raw[:, crop:-crop, crop:-crop]
    n = len(raw)
    lim = float(np.abs(raw).max()) or 1.0
    shown = deprocess_image(raw)
    fig, axes = _two_row_figure(n, size, extra_width=1.5, extra_height=0.7)
    for i in range(n):
        im_raw = axes[0, i].imshow(raw[i, ..., 0], cmap="gray", vmin=-lim, vmax=lim)
        im_dep = axes[1, i].imshow(shown[i, ..., 0], cmap="gray", vmin=0, vmax=255)
        axes[0, i].set_title(str(labels[i]), fontsize=9)
    axes[0, 0].set_ylabel("raw, shared scale", fontsize=8)
    axes[1, 0].set_ylabel("each standardised", fontsize=8)
    fig.colorbar(im_raw, ax=axes[0, :], shrink=0.9, label="pixel value")
    fig.colorbar(im_dep, ax=axes[1, :], shrink=0.9, label="deprocessed")
    fig.suptitle(title or "Optimised images: raw and deprocessed")
    return fig


# ---------------------------------------------------------------------------
# Widgets
# ---------------------------------------------------------------------------

def explorer_methods(samples=32):
    """The explorer's methods: name -> ``f(model, x, class_index, layer) -> (N, H, W)``.

    Each returns maps in [0, 1] at input resolution, computed by the course's own
    functions (Keras or PyTorch model alike), so what the explorer shows is exactly what
    those functions return. ``samples``: SmoothGrad's noisy copies and Integrated
    Gradients' steps (each one gradient pass).
    """
    return {
        "Saliency": lambda m, x, c, l: saliency_map(m, x, class_index=c),
        "SmoothGrad": lambda m, x, c, l: smoothgrad(m, x, class_index=c, samples=samples, seed=0),
        "Integrated Gradients": lambda m, x, c, l: normalize_maps(
            np.abs(integrated_gradients(m, x, class_index=c, steps=samples)).sum(axis=-1)),
        "Grad-CAM": lambda m, x, c, l: grad_cam(m, x, class_index=c, layer=l),
        "Grad-CAM++": lambda m, x, c, l: grad_cam_plus_plus(m, x, class_index=c, layer=l),
        "Score-CAM": lambda m, x, c, l: score_cam(m, x, class_index=c, layer=l),
    }


ACTIVATIONS_METHOD = "Layer activations"

#: Most feature maps the explorer tiles at once (the strongest ones of a wider layer).
_MAX_TILED_CHANNELS = 64


def _png(rgb_or_gray, scale=1):
    """Encode an image array (H, W[, 3]) in [0, 1] as PNG bytes, enlarged by ``scale``."""
    from io import BytesIO

    from PIL import Image

    arr = np.clip(np.asarray(rgb_or_gray, dtype=np.float32), 0, 1)
    img = Image.fromarray((arr * 255).round().astype(np.uint8))
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _tile_channels(maps, ncols=8):
    """(H, W, C) feature maps -> one (rows*H, ncols*W) mosaic scaled to [0, 1], 1-px gaps."""
    h, w, c = maps.shape
    nrows = int(np.ceil(c / ncols))
    mosaic = np.ones((nrows * (h + 1) - 1, ncols * (w + 1) - 1), np.float32) * np.nan
    top = maps.max()
    for k in range(c):
        r, q = divmod(k, ncols)
        mosaic[r * (h + 1): r * (h + 1) + h, q * (w + 1): q * (w + 1) + w] = maps[..., k] / top if top > 0 else 0
    return mosaic


def _mosaic_png(mosaic, width):
    """A ``_tile_channels`` mosaic in viridis (gaps white) as PNG, about ``width`` px wide."""
    import matplotlib

    rgb = matplotlib.colormaps["viridis"](np.nan_to_num(mosaic, nan=1.0))[..., :3]
    rgb[np.isnan(mosaic)] = 1.0
    return _png(rgb, max(1, width // rgb.shape[1]))


def _outputs_probabilities(model, scores):
    """Does ``model`` output probabilities (a softmax layer last) rather than logits?

    Structural test first (a Keras ``Softmax`` layer or ``activation="softmax"``; a
    PyTorch ``nn.Softmax`` last), then the numbers: non-negative rows summing to 1.
    """
    if _is_torch_module(model):
        torch = sys.modules["torch"]
        last = list(model.modules())[-1]
        if isinstance(last, torch.nn.Softmax):
            return True
    else:
        keras = _keras()
        last = model.layers[-1]
        if isinstance(last, keras.layers.Softmax) or getattr(
                getattr(last, "activation", None), "__name__", "") == "softmax":
            return True
    s = np.asarray(scores, dtype=np.float64)
    return bool(s.size and s.min() >= 0 and np.allclose(s.sum(axis=1), 1.0, atol=1e-4))


def class_probabilities(model, images, batch_size=None):
    """Class probabilities of a Keras or PyTorch model, whatever its last layer outputs.

    A model that ends in a softmax gives probabilities as they are; a model that outputs
    logits (VGG16, a Keras model without a final softmax) gets ``softmax(logits)``; a
    model with one output unit (binary) gets ``[1 - p, p]`` (``p`` its sigmoid output, or
    the sigmoid of its logit). ``images``: (N, H, W, C) in the model's input range
    (uint8 mapped onto it). Returns ``(probs (N, K), "probabilities" or "logits")``: the
    second says what the model output.
    """
    batch_size = None if batch_size is None else _check_batch_size(batch_size)
    if _is_torch_module(model):
        torch = sys.modules["torch"]
        engine = _TorchEngine(model, "logits")
        x = engine.images(images)
        outs = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size or 8):
                outs.append(engine._call(engine._tensor(x[i: i + (batch_size or 8)]), raw=True).float().cpu().numpy())
        scores = np.concatenate(outs)
        sigmoid_last = isinstance(list(model.modules())[-1], torch.nn.Sigmoid)
    else:
        x = as_image_batch(images, model)
        _check_keras_model(model)
        scores = np.asarray(model.predict(x, batch_size=batch_size or 1000, verbose=0), dtype=np.float64)
        sigmoid_last = _keras_output_activation(model) == "sigmoid"
    if scores.ndim != 2:
        raise ValueError(f"The model's output has shape {scores.shape}; expected class scores (N, classes).")
    scores = scores.astype(np.float64)
    if scores.shape[1] == 1:  # binary: one unit, the positive class
        p = scores[:, 0] if sigmoid_last else 1.0 / (1.0 + np.exp(-scores[:, 0]))
        return np.stack([1.0 - p, p], axis=1), "probabilities" if sigmoid_last else "logits"
    if _outputs_probabilities(model, scores):
        return scores, "probabilities"
    return softmax(scores), "logits"


def _probability_bars_html(probs, class_names, predicted, true_label=None, top_k=None, source="logits"):
    """Bars for the ``top_k`` most probable classes (all, in class order, when they fit)."""
    order = (np.arange(len(probs)) if top_k is None or top_k >= len(probs)
             else np.argsort(probs)[::-1][:top_k])
    rows = []
    for k in order:
        p = float(probs[k])
        colour = "#2a7ab9" if k != predicted else (
            "#2e8b57" if true_label is None or k == true_label else "#c0392b")
        mark = " ✔ true" if true_label is not None and k == true_label else ""
        rows.append(
            f"<tr><td style='text-align:right;padding-right:6px'>{class_names[k]}</td>"
            f"<td style='width:180px'><div style='background:{colour};height:12px;"
            f"width:{max(p, 0.004) * 100:.1f}%'></div></td>"
            f"<td style='padding-left:6px'>{format_probability(p)}{mark}</td></tr>"
        )
    what = "softmax of the logits" if source == "logits" else "the model's softmax output"
    head = f"top {len(order)} of {len(probs)}" if len(order) < len(probs) else "all classes"
    return (f"<b>Class probabilities</b> ({what}; {head})<table style='font-size:12px;border-collapse:collapse'>"
            + "".join(rows) + "</table>")


def _widget_app(rows, controls, refresh_body, css_class=None):
    """The scaffold both explorers share: controls, a status line, a body of panels.

    ``refresh_body()`` draws everything for the current control values and returns the
    dict stored as ``app.last``; its errors are caught and shown in the status line
    (with ``app.last = {"error": ...}``), never lost in a log. Changes made to controls
    while drawing do not trigger a second refresh. Returns the ``ipywidgets.VBox`` with
    ``controls``, ``status``, ``last`` and ``refresh()``; every control refreshes it.
    """
    import time

    import ipywidgets as widgets

    status = widgets.HTML()
    box = widgets.VBox(rows(status))
    if css_class:
        box.add_class(css_class)
    busy = []

    def refresh(*_):
        if busy:  # a control changed by the drawing code itself
            return
        busy.append(True)
        start = time.perf_counter()
        try:
            last = refresh_body()
            seconds = time.perf_counter() - start
            last["seconds"] = seconds
            box.last = last
            note = last.pop("note", "")
            status.value = (f"<span style='color:#2e8b57'>✔ {last.get('method', 'updated')} in "
                            f"{seconds * 1000:.0f} ms{'; ' + note if note else ''}</span>")
        except Exception as err:  # shown in the app, not lost in a log
            box.last = {"error": err, "method": getattr(controls.get("method"), "value", None)}
            status.value = (f"<span style='color:#c0392b'><b>{type(err).__name__}:</b> "
                            f"{str(err)[:400]}</span>")
        finally:
            busy.clear()

    box.controls = controls
    box.status = status
    box.refresh = refresh
    box.last = {}
    for control in controls.values():
        control.observe(refresh, names="value")
    return box


def _colorbar_note_html(cmap):
    """What the explorer's colour scale means: attribution maps (jet) or feature maps (viridis)."""
    low, what, high = (("0 = least", "importance", "1 = most") if cmap == "jet" else
                       ("0 = off", "activation", "1 = largest shown"))
    return ("<div style='display:flex;justify-content:space-between;font-size:11px'>"
            f"<span>{low}</span><span>{what}</span><span>{high}</span></div>")


def _colorbar_css(cmap, width):
    """The colour scale as an HTML strip (a CSS gradient: no image, no script)."""
    import matplotlib

    stops = ", ".join(matplotlib.colors.to_hex(matplotlib.colormaps[cmap](t)) for t in np.linspace(0, 1, 9))
    return (f"<div style='width:{width};height:10px;background:linear-gradient(to right, {stops})'></div>"
            + _colorbar_note_html(cmap))


def explorer(model, images, labels=None, class_names=None, *, scale=None, top_k=10, samples=None,
             layers=None):
    """An interactive explorer for a live demo: pick an image, a method, a class, a layer.

    Works on the course's Keras CNN and on a PyTorch model such as ``load_vgg16()``
    (``images`` (N, H, W, C) in the model's input range, [0, 1] for both; photos from
    ``sample_photos``/``load_photo``). Shows the image, the method's heatmap (or the
    chosen layer's feature maps), the overlay and the class probabilities (a softmax of
    the logits, or the model's own softmax output: ``class_probabilities``), and updates
    on every change. The target class list holds the image's ``top_k`` classes (tick
    "all classes" for the rest). ``labels`` (optional) are the true classes;
    ``samples`` SmoothGrad's copies and IG's steps (default 32 for small inputs, 8 for
    photos); ``layers`` the layer choice (default: every conv and pooling layer).
    Heatmaps are cached, so going back to a view (or changing the opacity) costs nothing.

    Returns an ``ipywidgets.VBox`` with, for programmatic use, ``controls`` (dict of the
    control widgets), ``images``, ``status``, ``last`` (what was shown last: method,
    index, class, layer, heatmap, seconds) and ``refresh()``.
    """
    import ipywidgets as widgets
    import matplotlib

    torch_model = _is_torch_module(model)
    # the model's declared input range for both frameworks (uint8 mapped onto it)
    x_all = _TorchEngine(model, "logits").images(images) if torch_model else as_image_batch(images, model)
    probs_all, source = class_probabilities(model, x_all)
    n_classes = probs_all.shape[1]
    if labels is not None:
        labels = _as_labels(labels, len(x_all), n_classes)
    if class_names is None:
        class_names = getattr(model, "class_names", None) or [str(i) for i in range(n_classes)]
    if isinstance(class_names, str):
        raise TypeError("class_names must be a list of names, one per class, not one string.")
    class_names = list(class_names)
    if len(class_names) != n_classes:
        raise ValueError(f"class_names has {len(class_names)} names; the model has {n_classes} classes.")
    for name, value in (("top_k", top_k), ("scale", 1 if scale is None else scale)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    top_k = min(int(top_k), n_classes)
    pred_all = probs_all.argmax(axis=1)
    wrong = np.flatnonzero(pred_all != labels) if labels is not None else np.array([], int)
    if samples is None:
        samples = 32 if x_all.shape[1] * x_all.shape[2] <= 64 * 64 else 8
    methods = explorer_methods(samples=samples)
    if layers is None:
        if torch_model:
            layers = (vgg_layer_names(model) if hasattr(model, "features") else
                      [n for n, m in model.named_modules() if type(m).__name__ in ("Conv2d", "MaxPool2d")])
        else:
            layers = conv_and_pool_layer_names(model)
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        raise ValueError("layers is empty: name at least one layer for the layer choice, or pass None.")
    for name in layers:  # unknown names are refused now, not on the first click
        _TorchEngine(model, "logits").resolve_layer(name, x_all) if torch_model else get_layer(model, name)
    if torch_model:
        default_layer = next((n for n in reversed(layers) if n.startswith("relu")), layers[-1])
    else:
        last = last_conv_layer_name(model)
        default_layer = last if last in layers else layers[-1]
    if scale is None:
        scale = max(1, 224 // x_all.shape[2])
    jet = matplotlib.colormaps["jet"]
    random_weights = torch_model and getattr(model, "pretrained", True) is False
    cache, state = {}, {"only_misclassified": False}

    style = {"description_width": "110px"}
    layout = widgets.Layout(width="360px")
    c_index = widgets.IntSlider(0, 0, len(x_all) - 1, description="image", style=style, layout=layout,
                                continuous_update=False)
    c_wrong = widgets.Checkbox(False, description=f"only misclassified ({len(wrong)})",
                               disabled=len(wrong) == 0, style=style)
    c_method = widgets.Dropdown(options=list(methods) + [ACTIVATIONS_METHOD], value="Grad-CAM",
                                description="method", style=style, layout=layout)
    c_class = widgets.Dropdown(options=[("predicted", -1)], value=-1, description="target class",
                               style=style, layout=layout)
    c_all = widgets.Checkbox(False, description=f"all {n_classes} classes", style=style,
                             disabled=top_k >= n_classes)
    c_layer = widgets.Dropdown(options=layers, value=default_layer, description="layer", style=style,
                               layout=layout)
    c_alpha = widgets.FloatSlider(0.4, min=0.0, max=1.0, step=0.05, description="overlay opacity",
                                  style=style, layout=layout, continuous_update=False)
    caption = widgets.HTML()
    size = f"{x_all.shape[2] * scale}px"
    w_image = widgets.Image(format="png", layout=widgets.Layout(width=size))
    w_heat = widgets.Image(format="png", layout=widgets.Layout(width=size))
    w_overlay = widgets.Image(format="png", layout=widgets.Layout(width=size))
    w_heat.add_class("explorer-heatmap")
    w_image.add_class("explorer-image")
    # the colour scale under the heatmap: jet for attribution maps, viridis for feature maps
    bars = {name: _png(np.repeat(matplotlib.colormaps[name](np.linspace(0, 1, 256))[None, :, :3], 10, axis=0))
            for name in ("jet", "viridis")}
    w_colorbar = widgets.Image(value=bars["jet"], format="png", layout=widgets.Layout(width=size, height="10px"))
    colorbar_note = widgets.HTML()
    probs_html = widgets.HTML()
    heat_title = widgets.HTML()

    def pool():
        return wrong if c_wrong.value and len(wrong) else np.arange(len(x_all))

    def class_options(idx):
        ranked = np.argsort(probs_all[idx])[::-1]
        shown = list(ranked if c_all.value else ranked[:top_k])
        if c_class.value not in (-1, *shown):
            shown.append(int(c_class.value))  # keep the chosen class on the list
        rank = {int(k): r for r, k in enumerate(ranked)}
        return [("predicted", -1)] + [(f"#{rank[int(k)] + 1} {class_names[k]} ({format_probability(probs_all[idx, k])})",
                                       int(k)) for k in shown]

    def draw():
        if c_wrong.value != state["only_misclassified"]:  # a new pool of images: start at its first
            state["only_misclassified"] = c_wrong.value
            c_index.value = 0
            c_index.max = len(pool()) - 1
        idx = int(pool()[min(c_index.value, len(pool()) - 1)])
        options = class_options(idx)
        if list(c_class.options) != options:
            value = c_class.value
            c_class.options = options
            c_class.value = value
        method = c_method.value
        target = int(pred_all[idx]) if c_class.value == -1 else int(c_class.value)
        x = x_all[idx: idx + 1]
        image = x[0, ..., 0] if x.shape[-1] == 1 else x[0]
        gray = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
        w_image.value = _png(gray, scale)
        true = None if labels is None else labels[idx]
        probs_html.value = _probability_bars_html(probs_all[idx], class_names, pred_all[idx], true,
                                                  top_k=top_k, source=source)
        p = probs_all[idx, pred_all[idx]]
        if labels is None:
            caption.value = f"image #{idx}: predicted <b>{class_names[pred_all[idx]]}</b> ({format_probability(p)})"
        else:
            ok = "✔ correct" if pred_all[idx] == labels[idx] else "✘ wrong"
            caption.value = (f"test image #{idx}: true <b>{class_names[labels[idx]]}</b>, predicted "
                             f"<b>{class_names[pred_all[idx]]}</b> ({format_probability(p)}) {ok}")
        if random_weights:
            caption.value += " <b style='color:#c0392b'>RANDOM weights: predictions are meaningless</b>"
        heat_title.value = f"<b>{method}: not shown (see the status line)</b>"
        key = (idx, method, target, c_layer.value)
        if key not in cache:
            if method == ACTIVATIONS_METHOD:
                if torch_model and c_layer.value in _vgg_alias_names(model):
                    maps = np.transpose(vgg_layer_activations(model, x, c_layer.value)[0], (1, 2, 0))
                elif torch_model:  # any other PyTorch module: its feature maps through a hook
                    engine = _TorchEngine(model, "logits")
                    maps = engine.features(x, engine.resolve_layer(c_layer.value, x))[0][0]
                else:
                    maps = get_activations(model, x, [c_layer.value])[c_layer.value][0]
                keep = np.sort(np.argsort(maps.mean(axis=(0, 1)))[::-1][:_MAX_TILED_CHANNELS])
                cache[key] = (_tile_channels(maps[..., keep]), maps.shape[-1], len(keep))
            else:
                cache[key] = methods[method](model, x, target, c_layer.value)[0]
        heat = cache[key]
        weights_note = " — RANDOM weights" if random_weights else ""
        if method == ACTIVATIONS_METHOD:
            heat, n_maps, n_shown = heat
            w_heat.value = _mosaic_png(heat, x.shape[2] * scale)
            overlay = gray
            shown = f"the {n_shown} strongest of {n_maps}" if n_shown < n_maps else f"{n_maps}"
            heat_title.value = f"<b>{shown} feature maps of {c_layer.value}{weights_note}</b>"
            w_colorbar.value, colorbar_note.value = bars["viridis"], _colorbar_note_html("viridis")
        else:
            w_colorbar.value, colorbar_note.value = bars["jet"], _colorbar_note_html("jet")
            w_heat.value = _png(jet(heat)[..., :3], scale)
            overlay = overlay_heatmap(image, heat, alpha=c_alpha.value)
            heat_title.value = f"<b>{method} for class {class_names[target]}{weights_note}</b>"
        w_overlay.value = _png(overlay, scale)
        return {"index": idx, "method": method, "class_index": target, "layer": c_layer.value,
                "heatmap": heat}

    controls = {"index": c_index, "only_misclassified": c_wrong, "method": c_method,
                "class_index": c_class, "all_classes": c_all, "layer": c_layer, "alpha": c_alpha}

    def rows(status):
        panels = widgets.HBox([
            widgets.VBox([widgets.HTML("<b>input image</b>"), w_image]),
            widgets.VBox([heat_title, w_heat, w_colorbar, colorbar_note]),
            widgets.VBox([widgets.HTML("<b>overlay</b>"), w_overlay]),
            probs_html,
        ], layout=widgets.Layout(gap="12px", align_items="flex-start"))
        return [widgets.HBox([widgets.VBox([c_index, c_wrong, c_method, c_class, c_all, c_layer, c_alpha,
                                            status]), caption]), panels]

    box = _widget_app(rows, controls, draw, css_class="cnn-explorer")
    box.images = {"image": w_image, "heatmap": w_heat, "overlay": w_overlay}
    box.texts = {"caption": caption, "heatmap_title": heat_title, "probabilities": probs_html,
                 "colorbar_note": colorbar_note}
    box.probabilities, box.model_outputs = probs_all, source
    box.cache = cache  # (image, method, class, layer) -> heatmap; benchmarks clear it
    box.samples = samples
    box.refresh()
    return box


def explorer_snapshot(app, views=None):
    """A static HTML copy of what ``explorer`` shows, for handouts: no kernel, no JavaScript.

    An exported notebook (HTML) holds the widgets' state, but drawing live widgets needs
    the widget library from the internet; this copy needs nothing. ``views``: a list of
    dicts of control values (e.g. ``{"index": 3, "method": "Saliency"}``) shown in turn,
    one row each (default: the current view). The controls are restored afterwards.
    Returns an ``IPython.display.HTML``.
    """
    import base64

    from IPython.display import HTML

    order = ["only_misclassified", "all_classes", "index", "method", "layer", "class_index", "alpha"]
    if not hasattr(app, "controls") or not hasattr(app, "images"):
        raise TypeError(f"app must be what cnn_utils.explorer(...) returns, got {type(app).__name__}.")
    if views is not None and (isinstance(views, dict) or not all(isinstance(v, dict) for v in views)):
        raise TypeError("views must be a list of dicts of control values, e.g. [{'index': 3}, "
                        "{'method': 'Saliency'}].")
    saved = {k: app.controls[k].value for k in order if k in app.controls}

    def img(key):
        data = base64.b64encode(app.images[key].value).decode("ascii")
        return f"<img src='data:image/png;base64,{data}' style='width:{app.images[key].layout.width}'>"

    rows = []
    try:
        for view in views or [{}]:
            unknown = set(view) - set(app.controls)
            if unknown:
                raise ValueError(f"views: unknown control(s) {', '.join(sorted(unknown))}; the explorer's "
                                 f"controls are {', '.join(app.controls)}.")
            for k in sorted(view, key=order.index):
                control = app.controls[k]
                options = [o[1] if isinstance(o, tuple) else o for o in getattr(control, "options", ())]
                if options and view[k] not in options:
                    raise ValueError(f"views: {k}={view[k]!r} is not one of the explorer's choices: "
                                     f"{', '.join(map(repr, options))}.")
                low, high = getattr(control, "min", None), getattr(control, "max", None)
                if low is not None and not low <= view[k] <= high:
                    raise ValueError(f"views: {k}={view[k]!r} is outside {low}..{high}.")
                control.value = view[k]
            t = app.texts
            rows.append(
                f"<div style='margin:6px 0'>{t['caption'].value} — {app.status.value}</div>"
                "<div style='display:flex;gap:12px;align-items:flex-start'>"
                f"<div><b>input image</b><br>{img('image')}</div>"
                f"<div>{t['heatmap_title'].value}<br>{img('heatmap')}"
                f"{_colorbar_css('viridis' if app.controls['method'].value == ACTIVATIONS_METHOD else 'jet', app.images['heatmap'].layout.width)}</div>"
                f"<div><b>overlay</b><br>{img('overlay')}</div><div>{t['probabilities'].value}</div></div>")
    finally:
        for k, v in saved.items():
            app.controls[k].value = v
    return HTML("<div class='cnn-explorer-snapshot'><p><i>Static copy of the explorer (what it showed when "
                "this notebook ran)</i></p>" + "<hr>".join(rows) + "</div>")


def vgg_layer_explorer(model, photos, size=224, layer="relu3_3"):
    """A small interactive viewer of VGG16's feature maps (PyTorch), for a live demo.

    ``photos`` is a dict name -> image (anything ``load_photo`` takes). Choose the
    photo, the layer of ``model.features`` and a channel; it shows the photo, that
    channel's feature map and the 16 strongest channels of the layer. Feature maps are
    computed once per (photo, layer), so moving the channel slider is instant. Returns an
    ``ipywidgets.VBox`` with ``controls``, ``images``, ``status``, ``last`` and ``refresh()``.
    """
    import ipywidgets as widgets
    import matplotlib

    if not isinstance(photos, dict):
        raise TypeError("photos must be a dict {name: image}, e.g. cnn_utils.sample_photos(); got "
                        f"{type(photos).__name__}.")
    if not photos:
        raise ValueError("vgg_layer_explorer needs at least one photo: {name: image}.")
    names = vgg_layer_names(model)
    if layer not in names:
        raise ValueError(f"Unknown layer {layer!r}; VGG16's layers are: {', '.join(names)}.")
    pixels = {name: load_photo(img, size, fit="stretch", name=name) for name, img in photos.items()}
    viridis = matplotlib.colormaps["viridis"]
    maps_cache = {}

    def maps_for(photo, index):
        if (photo, index) not in maps_cache:
            maps_cache[(photo, index)] = vgg_layer_activations(model, pixels[photo], names[index])[0]
        return maps_cache[(photo, index)]

    style = {"description_width": "80px"}
    c_photo = widgets.Dropdown(options=list(pixels), description="photo", style=style)
    c_layer = widgets.Dropdown(options=[(f"{i}: {n}", i) for i, n in enumerate(names)],
                               value=names.index(layer), description="layer", style=style)
    c_channel = widgets.IntSlider(0, 0, 1, description="channel", style=style, continuous_update=False)
    px = f"{size}px"
    w_photo = widgets.Image(format="png", layout=widgets.Layout(width=px))
    w_channel = widgets.Image(format="png", layout=widgets.Layout(width=px))
    w_strongest = widgets.Image(format="png", layout=widgets.Layout(width=px))
    titles = [widgets.HTML("<b>photo</b>"), widgets.HTML(), widgets.HTML()]
    weights = "ImageNet weights" if getattr(model, "pretrained", False) else "RANDOM weights"

    def draw():
        maps = maps_for(c_photo.value, c_layer.value)  # (C, H, W)
        c = maps.shape[0]
        if c_channel.max != c - 1:
            c_channel.max = c - 1
        fmap = maps[c_channel.value]
        top = fmap.max()
        w_channel.value = _png(viridis(fmap / top if top > 0 else fmap)[..., :3],
                               max(1, size // fmap.shape[-1]))
        strongest = _strongest_channels(maps, 16)
        w_strongest.value = _mosaic_png(_tile_channels(np.transpose(maps[strongest], (1, 2, 0)), ncols=4), size)
        w_photo.value = _png(pixels[c_photo.value])
        titles[1].value = (f"<b>{names[c_layer.value]}, channel {c_channel.value}</b> "
                           f"(max {top:.2f}; {'silent' if top <= 0 else 'active'})")
        titles[2].value = f"<b>16 strongest of {c} channels ({fmap.shape[0]}×{fmap.shape[1]})</b>"
        return {"photo": c_photo.value, "layer_index": c_layer.value, "channel": c_channel.value,
                "feature_map": fmap, "method": "feature map",
                "note": f"{weights}; colour: yellow = strong, dark = zero"}

    def rows(status):
        return [widgets.HBox([c_photo, c_layer, c_channel]), status,
                widgets.HBox([widgets.VBox([titles[0], w_photo]), widgets.VBox([titles[1], w_channel]),
                              widgets.VBox([titles[2], w_strongest])], layout=widgets.Layout(gap="12px"))]

    box = _widget_app(rows, {"photo": c_photo, "layer": c_layer, "channel": c_channel}, draw)
    box.images = {"photo": w_photo, "channel": w_channel, "strongest": w_strongest}
    box.refresh()
    return box


# ---------------------------------------------------------------------------
# Exercise checks
# ---------------------------------------------------------------------------

# The exercise notebook (09) tests students' code with these helpers: each raises an
# AssertionError whose message says what was expected, what came out and, with ``hint``,
# what to fix. The feedback shows that message (never the test's code).

def _as_numbers(value, name):
    """``value`` (array, tensor, list or number) as a float64 array, or AssertionError."""
    if value is None:
        raise AssertionError(f"{name} returned None: did you forget the `return` statement?")
    if hasattr(value, "numpy"):
        value = value.numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise AssertionError(
            f"{name} should be an array of numbers, got {type(value).__name__}."
        ) from None
    return arr


def check_array(value, name, shape=None, low=None, high=None):
    """Check that ``value`` is a finite array [of ``shape``] [within ``low``..``high``].

    Returns it as a float64 NumPy array. Raises ``AssertionError`` with a message
    naming ``name``, the expected and the actual shape or range otherwise.
    """
    arr = _as_numbers(value, name)
    if shape is not None and arr.shape != tuple(shape):
        raise AssertionError(f"{name} should have shape {tuple(shape)}, got {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise AssertionError(f"{name} contains {bad} NaN or infinite value(s).")
    if low is not None and arr.size and arr.min() < low:
        raise AssertionError(f"{name} should be >= {low}, but its minimum is {arr.min():.6g}.")
    if high is not None and arr.size and arr.max() > high:
        raise AssertionError(f"{name} should be <= {high}, but its maximum is {arr.max():.6g}.")
    return arr


def check_close(actual, expected, name, rtol=1e-5, atol=1e-8, hint=""):
    """Check ``|actual - expected| <= atol + rtol * |expected|`` elementwise.

    On failure the ``AssertionError`` says how many values differ, the largest
    difference, where it is and both values there, followed by ``hint``.
    Returns None (so that a test cell ending with it prints nothing).
    """
    try:
        exp = np.asarray(expected, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"expected (the reference for {name}) must be numbers, got {type(expected).__name__}.") from None
    act = check_array(actual, name)
    if act.shape != exp.shape:
        if act.size == exp.size == 1:
            act = act.reshape(exp.shape)
        else:
            raise AssertionError(f"{name} should have shape {exp.shape}, got {act.shape}. {hint}".strip())
    bad = np.abs(act - exp) > atol + rtol * np.abs(exp)
    if np.any(bad):
        diff = np.where(bad, np.abs(act - exp), -np.inf)
        where = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.ndim else ()
        at = f" at index {tuple(int(i) for i in where)}" if where else ""
        raise AssertionError(
            f"{name} is wrong in {int(bad.sum())} of {bad.size} value(s); the largest difference is "
            f"{np.abs(act - exp)[where]:.6g}{at} (got {act[where]:.6g}, expected {exp[where]:.6g}). {hint}".strip()
        )


def check_visible(fig, artist, name, min_pixels=20):
    """Check that ``artist`` (e.g. a line) changes at least ``min_pixels`` pixels of ``fig``.

    The figure is drawn twice, with the artist shown and hidden, and the pixels compared:
    an invisible, transparent, zero-width, off-axes or covered artist changes none.
    Returns the number of changed pixels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    def pixels():
        canvas = fig.canvas if hasattr(fig.canvas, "buffer_rgba") else FigureCanvasAgg(fig)
        canvas.draw()
        return np.asarray(canvas.buffer_rgba()).copy()

    shown = artist.get_visible()
    with_artist = pixels()
    artist.set_visible(False)
    try:
        without = pixels()
    finally:
        artist.set_visible(shown)
    changed = int(np.any(with_artist != without, axis=-1).sum())
    if changed < min_pixels:
        raise AssertionError(
            f"{name} cannot be seen in the figure (drawing it changes {changed} pixels): check that it is "
            "visible, not transparent, has a width or markers, and lies inside the axes limits.")
    return changed


def _code_objects(code):
    """A code object and every code object nested in it (inner functions, comprehensions)."""
    yield code
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            yield from _code_objects(const)


def check_not_calling(func, forbidden, name, args=(), kwargs=None):
    """Call ``func(*args, **kwargs)`` and fail if it uses one of the ``forbidden`` functions.

    Two checks, so that renaming does not help (``from cnn_utils import grad_cam as g``):
    the code is inspected, following every global name, attribute and closure it
    references into the functions it calls (a reference to a forbidden function under any
    name fails); and the call runs under ``sys.setprofile``, which sees every Python
    function entered, however it was reached. Returns the call's result.
    """
    import inspect

    forbidden = list(forbidden)
    codes = {inspect.unwrap(f).__code__ for f in forbidden if hasattr(inspect.unwrap(f), "__code__")}
    names = {f.__name__ for f in forbidden}

    def is_forbidden(obj):
        try:
            return any(obj is f for f in forbidden) or getattr(inspect.unwrap(obj), "__code__", None) in codes
        except Exception:
            return False

    seen, todo = set(), [func]
    while todo:
        f = todo.pop()
        f = getattr(f, "__func__", f)
        if id(f) in seen or not hasattr(f, "__code__"):
            continue
        seen.add(id(f))
        if is_forbidden(f):
            raise AssertionError(f"{name} uses {f.__name__} from cnn_utils: write the method yourself.")
        env = getattr(f, "__globals__", {})
        referenced = [c.cell_contents for c in (f.__closure__ or ()) if _cell_filled(c)]
        for code in _code_objects(f.__code__):
            for n in code.co_names:
                if n in env:
                    referenced.append(env[n])
                    module = env[n]
                    if inspect.ismodule(module):
                        referenced.extend(getattr(module, m) for m in code.co_names if m in names
                                          and hasattr(module, m))
        for obj in referenced:
            if is_forbidden(obj):
                raise AssertionError(
                    f"{name} refers to cnn_utils.{getattr(obj, '__name__', obj)} (under whatever name): "
                    "the exercise is to write the method yourself, without the course's implementation.")
            if getattr(getattr(obj, "__func__", obj), "__globals__", None) is env:
                todo.append(obj)  # the student's own helper functions, not library code

    called = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            called.append(frame.f_code.co_name)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        result = func(*args, **(kwargs or {}))
    finally:
        sys.setprofile(previous)
        if called:
            raise AssertionError(f"{name} called cnn_utils.{called[0]}: the exercise is to write the "
                                 "method yourself, without the course's implementation.")
    return result


def _cell_filled(cell):
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------
# Claims: what a notebook says about its own outputs, checked and recorded
# ---------------------------------------------------------------------------

#: The output type under which ``record`` stores values in an executed notebook.
VALUES_MIMETYPE = "application/vnd.cnn-course.values+json"


class ClaimError(AssertionError):
    """A sentence of a notebook no longer holds for the numbers it describes."""


def claim(condition, statement, evidence=""):
    """Check a statement a notebook makes about its outputs; fail loudly if it does not hold.

    ``condition`` is the test in code, ``statement`` the sentence shown to students,
    ``evidence`` the numbers (put into the error). Returns ``statement``.
    """
    if not bool(condition):
        raise ClaimError(f"The notebook says: \"{statement}\" but its output shows otherwise. {evidence}".strip())
    return statement


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def record(**values):
    """Store named results in the executed notebook, invisibly (no text is shown).

    Tests and tools read them back from the output of type ``VALUES_MIMETYPE``,
    so that they check numbers, not printed sentences.
    """
    from IPython.display import display

    display({VALUES_MIMETYPE: _jsonable(values), "text/plain": ""}, raw=True)

