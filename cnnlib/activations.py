"""Activations and filters: feature maps (Keras models and PyTorch modules), sparsity, dead
channels, filter weights.
"""
from __future__ import annotations

import numpy as np

from .frameworks import _is_torch_module, _torch
from .checks import _as_name_list, _check_batch_size, _check_unit_indices, _is_int, _is_number
from .keras_layers import (LOGITS_LAYER, _layer_list, _layer_type, _nested_layers,
    activation_model, conv_and_pool_layer_names, conv_layer_names, get_layer)
from .models import as_image_batch
from .torch_engine import _TorchEngine


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

    A PyTorch module works the same way: names from ``model.named_modules()`` (VGG16's
    ``conv5_3``-style names too), ``None`` for every ``Conv2d`` and pooling module, maps
    returned channels last (N, h, w, C) as for Keras.
    """
    batch_size = _check_batch_size(batch_size)
    if _is_torch_module(model):
        return _torch_activations(model, images, layer_names, batch_size)
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


def likeness_above_chance(gap):
    """How much more alike two layers' filters are than chance, in the course's words.

    ``gap`` is a median best-match correlation (``match_filters``) minus the same median
    against untrained filters; it is read as printed, rounded to two decimals:
    > 0.15 ``"clearly"``, >= 0.05 ``"somewhat"``, > 0 ``"hardly"``, else ``"no"`` (more alike
    than chance). Notebooks 03 and 04 read every filter gap with this one rule.
    """
    if isinstance(gap, (bool, np.bool_)) or not np.isscalar(gap) or not np.isfinite(gap):
        raise ValueError(f"gap must be one finite number (a difference of two median correlations), got {gap!r}.")
    gap = round(float(gap), 2)
    return "clearly" if gap > 0.15 else "somewhat" if gap >= 0.05 else "hardly" if gap > 0 else "no"


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


def _torch_activations(model, images, layer_names, batch_size):
    """``get_activations`` for a PyTorch module: one hooked forward pass per layer and batch."""
    torch, _ = _torch()
    engine = _TorchEngine(model, "logits")
    x = engine.images(images)
    if layer_names is None:
        kinds = (torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.AvgPool2d, torch.nn.AdaptiveAvgPool2d,
                 torch.nn.AdaptiveMaxPool2d)
        layer_names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
        if not layer_names:
            raise ValueError(f"The module {type(model).__name__} has no Conv2d or pooling layer; name the "
                             "layers you want with layer_names (names from model.named_modules()).")
    layer_names = _as_name_list(layer_names)
    if not layer_names or len(set(layer_names)) != len(layer_names):
        raise ValueError(f"layer_names must name each layer once (or be None), got {layer_names}.")
    if len(x) == 0:
        raise ValueError("images is empty: pass at least one image (N >= 1).")
    from . import attribution   # batches also bounded by ATTRIBUTION_MEMORY_BUDGET (VGG16's maps are large)
    step = int(max(1, min(batch_size, attribution.ATTRIBUTION_MEMORY_BUDGET // max(1, engine.bytes_per_image(x)))))
    resolved = [engine.resolve_layer(name, x) for name in layer_names]
    return {name: np.concatenate([engine.features(x[i:i + step], layer)[0]
                                  for i in range(0, len(x), step)]).astype(np.float32)
            for name, layer in zip(layer_names, resolved)}
