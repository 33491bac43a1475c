"""Keras layers: lookup by name, default layers, cached sub-models.

``get_layer`` reaches layers of nested models by name or ``"base/name"``;
``last_conv_layer_name`` / ``conv_layer_names`` choose defaults; ``activation_model`` and
``logits_model`` build (and cache, per model) the sub-models that give a layer's output or
the pre-softmax class scores.
"""
from __future__ import annotations


from .frameworks import _is_torch_module, _keras, _tf
from .checks import _check_score


#: Name of the layer holding pre-softmax class scores in the course's models.
LOGITS_LAYER = "logits"


def logits_model(model):
    """A model from the same input to the pre-softmax class scores: the layer named
    ``"logits"`` (the course's models), the input of a final Softmax layer, or the
    output of a model that ends without a softmax (the attribution methods' rule)."""
    keras = _keras()
    _model_input_shape(model)
    _check_keras_model(model)     # one output: a second one would be ignored without a word
    scores = _score_output(model, "logits")
    return _cached(model, ("logits_model",),
                   lambda: keras.Model(_single_input(model), scores, name=f"{model.name}_logits"))


def _model_input_shape(model):
    """The model's input shape without the batch axis; a clear error for unbuilt models."""
    keras = _keras()
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a Keras model, got {type(model).__name__}.")
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        _refuse_subclassed(model)
        raise ValueError(
            f"The model {model.name!r} has no defined input yet (a Sequential model without an "
            "Input, never called on data). Start it with an input, "
            "keras.Sequential([keras.Input((28, 28, 1)), ...]), or build it once with "
            "model.build((None, 28, 28, 1))."
        )
    if len(inputs) != 1:
        raise ValueError(f"The helpers need a model with one image input; this one has {len(inputs)}.")
    return tuple(inputs[0].shape[1:])


#: Layer types whose outputs ``get_activations`` returns by default.
_CONV_TYPES = ("Conv2D", "Conv1D", "Conv3D", "DepthwiseConv2D", "SeparableConv2D")

_POOL_TYPES = ("MaxPooling2D", "AveragePooling2D", "MaxPooling1D", "AveragePooling1D",
               "GlobalMaxPooling2D", "GlobalAveragePooling2D")


def _layer_type(layer):
    return type(layer).__name__


def _all_layers(model):
    """The model's layers in order, the layers of nested models (a transfer-learning
    base inside ``Sequential([base, pooling, head])``) right after the nested model."""
    return [chain[-1] for _, chain in _nested_layers(model)]


def _check_layers_model(model):
    """A Keras model (built or not: its layers are what matters here), else TypeError."""
    if not isinstance(model, _keras().Model):
        raise TypeError(f"model must be a Keras model, got {type(model).__name__}"
                        + (" (a PyTorch module: use vgg_layer_names or model.named_modules())."
                           if _is_torch_module(model) else "."))


def conv_layer_names(model):
    """Names of the model's 2-D convolutional layers (nested models' included), in model order."""
    _check_layers_model(model)
    return [l.name for l in _all_layers(model) if _layer_type(l) in _CONV_TYPES
            and len(l.output.shape) == 4]


def conv_and_pool_layer_names(model):
    """Names of the model's convolutional and pooling layers, in model order.

    Layers inside nested models (``Sequential([base, pooling, head])``) are included,
    by their own name, or ``"base/name"`` where a name occurs twice.
    """
    _check_layers_model(model)
    return [name for name, chain in _nested_layers(model)
            if _layer_type(chain[-1]) in _CONV_TYPES + _POOL_TYPES]


def last_conv_layer_name(model):
    """Name of the model's last convolutional layer (4-D output), found automatically,
    inside a nested base model too.

    Raises ``ValueError`` listing the model's layers when there is none.
    """
    names = conv_layer_names(model)
    if not names:
        raise ValueError(
            f"The model {model.name!r} has no convolutional layer (its layers: "
            f"{_layer_list(model)})."
        )
    return names[-1]


def _layer_list(model):
    return ", ".join(f"{l.name} ({_layer_type(l)})" for l in _all_layers(model))


