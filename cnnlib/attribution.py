"""Attribution machinery: one validated, memory-bounded call for Keras and PyTorch alike.

``_Explained`` checks an attribution call's arguments, picks the engine for the model
(``keras_engine`` or ``torch_engine``), resolves the target classes and splits the batch into
calls that fit ``ATTRIBUTION_MEMORY_BUDGET`` bytes (assignable at run time, or
``$CNN_COURSE_MEMORY_BUDGET_MB``). The methods themselves are in ``cnn_utils``. Also here:
``class_scores``, the randomisation sanity check (``randomize_weights``) and ``rank_correlation``.
"""
from __future__ import annotations

import os

import numpy as np

from .frameworks import _is_torch_module, _keras
from .checks import _as_name_list, _check_seed
from .keras_layers import _check_layers_model, _is_model, _nested_layers, get_layer
from .models import as_image_batch, model_input_range
from .keras_engine import _KerasEngine
from .torch_engine import _TorchEngine


#: The environment variable that sets ATTRIBUTION_MEMORY_BUDGET in MiB (default 1024); the
#: course's JupyterHub sets 256 so that a class fits one server (README, sizing the hub).
MEMORY_BUDGET_ENV_VAR = "CNN_COURSE_MEMORY_BUDGET_MB"


def _memory_budget_from_env(default_mib=1024):
    value = os.environ.get(MEMORY_BUDGET_ENV_VAR, "").strip()
    if not value:
        return default_mib << 20
    try:
        mib = int(value)
        if mib < 16:
            raise ValueError
    except ValueError:
        import warnings

        warnings.warn(f"{MEMORY_BUDGET_ENV_VAR}={value!r} is not a whole number of MiB >= 16; "
                      f"using {default_mib}. Set it to e.g. 256, or unset it.", stacklevel=2)
        return default_mib << 20
    return mib << 20


#: Bytes of intermediate values (activations, their gradients) one call into the
#: model may hold. Every method splits its batch (and Score-CAM / occlusion their
#: masked copies) into calls below this, so memory stays bounded whatever the batch.
#: 1 GiB unless $CNN_COURSE_MEMORY_BUDGET_MB says otherwise; assignable at run time.
ATTRIBUTION_MEMORY_BUDGET = _memory_budget_from_env()


