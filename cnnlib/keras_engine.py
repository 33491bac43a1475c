"""The Keras engine: class scores, input gradients and layer gradients of a Keras model.

The attribution methods (``cnn_utils``) ask an engine for three things: the scores of a
batch, ``dS_c/dx``, and a layer's feature maps ``A`` with ``dS_c/dA``. This is the engine for
Keras models (compiled ``tf.function``s, cached per model); ``torch_engine`` is the same for
PyTorch modules. Both return NumPy arrays, channels last.
"""
from __future__ import annotations


import numpy as np

from .frameworks import _keras, _tf
from .checks import _check_score
from .keras_layers import (_all_layers, _cached, _check_keras_model, _flat_model, _resolve_layer,
    _score_output, _single_input, _two_classes, get_layer)
from .models import as_image_batch


def _keras_scores_model(model, score, layer=None):
    """A cached Keras model: image -> class scores (N, K), or with ``layer``
    image -> (the layer's feature maps, class scores)."""
    keras = _keras()

    def build():
        out = _score_output(model, score)
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
    return _cached(model, ("scores_model", score, layer), build)


def _keras_fn(model, score, kind, layer=None):
    """Compiled TensorFlow functions, cached per model:
    ``"grad"``: (x, cls) -> (target score, class, dS_c/dx);
    ``"cam"``: (x, cls) -> (target, class, A, dS_c/dA);
    ``"forward"``: x -> scores; ``"features"``: x -> (A, scores)."""
    def build():
        tf = _tf()
        sub = _keras_scores_model(model, score, layer)
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
    return _cached(model, ("attribution", kind, score, layer), build)


class _KerasEngine:
    """What the attribution methods need from a Keras model (NumPy in, NumPy out)."""

    def __init__(self, model, score):
        _check_keras_model(model)
        _check_score(score)
        model = _flat_model(model)
        self.model, self.score = model, score
        out = _keras_scores_model(model, score).outputs[0]
        self.num_classes = max(2, int(out.shape[-1]))

    def images(self, images):
        return as_image_batch(images, self.model)

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
        t, c, g = _keras_fn(self.model, self.score, "grad")(tf.constant(x), tf.constant(cls))
        return t.numpy(), c.numpy(), g.numpy()

    def layer_grad(self, x, cls, layer):
        tf = _tf()
        t, c, a, g = _keras_fn(self.model, self.score, "cam", layer)(tf.constant(x), tf.constant(cls))
        return t.numpy(), c.numpy(), a.numpy(), g.numpy()

    def forward(self, x):
        return _keras_fn(self.model, self.score, "forward")(_tf().constant(x)).numpy()

    def features(self, x, layer):
        a, s = _keras_fn(self.model, self.score, "features", layer)(_tf().constant(x))
        return a.numpy(), s.numpy()

    def resolve_layer(self, layer, x):
        return _resolve_layer(self.model, layer).name

    def channels(self, layer, x):
        return int(get_layer(self.model, layer).output.shape[-1])