def get_layer(model, layer_name):
    """The layer named ``layer_name``, searching nested models too (by name, or by path
    ``"base/name"`` where a name occurs twice), with an error that lists the model's layers."""
    _check_layers_model(model)
    return _layer_chain(model, layer_name)[-1]


def _flat_model(model):
    """For ``Sequential([base, ...])`` whose first layer is a model: the same network as one
    functional graph from the base's input (``base`` layers, then the rest), so that layers
    inside the base can be reached. Other models are returned as they are.

    Gradients need this one graph: ``_symbolic`` (what ``get_activations`` uses, for any
    nesting) reaches a nested layer through a second call of a sub-model, which the class
    score does not depend on."""
    keras = _keras()
    if not (isinstance(model, keras.Sequential) and model.layers
            and isinstance(model.layers[0], keras.Model)):
        return model

    def build():
        base = model.layers[0]
        h = base.outputs[0]
        for layer in model.layers[1:]:
            h = layer(h)
        return keras.Model(base.inputs, h, name=f"{model.name}_flat")
    flat = _cached(model, ("flat",), build)
    # the declared input range (set_input_range, perhaps after the copy was made) goes with it
    if hasattr(model, "input_range"):
        flat.input_range = model.input_range
    elif hasattr(flat, "input_range"):
        del flat.input_range
    return flat


#: Layers the default CAM layer follows after the last convolution (they act per position).
_FOLLOWED_TYPES = ("BatchNormalization", "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "Dropout",
                   "SpatialDropout2D", "Add", "Multiply", "Concatenate", "Average", "Maximum")


def _after_global_pooling(layer):
    """True for a layer fed (through single-input layers) by a global pooling: the
    convolutions of a squeeze-excite gate or of a head after the pooling (MobileNetV3)."""
    tensor = layer.input
    for _ in range(64):
        try:
            op, index, _ = tensor._keras_history
            inputs = list(op._inbound_nodes[index].input_tensors)
        except (AttributeError, IndexError, TypeError):
            return False
        if _layer_type(op) in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
            return True
        if len(inputs) != 1:
            return False
        tensor = inputs[0]
    return False


def _resolve_layer(model, layer_name, for_cam=True):
    """The layer for a CAM method: a named layer with a spatial map (N, h, w, k).

    ``None``: the feature map the last convolutional layer leads to: its output followed
    through the per-position layers applied to it (batch normalisation, activations, a
    residual ``Add``, a channel gate's ``Multiply``, a ``Concatenate``, dropout) up to the
    next layer of another kind: the ReLU after a conv (the conv itself when the ReLU is
    built in), the block output of keras.applications' ResNets (after the add and its ReLU).
    """
    keras = _keras()
    if layer_name is None:
        layers = _all_layers(model)
        last_conv_layer_name(model)                    # an error listing the layers when there is none
        convs = [layer for layer in layers if _layer_type(layer) in _CONV_TYPES
                 and len(layer.output.shape) == 4 and not _after_global_pooling(layer)]
        chosen = convs[-1] if convs else get_layer(model, last_conv_layer_name(model))
        hw = tuple(chosen.output.shape[1:3])
        for layer in layers[layers.index(chosen) + 1:]:
            inputs = getattr(layer, "input", None)
            inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
            if not any(t is chosen.output for t in inputs):
                continue                               # a layer of another branch
            kind = _layer_type(layer)
            if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
                continue                               # a channel gate's squeeze (or the head's pooling)
            out_shape = tuple(getattr(layer.output, "shape", ()))
            if kind in _FOLLOWED_TYPES and len(out_shape) == 4 and tuple(out_shape[1:3]) == hw:
                chosen = layer
                continue
            break
        return chosen
    layer = get_layer(model, layer_name)
    shape = tuple(layer.output.shape)
    if isinstance(layer, keras.layers.InputLayer) or len(shape) != 4:
        convs = conv_layer_names(model)
        raise ValueError(
            f"Layer {layer_name!r} ({type(layer).__name__}, output shape {shape}) has no spatial feature "
            "map (N, h, w, channels); CAM methods need a convolutional (or pooling) layer. "
            f"Convolutional layers of this model: {', '.join(convs) or 'none'}."
        )
    return layer


