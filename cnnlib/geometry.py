"""Receptive-field geometry: where each feature-map cell sits in the input.

``receptive_fields`` walks a Keras model or a PyTorch module layer by layer (kernel, stride,
padding, dilation) and gives, per axis, each cell's receptive-field centre and size;
``cam_upsampling_matrices`` builds the interpolation that brings a CAM to the input grid with
each cell at its receptive-field centre (not at a corner, as a plain resize would).
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np

from .frameworks import _is_torch_module, _keras
from .checks import _check_hw
from .keras_layers import _check_keras_model, _flat_model, get_layer
from .vgg16 import _vgg_alias_names
from .torch_engine import _PER_POSITION_OPS, _SQUEEZE_OPS, _tensors, _trace


class AxisGeometry(NamedTuple):
    """Receptive-field geometry of a layer along one input axis.

    ``centres`` (n,) float: input-pixel coordinate of each unit's receptive-field centre
    (pixel ``i`` covers ``[i - 0.5, i + 0.5]``); ``size``: receptive-field span in pixels,
    padding included; ``stride``: pixels between neighbouring centres; ``seen`` (N,) bool:
    input pixels inside the receptive field of at least one unit.
    """
    centres: np.ndarray
    size: int
    stride: int
    seen: np.ndarray


class ReceptiveFields(NamedTuple):
    """``receptive_fields`` result: one ``AxisGeometry`` per axis (``y`` rows, ``x`` columns)."""
    y: AxisGeometry
    x: AxisGeometry

    @property
    def seen(self):
        """(H, W) bool: pixels that at least one unit of the layer sees."""
        return np.outer(self.y.seen, self.x.seen)


class _Axis:
    """Geometry of a tensor along one axis while walking a network from its input."""

    def __init__(self, n):
        self.n, self.start, self.jump, self.size = n, 0.0, 1, 1
        self.dep = np.eye(n, dtype=bool)           # (units, input pixels) dependence

    def window(self, k, s, d, pad, n_out):
        """A convolution/pooling window (also padding/cropping: k = s = d = 1)."""
        if n_out < 1:
            raise ValueError(f"the layer leaves no output units along an axis (input {self.n}, "
                             f"kernel {k}, stride {s}, dilation {d}); the input is too small.")
        out = _Axis.__new__(_Axis)
        out.n = n_out
        out.start = self.start + self.jump * ((k - 1) * d / 2.0 - pad)
        out.jump = self.jump * s
        out.size = self.size + (k - 1) * d * self.jump
        out.dep = np.zeros((n_out, self.dep.shape[1]), dtype=bool)
        for t in range(k):
            src = np.arange(n_out) * s - pad + t * d
            ok = (src >= 0) & (src < self.n)
            out.dep[ok] |= self.dep[src[ok]]
        return out

    def same_as(self, other):
        return (self.n, self.start, self.jump) == (other.n, other.start, other.jump)

    def merged(self, other):
        out = _Axis.__new__(_Axis)
        out.n, out.start, out.jump = self.n, self.start, self.jump
        out.size, out.dep = max(self.size, other.size), self.dep | other.dep
        return out

    def result(self):
        return AxisGeometry(self.start + self.jump * np.arange(self.n), int(self.size),
                            int(self.jump), self.dep.any(axis=0))


class _Unknown(NamedTuple):
    """A tensor whose geometry the tracer cannot follow, and why."""
    reason: str


#: A tensor with no spatial extent (after a global pooling: a channel gate, a flattened vector).
_GLOBAL = "global"


def _conv_output_size(n, k, s, d, padding):
    """(output size, padding before) of a window with Keras/TensorFlow padding rules."""
    span = (k - 1) * d + 1
    if padding == "valid":
        return (n - span) // s + 1, 0
    if padding == "same":
        n_out = -(-n // s)
        total = max((n_out - 1) * s + span - n, 0)
        return n_out, total // 2
    raise ValueError(f"padding {padding!r} is not supported (expected 'valid' or 'same').")


def _torch_output_size(n, k, s, d, p, ceil_mode=False):
    """Output size of a PyTorch convolution/pooling with ``p`` padding cells on each side."""
    num = n + 2 * p - (k - 1) * d - 1
    n_out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (n_out - 1) * s >= n + p:   # PyTorch: the last window must start inside
        n_out -= 1
    return n_out


_KERAS_PASS_THROUGH = {
    "InputLayer", "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "ThresholdedReLU",
    "BatchNormalization", "Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout",
    "AlphaDropout", "Rescaling", "Identity", "ActivityRegularization",
}

_KERAS_PER_POSITION = {"Softmax", "LayerNormalization", "Normalization", "Concatenate"}

_KERAS_MERGE = {"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate"}

_KERAS_WINDOWS = {"Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D"}


def _pair(v):
    return (int(v), int(v)) if np.ndim(v) == 0 else tuple(int(a) for a in v)


def _keras_layer_geometry(layer, inputs):
    """The (y, x) geometry after ``layer`` from the geometries of its inputs; ``_GLOBAL`` after
    a global pooling (a squeeze-excite block's gate), which a merge then ignores."""
    kind = type(layer).__name__
    if inputs and all(g is _GLOBAL for g in inputs) or kind in ("GlobalAveragePooling2D",
                                                              "GlobalMaxPooling2D"):
        return _GLOBAL
    if kind in _KERAS_MERGE:
        inputs = [g for g in inputs if g is not _GLOBAL]    # a channel gate: one value per channel
    if kind in _KERAS_PER_POSITION:
        axes = getattr(layer, "axis", -1)
        axes = [axes] if np.ndim(axes) == 0 else list(axes)
        if any(int(a) not in (-1, 3) for a in axes):
            raise ValueError(f"Layer {layer.name!r} ({kind}) works along axis {axes}, across positions; "
                             "receptive fields are defined only for layers that act per position.")
    if kind in _KERAS_MERGE:
        y, x = inputs[0]
        for gy, gx in inputs[1:]:
            if not (y.same_as(gy) and x.same_as(gx)):
                raise ValueError(
                    f"Layer {layer.name!r} ({kind}) merges branches whose cells sit at different input "
                    "positions, so its cells have no single receptive-field centre.")
            y, x = y.merged(gy), x.merged(gx)
        return y, x
    if len(inputs) != 1:
        raise ValueError(f"Layer {layer.name!r} ({kind}) has {len(inputs)} inputs; receptive fields are "
                         "traced through single-input layers and Add/Concatenate-style merges only.")
    y, x = inputs[0]
    if kind in _KERAS_PASS_THROUGH or kind in _KERAS_PER_POSITION:
        return y, x
    if kind in _KERAS_WINDOWS:
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise ValueError(f"Layer {layer.name!r} uses data_format={layer.data_format!r}; "
                             "receptive fields are traced for channels_last models.")
        if "Pooling" in kind:
            k, s, d = _pair(layer.pool_size), _pair(layer.strides or layer.pool_size), (1, 1)
        else:
            k, s, d = _pair(layer.kernel_size), _pair(layer.strides), _pair(layer.dilation_rate)
        out = []
        for g, ka, sa, da in zip((y, x), k, s, d):
            n_out, pad = _conv_output_size(g.n, ka, sa, da, layer.padding)
            out.append(g.window(ka, sa, da, pad, n_out))
        return tuple(out)
    if kind in ("ZeroPadding2D", "Cropping2D"):
        amount = layer.padding if kind == "ZeroPadding2D" else layer.cropping
        sign = 1 if kind == "ZeroPadding2D" else -1
        return tuple(g.window(1, 1, 1, sign * int(before), g.n + sign * (int(before) + int(after)))
                     for g, (before, after) in zip((y, x), amount))
    raise ValueError(
        f"Cannot trace receptive fields through layer {layer.name!r} ({kind}): only convolution, "
        "pooling, padding/cropping, per-position layers (activations, batch normalisation, dropout) and "
        "merges of equal geometry are understood. Pick a layer before it.")


def _keras_receptive_fields(model, layer_name, input_hw):
    model = _flat_model(model)   # Sequential([base, ...]): the base's layers in one graph
    _check_keras_model(model)
    keras = _keras()
    if isinstance(layer_name, keras.layers.Layer):
        layer_name = layer_name.name
    target = get_layer(model, layer_name)
    model_input = model.inputs[0]
    memo = {}

    def geometry(tensor):
        if id(tensor) in memo:
            return memo[id(tensor)]
        op, node_index, _ = tensor._keras_history
        if tensor is model_input:
            result = (_Axis(input_hw[0]), _Axis(input_hw[1]))
        elif isinstance(op, keras.layers.InputLayer):
            raise ValueError(f"Layer {layer_name!r} depends on an input other than the model's image input.")
        elif isinstance(op, keras.Model):
            raise ValueError(f"Layer {layer_name!r} lies behind the nested model {op.name!r}; receptive fields "
                             "are traced through the layers of one functional model.")
        else:
            node = op._inbound_nodes[node_index]
            result = _keras_layer_geometry(op, [geometry(t) for t in node.input_tensors])
        memo[id(tensor)] = result
        return result

    try:
        found = geometry(target.output)
    except ValueError as err:
        raise ValueError(f"Receptive fields of layer {layer_name!r}: {err}") from None
    shape = tuple(target.output.shape)
    if found is _GLOBAL:
        raise ValueError(f"Layer {layer_name!r} has no spatial feature map (it follows a global pooling); "
                         "CAM methods need a convolutional (or pooling) layer's output.")
    y, x = found
    if len(shape) != 4:
        raise ValueError(f"Layer {layer_name!r} has output shape {shape}; receptive fields need a spatial "
                         "feature map (N, h, w, channels).")
    static = tuple(model_input.shape[1:3])
    if static == tuple(input_hw) and None not in shape[1:3] and tuple(shape[1:3]) != (y.n, x.n):
        raise ValueError(f"Traced a {y.n}x{x.n} map for layer {layer_name!r}, but it is "
                         f"{shape[1]}x{shape[2]}: a layer changes geometry in a way this tracer misses.")
    return y, x


def _torch_op_args(name, args, kwargs, names):
    """The arguments of a traced operation by name (``names`` in signature order)."""
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    return values


def _torch_window(g, k, s, d, p, n_out):
    if n_out < 1:
        raise ValueError("an operation leaves no output units along an axis; the input is too small.")
    return g.window(k, s, d, p, n_out)


def _torch_op_geometry(name, args, kwargs, out, geo, tensors):
    """Geometry of the result of one traced operation from the geometries ``geo`` (by id) of
    its inputs: a pair of ``_Axis``, ``_GLOBAL``, an ``_Unknown``, or None (no traced input)."""
    torch = sys.modules["torch"]
    inputs = [geo[id(t)] for t in tensors(args, kwargs) if id(t) in geo]
    if not inputs:
        return None
    unknown = [g for g in inputs if isinstance(g, _Unknown)]
    if unknown:
        return unknown[0]
    spatial = [g for g in inputs if g is not _GLOBAL]
    if not spatial:
        return _GLOBAL
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        return _GLOBAL                   # flattened, pooled to a vector, ...
    h, w = int(out.shape[2]), int(out.shape[3])
    if name in _SQUEEZE_OPS and (h, w) == (1, 1):
        return _GLOBAL                   # x.mean((2, 3), keepdim=True): a channel gate's squeeze
    first = tensors(args, kwargs)[0] if tensors(args, kwargs) else None
    src = geo.get(id(first)) if first is not None else None
    if name in ("conv2d", "max_pool2d", "avg_pool2d", "max_pool2d_with_indices") and isinstance(src, tuple):
        if name == "conv2d":
            a = _torch_op_args(name, args, kwargs, ["input", "weight", "bias", "stride", "padding", "dilation"])
            k, s = _pair(tuple(a["weight"].shape[2:])), _pair(a.get("stride", 1))
            d, padding = _pair(a.get("dilation", 1)), a.get("padding", 0)
        else:
            a = _torch_op_args(name, args, kwargs, ["input", "kernel_size", "stride", "padding"]
                               + (["dilation"] if "max" in name else []))
            k = _pair(a["kernel_size"])
            s = _pair(a.get("stride") or a["kernel_size"])
            d, padding = _pair(a.get("dilation", 1)), a.get("padding", 0)
        result = []
        for i, (g, n_out) in enumerate(zip(src, (h, w))):
            if padding == "valid":
                p = 0
            elif padding == "same":
                p = (k[i] - 1) * d[i] // 2
            else:
                p = _pair(padding)[i]
            result.append(_torch_window(g, k[i], s[i], d[i], p, n_out))
        return tuple(result)
    if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d") and isinstance(src, tuple):
        if (h, w) == (1, 1):
            return _GLOBAL
        if (h, w) == (src[0].n, src[1].n):
            return src
        if src[0].n % h == 0 and src[1].n % w == 0:
            return tuple(g.window(g.n // n, g.n // n, 1, 0, n) for g, n in zip(src, (h, w)))
        return _Unknown(f"an adaptive pooling from {src[0].n}x{src[1].n} to {h}x{w} (uneven windows)")
    if name == "pad" and isinstance(src, tuple):
        a = _torch_op_args(name, args, kwargs, ["input", "pad"])
        pads = list(a["pad"]) + [0] * 4
        left, right, top, bottom = pads[:4]
        return (src[0].window(1, 1, 1, top, src[0].n + top + bottom),
                src[1].window(1, 1, 1, left, src[1].n + left + right))
    if name == "__getitem__" and isinstance(src, tuple):
        index = args[1] if len(args) > 1 else None
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis or i is None or isinstance(i, torch.Tensor) for i in index) or len(index) > 4:
            return _Unknown("an indexing of a feature map (x[...])")
        result = list(src)
        for axis, i in enumerate(index[2:4]):
            g = src[axis]
            if not isinstance(i, slice):
                return _Unknown("an indexing of a feature map's rows or columns")
            start, stop, step = i.indices(g.n)
            if step < 1:
                return _Unknown("a reversed slice of a feature map")
            n = len(range(start, stop, step))
            result[axis] = g.window(1, step, 1, -start, n)
        if (result[0].n, result[1].n) != (h, w):
            return _Unknown("an indexing of a feature map")
        return tuple(result)
    if name in _PER_POSITION_OPS:
        if name == "cat":
            a = _torch_op_args(name, args, kwargs, ["tensors", "dim"])
            if int(a.get("dim", 0)) not in (0, 1, -3):
                return _Unknown("a concatenation along a spatial axis")
        kept = [g for g in spatial if (g[0].n, g[1].n) == (h, w)]
        others = [g for g in spatial if (g[0].n, g[1].n) != (h, w)]
        if others or not kept:
            return _Unknown(f"the operation {name} on feature maps of different sizes")
        y, x = kept[0]
        for gy, gx in kept[1:]:
            if not (y.same_as(gy) and x.same_as(gx)):
                return _Unknown(f"the operation {name}, which merges branches whose cells sit at "
                                "different input positions")
            y, x = y.merged(gy), x.merged(gx)
        return y, x
    return _Unknown(f"the operation {name}, whose effect on positions is not known")


def _torch_receptive_fields(model, layer_name, input_hw):
    """Trace one forward pass op by op (convolutions, pooling, padding, slicing and the
    per-position operations in between, functional or modules) from the input to the
    output of module ``layer_name`` (its last call, when the module runs several times)."""
    if not isinstance(layer_name, str):
        raise TypeError(f"layer must be a module name from model.named_modules(), got {layer_name!r}.")
    modules = dict(model.named_modules())
    if layer_name not in modules or layer_name == "":
        names = [n for n in modules if n][:40]
        raise ValueError(f"Unknown module {layer_name!r}. Names from model.named_modules(): "
                         f"{', '.join(names)}{' ...' if len(modules) > 41 else ''}.")
    trace = _trace(model, tuple(input_hw))
    geo = {id(trace.input): (_Axis(input_hw[0]), _Axis(input_hw[1]))}
    found = None
    for event in trace.events:
        if event[0] == "module":
            g = geo.get(id(event[2]))
            if isinstance(g, _Unknown) and " in module " not in g.reason:   # name where it happened
                geo[id(event[2])] = _Unknown(f"{g.reason} in module {event[1]!r} "
                                             f"({type(modules[event[1]]).__name__})")
            if event[1] == layer_name:
                found = geo.get(id(event[2]), _Unknown("an output that does not come from the input"))
            continue
        _, name, args, kwargs, out = event
        try:
            g = _torch_op_geometry(name, args, kwargs, out, geo, _tensors)
        except (ValueError, TypeError, KeyError) as err:
            g = _Unknown(f"the operation {name} ({err})")
        if g is not None:
            for t in _tensors([out]):
                geo[id(t)] = g
    if found is None:
        raise ValueError(f"Module {layer_name!r} did not run in the model's forward pass.")
    if isinstance(found, _Unknown):
        raise ValueError(f"Receptive fields of module {layer_name!r}: its output depends on {found.reason} "
                         "in the model's forward, which the geometry tracer cannot follow. Pick a module "
                         "before it.")
    if found is _GLOBAL:
        raise ValueError(f"Module {layer_name!r} gives no spatial feature map (N, channels, h, w) here; "
                         "CAM methods need a convolutional (or pooling) layer's output.")
    return found


def receptive_fields(model, layer, input_hw=None):
    """Where each cell of ``layer``'s feature map looks in the input.

    ``model``: a Keras functional model (``layer`` a layer name; the graph is walked
    from the input) or a PyTorch module (``layer`` a name from ``named_modules()``;
    one forward pass is traced operation by operation, functional calls included, to the
    module's output, its last call when it runs several times). Convolutions and pooling
    of any kernel, stride, padding and dilation are traced; per-position layers
    (activations, batch normalisation, dropout), merges of equal geometry and channel
    gates (a squeeze-excite block's global branch) pass through; anything else raises
    ``ValueError``. ``input_hw`` is (H, W) (Keras:
    defaults to the model's input size).

    Returns ``ReceptiveFields(y, x)``, one ``AxisGeometry(centres, size, stride, seen)``
    per axis, with ``centre_j = start + j * stride`` in pixel coordinates (pixel ``i``
    covers ``[i - 0.5, i + 0.5]``); ``.seen`` is the (H, W) mask of pixels that at
    least one unit sees. (Araujo et al., "Computing receptive fields of CNNs", Distill 2019.)
    """
    torch_model = _is_torch_module(model)
    if not torch_model and not isinstance(model, _keras().Model):
        raise TypeError(f"model must be a Keras model or a PyTorch nn.Module, got {type(model).__name__}.")
    if input_hw is None:
        if torch_model:
            raise ValueError("input_hw is required for a PyTorch model: pass the image size (height, width).")
        _check_keras_model(model)
        input_hw = tuple(model.inputs[0].shape[1:3])
        if None in input_hw:
            raise ValueError("The model's input size is not fixed; pass input_hw=(height, width).")
    input_hw = _check_hw(input_hw, "input_hw")
    if torch_model and isinstance(layer, str) and layer not in dict(model.named_modules()):
        layer = _vgg_alias_names(model).get(layer, layer)     # VGG's names (relu5_3), as attribution takes
    trace = _torch_receptive_fields if torch_model else _keras_receptive_fields
    y, x = trace(model, layer, input_hw)
    return ReceptiveFields(y.result(), x.result())


def _linear_interpolation_matrix(centres, size, seen=None):
    """(size, len(centres)) float32: row p holds the linear-interpolation weights that
    give pixel ``p`` from values sitting at the (increasing) positions ``centres``;
    pixels beyond the first/last centre take the edge value; rows of pixels that are
    not ``seen`` (bool (size,)) are zero."""
    centres = np.asarray(centres, dtype=np.float64)
    m = np.zeros((size, len(centres)), dtype=np.float32)
    for p in range(size):
        if len(centres) == 1 or p <= centres[0]:
            m[p, 0] = 1.0
        elif p >= centres[-1]:
            m[p, -1] = 1.0
        else:
            j = int(np.searchsorted(centres, p, side="right")) - 1
            t = (p - centres[j]) / (centres[j + 1] - centres[j])
            m[p, j], m[p, j + 1] = 1.0 - t, t
    if seen is not None:
        m[~np.asarray(seen, dtype=bool)] = 0.0
    return m


def naive_upsampling_matrices(map_hw, input_hw):
    """What bilinear resizing (``tf.image.resize``, half-pixel centres) does, as matrices:
    cell ``i`` of ``h`` placed at ``(i + 0.5) * H / h - 0.5``. Shown for comparison only."""
    (h, w), (H, W) = _check_hw(map_hw, "map_hw"), _check_hw(input_hw, "input_hw")
    return (_linear_interpolation_matrix((np.arange(h) + 0.5) * H / h - 0.5, H),
            _linear_interpolation_matrix((np.arange(w) + 0.5) * W / w - 0.5, W))


def cam_upsampling_matrices(model, layer, input_hw, map_hw=None):
    """Matrices ``(R_y (H, h), R_x (W, w))`` that bring a map ``(h, w)`` of ``layer`` to
    the input grid: ``up = R_y @ cam @ R_x.T``. ``model`` is a Keras model or a PyTorch
    module, ``layer`` a layer name (PyTorch: a name from ``model.named_modules()``).

    Each cell sits at its receptive-field centre (``receptive_fields``); pixels between
    centres are interpolated linearly, pixels beyond the outermost centres take the
    edge cell's value, and pixels that no unit of the layer sees (``receptive_fields(
    ...).seen`` is False: e.g. the last two rows and columns of the course CNN, lost
    to valid convolutions and flooring pools) are 0. For same-padded networks whose
    pools divide the input (VGG16) this equals bilinear resizing with half-pixel
    centres. ``map_hw``, if given (e.g. measured in a forward pass), is checked
    against the traced size.
    """
    rf = receptive_fields(model, layer, input_hw)
    H, W = _check_hw(input_hw, "input_hw")
    if map_hw is not None:
        map_hw = _check_hw(map_hw, "map_hw")
        traced = (len(rf.y.centres), len(rf.x.centres))
        if map_hw != traced:
            raise ValueError(
                f"Layer {layer!r} gives a {map_hw[0]}x{map_hw[1]} map, but tracing its chain of "
                f"layers predicts {traced[0]}x{traced[1]}, so its geometry is unknown; pick another layer.")
    return (_linear_interpolation_matrix(rf.y.centres, H, rf.y.seen),
            _linear_interpolation_matrix(rf.x.centres, W, rf.x.seen))


def _upsample(maps, R_y, R_x):
    """``R_y @ map @ R_x.T`` for each map: (N, h, w) -> (N, H, W), or (N, h, w, k) -> (N, H, W, k)."""
    if maps.ndim == 3:
        return np.matmul(np.matmul(R_y, maps), R_x.T)
    out = np.tensordot(maps, R_x, axes=([2], [1]))                       # (N, h, k, W)
    out = np.tensordot(R_y, out, axes=([1], [1]))                        # (H, N, k, W)
    return np.ascontiguousarray(out.transpose(1, 0, 3, 2))               # (N, H, W, k)
