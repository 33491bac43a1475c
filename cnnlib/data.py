"""Datasets: MNIST and Fashion-MNIST, offline first.

``load_dataset`` reads ``$CNN_COURSE_DATA``, then ``data/``, then the Keras download, and
validates every file (shapes, dtype, label range); ``train_val_split`` splits off a
validation set with a seed. ``DATA_DIR`` is read at call time (assignable).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .frameworks import _keras
from .checks import _check_seed


PROJECT_DIR = Path(__file__).resolve().parents[1]

DATA_DIR = PROJECT_DIR / "data"

NOTEBOOKS_DIR = PROJECT_DIR / "notebooks"

BUILD_DIR = PROJECT_DIR / "build"

#: Environment variable naming a directory with ``mnist.npz`` / ``fashion_mnist.npz``
#: (tests and CI point it at a folder of dataset files).
DATA_ENV_VAR = "CNN_COURSE_DATA"

DEFAULT_SEED = 42

DATASETS = ("mnist", "fashion_mnist")

#: How a dataset is named in text and figure titles (``DATASET`` holds the parameter value).
DATASET_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}

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
        folder = Path(env_dir).expanduser()
        if folder.exists() and not folder.is_dir():
            raise DataError(f"{DATA_ENV_VAR}={env_dir!r} is a file, not a folder: set it to the folder that "
                            f"holds {name}.npz (e.g. export {DATA_ENV_VAR}=~/cnn-data), or unset it.")
        paths.append(folder / f"{name}.npz")
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
