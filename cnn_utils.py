"""Helpers for the course "What convolutional networks learn": the module a student reads.

This file holds what the course teaches, in reading order: the method formulas, the seed
code's losses and regularizers, the confidence math, each attribution and feature
visualization method as a short function whose body shows its steps, and ``claim`` /
``record``. Everything else (loading data and models, the Keras and PyTorch engines,
geometry, plotting, widgets) is machinery in the package ``cnnlib/`` beside it, re-exported
here, so ``import cnn_utils`` and ``cnn_utils.X`` are the one entry point.

Where things live (``cnnlib/``, in the order data flows; a module imports only those above it,
and none imports ``cnn_utils``):

    frameworks     lazy TensorFlow / Keras / PyTorch imports, the import-order guard, ``_ops``
    checks         argument checks and conversions (one message style)
    data           ``load_dataset``, ``train_val_split``, ``CLASS_NAMES``
    keras_layers   ``get_layer``, default layers, cached sub-models, ``logits_model``
    models         ``build_mnist_cnn``, ``train_model``, ``load_model``, ``as_image_batch``
    cache          ``cached``: a disk cache for the long cells of a live demo (``build/cache``)
    photos         ``load_photo``, ``sample_photos``, ``composite_photo``
    images         ImageNet normalisation, ``preprocess_image``, ``recreate_image``, ``deprocess_image``
    vgg16          ``load_vgg16``, ``vgg_layer_names``, feature maps, predictions, crops
    keras_engine   scores, input gradients, layer gradients of a Keras model
    torch_engine   the same for a PyTorch module
    activations    ``get_activations``, sparsity, dead channels, filter weights
    geometry       ``receptive_fields``, ``cam_upsampling_matrices`` (a cell at its receptive-field centre)
    attribution    validated, memory-bounded calls (``ATTRIBUTION_MEMORY_BUDGET``), ``class_scores``,
                   ``randomize_weights``, ``rank_correlation``; the course's one reading of the
                   sanity check (``sanity_verdict``, ``sanity_borderline``) and of cost (``median_seconds``, ``cost_words``)
    guided         the guided-ReLU model behind ``guided_backprop`` / ``guided_grad_cam``
    evaluation     is a map right? pointing game, relevance mass / rank, deletion, insertion, ROAD
    concepts       what a layer encodes: CAVs and TCAV (with its t-test), NMF concepts, channel
                   attribution, ablation and selectivity
    feature_visualization  ``FeatureVisualization``, VGG16's ``vgg_feature_visualization``
    embeddings     ``extract_features``, t-SNE, UMAP, trustworthiness
    plotting, plotting_vgg   figures (they only draw)
    widgets        the live explorers
    exercise_checks  ``check_array``, ``check_close``: the exercise notebook's visible tests

Importing this module is cheap: it imports neither TensorFlow nor PyTorch; each function
imports its framework when called.

Conventions
-----------
* Images are float32 batches ``(N, H, W, C)`` in the model's input range, [0, 1] for the
  course's models and by default (``set_input_range`` declares another; uint8 images are
  mapped onto it); a single image ``(H, W, C)`` is a batch of one.
* One signature for Keras models and PyTorch modules:
  ``f(model, images, class_index=None, *, layer=None, score="logits", normalize=True, ...)``
  returns maps ``(N, H, W)`` float32, each min-max scaled to [0, 1] (``normalize_maps``).
* Attribution uses pre-softmax class scores (the ``logits`` layer) by default.
* Layers inside nested models (a transfer-learning base) are reached by name.
* Bad input raises ``ValueError`` / ``TypeError`` that says what was expected.
* Settings assigned here take effect where they are used, e.g.
  ``cnn_utils.ATTRIBUTION_MEMORY_BUDGET = 256 << 20`` or ``cnn_utils.MAX_IMAGE_PIXELS = ...``.
"""
from __future__ import annotations

import sys
import types

import numpy as np

from cnnlib.frameworks import (FrameworkOrderError, _check_tensor, _keras, _min_max_scaled, _ops,
    _tf, _torch)
from cnnlib.checks import (_as_labels, _as_logits, _as_probs, _check_flags, _check_positive,
    _check_seed, _check_temperature, _check_unit_indices, _converted, _is_int, _is_number)
from cnnlib.data import (BUILD_DIR, CLASS_NAMES, DATASETS, DATASET_TITLES, DATA_DIR, DATA_ENV_VAR, DEFAULT_SEED,
    DataError, NOTEBOOKS_DIR, PROJECT_DIR, dataset_search_paths, load_dataset, train_val_split)
from cnnlib.keras_layers import (LOGITS_LAYER, _cached, _layer_chain, _model_input_shape,
    _pre_activation, _single_input, _symbolic, activation_model, conv_and_pool_layer_names,
    conv_layer_names, get_layer, last_conv_layer_name, logits_model)
from cnnlib.models import (DEFAULT_INPUT_RANGE, MODELS_DIR, as_image_batch, build_mnist_cnn,
    load_model, model_info, model_input_range, model_path, most_confident_mistakes, predict_logits,
    set_input_range, set_seed, train_model)
from cnnlib.cache import CACHE_ENV_VAR, cache_dir, cache_key, cached
from cnnlib.photos import (MAX_PHOTO_PIXELS, SAMPLE_PHOTOS, composite_photo, load_photo,
    sample_photos)
from cnnlib.images import (IMAGENET_MEAN, IMAGENET_STD, MAX_IMAGE_PIXELS, deprocess_image,
    imagenet_denormalize, imagenet_normalize, preprocess_image, recreate_image)
from cnnlib.vgg16 import (OFFLINE_ENV_VAR, VGG_LOGITS, _as_model_input, _check_layer_index,
    _forward_module, _normalized_forward, image_similarity, imagenet_class_names, load_vgg16,
    top_activating_crops, top_k_predictions, torch_device, vgg16_weights_path, vgg_feature_maps,
    vgg_layer_activations, vgg_layer_names, vgg_module_name, vgg_receptive_field)
from cnnlib.activations import (channel_sparsity, dead_channels, dead_filters, get_activations,
    get_filter_weights, layer_sparsity, likeness_above_chance, match_filters, top_activating_images)
from cnnlib.geometry import (AxisGeometry, ReceptiveFields, _upsample, cam_upsampling_matrices,
    naive_upsampling_matrices, receptive_fields)
from cnnlib.attribution import (ATTRIBUTION_MEMORY_BUDGET, MEMORY_BUDGET_ENV_VAR, _Explained,
    _as_model_images, _baseline_value, _chunks, _first_copies, _no_layer, SANITY_MARGIN, SANITY_THRESHOLD,
    class_scores, cost_words, median_seconds, randomize_weights, rank_correlation, sanity_borderline, sanity_verdict)
from cnnlib.feature_visualization import (FeatureVisualization, _layer_units,
    vgg_feature_visualization)
from cnnlib.embeddings import (FEATURE_LAYER, TSNE_METHODS, extract_features,
    knn_label_disagreement, trustworthiness, tsne_embedding, umap_embedding)
from cnnlib.plotting import (colormap, format_correlation, format_probability, overlay_heatmap, plot_all_channels,
    plot_attribution_maps, plot_confusion_matrix, plot_embedding, plot_feature_visualizations,
    plot_histograms, plot_image_grid, plot_kernel_matrix, plot_kernels, plot_layer_sparsity,
    plot_maps_across_images, plot_objective_history, plot_probability_bars,
    plot_reliability_diagram, plot_signed_attributions, plot_training_curves, probability_decimals,
    spread_out_indices)
from cnnlib.plotting_vgg import (plot_dataset_examples, plot_feature_maps_by_depth, plot_inversion,
    plot_quality_vs_depth, plot_raw_and_deprocessed, plot_reconstructions, plot_rgb_filters,
    plot_saliency, plot_strongest_channels, plot_top_predictions, plot_units_with_crops)
from cnnlib.widgets import ACTIVATIONS_METHOD, class_probabilities, explorer_snapshot, vgg_layer_explorer
from cnnlib.exercise_checks import (check_array, check_close, check_not_calling, check_visible)
from cnnlib.guided import guided_relus
from cnnlib.evaluation import (REPLACEMENTS, Curve, deletion, insertion, linear_imputation, pixel_order,
    pointing_game, random_maps, relevance_mass, relevance_rank, replacement_images, road, sobel_maps)
