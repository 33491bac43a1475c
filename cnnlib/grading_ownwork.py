"""The ``cnn_utils`` a submission sees while its "own work" test runs (grading only).

The grader runs the exercise notebook's given cells and the student's answer cells a second
time, in a sandbox where this file is the only ``cnn_utils.py`` and neither the course's
``cnn_utils.py`` nor ``cnnlib/`` exists: the course's attribution methods are not there to be
called, imported, aliased or recompiled from their file. The helpers the given cells need are
here, written without any attribution code; ``cam_upsampling_matrices`` returns matrices the
grader computed beforehand (``cam_*`` in ``$CNN_COURSE_OWN_WORK_DIR/inputs.npz``). Every other name
raises AttributeError saying why.
"""
import os
from pathlib import Path

import numpy as np

_DIR = Path(os.environ.get("CNN_COURSE_OWN_WORK_DIR", "/tmp/grader-job"))
_MODEL = Path(os.environ.get("CNN_COURSE_OWN_WORK_MODEL", "/course/saved_models/mnist_cnn.keras"))
_DATA = Path(os.environ.get("CNN_COURSE_DATA", "/data"))


def load_model(name="mnist"):
    import keras

    if name != "mnist":
        raise ValueError("only the MNIST model is available while your own work is checked")
    return keras.saving.load_model(_MODEL, safe_mode=True)


def logits_model(model):
    import keras

    return keras.Model(model.inputs, model.get_layer("logits").output)


def load_dataset(name="mnist"):
    with np.load(_DATA / f"{name}.npz", allow_pickle=False) as npz:
        x, y = npz["x_test"], npz["y_test"]
    x = (x.astype(np.float32) / 255.0)[..., None]
    empty = (np.zeros((0, 28, 28, 1), np.float32), np.zeros(0, np.int64))
    return empty, (x, y.astype(np.int64))


def cam_upsampling_matrices(model, layer, input_hw, map_hw=None):
    key = f"cam_{layer}_{int(input_hw[0])}_{int(input_hw[1])}"
    with np.load(_DIR / "inputs.npz", allow_pickle=False) as npz:
        if f"{key}_y" not in npz.files:
            raise ValueError(f"cam_upsampling_matrices: no matrices for layer {layer!r} at {tuple(input_hw)}")
        return npz[f"{key}_y"], npz[f"{key}_x"]


def record(**values):
    return None


def claim(condition, statement, evidence=""):
    return bool(condition)


def __getattr__(name):
    raise AttributeError(f"cnn_utils.{name} is not available while your own work is checked: "
                         "write the method yourself")
