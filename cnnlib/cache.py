"""A small disk cache for the long cells of a live demo.

``cached(name, compute, **key)`` returns ``compute()``'s result, from disk when the same
computation was done before. The key is a hash of every keyword value: numbers and strings by
their value, arrays by their dtype, shape and bytes, a Keras model or a PyTorch module by its
weights, so a changed seed, dataset, input or model computes again. Results are NumPy arrays, a
dict of arrays and numbers (one ``.npz`` file), or a Keras model (one ``.keras`` file).

Files go to ``$CNN_COURSE_CACHE``, else ``build/cache/``; each is named after the computation
and its key (``tsne-3f2a...npz``) and written to a temporary name first, so nothing else is ever
overwritten and an interrupted run leaves no half-written entry. A file that cannot be read is
computed again, with a one-line note. ``make course`` fills the cache; a live demo then reads it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from .data import BUILD_DIR

#: Environment variable naming the cache folder (default: ``build/cache``).
CACHE_ENV_VAR = "CNN_COURSE_CACHE"


def cache_dir():
    """The cache folder: ``$CNN_COURSE_CACHE``, else ``build/cache`` in the course folder."""
    return Path(os.environ.get(CACHE_ENV_VAR) or BUILD_DIR / "cache")


def _weights(value):
    """A model's weights as arrays (Keras or PyTorch), or None for anything else."""
    if hasattr(value, "get_weights") and hasattr(value, "layers"):          # Keras
        return [np.asarray(w) for w in value.get_weights()]
    if hasattr(value, "state_dict") and hasattr(value, "parameters"):      # PyTorch
        return [t.detach().cpu().numpy() for t in value.state_dict().values()]
    return None


def _feed(h, value):
    weights = _weights(value)
    if weights is not None:
        value = weights
    if isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}[{len(value)}]".encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, dict):
        h.update(f"dict[{len(value)}]".encode())
        for k in sorted(value, key=str):
            h.update(repr(k).encode())
            _feed(h, value[k])
    elif isinstance(value, np.ndarray) or hasattr(value, "__array__") and not np.isscalar(value):
        a = np.ascontiguousarray(np.asarray(value))
        h.update(f"array{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    elif value is None or isinstance(value, (bool, int, float, str, np.generic)):
        h.update(f"{type(value).__name__}:{value!r}".encode())
    else:
        raise TypeError(f"cached: cannot key on a {type(value).__name__}; pass numbers, strings, arrays "
                        "or a model.")


def cache_key(**key):
    """A 16-character hash of the keyword values (arrays by content, models by weights)."""
    h = hashlib.sha256()
    for name in sorted(key):
        h.update(name.encode() + b"=")
        _feed(h, key[name])
    return h.hexdigest()[:16]


def _is_keras_model(value):
    return hasattr(value, "save") and hasattr(value, "get_weights") and hasattr(value, "layers")


def _save(path, value, meta):
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        if path.suffix == ".keras":
            value.save(tmp)
            tmp.with_suffix(".json").write_text(json.dumps(meta))
            os.replace(tmp.with_suffix(".json"), path.with_suffix(".json"))
        else:
            arrays = {k: np.asarray(v) for k, v in (value if isinstance(value, dict) else {"__value__": value}).items()}
            if any(a.dtype == object for a in arrays.values()):
                raise TypeError("only arrays, numbers and dicts of them can be stored")
            np.savez(tmp, __meta__=json.dumps(meta), **arrays)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_suffix(".json")):
            leftover.unlink(missing_ok=True)


def _load(path):
    if path.suffix == ".keras":
        from .models import load_model

        meta = json.loads(path.with_suffix(".json").read_text())
        return load_model(path), meta
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["__meta__"]))
        if "__value__" in f.files:
            return f["__value__"], meta
        return {k: (f[k][()] if f[k].ndim == 0 else f[k]) for k in f.files if k != "__meta__"}, meta


def cached(name, compute, *, verbose=True, **key):
    """``compute()``, or its result stored by an earlier call with the same ``name`` and ``key``.

    ``name`` names the computation (letters, digits, ``_`` and ``-``); ``key`` holds everything the
    result depends on (``seed=SEED, feats=feats, model=model``). Prints one line: where the result
    came from and how long computing it took.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"cached: name must be letters, digits, '_' or '-', got {name!r}.")
    if not callable(compute):
        raise TypeError(f"cached: compute must be a function of no arguments (a lambda), got "
                        f"{type(compute).__name__}.")
    digest = cache_key(**key)
    folder = cache_dir()
    for path in (folder / f"{name}-{digest}.npz", folder / f"{name}-{digest}.keras"):
        if path.exists():
            try:
                value, meta = _load(path)
            except Exception as err:   # damaged, truncated or from another version: compute again
                print(f"{name}: the cached file {path.name} could not be read ({type(err).__name__}); computing again.")
                break
            if verbose:
                print(f"{name}: from the cache (computed on {meta['computed_on']} in {meta['seconds']:.1f} s).")
            return value
    start = time.perf_counter()
    value = compute()
    seconds = time.perf_counter() - start
    path = folder / f"{name}-{digest}{'.keras' if _is_keras_model(value) else '.npz'}"
    meta = {"computed_on": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(seconds, 2), "name": name}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _save(path, value, meta)
        note = ""
    except Exception as err:       # a read-only folder or a value that cannot be stored: still return it
        note = f" (not cached: {type(err).__name__}: {err})"
    if verbose:
        print(f"{name}: computed in {seconds:.1f} s{note}.")
    return value
