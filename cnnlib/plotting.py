"""Plotting: functions that only draw. Each takes arrays and returns a matplotlib Figure.
"""
from __future__ import annotations


import textwrap

import numpy as np

from .checks import _as_labels, _as_probs, _check_titles, _check_unit_maps, _is_int, _is_number
from .data import DEFAULT_SEED
from .images import deprocess_image
from .embeddings import _as_points


def format_probability(p, decimals=1, max_decimals=None):
    """A probability as a percentage with enough decimals not to round to 0 % or 100 %.

    ``decimals`` is the least number of decimals; more are added while the rounded
    value would read 100 (or 0) for ``0 < p < 1``: 0.9997 -> ``"99.97 %"``,
    0.488 -> ``"48.8 %"``, 1.0 -> ``"100.0 %"``. With ``max_decimals``, a value that
    would need more reads as a bound: 0.9999999996 -> ``"over 99.9999 %"`` (4).
    """
    if isinstance(p, (bool, np.bool_)) or not np.isscalar(p) or not np.isreal(p):
        raise TypeError(f"p must be one probability (a real number), got {p!r}.")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}.")
    if not _is_int(decimals) or decimals < 0:
        raise ValueError(f"decimals must be a non-negative integer, got {decimals!r}.")
    if max_decimals is not None and (not _is_int(max_decimals) or max_decimals < decimals):
        raise ValueError(f"max_decimals must be an integer >= decimals ({decimals}), got {max_decimals!r}.")
    for d in range(int(decimals), 17 if max_decimals is None else int(max_decimals) + 1):
        text = f"{100 * p:.{d}f}"
        if (p in (0.0, 1.0)) or 0.0 < float(text) < 100.0:
            return f"{text} %"
    if max_decimals is not None:      # closer to 1 (or 0) than max_decimals can show: a bound, never "100 %"
        step = 10.0 ** -int(max_decimals)
        return f"over {100 - step:.{max_decimals}f} %" if p > 0.5 else f"under {step:.{max_decimals}f} %"
    return f"{100 * p:.17g} %"


