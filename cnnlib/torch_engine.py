"""The PyTorch engine: class scores, input gradients and layer gradients of a torch module.

The same interface as ``keras_engine._KerasEngine``: ``images``, ``forward``, ``grad``,
``layer_grad``, ``resolve_layer``, ``bytes_per_image``. Hooks are removed and the module's
train/eval flags and ``requires_grad`` restored after every call.
"""
from __future__ import annotations


import numpy as np

from .frameworks import _torch
from .checks import _check_score
from .keras_layers import _cached, _two_classes
from .models import as_image_batch, model_input_range
from .vgg16 import _vgg_alias_names


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

    def _final_softmax(self):
        """The model's last registered module when it is an ``nn.Softmax``, else None."""
        last = list(self.model.modules())[-1]
        return last if isinstance(last, self.torch.nn.Softmax) else None

    def _call(self, t, raw=False):
        """The class scores (N, K) the engine explains (``raw``: the model's output as it is)."""
        training = self.model.training
        final = None if raw else self._final_softmax()
        kept = {}
        handle = final.register_forward_hook(lambda m, i, o: kept.update(inp=i[0], out=o)) if final else None
        self.model.eval()  # as Keras' training=False: no dropout, BatchNorm's running statistics
        try:
            out = self.model(t)
        except RuntimeError as err:  # e.g. "mat1 and mat2 shapes cannot be multiplied"
            raise ValueError(
                f"The model cannot run on images of {t.shape[2]} x {t.shape[3]} pixels with {t.shape[1]} "
                f"channel(s) ({str(err).splitlines()[0]}). Pass images of the size and channels it was built "
                "for, channels last (N, H, W, C).") from None
        finally:
            self.model.train(training)
            if handle is not None:
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
            a, out = self._hooked(layer, self._tensor(x))
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
        """The last Conv2d to run, or the activation (ReLU ...) applied right after it
        (through a BatchNorm) when there is one: its name in named_modules()."""
        torch = self.torch
        calls = []
        names = {id(m): n for n, m in self.model.named_modules()}

        def hook(module, inputs, output):
            calls.append((module, inputs[0] if inputs else None, output))
        handles = [m.register_forward_hook(hook) for m in self.model.modules() if not list(m.children())]
        try:
            with torch.no_grad():
                self._call(self._tensor(x[:1]))
        finally:
            for h in handles:
                h.remove()
        last = max((i for i, (m, _, _) in enumerate(calls) if isinstance(m, torch.nn.Conv2d)), default=None)
        if last is None:
            raise ValueError(f"The model {type(self.model).__name__} has no Conv2d layer; pass layer= the "
                             "name of a layer with a spatial feature map (from model.named_modules()).")
        chosen, prev_out = last, calls[last][2]
        for i in range(last + 1, len(calls)):
            m, inp, out = calls[i]
            if inp is not prev_out and not (inp is not None and inp.data_ptr() == prev_out.data_ptr()
                                            and inp.shape == prev_out.shape):
                break
            if isinstance(m, (torch.nn.BatchNorm2d,)):
                prev_out = out
                continue
            if isinstance(m, (torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.ReLU6, torch.nn.ELU,
                              torch.nn.GELU, torch.nn.SiLU)):
                chosen = i
            break
        return names[id(calls[chosen][0])]
