"""VGG16 (torchvision): weights offline first, layer names, feature maps, predictions.

``load_vgg16`` takes torchvision's cached ImageNet weights (``python -m course prefetch``)
and falls back to random weights, labelled, when they cannot be had. Layers are named
``conv1_1`` … ``conv5_3`` / ``pool1`` … ``pool5`` (``vgg_layer_names``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .frameworks import _torch
from .checks import _check_batch_size, _check_seed, _is_int
from .data import DEFAULT_SEED
from .images import imagenet_normalize, preprocess_image


def _vgg_alias_names(model):
    """VGG's conventional names (``conv5_3``, ``relu5_3``, ``pool5``, ...) -> names in
    ``model.named_modules()`` (``features.28`` ...), for a model with VGG's ``features``."""
    features = getattr(model, "features", None)
    if features is None or not hasattr(features, "__len__"):
        return {}
    return {name: f"features.{i}" for i, name in enumerate(vgg_layer_names(model))}


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
