"""Feature visualization machinery: the result type and VGG16's regularised rendering.

``FeatureVisualization`` holds what ``activation_maximization`` returns; VGG16 channels are
rendered in a decorrelated Fourier parametrisation with random jitter, scale and rotation
(Olah et al., 2017) by ``vgg_feature_visualization``.
"""
from __future__ import annotations


import numpy as np

from .frameworks import _torch
from .checks import _check_seed, _is_int, _is_number
from .data import DEFAULT_SEED
from .keras_layers import (LOGITS_LAYER, _layer_chain, _layer_type, _model_input_shape,
    conv_and_pool_layer_names)
from .vgg16 import VGG_LOGITS, _StopForward, _vgg_features_and_input, _vgg_layer_module


class FeatureVisualization:
    """What ``activation_maximization`` (Keras) and ``vgg_feature_visualization`` (PyTorch) return.

    Attributes
    ----------
    images : (K, H, W, C) float32, the optimised inputs (Keras: raw, see ``deprocess_image``;
        VGG16: in [0, 1]).
    units : (K,) the channels / classes, one per image (also ``indices``).
    layer : the target layer (also ``layer_name``).
    history : (steps + 1, K) the objective (without regularizers) during the ascent (Keras:
        row t < steps at step t, the last row on the final image; VGG16: (steps, K), one row a step).
    start_objective, objective : (K,) the objective at the start and at the end.
    activation : (K,) the layer's mean output for the target channel / unit of the final
        image, after the layer's activation function (ReLU), i.e. what the network sees
        (None where it was not measured).
    dead : (K,) bool, True for a ReLU filter whose output is still exactly 0 for the
        optimised image: not even the best input found switches it on, so its image
        shows noise, not a feature. Always False for layers without ReLU (class scores).
    params : the settings used; ``seconds`` the wall-clock time (None if not measured).

    ``fv["images"]``, ``fv["objective"]`` (the history), ``fv["units"]``, ``fv["layer"]``,
    ``fv["seconds"]`` read the same values (``fv["units"]`` as a list), as the dict ``vgg_feature_visualization`` returned before.
    """

    def __init__(self, images, indices, history, start_objective, objective, activation,
                 has_relu, layer_name, params, seconds=None):
        self.images = images
        self.indices = indices
        self.history = history
        self.start_objective = start_objective
        self.objective = objective
        self.activation = activation
        self.dead = ((activation <= 0) if has_relu and activation is not None
                     else np.zeros(len(indices), bool))
        self.layer_name = layer_name
        self.params = params
        self.seconds = seconds

    @property
    def units(self):
        return self.indices

    @property
    def layer(self):
        return self.layer_name

    @property
    def image(self):
        """The first (or only) optimised image, (H, W, C)."""
        return self.images[0]

    _KEYS = {"images": "images", "objective": "history", "units": "units", "layer": "layer",
             "seconds": "seconds"}

    def __getitem__(self, key):
        if key not in self._KEYS:
            raise KeyError(f"{key!r}; a FeatureVisualization has {sorted(self._KEYS)} "
                           "(and the attributes history, objective, activation, dead, params).")
        value = getattr(self, self._KEYS[key])
        return value.tolist() if key == "units" else value

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


#: Colour decorrelation of Olah et al. (2017, lucid): the square root of ImageNet's RGB
#: covariance (from its SVD). The optimised colours live in this decorrelated space.
_COLOR_CORRELATION_SVD_SQRT = np.array([[0.26, 0.09, 0.02],
                                        [0.27, 0.00, -0.05],
                                        [0.27, -0.09, 0.03]], dtype=np.float32)


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

    The same argument names (``layer``, ``units``, ``steps``, ``lr``, ``jitter``, ``seed``) and
    result type as ``activation_maximization`` for Keras models: a ``FeatureVisualization``
    with ``images`` float32 (B, size, size, 3) in [0, 1], ``history`` (steps, B), ``units``,
    ``layer``, ``seconds`` (``fv["images"]``, ``fv["objective"]`` etc. as the dict it was).
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
    was_training = [(m, m.training) for m in model.modules()]   # each submodule's own flag
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
        for m, flag in was_training:
            m.training = flag
    with torch.no_grad():
        images = _fourier_image(torch, spectrum, scale, h, w, decorrelate)
    params = dict(size=size, steps=steps, lr=lr, decorrelate=decorrelate, jitter=jitter, scales=scales,
                  angles=angles, pad=pad, seed=seed)
    return FeatureVisualization(images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32), np.asarray(units),
                                history, history[0], history[-1], None, False, layer, params,
                                seconds=time.perf_counter() - start)
