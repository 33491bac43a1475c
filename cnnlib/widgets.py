"""Widgets: the live explorers (ipywidgets) for the course CNN and VGG16.

The explorer takes its attribution methods from the caller (``cnn_utils.explorer_methods``),
so this module never imports ``cnn_utils``.
"""
from __future__ import annotations

import sys

import numpy as np

from .frameworks import _is_torch_module, _keras
from .checks import _as_labels, _check_batch_size, _is_int
from .keras_layers import (_check_keras_model, _keras_output_activation, conv_and_pool_layer_names,
    get_layer, last_conv_layer_name)
from .models import as_image_batch
from .photos import load_photo
from .vgg16 import _vgg_alias_names, vgg_layer_activations, vgg_layer_names
from .torch_engine import _TorchEngine
from .activations import get_activations
from .plotting import format_probability, overlay_heatmap, probability_decimals
from .plotting_vgg import _strongest_channels


ACTIVATIONS_METHOD = "Layer activations"

#: Most feature maps the explorer tiles at once (the strongest ones of a wider layer).
_MAX_TILED_CHANNELS = 64


def _png(rgb_or_gray, scale=1):
    """Encode an image array (H, W[, 3]) in [0, 1] as PNG bytes, enlarged by ``scale``."""
    from io import BytesIO

    from PIL import Image

    arr = np.clip(np.asarray(rgb_or_gray, dtype=np.float32), 0, 1)
    img = Image.fromarray((arr * 255).round().astype(np.uint8))
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _tile_channels(maps, ncols=8):
    """(H, W, C) feature maps -> one (rows*H, ncols*W) mosaic scaled to [0, 1], 1-px gaps."""
    h, w, c = maps.shape
    nrows = int(np.ceil(c / ncols))
    mosaic = np.ones((nrows * (h + 1) - 1, ncols * (w + 1) - 1), np.float32) * np.nan
    top = maps.max()
    for k in range(c):
        r, q = divmod(k, ncols)
        mosaic[r * (h + 1): r * (h + 1) + h, q * (w + 1): q * (w + 1) + w] = maps[..., k] / top if top > 0 else 0
    return mosaic