from cnnlib.concepts import (channel_ablation, channel_attribution, class_selectivity,
    concept_activation_vector, layer_activations, layer_gradients, nmf_concepts, random_image_sets, tcav,
    tcav_scores, tcav_t_test, train_cavs)
from cnnlib import widgets as _widgets


# -------------------------------------------------------------------------------------------
# Method formulas: each a few lines on NumPy, TensorFlow or PyTorch arrays
# -------------------------------------------------------------------------------------------


def saliency_from_gradients(grads):
    """Simonyan et al. (2014): ``M_ij = max_c |dS/dx_ijc|``; (N, H, W, C) -> (N, H, W)."""
    o = _ops(grads)
    return o.amax(o.abs(grads), -1)


def grad_cam_weights(activations, grads):
    """Grad-CAM channel weights (Selvaraju et al., 2017, eq. 1):
    ``w_k = mean_ij dS_c / dA^k_ij``. ``activations`` and ``grads`` (N, h, w, k) -> (N, k)."""
    return _ops(grads).mean(grads, (1, 2))


def grad_cam_plus_plus_weights(activations, grads, renormalize_alphas=False):
    """Grad-CAM++ channel weights (Chattopadhay et al., 2018, eq. 19), for ``Y_c = exp(S_c)``:

    ``alpha^k_ij = g^2 / (2 g^2 + sum_ab A^k_ab g^3)`` (0 where the denominator is 0),
    ``w_k = sum_ij alpha^k_ij ReLU(g)``, with ``g = dS_c / dA^k_ij``. The positive
    factor ``exp(S_c)`` is left out (it scales an image's weights alike).
    ``renormalize_alphas``: divide each channel's alphas by their spatial sum, as the
    authors' code and tf-keras-vis do. (N, h, w, k) -> (N, k).
    """
    o = _ops(grads)
    g2 = grads * grads
    denom = 2.0 * g2 + o.sum(activations, (1, 2), keepdims=True) * g2 * grads
    alpha = o.where(denom != 0, g2 / o.where(denom != 0, denom, 1.0), 0.0 * g2)
    if renormalize_alphas:
        total = o.sum(alpha, (1, 2), keepdims=True)
        alpha = alpha / o.where(total != 0, total, 1.0 + 0.0 * total)
    return o.sum(alpha * o.relu(grads), (1, 2))


def hires_cam_map(a, g):
    """HiResCAM (Draelos & Carin, 2020): ``L = ReLU(sum_k A^k * dS_c/dA^k)``, the gradient kept
    cell by cell instead of averaged over the map (Grad-CAM's ``w_k``). Equal to Grad-CAM (and to
    the classic CAM) when the gradient is the same at every cell, as behind global average
    pooling. (N, h, w, k) x 2 -> (N, h, w)."""
    o = _ops(a)
    return o.relu(o.sum(a * g, -1))

def class_activation_map(activations, weights):
    """``L = ReLU(sum_k w_k A^k)``: (N, h, w, k) and (N, k) -> (N, h, w)."""
    o = _ops(activations)
    return o.relu(o.einsum("nhwk,nk->nhw", activations, weights))


def score_cam_masks(upsampled):
    """Score-CAM masks (Wang et al., 2020): each upsampled map min-max scaled to [0, 1],
    ``M^k = (A^k - min A^k) / (max A^k - min A^k)``. (N, H, W, k) -> (masks, varies (N, k));
    a constant channel has no mask (all zeros, ``varies`` False)."""
    masks, varies = _min_max_scaled(upsampled, (1, 2))
    return masks, varies[:, 0, 0, :]


def score_cam_weights(masked_scores, cls, varies, weighting="probability", probabilities=False):
    """Score-CAM channel weights from the class scores of the masked inputs.

    ``masked_scores`` (N, k, K): pre-softmax scores ``S(x * M^k)``. With
    ``weighting="probability"`` (the authors' code, tf-keras-vis):
    ``w_k = softmax(S(x * M^k))_c``; with ``"channel_softmax"`` (the paper's
    Algorithm 1 without a baseline, pytorch-grad-cam): ``w = softmax_k(S_c(x * M^k))``.
    ``probabilities=True``: the scores are probabilities already, used as they are.
    Constant channels (``varies`` False) get weight 0. NumPy; returns (N, k).
    """
    s = np.asarray(masked_scores, dtype=np.float64)
    target = np.take_along_axis(s, np.asarray(cls)[:, None, None], axis=2)[..., 0]     # (N, k)
    if weighting == "probability" and probabilities:
        w = target
    elif weighting == "probability":
        w = 1.0 / np.exp(s - target[..., None]).sum(axis=2)              # softmax_c, stable
    elif weighting == "channel_softmax":
        t = np.where(varies, target, -np.inf)
        t = t - t.max(axis=1, keepdims=True)
        w = np.exp(t) / np.exp(t).sum(axis=1, keepdims=True)
    else:
        raise ValueError(f"weighting must be 'probability' or 'channel_softmax', got {weighting!r}.")
    return np.where(varies, w, 0.0).astype(np.float32)


def occlusion_windows(input_hw, window, stride):
    """Top-left corners of Zeiler & Fergus' occluding windows: every ``stride`` pixels
    while the window fits (as captum's ``Occlusion``). Returns (rows, cols, (wh, ww))."""
    H, W = input_hw
    win = (window, window) if np.isscalar(window) else tuple(window)
    st = (stride, stride) if np.isscalar(stride) else tuple(stride)
    for name, value, limit in (("window", win, (H, W)), ("stride", st, (H, W))):
        if len(value) != 2 or any(not _is_int(v) or v < 1
                                  for v in value):
            raise ValueError(f"{name} must be a positive int or a pair (height, width) of positive ints; "
                             f"got {value!r}.")
    if win[0] > H or win[1] > W:
        raise ValueError(f"window {win} is larger than the images ({H}, {W}): choose a smaller window.")
    rows = np.arange(0, H - win[0] + 1, st[0])
    cols = np.arange(0, W - win[1] + 1, st[1])
    return rows, cols, win


def occlusion_map(drops, input_hw, rows, cols, win):
    """Zeiler & Fergus (2014): the map at a pixel is the mean score drop
    ``S_c(x) - S_c(x occluded)`` over the windows covering it (0 where none does).
    ``drops`` (N, len(rows), len(cols)) -> (N, H, W)."""
    N = len(drops)
    total = np.zeros((N,) + tuple(input_hw), np.float64)
    count = np.zeros(tuple(input_hw), np.float64)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            total[:, r:r + win[0], c:c + win[1]] += drops[:, i, j, None, None]
            count[r:r + win[0], c:c + win[1]] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


def normalize_maps(maps):
    """Min-max scale each map of a batch (N, ...) to [0, 1], as float32.

    A constant map (including all zeros) becomes all zeros rather than NaN.
    """
    m = _converted(maps, "maps", "an array of numbers (N, H, W[, C])",
                   lambda v: np.asarray(v, dtype=np.float32))
    if m.ndim < 2:
        raise ValueError(f"maps must be a batch (N, H, W[, C]); got shape {m.shape}.")
    if not np.all(np.isfinite(m)):
        raise ValueError("maps contain NaN or infinite values.")
    return _min_max_scaled(m, tuple(range(1, m.ndim)))[0].astype(np.float32)


# -------------------------------------------------------------------------------------------
# The seed's losses and regularizers (feature inversion and visualization)
# -------------------------------------------------------------------------------------------


