"""Argument checks and conversions, in one place and one message style.

Each check raises ``ValueError`` (a bad value) or ``TypeError`` (a bad type) whose message
names the argument, says what was expected and what came, and where it helps, what to do.
Checks that need a model (a layer name, an input range) live beside the code that knows
the model.
"""
from __future__ import annotations


import numpy as np


def _is_int(value):
    """True for an integer (Python or NumPy), not a bool: the test behind every count and index argument."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value):
    """True for a finite real number (not a bool, not a string)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
            and bool(np.isfinite(value)))


def _converted(value, name, expected, convert=lambda v: np.asarray(v, dtype=np.float64)):
    """``convert(value)`` (by default a float64 array), or a TypeError saying that ``name``
    must be ``expected`` (e.g. "an array of numbers (N, D)")."""
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}.") from None


def _check_seed(seed, name="seed", allow_none=False):
    """A random seed: an integer from 0 to 2**32 - 1 (or None where ``allow_none``)."""
    if seed is None and allow_none:
        return None
    if not _is_int(seed) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}an integer from 0 to 2**32 - 1, "
                         f"got {seed!r}.")
    return int(seed)


def _check_batch_size(batch_size):
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return int(batch_size)


def _as_name_list(layer_names):
    """One layer name or an iterable of them, as a list."""
    if isinstance(layer_names, str):
        return [layer_names]
    try:
        return list(layer_names)
    except TypeError:
        raise TypeError(f"layer_names must be a layer name, a list of names or None, got "
                        f"{type(layer_names).__name__}.") from None


def _check_unit_indices(index, n_units, layer_name, rank):
    what = "filters" if rank == 4 else "units"
    if index is None:
        return np.arange(n_units)
    idx = np.atleast_1d(np.asarray(index))
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or idx.dtype == bool or idx.size == 0:
        raise TypeError(f"units must be an int or a list of ints (or None for all {what}); got {index!r}.")
    bad = idx[(idx < 0) | (idx >= n_units)]
    if bad.size:
        raise ValueError(
            f"units {bad.tolist()} out of range: layer {layer_name!r} has {n_units} {what}, "
            f"valid indices are 0 to {n_units - 1}."
        )
    return idx.astype(np.int64)


def _check_hw(value, name):
    try:
        hw = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        hw = ()
    if len(hw) != 2 or min(hw) < 1 or any(int(v) != v for v in value):
        raise ValueError(f"{name} must be (height, width), two positive integers; got {value!r}.")
    return hw


def _check_score(score):
    if score not in ("logits", "probability"):
        raise ValueError(f"score must be 'logits' (pre-softmax, the default) or 'probability', got {score!r}.")


def _looks_like_probabilities(out):
    """Class scores (N, K >= 2) whose rows are non-negative and sum to one (as
    ``fit_temperature`` recognises probabilities): a softmax the engines could not see in
    the model's structure (``F.softmax`` in a forward, a Keras ``Lambda``)."""
    o = np.asarray(out, dtype=np.float64)
    return (o.ndim == 2 and o.shape[1] >= 2 and len(o) > 0 and bool(np.all(np.isfinite(o)))
            and o.min() >= 0 and np.allclose(o.sum(axis=1), 1.0, atol=1e-4))


def _check_flags(**flags):
    """Options that are True or False (a string such as "no" would count as True)."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}.")


def _as_class_matrix(values, name):
    """``values`` as float64 (N, num_classes), at least 2 classes, finite."""
    z = _converted(values, name, "an array of numbers (N, num_classes)")
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"{name} must be a 2-D array (N, num_classes) with at least 2 classes; "
                         f"got shape {z.shape}.")
    if not np.all(np.isfinite(z)):
        raise ValueError(f"{name} contain NaN or infinite values.")
    return z


def _as_logits(logits, name="logits"):
    return _as_class_matrix(logits, name)


def _as_labels(labels, n, num_classes, name="labels"):
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape == (n, num_classes):
        raise ValueError(f"{name} must be class indices of shape ({n},); got one-hot rows {y.shape}: "
                         "use labels.argmax(axis=1).")
    if y.ndim == 1 and len(y) != n:
        raise ValueError(f"There must be the same number of images and labels (one label per row): "
                         f"{n} rows, but {name} has {len(y)} (shape {y.shape}).")
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), one per row; got shape {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name} must be integer class indices, got dtype {y.dtype}.")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} must lie in 0..{num_classes - 1}; got {y.min()}..{y.max()}.")
    return y.astype(np.int64)


def _as_probs(probs):
    p = _as_class_matrix(probs, "probs")
    if p.size and p.min() < 0:
        raise ValueError(f"probs must be non-negative (softmax outputs); got values down to {p.min():.4g}. "
                         "Did you pass logits? Use cnn_utils.softmax(logits) first.")
    sums = p.sum(axis=1)
    if len(p) and not np.allclose(sums, 1.0, atol=1e-3):
        raise ValueError("Each row of probs must sum to 1 (softmax outputs); "
                         f"row sums range from {sums.min():.4g} to {sums.max():.4g}. "
                         "Did you pass logits? Use cnn_utils.softmax(logits) first.")
    return p


def _check_temperature(temperature):
    if not _is_number(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}.")


def _check_pca_components(pca_components, x):
    if pca_components is not None and (not _is_int(pca_components) or not 2 <= pca_components <= min(x.shape)):
        raise ValueError(f"pca_components must be None or an integer from 2 to min(N, D) = {min(x.shape)}, "
                         f"got {pca_components!r}.")


def _check_positive(value, name):
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")


def _check_unit_maps(maps, name):
    """Maps drawn on the colour scale [0, 1] must lie in it (nothing silently clipped)."""
    m = np.asarray(maps, dtype=np.float64)
    if m.size and (m.min() < -1e-3 or m.max() > 1 + 1e-3):
        raise ValueError(f"{name} are drawn on the scale [0, 1] but hold values from {m.min():.4g} to "
                         f"{m.max():.4g}; scale them first with cnn_utils.normalize_maps(maps) (raw or signed "
                         "maps: plot_signed_attributions).")


def _check_titles(titles, n, name):
    if titles is not None and (isinstance(titles, str) or len(titles) != n):
        raise ValueError(f"{name} must be a list of {n} entries, one per image; got "
                         f"{titles!r}"[:200] + ".")
