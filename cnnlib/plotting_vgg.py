"""Plotting for the VGG16 notebooks (feature maps by depth, inversions, crops, photos).
"""
from __future__ import annotations


import numpy as np

from .frameworks import _min_max_scaled
from .checks import _is_int, _is_number
from .images import deprocess_image
from .plotting import (_display_images, _two_row_figure, colormap, format_probability,
    plot_all_channels)


def plot_top_predictions(images, predictions, titles=None, title="Top-5 predictions"):
    """Each photo (uint8 H x W x 3) beside a bar chart of its (class, probability) list.

    The axis runs from 0 to 100 % unless every probability is below 20 %: then it is scaled
    to the largest one (and says so), so near-uniform predictions stay visible. Labels are
    ``format_probability`` with 3 decimals when every probability is below 1 %.
    """
    import matplotlib.pyplot as plt

    n = len(images)
    if n == 0 or n != len(predictions):
        raise ValueError(f"Need as many prediction lists as images (got {n} images, "
                         f"{len(predictions)} prediction lists, at least one).")
    images = [_display_images(img, "images") for img in images]
    for preds in predictions:
        if not all(isinstance(p, (tuple, list)) and len(p) == 2 and _is_number(p[1]) for p in preds):
            raise ValueError("predictions must be lists of (class name, probability) pairs, as "
                             f"top_k_predictions returns; got {preds!r}"[:200] + ".")
    fig, axes = plt.subplots(n, 2, figsize=(9, 2.4 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.2]})
    largest = max(float(p) for preds in predictions for _, p in preds)
    xmax = 100.0 if largest >= 0.2 else 150 * largest or 1.0
    decimals = 1 if largest >= 0.01 else 3
    for i, (img, preds) in enumerate(zip(images, predictions)):
        axes[i, 0].imshow(img)
        axes[i, 0].axis("off")
        if titles is not None:
            axes[i, 0].set_title(str(titles[i]), fontsize=9)
        names = [name for name, _ in preds][::-1]
        probs = [100 * p for _, p in preds][::-1]
        axes[i, 1].barh(range(len(names)), probs, color="tab:blue")
        axes[i, 1].set_yticks(range(len(names)), names, fontsize=9)
        axes[i, 1].set_xlim(0, xmax)
        axes[i, 1].set_xlabel("probability (%)" if xmax == 100 else "probability (%; axis scaled to the largest)")
        for y, (_, p) in enumerate(preds[::-1]):
            axes[i, 1].text(min(100 * p + 0.01 * xmax, 0.88 * xmax), y, format_probability(p, decimals),
                            va="center", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_rgb_filters(weights, ncols=16, title="First-layer filters as RGB images", size=0.85):
    """First-layer conv filters (F, 3, k, k) as small RGB images.

    Each filter is scaled to its own min..max, so the colours show the pattern a
    filter looks for, not its strength (RGB images need no colour bar).
    """
    import matplotlib.pyplot as plt

    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"Expected weights (F, 3, k, k) of a layer that sees RGB, got shape {w.shape}.")
    rgb = _min_max_scaled(w, (1, 2, 3))[0].transpose(0, 2, 3, 1)
    n = len(rgb)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(rgb[i], interpolation="nearest")
            ax.set_title(str(i), fontsize=8)
    fig.suptitle(f"{title}\n(each filter scaled to its own range)", fontsize=10)
    fig.tight_layout()
    return fig


def _strongest_channels(maps, n):
    return list(np.argsort(maps.reshape(len(maps), -1).mean(axis=1))[::-1][:n])


def plot_strongest_channels(maps, channels=None, n=16, ncols=8, layer_name="layer", cmap="viridis", size=1.3):
    """The ``n`` channels with the largest mean activation (or the given ``channels``) of one
    image's feature maps (C, H, W), PyTorch's layout, on one colour scale
    (``plot_all_channels`` draws them)."""
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"Expected feature maps (C, H, W), got shape {maps.shape}.")
    if maps.shape[0] == maps.shape[1] != maps.shape[2]:
        raise ValueError(f"Feature maps of shape {maps.shape} look like (H, W, C), the Keras layout; this "
                         "function takes PyTorch's (C, H, W): pass np.moveaxis(maps, -1, 0).")
    channels = _strongest_channels(maps, n) if channels is None else list(np.atleast_1d(channels))
    if not channels or any(not _is_int(c) or not 0 <= c < len(maps)
                           for c in channels):
        raise ValueError(f"channels must be indices from 0 to {len(maps) - 1}; got {channels}.")
    return plot_all_channels(
        np.moveaxis(maps[channels], 0, -1), ncols=ncols, cmap=cmap, size=size,
        labels=[f"channel {c}" for c in channels],
        title=f"{layer_name}: {len(channels)} of {len(maps)} channels, "
              f"{maps.shape[1]} x {maps.shape[2]} each")