def probability_decimals(probs):
    """Decimals for ``format_probability``: 3 when the largest probability is below 1 % (a flat
    distribution, e.g. random weights: enough digits to tell the classes apart), else 1."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.size == 0 or not np.all(np.isfinite(probs)):
        raise ValueError(f"probs must be a non-empty array of finite probabilities, got {probs!r}.")
    return 3 if float(np.max(probs)) < 0.01 else 1


def format_correlation(r, signed=False, near=None):
    """A correlation with two decimals, never ``"-0.00"``; three where two would hide which side
    of ``near`` (e.g. the sanity threshold 0.5) ``|r|`` lies on.

    0.4962 -> ``"0.50"``, with ``near=0.5`` -> ``"0.496"``; -0.001 -> ``"0.00"``;
    ``signed=True`` writes the sign of non-zero values: 0.42 -> ``"+0.42"``.
    """
    if isinstance(r, (bool, np.bool_)) or not np.isscalar(r) or not np.isreal(r) or not np.isfinite(r):
        raise ValueError(f"r must be one finite number, got {r!r}.")
    r = float(r)
    decimals = 3 if near is not None and abs(abs(r) - float(near)) < 0.005 else 2
    if abs(r) < 0.5 * 10.0 ** -decimals:
        return f"{0.0:.{decimals}f}"
    return f"{r:+.{decimals}f}" if signed else f"{r:.{decimals}f}"


def _display_images(images, name="images"):
    """Images for display on the [0, 1] scale: uint8 / 255; floats must lie in [0, 1]
    (so that nothing is silently clipped to white or black)."""
    a = np.asarray(images)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be an array of numbers, got dtype {a.dtype}.")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}).")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255.0)
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contain NaN or infinite values.")
    if a.min() < -1e-3 or a.max() > 1 + 1e-3:
        raise ValueError(
            f"{name} are shown on the scale [0, 1], but hold values from {a.min():.4g} to {a.max():.4g}. "
            "Divide 0..255 values by 255 (uint8 images are scaled automatically); show optimised "
            "images with deprocess_image."
        )
    return np.clip(a, 0.0, 1.0)


def _grid(n, ncols, size, extra_width=0.0, title_space=0.5):
    """A figure with ``n`` small axes (constrained layout), all axis frames off."""
    import matplotlib.pyplot as plt

    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                             figsize=(size * ncols + extra_width, size * nrows + title_space))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes


def plot_all_channels(maps, title=None, ncols=8, cmap="viridis", size=1.1, labels=None):
    """Every channel of one image's feature maps (H, W, C), Keras' layout, one panel each.

    One colour scale for all channels (0 .. the largest value), so panels compare
    honestly; channels that are zero everywhere are titled in red with "(0)".
    """
    import matplotlib

    if isinstance(maps, dict):
        raise TypeError("maps must be one layer's array (H, W, C), not the dict of get_activations: "
                        "pick a layer and an image, e.g. acts['conv1'][0].")
    maps = np.asarray(maps)
    if maps.ndim == 4 and maps.shape[0] == 1:
        maps = maps[0]
    if maps.ndim != 3:
        raise ValueError(f"plot_all_channels expects one image's maps (H, W, C); got shape {maps.shape} "
                         "(a batch: pick one image, e.g. maps[0]).")
    if maps.size == 0 or not np.all(np.isfinite(maps)):
        raise ValueError("maps must be non-empty and finite (no NaN or infinite values).")
    if labels is not None and len(labels) != maps.shape[-1]:
        raise ValueError(f"labels has {len(labels)} entries for {maps.shape[-1]} channels.")
    n = maps.shape[-1]
    vmin = min(0.0, float(maps.min()))
    vmax = max(float(maps.max()), vmin + 1e-6)
    fig, axes = _grid(n, ncols, size)
    im = None
    for c, ax in enumerate(axes.flat[:n]):
        im = ax.imshow(maps[..., c], cmap=colormap(cmap), vmin=vmin, vmax=vmax)
        zero = not np.any(maps[..., c])
        label = labels[c] if labels is not None else f"ch {c}"
        ax.set_title(label + (" (0)" if zero else ""), fontsize=9 if size >= 1.0 else 8, color="tab:red" if zero else "black")
    fig.colorbar(im, ax=axes, shrink=0.8, label="activation")
    fig.suptitle(title or f"{n} feature maps ({maps.shape[0]}x{maps.shape[1]})")
    return fig


def plot_layer_sparsity(sparsity, spread=None, title=None, dead=None):
    """Bar chart of the fraction of all-zero channels per layer (a dict name -> fraction).

    ``spread`` (optional dict name -> standard deviation over images) adds error bars.
    ``dead`` (optional dict name -> fraction of channels that are zero on every image, for some
    or all layers) draws that part of each bar in grey, so dead channels and channels that are
    off only for some images can be told apart. Each bar's value is written above its error bar.
    """
    import matplotlib.pyplot as plt

    if not isinstance(sparsity, dict) or not sparsity:
        raise TypeError("sparsity must be a non-empty dict {layer name: fraction}, as layer_sparsity returns.")
    names = list(sparsity)
    values = np.array([sparsity[n] for n in names], dtype=np.float64) * 100
    if not np.all((values >= 0) & (values <= 100)):
        raise ValueError("sparsity values must be fractions in [0, 1].")
    if spread is not None and set(spread) != set(names):
        raise ValueError("spread must have the same layer names as sparsity.")
    if dead is not None and (not isinstance(dead, dict) or not set(dead) <= set(names)):
        raise ValueError("dead must be a dict {layer name: fraction} with layer names from sparsity.")
    err = None if spread is None else np.array([spread[n] for n in names]) * 100
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.6), layout="constrained")
    bars = ax.bar(names, values, color="tab:blue",
                  label=None if dead is None else "off for some images (live channels)")
    if dead is not None:
        dead_values = np.array([min(100 * dead.get(n, 0.0), v) for n, v in zip(names, values)])
        ax.bar(names, dead_values, color="tab:gray", label="dead on the data: zero on every image")
        ax.legend(loc="upper left", fontsize=9)
    if err is not None:      # drawn last, so that no bar covers it
        ax.errorbar(names, values, yerr=err, fmt="none", ecolor="black", capsize=4, zorder=3)
    tops = values if err is None else values + err
    for bar, v, top in zip(bars, values, tops):
        ax.annotate(f"{v:.1f} %", (bar.get_x() + bar.get_width() / 2, top), ha="center",
                    va="bottom", fontsize=9, xytext=(0, 3), textcoords="offset points")
    ax.set_xlabel("layer (input side -> output side)")
    ax.set_ylabel("channels all zero (%)")
    ax.set_ylim(0, max(10.0, float(tops.max()) * 1.25))
    ax.set_title(title or "Sparsity: fraction of channels that are off for an image")
    return fig


def _symmetric_norm(values):
    import matplotlib

    vmax = float(np.max(np.abs(values))) or 1.0
    return matplotlib.colors.TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax)


def plot_kernels(kernel, in_channel=0, annotate=True, ncols=8, size=1.6, title=None,
                 bias=None):
    """Each output filter's kernel slice as a red/blue heatmap centred on 0.

    ``kernel`` is (kh, kw, in_channels, out_channels) (as ``get_filter_weights``
    returns it); the slice for input channel ``in_channel`` is shown. With
    ``annotate`` each cell shows its weight. Red is positive, blue negative, white 0,
    on one symmetric scale for all filters.
    """
    import matplotlib

    k = np.asarray(kernel)
    if k.ndim != 4:
        raise ValueError(f"kernel must be (kh, kw, in_channels, out_channels); got shape {k.shape}.")
    if not _is_int(in_channel) or not 0 <= in_channel < k.shape[2]:
        raise ValueError(f"in_channel must be an integer from 0 to {k.shape[2] - 1}, got {in_channel!r}.")
    if bias is not None and np.shape(bias) != (k.shape[-1],):
        raise ValueError(f"bias must have one value per filter, shape ({k.shape[-1]},); got {np.shape(bias)}.")
    if bias is not None and np.asarray(bias).dtype.kind not in "iuf":
        raise TypeError(f"bias must hold numbers, got dtype {np.asarray(bias).dtype}.")
    k = k[:, :, in_channel, :]
    n = k.shape[-1]
    norm = _symmetric_norm(k)
    cmap = matplotlib.colormaps["RdBu_r"]
    fig, axes = _grid(n, ncols, size)
    im = None
    for f, ax in enumerate(axes.flat[:n]):
        im = ax.imshow(k[..., f], cmap=cmap, norm=norm)
        label = f"filter {f}" + (f"\nbias {bias[f]:+.2f}" if bias is not None else "")
        ax.set_title(label, fontsize=9)
        if annotate:       # 9 pt in a 3x3 kernel of the default size (readable on a projector); smaller cells, smaller text
            value_size = min(9.0, 17.0 * size / max(k.shape[:2]))
            for (i, j), w in np.ndenumerate(k[..., f]):
                strong = abs(w) > 0.6 * norm.vmax
                ax.text(j, i, f"{w:.2f}", ha="center", va="center", fontsize=value_size,
                        color="white" if strong else "black")
    fig.colorbar(im, ax=axes, shrink=0.8, label="weight")
    fig.suptitle(title or f"{n} kernels {k.shape[0]}x{k.shape[1]} (input channel {in_channel})")
    return fig


def plot_kernel_matrix(kernel, out_channels=None, in_channels=None, size=0.6, title=None):
    """Deeper-layer kernels as a matrix: one row per output filter, one column per input
    channel, each cell the (kh, kw) slice, on one symmetric red/blue scale.

    Every slice is shown as it is (no averaging over input channels, which would let
    positive and negative weights cancel and hide the structure).
    """
    import matplotlib

    k = np.asarray(kernel)
    if k.ndim != 4:
        raise ValueError(f"kernel must be (kh, kw, in_channels, out_channels); got shape {k.shape}.")
    outs = np.arange(k.shape[3]) if out_channels is None else np.atleast_1d(np.asarray(out_channels))
    ins = np.arange(k.shape[2]) if in_channels is None else np.atleast_1d(np.asarray(in_channels))
    for name, idx, n in (("out_channels", outs, k.shape[3]), ("in_channels", ins, k.shape[2])):
        if idx.size == 0 or idx.dtype.kind not in "iu" or idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"{name} must be indices from 0 to {n - 1}; got {idx.tolist()}.")
    sub = k[:, :, ins][:, :, :, outs]
    norm = _symmetric_norm(sub)
    cmap = matplotlib.colormaps["RdBu_r"]
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(outs), len(ins), squeeze=False, layout="constrained",
                             figsize=(size * len(ins) + 1.2, size * len(outs) + 0.6))
    im = None
    for r, o in enumerate(outs):
        for c, i in enumerate(ins):
            ax = axes[r, c]
            im = ax.imshow(sub[:, :, c, r], cmap=cmap, norm=norm)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"in {i}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"out {o}", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8, label="weight")
    fig.suptitle(title or "Kernels: rows = output filters, columns = input channels")
    return fig


def plot_feature_visualizations(images, labels=None, dead=None, ncols=8, size=1.2, crop=0,
                                title=None):
    """Optimised images (K, H, W, C), deprocessed, in a grid; dead ones are marked.

    ``dead`` is a boolean mask or a list of positions: those panels show the word
    "dead" instead of the (meaningless) noise image.
    """
    import matplotlib

    imgs = deprocess_image(images, crop=crop)
    if imgs.ndim == 3:
        imgs = imgs[np.newaxis]
    n = len(imgs)
    mask = np.zeros(n, bool)
    _check_titles(labels, n, "labels")
    if dead is not None:
        dead = np.asarray(dead)
        if dead.dtype == bool and dead.shape == (n,):
            mask = dead
        elif dead.dtype.kind in "iu" and dead.ndim == 1 and (dead.size == 0 or (dead.min() >= 0 and dead.max() < n)):
            mask[dead] = True
        else:
            raise ValueError(f"dead must be a boolean mask of {n} entries or positions 0..{n - 1}; got {dead!r}.")
    fig, axes = _grid(n, ncols, size)
    font = 9 if size >= 1.0 else 7            # titles readable on a projector; tiny panels get smaller ones
    gray = matplotlib.colormaps["gray"]
    im = None
    for i, ax in enumerate(axes.flat[:n]):
        label = labels[i] if labels is not None else str(i)
        if mask[i]:
            ax.imshow(np.full(imgs.shape[1:3], 128, np.uint8), cmap=gray, vmin=0, vmax=255)
            ax.text(0.5, 0.5, "dead", color="red", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, fontweight="bold")
            ax.set_title(str(label), fontsize=font, color="red")
            continue
        img = imgs[i, ..., 0] if imgs.shape[-1] == 1 else imgs[i]
        im = ax.imshow(img, cmap=gray, vmin=0, vmax=255)
        ax.set_title(str(label), fontsize=font)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="deprocessed, 128 = mean")
    fig.suptitle(title or "Activation maximization")
    return fig


def plot_objective_history(history, labels=None, title=None, max_lines=12):
    """The objective during gradient ascent (steps, K), one line per image (at most
    ``max_lines``, the rest summarised by the mean)."""
    import matplotlib.pyplot as plt

    h = np.asarray(getattr(history, "history", history), dtype=np.float64)
    if h.ndim == 1:
        h = h[:, np.newaxis]
    if h.ndim != 2 or len(h) == 0:
        raise ValueError(f"history must be (steps, K), as FeatureVisualization.history; got shape {h.shape}.")
    _check_titles(labels, h.shape[1], "labels")
    fig, ax = plt.subplots(figsize=(7.5, 3.5), layout="constrained")
    steps = np.arange(len(h))
    for k in range(min(h.shape[1], max_lines)):
        ax.plot(steps, h[:, k], lw=1, label=None if labels is None else str(labels[k]))
    if h.shape[1] > max_lines:
        ax.plot(steps, h.mean(axis=1), color="black", lw=2, label=f"mean of all {h.shape[1]}")
    if labels is not None or h.shape[1] > max_lines:
        ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))   # beside the plot, not over the lines
    ax.set_xlabel("step")
    ax.set_ylabel("objective")
    ax.set_title(title or "Gradient ascent: objective per step")
    return fig


def _two_row_figure(n, size, extra_width, extra_height):
    """A (2, n) grid of axes without ticks (images on top, maps below)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, n, squeeze=False, layout="constrained",
                             figsize=(size * n + extra_width, 2 * size + extra_height))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def plot_maps_across_images(images, maps, labels=None, title=None, cmap="viridis", size=1.4):
    """Inputs (top row) and one channel's feature map for each (bottom row), one shared
    colour scale for the maps."""
    import matplotlib

    images = _display_images(images)
    maps = np.asarray(maps)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if maps.ndim != 3 or len(maps) != len(images) or not np.all(np.isfinite(maps)):
        raise ValueError(f"maps must be (N, h, w) with N = {len(images)} images; got shape {maps.shape}.")
    n = len(images)
    fig, axes = _two_row_figure(n, size, extra_width=1.2, extra_height=0.6)
    vmax = max(float(maps.max()), 1e-6)
    im = None
    for i in range(n):
        axes[0, i].imshow(images[i], cmap="gray", vmin=0, vmax=1)
        im = axes[1, i].imshow(maps[i], cmap=colormap(cmap), vmin=0, vmax=vmax)
        if labels is not None:
            axes[0, i].set_title(str(labels[i]), fontsize=9)
    axes[0, 0].set_ylabel("input", fontsize=9)
    axes[1, 0].set_ylabel("feature map", fontsize=9)
    fig.colorbar(im, ax=axes[1, :], shrink=0.9, aspect=12, label="activation")
    fig.suptitle(title or "One filter on several inputs")
    return fig