def euclidian_loss(target, current):
    """Relative squared error ||current - target||^2 / ||target||^2 (Mahendran & Vedaldi):
    ``target`` the features of the original image, ``current`` those of the reconstruction,
    tensors of the same shape (no broadcasting)."""
    _check_tensor(target, "target")
    _check_tensor(current, "current")
    if tuple(target.shape) != tuple(current.shape):
        raise ValueError(f"target and current must have the same shape; got {tuple(target.shape)} "
                         f"and {tuple(current.shape)} (features of two different layers or images?).")
    return (current - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


def alpha_norm(x, alpha=6):
    """Sum of |x|^alpha (the absolute value matters for odd alpha)."""
    _check_tensor(x, "x")
    _check_positive(alpha, "alpha")
    return x.abs().pow(alpha).sum()


def total_variation_norm(x, beta=2, eps=1e-8):
    """Sum over pixels of ((x[i+1, j] - x[i, j])^2 + (x[i, j+1] - x[i, j])^2)^(beta/2).

    ``x`` is (N, C, H, W) or (C, H, W): differences run along the two spatial axes
    (H and W), never across channels. ``eps`` keeps the gradient finite for
    ``beta < 2`` where neighbours are equal; it is subtracted again, so a constant
    image has exactly zero variation.
    """
    _check_tensor(x, "x")
    _check_positive(beta, "beta")
    if not _is_number(eps) or eps < 0 or (eps == 0 and beta < 2):
        raise ValueError(f"eps must be a small number >= 0 (> 0 when beta < 2, where the gradient of an "
                         f"equal neighbour pair is infinite at 0); got {eps!r}.")
    if x.ndim not in (3, 4):
        raise ValueError(f"Expected (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}.")
    d_rows = x[..., 1:, :-1] - x[..., :-1, :-1]
    d_cols = x[..., :-1, 1:] - x[..., :-1, :-1]
    squared = d_rows.pow(2) + d_cols.pow(2)
    if beta == 2:
        return squared.sum()
    floor = squared.new_full((), eps).pow(beta / 2)  # same dtype: constant images give exactly 0
    return ((squared + eps).pow(beta / 2) - floor).sum()


def total_variation(images):
    """Total variation of each image, a TensorFlow tensor (N,): the sum of SQUARED differences
    between neighbouring pixels, down the rows and across the columns, never across channels::

        TV(x) = sum_{i,j,c} (x[i+1, j, c] - x[i, j, c])**2 + (x[i, j+1, c] - x[i, j, c])**2

    Squaring (beta = 2 in Mahendran & Vedaldi's notation) punishes large jumps most and has a
    smooth gradient. The course's other two definitions: the exercise (notebook 11) sums
    ABSOLUTE differences, like ``tf.image.total_variation``, which tolerates sharp edges; the
    PyTorch ``total_variation_norm(x, beta)`` (notebook 07) sums each pixel's squared gradient
    magnitude to the power beta/2 (beta = 2: this sum without the differences along the last
    row and column). ``images``: (N, H, W, C) or one (H, W, C), NumPy or tensor; differentiable.
    """
    tf = _tf()
    x = _converted(images, "images", "an array of numbers (N, H, W, C) or (H, W, C)",
                   lambda v: tf.convert_to_tensor(v, dtype=tf.float32))
    if x.shape.rank == 3:
        x = x[tf.newaxis]
    if x.shape.rank != 4:
        raise ValueError(f"images must be (N, H, W, C) or (H, W, C); got shape {tuple(x.shape)}.")
    down = x[:, 1:, :, :] - x[:, :-1, :, :]      # each pixel minus the one above it
    across = x[:, :, 1:, :] - x[:, :, :-1, :]    # each pixel minus the one to its left
    return tf.reduce_sum(down ** 2, axis=[1, 2, 3]) + tf.reduce_sum(across ** 2, axis=[1, 2, 3])


# -------------------------------------------------------------------------------------------
# Confidence: softmax, entropy, likelihood, temperature scaling, calibration
# -------------------------------------------------------------------------------------------


def softmax(logits, temperature=1.0):
    """Class probabilities ``softmax(logits / T)`` row by row (numerically stable).

    ``logits`` is (N, K) (a single row (K,) is accepted); T > 1 softens, T < 1 sharpens.
    The arg-max is the same for every T, so accuracy does not depend on T.
    """
    _check_temperature(temperature)
    z = _converted(logits, "logits", "an array of numbers (N, num_classes)")
    single = z.ndim == 1
    z = _as_logits(z[np.newaxis] if single else z)
    z = z / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    return p[0] if single else p


def entropy(probs, base=None):
    """Predictive entropy ``-sum_k p_k log p_k`` of each row of ``probs`` (N, K).

    In nats by default (``base=2`` for bits; any base > 1). 0 for a one-hot row,
    ``log K`` for a uniform one. Terms with p = 0 count as 0.
    """
    if base is not None and (not _is_number(base) or base <= 1):
        raise ValueError(f"base must be None (nats) or a number > 1, e.g. 2 for bits; got {base!r}.")
    p = _as_probs(probs)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    h = -terms.sum(axis=1)
    if base is not None:
        h = h / np.log(base)
    return np.maximum(h, 0.0)


def _refuse_probabilities(z, function):
    """Logits (N, K) that are really probabilities (rows in [0, 1] summing to 1) are refused."""
    if len(z) and z.min() >= 0 and z.max() <= 1 and np.allclose(z.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError(f"logits look like probabilities (each row is in [0, 1] and sums to 1). {function} "
                         "takes the pre-softmax scores: pass cnn_utils.predict_logits(model, x), or np.log(probs).")


def negative_log_likelihood(logits, labels, temperature=1.0):
    """Mean negative log-likelihood (cross-entropy, nats) of ``labels`` under softmax(logits/T)."""
    _check_temperature(temperature)
    z = _as_logits(logits)
    _refuse_probabilities(z, "negative_log_likelihood")
    if len(z) == 0:
        raise ValueError("negative_log_likelihood needs at least one example (logits has 0 rows).")
    z = z / temperature
    y = _as_labels(labels, len(z), z.shape[1])
    zmax = z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
    return float(np.mean(log_norm - z[np.arange(len(z)), y]))


def fit_temperature(logits, labels, bounds=(0.05, 20.0)):
    """Temperature scaling (Guo et al., 2017): the T > 0 minimising the mean NLL.

    Fit it on held-out validation logits, never on the test set you report on.
    The NLL is convex in 1/T, so a bounded 1-D search over log T finds the
    global minimum. Returns T as a float (T > 1: the model was over-confident).
    Refuses probabilities passed as logits, and raises when the minimum lies at
    a bound of the search (the NLL still falls beyond it: widen ``bounds``).
    """
    from scipy.optimize import minimize_scalar

    z = _as_logits(logits)
    y = _as_labels(labels, len(z), z.shape[1])
    if len(z) == 0:
        raise ValueError("fit_temperature needs at least one validation example.")
    _refuse_probabilities(z, "Temperature scaling")
    if np.allclose(z, z[:, :1]):
        raise ValueError("Every row of logits is constant, so every temperature gives the same likelihood "
                         "and there is nothing to fit; check that these are the model's logits.")
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise TypeError(f"bounds must be a pair (low, high) of numbers, got {bounds!r}.") from None
    if not 0 < lo < hi < np.inf:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}.")
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(z, y, float(np.exp(log_t))),
        bounds=(np.log(lo), np.log(hi)), method="bounded", options={"xatol": 1e-6},
    )
    t = float(np.exp(result.x))
    for bound in (lo, hi):
        if abs(np.log(t) - np.log(bound)) < 2e-2:   # the bounded search stops near, not at, a bound
            # the minimiser of a convex function sits at the bound: check the NLL still falls there
            inside = bound * (1.01 if bound == lo else 1 / 1.01)
            if negative_log_likelihood(z, y, bound) < negative_log_likelihood(z, y, inside):
                raise ValueError(
                    f"The best temperature lies at the search bound T = {bound:g} (the NLL still "
                    f"falls beyond it), so it is not the minimum. Widen bounds (now {bounds}); a "
                    "temperature this extreme usually means the logits do not belong to the labels."
                )
    return t


def calibration_bins(probs, labels, n_bins=15):
    """Per-bin data of a reliability diagram (Guo et al., 2017).

    Each prediction's confidence (its largest probability) falls in one of
    ``n_bins`` equal-width bins ``((m-1)/M, m/M]``. Returns a dict of arrays of
    length ``n_bins``: ``edges`` (n_bins + 1), ``counts``, ``accuracy`` and
    ``confidence`` (mean, NaN for an empty bin), ``gap`` = |accuracy - confidence|
    (0 for an empty bin), ``weight`` = counts / N; and ``n`` the number of predictions.
    """
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    p = _as_probs(probs)
    y = _as_labels(labels, len(p), p.shape[1])
    if len(p) == 0:
        raise ValueError("calibration needs at least one prediction.")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin m holds (edges[m], edges[m+1]]: searchsorted(side="left") on the inner edges
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / counts
        confidence = np.bincount(idx, weights=conf, minlength=n_bins) / counts
    gap = np.where(counts > 0, np.abs(accuracy - confidence), 0.0)
    return {"edges": edges, "counts": counts, "accuracy": accuracy, "confidence": confidence,
            "gap": gap, "weight": counts / len(p), "n": len(p)}


