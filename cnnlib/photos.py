"""Photos: the user's files, scikit-image's samples and composites, as (H, W, 3) floats in [0, 1].
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .checks import _is_int, _is_number


#: The course's sample photographs: name -> function of ``skimage.data`` that ships the
#: picture inside scikit-image (no download). ``stereo_motorcycle`` returns a stereo pair;
#: the left view is used. scikit-image ships no dog: use ``USER_IMAGES`` for one.
SAMPLE_PHOTOS = {"chelsea": "chelsea", "coffee": "coffee", "rocket": "rocket",
                 "astronaut": "astronaut", "motorcycle": "stereo_motorcycle"}

#: Largest photo (pixels) that ``load_photo`` decodes; beyond it, resize the file first.
MAX_PHOTO_PIXELS = 60_000_000


def _photo_size(size):
    """``size`` as (height, width) or None; raises on anything else."""
    if size is None:
        return None
    pair = (size, size) if np.isscalar(size) else tuple(size)
    if (len(pair) != 2 or any(not _is_int(v) for v in pair)
            or min(pair) < 1):
        raise ValueError(f"size must be a positive int, a pair (height, width) or None; got {size!r}.")
    return int(pair[0]), int(pair[1])


def _centre_crop_box(height, width, aspect):
    """(left, top, right, bottom) of the largest centred box of ``aspect`` = width / height."""
    w = min(width, max(1, round(height * aspect)))
    h = min(height, max(1, round(width / aspect)))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _photo_from_file(path, name):
    """Decode an image file into a PIL image (EXIF orientation applied) or a float array."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    if hasattr(path, "read"):           # an open file (opened in binary mode, "rb")
        if isinstance(getattr(path, "mode", "rb"), str) and "b" not in getattr(path, "mode", "rb"):
            raise TypeError(f"{name}: the file object is open in text mode ({path.mode!r}); open it with "
                            "open(path, 'rb'), or pass the path itself.")
        source, path = path, Path(str(getattr(path, "name", "the file object")))
    else:
        path = source = Path(path).expanduser()
        if not path.is_file():
            where = "a folder" if path.is_dir() else "no such file"
            raise FileNotFoundError(f"{name}: {path} is {where} (resolved: {path.resolve()}); give the path "
                                    "of an image file (JPEG, PNG, ...).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.width * img.height > MAX_PHOTO_PIXELS:
                    raise ValueError(
                        f"{name}: {path.name} has {img.width} x {img.height} pixels, more than "
                        f"MAX_PHOTO_PIXELS = {MAX_PHOTO_PIXELS:,}; resize it (e.g. to 2000 px) first.")
                img.draft("RGB", (1024, 1024))  # JPEG: decode at a reduced scale, much faster
                img = ImageOps.exif_transpose(img)  # phone photos: the orientation tag
                img.load()
                return _pil_to_photo(img)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{name}: {path.name} is not an image file Pillow can read "
                         f"({type(err).__name__}: {err}).") from None
    except (OSError, SyntaxError) as err:  # truncated or corrupt data
        raise ValueError(f"{name}: {path.name} could not be decoded; the file is damaged or truncated "
                         f"({type(err).__name__}: {err}).") from None