# Sub-models and compiled TensorFlow functions are cached per (model, key) so that a
# notebook or a live demo pays the building and tracing cost once. The cache holds at
# most _CACHE_SIZE entries (least recently used dropped); each entry keeps its model
# alive, so an id() cannot be reused while cached.
_CACHE = {}

_CACHE_SIZE = 32


def _cached(model, key, build):
    """``build()`` once per (model, key), kept in a small least-recently-used cache."""
    full_key = (id(model),) + tuple(key)
    entry = _CACHE.pop(full_key, None)
    if entry is None:
        built = build()
        # A compiled function per (model, layer, method) has a fixed input signature and
        # is traced once. TensorFlow's retracing detector keys on the source code, so it
        # would count the first trace for a new model (e.g. the sanity check's randomised
        # copies) as "retracing" and print a misleading warning: switch that warning off.
        if hasattr(built, "_omit_frequent_tracing_warning"):
            built._omit_frequent_tracing_warning = True
        entry = (model, built)
    _CACHE[full_key] = entry  # most recently used last
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    return entry[1]


def _single_input(model):
    """The model's input tensor (models with one input), as Keras 3 expects it."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def _is_model(layer):
    return hasattr(layer, "layers") and hasattr(layer, "inputs") and hasattr(layer, "_inbound_nodes")


def _nested_layers(model):
    """Every layer, nested models' layers right after the model holding them, as
    ``(name, chain)``; ``chain`` is ``[nested model, ..., layer]`` and ``name`` the
    layer's own name, or its path ``"base/name"`` when the name occurs twice."""
    found = []

    def walk(m, prefix, chain):
        for layer in m.layers:
            found.append((prefix + layer.name, chain + [layer]))
            if _is_model(layer):
                walk(layer, prefix + layer.name + "/", chain + [layer])

    walk(model, "", [])
    counts = {}
    for path, chain in found:
        counts[chain[-1].name] = counts.get(chain[-1].name, 0) + 1
    return [(chain[-1].name if counts[chain[-1].name] == 1 else path, chain) for path, chain in found]


def _layer_chain(model, layer_name):
    """``[nested model, ..., layer]`` for a layer of ``model`` or of a model nested in it,
    by name or by path ``"base/name"``; errors list every layer."""
    if not isinstance(layer_name, str):
        raise TypeError(f"layer_name must be a string, got {type(layer_name).__name__}.")
    top = [l for l in model.layers if l.name == layer_name]
    if top:
        return [top[0]]
    nested = _nested_layers(model)
    paths = {}
    for name, chain in nested:
        paths["/".join(l.name for l in chain)] = chain
    if layer_name in paths:
        return paths[layer_name]
    matches = [path for path, chain in paths.items() if chain[-1].name == layer_name]
    if len(matches) == 1:
        return paths[matches[0]]
    if matches:
        raise ValueError(f"Layer name {layer_name!r} occurs in several nested models; name it by its "
                         f"path, one of: {', '.join(matches)}.")
    listing = ", ".join(f"{path} ({_layer_type(chain[-1])})" for path, chain in paths.items())
    raise ValueError(f"Unknown layer {layer_name!r}. The model's layers are: {listing}.")


def _feeding_tensor(model, inner):
    """The symbolic tensor of ``model``'s graph that ``inner`` (a nested model) is applied to."""
    keras = _keras()
    for node in getattr(inner, "_inbound_nodes", []):
        tensors = list(node.input_tensors)
        feed = tensors[0] if len(tensors) == 1 else tensors
        try:
            keras.Model(_single_input(model), feed)
        except Exception:  # a node of another graph (e.g. the nested model's own input)
            continue
        return feed
    raise ValueError(f"Cannot trace the layers inside the nested model {inner.name!r} back to the "
                     f"input of {model.name!r}; build the model with the functional API.")