def expected_calibration_error(probs, labels, n_bins=15, return_bins=False):
    """Expected calibration error: ``sum_m |B_m|/N * |acc(B_m) - conf(B_m)|``.

    Equal-width confidence bins as in Guo et al. (2017). A fraction in [0, 1]
    (multiply by 100 for percent). With ``return_bins=True`` also returns the
    per-bin dict of :func:`calibration_bins` (for :func:`plot_reliability_diagram`).
    """
    bins = calibration_bins(probs, labels, n_bins)
    ece = float(np.sum(bins["weight"] * bins["gap"]))
    return (ece, bins) if return_bins else ece


def confidence_groups(probs, labels, high=0.99, low=0.9):
    """Split predictions by confidence (largest probability) and correctness.

    Returns a dict of index arrays: ``"confident correct"`` (confidence >= high,
    right), ``"confident wrong"`` (confidence >= high, wrong; most confident first)
    and ``"unsure correct"`` (confidence < low, right; least confident first).
    """
    if not (_is_number(low) and _is_number(high)) or not 0 < low <= high <= 1:
        raise ValueError(f"Thresholds must satisfy 0 < low <= high <= 1, got low={low}, high={high}.")
    p = _as_probs(probs)
    y = _as_labels(labels, len(p), p.shape[1])
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    order_desc = np.argsort(-conf, kind="stable")
    order_asc = np.argsort(conf, kind="stable")
    return {
        "confident correct": order_desc[(conf >= high)[order_desc] & correct[order_desc]],
        "confident wrong": order_desc[(conf >= high)[order_desc] & ~correct[order_desc]],
        "unsure correct": order_asc[(conf < low)[order_asc] & correct[order_asc]],
    }


# -------------------------------------------------------------------------------------------
# Attribution methods: one signature for Keras models and PyTorch modules
# -------------------------------------------------------------------------------------------
#
#     f(model, images, class_index=None, *, layer=None, score="logits", normalize=True, ...)
#
# Each method below shows its steps. ``_Explained`` (cnnlib/attribution.py) checks the
# arguments, picks the engine for the model and resolves the classes; ``e.chunks()`` splits the
# batch into memory-bounded calls; the engine gives what the formula above needs: the class
# scores (``e.engine.forward``), ``dS_c/dx`` (``e.engine.grad``) or a layer's feature maps ``A``
# (N, h, w, k, channels last) with ``dS_c/dA`` (``e.engine.layer_grad``), as NumPy arrays.


def _input_gradients(e, x=None, cls=None, copies=1):
    """(targets, classes, dS_c/dx) for the batch, in memory-bounded calls."""
    x = e.x if x is None else x
    cls = e.cls if cls is None else cls
    targets = np.empty(len(x), np.float32)
    classes = np.empty(len(x), np.int32)
    grads = np.empty(x.shape, np.float32)
    for part in _chunks(len(x), 3 * e.per_image):
        targets[part], classes[part], grads[part] = e.engine.grad(x[part], cls[part])
    return targets, classes, grads


def saliency_map(model, images, class_index=None, *, layer=None, score="logits", normalize=True):
    """Vanilla gradient saliency (Simonyan et al., 2014).

    ``M_ij = max_c |dS_c / dx_ijc|`` for the pre-softmax score ``S_c`` of
    ``class_index`` (``None``: each image's predicted class; an int or one per image).
    Keras model or PyTorch module; ``images`` (N, H, W, C) or (H, W, C).
    Returns float32 (N, H, W), each map min-max scaled to [0, 1] (``normalize=False``:
    the raw maximum absolute gradient). Batched, in memory-bounded calls.
    """
    _no_layer(layer, "saliency_map")
    _check_flags(normalize=normalize)
    e = _Explained(model, images, class_index, score)
    out = np.empty(e.x.shape[:3], np.float32)
    for part in e.chunks():
        _, _, g = e.engine.grad(e.x[part], e.cls[part])
        out[part] = saliency_from_gradients(g)
    return normalize_maps(out) if normalize else out


def smoothgrad(model, images, class_index=None, *, layer=None, score="logits", normalize=True,
               samples=50, noise=0.2, seed=None):
    """SmoothGrad (Smilkov et al., 2017): saliency averaged over noisy copies.

    ``M(x) = max_channels (1/n) sum_i | d S_c(x + e_i) / d x |``, ``e_i ~ N(0, s^2)``
    with ``s = noise * (max(x) - min(x))`` for each image. The class is fixed on
    the clean image (``None``: its predicted class). ``noise=0`` gives exactly
    ``saliency_map``. ``seed`` fixes each image's noise: it is drawn from a generator
    seeded with the seed and a hash of the image's pixels, so an image gets the same
    noise (and map) wherever it sits in the batch and whatever else the batch holds.
    The noisy copies go through the model in batched, memory-bounded calls. Returns
    float32 (N, H, W) in [0, 1] per image (``normalize=False``: raw).
    """
    _no_layer(layer, "smoothgrad")
    _check_flags(normalize=normalize)
    if not _is_int(samples) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}.")
    if not _is_number(noise) or noise < 0:
        raise ValueError(f"noise must be a non-negative number (a fraction of each image's range), got {noise!r}.")
    seed = _check_seed(seed, allow_none=True)
    e = _Explained(model, images, class_index, score)
    x, cls = e.x, e.fix_classes()
    rngs = _image_generators(x, seed)
    sigma = noise * (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)))
    out = np.empty(x.shape[:3], dtype=np.float32)
    for part in e.chunks(copies=samples):
        xb = x[part]
        nb = len(xb)
        noisy = np.repeat(xb[:, None], samples, axis=1)
        if noise > 0:
            for i, rng in zip(range(nb), rngs[part]):
                noisy[i] += rng.standard_normal(noisy.shape[1:], dtype=np.float32) * sigma[part][i]
        noisy = noisy.reshape((nb * samples,) + x.shape[1:])
        _, _, g = _input_gradients(e, noisy, np.repeat(cls[part], samples).astype(np.int32))
        g = np.abs(g).reshape((nb, samples) + x.shape[1:])
        out[part] = g.mean(axis=1).max(axis=-1)
    return normalize_maps(out) if normalize else out


def _image_generators(x, seed):
    """One NumPy generator per image of the batch ``x``: seeded with ``(seed, hash of the
    image's pixels)``, so that a seed fixes each image's random numbers wherever it sits in
    the batch; ``seed=None``: fresh randomness."""
    import hashlib

    if seed is None:
        return np.array([np.random.default_rng() for _ in x], dtype=object)
    return np.array([np.random.default_rng([seed] + list(np.frombuffer(
        hashlib.blake2b(np.ascontiguousarray(xi).tobytes(), digest_size=16).digest(), dtype=np.uint32)))
        for xi in x], dtype=object)


