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


# ---------------------------------------------------------------------------
# Feature visualization
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Attribution
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Confidence and embeddings
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# PyTorch: VGG16 and feature inversion
# ---------------------------------------------------------------------------

#: ImageNet channel statistics that torchvision's VGG16 weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Set this environment variable to ``1`` to never try a download (use the cache or
#: fall back to random weights at once), e.g. for tests on a machine with a network.
OFFLINE_ENV_VAR = "CNN_COURSE_OFFLINE"


def _vgg16_weights_enum():
    _, torchvision = _torch()
    return torchvision.models.VGG16_Weights.IMAGENET1K_V1


def vgg16_weights_path():
    """Where torchvision's own cache keeps the VGG16 ImageNet weights (the file
    ``python -m cnn_utils prefetch`` downloads): ``<torch hub dir>/checkpoints/<file>``."""
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
    return torch.device(device)


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


def load_vgg16(pretrained=True, device=None, seed=DEFAULT_SEED, timeout=10.0):
    """torchvision's VGG16, in eval mode, on ``device`` (default: GPU if available).

    With ``pretrained=True`` the ImageNet weights come from torchvision's cache
    (``vgg16_weights_path()``), downloaded there when missing. If they cannot be had
    (no network, a corrupt file), a plain message says what happened and how to
    prefetch them, and the model keeps randomly initialised weights (seeded with
    ``seed``) so that everything downstream still runs.

    The returned model carries two extra attributes: ``pretrained`` (True only when
    the ImageNet weights were loaded) and ``class_names`` (the 1000 ImageNet classes).
    """
    torch, torchvision = _torch()
    weights_enum = _vgg16_weights_enum()
    torch.manual_seed(seed)
    model = torchvision.models.vgg16(weights=None)
    loaded = False
    if pretrained:
        path = vgg16_weights_path()
        problem = None
        if not path.is_file() and os.environ.get(OFFLINE_ENV_VAR, "") not in ("", "0"):
            problem = (f"they are not in torchvision's cache ({path}) and {OFFLINE_ENV_VAR} "
                       "is set, so no download was tried")
        else:
            try:
                model.load_state_dict(_download_vgg16_state_dict(timeout=timeout))
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
                "predictions are meaningless and its filters are noise; the feature inversions "
                "show what an untrained network keeps.\n"
                "To use the real weights: on a machine with internet, run `make prefetch` (or "
                "`python -m cnn_utils prefetch`) in the course folder, which saves them (528 MB) "
                f"to {path}; then restart the kernel.",
                flush=True,
            )
    model.pretrained = loaded
    model.class_names = list(weights_enum.meta["categories"])
    return model.eval().to(torch_device(device))


def vgg_layer_names(model):
    """Names of ``model.features`` in VGG's convention: conv1_1, relu1_1, ..., pool1, conv2_1 ..."""
    torch, _ = _torch()
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
    if isinstance(layer_index, bool) or not isinstance(layer_index, (int, np.integer)):
        raise TypeError(f"layer_index must be an integer from 0 to {n - 1}, got {layer_index!r}.")
    if not 0 <= layer_index < n:
        listing = ", ".join(f"{i} {name}" for i, name in enumerate(vgg_layer_names(model)))
        raise ValueError(f"layer_index {layer_index} is out of range: valid indices are 0 to "
                         f"{n - 1}. The model's feature layers are: {listing}.")
    return int(layer_index)