def plot_feature_maps_by_depth(maps_by_layer, n=6, cmap="viridis", size=1.4):
    """One row per layer (``{name: (C, H, W)}``): its ``n`` strongest channels, each row on
    its own colour scale with its colour bar, so the maps shrink and sparsify with depth."""
    import matplotlib.pyplot as plt

    if not isinstance(maps_by_layer, dict) or not maps_by_layer:
        raise TypeError("maps_by_layer must be a non-empty dict {layer name: (C, H, W) array}.")
    names = list(maps_by_layer)
    bad = {k: np.shape(v) for k, v in maps_by_layer.items() if np.ndim(v) != 3}
    if bad:
        raise ValueError(f"maps_by_layer must hold feature maps (C, H, W); got shapes {bad}.")
    fig, axes = plt.subplots(len(names), n, figsize=(size * n + 1.2, size * len(names) + 0.6), squeeze=False)
    for row, name in enumerate(names):
        maps = np.asarray(maps_by_layer[name])
        channels = _strongest_channels(maps, n)
        vmax = float(maps[channels].max()) or 1.0
        im = None
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(channels):
                im = ax.imshow(maps[channels[col]], cmap=colormap(cmap), vmin=0, vmax=vmax)
                ax.set_title(f"ch {channels[col]}", fontsize=9)
        axes[row, 0].set_ylabel(f"{name}\n{maps.shape[1]}x{maps.shape[2]}x{maps.shape[0]}", fontsize=9)
        zero = 100 * float(np.mean(maps <= 0))
        axes[row, -1].text(1.05, 0.5, f"{zero:.0f} %\nzero", transform=axes[row, -1].transAxes,
                           fontsize=9, va="center")
        fig.colorbar(im, ax=axes[row].tolist(), shrink=0.9, pad=0.08)
    fig.suptitle("Feature maps by depth (strongest channels; rows: H x W x C)")
    return fig


def plot_inversion(result, original=None, title=None, n_snapshots=3, start=None):
    """A feature inversion's progress: ``n_snapshots`` of its snapshots, the ones nearest to
    evenly spaced steps counted from step 0 (the last always among them), and the loss curves.
    ``start``: the starting image (step 0, before any update), shown first when given."""
    import matplotlib.pyplot as plt

    needed = {"snapshots", "snapshot_steps", "loss", "feature_loss", "layer_name", "layer_index"}
    if not isinstance(result, dict) or not needed <= set(result):
        raise ValueError("result must be what feature_inversion returns (a dict with "
                         f"{', '.join(sorted(needed))}).")
    if not isinstance(n_snapshots, int) or n_snapshots < 1:
        raise ValueError(f"n_snapshots must be a positive integer, got {n_snapshots!r}.")
    if not len(result["snapshot_steps"]) or len(result["snapshot_steps"]) != len(result["snapshots"]):
        raise ValueError("result['snapshots'] and result['snapshot_steps'] must be non-empty and of equal length.")
    steps_taken = np.asarray(result["snapshot_steps"], dtype=float)
    wanted = np.linspace(0, steps_taken[-1], min(n_snapshots, len(steps_taken)) + 1)[1:]   # evenly from step 0
    keep = sorted({int(np.argmin(np.abs(steps_taken - w))) for w in wanted})
    snaps = [result["snapshots"][k] for k in keep]
    snap_steps = [result["snapshot_steps"][k] for k in keep]
    if start is not None:
        snaps, snap_steps = [start] + snaps, ["0 (start)"] + snap_steps   # the noise the optimisation starts from
    extra = 1 if original is not None else 0
    ncols = len(snaps) + extra + 1
    fig, axes = plt.subplots(1, ncols, figsize=(2.2 * ncols + 1.8, 3.4),
                             gridspec_kw={"width_ratios": [1] * (ncols - 1) + [1.6]})
    if original is not None:
        axes[0].imshow(original)
        axes[0].set_title("original", fontsize=10)
    for ax, img, step in zip(axes[extra:], snaps, snap_steps):
        ax.imshow(img)
        ax.set_title(f"step {step}", fontsize=10)
    for ax in axes[:-1]:
        ax.axis("off")
    ax = axes[-1]
    steps = np.arange(1, len(result["loss"]) + 1)
    ax.semilogy(steps, result["loss"], label="total")
    ax.semilogy(steps, result["feature_loss"], label="feature (relative)")
    ax.set_xlabel("iteration", fontsize=9)
    ax.set_ylabel("loss (log scale)", fontsize=9)
    ax.tick_params(labelsize=9)
    ax.legend(fontsize=9)
    fig.suptitle(title or f"Inverting {result['layer_name']} (features[{result['layer_index']}])")
    fig.tight_layout()
    return fig


