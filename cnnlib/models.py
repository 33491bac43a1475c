"""The course CNN: build, train, save, load, and the images a model takes.

``build_mnist_cnn`` (functional; layers ``conv1`` … ``dense1``, ``logits`` pre-softmax,
``probabilities``), ``train_model``, ``load_model`` (``safe_mode=True``), the declared
input range of a model (``set_input_range``) and ``as_image_batch``, which maps uint8
images onto it and refuses floats outside it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .frameworks import _is_torch_module, _keras
from .checks import (_as_labels, _as_probs, _check_batch_size, _check_seed, _is_int, _is_number,
    _looks_like_probabilities)
from .data import DATASETS, DEFAULT_SEED, DataError, PROJECT_DIR, _check_dataset_name
from .keras_layers import (LOGITS_LAYER, _check_keras_model, _keras_output_activation,
    _model_input_shape, _score_output, logits_model)


MODELS_DIR = PROJECT_DIR / "saved_models"


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
    if hasattr(images, "detach") and hasattr(images, "cpu"):   # a torch tensor (requiring grad or not)
        images = images.detach().cpu().numpy()
    elif hasattr(images, "numpy"):
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
    if _is_torch_module(model):
        raise TypeError("predict_logits takes a Keras model; for a PyTorch module use "
                        "cnn_utils.class_scores, or call it on torch.from_numpy(x).permute(0, 3, 1, 2).")
    x = as_image_batch(images, model, input_range=input_range)
    logits = np.asarray(logits_model(model).predict(x, batch_size=batch_size, verbose=0))
    if _score_output(model, "logits") is model.outputs[0] and _looks_like_probabilities(logits):
        raise ValueError(
            f"The output of {model.name!r} looks like probabilities (every row is non-negative and sums "
            "to 1: a softmax inside a Lambda or another layer the helpers cannot see through), so "
            "predict_logits cannot give the pre-softmax scores. End the model with a Softmax layer "
            "(keras.layers.Softmax() or Activation('softmax')) on the logits, or name the layer holding "
            f"them {LOGITS_LAYER!r}; model.predict(x) gives the probabilities.")
    return logits