def integrated_gradients(model, images, class_index=None, *, layer=None, score="logits",
                         baseline=None, steps=50, return_gap=False):
    """Integrated Gradients (Sundararajan et al., 2017).

    ``IG_i(x) = (x_i - x'_i) * integral_0^1 d S_c(x' + a (x - x')) / d x_i da``,
    the integral taken with the trapezoidal rule on ``steps`` intervals
    (``steps + 1`` points along the straight path, in batched, memory-bounded calls).
    ``baseline`` is ``None`` (a black image), a number, one image or one per image.
    The class is fixed on the input (``None``: its predicted class).

    Returns the attributions, float32 with the input's shape (N, H, W, C),
    unnormalised and signed. With ``return_gap=True`` returns
    ``(attributions, gap)`` where ``gap = sum(attributions) - (S_c(x) - S_c(x'))``
    per image (N,): Completeness says it tends to 0 as ``steps`` grows.
    """
    _no_layer(layer, "integrated_gradients")
    _check_flags(return_gap=return_gap)
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    e = _Explained(model, images, class_index, score)
    x = e.x
    if baseline is None:
        base = np.zeros_like(x)
    else:
        if np.ndim(baseline) == 0:
            base = np.full_like(x, _baseline_value(baseline, model))
        else:
            b = _as_model_images(baseline, model, "baseline")      # uint8 mapped, range checked
            if len(b) not in (1, len(x)) or b.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"baseline must be one image or one per image ({len(x)}) of shape {x.shape[1:]}; "
                    f"got {b.shape}."
                )
            base = np.broadcast_to(b, x.shape).astype(np.float32)
    if not np.all(np.isfinite(base)):
        raise ValueError("baseline contains NaN or infinite values.")
    cls = e.fix_classes()
    alphas = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
    weights = np.full(steps + 1, 1.0 / steps, dtype=np.float32)
    weights[[0, -1]] *= 0.5  # trapezoidal rule
    k = steps + 1
    attributions = np.empty_like(x)
    target_x = np.empty(len(x), dtype=np.float32)
    target_base = np.empty(len(x), dtype=np.float32)
    for part in e.chunks(copies=k):
        xb, bb = x[part], base[part]
        nb = len(xb)
        path = bb[:, None] + alphas[None, :, None, None, None] * (xb - bb)[:, None]
        t, _, g = _input_gradients(e, path.reshape((nb * k,) + x.shape[1:]),
                                   np.repeat(cls[part], k).astype(np.int32))
        avg = np.tensordot(g.reshape((nb, k) + x.shape[1:]), weights, axes=([1], [0]))
        attributions[part] = ((xb - bb) * avg).astype(np.float32)
        t = t.reshape(nb, k)
        target_base[part], target_x[part] = t[:, 0], t[:, -1]
    if not return_gap:
        return attributions
    gap = attributions.reshape(len(x), -1).sum(axis=1) - (target_x - target_base)
    return attributions, gap.astype(np.float32)


def _cam(weights_fn, model, images, class_index, layer, score, normalize, return_weights, cell_map=None):
    """Grad-CAM-style maps: ``ReLU(sum_k w_k A^k)`` with ``w = weights_fn(A, dS_c/dA)`` (or, given
    ``cell_map``, ``cell_map(A, dS_c/dA)`` cell by cell, as HiResCAM), brought to the input grid
    with ``cam_upsampling_matrices``."""
    _check_flags(normalize=normalize, return_weights=return_weights)
    e = _Explained(model, images, class_index, score)
    name = e.engine.resolve_layer(layer, e.x)
    maps = np.empty(e.x.shape[:3], np.float32)
    weights = None
    mats = {}
    for part in e.chunks():
        _, _, a, g = e.engine.layer_grad(e.x[part], e.cls[part], name)
        if cell_map is None:
            w = weights_fn(a, g)
            if weights is None:
                weights = np.empty((len(e.x), a.shape[-1]), np.float32)
            weights[part] = w
            cam = class_activation_map(a, w)
        else:
            cam = cell_map(a, g)
        hw = a.shape[1:3]
        if hw not in mats:
            mats[hw] = cam_upsampling_matrices(e.engine.model, name, e.x.shape[1:3], map_hw=hw)
        maps[part] = _upsample(cam, *mats[hw])
    if normalize:
        maps = normalize_maps(maps)
    return (maps, weights) if return_weights else maps


def grad_cam(model, images, class_index=None, *, layer=None, score="logits", normalize=True,
             return_weights=False):
    """Grad-CAM (Selvaraju et al., 2017).

    With feature maps ``A^k`` of ``layer`` (``None``: the last convolutional layer's
    output, after its ReLU) and ``S_c`` the pre-softmax score of class ``c``:
    ``w_k = mean_ij d S_c / d A^k_ij`` (``grad_cam_weights``), ``L = ReLU(sum_k w_k A^k)``,
    brought to the input grid by ``cam_upsampling_matrices``. Keras model or PyTorch
    module. Returns float32 (N, H, W), each map min-max scaled to [0, 1] (a constant
    map gives zeros); with ``return_weights=True`` also the channel weights (N, k).
    """
    return _cam(grad_cam_weights, model, images, class_index, layer, score, normalize, return_weights)


def grad_cam_plus_plus(model, images, class_index=None, *, layer=None, score="logits",
                       normalize=True, return_weights=False, renormalize_alphas=False):
    """Grad-CAM++ (Chattopadhay et al., 2018) with the paper's alpha weights
    (``grad_cam_plus_plus_weights``): ``L = ReLU(sum_k w_k A^k)``, brought to the input
    grid as in ``grad_cam``. The paper explains ``Y_c = exp(S_c)``, for which the
    higher derivatives reduce to powers of ``g = d S_c / d A``. By default the alphas
    are used as the paper's equation gives them (as pytorch-grad-cam does); the
    authors' code and tf-keras-vis also divide each channel's alphas by their spatial
    sum (``renormalize_alphas=True``), which changes the relative channel weights.
    Returns float32 (N, H, W) in [0, 1] per image (``return_weights``: also (N, k)).
    """
    def weights_fn(a, g):
        return grad_cam_plus_plus_weights(a, g, renormalize_alphas=renormalize_alphas)
    return _cam(weights_fn, model, images, class_index, layer, score, normalize, return_weights)


def hires_cam(model, images, class_index=None, *, layer=None, score="logits", normalize=True):
    """HiResCAM (Draelos & Carin, 2020): ``hires_cam_map`` of ``layer``'s feature maps and their
    gradient (``None``: the layer ``grad_cam`` uses), brought to the input grid as in ``grad_cam``.
    Returns float32 (N, H, W), min-max scaled per image unless ``normalize=False``."""
    return _cam(None, model, images, class_index, layer, score, normalize, False, cell_map=hires_cam_map)


def guided_backprop(model, images, class_index=None, *, layer=None, score="logits", normalize=True):
    """Guided Backpropagation (Springenberg et al., 2015): the gradient of the class score
    ``S_c`` with every ReLU's backward pass replaced by ``R_in = R_out * [x > 0] * [R_out > 0]``
    (``cnnlib.guided.guided_relus``; the user's model is not changed). Returns float32
    (N, H, W): ``max_channels |R|`` min-max scaled per image, or with ``normalize=False`` the
    signed guided gradient (N, H, W, C) (as captum's GuidedBackprop). It fails the randomisation
    sanity check (Adebayo et al., 2018): the evaluation notebook measures it.
    """
    _no_layer(layer, "guided_backprop")
    _check_flags(normalize=normalize)
    with guided_relus(model) as guided:
        e = _Explained(guided, images, class_index, score)
        e.fix_classes()
        _, _, g = _input_gradients(e)
    return normalize_maps(np.abs(g).max(axis=-1)) if normalize else g


def guided_grad_cam(model, images, class_index=None, *, layer=None, score="logits", normalize=True):
    """Guided Grad-CAM (Selvaraju et al., 2017): ``guided_backprop`` (N, H, W, C) times the raw
    ``grad_cam`` map of ``layer`` on the input grid, pixel by pixel. Returns float32 (N, H, W):
    ``max_channels |.|`` min-max scaled per image, or (``normalize=False``) the signed product
    (N, H, W, C), as captum's GuidedGradCam when the layer has the input's size."""
    _check_flags(normalize=normalize)
    cam = grad_cam(model, images, class_index, layer=layer, score=score, normalize=False)
    g = guided_backprop(model, images, class_index, score=score, normalize=False) * cam[..., None]
    return normalize_maps(np.abs(g).max(axis=-1)) if normalize else g


