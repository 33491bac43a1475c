"""Guided Backpropagation, Guided Grad-CAM and HiResCAM, for Keras models and PyTorch modules.

Guided Backpropagation (Springenberg et al., 2015) changes the backward pass through every
ReLU: the gradient passes only where the ReLU's input was positive (as the ordinary gradient)
*and* the gradient arriving from above is positive,
``R_in = R_out * [x > 0] * [R_out > 0]``. Guided Grad-CAM (Selvaraju et al., 2017) multiplies
that by the (upsampled) Grad-CAM map. Adebayo et al. (2018) showed that both barely change when
the top layers are re-initialised: they look like edge detectors, whatever the model learned.

The user's model is never changed: a PyTorch module gets forward hooks on its ``nn.ReLU``
modules for the length of the call (removed afterwards, even on error); a Keras model is cloned
with a guided ReLU in place of every ReLU activation (cached, weights copied at each call).
ReLUs called as functions (``F.relu``, ``keras.ops.relu`` inside a custom layer) are not
guided.

The methods themselves (``guided_backprop``, ``guided_grad_cam``) are in ``cnn_utils``; this
module gives them the guided model (``guided_relus``).
"""
from __future__ import annotations

import contextlib

from .frameworks import _is_torch_module
from .keras_layers import _check_keras_model


_GUIDED_KERAS = {}


def _guided_relu_tf():
    import tensorflow as tf

    @tf.custom_gradient
    def guided_relu(x):
        def grad(dy):
            return dy * tf.cast(x > 0, dy.dtype) * tf.cast(dy > 0, dy.dtype)
        return tf.nn.relu(x), grad
    return guided_relu


def _is_relu(fn):
    return getattr(fn, "__name__", "") == "relu"


def _guided_keras_clone(model):
    """A clone of the Keras model whose ReLU activations are guided, with the model's
    current weights (the clone is built once per model and kept)."""
    import keras

    key = id(model)
    if key not in _GUIDED_KERAS or _GUIDED_KERAS[key][0]() is not model:
        import weakref

        guided = _guided_relu_tf()

        def clone(layer):
            new = layer.__class__.from_config(layer.get_config())
            if isinstance(layer, keras.layers.ReLU) and layer.get_config().get("max_value") is None \
                    and not layer.get_config().get("negative_slope"):
                new = keras.layers.Activation(guided, name=layer.name)
            elif _is_relu(getattr(layer, "activation", None)):
                new.activation = guided
            return new
        copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
        if hasattr(model, "input_range"):
            copy.input_range = model.input_range
        _GUIDED_KERAS[key] = (weakref.ref(model), copy)
        weakref.finalize(model, _GUIDED_KERAS.pop, key, None)      # the clone goes with the model
    copy = _GUIDED_KERAS[key][1]
    copy.set_weights(model.get_weights())
    return copy


def _torch_guided_hooks(model):
    import torch

    class GuidedReLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):                      # y = ReLU(x): y > 0 exactly where x > 0
            ctx.save_for_backward(y)
            return y.clone()

        @staticmethod
        def backward(ctx, dy):
            (y,) = ctx.saved_tensors
            return dy * (y > 0).to(dy.dtype) * (dy > 0).to(dy.dtype)

    return [m.register_forward_hook(lambda mod, inp, out: GuidedReLU.apply(out))
            for m in model.modules() if isinstance(m, torch.nn.ReLU)]


@contextlib.contextmanager
def guided_relus(model):
    """The model to differentiate for Guided Backpropagation: a PyTorch module with a guided
    hook on every ``nn.ReLU`` for the length of the ``with`` block (removed after, even on
    error), or a Keras model's cached clone with guided ReLUs and the model's current weights.
    The user's model is not changed."""
    if _is_torch_module(model):
        hooks = _torch_guided_hooks(model)
        try:
            yield model
        finally:
            for h in hooks:
                h.remove()
    else:
        _check_keras_model(model)
        yield _guided_keras_clone(model)