def _chunks(n, bytes_per_item):
    """Slices of n items so that each slice holds at most ATTRIBUTION_MEMORY_BUDGET bytes."""
    step = int(max(1, ATTRIBUTION_MEMORY_BUDGET // max(1, int(bytes_per_item))))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _first_copies(x):
    """For each image of the batch x, the index of its first identical copy in x: the
    class-independent passes (Score-CAM's masks, occlusion's windows) run once per photo."""
    import hashlib

    seen = {}
    return np.array([seen.setdefault(hashlib.blake2b(np.ascontiguousarray(xi).tobytes(), digest_size=16).digest(), i)
                     for i, xi in enumerate(x)], dtype=np.int64)


def _class_indices(class_index, n, num_classes):
    """Per-image target classes as int32 (N,), with -1 meaning 'the predicted class'."""
    if class_index is None:
        return np.full(n, -1, dtype=np.int32)
    arr = np.asarray(class_index)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"class_index must be None, an int or one int per image; got {class_index!r}.")
    if arr.ndim == 0:
        arr = np.full(n, int(arr))
    elif arr.shape != (n,):
        raise ValueError(
            f"class_index must be None, an int, or one int per image (shape ({n},)); got shape {arr.shape}."
        )
    bad = (arr < 0) | (arr >= num_classes)
    if np.any(bad):
        raise ValueError(
            f"class_index {arr[bad][0]} is out of range: the model has {num_classes} classes (0..{num_classes - 1})."
        )
    return arr.astype(np.int32)


def _as_model_images(images, model, name):
    """``as_image_batch`` for a Keras model or a PyTorch module (its declared input range)."""
    if _is_torch_module(model):
        return as_image_batch(images, None, name=name, input_range=model_input_range(model))
    return as_image_batch(images, model, name=name)


def _baseline_value(value, model):
    """A baseline given as one number: finite and inside the model's input range."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"baseline must be a number or an image, got {value!r}.")
    if not np.isfinite(value):
        raise ValueError(f"baseline contains NaN or infinite values ({value!r}).")
    rng = model_input_range(model)
    if rng is not None and not rng[0] - 1e-3 * (rng[1] - rng[0]) <= value <= rng[1] + 1e-3 * (rng[1] - rng[0]):
        raise ValueError(f"baseline {value!r} lies outside the model's input range [{rng[0]:g}, {rng[1]:g}]; "
                         f"choose a pixel value inside it (e.g. {rng[0]:g} for black).")
    return float(value)


def _no_layer(layer, method):
    if layer is not None:
        raise ValueError(f"{method} attributes to the input pixels: layer must be None, got {layer!r} "
                         "(layer chooses the feature maps of the CAM methods).")


def _engine(model, score):
    if _is_torch_module(model):
        return _TorchEngine(model, score)
    return _KerasEngine(model, score)


class _Explained:
    """Validated arguments of one attribution call: engine, images x, classes cls."""

    def __init__(self, model, images, class_index, score):
        self.engine = _engine(model, score)
        self.x = self.engine.images(images)
        if len(self.x) == 0:
            raise ValueError("images is empty: pass at least one image (N >= 1).")
        self.cls = _class_indices(class_index, len(self.x), self.engine.num_classes)
        self.per_image = self.engine.bytes_per_image(self.x)

    def chunks(self, copies=1, factor=3):
        """Slices of the batch whose ``copies`` inputs per image fit the memory budget
        (``factor``: activations kept for the backward pass, and their gradients)."""
        return _chunks(len(self.x), copies * factor * self.per_image)

    def fix_classes(self):
        """Resolve 'predicted class' (-1) on the clean images, chunk by chunk."""
        if np.any(self.cls < 0):
            for part in self.chunks(factor=1):
                scores = self.engine.forward(self.x[part])
                self.cls[part] = np.where(self.cls[part] < 0, scores.argmax(axis=1), self.cls[part])
        return self.cls


def class_scores(model, images, class_index=None, score="logits"):
    """Target class scores and classes: returns ``(scores (N,), classes (N,))``.

    ``class_index=None`` picks each image's predicted class. Scores are
    pre-softmax by default (``score="probability"`` for softmax outputs).
    Keras model or PyTorch module.
    """
    e = _Explained(model, images, class_index, score)
    cls = e.fix_classes()
    out = np.empty(len(e.x), np.float32)
    for part in e.chunks(factor=1):
        s = e.engine.forward(e.x[part])
        out[part] = s[np.arange(len(s)), cls[part]]
    return out, cls.astype(np.int64)


def randomize_weights(model, layer_names=None, seed=0):
    """A copy of ``model`` whose ``layer_names`` (``None``: all) are re-initialised.

    The other layers keep the trained weights. Used for the model-randomisation
    sanity check of Adebayo et al. (2018), including its cascading form
    (re-initialise from the top layer down, one more layer each time). Layers inside
    a nested model are named as everywhere (``"Conv1"`` or ``"base/Conv1"``); naming the
    nested model re-initialises all of its layers.
    """
    keras = _keras()
    _check_layers_model(model)
    seed = _check_seed(seed)
    if layer_names is None:
        chosen = list(model.layers)
    else:
        chosen = [get_layer(model, name) for name in _as_name_list(layer_names)]
    fresh = set()
    for layer in chosen:
        fresh.add(id(layer))
        if _is_model(layer):
            fresh.update(id(chain[-1]) for _, chain in _nested_layers(layer))
    keras.utils.set_random_seed(seed)
    clone = keras.models.clone_model(model)
    copies = dict(_nested_layers(clone))
    for name, chain in _nested_layers(model):
        layer = chain[-1]
        if not _is_model(layer) and id(layer) not in fresh and layer.weights:
            copies[name][-1].set_weights(layer.get_weights())
    return clone


#: The course's one rule for the model-randomisation test (Adebayo et al., 2018): a method
#: passes when its maps of the randomised model have a mean Spearman rank correlation with the
#: trained model's maps of magnitude below this value (the map then depends on the weights).
SANITY_THRESHOLD = 0.5


def sanity_verdict(rho, threshold=None):
    """``"passes"`` if ``|mean rho| < threshold`` (0.5, ``SANITY_THRESHOLD``), else ``"fails"``.

    ``rho``: one rank correlation or an array of them (trained vs randomised maps, e.g. from
    ``rank_correlation``); the mean is taken. Every notebook reads the test with this rule.
    """
    threshold = SANITY_THRESHOLD if threshold is None else threshold
    try:
        value = float(np.mean(np.asarray(rho, dtype=np.float64)))
    except (TypeError, ValueError):
        raise TypeError(f"rho must be a number or an array of rank correlations, got {type(rho).__name__}.") from None
    if not np.isfinite(value) or not 0 < float(threshold) <= 1:
        raise ValueError(f"rho must be finite and threshold in (0, 1]; got {value} and {threshold!r}.")
    return "passes" if abs(value) < float(threshold) else "fails"


#: Within this distance of the threshold a verdict is **borderline**: ``|mean rho|`` in (0.4, 0.6)
#: is neither a clear pass nor a clear fail; another seed or set of images may land on either side.
SANITY_MARGIN = 0.1


def sanity_borderline(rho, threshold=None, margin=None):
    """True if ``| |mean rho| - threshold | < margin`` (0.5 and 0.1, ``SANITY_THRESHOLD`` and
    ``SANITY_MARGIN``): the course then says "borderline" instead of ``sanity_verdict``'s word."""
    threshold = SANITY_THRESHOLD if threshold is None else threshold
    margin = SANITY_MARGIN if margin is None else margin
    sanity_verdict(rho, threshold)                       # the same checks of rho and threshold
    if not 0 <= float(margin) < 1:
        raise ValueError(f"margin must be in [0, 1); got {margin!r}.")
    return bool(abs(abs(float(np.mean(np.asarray(rho, dtype=np.float64)))) - float(threshold)) < float(margin))


def median_seconds(fn, repeats=5, warmup=1):
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls
    (the first call compiles). One timed call is not a measurement: the course compares costs only
    with this. Returns ``(median, all times)``."""
    import time

    if not callable(fn):
        raise TypeError(f"fn must be a function of no arguments, got {type(fn).__name__}.")
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    for _ in range(int(warmup)):
        fn()
    times = []
    for _ in range(int(repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), np.asarray(times)


def cost_words(seconds, tolerance=1.25):
    """Rank methods by cost, saying "about the same" for those within ``tolerance`` (ratio) of the
    cheapest, and of the dearest: ``{"cheapest": [names], "dearest": [names], "ratio": dearest /
    cheapest}`` (each list in order, the extreme first). ``seconds``: ``{method: median seconds}``
    from ``median_seconds``."""
    if not isinstance(seconds, dict) or len(seconds) < 2:
        raise ValueError("seconds must be a dict of at least two methods' median times.")
    low = min(seconds.values())
    if not low > 0:
        raise ValueError(f"times must be positive, got {seconds}.")
    cheapest = sorted((n for n, s in seconds.items() if s <= low * tolerance), key=seconds.get)
    high = max(seconds.values())
    dearest = sorted((n for n, s in seconds.items() if s * tolerance >= high), key=seconds.get, reverse=True)
    return {"cheapest": cheapest, "dearest": dearest, "ratio": high / low}


def rank_correlation(maps_a, maps_b):
    """Spearman rank correlation of two batches of maps, one value per image (N,).

    A constant map (e.g. an empty Grad-CAM) has no ranking: two constant maps
    count as agreeing (1.0), a constant map against a varying one as 0.0.
    """
    from scipy.stats import spearmanr

    try:
        a = np.asarray(maps_a, dtype=np.float64)
        b = np.asarray(maps_b, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"maps_a and maps_b must be arrays of numbers (N, H, W), got {type(maps_a).__name__} "
                        f"and {type(maps_b).__name__}.") from None
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"maps_a and maps_b must be batches of the same shape; got {a.shape} and {b.shape}.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("maps_a and maps_b must not contain NaN or infinite values (a map has no ranking then).")
    out = []
    for u, v in zip(a.reshape(len(a), -1), b.reshape(len(b), -1)):
        if np.ptp(u) == 0 or np.ptp(v) == 0:
            out.append(1.0 if np.ptp(u) == np.ptp(v) == 0 else 0.0)
        else:
            out.append(spearmanr(u, v).statistic)
    return np.asarray(out, dtype=np.float64)