def score_cam(model, images, class_index=None, *, layer=None, score="logits", normalize=True,
              return_weights=False, weighting="probability", max_masks=None):
    """Score-CAM (Wang et al., 2020).

    Each feature map ``A^k`` of ``layer`` (``None``: the last convolutional layer's
    output, after its ReLU) is brought to the input grid (``cam_upsampling_matrices``)
    and min-max scaled to a mask ``M^k`` (``score_cam_masks``); the channel weight
    comes from the class scores of the masked input ``x * M^k`` (``score_cam_weights``):
    by default ``w_k = softmax(S(x * M^k))_c`` (the authors' code; the baseline term
    ``f(x_b)`` is left out); ``weighting="channel_softmax"`` gives the paper's
    Algorithm 1, ``w = softmax_k(S_c(x * M^k))``, as pytorch-grad-cam. ``score`` chooses
    which scores ``S`` are read: pre-softmax (``"logits"``) or the model's
    probabilities (``"probability"``, used as they are). A constant channel gets
    weight 0. ``L = ReLU(sum_k w_k up(A^k))``, min-max scaled per image.
    ``max_masks`` (Faster Score-CAM, tf-keras-vis' ``max_N``): only the ``max_masks``
    channels whose feature maps vary most (spatial variance, per image) are masked and
    scored; the others get weight 0. ``None``: every channel.
    The masked inputs go through the model in memory-bounded batches, only for channels
    that have a mask, and once per photo when a batch repeats it (one photo explained
    for several classes).
    With ``return_weights=True`` also returns the channel weights (N, k).
    """
    _check_flags(normalize=normalize, return_weights=return_weights)
    e = _Explained(model, images, class_index, score)
    name = e.engine.resolve_layer(layer, e.x)
    x, cls = e.x, e.cls
    if max_masks is not None and (not _is_int(max_masks) or max_masks < 1):
        raise ValueError(f"max_masks must be a positive int (the number of channels to mask) or None "
                         f"(every channel); got {max_masks!r}.")
    maps = np.empty(x.shape[:3], np.float32)
    k = e.engine.channels(name, x)
    weights, mats = np.zeros((len(x), k), np.float32), {}
    first = _first_copies(x)
    unique = np.flatnonzero(first == np.arange(len(x)))
    for images_part in _chunks(len(unique), e.per_image * k):         # masked copies of n images
        u = unique[images_part]
        a, s = e.engine.features(x[u], name)                           # (n, h, w, k), scores
        copies = [np.flatnonzero(first == i) for i in u]               # the same photo, other classes
        for c, scores_c in zip(copies, s):
            cls[c] = np.where(cls[c] < 0, scores_c.argmax(), cls[c])
        hw = a.shape[1:3]
        if hw not in mats:
            mats[hw] = cam_upsampling_matrices(e.engine.model, name, x.shape[1:3], map_hw=hw)
        up = _upsample(a, *mats[hw])                                    # (n, H, W, k)
        masks, varies = score_cam_masks(up)
        if max_masks is not None and max_masks < k:                    # Faster Score-CAM
            spread = np.where(varies, a.reshape(len(a), -1, k).var(axis=1), -1.0)
            kept = np.zeros_like(varies)
            np.put_along_axis(kept, np.argsort(-spread, axis=1, kind="stable")[:, :max_masks], True, axis=1)
            varies = varies & kept
        # only channels with a mask: a constant one gets weight 0 whatever its scores
        pairs = np.argwhere(varies)                                     # (image, channel)
        scores = np.zeros((len(u), k, s.shape[1]), np.float32)
        for part in _chunks(len(pairs), e.per_image):
            i, ch = pairs[part, 0], pairs[part, 1]
            scores[i, ch] = e.engine.forward(x[u[i]] * masks[i, :, :, ch][..., None])
        for j, c in enumerate(copies):                                  # the masked scores serve every class
            w = score_cam_weights(np.repeat(scores[j:j + 1], len(c), axis=0), cls[c],
                                  np.repeat(varies[j:j + 1], len(c), axis=0), weighting,
                                  probabilities=score == "probability")
            weights[c] = w
            for row, w_row in zip(c, w):
                maps[row] = class_activation_map(up[j:j + 1], w_row[None])[0]
    if normalize:
        maps = normalize_maps(maps)
    return (maps, weights) if return_weights else maps


