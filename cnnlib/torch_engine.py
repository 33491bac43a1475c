"""The PyTorch engine: class scores, input gradients and layer gradients of a torch module.

The same interface as ``keras_engine._KerasEngine``: ``images``, ``forward``, ``grad``,
``layer_grad``, ``resolve_layer``, ``bytes_per_image``. Hooks are removed and the module's
train/eval flags and ``requires_grad`` restored after every call.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .frameworks import _torch
from .checks import _check_score, _looks_like_probabilities
from .keras_layers import _cached, _two_classes
from .models import as_image_batch, model_input_range
from .vgg16 import _vgg_alias_names


@contextlib.contextmanager
def _inference_mode(model):
    """``model.eval()`` for the duration of a call (as Keras' ``training=False``: no dropout,
    BatchNorm's running statistics); afterwards every submodule gets back its own training
    flag (a BatchNorm the user froze inside a model in training mode stays frozen)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _is_scripted(model):
    torch, _ = _torch()
    return isinstance(model, torch.jit.ScriptModule)


def _refuse_scripted(model, what):
    if _is_scripted(model):
        raise TypeError(
            f"The model is a TorchScript module ({type(model).__name__}, from torch.jit.script or "
            f"torch.jit.trace); {what} needs forward hooks on its layers, which TorchScript does not "
            "support. Pass the original nn.Module (before scripting or tracing), e.g. load its "
            "state_dict into the Python class; saliency_map, smoothgrad, integrated_gradients and "
            "occlusion work on a scripted model as it is.")


def _probabilities_error(where):
    return ValueError(
        f"The model's output looks like probabilities (every row is non-negative and sums to 1: a "
        f"softmax{where} that is not the model's last nn.Softmax module), so the pre-softmax scores "
        "(logits) cannot be had from it. Pass score='probability' to explain the probabilities, or "
        "return the logits from forward (and apply the softmax outside the model, or as a final "
        "nn.Softmax module, whose input is then taken as the logits).")


class _Trace:
    """One forward pass recorded operation by operation (``TorchFunctionMode``): ``events`` is
    the list, in the order they ran, of ``("op", name, args, kwargs, result)`` and
    ``("module", module name, output)`` (a module's output, after its forward). Tensors are
    kept alive, so ``id()`` identifies them. ``input`` is the tensor the model was called on."""

    def __init__(self, model, t):
        torch, _ = _torch()
        from torch.overrides import TorchFunctionMode

        events = self.events = []
        self.input = t

        class Recorder(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if isinstance(out, (torch.Tensor, tuple, list)):
                    events.append(("op", getattr(func, "__name__", str(func)), args, kwargs, out))
                return out
        names = {id(m): n for n, m in model.named_modules()}

        def hook(module, inputs, output):
            events.append(("module", names[id(module)], output))
        handles = [m.register_forward_hook(hook) for m in model.modules()]
        try:
            with torch.no_grad(), _inference_mode(model), Recorder():
                model(t)
        finally:
            for h in handles:
                h.remove()


def _trace(model, x_or_hw, dtype=None):
    """``_Trace`` of ``model`` on ``x_or_hw``: a (1, C, H, W) tensor, or (H, W) (zeros with the
    channels of the model's first convolution)."""
    torch, _ = _torch()
    _refuse_scripted(model, "tracing the layers")
    if isinstance(x_or_hw, torch.Tensor):
        t = x_or_hw
    else:
        conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
        params = list(model.parameters())
        t = torch.zeros((1, conv.in_channels if conv is not None else 3) + tuple(x_or_hw),
                        device=params[0].device if params else "cpu",
                        dtype=params[0].dtype if params and params[0].is_floating_point() else torch.float32)
    return _Trace(model, t)


#: Operations that act on each position alone (activations, batch normalisation in inference,
#: dropout, arithmetic, concatenation along channels): a feature map keeps its geometry.
_PER_POSITION_OPS = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu",
    "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "sigmoid", "sigmoid_", "tanh", "tanh_",
    "softplus", "prelu", "threshold", "batch_norm", "dropout", "dropout2d", "feature_dropout", "alpha_dropout",
    "feature_alpha_dropout", "add", "add_", "__add__", "__radd__", "__iadd__", "mul", "mul_", "__mul__",
    "__rmul__", "__imul__", "sub", "sub_", "__sub__", "__rsub__", "__isub__", "div", "div_", "__truediv__",
    "__rtruediv__", "__itruediv__", "neg", "__neg__", "abs", "clamp", "clamp_", "clamp_min", "clamp_max",
    "clone", "contiguous", "cat", "to", "float", "exp", "maximum", "minimum", "pow", "__pow__", "sqrt",
    "local_response_norm", "detach",
}


#: Operations that pool a whole feature map (a squeeze-excite block's first step).
_SQUEEZE_OPS = {"adaptive_avg_pool2d", "adaptive_max_pool2d", "mean", "amax", "sum", "max"}


class _TorchEngine:
    """What the attribution methods need from a PyTorch module mapping (N, C, H, W) to
    class scores (N, K). Images come in as NumPy (N, H, W, C)."""

    def __init__(self, model, score):
        torch, _ = _torch()
        _check_score(score)
        self.torch, self.model, self.score = torch, model, score
        params = list(model.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        self.dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
        self.num_classes = None

    def images(self, images):
        conv = next((m for m in self.model.modules() if isinstance(m, self.torch.nn.Conv2d)), None)
        if conv is not None and conv.in_channels == 1 and np.ndim(images) in (2, 3) and np.shape(images)[-1] != 1:
            images = np.asarray(images)[..., np.newaxis]   # grey (H, W) or (N, H, W) for a 1-channel model
        x = as_image_batch(images, None, input_range=model_input_range(self.model))
        if conv is not None and x.ndim == 4 and x.shape[-1] != conv.in_channels:
            raise ValueError(f"images have {x.shape[-1]} channels (last axis of (N, H, W, C)), but the "
                             f"model's first convolution takes {conv.in_channels}; pass images channels-last.")
        if len(x):
            def count():
                with self.torch.no_grad():
                    return max(2, int(self._call(self._tensor(x[:1])).shape[1]))
            self.num_classes = _cached(self.model, ("classes", self.score, x.shape[1:]), count)
        return x

    def _tensor(self, x):
        return self.torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.device, self.dtype)

    def _softmaxes(self):
        """The model's ``nn.Softmax`` modules over the class axis (any may give the output,
        e.g. followed by an ``nn.Identity``); none for a TorchScript module (no hooks)."""
        if _is_scripted(self.model):
            return []
        return [m for m in self.model.modules()
                if isinstance(m, self.torch.nn.Softmax) and m.dim in (1, -1, None)]

    def _call(self, t, raw=False):
        """The class scores (N, K) the engine explains (``raw``: the model's output as it is)."""
        kept = {}
        handles = [] if raw else [m.register_forward_hook(lambda m, i, o: kept.update(inp=i[0], out=o))
                                  for m in self._softmaxes()]
        try:
            with _inference_mode(self.model):
                out = self.model(t)
        except RuntimeError as err:  # e.g. "mat1 and mat2 shapes cannot be multiplied"
            raise ValueError(
                f"The model cannot run on images of {t.shape[2]} x {t.shape[3]} pixels with {t.shape[1]} "
                f"channel(s) ({str(err).splitlines()[0]}). Pass images of the size and channels it was built "
                "for, channels last (N, H, W, C).") from None
        finally:
            for handle in handles:
                handle.remove()
        if not isinstance(out, self.torch.Tensor):
            raise TypeError(
                f"The model returned a {type(out).__name__}; attribution needs one tensor of class "
                "scores (N, classes). Wrap the model so that forward returns the output to explain, "
                "e.g. torch.nn.Sequential(model, SelectOutput(0)) or a lambda module.")
        if out.ndim != 2:
            raise ValueError(f"The model's output has shape {tuple(out.shape)}; attribution needs class "
                             "scores (N, classes).")
        if raw:
            return out
        if kept.get("out") is out:  # the model ends in nn.Softmax: its input holds the logits
            return kept["inp"] if self.score == "logits" else out
        if _looks_like_probabilities(out.detach().cpu().numpy()):
            if self.score == "logits":
                raise _probabilities_error(" in forward (F.softmax, torch.softmax, ...) or a module")
            return out                      # probabilities already: no second softmax
        return self._scores(out)

    def _scores(self, out):
        if self.score == "probability":
            out = self.torch.sigmoid(out) if out.shape[1] == 1 else self.torch.softmax(out, dim=1)
        return _two_classes(out, self.score, "torch") if out.shape[1] == 1 else out

    def _pick(self, scores, cls):
        c = self.torch.as_tensor(cls, device=scores.device, dtype=self.torch.long)
        c = self.torch.where(c < 0, scores.argmax(dim=1), c)
        return c, scores.gather(1, c[:, None])[:, 0]

    def bytes_per_image(self, x):
        key = ("bytes", tuple(x.shape[1:]))
        return _cached(self.model, key, lambda: self._probe_bytes(x))

    def _probe_bytes(self, x):
        if _is_scripted(self.model):   # no hooks: a generous guess of 64 maps the input's size
            return 4 * 64 * int(np.prod(x.shape[1:]))
        total = [0]

        def hook(module, inputs, output):
            if isinstance(output, self.torch.Tensor):
                total[0] += output[0].numel()
        handles = [m.register_forward_hook(hook) for m in self.model.modules()
                   if not list(m.children())]
        try:
            with self.torch.no_grad():
                self._call(self._tensor(x[:1]))
        finally:
            for h in handles:
                h.remove()
        return 4 * max(total[0], int(np.prod(x.shape[1:])))

    def grad(self, x, cls):
        t = self._tensor(x).requires_grad_(True)
        c, target = self._pick(self._call(t), cls)
        (g,) = self.torch.autograd.grad(target.sum(), t)
        return (target.detach().cpu().numpy(), c.cpu().numpy().astype(np.int32),
                g.permute(0, 2, 3, 1).cpu().numpy())

    def _hooked(self, layer, t):
        _refuse_scripted(self.model, "a CAM method (reading a layer's feature maps)")
        module = dict(self.model.named_modules())[layer]
        kept = {}

        def hook(mod, inputs, output):
            if not isinstance(output, self.torch.Tensor):
                raise ValueError(f"Layer {layer!r} returns a {type(output).__name__}, not a feature map tensor.")
            kept["a"] = output
            return output.clone()  # later in-place layers (ReLU(inplace=True)) must not change it
        handle = module.register_forward_hook(hook)
        try:
            out = self._call(t)
        finally:
            handle.remove()
        if "a" not in kept:
            raise ValueError(f"Layer {layer!r} did not run in the model's forward pass.")
        return kept["a"], out

    def layer_grad(self, x, cls, layer):
        with self.torch.enable_grad():
            # the input requires grad, so that a model whose parameters are all frozen
            # (requires_grad=False) still gives a layer output with a gradient
            a, out = self._hooked(layer, self._tensor(x).requires_grad_(True))
            if not a.requires_grad:
                raise ValueError(f"Layer {layer!r}'s output does not depend on trainable computation; "
                                 "choose a layer after the first convolution.")
            c, target = self._pick(out, cls)
            (g,) = self.torch.autograd.grad(target.sum(), a)
        self._check_map(a, layer)
        return (target.detach().cpu().numpy(), c.cpu().numpy().astype(np.int32),
                a.detach().permute(0, 2, 3, 1).cpu().numpy(), g.permute(0, 2, 3, 1).cpu().numpy())

    def _check_map(self, a, layer):
        if a.ndim != 4:
            raise ValueError(f"Layer {layer!r} has output shape {tuple(a.shape)}, not a spatial feature map "
                             "(N, channels, h, w); CAM methods need a convolutional (or pooling) layer.")

    def forward(self, x):
        """The class scores the engine explains, (N, K) NumPy."""
        with self.torch.no_grad():
            return self._call(self._tensor(x)).cpu().numpy()

    def outputs(self, x):
        """The model's own output for images ``x`` (N, H, W, C), as it is (a final softmax kept)."""
        with self.torch.no_grad():
            return self._call(self._tensor(x), raw=True).float().cpu().numpy()

    def channels(self, layer, x):
        return _cached(self.model, ("channels", layer, tuple(x.shape[1:])),
                       lambda: self.features(x[:1], layer)[0].shape[-1])

    def features(self, x, layer):
        with self.torch.no_grad():
            a, out = self._hooked(layer, self._tensor(x))
        self._check_map(a, layer)
        return a.permute(0, 2, 3, 1).cpu().numpy(), out.cpu().numpy()

    def resolve_layer(self, layer, x):
        """A name from ``model.named_modules()`` (VGG's ``conv5_3`` etc. translated);
        ``None``: the last convolution's output after its ReLU."""
        _refuse_scripted(self.model, "a CAM method (reading a layer's feature maps)")
        if layer is None:
            return _cached(self.model, ("default_layer", tuple(x.shape[1:])), lambda: self._last_conv(x))
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a layer name (a string), got {type(layer).__name__}.")
        named = dict(self.model.named_modules())
        aliases = _vgg_alias_names(self.model)
        if layer not in named and layer in aliases:
            return aliases[layer]
        if layer not in named or layer == "":
            convs = [n for n, m in named.items() if isinstance(m, self.torch.nn.Conv2d)]
            extra = f" VGG names such as {', '.join(list(aliases)[-5:])} work too." if aliases else ""
            raise ValueError(f"Unknown layer {layer!r}. The model's convolutional layers are: "
                             f"{', '.join(convs) or 'none'} (any name from model.named_modules() works)."
                             + extra)
        return layer

    def _last_conv(self, x):
        """The feature map the last convolution leads to: the last Conv2d to run, followed
        through the per-position operations applied to its output (batch norm, activations,
        a residual add, a channel gate, a concatenation) up to the next windowed or global
        operation; the name (in named_modules()) of the innermost module giving that output
        (the block output of a ResNet, the ReLU after a plain conv)."""
        trace = _trace(self.model, self._tensor(x[:1]))
        events = trace.events
        ops = [i for i, e in enumerate(events) if e[0] == "op"]
        produced = {id(trace.input)}
        squeezed, convs = set(), []       # tensors of a channel gate (after a global pooling)
        for i in ops:
            _, name, args, kwargs, out = events[i]
            inputs = [t for t in _tensors(args, kwargs) if id(t) in produced]
            produced.update(id(t) for t in _tensors([out]))
            if (name in _SQUEEZE_OPS and _spatial(out) and tuple(out.shape[2:]) == (1, 1)) or \
                    (inputs and all(id(t) in squeezed for t in inputs)):
                squeezed.update(id(t) for t in _tensors([out]))
            elif name == "conv2d" and _spatial(out):
                convs.append(i)
        if not convs:
            raise ValueError(f"The model {type(self.model).__name__} has no Conv2d layer; pass layer= the "
                             "name of a layer with a spatial feature map (from model.named_modules()).")
        chain = [convs[-1]]
        current = events[convs[-1]][4]
        for i in ops:
            if i <= chain[-1]:
                continue
            _, name, args, kwargs, out = events[i]
            if not any(t is current for t in _tensors(args, kwargs)):
                continue
            if (name in _PER_POSITION_OPS and _spatial(out)
                    and tuple(out.shape[2:]) == tuple(current.shape[2:])):
                chain.append(i)
                current = out
                continue
            if name in _SQUEEZE_OPS and _spatial(out) and tuple(out.shape[2:]) == (1, 1):
                continue                  # a channel gate's squeeze: the map goes on after it
            break
        for end in reversed(chain):       # the innermost module whose output is that map
            result = events[end][4]
            for e in events[end + 1:]:
                if e[0] == "module" and e[2] is result:
                    return e[1]
        raise ValueError("Could not find the module of the last convolution; pass layer= a name from "
                         "model.named_modules().")


def _tensors(args, kwargs=None):
    """The tensors among an operation's arguments (inside lists and tuples too)."""
    torch, _ = _torch()
    found = []

    def walk(values):
        for a in values:
            if isinstance(a, torch.Tensor):
                found.append(a)
            elif isinstance(a, (list, tuple)):
                walk(a)
    walk(list(args) + list((kwargs or {}).values()))
    return found


def _spatial(t):
    torch, _ = _torch()
    return isinstance(t, torch.Tensor) and t.ndim == 4
