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

HiResCAM (Draelos & Carin, 2020): ``L = ReLU(sum_k A^k * dS_c/dA^k)``, the gradient kept
cell by cell instead of averaged over the map as Grad-CAM does (``w_k = mean dS_c/dA^k``).
The two agree when the gradient is the same at every cell, as on a global-average-pooling
head (where both equal the classic CAM of Zhou et al., 2016); they differ behind a Flatten
and Dense head, where every cell has its own weight.
"""
import numpy as np


def _is_torch(model):
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


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


def _input_gradients(model, images, class_index, score):
    """(classes, dS_c/dx (N, H, W, C)) through the course's engine (memory-bounded batches)."""
    import cnn_utils

    e = cnn_utils._Explained(model, images, class_index, score)
    e.fix_classes()
    _, cls, g = cnn_utils._input_gradients(e)
    return cls, g


def guided_backprop(model, images, class_index=None, *, layer=None, score="logits", normalize=True):
    """Guided Backpropagation (Springenberg et al., 2015): the gradient of the class score
    ``S_c`` (pre-softmax by default) with every ReLU's backward pass replaced by
    ``R_in = R_out * [x > 0] * [R_out > 0]``. Keras model or PyTorch module, unchanged.
    Returns float32 (N, H, W): ``max_channels |R|`` min-max scaled per image, or with
    ``normalize=False`` the signed guided gradient (N, H, W, C) (as captum's GuidedBackprop).
    """
    import cnn_utils

    cnn_utils._no_layer(layer, "guided_backprop")
    cnn_utils._check_flags(normalize=normalize)
    if _is_torch(model):
        hooks = _torch_guided_hooks(model)
        try:
            _, g = _input_gradients(model, images, class_index, score)
        finally:
            for h in hooks:
                h.remove()
    else:
        cnn_utils._check_keras_model(model)
        _, g = _input_gradients(_guided_keras_clone(model), images, class_index, score)
    if not normalize:
        return g
    return cnn_utils.normalize_maps(np.abs(g).max(axis=-1))


def guided_grad_cam(model, images, class_index=None, *, layer=None, score="logits", normalize=True):
    """Guided Grad-CAM (Selvaraju et al., 2017): the guided backpropagation (N, H, W, C)
    multiplied pixel by pixel by the raw Grad-CAM map of ``layer`` brought to the input grid
    (``cnn_utils.grad_cam(..., normalize=False)``). Returns float32 (N, H, W):
    ``max_channels |.|`` min-max scaled per image, or (``normalize=False``) the signed
    product (N, H, W, C), as captum's GuidedGradCam when the layer has the input's size.
    """
    import cnn_utils

    cnn_utils._check_flags(normalize=normalize)
    cam = cnn_utils.grad_cam(model, images, class_index, layer=layer, score=score, normalize=False)
    g = guided_backprop(model, images, class_index, score=score, normalize=False) * cam[..., None]
    if not normalize:
        return g
    return cnn_utils.normalize_maps(np.abs(g).max(axis=-1))


def hires_cam(model, images, class_index=None, *, layer=None, score="logits", normalize=True):
    """HiResCAM (Draelos & Carin, 2020): ``L = ReLU(sum_k A^k * dS_c/dA^k)`` (elementwise
    product, then the sum over channels) for the feature maps ``A`` of ``layer`` (``None``:
    the last convolution's output, as ``grad_cam``), brought to the input grid with
    ``cnn_utils.cam_upsampling_matrices``. Keras model or PyTorch module.
    Returns float32 (N, H, W), min-max scaled per image unless ``normalize=False``.
    """
    import cnn_utils

    cnn_utils._check_flags(normalize=normalize)
    e = cnn_utils._Explained(model, images, class_index, score)
    name = e.engine.resolve_layer(layer, e.x)
    maps = np.empty(e.x.shape[:3], np.float32)
    mats = {}
    for part in e.chunks():
        _, _, a, g = e.engine.layer_grad(e.x[part], e.cls[part], name)
        hw = a.shape[1:3]
        if hw not in mats:
            mats[hw] = cnn_utils.cam_upsampling_matrices(e.engine.model, name, e.x.shape[1:3], map_hw=hw)
        maps[part] = cnn_utils._upsample(np.maximum((a * g).sum(axis=-1), 0.0), *mats[hw])
    return cnn_utils.normalize_maps(maps) if normalize else maps