def preprocess_image(image, size=224):
    """A photo as VGG16 input: a float32 tensor (1, 3, size, size), ImageNet-normalised.

    ``image`` is a PIL image, a path to an image file, or an array (H, W, 3) / (H, W)
    of uint8 in 0..255 or floats in [0, 1]. It is resized (bicubic, Pillow's
    ``Image.Resampling``) to ``size`` x ``size`` (``size`` may also be ``(height, width)``),
    scaled to [0, 1] and normalised with ``IMAGENET_MEAN`` / ``IMAGENET_STD``.
    ``recreate_image`` is its inverse.
    """
    from PIL import Image

    torch, _ = _torch()
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"No image file at {path} (resolved: {path.resolve()}).")
        with Image.open(path) as img:
            image = img.convert("RGB")
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        if hasattr(image, "detach"):
            image = image.detach().cpu().numpy()
        arr = np.asarray(image)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise TypeError("image must be a PIL image, a path or an array of numbers, "
                            f"got {type(image).__name__}.")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 2:
            arr = np.repeat(arr[..., np.newaxis], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            hint = " (drop the alpha channel with image[..., :3])" if arr.ndim == 3 and arr.shape[-1] == 4 else ""
            raise ValueError(f"image must have shape (H, W, 3) (RGB, channels last) or (H, W); "
                             f"got shape {arr.shape}{hint}.")
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float64)
            if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
                raise ValueError("A float image must hold values in [0, 1] (or pass uint8 in 0..255); "
                                 f"got values from {np.nanmin(arr):.3g} to {np.nanmax(arr):.3g}.")
            arr = np.round(arr * 255).astype(np.uint8)
        pil = Image.fromarray(arr)
    height, width = (size, size) if np.isscalar(size) else tuple(size)
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"size must be positive, got {size!r}.")
    pil = pil.resize((int(width), int(height)), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0).contiguous()


def recreate_image(tensor):
    """Inverse of ``preprocess_image``: un-normalise, clip to [0, 1], uint8 (H, W, 3)."""
    torch, _ = _torch()
    x = tensor.detach().cpu().float() if isinstance(tensor, torch.Tensor) else torch.as_tensor(
        np.asarray(tensor, dtype=np.float32))
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"Expected a tensor (1, 3, H, W) or (3, H, W), got shape {tuple(tensor.shape)}.")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (x * std + mean).clamp(0, 1)
    return np.round(x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def euclidian_loss(original, target):
    """Relative squared error ||target - original||^2 / ||original||^2 (Mahendran & Vedaldi)."""
    return (target - original).pow(2).sum() / original.pow(2).sum().clamp_min(1e-12)


def alpha_norm(x, alpha=6):
    """Sum of |x|^alpha (the absolute value matters for odd alpha)."""
    return x.abs().pow(alpha).sum()


def total_variation_norm(x, beta=2, eps=1e-8):
    """Sum over pixels of ((x[i+1, j] - x[i, j])^2 + (x[i, j+1] - x[i, j])^2)^(beta/2).

    ``x`` is (N, C, H, W) or (C, H, W): differences run along the two spatial axes
    (H and W), never across channels. ``eps`` keeps the gradient finite for
    ``beta < 2`` where neighbours are equal; it is subtracted again, so a constant
    image has exactly zero variation.
    """
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
    return x


def top_k_predictions(model, image, k=5):
    """The ``k`` most probable ImageNet classes: a list of (class name, probability)."""
    torch, _ = _torch()
    device = next(model.parameters()).device
    x = _as_model_input(image).to(device)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)[0].cpu()
    values, indices = probs.topk(k)
    names = getattr(model, "class_names", None) or imagenet_class_names()
    return [(names[i], float(p)) for p, i in zip(values, indices.tolist())]


def vgg_feature_maps(model, image, layer_indices):
    """Outputs of ``model.features[i]`` for each ``i`` in ``layer_indices``, in one pass.

    Returns ``{i: array (C, H, W)}``. Runs the layers one by one (no hooks) and
    copies each output, so VGG's in-place ReLUs cannot overwrite a conv layer's map.
    """
    torch, _ = _torch()
    indices = sorted({_check_layer_index(model, i) for i in layer_indices})
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
    """Vanilla gradient saliency (Simonyan et al. 2014) of a class's pre-softmax score.

    Returns ``(saliency (H, W) array, class_index)``: the largest absolute gradient over
    the three colour channels; ``class_index`` defaults to the predicted class.
    """
    torch, _ = _torch()
    device = next(model.parameters()).device
    x = _as_model_input(image).to(device).requires_grad_(True)
    scores = model(x)
    n_classes = scores.shape[1]
    if class_index is None:
        class_index = int(scores[0].argmax())
    if not 0 <= class_index < n_classes:
        raise ValueError(f"class_index must be from 0 to {n_classes - 1}, got {class_index}.")
    (grad,) = torch.autograd.grad(scores[0, class_index], x)
    return grad[0].abs().amax(dim=0).cpu().numpy(), class_index


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
    layer_index = _check_layer_index(model, layer_index)
    if int(iterations) < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}.")
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
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = ((noise - mean) / std).to(device).requires_grad_(True)
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