def _pil_to_photo(img):
    """A PIL image as an 8-bit RGB PIL image, or a float32 (H, W, 3) array for 16/32-bit modes.
    Transparent pixels are put on white."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        if img.mode == "F":   # a float file has no fixed scale: [0, 1], else 0..255, else refused
            if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 255:
                raise ValueError(
                    f"A floating-point image file must hold values in [0, 1] or 0..255; this one holds "
                    f"{np.nanmin(arr):.4g} .. {np.nanmax(arr):.4g}. Rescale it to [0, 1] (e.g. with NumPy) "
                    "and pass the array.")
            top = 1.0 if arr.max() <= 1 else 255.0
        else:
            top = 65535.0
        return np.repeat(np.clip(arr / top, 0, 1)[..., None], 3, axis=-1)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _photo_from_array(arr, name):
    """An array photo as float32 (H, W, 3) in [0, 1]; clear errors for every other shape/scale."""
    if hasattr(arr, "detach"):
        raise TypeError(f"{name}: got a torch tensor; pass an array (H, W, 3) in [0, 1] "
                        "(e.g. tensor.permute(1, 2, 0).numpy()).")
    a = np.asarray(arr)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise TypeError(f"{name} must be a path, a PIL image or an array of numbers; got "
                        f"{type(arr).__name__} of dtype {a.dtype}.")
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} has shape {a.shape}: channels first. Pass (H, W, 3) "
                         "(e.g. np.transpose(image, (1, 2, 0))).")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"{name} must have shape (H, W), (H, W, 3) or (H, W, 4); got {a.shape}.")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} is empty (shape {a.shape}).")
    if a.dtype == bool:
        x = a.astype(np.float32)
    elif a.dtype == np.uint8:
        x = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        x = a.astype(np.float32) / 65535.0
    elif np.issubdtype(a.dtype, np.floating):
        x = a.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} contains NaN or infinite values.")
        if x.min() < 0 or x.max() > 1:
            hint = (" It looks like 0..255: divide by 255 or pass uint8." if x.min() >= 0 and x.max() <= 255
                    else "")
            raise ValueError(f"{name}: a float photo must hold values in [0, 1]; got {x.min():.4g} .. "
                             f"{x.max():.4g}.{hint}")
    else:
        raise TypeError(f"{name} has dtype {a.dtype}; pass uint8 (0..255), uint16 (0..65535) or "
                        "floats in [0, 1] (e.g. image.astype(np.uint8)).")
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.shape[-1] == 4:  # alpha: put the photo on white
        alpha = x[..., 3:]
        x = x[..., :3] * alpha + (1.0 - alpha)
    return x


def load_photo(photo, size=224, *, fit="crop", name="photo"):
    """A photo as float32 RGB ``(H, W, 3)`` in [0, 1], the input range of the course's models.

    ``photo``: a path to an image file or an open binary file (EXIF orientation applied;
    transparency on white; 16-bit files scaled by 65535; floating-point files taken as [0, 1],
    or as 0..255 when they hold values above 1), a PIL image, or an array ``(H, W[, 3 or 4])`` of uint8,
    uint16, bool or floats in [0, 1]. ``size``: an int (square), ``(height, width)``, or
    None (keep the size). ``fit="crop"`` cuts the largest centred box of the target's
    aspect ratio, then resizes (bicubic); ``fit="stretch"`` resizes the whole picture.
    A file that is missing, not an image, damaged or huge raises an error saying so.
    """
    from PIL import Image

    if fit not in ("crop", "stretch"):
        raise ValueError(f"fit must be 'crop' or 'stretch', got {fit!r}.")
    hw = _photo_size(size)
    if isinstance(photo, (str, os.PathLike)) or hasattr(photo, "read"):
        src = _photo_from_file(photo, name)
    elif isinstance(photo, Image.Image):
        src = _pil_to_photo(photo)
    else:
        src = _photo_from_array(photo, name)
    height, width = (src.height, src.width) if isinstance(src, Image.Image) else src.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"{name} is empty ({width} x {height} pixels).")
    if hw is None:
        hw = (height, width)
    box = (_centre_crop_box(height, width, hw[1] / hw[0]) if fit == "crop" else (0, 0, width, height))
    if isinstance(src, Image.Image):
        if box != (0, 0, width, height) or hw != (height, width):
            src = src.resize((hw[1], hw[0]), Image.Resampling.BICUBIC, box=box)
        return np.asarray(src, dtype=np.float32) / 255.0
    if box == (0, 0, width, height) and hw == (height, width):
        return np.ascontiguousarray(src, dtype=np.float32)
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(src[..., c])).resize(
        (hw[1], hw[0]), Image.Resampling.BICUBIC, box=box), dtype=np.float32) for c in range(3)]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def sample_photos(names=None, size=224, *, fit="crop"):
    """The course's sample photographs (``SAMPLE_PHOTOS``, shipped inside scikit-image).

    Returns ``{name: float32 (H, W, 3) in [0, 1]}`` in the order asked, each through
    ``load_photo(..., size, fit=fit)``. ``names``: None (all) or a list of keys of
    ``SAMPLE_PHOTOS``.
    """
    from skimage import data

    if names is None:
        names = list(SAMPLE_PHOTOS)
    elif isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in SAMPLE_PHOTOS]
    if unknown:
        raise ValueError(f"Unknown sample photo(s) {', '.join(map(repr, unknown))}; the samples are "
                         f"{', '.join(SAMPLE_PHOTOS)}. For your own photo use load_photo(path).")
    out = {}
    for n in names:
        img = getattr(data, SAMPLE_PHOTOS[n])()
        if isinstance(img, tuple):  # stereo pair: the left view
            img = img[0]
        out[n] = load_photo(img, size, fit=fit, name=n)
    return out


def composite_photo(left, right, size=224, split=0.5):
    """Two photos side by side in one ``(size, size, 3)`` image: the several-objects test.

    ``left`` fills the left ``split`` of the width, ``right`` the rest; each is the
    centred crop of its photo with its part's aspect ratio (``load_photo(..., fit="crop")``),
    so neither is distorted. ``left``/``right``: anything ``load_photo`` takes.
    Returns float32 in [0, 1].
    """
    hw = _photo_size(size)
    if hw is None:
        raise ValueError("size must be a positive int or a pair (height, width) for a composite, got None.")
    if not _is_number(split) or not 0.0 < float(split) < 1.0:
        raise ValueError(f"split must lie strictly between 0 and 1 (the left part's share of the width), "
                         f"got {split!r}.")
    w_left = int(round(hw[1] * float(split)))
    if not 1 <= w_left < hw[1]:
        raise ValueError(f"split={split} leaves an empty part at width {hw[1]}; choose a split nearer 0.5.")
    a = load_photo(left, (hw[0], w_left), name="left")
    b = load_photo(right, (hw[0], hw[1] - w_left), name="right")
    return np.concatenate([a, b], axis=1)
