"""Image conversions: ImageNet normalisation and the seed's image helpers.

``imagenet_normalize`` / ``imagenet_denormalize`` (the one pair of ImageNet statistics);
``preprocess_image`` (photo or array -> normalised (1, 3, 224, 224) tensor, as the seed
code's), ``recreate_image`` (its inverse, to uint8) and ``deprocess_image`` (a feature
visualization brought to a displayable image, Chollet's recipe).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .frameworks import _check_tensor, _torch
from .checks import _converted, _is_int, _is_number


def deprocess_image(x, crop=0, contrast=0.15):
    """Turn an optimised input into a displayable uint8 image.

    Per image: zero-centre, divide by the standard deviation, scale to the display
    range (``* contrast + 0.5``, so +-1 std becomes 0.35..0.65), clip to [0, 1], crop
    ``crop`` pixels from each border (where valid convolutions give pixels little
    gradient), then ``* 255`` rounded to uint8. Accepts (H, W), (H, W, C) or
    (N, H, W, C); a constant image becomes mid-grey.
    """
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"deprocess_image expects an image array of numbers, got {type(x).__name__}.") from None
    if a.ndim not in (2, 3, 4):
        raise ValueError(f"deprocess_image expects (H, W), (H, W, C) or (N, H, W, C); got shape {a.shape}.")
    if a.size == 0:
        raise ValueError(f"deprocess_image: the image is empty (shape {a.shape}).")
    if not np.all(np.isfinite(a)):
        raise ValueError("deprocess_image: the image contains NaN or infinite values.")
    axes = (1, 2, 3) if a.ndim == 4 else None
    a = a - a.mean(axis=axes, keepdims=True)
    a = a / (a.std(axis=axes, keepdims=True) + 1e-5)
    a = np.clip(a * contrast + 0.5, 0.0, 1.0)
    if not _is_int(crop) or crop < 0:
        raise ValueError(f"crop must be an integer >= 0 (pixels per border), got {crop!r}.")
    if not _is_number(contrast) or contrast <= 0:
        raise ValueError(f"contrast must be a positive number, got {contrast!r}.")
    crop = int(crop)
    if crop:
        h_axis = 1 if a.ndim == 4 else 0
        if 2 * crop >= min(a.shape[h_axis], a.shape[h_axis + 1]):
            raise ValueError(f"crop={crop} would remove the whole image of shape {a.shape}.")
        sl = [slice(None)] * a.ndim
        sl[h_axis] = sl[h_axis + 1] = slice(crop, -crop)
        a = a[tuple(sl)]
    return np.round(a * 255).astype(np.uint8)


#: ImageNet channel statistics that torchvision's VGG16 weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)

IMAGENET_STD = (0.229, 0.224, 0.225)


def _imagenet_statistics(x):
    """``IMAGENET_MEAN`` and ``IMAGENET_STD`` as (3, 1, 1) tensors of ``x``'s dtype and device."""
    torch, _ = _torch()
    _check_tensor(x, "x")
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"x must be RGB images (N, 3, H, W) or (3, H, W); got shape {tuple(x.shape)}.")
    return tuple(torch.tensor(v, dtype=x.dtype, device=x.device).view(3, 1, 1)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))


def imagenet_normalize(x):
    """RGB in [0, 1] to the input VGG16's ImageNet weights expect: ``(x - IMAGENET_MEAN) /
    IMAGENET_STD`` channel by channel. ``x``: a float tensor (N, 3, H, W) or (3, H, W)."""
    mean, std = _imagenet_statistics(x)
    return (x - mean) / std


def imagenet_denormalize(x):
    """The inverse of ``imagenet_normalize``: ``x * IMAGENET_STD + IMAGENET_MEAN`` (no clipping)."""
    mean, std = _imagenet_statistics(x)
    return x * std + mean


#: The largest photo ``preprocess_image`` accepts, in pixels (height x width): 50 megapixels
#: (a phone's full-resolution photo fits; a 20,000 x 20,000 scan would take minutes and
#: tens of GB). Shrink larger images first, e.g. ``img.thumbnail((4000, 4000))``.
MAX_IMAGE_PIXELS = 50_000_000


def _check_image_size(height, width, what):
    if height < 1 or width < 1:
        raise ValueError(f"{what} is empty ({height} x {width} pixels).")
    if height * width > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{what} has {height} x {width} = {height * width / 1e6:.0f} megapixels, more than the "
            f"limit of {MAX_IMAGE_PIXELS / 1e6:.0f} (cnn_utils.MAX_IMAGE_PIXELS). It is resized to "
            "224 x 224 anyway: shrink it first, e.g. img.thumbnail((4000, 4000)) with Pillow."
        )