def image_similarity(original, reconstruction):
    """SSIM and PSNR (dB) of two uint8 RGB images (H, W, 3), via scikit-image.

    Returns ``(ssim, psnr)``; SSIM is 1 and PSNR infinite for identical images.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = np.asarray(original), np.asarray(reconstruction)
    if a.shape != b.shape or a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"Expected two RGB images of the same shape (H, W, 3); got {a.shape} and {b.shape}.")
    ssim = structural_similarity(a, b, channel_axis=-1, data_range=255)
    with np.errstate(divide="ignore"):
        psnr = peak_signal_noise_ratio(a, b, data_range=255)
    return float(ssim), float(psnr)



# ---------------------------------------------------------------------------
# Plotting
# ---------------------------------------------------------------------------

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


# --- PyTorch / VGG16 figures (notebook 07) ---

def plot_top_predictions(images, predictions, titles=None, title="Top-5 predictions"):
    """Each photo (uint8 H x W x 3) beside a bar chart of its (class, probability) list."""
    import matplotlib.pyplot as plt

    n = len(images)
    if n == 0 or n != len(predictions):
        raise ValueError(f"Need as many prediction lists as images (got {n} images, "
                         f"{len(predictions)} prediction lists, at least one).")
    fig, axes = plt.subplots(n, 2, figsize=(9, 2.4 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.2]})
    for i, (img, preds) in enumerate(zip(images, predictions)):
        axes[i, 0].imshow(img)
        axes[i, 0].axis("off")
        if titles is not None:
            axes[i, 0].set_title(str(titles[i]), fontsize=9)
        names = [name for name, _ in preds][::-1]
        probs = [100 * p for _, p in preds][::-1]
        axes[i, 1].barh(range(len(names)), probs, color="tab:blue")
        axes[i, 1].set_yticks(range(len(names)), names, fontsize=8)
        axes[i, 1].set_xlim(0, 100)
        axes[i, 1].set_xlabel("probability (%)")
        for y, p in enumerate(probs):
            axes[i, 1].text(min(p + 1, 88), y, f"{p:.1f}", va="center", fontsize=7)
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
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    hi = w.max(axis=(1, 2, 3), keepdims=True)
    rgb = ((w - lo) / np.maximum(hi - lo, 1e-12)).transpose(0, 2, 3, 1)
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


def plot_feature_maps(maps, channels=None, n=16, ncols=8, layer_name="layer", cmap="viridis", size=1.3):
    """Individual channels of one layer's feature maps (C, H, W), on one colour scale.

    ``channels`` defaults to the ``n`` channels with the largest mean activation.
    """
    import matplotlib.pyplot as plt

    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"Expected feature maps (C, H, W), got shape {maps.shape}.")
    channels = _strongest_channels(maps, n) if channels is None else list(channels)
    shown = maps[channels]
    vmin, vmax = float(shown.min()), float(shown.max())
    ncols = min(ncols, len(channels))
    nrows = int(np.ceil(len(channels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols + 1, size * nrows + 0.7), squeeze=False)
    im = None
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(channels):
            im = ax.imshow(shown[i], cmap=colormap(cmap), vmin=vmin, vmax=vmax)
            ax.set_title(f"channel {channels[i]}", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="activation")
    fig.suptitle(f"{layer_name}: {len(channels)} of {len(maps)} channels, "
                 f"{maps.shape[1]} x {maps.shape[2]} each")
    return fig


def plot_feature_maps_by_depth(maps_by_layer, n=6, cmap="viridis", size=1.4):
    """One row per layer (``{name: (C, H, W)}``): its ``n`` strongest channels, each row on
    its own colour scale with its colour bar, so the maps shrink and sparsify with depth."""
    import matplotlib.pyplot as plt

    names = list(maps_by_layer)
    if not names:
        raise ValueError("maps_by_layer is empty: pass {layer name: (C, H, W) array}.")
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

    n = len(results) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.7))
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
    fig.tight_layout()
    return fig


def plot_quality_vs_depth(layer_names, ssim, psnr, title="How much of the image each depth keeps"):
    """SSIM (left axis) and PSNR (right axis) of the reconstructions against depth."""
    import matplotlib.pyplot as plt

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


def colormap(name):
    """A matplotlib colormap by name (the current ``matplotlib.colormaps`` registry)."""
    import matplotlib

    return matplotlib.colormaps[name]


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