def plot_reconstructions(original, results, scores=None, title="What each depth keeps"):
    """The original beside reconstructions from several layers; ``scores`` are (SSIM, PSNR)."""
    import matplotlib.pyplot as plt

    if not results or any(not isinstance(r, dict) or not {"image", "layer_name"} <= set(r) for r in results):
        raise ValueError("results must be a non-empty list of feature_inversion results (dicts with 'image' "
                         "and 'layer_name').")
    if scores is not None and len(scores) != len(results):
        raise ValueError(f"scores needs one (SSIM, PSNR) pair per result: {len(results)}, got {len(scores)}.")
    n = len(results) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 3.3), layout="constrained")  # room for the suptitle
    axes[0].imshow(original)
    axes[0].set_title("original", fontsize=10)
    for i, res in enumerate(results):
        axes[i + 1].imshow(res["image"])
        label = res["layer_name"]
        if scores is not None:
            label += f"\nSSIM {scores[i][0]:.2f}\nPSNR {scores[i][1]:.1f} dB"
        axes[i + 1].set_title(label, fontsize=10)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    return fig


def plot_quality_vs_depth(layer_names, ssim, psnr, title="How much of the image each depth keeps"):
    """SSIM (left axis) and PSNR (right axis) of the reconstructions against depth."""
    import matplotlib.pyplot as plt

    if not len(layer_names) == len(ssim) == len(psnr) or not len(layer_names):
        raise ValueError(f"layer_names, ssim and psnr need one entry per layer; got {len(layer_names)}, "
                         f"{len(ssim)} and {len(psnr)}.")
    x = np.arange(len(layer_names))
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.plot(x, ssim, "o-", color="tab:blue", label="SSIM")
    ax.set_ylabel("SSIM (1 = identical)", color="tab:blue")
    ax.set_ylim(min(0.0, float(np.min(ssim)) - 0.05), 1.0)
    ax.set_xticks(x, layer_names)
    ax.set_xlabel("layer inverted (deeper to the right)")
    ax2 = ax.twinx()
    ax2.plot(x, psnr, "s--", color="tab:red", label="PSNR")
    ax2.set_ylabel("PSNR (dB)", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_saliency(image, saliency, title="Gradient saliency", cmap="hot"):
    """A photo (uint8 H x W x 3), its saliency map (H, W) with a colour bar, and an overlay."""
    import matplotlib.pyplot as plt

    sal = np.asarray(saliency, dtype=np.float64)
    if sal.shape != np.asarray(image).shape[:2]:
        raise ValueError(f"saliency {sal.shape} must match the image's H x W {np.asarray(image).shape[:2]}.")
    if not np.all(np.isfinite(sal)):
        raise ValueError("saliency contains NaN or infinite values.")
    image = _display_images(image, "image")
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=9)
    im = axes[1].imshow(sal, cmap=colormap(cmap))
    axes[1].set_title("|d score / d pixel| (max over RGB)", fontsize=9)
    fig.colorbar(im, ax=axes[1], shrink=0.85, label="gradient magnitude")
    axes[2].imshow(image)
    axes[2].imshow(sal / (sal.max() or 1.0), cmap=colormap(cmap), alpha=0.55)
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_units_with_crops(images, crops, titles, title="Feature visualization", size=1.5):
    """One row per unit: its synthesised image (from ``vgg_feature_visualization``) beside
    the photo patches that drive it hardest (``top_activating_crops``).

    ``images``: (K, H, W, 3) in [0, 1]; ``crops``: K lists of dicts with ``crop``, ``photo``
    and ``value``; ``titles``: K row labels. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    images = np.asarray(images, dtype=np.float32)
    if len(images) != len(crops) or len(images) != len(titles):
        raise ValueError(f"images, crops and titles must have one entry per unit; got {len(images)}, "
                         f"{len(crops)} and {len(titles)}.")
    ncols = 1 + max((len(c) for c in crops), default=0)
    fig, axes = plt.subplots(len(images), ncols, figsize=(size * ncols + 0.4, size * len(images) + 0.6),
                             squeeze=False)
    # one number of decimals for every patch value of the figure, so that they compare at a glance
    largest = max((abs(float(c["value"])) for row in crops for c in row), default=0.0)
    decimals = 2 if largest < 10 else 1 if largest < 100 else 0
    for i, (img, row) in enumerate(zip(images, crops)):
        axes[i, 0].imshow(np.clip(img, 0, 1))
        axes[i, 0].set_ylabel(str(titles[i]), fontsize=9)
        for j in range(1, ncols):
            if j - 1 < len(row):
                axes[i, j].imshow(np.clip(row[j - 1]["crop"], 0, 1))
                axes[i, j].set_title(f"{row[j - 1]['photo']}: {row[j - 1]['value']:.{decimals}f}", fontsize=9)
            else:
                axes[i, j].axis("off")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("synthesised", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_dataset_examples(synthetic, examples, values, labels, synthetic_values=None, crop=0,
                          size=1.2, title=None):
    """One row per filter or class: its activation-maximization image (deprocessed), then
    the real images that excite it most, each titled with its response.

    ``synthetic`` (F, H, W, 1) raw optimised images; ``examples`` (F, k, H, W, 1) images in
    [0, 1]; ``values`` (F, k) their responses; ``labels`` F row names;
    ``synthetic_values`` (F,) the synthetic images' responses (optional).
    """
    import matplotlib.pyplot as plt

    examples = np.asarray(examples)
    values = np.asarray(values)
    n, k = examples.shape[:2]
    if len(synthetic) != n or values.shape != (n, k) or len(labels) != n:
        raise ValueError(f"synthetic ({len(synthetic)}), examples {examples.shape[:2]}, values "
                         f"{values.shape} and labels ({len(labels)}) must describe the same rows.")
    shown = deprocess_image(synthetic, crop=crop)
    fig, axes = plt.subplots(n, k + 1, squeeze=False, layout="constrained",
                             figsize=(size * (k + 1) + 1.2, size * n + 0.9))
    im_real = None
    for r in range(n):
        ax = axes[r, 0]     # deprocessed: each synthetic image rescaled on its own (no shared scale to show)
        ax.imshow(shown[r, ..., 0], cmap="gray", vmin=0, vmax=255)
        extra = "" if synthetic_values is None else f"\nresponse {synthetic_values[r]:.2f}"
        ax.set_title(f"synthetic{extra}", fontsize=9, color="tab:blue")
        ax.set_ylabel(str(labels[r]), fontsize=10)
        for c in range(k):
            im_real = axes[r, c + 1].imshow(examples[r, c, ..., 0], cmap="gray", vmin=0, vmax=1)
            axes[r, c + 1].set_title(f"{values[r, c]:.2f}", fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im_real, ax=axes[:, 1:], shrink=0.5, label="pixel value (test images)")
    fig.suptitle(title or f"Synthetic image and the {k} test images with the largest response")
    return fig


def plot_raw_and_deprocessed(images, labels, title=None, size=1.8, crop=0):
    """Optimised images (K, H, W, 1) twice: top row raw, on ONE shared grey scale (so a
    regularizer that shrinks the image shows as fainter); bottom row each image
    deprocessed on its own (``deprocess_image``: the pattern, whatever its size)."""

    raw = np.asarray(images, dtype=np.float32)
    if raw.ndim != 4 or raw.shape[-1] != 1 or len(labels) != len(raw):
        raise ValueError(f"images must be (K, H, W, 1) with one label each; got {raw.shape} "
                         f"and {len(labels)} labels.")
    if not _is_int(crop) or crop < 0 \
            or 2 * crop >= min(raw.shape[1:3]):
        raise ValueError(f"crop must be an integer >= 0 that leaves part of the {raw.shape[1]}x{raw.shape[2]} "
                         f"images; got {crop!r}.")
    if crop:
        raw = raw[:, crop:-crop, crop:-crop]
    n = len(raw)
    lim = float(np.abs(raw).max()) or 1.0
    shown = deprocess_image(raw)
    fig, axes = _two_row_figure(n, size, extra_width=1.5, extra_height=0.7)
    for i in range(n):
        im_raw = axes[0, i].imshow(raw[i, ..., 0], cmap="gray", vmin=-lim, vmax=lim)
        im_dep = axes[1, i].imshow(shown[i, ..., 0], cmap="gray", vmin=0, vmax=255)
        axes[0, i].set_title(str(labels[i]), fontsize=9)
    axes[0, 0].set_ylabel("raw, shared scale", fontsize=9)
    axes[1, 0].set_ylabel("each standardised", fontsize=9)
    fig.colorbar(im_raw, ax=axes[0, :], shrink=0.9, label="pixel value")
    fig.colorbar(im_dep, ax=axes[1, :], shrink=0.9, label="deprocessed")
    fig.suptitle(title or "Optimised images: raw and deprocessed")
    return fig