def occlusion(model, images, class_index=None, *, layer=None, score="logits", normalize=True,
              window=None, stride=None, baseline=0.0):
    """Occlusion sensitivity (Zeiler & Fergus, 2014).

    A ``window`` (int or (height, width); default an eighth of the image side) filled
    with ``baseline`` (a number, or an image (H, W, C) whose pixels replace the
    occluded ones) slides over the image every ``stride`` pixels (default half the
    window) while it fits, as captum's ``Occlusion``. The raw map at a pixel is the
    mean drop ``S_c(x) - S_c(x occluded)`` of the target score over all windows that
    cover the pixel (``occlusion_map``; 0 for pixels no window covers). A photo repeated
    in the batch (explained for several classes) is occluded once. Keras model or
    PyTorch module. Returns float32 (N, H, W): min-max scaled per image, or signed raw
    drops with ``normalize=False``.
    """
    _no_layer(layer, "occlusion")
    _check_flags(normalize=normalize)
    e = _Explained(model, images, class_index, score)
    x, cls = e.x, e.fix_classes()
    H, W = x.shape[1:3]
    if window is None:
        window = max(1, min(H, W) // 8)
    if stride is None:
        stride = max(1, (window if np.isscalar(window) else min(window)) // 2)
    rows, cols, win = occlusion_windows((H, W), window, stride)
    if np.ndim(baseline) == 0:
        fill = np.float32(_baseline_value(baseline, model))
    else:
        fill = np.asarray(baseline)
        if fill.ndim != 3 or fill.shape != x.shape[1:]:
            raise ValueError(f"baseline must be a finite number or one image of shape {x.shape[1:]}; "
                             f"got shape {fill.shape}.")
        fill = _as_model_images(fill, model, "baseline")[0]          # uint8 mapped, range checked
    fill = np.broadcast_to(fill, x.shape[1:])
    corners = [(r, c) for r in rows for c in cols]
    clean = np.empty(len(x), np.float32)
    for part in e.chunks(factor=1):
        clean[part] = e.engine.forward(x[part])[np.arange(part.stop - part.start), cls[part]]
    first = _first_copies(x)                         # a repeated photo is occluded once, for all its classes
    unique = np.flatnonzero(first == np.arange(len(x)))
    copies = [np.flatnonzero(first == i) for i in unique]
    pairs = [(u, j) for u in range(len(unique)) for j in range(len(corners))]  # (photo, window)
    drops = np.empty((len(x), len(corners)), np.float32)
    for part in _chunks(len(pairs), e.per_image):
        idx = np.asarray(pairs[part])
        batch = x[unique[idx[:, 0]]]
        for b, j in enumerate(idx[:, 1]):
            r, c = corners[j]
            batch[b, r:r + win[0], c:c + win[1]] = fill[r:r + win[0], c:c + win[1]]
        s = e.engine.forward(batch)
        for u in np.unique(idx[:, 0]):
            rows_u = idx[:, 0] == u
            c = copies[u]
            drops[c[:, None], idx[rows_u, 1][None]] = clean[c][:, None] - s[rows_u][:, cls[c]].T
    maps = occlusion_map(drops.reshape(len(x), len(rows), len(cols)), (H, W), rows, cols, win)
    return normalize_maps(maps) if normalize else maps


def gradient_saliency(model, image, class_index=None):
    """Vanilla gradient saliency (Simonyan et al. 2014) of a class's pre-softmax score,
    with respect to the normalised input tensor (``preprocess_image``'s), via ``saliency_map``.

    Returns ``(saliency (H, W) array, class_index)``: the largest absolute gradient over
    the three colour channels; ``class_index`` defaults to the predicted class.
    """
    torch, _ = _torch()
    x = _as_model_input(image)
    forward = _normalized_forward(model)
    # normalised tensors have no fixed pixel range: no range check on this wrapper
    net = set_input_range(_forward_module(forward), None)
    n_classes = None
    if class_index is not None:
        with torch.no_grad():
            n_classes = int(forward(x.to(next(model.parameters()).device)).shape[1])
        if not _is_int(class_index) or not 0 <= class_index < n_classes:
            raise ValueError(f"class_index must be an int from 0 to {n_classes - 1}, got {class_index!r}.")
    image_hwc = x.permute(0, 2, 3, 1).cpu().numpy()
    _, cls = class_scores(net, image_hwc, class_index)
    sal = saliency_map(net, image_hwc, class_index=cls, normalize=False)
    return sal[0], int(cls[0])


def explorer_methods(samples=32):
    """The explorer's methods: name -> ``f(model, x, class_index, layer) -> (N, H, W)``.

    Each returns maps in [0, 1] at input resolution, computed by the course's own
    functions (Keras or PyTorch model alike), so what the explorer shows is exactly what
    those functions return. ``samples``: SmoothGrad's noisy copies and Integrated
    Gradients' steps (each one gradient pass).
    """
    return {
        "Saliency": lambda m, x, c, l: saliency_map(m, x, class_index=c),
        "SmoothGrad": lambda m, x, c, l: smoothgrad(m, x, class_index=c, samples=samples, seed=0),
        "Integrated Gradients": lambda m, x, c, l: normalize_maps(
            np.abs(integrated_gradients(m, x, class_index=c, steps=samples)).sum(axis=-1)),
        "Grad-CAM": lambda m, x, c, l: grad_cam(m, x, class_index=c, layer=l),
        "Grad-CAM++": lambda m, x, c, l: grad_cam_plus_plus(m, x, class_index=c, layer=l),
        "Score-CAM": lambda m, x, c, l: score_cam(m, x, class_index=c, layer=l),
    }


def explorer(model, images, labels=None, class_names=None, **options):
    """The live explorer (ipywidgets) over the course's methods (``explorer_methods``).

    Options (``scale``, ``top_k``, ``samples``, ``layers``) and what it returns:
    ``cnnlib.widgets.explorer``.
    """
    return _widgets.explorer(model, images, labels, class_names, methods=explorer_methods, **options)


# -------------------------------------------------------------------------------------------
# Feature visualization and inversion
# -------------------------------------------------------------------------------------------


def _activation_maximization_fn(model, layer, spatial):
    """A compiled gradient ascent (all steps in one tf.function) for one target layer.

    For a layer with a built-in activation (conv + ReLU) the objective is the mean
    PRE-activation, so that the ascent has a gradient even where the ReLU is off.
    """
    tf = _tf()
    keras = _keras()
    chain = _layer_chain(model, layer)
    layer = chain[-1]
    rank = len(layer.output.shape)
    pre, activation = _pre_activation(layer)
    if pre is None:
        sub = keras.Model(_single_input(model), _symbolic(model, chain, "output"),
                          name=f"{model.name}_to_{layer.name}")
    else:
        sub = keras.Model(_single_input(model), _symbolic(model, chain, "input"),
                          name=f"{model.name}_to_{layer.name}_input")

    def pre_and_post(x):
        out = sub(x, training=False)
        if pre is None:
            return out, out
        z = pre(out)
        return z, activation(z)

    def unit_mean(out, onehot):
        if rank == 4 and spatial == "center":                     # the centre neuron only
            out = out[:, tf.shape(out)[1] // 2, tf.shape(out)[2] // 2, :]
        elif rank == 4:
            out = tf.reduce_mean(out, axis=[1, 2])    # mean over positions of each channel
        return tf.reduce_sum(out * onehot, axis=-1)   # the target channel / unit, per image

    shape = _model_input_shape(model)      # None for a variable size: traced once for all sizes
    n_units = int(layer.output.shape[-1])
    spec = tf.TensorSpec

    # One trace per model and layer: batch size, step count and weights are all inputs.
    @tf.function(input_signature=[
        spec((None,) + shape, tf.float32), spec((None, n_units), tf.float32),
        spec((None, 2), tf.int32), spec((), tf.float32), spec((), tf.float32), spec((), tf.float32)])
    def run(x0, onehot, shifts, lr, l2, tv):
        x = x0
        steps = tf.shape(shifts)[0]
        hist = tf.TensorArray(tf.float32, size=steps)
        for t in tf.range(steps):
            with tf.GradientTape() as tape:
                tape.watch(x)
                obj = unit_mean(pre_and_post(tf.roll(x, shift=shifts[t], axis=[1, 2]))[0], onehot)
                loss = (obj - l2 * tf.reduce_sum(tf.square(x), axis=[1, 2, 3])
                        - tv * total_variation(x))
            grad = tape.gradient(loss, x)
            norm = tf.sqrt(tf.reduce_sum(tf.square(grad), axis=[1, 2, 3], keepdims=True))
            x = x + lr * grad / (norm + 1e-8)                # L2-normalised step, per image
            hist = hist.write(t, obj)
        start = unit_mean(pre_and_post(x0)[0], onehot)
        z, a = pre_and_post(x)
        return x, hist.stack(), start, unit_mean(z, onehot), unit_mean(a, onehot)

    return run, pre is not None and getattr(activation, "__name__", "") == "relu"


def activation_maximization(model, layer, units, steps=100, lr=0.1, l2=0.0, tv=0.0,
                            jitter=0, seed=None, init_mean=None, init_std=0.1, spatial="mean",
                            image_shape=None):
    """Gradient ascent in input space: the input that most excites a filter or a class.

    The objective is the mean over positions of channel ``units`` of a convolutional
    layer, taken before its ReLU (so that a filter that is off at the start still has a
    gradient), or, for a layer of class scores (``"logits"``, pre-softmax), the score
    of class ``units``. Layers inside nested models are reached by name (or
    ``"base/name"``). With ``spatial="center"`` a conv filter's objective is its
    activation at the centre position only (one neuron and its receptive field) instead
    of the mean over all positions. Starting from a small random image
    ``init_mean + init_std * N(0, 1)`` (``init_mean=None``: the middle of the model's
    input range, 0.5 for the course's models), each of ``steps`` steps moves the image by
    ``lr`` along the L2-normalised gradient of

        objective(roll(x, jitter)) - l2 * sum(x**2) - tv * TV(x)

    (TV: ``total_variation``). ``units`` may be an int, a list of ints (one image per
    unit, optimised together in one batch, much faster than one at a time) or None
    for every filter / class of the layer. ``jitter`` (pixels) shifts the image
    randomly (with wrap-around) before each step, so no single pixel alignment can be
    exploited. ``seed`` makes the start and the jitter repeatable. The image is not
    clipped; display it with ``deprocess_image``. ``image_shape`` (H, W, C) is the size
    of the image to optimise, required for a model with a variable input size
    (``Input((None, None, 3))``), by default the model's input shape.

    Only the part of the model up to ``layer`` runs, and the whole ascent is one
    compiled TensorFlow function, cached per model and layer. Returns a
    ``FeatureVisualization`` (images, objective history, final ReLU activation, dead flags).
    Errors: unknown layer (lists the layers), unit out of range (gives the valid range).
    The same names and result type as ``vgg_feature_visualization`` (PyTorch, VGG16).
    """
    tf = _tf()
    if spatial not in ("mean", "center"):
        raise ValueError(f"spatial must be 'mean' or 'center', got {spatial!r}.")
    rank, n_units = _layer_units(model, layer)
    idx = _check_unit_indices(units, n_units, layer, rank)
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an integer of at least 1, got {steps!r}.")
    steps = int(steps)
    if init_mean is None:
        span = model_input_range(model) or DEFAULT_INPUT_RANGE
        init_mean = 0.5 * (span[0] + span[1])
    if not _is_int(jitter) or jitter < 0:
        raise ValueError(f"jitter must be a whole number of pixels >= 0, got {jitter!r}.")
    for name, value in (("lr", lr), ("l2", l2), ("tv", tv), ("init_std", init_std), ("init_mean", init_mean)):
        if not _is_number(value) or (value < 0 and name != "init_mean"):
            raise ValueError(f"{name} must be a finite number{'' if name == 'init_mean' else ' >= 0'}, "
                             f"got {value!r}.")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}.")
    shape = _model_input_shape(model)
    if image_shape is not None:
        if not isinstance(image_shape, (tuple, list)):
            raise TypeError(f"image_shape must be a shape (H, W, C), e.g. {tuple(d or 64 for d in shape)}; "
                            f"got {image_shape!r}.")
        image_shape = tuple(image_shape)
        if len(image_shape) != len(shape) or any(
                not isinstance(d, (int, np.integer)) or d < 1 or (e is not None and e != d)
                for d, e in zip(image_shape, shape)):
            raise ValueError(f"image_shape must be a shape (H, W, C) of positive integers that the "
                             f"model accepts, {shape}; got {image_shape!r}.")
        shape = tuple(int(d) for d in image_shape)
    elif any(d is None for d in shape):
        raise ValueError(f"The model accepts images of any size {shape}: say which size to optimise "
                         "with image_shape=(H, W, C), e.g. image_shape=(64, 64, 3).")
    if jitter and 2 * int(jitter) >= min(shape[0], shape[1]):
        raise ValueError(f"jitter={jitter} pixels is too large for images of {shape[0]}x{shape[1]}.")
    rng = np.random.default_rng(seed)
    x0 = (init_mean + init_std * rng.standard_normal((len(idx),) + shape)).astype(np.float32)
    jitter = int(jitter)
    shifts = rng.integers(-jitter, jitter + 1, size=(steps, 2)).astype(np.int32)
    onehot = np.eye(n_units, dtype=np.float32)[idx]
    run, has_relu = _cached(model, ("activation_maximization", layer, spatial),
                            lambda: _activation_maximization_fn(model, layer, spatial))
    x, hist, start, final, post = run(
        tf.constant(x0), tf.constant(onehot), tf.constant(shifts),
        tf.constant(lr, tf.float32), tf.constant(l2, tf.float32), tf.constant(tv, tf.float32),
    )
    final = final.numpy()
    history = np.concatenate([hist.numpy(), final[np.newaxis]])
    params = dict(steps=steps, lr=lr, l2=l2, tv=tv, jitter=jitter, seed=seed,
                  init_mean=init_mean, init_std=init_std, spatial=spatial)
    return FeatureVisualization(x.numpy(), idx, history, start.numpy(), final, post.numpy(),
                                has_relu, layer, params)


def feature_inversion(model, image, layer_index, iterations=200, lr=0.1, optimizer="adam",
                      alpha=6, alpha_weight=1e-5, tv_beta=2, tv_weight=0.3, n_snapshots=6,
                      seed=DEFAULT_SEED, progress=True, size=224):
    """Reconstruct an image from its features at ``model.features[layer_index]``.

    Mahendran & Vedaldi (2015): starting from noise, gradient descent on the image x for

        euclidian_loss(target, features(x)) + alpha_weight * mean(|x|^alpha)
                                            + tv_weight * mean TV_beta(x)

    (the regularizers ``alpha_norm`` and ``total_variation_norm`` averaged per value, so
    the weights do not depend on the image size). The target features are computed
    once, without gradients; only the layers up to the target run
    (``model.features[:layer_index + 1]``), and the model's weights are frozen during the
    optimisation so no weight gradients are computed. The learning rate decays along a
    cosine from ``lr`` to zero.

    ``image``: a (1, 3, H, W) tensor from ``preprocess_image`` (or anything it accepts,
    resized to ``size``). ``optimizer``: ``"adam"`` or ``"sgd"`` (momentum 0.9).

    Returns a dict: ``image`` (the reconstruction, uint8 H x W x 3), ``tensor`` (the same,
    normalised, 1 x 3 x H x W), ``snapshots`` (uint8 images at regular steps) with their
    ``snapshot_steps``, ``loss`` and ``feature_loss`` (per step, NumPy arrays),
    ``layer_index``, ``layer_name``, ``seconds`` (wall clock) and ``cpu_seconds`` (CPU
    time of all threads).
    """
    import time

    from tqdm.auto import tqdm

    torch, _ = _torch()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a PyTorch model (torchvision's VGG16), got {type(model).__name__}.")
    layer_index = _check_layer_index(model, layer_index)
    for name, value in (("iterations", iterations), ("n_snapshots", n_snapshots), ("seed", seed)):
        if not _is_int(value) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be an integer of at least {0 if name == 'seed' else 1}, got {value!r}.")
    for name, value in (("lr", lr), ("alpha", alpha), ("tv_beta", tv_beta)):
        _check_positive(value, name)
    for name, value in (("alpha_weight", alpha_weight), ("tv_weight", tv_weight)):
        if not _is_number(value) or value < 0:
            raise ValueError(f"{name} must be a number >= 0 (0 switches the regularizer off), got {value!r}.")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}.")
    device = next(model.parameters()).device
    x0 = _as_model_input(image, size=size).to(device)
    trunk = model.features[: layer_index + 1]
    was_training = [(m, m.training) for m in model.modules()]   # each submodule's own flag
    requires = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            target = trunk(x0).clone()
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = 0.5 + 0.1 * torch.randn(x0.shape, generator=gen)  # grey-ish noise in pixel space
        x = imagenet_normalize(noise).to(device).requires_grad_(True)
        opt = (torch.optim.Adam([x], lr=lr) if optimizer == "adam"
               else torch.optim.SGD([x], lr=lr, momentum=0.9))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(iterations))
        n_values = x.numel()
        n_snap = max(1, min(int(n_snapshots), int(iterations)))
        snap_at = {int(round(iterations * (k + 1) / n_snap)) for k in range(n_snap)}
        snapshots, snapshot_steps, losses, feature_losses = [], [], [], []
        start, cpu_start = time.perf_counter(), time.process_time()
        bar = tqdm(range(1, int(iterations) + 1), disable=not progress,
                   desc=f"inverting {vgg_layer_names(model)[layer_index]}")
        for step in bar:
            opt.zero_grad(set_to_none=True)
            feature_loss = euclidian_loss(target, trunk(x))
            loss = feature_loss
            if alpha_weight:
                loss = loss + alpha_weight * alpha_norm(x, alpha) / n_values
            if tv_weight:
                loss = loss + tv_weight * total_variation_norm(x, tv_beta) / n_values
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
            feature_losses.append(feature_loss.item())
            if step in snap_at:
                snapshots.append(recreate_image(x))
                snapshot_steps.append(step)
            if step % 10 == 0 or step == 1:
                bar.set_postfix(feature_loss=f"{feature_losses[-1]:.3g}")
        bar.close()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        for m, flag in was_training:
            m.training = flag
    if not np.isfinite(losses[-1]):
        raise FloatingPointError(f"The inversion diverged (loss {losses[-1]}); try a smaller lr.")
    return {
        "image": recreate_image(x), "tensor": x.detach().cpu(),
        "snapshots": snapshots, "snapshot_steps": snapshot_steps,
        "loss": np.array(losses), "feature_loss": np.array(feature_losses),
        "layer_index": layer_index, "layer_name": vgg_layer_names(model)[layer_index],
        "seconds": seconds, "cpu_seconds": cpu_seconds,
    }


# -------------------------------------------------------------------------------------------
# Claims: what a notebook says about its own outputs, checked and recorded
# -------------------------------------------------------------------------------------------

#: The output type under which ``record`` stores values in an executed notebook.
VALUES_MIMETYPE = "application/vnd.cnn-course.values+json"


class ClaimError(AssertionError):
    """A sentence of a notebook no longer holds for the numbers it describes."""


def claim(condition, statement, evidence=""):
    """Check a statement a notebook makes about its outputs; fail loudly if it does not hold.

    ``condition`` is the test in code, ``statement`` the sentence shown to students,
    ``evidence`` the numbers (put into the error). Returns ``statement``.
    """
    if not bool(condition):
        raise ClaimError(f"The notebook says: \"{statement}\" but its output shows otherwise. {evidence}".strip())
    return statement


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def record(**values):
    """Store named results in the executed notebook, invisibly (no text is shown).

    Tests and tools read them back from the output of type ``VALUES_MIMETYPE``,
    so that they check numbers, not printed sentences.
    """
    from IPython.display import display

    display({VALUES_MIMETYPE: _jsonable(values), "text/plain": ""}, raw=True)



# ---------------------------------------------------------------------------------------------
# Settings: ``cnn_utils.NAME = value`` sets NAME in the module that reads it
# ---------------------------------------------------------------------------------------------
def _setting_owners():
    owners = {}
    for name, module in sys.modules.items():
        if name.startswith("cnnlib.") and module is not None:
            for key, value in vars(module).items():
                if (key.isupper() and not callable(value) and not isinstance(value, types.ModuleType)
                        and globals().get(key, object()) is value):
                    owners.setdefault(key, []).append(module)
    return owners


class _CourseModule(types.ModuleType):
    """``cnn_utils`` itself: assigning a re-exported setting also assigns it where it is used."""

    def __setattr__(self, name, value):
        for module in _SETTING_OWNERS.get(name, ()):
            setattr(module, name, value)
        super().__setattr__(name, value)


_SETTING_OWNERS = _setting_owners()
if isinstance(sys.modules.get(__name__), types.ModuleType):   # imported (not run from its source by hand)
    sys.modules[__name__].__class__ = _CourseModule