def plot_image_grid(images, titles=None, ncols=10, cmap="gray", title=None, size=1.3,
                    title_colors=None, vmin=0.0, vmax=1.0):
    """Show images (N, H, W[, C]) in a grid with optional per-image titles.

    Returns the matplotlib Figure. ``title_colors`` colours each image's title
    (e.g. red for a mistake).
    """
    import matplotlib.pyplot as plt

    images = np.asarray(images)
    if images.ndim < 3 or len(images) == 0:
        raise ValueError(f"plot_image_grid needs a batch of at least one image (N, H, W[, C]); got shape "
                         f"{images.shape}.")
    if (vmin, vmax) == (0.0, 1.0):      # the default grey scale: refuse images on another scale
        images = _display_images(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    n = len(images)
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles has {len(titles)} entries for {n} images.")
    _check_titles(title_colors, n, "title_colors")
    colormap(cmap)
    if not _is_int(ncols) or ncols < 1:
        raise ValueError(f"ncols must be a positive integer, got {ncols!r}.")
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    title_lines = max((str(t).count("\n") + 1 for t in titles), default=0) if titles is not None else 0
    row_height = size + 0.19 * title_lines
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, row_height * nrows + 0.5),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i], cmap=cmap, vmin=vmin, vmax=vmax)
        if titles is not None:
            color = title_colors[i] if title_colors is not None else "black"
            ax.set_title(str(titles[i]), fontsize=9, color=color)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_training_curves(history, title="Training curves"):
    """Loss and accuracy per epoch, training vs validation.

    ``history`` is a Keras ``History``, its ``.history`` dict, or the ``history``
    recorded in a shipped model's JSON (``model_info(name)["history"]``).
    """
    import matplotlib.pyplot as plt

    hist = getattr(history, "history", history)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "accuracy", "accuracy")):
        if metric not in hist:
            raise ValueError(f"history has no {metric!r}; it has {sorted(hist)}")
        epochs = np.arange(1, len(hist[metric]) + 1)
        ax.plot(epochs, hist[metric], "o-", label="training")
        if f"val_{metric}" in hist:
            ax.plot(epochs, hist[f"val_{metric}"], "s--", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label.capitalize())
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(cm, class_names, title="Confusion matrix", normalize=False):
    """A seaborn heatmap of a confusion matrix (rows: true class, columns: predicted)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    cm = np.asarray(cm)
    class_names = list(class_names)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.dtype.kind not in "iuf":
        raise ValueError(f"cm must be a square matrix of counts (true class x predicted class), e.g. "
                         f"sklearn.metrics.confusion_matrix(y_true, y_pred); got shape {cm.shape}.")
    if len(class_names) != len(cm):
        raise ValueError(f"class_names has {len(class_names)} names for a {len(cm)} x {len(cm)} matrix.")
    if not np.all(np.isfinite(cm)) or cm.min() < 0:
        raise ValueError("cm must hold non-negative finite counts.")
    rows = cm.sum(axis=1, keepdims=True)
    data = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0) if normalize else cm
    integer = not normalize and np.all(cm == np.round(cm))
    data = data.astype(int) if integer else data
    fig, ax = plt.subplots(figsize=(7.5, 6.2))
    # counts: a log colour scale (linear below 1), so that the few mistakes off the diagonal are not white
    # beside the thousands on it; fractions keep the linear scale
    norm = None
    if integer and data.max() > 0:
        from matplotlib.colors import SymLogNorm
        norm = SymLogNorm(linthresh=1, vmin=0, vmax=data.max())
    sns.heatmap(
        data, annot=True, fmt="d" if integer else ".2f", cmap="Blues", square=True, ax=ax,
        xticklabels=class_names, yticklabels=class_names, norm=norm,
        cbar_kws={"label": "fraction of the true class" if normalize else "number of test images"},
        annot_kws={"fontsize": 9},
    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def overlay_heatmap(image, heatmap, alpha=0.4, cmap="jet"):
    """Blend a heatmap (H, W) in [0, 1] over an image for display.

    ``image`` is (H, W), (H, W, 1) or (H, W, 3) in [0, 1]; returns an RGB float32
    array (H, W, 3) in [0, 1]: ``(1 - alpha) * image + alpha * cmap(heatmap)``.
    """
    import matplotlib

    img = _display_images(image, "image")
    heat = np.asarray(heatmap, dtype=np.float32)
    if img.ndim == 4 and img.shape[0] == 1:
        img = img[0]
    if heat.ndim == 3 and heat.shape[0] == 1:
        heat = heat[0]
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3); got shape {np.shape(image)}.")
    if heat.ndim != 2 or heat.shape != img.shape[:2]:
        raise ValueError(f"heatmap must be (H, W) = {img.shape[:2]} like the image; got shape {np.shape(heatmap)}.")
    if not (np.all(np.isfinite(img)) and np.all(np.isfinite(heat))):
        raise ValueError("image and heatmap must not contain NaN or infinite values.")
    _check_unit_maps(heat, "heatmap")
    if not _is_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
    colored = colormap(cmap)(np.clip(heat, 0.0, 1.0))[..., :3].astype(np.float32)
    return np.clip((1.0 - alpha) * img + alpha * colored, 0.0, 1.0).astype(np.float32)


def plot_attribution_maps(images, maps, image_titles=None, overlay=True, alpha=0.5, cmap="jet",
                          title=None, size=1.6, transpose=False, label_size=None):
    """Each image beside its maps: ``maps`` is a dict method name -> (N, H, W).

    One row per image and one column per method (``transpose=True``: one column
    per image, one row per method). Maps are shown in [0, 1], overlaid on the
    image when ``overlay``, with one shared colour bar. ``label_size`` sets the font
    size of the image titles and the method labels (default 10, readable on a projector);
    a label longer than its panel is wrapped. Returns the Figure.
    """
    import matplotlib
    import matplotlib.pyplot as plt

    images = _display_images(images)
    if images.ndim == 3:
        images = images[..., None]
    if not isinstance(maps, dict) or not maps:
        raise ValueError("maps must be a non-empty dict: method name -> maps (N, H, W).")
    n = len(images)
    colormap(cmap)
    _check_titles(image_titles, n, "image_titles")
    for name, m in maps.items():
        if np.shape(m) != images.shape[:3]:
            raise ValueError(f"maps[{name!r}] has shape {np.shape(m)}; expected {images.shape[:3]}.")
        _check_unit_maps(m, f"maps[{name!r}]")
    if label_size is not None and (not _is_number(label_size) or not 4 <= label_size <= 24):
        raise ValueError(f"label_size must be a font size in points from 4 to 24 (or None), got {label_size!r}.")
    small = 10 if label_size is None else label_size         # image titles, row labels, column names
    pad = 4.0 if label_size is None else 0.8 * label_size    # the gap between a label and its panel
    names = list(maps)
    shape = (n, len(names) + 1) if not transpose else (len(names) + 1, n)
    fig, axes = plt.subplots(*shape, figsize=(size * shape[1] + 0.9, size * shape[0] + 0.5), squeeze=False)

    def ax_at(i, j):  # image i, column j (0 = the input)
        return axes[j, i] if transpose else axes[i, j]

    # a 10-pt label longer than its panel (about 11 characters per inch) is wrapped at spaces
    # (never before a "%": "12.3 %" stays on one line)
    fit = lambda text: (text if len(text) <= size * 11 or "\n" in text
                        else textwrap.fill(text.replace(" %", "\u00a0%"), width=max(int(size * 11), 6))
                        .replace("\u00a0", " "))
    gray = images[..., 0] if images.shape[-1] == 1 else images
    for i in range(n):
        ax_at(i, 0).imshow(gray[i], cmap="gray", vmin=0, vmax=1)
        for j, name in enumerate(names, 1):
            m = np.asarray(maps[name][i], dtype=np.float32)
            if overlay:
                ax_at(i, j).imshow(overlay_heatmap(images[i], m, alpha=alpha, cmap=cmap))
            else:
                ax_at(i, j).imshow(m, cmap=cmap, vmin=0, vmax=1)
        for j in range(len(names) + 1):
            ax_at(i, j).set_xticks([])
            ax_at(i, j).set_yticks([])
        if image_titles is not None:
            if transpose:
                ax_at(i, 0).set_title(fit(str(image_titles[i])), fontsize=small)
            else:
                ax_at(i, 0).set_ylabel(fit(str(image_titles[i])), fontsize=small, labelpad=pad)
    # lines of text above the top row: the column titles, or (transposed) the image titles
    above = ([fit(str(t)) for t in image_titles] if transpose and image_titles is not None else
             [] if transpose else [fit(name) for name in ["input"] + names])
    lines = max([label.count("\n") + 1 for label in above] + [1])
    for j, name in enumerate(["input"] + names):
        label = fit(name)
        if transpose:
            ax_at(0, j).set_ylabel(label, fontsize=small, labelpad=pad)
        else:
            ax_at(0, j).set_title(label, fontsize=small)
    sm = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=colormap(cmap))
    height = fig.get_size_inches()[1]
    top_space = (0.55 if title else 0.1) + 0.08 + 0.17 * lines * small / 10   # more lines, more room
    fig.subplots_adjust(left=0.06, right=0.86, bottom=0.02, top=1 - top_space / height,
                        wspace=0.08, hspace=0.45 if transpose and image_titles is not None else 0.15)
    cbar = fig.colorbar(sm, ax=axes, fraction=0.025, pad=0.02)
    cbar.set_label("attribution (scaled per image)")
    if title:
        fig.suptitle(title, y=1 - 0.15 / height, va="top")
    return fig


def plot_signed_attributions(images, attributions, image_titles=None, title=None, size=1.8):
    """Signed attributions (e.g. Integrated Gradients) on a diverging red/blue map.

    ``attributions`` (N, H, W[, C]) are summed over channels; red pushes the class
    score up, blue down; each image uses a symmetric range around 0. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    images = _display_images(images)
    attr = np.asarray(attributions, dtype=np.float32)
    if not np.all(np.isfinite(attr)):
        raise ValueError("attributions contain NaN or infinite values.")
    if attr.ndim == 4:
        attr = attr.sum(axis=-1)
    if images.ndim == 4:
        images = images[..., 0] if images.shape[-1] == 1 else images.mean(axis=-1)
    if attr.shape != images.shape[:3]:
        raise ValueError(f"attributions have shape {attr.shape}; expected {images.shape[:3]} (one per image).")
    n = len(images)
    _check_titles(image_titles, n, "image_titles")
    # a column holds the map and its colour bar: the rows are as tall as a map is wide (about size - 0.4)
    fig, axes = plt.subplots(2, n, figsize=(size * n + 0.6, 2 * (size - 0.4) + 0.8), squeeze=False, layout="constrained")
    for i in range(n):
        axes[0, i].imshow(images[i], cmap="gray", vmin=0, vmax=1)
        lim = float(np.abs(attr[i]).max()) or 1.0
        im = axes[1, i].imshow(attr[i], cmap="RdBu_r", vmin=-lim, vmax=lim)
        fig.colorbar(im, ax=axes[1, i], fraction=0.046, pad=0.04)
        if image_titles is not None:
            axes[0, i].set_title(str(image_titles[i]), fontsize=9)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("attribution\n(red +, blue -)")
    if title:
        fig.suptitle(title)
    return fig


