"""Framework imports and the array operations the formulas share.

TensorFlow, Keras and PyTorch are imported when a function first needs them (``_tf()``,
``_keras()``, ``_torch()``), so ``import cnn_utils`` stays cheap. ``_torch()`` refuses with
``FrameworkOrderError`` where importing torchvision after TensorFlow would crash the process
(the known trap of the pinned versions). ``_ops(x)`` gives the few tensor operations the
attribution formulas use (sum, mean, max, ReLU, where, einsum) for NumPy, TensorFlow and
PyTorch arrays alike, so one formula runs on all three.
"""
from __future__ import annotations

import os
import sys

import numpy as np


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


def _is_torch_module(model):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def _check_tensor(x, name):
    torch, _ = _torch()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__} "
                        "(convert with torch.as_tensor).")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}.")