def _graph_tensor(model, layer, attr="output"):
    """``layer``'s ``output`` (or ``input``) at its call within ``model``'s graph. A layer
    called in two graphs (``_flat_model`` reuses a Sequential model's head) has a tensor per
    call, and ``layer.output`` is the first call's."""
    if len(layer._inbound_nodes) > 1:
        seen, todo = set(), list(model.outputs)
        while todo:
            tensor = todo.pop()
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            op, index, _ = tensor._keras_history
            node = op._inbound_nodes[index]
            if op is layer:
                found = node.output_tensors if attr == "output" else node.input_tensors
                return found[0] if len(found) == 1 else found
            todo.extend(node.input_tensors)
    return getattr(layer, attr)


def _symbolic(model, chain, attr="output"):
    """The symbolic ``input`` / ``output`` of ``chain[-1]`` in ``model``'s own graph
    (so that ``keras.Model(model.inputs, ...)`` reaches layers inside nested models)."""
    if len(chain) == 1:
        return getattr(chain[0], attr)
    keras = _keras()
    inner = chain[0]
    sub = keras.Model(_single_input(inner), _symbolic(inner, chain[1:], attr))
    return sub(_feeding_tensor(model, inner))


def activation_model(model, layer_names):
    """A multi-output Keras model from the model's input to the named layers' outputs
    (layers inside nested models included)."""
    keras = _keras()
    _model_input_shape(model)
    layer_names = (layer_names,) if isinstance(layer_names, str) else tuple(layer_names)
    chains = [_layer_chain(model, name) for name in layer_names]
    return _cached(model, ("activations",) + layer_names,
                   lambda: keras.Model(_single_input(model), [_symbolic(model, c) for c in chains],
                                       name=f"{model.name}_activations"))


def _pre_activation(layer):
    """For a Dense/Conv layer with a built-in activation: (function of the layer's input
    giving its output BEFORE the activation, the activation). Otherwise (None, None)."""
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", "linear")
    if name == "linear" or not hasattr(layer, "kernel"):
        return None, None
    keras = _keras()
    if _layer_type(layer) == "Dense":
        def pre(x):
            out = keras.ops.matmul(x, layer.kernel)
            return out + layer.bias if layer.use_bias else out
    elif _layer_type(layer) == "Conv2D":
        def pre(x):
            out = layer.convolution_op(x, layer.kernel)
            return out + layer.bias if layer.use_bias else out
    else:
        return None, None
    return pre, activation


def _refuse_subclassed(model):
    """A subclassed ``keras.Model`` (its own ``call``) has no graph of layers, built or not."""
    keras = _keras()
    if isinstance(model, keras.Sequential) or type(model).__name__ == "Functional" or \
            getattr(model, "_is_graph_network", False):
        return
    state = "built and called" if model.built else "not built yet"
    raise ValueError(
        f"The model {model.name!r} is a subclassed keras.Model ({type(model).__name__}, {state}): its "
        "layers run inside call(), so it has no graph of layers that the helpers can read (layer outputs, "
        "inputs, class scores). Wrap it in a functional model for the gradient methods (saliency_map, "
        "smoothgrad, integrated_gradients, occlusion): inputs = keras.Input(shape); "
        "wrapped = keras.Model(inputs, model(inputs)); for CAM methods and get_activations build it with "
        "the functional API (keras.Input, then the layers called on tensors).")


def _check_keras_model(model):
    keras = _keras()
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a Keras model or a PyTorch nn.Module, got {type(model).__name__}.")
    try:
        model.inputs
    except (AttributeError, ValueError):
        _refuse_subclassed(model)
        raise ValueError(
            f"The model {model.name!r} is not built yet (a Sequential model without an Input layer "
            "has no input shape): build it first, e.g. model.build((None, 28, 28, 1)) or start it "
            "with keras.Input(shape), or call it once on a batch of images."
        ) from None
    if len(model.inputs) != 1:
        raise ValueError(f"The helpers need a model with one image input; this one has {len(model.inputs)}.")
    if len(model.outputs) != 1:
        raise ValueError(
            f"The model {model.name!r} has {len(model.outputs)} outputs; the helpers need one output of "
            "class scores. Choose it explicitly: keras.Model(model.inputs, model.outputs[i])."
        )