def plot_probability_bars(images, probs, labels, class_names=None, title=None):
    """Each image above a bar chart of its class probabilities.

    The predicted class's bar is green when right and red when wrong; the true
    class's bar is outlined in black. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    p = _as_probs(probs)
    y = _as_labels(labels, len(p), p.shape[1])
    imgs = _display_images(images)
    if imgs.ndim == 4 and imgs.shape[-1] == 1:
        imgs = imgs[..., 0]
    if len(imgs) != len(p):
        raise ValueError(f"Got {len(imgs)} images but {len(p)} rows of probabilities.")
    k = p.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} names; probs has {k} classes.")
    n = len(p)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.8), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1.15]})
    for i in range(n):
        pred = int(p[i].argmax())
        ok = pred == y[i]
        axes[0, i].imshow(imgs[i], cmap="gray", vmin=0, vmax=1)
        axes[0, i].axis("off")
        axes[0, i].set_title(f"true {names[y[i]]}\npred {names[pred]} {'(right)' if ok else '(WRONG)'}",
                             fontsize=9, color="green" if ok else "red")
        colors = ["lightgray"] * k
        colors[pred] = "tab:green" if ok else "tab:red"
        bars = axes[1, i].bar(np.arange(k), p[i], color=colors)
        bars[y[i]].set_edgecolor("black")
        bars[y[i]].set_linewidth(1.5)
        axes[1, i].set_ylim(0, 1)
        axes[1, i].set_xticks(np.arange(k))
        axes[1, i].set_xticklabels(names, rotation=90, fontsize=9)
        axes[1, i].set_xlabel("class", fontsize=9)
        if i == 0:
            axes[1, i].set_ylabel("probability")
        else:
            axes[1, i].set_yticklabels([])
        top = format_probability(p[i].max(), max_decimals=4)       # "over 99.9999 %" beyond four decimals
        axes[1, i].set_title(f"max p > {top[5:]}" if top.startswith("over") else f"max p = {top}", fontsize=9)
    fig.suptitle(title or "Predicted class probabilities (black outline: true class)")
    fig.tight_layout()
    return fig


def plot_reliability_diagram(bins, titles=None, title=None):
    """Reliability diagram(s) from :func:`calibration_bins` dicts.

    ``bins`` is one dict or a list of them (e.g. before and after temperature
    scaling), one column each: top, accuracy per confidence bin against the
    diagonal of perfect calibration with the gap shaded and the ECE written in;
    bottom, how many predictions fall in each bin (log scale). Returns the Figure.
    """
    import matplotlib.pyplot as plt

    bins_list = [bins] if isinstance(bins, dict) else list(bins)
    needed = {"edges", "counts", "accuracy", "confidence", "gap", "weight", "n"}
    if not bins_list or any(not isinstance(b, dict) or not needed <= set(b) for b in bins_list):
        raise ValueError("bins must be what calibration_bins (or expected_calibration_error(..., return_bins=True)) "
                         "returns, or a list of those.")
    titles = list(titles) if titles is not None else [None] * len(bins_list)
    if len(titles) != len(bins_list):
        raise ValueError(f"Got {len(titles)} titles for {len(bins_list)} diagrams.")
    n = len(bins_list)
    fig, axes = plt.subplots(2, n, figsize=(4.6 * n, 6.2), squeeze=False, sharex=True,
                             gridspec_kw={"height_ratios": [3, 1.2]})
    for col, (b, t) in enumerate(zip(bins_list, titles)):
        edges = b["edges"]
        width = np.diff(edges)
        left = edges[:-1]
        has = b["counts"] > 0
        acc = np.where(has, b["accuracy"], 0.0)
        conf = np.where(has, b["confidence"], 0.0)
        ax = axes[0, col]
        ax.bar(left, acc, width=width, align="edge", color="tab:blue", edgecolor="black",
               linewidth=0.5, label="accuracy in bin")
        ax.bar(left[has], (conf - acc)[has], bottom=acc[has], width=width[has], align="edge",
               color="tab:red", alpha=0.35, hatch="//", edgecolor="tab:red", linewidth=0.5,
               label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ece = float(np.sum(b["weight"] * b["gap"]))
        ax.text(0.04, 0.93, f"ECE = {100 * ece:.2f} %\nn = {b['n']}", transform=ax.transAxes,
                va="top", fontsize=9, bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(t or "Reliability diagram")
        ax.legend(loc="lower right", fontsize=8)
        axc = axes[1, col]
        axc.bar(left, b["counts"], width=width, align="edge", color="gray", edgecolor="black",
                linewidth=0.5)
        if b["counts"].max() > 0:
            axc.set_yscale("log")
        axc.set_xlabel("confidence (largest probability)")
        axc.set_ylabel("predictions")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_histograms(samples, xlabel, title, bins=30, range=None, log=False):
    """Overlaid density histograms of several samples, e.g. confidence in and out of distribution.

    ``samples`` maps a legend label to a 1-D array. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    if not isinstance(samples, dict) or not samples:
        raise TypeError("samples must be a non-empty dict {label: 1-D array}.")
    arrays = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in samples.items()}
    for k, a in arrays.items():
        if a.size == 0 or not np.all(np.isfinite(a)):
            raise ValueError(f"samples[{k!r}] must be a non-empty array of finite numbers; got {a.size} values"
                             f"{'' if a.size == 0 else ' with NaN or infinite ones'}.")
    if not _is_int(bins) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}.")
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if range is None:
        lo = min(a.min() for a in arrays.values())
        hi = max(a.max() for a in arrays.values())
        range = (lo, hi if hi > lo else lo + 1)
    for label, a in arrays.items():
        ax.hist(a, bins=bins, range=range, density=True, alpha=0.55, label=f"{label} (n={len(a)})",
                log=log)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density (log scale)" if log else "density")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def spread_out_indices(points, n, seed=DEFAULT_SEED):
    """``n`` indices of ``points`` (N, 2) far apart from each other (greedy farthest-point)."""
    pts = _as_points(points, "points")
    if not _is_int(n) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}.")
    n = min(int(n), len(pts))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(pts)))]
    dist = np.linalg.norm(pts - pts[chosen[0]], axis=1)
    for _ in range(n - 1):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(pts - pts[nxt], axis=1))
    return np.array(chosen, dtype=np.int64)


