"""The Keras engine: class scores, input gradients and layer gradients of a Keras model.

The attribution methods (``cnn_utils``) ask an engine for three things: the scores of a
batch, ``dS_c/dx``, and a layer's feature maps ``A`` with ``dS_c/dA``. This is the engine for
Keras models (compiled ``tf.function``s, cached per model); ``torch_engine`` is the same for
PyTorch modules. Both return NumPy arrays, channels last.
"""
from __future__ import annotations


import numpy as np

from .frameworks import _keras, _tf
from .checks import _check_score, _looks_like_probabilities
from .keras_layers import (_all_layers, _cached, _check_keras_model, _flat_model, _resolve_layer,
    _score_output, _single_input, _two_classes, get_layer)
from .models import as_image_batch


def _keras_scores_model(model, score, layer=None, outputs_probabilities=False):
    """A cached Keras model: image -> class scores (N, K), or with ``layer``
    image -> (the layer's feature maps, class scores)."""
    keras = _keras()

    def build():
        out = _score_output(model, score, outputs_probabilities)
        if len(tuple(out.shape)) != 2:
            raise ValueError(f"The model's output has shape {tuple(out.shape)}; attribution needs class "
                             "scores (N, classes).")
        outputs = out if layer is None else [get_layer(model, layer).output, out]
        try:
            return keras.Model(_single_input(model), outputs)
        except ValueError as err:  # a layer of a nested model that this graph cannot reach
            raise ValueError(
                f"Cannot compute layer {layer!r} and the class scores of {model.name!r} in one graph "
                f"({err}). Nested models are supported as the first layer of a Sequential model "
                "(Sequential([base, pooling, head])); for other shapes build one functional model "
                "from the base's input, e.g. keras.Model(base.inputs, head(base.outputs[0]))."
            ) from None
    return _cached(model, ("scores_model", score, layer, outputs_probabilities), build)


def _outputs_probabilities(model, x):
    """True when the model gives class scores that are probabilities although its structure
    shows no softmax (e.g. one inside a ``Lambda``): recognised from their values on ``x``."""
    if _score_output(model, "logits") is not model.outputs[0]:
        return False                      # logits found in the structure
    return _looks_like_probabilities(model(x[:8], training=False))


def _probabilities_refused(model):
    return ValueError(
        f"The output of {model.name!r} looks like probabilities (every row is non-negative and sums to "
        "1: a softmax inside a Lambda or another layer the helpers cannot see through), so the "
        "pre-softmax scores (logits) cannot be had from it. Pass score='probability' to explain "
        "the probabilities, or end the model with a Softmax layer (keras.layers.Softmax(), or "
        "Activation('softmax')) on the logits, whose input is then taken as the logits.")


def _keras_fn(model, score, kind, layer=None, outputs_probabilities=False):
    """Compiled TensorFlow functions, cached per model:
    ``"grad"``: (x, cls) -> (target score, class, dS_c/dx);
    ``"cam"``: (x, cls) -> (target, class, A, dS_c/dA);
    ``"forward"``: x -> scores; ``"features"``: x -> (A, scores)."""
    def build():
        tf = _tf()
        sub = _keras_scores_model(model, score, layer, outputs_probabilities)
        spec = tf.TensorSpec([None] + list(model.inputs[0].shape[1:]), tf.float32)
        cls_spec = tf.TensorSpec([None], tf.int32)

        def scores_of(out):
            return _two_classes(out, score, "tensorflow") if out.shape[-1] == 1 else out

        def pick(scores, cls):
            cls = tf.where(cls < 0, tf.argmax(scores, axis=-1, output_type=tf.int32), cls)
            return cls, tf.gather(scores, cls, axis=1, batch_dims=1)

        if kind == "grad":
            @tf.function(input_signature=[spec, cls_spec], autograph=False)
            def fn(x, cls):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    cls, target = pick(scores_of(sub(x, training=False)), cls)
                return target, cls, tape.gradient(target, x)
        elif kind == "cam":
            @tf.function(input_signature=[spec, cls_spec], autograph=False)
            def fn(x, cls):
                with tf.GradientTape() as tape:
                    feats, out = sub(x, training=False)
                    tape.watch(feats)
                    cls, target = pick(scores_of(out), cls)
                return target, cls, feats, tape.gradient(target, feats)
        elif kind == "forward":
            @tf.function(input_signature=[spec], autograph=False)
            def fn(x):
                return scores_of(sub(x, training=False))
        else:
            @tf.function(input_signature=[spec], autograph=False)
            def fn(x):
                feats, out = sub(x, training=False)
                return feats, scores_of(out)
        return fn
    return _cached(model, ("attribution", kind, score, layer, outputs_probabilities), build)


class _KerasEngine:
    """What the attribution methods need from a Keras model (NumPy in, NumPy out)."""

    def __init__(self, model, score):
        _check_keras_model(model)
        _check_score(score)
        model = _flat_model(model)
        self.model, self.score = model, score
        out = _keras_scores_model(model, score).outputs[0]
        self.num_classes = max(2, int(out.shape[-1]))
        self.probs = False

    def images(self, images):
        x = as_image_batch(images, self.model)
        if len(x):
            self.probs = bool(_cached(self.model, ("outputs probabilities",),
                                      lambda: _outputs_probabilities(self.model, x)))
            if self.probs and self.score == "logits":
                raise _probabilities_refused(self.model)
        return x

    def _fn(self, kind, layer=None):
        return _keras_fn(self.model, self.score, kind, layer, self.probs)

    def bytes_per_image(self, x):
        keras = _keras()
        n = 0
        for layer in _all_layers(self.model):
            if isinstance(layer, keras.Model):
                continue
            try:
                shapes = layer.output.shape
            except (AttributeError, ValueError):
                continue
            dims = [d for d in tuple(shapes)[1:]]
            size = int(np.prod([d for d in dims if d is not None] or [1]))
            if any(d is None for d in dims):
                size *= int(np.prod(x.shape[1:3]))
            n += size
        return 4 * max(n, int(np.prod(x.shape[1:])))

    def grad(self, x, cls):
        tf = _tf()
        t, c, g = self._fn("grad")(tf.constant(x), tf.constant(cls))
        return t.numpy(), c.numpy(), g.numpy()

    def layer_grad(self, x, cls, layer):
        tf = _tf()
        t, c, a, g = self._fn("cam", layer)(tf.constant(x), tf.constant(cls))
        return t.numpy(), c.numpy(), a.numpy(), g.numpy()

    def forward(self, x):
        return self._fn("forward")(_tf().constant(x)).numpy()

    def features(self, x, layer):
        a, s = self._fn("features", layer)(_tf().constant(x))
        return a.numpy(), s.numpy()

    def resolve_layer(self, layer, x):
        return _resolve_layer(self.model, layer).name

    def channels(self, layer, x):
        return int(get_layer(self.model, layer).output.shape[-1])
