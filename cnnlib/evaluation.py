"""Is the explanation right? Metrics for attribution maps.

Two families, one convention each:

* **Ground truth (localisation)**, when we know where the evidence is (a planted cue):
  ``pointing_game``, ``relevance_mass``, ``relevance_rank`` take ``maps (N, H, W)`` and
  boolean ``masks (N, H, W)`` (or one ``(H, W)`` mask for every image). They do not need
  the model: the map alone is judged against the mask.
* **Faithfulness**, when we ask whether the map ranks pixels the way the *model* uses them:
  ``deletion``, ``insertion`` (Petsiuk et al., 2018) and ``road`` (Rong et al., 2022) share
  the course's attribution API, ``f(model, images, maps, class_index=None, *,
  score="logits", ...)``: a Keras model or a PyTorch module, ``images (N, H, W, C)`` in the
  model's input range, ``maps (N, H, W)``. The class is fixed on the clean image
  (``None``: its predicted class) and read with ``class_scores`` in batches of
  bounded memory. Each returns a ``Curve(fractions, scores, area)``.

Baselines any method should beat: ``random_maps`` and ``sobel_maps`` (an edge detector,
which knows nothing about the model).

Ties: where a map has equal values (an empty Grad-CAM is all zeros), the order among them is
drawn at random with ``seed`` (the same for every metric), so that a flat map is judged as
chance, not as "the top rows first".
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .frameworks import _is_torch_module, _min_max_scaled
from .checks import _check_seed, _is_int
from .models import as_image_batch, model_input_range
from . import attribution
from .attribution import class_scores

#: Values that replace removed pixels in ``deletion`` / ``insertion``.
REPLACEMENTS = ("black", "mean", "blur")


class Curve(NamedTuple):
    """A perturbation curve: ``fractions`` (S,) of pixels perturbed, the class ``scores``
    (N, S) after each step, and ``area`` (N,) under the curve (trapezoidal rule over
    ``fractions``, which run from 0 to 1 for deletion and insertion)."""
    fractions: np.ndarray
    scores: np.ndarray
    area: np.ndarray


# -- arguments -----------------------------------------------------------------------------

def _as_maps(maps, name="maps"):
    try:
        m = np.asarray(maps, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an array of numbers (N, H, W), got {type(maps).__name__}.") from None
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W) (one map per image, channels reduced); "
                         f"got shape {m.shape}. Reduce channels first, e.g. np.abs(a).max(axis=-1).")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name} contain NaN or infinite values; a map must be finite to rank its pixels.")
    return m


def _as_masks(masks, shape):
    g = np.asarray(masks)
    if g.dtype != bool:
        if not np.isin(g, (0, 1)).all():
            raise ValueError("masks must be boolean (True on the ground truth) or 0/1 arrays.")
        g = g.astype(bool)
    if g.shape == shape[1:]:
        g = np.broadcast_to(g, shape)
    if g.shape != shape:
        raise ValueError(f"masks must have the maps' shape {shape} or one mask {shape[1:]} for all; "
                         f"got {g.shape}.")
    empty = ~g.reshape(len(g), -1).any(axis=1)
    if empty.any():
        raise ValueError(f"mask {int(np.argmax(empty))} is empty: every image needs a ground-truth region.")
    return g


def pixel_order(maps, seed=0, *, most_relevant_first=True):
    """For each map, the flat pixel indices from the most to the least relevant
    (``most_relevant_first=False``: the reverse), equal values in an order drawn with
    ``seed``. (N, H, W) -> int (N, H*W)."""
    m = _as_maps(maps)
    flat = m.reshape(len(m), -1)
    tiebreak = np.random.default_rng(_check_seed(seed)).random(flat.shape)
    key = -flat if most_relevant_first else flat
    return np.lexsort((tiebreak, key), axis=-1)


# -- ground truth ----------------------------------------------------------------------------

def pointing_game(maps, masks):
    """Pointing game (Zhang et al., 2018): does the map's maximum fall on the ground truth?

    ``hit_n = |argmax(M_n) ∩ G_n| / |argmax(M_n)|``: 1 or 0 when the maximum is one pixel;
    with ties, the chance that a maximum picked at random falls inside (a constant map
    scores the mask's area, as chance does). No tolerance margin. maps (N, H, W), masks
    (N, H, W) or (H, W) boolean -> float (N,).
    """
    m = _as_maps(maps)
    g = _as_masks(masks, m.shape).reshape(len(m), -1)
    flat = m.reshape(len(m), -1)
    top = flat == flat.max(axis=1, keepdims=True)
    return (top & g).sum(axis=1) / top.sum(axis=1)


def relevance_mass(maps, masks):
    """Relevance mass accuracy (Arras et al., 2022, CLEVR-XAI): the share of the map's
    positive relevance that lies inside the ground truth,
    ``sum_{p in G} R+_p / sum_p R+_p`` with ``R+ = max(R, 0)``. 0 for a map without
    positive relevance. Chance (a uniform map) is the mask's area.
    maps (N, H, W), masks (N, H, W) or (H, W) -> float (N,).
    """
    m = np.maximum(_as_maps(maps), 0.0)
    g = _as_masks(masks, m.shape)
    total = m.sum(axis=(1, 2))
    inside = (m * g).sum(axis=(1, 2))
    return np.where(total > 0, inside / np.where(total > 0, total, 1.0), 0.0)


def relevance_rank(maps, masks, seed=0):
    """Relevance rank accuracy (Arras et al., 2022): with ``K = |G|`` pixels in the ground
    truth, the fraction of the map's ``K`` highest pixels that lie inside it,
    ``|top_K(M) ∩ G| / K`` (ties in the order drawn with ``seed``). Chance is the mask's
    area. maps (N, H, W), masks (N, H, W) or (H, W) -> float (N,).
    """
    m = _as_maps(maps)
    g = _as_masks(masks, m.shape).reshape(len(m), -1)
    order = pixel_order(m, seed)
    k = g.sum(axis=1)
    inside = np.take_along_axis(g, order, axis=1)
    top = np.arange(order.shape[1])[None, :] < k[:, None]
    return (inside & top).sum(axis=1) / k


# -- baselines -------------------------------------------------------------------------------

def random_maps(images, seed=0):
    """Uniform random maps, one per image: (N, H, W[, C]) images -> float32 (N, H, W) in
    [0, 1). The baseline that knows neither the model nor the image."""
    shape = np.shape(images)
    if len(shape) not in (3, 4):
        raise ValueError(f"images must be (N, H, W, C) or (N, H, W); got shape {shape}.")
    return np.random.default_rng(_check_seed(seed)).random(shape[:3]).astype(np.float32)


def sobel_maps(images):
    """Edge strength (scikit-image's Sobel filter on the channel mean), min-max scaled per
    image: (N, H, W[, C]) -> float32 (N, H, W). The baseline that knows the image but not
    the model."""
    from skimage.filters import sobel

    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 4:
        x = x.mean(axis=-1)
    if x.ndim != 3:
        raise ValueError(f"images must be (N, H, W, C) or (N, H, W); got shape {np.shape(images)}.")
    e = np.stack([sobel(i) for i in x])
    return _min_max_scaled(e, (1, 2))[0].astype(np.float32)


# -- faithfulness ----------------------------------------------------------------------------

def _model_images(model, images):
    if _is_torch_module(model):
        return as_image_batch(images, None, input_range=model_input_range(model))
    return as_image_batch(images, model)


def _inputs(model, images, maps, class_index, score):
    """Validated images (N, H, W, C), maps (N, H, W), classes (N,) and clean scores (N,)."""
    x = _model_images(model, images)
    m = _as_maps(maps)
    if m.shape != x.shape[:3]:
        raise ValueError(f"maps must have shape {x.shape[:3]} (one (H, W) map per image); got {m.shape}.")
    clean, cls = class_scores(model, x, class_index, score=score)
    return x, m, cls, clean


def replacement_images(images, replacement="black", *, sigma=None, low=0.0):
    """What removed pixels become: ``"black"`` (``low``, the bottom of the model's input range,
    0 for the course's models), ``"mean"`` (each image's mean colour), ``"blur"`` (the image
    blurred with a Gaussian of ``sigma`` pixels; default ``max(2, min(H, W) / 45)``, RISE's
    5 pixels on 224), a number, or an image (H, W, C). (N, H, W, C) -> float32 (N, H, W, C).
    (Quantus' ``perturb_baseline="black"`` is each image's minimum instead, the same on a digit
    with a black background, not on a photo.)"""
    x = np.asarray(images, dtype=np.float32)
    if isinstance(replacement, str):
        if replacement == "black":
            return np.full_like(x, low)
        if replacement == "mean":
            return np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape).astype(np.float32)
        if replacement == "blur":
            from scipy.ndimage import gaussian_filter

            s = max(2.0, min(x.shape[1:3]) / 45) if sigma is None else float(sigma)
            if not s > 0:
                raise ValueError(f"sigma must be a positive number of pixels, got {sigma!r}.")
            return gaussian_filter(x, sigma=(0, s, s, 0), mode="nearest").astype(np.float32)
        raise ValueError(f"replacement must be one of {REPLACEMENTS}, a number or an image; got {replacement!r}.")
    r = np.asarray(replacement, dtype=np.float32)
    if r.ndim == 0 or r.shape == x.shape[1:] or r.shape == x.shape:
        return np.broadcast_to(r, x.shape).astype(np.float32)
    raise ValueError(f"replacement must be one of {REPLACEMENTS}, a number, or an image of shape "
                     f"{x.shape[1:]}; got shape {r.shape}.")


def _step_counts(n_pixels, steps):
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be a positive int (points on the curve after the first); got {steps!r}.")
    counts = np.round(np.linspace(0.0, 1.0, int(steps) + 1) * n_pixels).astype(np.int64)
    return counts / n_pixels, counts


def _scores_of(model, batch, cls, score):
    return class_scores(model, batch, cls, score=score)[0]


def _images_per_call(copies, image_bytes):
    budget = max(1 << 20, attribution.ATTRIBUTION_MEMORY_BUDGET // 4)
    return max(1, int(budget // max(1, copies * image_bytes)))


def _perturbation_curve(model, images, maps, class_index, score, order, replacement, steps, seed,
                        sigma, insert):
    if order not in ("most", "least"):
        raise ValueError(f"order must be 'most' (most relevant pixels first) or 'least'; got {order!r}.")
    x, m, cls, _ = _inputs(model, images, maps, class_index, score)
    bounds = model_input_range(model)
    low = 0.0 if bounds is None else bounds[0]
    fill = replacement_images(x, replacement, sigma=sigma, low=low)
    N, H, W, C = x.shape
    fractions, counts = _step_counts(H * W, steps)
    rank = np.empty((N, H * W), np.int64)
    np.put_along_axis(rank, pixel_order(m, seed, most_relevant_first=order == "most"),
                      np.arange(H * W)[None], axis=1)
    S = len(counts)
    scores = np.empty((N, S), np.float32)
    step = _images_per_call(S, x[0].nbytes)
    for i in range(0, N, step):
        part = slice(i, min(N, i + step))
        changed = rank[part, None, :] < counts[None, :, None]                  # (n, S, H*W)
        changed = changed.reshape(-1, S, H, W, 1)
        a, b = (fill[part], x[part]) if insert else (x[part], fill[part])
        batch = np.where(changed, b[:, None], a[:, None]).reshape(-1, H, W, C)
        scores[part] = _scores_of(model, batch, np.repeat(cls[part], S), score).reshape(-1, S)
    return Curve(fractions, scores, np.trapezoid(scores, fractions, axis=1))


def deletion(model, images, maps, class_index=None, *, score="logits", order="most", replacement="black",
             steps=20, seed=0, sigma=None):
    """Deletion curve (Petsiuk et al., 2018, RISE): remove the pixels in the map's order and
    watch the class score fall.

    For ``s = 0..steps`` the ``k_s = round(s / steps * H * W)`` pixels ranked first (``order="most"``:
    most relevant first, MoRF; ``"least"``: least relevant first, LeRF) take the
    ``replacement`` value (``"black"``, ``"mean"``, ``"blur"``, a number or an image, see
    ``replacement_images``); ``scores[n, s] = S_c(x_n with those pixels replaced)``. A faithful
    map makes the MoRF curve fall fast (small ``area``) and the LeRF curve stay high.
    Model: Keras or PyTorch; images (N, H, W, C); maps (N, H, W). Returns ``Curve`` with
    fractions ``k_s / (H * W)`` (steps + 1,), scores (N, steps + 1), area (N,).
    """
    return _perturbation_curve(model, images, maps, class_index, score, order, replacement, steps, seed,
                               sigma, insert=False)


def insertion(model, images, maps, class_index=None, *, score="logits", order="most", replacement="blur",
              steps=20, seed=0, sigma=None):
    """Insertion curve (Petsiuk et al., 2018): start from the ``replacement`` image (RISE: a
    blurred copy) and put the original pixels back in the map's order; ``scores[n, s]`` is the
    class score with the ``round(s / steps * H * W)`` first-ranked pixels restored. A faithful
    map makes the curve rise fast (large ``area``). Same arguments and result as ``deletion``.
    """
    return _perturbation_curve(model, images, maps, class_index, score, order, replacement, steps, seed,
                               sigma, insert=True)


# -- ROAD: noisy linear imputation -------------------------------------------------------------

#: ROAD's neighbour weights (Rong et al., 2022): 1/6 for the 4 direct neighbours, 1/12 diagonally.
ROAD_NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
                   ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))


def linear_imputation(image, removed):
    """Fill the ``removed`` pixels of one image (H, W, C) so that each equals the weighted
    mean of its neighbours (``ROAD_NEIGHBOURS``, renormalised at the border), known or
    imputed alike: the sparse linear system ``A v = b`` solved with ``scipy.sparse``
    (one factorisation, every channel). ``removed`` (H, W) boolean. Returns float32 (H, W, C).
    """
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu

    x = np.asarray(image, dtype=np.float64)
    H, W, C = x.shape
    r = np.asarray(removed, dtype=bool).reshape(-1)
    unknown = np.flatnonzero(r)
    out = x.reshape(-1, C).copy()
    if len(unknown) == 0:
        return out.reshape(H, W, C).astype(np.float32)
    var = np.full(H * W, -1, np.int64)
    var[unknown] = np.arange(len(unknown))
    yy, xx = np.divmod(unknown, W)
    rows, cols, vals = [], [], []
    diag = np.zeros(len(unknown))
    b = np.zeros((len(unknown), C))
    for (dy, dx), w in ROAD_NEIGHBOURS:
        ny, nx = yy + dy, xx + dx
        ok = (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
        idx = np.flatnonzero(ok)
        nb = ny[ok] * W + nx[ok]
        diag[idx] += w
        known = ~r[nb]
        b[idx[known]] += w * out[nb[known]]
        rows.append(idx[~known])
        cols.append(var[nb[~known]])
        vals.append(np.full((~known).sum(), -w))
    rows.append(np.arange(len(unknown)))
    cols.append(np.arange(len(unknown)))
    vals.append(diag)
    A = csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                   shape=(len(unknown), len(unknown)))
    out[unknown] = splu(A).solve(b)
    return out.reshape(H, W, C).astype(np.float32)


def road(model, images, maps, class_index=None, *, score="logits", order="most",
         fractions=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), noise=0.01, seed=0):
    """ROAD, RemOve And Debias (Rong et al., 2022): remove a fraction of the pixels in the
    map's order (``"most"`` relevant first, MoRF, or ``"least"``, LeRF) and fill them by noisy
    linear imputation (``linear_imputation`` plus Gaussian noise of standard deviation
    ``noise``, in the model's input units), which leaks less of the removed shape to the model
    than a constant fill. ``scores[n, j] = S_c(x_n imputed at fractions[j])``; the first column
    is the clean image (fraction 0). pytorch-grad-cam reports ``scores[:, j] - scores[:, 0]``
    (its "percentile" is ``100 * (1 - fraction)`` for MoRF). Returns ``Curve`` with fractions
    (F + 1,), scores (N, F + 1), area (N,) under the curve over ``fractions``.
    """
    if order not in ("most", "least"):
        raise ValueError(f"order must be 'most' (most relevant pixels first) or 'least'; got {order!r}.")
    f = np.asarray(fractions, dtype=np.float64).reshape(-1)
    if len(f) == 0 or not np.all((f > 0) & (f < 1)):
        raise ValueError(f"fractions must be numbers strictly between 0 and 1; got {fractions!r}.")
    if not (isinstance(noise, (int, float, np.floating)) and not isinstance(noise, bool) and noise >= 0):
        raise ValueError(f"noise must be a non-negative number (standard deviation); got {noise!r}.")
    x, m, cls, clean = _inputs(model, images, maps, class_index, score)
    N, H, W, C = x.shape
    order_px = pixel_order(m, seed, most_relevant_first=order == "most")
    rng = np.random.default_rng(_check_seed(seed))
    counts = np.round(f * H * W).astype(np.int64)
    scores = np.empty((N, len(f) + 1), np.float32)
    scores[:, 0] = clean
    step = _images_per_call(len(f), x[0].nbytes)
    for i in range(0, N, step):
        idx = range(i, min(N, i + step))
        batch = np.empty((len(idx), len(f), H, W, C), np.float32)
        for a, n in enumerate(idx):
            for j, k in enumerate(counts):
                removed = np.zeros(H * W, bool)
                removed[order_px[n, :k]] = True
                filled = linear_imputation(x[n], removed.reshape(H, W))
                if noise > 0:
                    filled[removed.reshape(H, W)] += noise * rng.standard_normal((k, C), dtype=np.float32)
                batch[a, j] = filled
        scores[i:i + len(idx), 1:] = _scores_of(model, _clip(model, batch.reshape(-1, H, W, C)),
                                                np.repeat(cls[i:i + len(idx)], len(f)), score).reshape(-1, len(f))
    grid = np.concatenate([[0.0], f])
    return Curve(grid, scores, np.trapezoid(scores, grid, axis=1))


def _clip(model, batch):
    """Imputed images clipped to the model's input range (noise may step outside it)."""
    r = model_input_range(model)
    return batch if r is None else np.clip(batch, r[0], r[1])