def plot_embedding(embeddings, labels, class_names=None, images=None, n_thumbnails=0,
                   title=None, point_size=3, seed=DEFAULT_SEED, highlight=None):
    """Scatter 2-D embeddings coloured by class, one panel per embedding.

    ``embeddings`` is an (N, 2) array or a dict ``{panel title: (N, 2) array}``.
    With ``images`` (N, H, W[, 1]) and ``n_thumbnails``, that many images, spread
    over each map, are drawn at their points (framed in their class colour).
    ``highlight`` (indices) circles chosen points, e.g. outliers. Returns the Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    if not isinstance(embeddings, dict):
        embeddings = {"embedding": embeddings}
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0)):
        raise ValueError(f"labels must be class indices, non-negative integers (N,); got dtype {y.dtype}, "
                         f"shape {y.shape}.")
    if highlight is not None and len(highlight) and (np.min(highlight) < 0 or np.max(highlight) >= len(y)):
        raise ValueError(f"highlight holds indices of points, 0..{len(y) - 1}; got {list(highlight)[:10]}.")
    if images is not None and n_thumbnails and len(images) != len(y):
        raise ValueError(f"images has {len(images)} images for {len(y)} points; give one per point.")
    num_classes = int(y.max()) + 1 if len(y) else 1
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) < num_classes:
        raise ValueError(f"labels go up to {num_classes - 1} but only {len(names)} class names were given.")
    num_classes = len(names)  # every class in the legend, even one absent from this sample
    cmap = colormaps["tab10"]
    imgs = None
    if images is not None:
        imgs = np.asarray(images)
        if imgs.ndim == 4 and imgs.shape[-1] == 1:
            imgs = imgs[..., 0]
    n = len(embeddings)
    fig, axes = plt.subplots(1, n, figsize=(6.4 * n, 6.0), squeeze=False)
    for ax, (panel, emb) in zip(axes[0], embeddings.items()):
        e = _as_points(emb, "embedding")
        if e.shape != (len(y), 2):
            raise ValueError(f"embedding {panel!r} has shape {e.shape}, expected ({len(y)}, 2).")
        ax.scatter(e[:, 0], e[:, 1], c=cmap(y % 10), s=point_size, linewidths=0, alpha=0.8)
        if highlight is not None and len(highlight):
            h = np.asarray(highlight)
            ax.scatter(e[h, 0], e[h, 1], s=60, facecolors="none", edgecolors="black",
                       linewidths=1.2, label="highlighted")
        if imgs is not None and n_thumbnails:
            for i in spread_out_indices(e, n_thumbnails, seed=seed):
                box = AnnotationBbox(OffsetImage(imgs[i], cmap="gray_r", zoom=0.9), e[i],
                                     frameon=True, pad=0.1,
                                     bboxprops={"edgecolor": cmap(y[i] % 10), "linewidth": 1.5})
                ax.add_artist(box)
        ax.set_title(panel)
        ax.set_xlabel("dimension 1")
        ax.set_ylabel("dimension 2")
    handles = [Line2D([], [], marker="o", linestyle="", color=cmap(c % 10), label=names[c])
               for c in range(num_classes)]
    fig.legend(handles=handles, loc="center right", title="class", fontsize=10, title_fontsize=10, markerscale=1.2)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.9 if n > 1 else 0.82, 1))
    return fig


def colormap(name):
    """A matplotlib colormap by name (the current ``matplotlib.colormaps`` registry)."""
    import difflib

    import matplotlib

    if not isinstance(name, str) or name not in matplotlib.colormaps:
        close = difflib.get_close_matches(str(name), list(matplotlib.colormaps), n=3)
        raise ValueError(f"Unknown colour map {name!r}; use a name of matplotlib.colormaps, e.g. "
                         f"{', '.join(close or ['viridis', 'gray', 'jet'])}.")
    return matplotlib.colormaps[name]