def _score_output(model, score, outputs_probabilities=False):
    """The symbolic tensor of class scores (N, K): pre-softmax (``"logits"``) or the model's
    output (``"probability"``). For ``"logits"``: the layer named ``LOGITS_LAYER`` (when it
    gives (N, K) scores), else the input of a final softmax, else the pre-activation of a final Dense layer with a
    softmax or sigmoid activation, else the output itself (already unnormalised scores).
    A final softmax is a Softmax layer, ``Activation("softmax")`` or ``keras.ops.softmax``.
    ``outputs_probabilities``: the output was recognised as probabilities from its values
    (a softmax hidden in a Lambda): ``"probability"`` takes it as it is."""
    keras = _keras()
    _check_score(score)
    out = model.outputs[0]
    if score == "probability" and outputs_probabilities:
        return out
    if score == "probability":
        # probabilities as the model gives them, or of its logits when it ends without a softmax
        ends = _keras_output_activation(model)
        if ends in ("softmax", "sigmoid") or len(tuple(out.shape)) != 2:
            return out
        return keras.ops.sigmoid(out) if out.shape[-1] == 1 else keras.ops.softmax(out, axis=-1)
    last = model.layers[-1]
    if LOGITS_LAYER in [layer.name for layer in model.layers]:
        named = _graph_tensor(model, model.get_layer(LOGITS_LAYER))
        # only class scores (N, K) count: a convolution named "logits" inside a network does not
        if len(tuple(named.shape)) == 2 and named.shape[-1] == out.shape[-1]:
            return named
    softmax_input = _final_softmax_input(model)
    if softmax_input is not None:
        return softmax_input
    activation = getattr(getattr(last, "activation", None), "__name__", "linear")
    if activation in ("softmax", "sigmoid"):
        pre, _ = _pre_activation(last)
        if pre is None:
            raise ValueError(
                f"The model's last layer {last.name!r} applies a {activation} and its pre-activation "
                f"cannot be recovered; add a layer named {LOGITS_LAYER!r} holding pre-softmax scores, "
                "or pass score='probability'.")
        return pre(_graph_tensor(model, last, "input"))
    return out


def _final_op(model):
    """The layer or operation that gives the model's output (``keras.ops.softmax`` is an
    operation, not a layer), and the symbolic tensors it was called on."""
    try:
        out = model.outputs[0]
        op, index, _ = out._keras_history
        return op, list(op._inbound_nodes[index].input_tensors)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None, []


def _final_softmax_input(model):
    """The input of a softmax over the classes that gives the model's output (a Softmax
    layer, ``Activation("softmax")``, ``keras.ops.softmax``), else None."""
    op, inputs = _final_op(model)
    if op is None or len(inputs) != 1:
        return None
    kind = type(op).__name__
    act = getattr(getattr(op, "activation", None), "__name__", None)
    if (kind == "Softmax" or (kind == "Activation" and act == "softmax")) and \
            getattr(op, "axis", -1) in (-1, len(tuple(inputs[0].shape)) - 1):
        return inputs[0]
    return None


def _keras_output_activation(model):
    """``"softmax"`` or ``"sigmoid"`` when the model's last layer applies it (a Softmax layer,
    ``keras.ops.softmax``, or ``activation=...`` on the last layer), else None (the model
    outputs unnormalised scores)."""
    last = model.layers[-1] if model.layers else None
    if _layer_type(last) == "Softmax" or _final_softmax_input(model) is not None:
        return "softmax"
    name = getattr(getattr(last, "activation", None), "__name__", None)
    return name if name in ("softmax", "sigmoid") else None


def _two_classes(scores, score, ops_kind):
    """A model with one output unit (binary, sigmoid) as two classes: logit z becomes
    scores ``[-z/2, z/2]`` (softmax of which is ``[1 - sigmoid(z), sigmoid(z)]``), a
    probability p becomes ``[1 - p, p]``. Class 1 is the positive class."""
    if ops_kind == "tensorflow":
        tf = _tf()
        return tf.concat([-scores / 2, scores / 2] if score == "logits" else [1.0 - scores, scores], axis=1)
    import torch

    return torch.cat([-scores / 2, scores / 2] if score == "logits" else [1.0 - scores, scores], dim=1)