def _open_photo(path):
    """A photo file as an upright PIL image (EXIF orientation applied), 16-bit kept as float."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No image file at {path} (resolved: {path.resolve()}).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_image_size(img.height, img.width, f"The image {path}")
                img.load()
                img = ImageOps.exif_transpose(img)      # phone photos: stored sideways + EXIF tag
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image file Pillow can read (JPEG, PNG, ...).") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{path} declares too many pixels to be a photo (a decompression bomb?): {err} "
                         "Shrink it first, e.g. img.thumbnail((4000, 4000)) with Pillow.") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{path} could not be read: the file is truncated or corrupt ({err}).") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey: Pillow's convert("RGB") would clip every value above 255 to white
        arr = np.asarray(img, dtype=np.float64) / 65535.0
        if arr.max() > 1.0:
            raise ValueError(f"{path}: a {img.mode} image with values above 65535 is not a photo.")
        return arr
    if img.mode == "F":
        return np.asarray(img, dtype=np.float64)
    return img


def preprocess_image(image, size=224):
    """A photo as VGG16 input: a float32 tensor (1, 3, size, size), ImageNet-normalised.

    ``image`` is a PIL image, a path to an image file, or an array (H, W, 3) / (H, W)
    of uint8 in 0..255, uint16 in 0..65535 or floats in [0, 1] (other integer arrays
    must hold 0..255). A file's EXIF orientation is applied (phone photos come upright)
    and 16-bit PNGs keep their range. It is resized (bicubic, Pillow's
    ``Image.Resampling``) to ``size`` x ``size`` (``size`` may also be ``(height, width)``),
    scaled to [0, 1] and normalised with ``IMAGENET_MEAN`` / ``IMAGENET_STD``.
    Images above ``MAX_IMAGE_PIXELS`` are refused. ``recreate_image`` is its inverse.
    """
    from PIL import Image

    torch, _ = _torch()
    try:
        height, width = (size, size) if np.isscalar(size) else tuple(size)
        if isinstance(height, bool) or isinstance(width, bool) or height != int(height) or width != int(width):
            raise ValueError
        height, width = int(height), int(width)
    except (TypeError, ValueError):
        raise ValueError(f"size must be an integer or a pair (height, width) of integers, got {size!r}.") from None
    if height < 1 or width < 1 or height * width > MAX_IMAGE_PIXELS:
        raise ValueError(f"size must be positive and at most {MAX_IMAGE_PIXELS} pixels, got {size!r}.")
    if isinstance(image, (str, os.PathLike)):
        image = _open_photo(image)
    if isinstance(image, Image.Image):
        _check_image_size(image.height, image.width, "The image")
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            image = np.asarray(image, dtype=np.float64) / (1.0 if image.mode == "F" else 65535.0)
        else:
            pil = image.convert("RGB")
    if not isinstance(image, Image.Image):
        if hasattr(image, "detach"):
            image = image.detach().cpu().numpy()
        arr = np.asarray(image)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise TypeError("image must be a PIL image, a path or an array of numbers, "
                            f"got {type(image).__name__}.")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            raise ValueError(f"image has shape {arr.shape}, channels first; pass it channels last "
                             "(H, W, 3), e.g. np.moveaxis(image, 0, -1).")
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
            hint = " (drop the alpha channel with image[..., :3])" if arr.ndim == 3 and arr.shape[-1] == 4 else ""
            raise ValueError(f"image must have shape (H, W, 3) (RGB, channels last) or (H, W); "
                             f"got shape {arr.shape}{hint}.")
        _check_image_size(arr.shape[0], arr.shape[1], "The image")
        if arr.dtype != np.uint8:
            if arr.dtype == np.uint16:
                arr = arr.astype(np.float32) / 65535.0
            elif arr.dtype.kind in "iu":
                if arr.min() < 0 or arr.max() > 255:
                    raise ValueError(f"An integer image must hold 0..255 (or be uint16, 0..65535); got "
                                     f"values from {arr.min()} to {arr.max()}.")
                arr = arr.astype(np.float32) / 255.0
            arr = arr.astype(np.float32)
            if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
                hint = " They look like 0..255: divide by 255 or pass uint8." if np.nanmax(arr) <= 255 else ""
                raise ValueError("A float image must hold values in [0, 1] (or pass uint8 in 0..255); "
                                 f"got values from {np.nanmin(arr):.3g} to {np.nanmax(arr):.3g}.{hint}")
            arr = np.round(arr * 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., np.newaxis], 3, axis=-1)
        pil = Image.fromarray(arr)
    pil = pil.resize((width, height), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return imagenet_normalize(x).unsqueeze(0).contiguous()


def recreate_image(tensor):
    """Inverse of ``preprocess_image``: un-normalise, clip to [0, 1], uint8 (H, W, 3)."""
    torch, _ = _torch()
    if isinstance(tensor, torch.Tensor):
        x = tensor.detach().cpu().float()
    else:
        x = _converted(tensor, "tensor", "a torch tensor or array (1, 3, H, W) or (3, H, W)",
                       lambda v: torch.as_tensor(np.asarray(v, dtype=np.float32)))
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3 or x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"recreate_image expects a tensor (1, 3, H, W) or (3, H, W) as made by "
                         f"preprocess_image; got shape {tuple(x.shape)}.")
    if not torch.isfinite(x).all():
        raise ValueError("recreate_image: the tensor contains NaN or infinite values.")
    x = imagenet_denormalize(x).clamp(0, 1)
    return np.round(x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