def _mosaic_png(mosaic, width):
    """A ``_tile_channels`` mosaic in viridis (gaps white) as PNG, about ``width`` px wide."""
    import matplotlib

    rgb = matplotlib.colormaps["viridis"](np.nan_to_num(mosaic, nan=1.0))[..., :3]
    rgb[np.isnan(mosaic)] = 1.0
    return _png(rgb, max(1, width // rgb.shape[1]))


def _outputs_probabilities(model, scores):
    """Does ``model`` output probabilities (a softmax layer last) rather than logits?

    Structural test first (a Keras ``Softmax`` layer or ``activation="softmax"``; a
    PyTorch ``nn.Softmax`` last), then the numbers: non-negative rows summing to 1.
    """
    if _is_torch_module(model):
        torch = sys.modules["torch"]
        last = list(model.modules())[-1]
        if isinstance(last, torch.nn.Softmax):
            return True
    else:
        keras = _keras()
        last = model.layers[-1]
        if isinstance(last, keras.layers.Softmax) or getattr(
                getattr(last, "activation", None), "__name__", "") == "softmax":
            return True
    s = np.asarray(scores, dtype=np.float64)
    return bool(s.size and s.min() >= 0 and np.allclose(s.sum(axis=1), 1.0, atol=1e-4))


def class_probabilities(model, images, batch_size=None):
    """Class probabilities of a Keras or PyTorch model, whatever its last layer outputs.

    A model that ends in a softmax gives probabilities as they are; a model that outputs
    logits (VGG16, a Keras model without a final softmax) gets ``softmax(logits)``; a
    model with one output unit (binary) gets ``[1 - p, p]`` (``p`` its sigmoid output, or
    the sigmoid of its logit). ``images``: (N, H, W, C) in the model's input range
    (uint8 mapped onto it). Returns ``(probs (N, K), "probabilities" or "logits")``: the
    second says what the model output.
    """
    batch_size = None if batch_size is None else _check_batch_size(batch_size)
    if _is_torch_module(model):
        torch = sys.modules["torch"]
        engine = _TorchEngine(model, "logits")
        x = engine.images(images)
        scores = np.concatenate([engine.outputs(x[i: i + (batch_size or 8)])
                                 for i in range(0, len(x), batch_size or 8)])
        sigmoid_last = isinstance(list(model.modules())[-1], torch.nn.Sigmoid)
    else:
        x = as_image_batch(images, model)
        _check_keras_model(model)
        scores = np.asarray(model.predict(x, batch_size=batch_size or 1000, verbose=0), dtype=np.float64)
        sigmoid_last = _keras_output_activation(model) == "sigmoid"
    if scores.ndim != 2:
        raise ValueError(f"The model's output has shape {scores.shape}; expected class scores (N, classes).")
    scores = scores.astype(np.float64)
    if scores.shape[1] == 1:  # binary: one unit, the positive class
        p = scores[:, 0] if sigmoid_last else 1.0 / (1.0 + np.exp(-scores[:, 0]))
        return np.stack([1.0 - p, p], axis=1), "probabilities" if sigmoid_last else "logits"
    if _outputs_probabilities(model, scores):
        return scores, "probabilities"
    from scipy.special import softmax

    return softmax(scores, axis=1), "logits"


def _probability_bars_html(probs, class_names, predicted, true_label=None, top_k=None, source="logits"):
    """Bars for the ``top_k`` most probable classes (all, in class order, when they fit)."""
    order = (np.arange(len(probs)) if top_k is None or top_k >= len(probs)
             else np.argsort(probs)[::-1][:top_k])
    rows = []
    decimals = probability_decimals(probs)
    for k in order:
        p = float(probs[k])
        colour = "#2a7ab9" if k != predicted else (
            "#2e8b57" if true_label is None or k == true_label else "#c0392b")
        mark = " ✔ true" if true_label is not None and k == true_label else ""
        rows.append(
            f"<tr><td style='text-align:right;padding-right:6px'>{class_names[k]}</td>"
            f"<td style='width:180px'><div style='background:{colour};height:12px;"
            f"width:{max(p, 0.004) * 100:.1f}%'></div></td>"
            f"<td style='padding-left:6px'>{format_probability(p, decimals, max_decimals=6)}{mark}</td></tr>"
        )
    what = "softmax of the logits" if source == "logits" else "the model's softmax output"
    head = f"top {len(order)} of {len(probs)}" if len(order) < len(probs) else "all classes"
    return (f"<b>Class probabilities</b> ({what}; {head})<table style='font-size:12px;border-collapse:collapse'>"
            + "".join(rows) + "</table>")


def _widget_app(rows, controls, refresh_body, css_class=None):
    """The scaffold both explorers share: controls, a status line, a body of panels.

    ``refresh_body()`` draws everything for the current control values and returns the
    dict stored as ``app.last``; its errors are caught and shown in the status line
    (with ``app.last = {"error": ...}``), never lost in a log. Changes made to controls
    while drawing do not trigger a second refresh. Returns the ``ipywidgets.VBox`` with
    ``controls``, ``status``, ``last`` and ``refresh()``; every control refreshes it.
    """
    import time

    import ipywidgets as widgets

    status = widgets.HTML()
    box = widgets.VBox(rows(status))
    if css_class:
        box.add_class(css_class)
    busy = []

    def refresh(*_):
        if busy:  # a control changed by the drawing code itself
            return
        busy.append(True)
        start = time.perf_counter()
        try:
            last = refresh_body()
            seconds = time.perf_counter() - start
            last["seconds"] = seconds
            box.last = last
            note = last.pop("note", "")
            status.value = (f"<span style='color:#2e8b57'>✔ {last.get('method', 'updated')} in "
                            f"{seconds * 1000:.0f} ms{'; ' + note if note else ''}</span>")
        except Exception as err:  # shown in the app, not lost in a log
            box.last = {"error": err, "method": getattr(controls.get("method"), "value", None)}
            status.value = (f"<span style='color:#c0392b'><b>{type(err).__name__}:</b> "
                            f"{str(err)[:400]}</span>")
        finally:
            busy.clear()

    box.controls = controls
    box.status = status
    box.refresh = refresh
    box.last = {}
    for control in controls.values():
        control.observe(refresh, names="value")
    return box


def _colorbar_note_html(cmap):
    """What the explorer's colour scale means: attribution maps (jet) or feature maps (viridis)."""
    low, what, high = (("0 = least", "importance", "1 = most") if cmap == "jet" else
                       ("0 = off", "activation", "1 = largest shown"))
    return ("<div style='display:flex;justify-content:space-between;font-size:11px'>"
            f"<span>{low}</span><span>{what}</span><span>{high}</span></div>")


def _colorbar_css(cmap, width):
    """The colour scale as an HTML strip (a CSS gradient: no image, no script)."""
    import matplotlib

    stops = ", ".join(matplotlib.colors.to_hex(matplotlib.colormaps[cmap](t)) for t in np.linspace(0, 1, 9))
    return (f"<div style='width:{width};height:10px;background:linear-gradient(to right, {stops})'></div>"
            + _colorbar_note_html(cmap))


def explorer(model, images, labels=None, class_names=None, *, methods, scale=None, top_k=10, samples=None,
             layers=None):
    """An interactive explorer for a live demo: pick an image, a method, a class, a layer.

    Works on the course's Keras CNN and on a PyTorch model such as ``load_vgg16()``
    (``images`` (N, H, W, C) in the model's input range, [0, 1] for both; photos from
    ``sample_photos``/``load_photo``). Shows the image, the method's heatmap (or the
    chosen layer's feature maps), the overlay and the class probabilities (a softmax of
    the logits, or the model's own softmax output: ``class_probabilities``), and updates
    on every change. The target class list holds the image's ``top_k`` classes (tick
    "all classes" for the rest). ``labels`` (optional) are the true classes;
    ``samples`` SmoothGrad's copies and IG's steps (default 32 for small inputs, 8 for
    photos); ``layers`` the layer choice (default: every conv and pooling layer).
    ``methods(samples)`` gives the methods by name (``cnn_utils.explorer_methods``).
    Heatmaps are cached, so going back to a view (or changing the opacity) costs nothing.

    Returns an ``ipywidgets.VBox`` with, for programmatic use, ``controls`` (dict of the
    control widgets), ``images``, ``status``, ``last`` (what was shown last: method,
    index, class, layer, heatmap, seconds) and ``refresh()``.
    """
    import ipywidgets as widgets
    import matplotlib

    torch_model = _is_torch_module(model)
    # the model's declared input range for both frameworks (uint8 mapped onto it)
    x_all = _TorchEngine(model, "logits").images(images) if torch_model else as_image_batch(images, model)
    probs_all, source = class_probabilities(model, x_all)
    n_classes = probs_all.shape[1]
    if labels is not None:
        labels = _as_labels(labels, len(x_all), n_classes)
    if class_names is None:
        class_names = getattr(model, "class_names", None) or [str(i) for i in range(n_classes)]
    if isinstance(class_names, str):
        raise TypeError("class_names must be a list of names, one per class, not one string.")
    class_names = list(class_names)
    if len(class_names) != n_classes:
        raise ValueError(f"class_names has {len(class_names)} names; the model has {n_classes} classes.")
    for name, value in (("top_k", top_k), ("scale", 1 if scale is None else scale)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    top_k = min(int(top_k), n_classes)
    pred_all = probs_all.argmax(axis=1)
    wrong = np.flatnonzero(pred_all != labels) if labels is not None else np.array([], int)
    if samples is None:
        samples = 32 if x_all.shape[1] * x_all.shape[2] <= 64 * 64 else 8
    methods = methods(samples=samples)
    if layers is None:
        if torch_model:
            layers = (vgg_layer_names(model) if hasattr(model, "features") else
                      [n for n, m in model.named_modules() if type(m).__name__ in ("Conv2d", "MaxPool2d")])
        else:
            layers = conv_and_pool_layer_names(model)
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        raise ValueError("layers is empty: name at least one layer for the layer choice, or pass None.")
    for name in layers:  # unknown names are refused now, not on the first click
        _TorchEngine(model, "logits").resolve_layer(name, x_all) if torch_model else get_layer(model, name)
    if torch_model:
        default_layer = next((n for n in reversed(layers) if n.startswith("relu")), layers[-1])
    else:
        last = last_conv_layer_name(model)
        default_layer = last if last in layers else layers[-1]
    if scale is None:
        scale = max(1, 224 // x_all.shape[2])
    jet = matplotlib.colormaps["jet"]
    random_weights = torch_model and getattr(model, "pretrained", True) is False
    cache, state = {}, {"only_misclassified": False}

    style = {"description_width": "110px"}
    layout = widgets.Layout(width="360px")
    c_index = widgets.IntSlider(0, 0, len(x_all) - 1, description="image", style=style, layout=layout,
                                continuous_update=False)
    c_wrong = widgets.Checkbox(False, description=f"only misclassified ({len(wrong)})",
                               disabled=len(wrong) == 0, style=style)
    c_method = widgets.Dropdown(options=list(methods) + [ACTIVATIONS_METHOD], value="Grad-CAM",
                                description="method", style=style, layout=layout)
    c_class = widgets.Dropdown(options=[("predicted", -1)], value=-1, description="target class",
                               style=style, layout=layout)
    c_all = widgets.Checkbox(False, description=f"all {n_classes} classes", style=style,
                             disabled=top_k >= n_classes)
    c_layer = widgets.Dropdown(options=layers, value=default_layer, description="layer", style=style,
                               layout=layout)
    c_alpha = widgets.FloatSlider(0.4, min=0.0, max=1.0, step=0.05, description="overlay opacity",
                                  style=style, layout=layout, continuous_update=False)
    caption = widgets.HTML()
    size = f"{x_all.shape[2] * scale}px"
    w_image = widgets.Image(format="png", layout=widgets.Layout(width=size))
    w_heat = widgets.Image(format="png", layout=widgets.Layout(width=size))
    w_overlay = widgets.Image(format="png", layout=widgets.Layout(width=size))
    w_heat.add_class("explorer-heatmap")
    w_image.add_class("explorer-image")
    # the colour scale under the heatmap: jet for attribution maps, viridis for feature maps
    bars = {name: _png(np.repeat(matplotlib.colormaps[name](np.linspace(0, 1, 256))[None, :, :3], 10, axis=0))
            for name in ("jet", "viridis")}
    w_colorbar = widgets.Image(value=bars["jet"], format="png", layout=widgets.Layout(width=size, height="10px"))
    colorbar_note = widgets.HTML()
    probs_html = widgets.HTML()
    heat_title = widgets.HTML()

    def pool():
        return wrong if c_wrong.value and len(wrong) else np.arange(len(x_all))

    def class_options(idx):
        ranked = np.argsort(probs_all[idx])[::-1]
        shown = list(ranked if c_all.value else ranked[:top_k])
        if c_class.value not in (-1, *shown):
            shown.append(int(c_class.value))  # keep the chosen class on the list
        rank = {int(k): r for r, k in enumerate(ranked)}
        decimals = probability_decimals(probs_all[idx])
        return [("predicted", -1)] + [(f"#{rank[int(k)] + 1} {class_names[k]} ({format_probability(probs_all[idx, k], decimals, max_decimals=6)})",
                                       int(k)) for k in shown]

    def draw():
        if c_wrong.value != state["only_misclassified"]:  # a new pool of images: start at its first
            state["only_misclassified"] = c_wrong.value
            c_index.value = 0
            c_index.max = len(pool()) - 1
        idx = int(pool()[min(c_index.value, len(pool()) - 1)])
        options = class_options(idx)
        if list(c_class.options) != options:
            value = c_class.value
            c_class.options = options
            c_class.value = value
        method = c_method.value
        target = int(pred_all[idx]) if c_class.value == -1 else int(c_class.value)
        x = x_all[idx: idx + 1]
        image = x[0, ..., 0] if x.shape[-1] == 1 else x[0]
        gray = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
        w_image.value = _png(gray, scale)
        true = None if labels is None else labels[idx]
        probs_html.value = _probability_bars_html(probs_all[idx], class_names, pred_all[idx], true,
                                                  top_k=top_k, source=source)
        p = probs_all[idx, pred_all[idx]]
        decimals = probability_decimals(probs_all[idx])
        if labels is None:
            caption.value = f"image #{idx}: predicted <b>{class_names[pred_all[idx]]}</b> ({format_probability(p, decimals, max_decimals=6)})"
        else:
            ok = "✔ correct" if pred_all[idx] == labels[idx] else "✘ wrong"
            caption.value = (f"test image #{idx}: true <b>{class_names[labels[idx]]}</b>, predicted "
                             f"<b>{class_names[pred_all[idx]]}</b> ({format_probability(p, decimals, max_decimals=6)}) {ok}")
        if random_weights:
            caption.value += " <b style='color:#c0392b'>RANDOM weights: predictions are meaningless</b>"
        heat_title.value = f"<b>{method}: not shown (see the status line)</b>"
        key = (idx, method, target, c_layer.value)
        if key not in cache:
            if method == ACTIVATIONS_METHOD:
                if torch_model and c_layer.value in _vgg_alias_names(model):
                    maps = np.transpose(vgg_layer_activations(model, x, c_layer.value)[0], (1, 2, 0))
                else:  # a Keras model or any PyTorch module (VGG16 above: only the layers up to it run)
                    maps = get_activations(model, x, [c_layer.value])[c_layer.value][0]
                keep = np.sort(np.argsort(maps.mean(axis=(0, 1)))[::-1][:_MAX_TILED_CHANNELS])
                cache[key] = (_tile_channels(maps[..., keep]), maps.shape[-1], len(keep))
            else:
                cache[key] = methods[method](model, x, target, c_layer.value)[0]
        heat = cache[key]
        weights_note = " — RANDOM weights" if random_weights else ""
        if method == ACTIVATIONS_METHOD:
            heat, n_maps, n_shown = heat
            w_heat.value = _mosaic_png(heat, x.shape[2] * scale)
            overlay = gray
            shown = f"the {n_shown} strongest of {n_maps}" if n_shown < n_maps else f"{n_maps}"
            heat_title.value = f"<b>{shown} feature maps of {c_layer.value}{weights_note}</b>"
            w_colorbar.value, colorbar_note.value = bars["viridis"], _colorbar_note_html("viridis")
        else:
            w_colorbar.value, colorbar_note.value = bars["jet"], _colorbar_note_html("jet")
            w_heat.value = _png(jet(heat)[..., :3], scale)
            overlay = overlay_heatmap(image, heat, alpha=c_alpha.value)
            heat_title.value = f"<b>{method} for class {class_names[target]}{weights_note}</b>"
        w_overlay.value = _png(overlay, scale)
        return {"index": idx, "method": method, "class_index": target, "layer": c_layer.value,
                "heatmap": heat}

    controls = {"index": c_index, "only_misclassified": c_wrong, "method": c_method,
                "class_index": c_class, "all_classes": c_all, "layer": c_layer, "alpha": c_alpha}

    def rows(status):
        panels = widgets.HBox([
            widgets.VBox([widgets.HTML("<b>input image</b>"), w_image]),
            widgets.VBox([heat_title, w_heat, w_colorbar, colorbar_note]),
            widgets.VBox([widgets.HTML("<b>overlay</b>"), w_overlay]),
            probs_html,
        ], layout=widgets.Layout(gap="12px", align_items="flex-start"))
        return [widgets.HBox([widgets.VBox([c_index, c_wrong, c_method, c_class, c_all, c_layer, c_alpha,
                                            status]), caption]), panels]

    box = _widget_app(rows, controls, draw, css_class="cnn-explorer")
    box.images = {"image": w_image, "heatmap": w_heat, "overlay": w_overlay}
    box.texts = {"caption": caption, "heatmap_title": heat_title, "probabilities": probs_html,
                 "colorbar_note": colorbar_note}
    box.probabilities, box.model_outputs = probs_all, source
    box.cache = cache  # (image, method, class, layer) -> heatmap; benchmarks clear it
    box.samples = samples
    box.refresh()
    return box


def explorer_snapshot(app, views=None):
    """A static HTML copy of what ``explorer`` shows, for handouts: no kernel, no JavaScript.

    An exported notebook (HTML) holds the widgets' state, but drawing live widgets needs
    the widget library from the internet; this copy needs nothing. ``views``: a list of
    dicts of control values (e.g. ``{"index": 3, "method": "Saliency"}``) shown in turn,
    one row each (default: the current view); a mosaic of feature maps (*Layer activations*)
    is shown twice as wide as in the explorer, to be readable. The controls are restored afterwards.
    Returns an ``IPython.display.HTML``.
    """
    import base64

    from IPython.display import HTML

    order = ["only_misclassified", "all_classes", "index", "method", "layer", "class_index", "alpha"]
    if not hasattr(app, "controls") or not hasattr(app, "images"):
        raise TypeError(f"app must be what cnn_utils.explorer(...) returns, got {type(app).__name__}.")
    if views is not None and (isinstance(views, dict) or not all(isinstance(v, dict) for v in views)):
        raise TypeError("views must be a list of dicts of control values, e.g. [{'index': 3}, "
                        "{'method': 'Saliency'}].")
    saved = {k: app.controls[k].value for k in order if k in app.controls}

    def img(key, width=None):
        data = base64.b64encode(app.images[key].value).decode("ascii")
        return (f"<img src='data:image/png;base64,{data}' style='width:{width or app.images[key].layout.width};"
                "image-rendering:pixelated'>")

    def wide(width):
        """Twice the explorer's width: a mosaic of feature maps is readable on paper only that large."""
        return f"{2 * float(str(width).removesuffix('px')):g}px" if str(width).endswith("px") else width

    rows = []
    try:
        for view in views or [{}]:
            unknown = set(view) - set(app.controls)
            if unknown:
                raise ValueError(f"views: unknown control(s) {', '.join(sorted(unknown))}; the explorer's "
                                 f"controls are {', '.join(app.controls)}.")
            for k in sorted(view, key=order.index):
                control = app.controls[k]
                options = [o[1] if isinstance(o, tuple) else o for o in getattr(control, "options", ())]
                if options and view[k] not in options:
                    raise ValueError(f"views: {k}={view[k]!r} is not one of the explorer's choices: "
                                     f"{', '.join(map(repr, options))}.")
                low, high = getattr(control, "min", None), getattr(control, "max", None)
                if low is not None and not low <= view[k] <= high:
                    raise ValueError(f"views: {k}={view[k]!r} is outside {low}..{high}.")
                control.value = view[k]
            t = app.texts
            mosaic = app.controls["method"].value == ACTIVATIONS_METHOD
            heat_width = (wide if mosaic else str)(app.images["heatmap"].layout.width)
            rows.append(
                f"<div style='margin:6px 0'>{t['caption'].value} — {app.status.value}</div>"
                "<div style='display:flex;gap:12px;align-items:flex-start'>"
                f"<div><b>input image</b><br>{img('image')}</div>"
                f"<div>{t['heatmap_title'].value}<br>{img('heatmap', heat_width)}"
                f"{_colorbar_css('viridis' if mosaic else 'jet', heat_width)}</div>"
                # feature maps have no overlay: the explorer shows the plain input in that panel
                f"<div><b>{'input (no overlay for feature maps)' if mosaic else 'overlay'}</b><br>{img('overlay')}</div>"
                f"<div>{t['probabilities'].value}</div></div>")
    finally:
        for k, v in saved.items():
            app.controls[k].value = v
    return HTML("<div class='cnn-explorer-snapshot'><p><i>Static copy of the explorer (what it showed when "
                "this notebook ran)</i></p>" + "<hr>".join(rows) + "</div>")


def vgg_layer_explorer(model, photos, size=224, layer="relu3_3"):
    """A small interactive viewer of VGG16's feature maps (PyTorch), for a live demo.

    ``photos`` is a dict name -> image (anything ``load_photo`` takes). Choose the
    photo, the layer of ``model.features`` and a channel; it shows the photo, that
    channel's feature map and the 16 strongest channels of the layer. Feature maps are
    computed once per (photo, layer), so moving the channel slider is instant. Returns an
    ``ipywidgets.VBox`` with ``controls``, ``images``, ``status``, ``last`` and ``refresh()``.
    """
    import ipywidgets as widgets
    import matplotlib

    if not isinstance(photos, dict):
        raise TypeError("photos must be a dict {name: image}, e.g. cnn_utils.sample_photos(); got "
                        f"{type(photos).__name__}.")
    if not photos:
        raise ValueError("vgg_layer_explorer needs at least one photo: {name: image}.")
    names = vgg_layer_names(model)
    if layer not in names:
        raise ValueError(f"Unknown layer {layer!r}; VGG16's layers are: {', '.join(names)}.")
    pixels = {name: load_photo(img, size, fit="stretch", name=name) for name, img in photos.items()}
    viridis = matplotlib.colormaps["viridis"]
    maps_cache = {}

    def maps_for(photo, index):
        if (photo, index) not in maps_cache:
            maps_cache[(photo, index)] = vgg_layer_activations(model, pixels[photo], names[index])[0]
        return maps_cache[(photo, index)]

    style = {"description_width": "80px"}
    c_photo = widgets.Dropdown(options=list(pixels), description="photo", style=style)
    c_layer = widgets.Dropdown(options=[(f"{i}: {n}", i) for i, n in enumerate(names)],
                               value=names.index(layer), description="layer", style=style)
    c_channel = widgets.IntSlider(0, 0, 1, description="channel", style=style, continuous_update=False)
    px = f"{size}px"
    w_photo = widgets.Image(format="png", layout=widgets.Layout(width=px))
    w_channel = widgets.Image(format="png", layout=widgets.Layout(width=px))
    w_strongest = widgets.Image(format="png", layout=widgets.Layout(width=px))
    titles = [widgets.HTML("<b>photo</b>"), widgets.HTML(), widgets.HTML()]
    weights = "ImageNet weights" if getattr(model, "pretrained", False) else "RANDOM weights"

    def draw():
        maps = maps_for(c_photo.value, c_layer.value)  # (C, H, W)
        c = maps.shape[0]
        if c_channel.max != c - 1:
            c_channel.max = c - 1
        fmap = maps[c_channel.value]
        top = fmap.max()
        w_channel.value = _png(viridis(fmap / top if top > 0 else fmap)[..., :3],
                               max(1, size // fmap.shape[-1]))
        strongest = _strongest_channels(maps, 16)
        w_strongest.value = _mosaic_png(_tile_channels(np.transpose(maps[strongest], (1, 2, 0)), ncols=4), size)
        w_photo.value = _png(pixels[c_photo.value])
        titles[1].value = (f"<b>{names[c_layer.value]}, channel {c_channel.value}</b> "
                           f"(max {top:.2f}; {'silent' if top <= 0 else 'active'})")
        titles[2].value = f"<b>16 strongest of {c} channels ({fmap.shape[0]}×{fmap.shape[1]})</b>"
        return {"photo": c_photo.value, "layer_index": c_layer.value, "channel": c_channel.value,
                "feature_map": fmap, "method": "feature map",
                "note": f"{weights}; colour: yellow = strong, dark = zero"}

    def rows(status):
        return [widgets.HBox([c_photo, c_layer, c_channel]), status,
                widgets.HBox([widgets.VBox([titles[0], w_photo]), widgets.VBox([titles[1], w_channel]),
                              widgets.VBox([titles[2], w_strongest])], layout=widgets.Layout(gap="12px"))]

    box = _widget_app(rows, {"photo": c_photo, "layer": c_layer, "channel": c_channel}, draw)
    box.images = {"photo": w_photo, "channel": w_channel, "strongest": w_strongest}
    box.refresh()
    return box
