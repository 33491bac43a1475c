"""Concepts, channels and their importance: *what* a layer encodes, not only *where*.

* Concept activation vectors and TCAV (Kim et al., 2018, "Interpretability beyond feature
  attribution: testing with concept activation vectors", ICML): ``concept_activation_vector``,
  ``train_cavs``, ``tcav_scores``, ``tcav``, ``tcav_t_test``, ``random_image_sets``.
* Concept discovery without labels: non-negative matrix factorisation of a layer's activations
  (Collins, Achanta & Süsstrunk, 2018, "Deep feature factorization for concept discovery"):
  ``nmf_concepts``.
* Channel attribution, activation x gradient per channel and position (Olah et al., 2018, "The
  building blocks of interpretability", Distill): ``channel_attribution``.
* Channel ablation and class selectivity (Morcos, Barrett, Rabinowitz & Botvinick, 2018, "On the
  importance of single directions for generalization", ICLR): ``channel_ablation``,
  ``class_selectivity``.

One API for Keras models and PyTorch modules: images ``(N, H, W, C)`` in the model's input
range, activations channels last ``(N, h, w, k)`` (a dense layer: ``(N, d)``), class scores
pre-softmax (``score="logits"``). The activations and gradients come from the course's engines
(``cnn_utils.get_activations`` and the engines' ``layer_grad``); nothing here changes the
user's model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .frameworks import _is_torch_module, _keras
from .checks import _check_seed, _is_int, _is_number
from .keras_layers import _cached, get_layer
from .keras_engine import _keras_scores_model
from .activations import get_activations
from .attribution import _Explained, _chunks, _engine

__all__ = ["layer_activations", "layer_gradients", "concept_activation_vector", "random_image_sets",
           "train_cavs", "tcav_scores", "tcav_t_test", "tcav", "nmf_concepts", "channel_attribution",
           "channel_ablation", "class_selectivity", "CAV", "CAVSet", "TCAVResult", "NMFConcepts",
           "AblationResult"]


def _check_layer(layer):
    if not isinstance(layer, str) or not layer:
        raise TypeError(f"layer must be a layer name (a non-empty string), e.g. 'conv3' (Keras) or "
                        f"'features.28' (PyTorch, a name from model.named_modules()); got {layer!r}.")


def _flat(a, name):
    """An (n, ...) array of finite numbers as (n, D), float32 kept (scikit-learn's SGD fits float32 as it
    is, so a CAV from float32 activations equals a fit written by hand on them), else float64."""
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be an array of numbers (n, ...), got dtype {a.dtype}.")
    if a.ndim < 2 or len(a) == 0:
        raise ValueError(f"{name} must be a non-empty batch (n, ...) of activations, got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return a.reshape(len(a), -1).astype(np.float32 if a.dtype == np.float32 else np.float64)


def _engine_layer(engine, layer, x):
    """The engine's name for ``layer``: Keras layers by name (any layer, nested ones too),
    PyTorch modules by ``named_modules()`` name (VGG's conv5_3 ... translated)."""
    _check_layer(layer)
    if _is_torch_module(engine.model):
        return engine.resolve_layer(layer, x)
    get_layer(engine.model, layer)          # unknown names: a ValueError listing the layers
    return layer


# ---------------------------------------------------------------------------------------------
# Activations and gradients at a layer
# ---------------------------------------------------------------------------------------------

def layer_activations(model, images, layer, *, batch_size=256):
    """The outputs of ``layer`` for ``images``: ``(N, h, w, k)`` channels last (a Keras dense
    layer: ``(N, d)``), float32. Keras: ``cnn_utils.get_activations``; PyTorch: a forward hook
    on the module named ``layer`` (``model.named_modules()``), in eval mode, memory-bounded."""
    _check_layer(layer)
    return get_activations(model, images, [layer], batch_size=batch_size)[layer]


def layer_gradients(model, images, class_index=None, *, layer, score="logits"):
    """The activations ``A`` of ``layer`` and the gradient of the class score there,
    ``dS_c / dA``, both ``(N, h, w, k)`` (or ``(N, d)``) float32, channels last.

    ``S_c`` is the pre-softmax score of ``class_index`` (None: each image's predicted class;
    an int or one per image). Keras model or PyTorch module; memory-bounded batches.
    """
    e = _Explained(model, images, class_index, score)
    name = _engine_layer(e.engine, layer, e.x)
    acts, grads = [], []
    for part in e.chunks():
        _, _, a, g = e.engine.layer_grad(e.x[part], e.cls[part], name)
        acts.append(a)
        grads.append(g)
    return np.concatenate(acts).astype(np.float32), np.concatenate(grads).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Concept activation vectors and TCAV
# ---------------------------------------------------------------------------------------------

@dataclass
class CAV:
    """A concept activation vector: ``vector`` (D,) unit normal of the linear classifier's
    boundary, pointing from the random examples towards the concept; ``accuracy`` the
    classifier's accuracy on the held-out examples (on all of them when none are held out)."""
    vector: np.ndarray
    accuracy: float


def _classifier(kind, seed, alpha):
    if kind == "sgd":
        from sklearn.linear_model import SGDClassifier

        return SGDClassifier(alpha=alpha, max_iter=1000, tol=1e-3, random_state=seed)
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=1.0 / alpha, max_iter=2000, random_state=seed)
    raise ValueError(f"classifier must be 'sgd' (SGDClassifier, as Kim et al.'s tcav and captum) or "
                     f"'logistic' (LogisticRegression); got {kind!r}.")


def concept_activation_vector(concept_activations, random_activations, *, classifier="sgd", seed=0,
                              alpha=0.01, test_fraction=0.33):
    """A CAV (Kim et al., 2018): the normal of a linear boundary between a concept's
    activations and random activations at one layer.

    The activations ``(n_c, ...)`` and ``(n_r, ...)`` are flattened to vectors ``a`` of length
    D and labelled 1 (concept) and 0 (random); a linear classifier ``w . a + b`` is fitted on
    a seeded split (``test_fraction`` held out for the accuracy). ``classifier="sgd"``:
    scikit-learn's ``SGDClassifier(alpha=alpha, max_iter=1000, tol=1e-3)`` (hinge loss, the
    tcav and captum default); ``"logistic"``: ``LogisticRegression(C=1/alpha)``. Returns a
    ``CAV`` with ``vector = w / |w|`` (D,) and the held-out accuracy.
    """
    seed = _check_seed(seed)
    pos, neg = _flat(concept_activations, "concept_activations"), _flat(random_activations, "random_activations")
    if pos.shape[1] != neg.shape[1]:
        raise ValueError(f"concept_activations and random_activations come from different layers: "
                         f"{pos.shape[1]} and {neg.shape[1]} values per example.")
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError(f"a CAV needs at least 2 concept and 2 random examples; got {len(pos)} and {len(neg)}.")
    if not _is_number(alpha) or alpha <= 0:
        raise ValueError(f"alpha (regularisation strength) must be a positive number, got {alpha!r}.")
    if not _is_number(test_fraction) or not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be a number in [0, 1), got {test_fraction!r}.")
    features = np.concatenate([pos, neg])          # float32 when both are
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))].astype(np.int64)
    train = test = np.arange(len(labels))
    if test_fraction > 0:
        from sklearn.model_selection import train_test_split

        train, test = train_test_split(train, test_size=test_fraction, random_state=seed)
        if len(np.unique(labels[train])) < 2:
            train = test = np.arange(len(labels))     # tiny sets: fit and score on all examples
    clf = _classifier(classifier, seed, alpha).fit(features[train], labels[train])
    w = np.asarray(clf.coef_[0], dtype=np.float64)
    norm = np.linalg.norm(w)
    if norm == 0:
        raise ValueError("The linear classifier found no direction between the concept and the random "
                         "activations (all weights are 0): are the two sets' activations identical?")
    return CAV(vector=w / norm, accuracy=float(clf.score(features[test], labels[test])))


def random_image_sets(images, n_sets, set_size, *, seed=0, exclude=None):
    """``n_sets`` random sets of ``set_size`` images each, drawn from ``images`` (N, ...)
    without replacement within a set (seeded). ``exclude``: indices of ``images`` never drawn
    (e.g. the concept's own examples). Returns an array ``(n_sets, set_size, ...)``."""
    seed = _check_seed(seed)
    images = np.asarray(images)
    pool = np.setdiff1d(np.arange(len(images)), np.asarray([] if exclude is None else exclude, dtype=np.int64))
    for name, value in (("n_sets", n_sets), ("set_size", set_size)):
        if not _is_int(value) or value < 2:
            raise ValueError(f"{name} must be an integer of at least 2, got {value!r}.")
    if set_size > len(pool):
        raise ValueError(f"set_size {set_size} is larger than the {len(pool)} images available; "
                         "pass more images or a smaller set_size.")
    rng = np.random.default_rng(seed)
    return np.stack([images[rng.choice(pool, set_size, replace=False)] for _ in range(n_sets)])


@dataclass
class CAVSet:
    """The CAVs of one concept at one layer against R random sets (Kim et al.'s repeated runs):
    ``vectors`` (R, D): concept vs random set i; ``random_vectors`` (R, D): random set i+1
    vs random set i (mod R), the null; ``accuracies``, ``random_accuracies`` (R,) held out."""
    layer: str
    vectors: np.ndarray
    accuracies: np.ndarray
    random_vectors: np.ndarray
    random_accuracies: np.ndarray


def train_cavs(model, layer, concept_images, random_sets, *, classifier="sgd", seed=0, alpha=0.01,
               test_fraction=0.33):
    """The CAVs of a concept at ``layer``, one per random set, and the random-vs-random CAVs.

    ``concept_images`` (n_c, H, W, C); ``random_sets`` (R, n_r, H, W, C) or a list of R image
    batches (``random_image_sets``), R >= 2. CAV i separates the concept from random set i;
    null CAV i separates random set (i + 1) mod R from random set i. Activations are computed
    once per image batch. Returns a ``CAVSet``.
    """
    if not isinstance(random_sets, (list, tuple, np.ndarray)) or len(random_sets) < 2:
        raise ValueError("random_sets must hold at least 2 random image sets (R, n, H, W, C) "
                         "(e.g. cnn_utils.random_image_sets(images, 20, 50)); Kim et al. use many.")
    concept = layer_activations(model, concept_images, layer)
    sizes = [len(s) for s in random_sets]
    pooled = layer_activations(model, np.concatenate([np.asarray(s) for s in random_sets]), layer)
    randoms = np.split(pooled, np.cumsum(sizes)[:-1])
    fit = dict(classifier=classifier, seed=seed, alpha=alpha, test_fraction=test_fraction)
    cavs = [concept_activation_vector(concept, r, **fit) for r in randoms]
    nulls = [concept_activation_vector(randoms[(i + 1) % len(randoms)], r, **fit) for i, r in enumerate(randoms)]
    return CAVSet(layer, np.stack([c.vector for c in cavs]), np.array([c.accuracy for c in cavs]),
                  np.stack([c.vector for c in nulls]), np.array([c.accuracy for c in nulls]))


def tcav_scores(gradients, cavs):
    """TCAV scores (Kim et al., 2018, eq. 2): for each CAV ``v``, the share of inputs whose class
    score rises along ``v``: ``S = |{x : grad S_c(x) . v > 0}| / N``.

    ``gradients``: dS_c/dA for N inputs (N, ...) (``layer_gradients``); ``cavs``: one CAV (D,)
    or several (R, D). Returns a float, or (R,) floats in [0, 1].
    """
    g = _flat(gradients, "gradients")
    v = np.asarray(cavs, dtype=np.float64)
    if v.ndim not in (1, 2) or v.shape[-1] != g.shape[1]:
        raise ValueError(f"cavs must be (D,) or (R, D) with D = {g.shape[1]} (the gradients' values per "
                         f"input); got shape {v.shape}.")
    scores = np.mean(g @ np.atleast_2d(v).T > 0, axis=0)
    return float(scores[0]) if v.ndim == 1 else scores


def tcav_t_test(scores, random_scores, *, n_tests=1, alpha=0.05):
    """Kim et al.'s statistical test: a two-sided Student t-test of the TCAV scores of the R
    concept CAVs against those of the R random CAVs, with Bonferroni's correction for
    ``n_tests`` hypotheses (concepts x classes x layers tested): the result is significant when
    ``p < alpha / n_tests``, i.e. ``p_corrected = min(1, p * n_tests) < alpha``.

    Returns a dict: ``t``, ``p_value``, ``p_corrected``, ``significant``, ``mean``, ``std``,
    ``random_mean``, ``random_std``, ``n_tests``, ``alpha``. Two sets of equal constant scores
    give p = 1; two different constant sets p = 0 (scipy returns NaN for both).
    """
    from scipy import stats

    s, r = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(random_scores, dtype=np.float64).ravel()
    if len(s) < 2 or len(r) < 2:
        raise ValueError(f"the t-test needs at least 2 concept and 2 random scores; got {len(s)} and {len(r)}.")
    if not _is_int(n_tests) or n_tests < 1:
        raise ValueError(f"n_tests (hypotheses tested, for Bonferroni's correction) must be a positive integer, "
                         f"got {n_tests!r}.")
    if not _is_number(alpha) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}.")
    if np.ptp(s) == 0 and np.ptp(r) == 0:
        t, p = (0.0, 1.0) if s[0] == r[0] else (float(np.sign(s[0] - r[0]) * np.inf), 0.0)
    else:
        import warnings

        with warnings.catch_warnings():   # one constant set (e.g. every score 1.0) is a valid input
            warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
            t, p = (float(v) for v in stats.ttest_ind(s, r))
    p_corrected = min(1.0, p * n_tests)
    return {"t": t, "p_value": p, "p_corrected": p_corrected, "significant": bool(p_corrected < alpha),
            "mean": float(s.mean()), "std": float(s.std(ddof=1)), "random_mean": float(r.mean()),
            "random_std": float(r.std(ddof=1)), "n_tests": int(n_tests), "alpha": float(alpha)}


@dataclass
class TCAVResult:
    """TCAV of one concept for one class at one layer: ``scores`` (R,) of the concept CAVs,
    ``random_scores`` (R,) of the random CAVs, and the t-test (``tcav_t_test``) in ``test``."""
    layer: str
    class_index: int
    scores: np.ndarray
    random_scores: np.ndarray
    test: dict

    @property
    def significant(self):
        return self.test["significant"]


def tcav(model, images, class_index, cavs, *, n_tests=1, alpha=0.05, score="logits"):
    """TCAV (Kim et al., 2018) of a concept for one class: the share of ``images`` (N, H, W, C),
    usually the class's own examples, whose score ``S_c`` (pre-softmax, ``class_index``: an int)
    rises along each CAV of ``cavs`` (a ``CAVSet`` from ``train_cavs``), the same for the random
    CAVs, and the two-sided t-test of the two score sets with Bonferroni's correction for
    ``n_tests`` hypotheses. Returns a ``TCAVResult``.

    ``cavs`` may also be a dict ``{key: CAVSet}`` (several concepts, layers): then the gradients
    are computed once per layer and a dict ``{key: TCAVResult}`` is returned.
    """
    sets = cavs if isinstance(cavs, dict) else {None: cavs}
    if not sets or not all(isinstance(s, CAVSet) for s in sets.values()):
        raise TypeError(f"cavs must be the CAVSet of train_cavs(model, layer, concept_images, random_sets) or a "
                        f"dict of them, got {type(cavs).__name__}.")
    if not _is_int(class_index):
        raise TypeError(f"class_index must be one class (an int), got {class_index!r}.")
    grads = {}
    results = {}
    for key, s in sets.items():
        if s.layer not in grads:
            grads[s.layer] = layer_gradients(model, images, int(class_index), layer=s.layer, score=score)[1]
        scores, random_scores = tcav_scores(grads[s.layer], s.vectors), tcav_scores(grads[s.layer], s.random_vectors)
        results[key] = TCAVResult(s.layer, int(class_index), scores, random_scores,
                                  tcav_t_test(scores, random_scores, n_tests=n_tests, alpha=alpha))
    return results if isinstance(cavs, dict) else results[None]


# ---------------------------------------------------------------------------------------------
# Concept discovery: NMF of a layer's activations
# ---------------------------------------------------------------------------------------------

@dataclass
class NMFConcepts:
    """``heatmaps`` (N, h, w, K): where each factor is present in each image; ``components``
    (K, k): each factor as non-negative channel weights; ``error``: the relative reconstruction
    error ``|A - W H|_F / |A|_F``; ``model``: scikit-learn's fitted ``NMF`` (``transform`` new
    activations reshaped to (positions, k))."""
    heatmaps: np.ndarray
    components: np.ndarray
    error: float
    model: object


def nmf_concepts(activations, n_concepts, *, seed=0, max_iter=500, init="nndsvda"):
    """Deep feature factorisation (Collins et al., 2018): the activations of a layer after its
    ReLU, ``A`` (N, h, w, k) >= 0, reshaped to a matrix of N*h*w positions by k channels, are
    factorised by scikit-learn's ``NMF`` as ``A ~ W H`` with ``W`` (N*h*w, K) >= 0 and ``H``
    (K, k) >= 0. Row r of H is a concept (a non-negative mix of channels); ``W`` reshaped to
    (N, h, w, K) shows where each concept is in each image. Seeded (``seed``), so repeatable.
    Returns ``NMFConcepts``.
    """
    from sklearn.decomposition import NMF

    a = np.asarray(activations)
    if a.ndim != 4 or a.size == 0:
        raise ValueError(f"activations must be feature maps (N, h, w, k) of one layer, got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError("activations contain NaN or infinite values.")
    if a.min() < 0:
        raise ValueError(f"NMF needs non-negative activations, these reach {a.min():.3g}: take a layer after "
                         "its ReLU (the course CNN's conv layers have it built in).")
    if not _is_int(n_concepts) or not 1 <= n_concepts <= a.shape[-1]:
        raise ValueError(f"n_concepts must be an integer from 1 to the layer's {a.shape[-1]} channels, "
                         f"got {n_concepts!r}.")
    seed = _check_seed(seed)
    matrix = a.reshape(-1, a.shape[-1]).astype(np.float64)
    if not matrix.any():
        raise ValueError("every activation is 0: nothing to factorise (a dead layer, or black images).")
    nmf = NMF(n_components=n_concepts, init=init, random_state=seed, max_iter=max_iter)
    w = nmf.fit_transform(matrix)
    error = float(np.linalg.norm(matrix - w @ nmf.components_) / np.linalg.norm(matrix))
    return NMFConcepts(w.reshape(a.shape[:3] + (n_concepts,)).astype(np.float32),
                       nmf.components_.astype(np.float32), error, nmf)


# ---------------------------------------------------------------------------------------------
# Channels: attribution, ablation, selectivity
# ---------------------------------------------------------------------------------------------

def channel_attribution(model, images, class_index=None, *, layer, score="logits"):
    """Activation x gradient at ``layer`` (Olah et al., 2018, the semantic dictionary's weights):
    ``R[n, i, j, k] = A[n, i, j, k] * dS_c/dA[n, i, j, k]``, returned (N, h, w, k) float32.
    Summed over positions it is each channel's first-order share of the score: ``R.sum((1, 2))``
    (N, k); ``R.sum((1, 2, 3))`` is the score's first-order Taylor term at the layer.
    """
    a, g = layer_gradients(model, images, class_index, layer=layer, score=score)
    return a * g


def class_selectivity(activations, labels):
    """Class selectivity of each channel (Morcos et al., 2018):
    ``SI = (mu_max - mu_rest) / (mu_max + mu_rest)``, where ``mu`` are the class-conditional
    means of the channel's activity (its mean over positions), ``mu_max`` the largest and
    ``mu_rest`` the mean of the other classes' means. 0: no class preference, 1: active for
    one class only (for non-negative activity, after a ReLU). A silent channel gets 0.

    ``activations`` (N, h, w, k) or (N, k); ``labels`` (N,) ints. Returns (k,) float64.
    """
    a = np.asarray(activations, dtype=np.float64)
    if a.ndim == 4:
        a = a.mean(axis=(1, 2))
    if a.ndim != 2:
        raise ValueError(f"activations must be (N, h, w, k) or (N, k), got shape {a.shape}.")
    labels = np.asarray(labels)
    if labels.shape != (len(a),) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be one integer class per image, shape ({len(a)},); got {labels.shape}.")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError("class selectivity needs images of at least 2 classes.")
    means = np.stack([a[labels == c].mean(axis=0) for c in classes])          # (classes, k)
    top = means.argmax(axis=0)
    mu_max = means[top, np.arange(means.shape[1])]
    mu_rest = (means.sum(axis=0) - mu_max) / (len(classes) - 1)
    denom = mu_max + mu_rest
    return np.where(denom > 0, (mu_max - mu_rest) / np.where(denom > 0, denom, 1), 0.0)


@dataclass
class AblationResult:
    """``channels`` (M,) ablated one at a time; ``classes`` (K,); ``base_accuracy`` (K,) per
    class without ablation; ``accuracy`` (M, K) with channel m ablated; ``drop`` = base -
    accuracy (M, K); ``overall_drop`` (M,) on all images; ``mode``, ``fill`` (M,) the value put
    in place of each channel."""
    layer: str
    mode: str
    channels: np.ndarray
    classes: np.ndarray
    base_accuracy: np.ndarray
    accuracy: np.ndarray
    drop: np.ndarray
    overall_drop: np.ndarray
    fill: np.ndarray


def _keras_tail(model, layer, score):
    """A cached Keras model from ``layer``'s output to the class scores (the rest of the network)."""
    keras = _keras()

    def build():
        scores = _keras_scores_model(model, score)
        try:
            return keras.Model(get_layer(model, layer).output, scores.outputs[0])
        except ValueError as err:
            raise ValueError(f"The class scores of {model.name!r} do not depend on the images through {layer!r} "
                             f"alone ({err}); choose a layer that every path from the input passes through."
                             ) from None
    return _cached(model, ("concepts_tail", layer, score), build)


def _ablated_predictions(model, x, layer, channel, fill, score):
    """PyTorch: predicted classes (N,) with channel ``channel`` of ``layer`` replaced by the
    constant ``fill`` through a forward hook (removed afterwards); ``channel=None``: unchanged."""
    engine = _engine(model, score)
    module = dict(model.named_modules())[engine.resolve_layer(layer, x)]

    def hook(mod, inputs, output):
        out = output.clone()
        out[:, channel] = fill
        return out
    preds = []
    for part in _chunks(len(x), engine.bytes_per_image(x)):
        handle = module.register_forward_hook(hook) if channel is not None else None
        try:
            preds.append(engine.forward(x[part]).argmax(axis=1))
        finally:
            if handle is not None:
                handle.remove()
    return np.concatenate(preds)


def channel_ablation(model, images, labels, layer, channels=None, *, mode="zero", score="logits",
                     batch_size=256):
    """Ablate each channel of ``layer`` in turn and measure the accuracy per class (Morcos et
    al., 2018): channel m's map is replaced by 0 (``mode="zero"``) or by its mean over
    ``images`` and positions (``mode="mean"``), the rest of the network runs as it is.

    ``images`` (N, H, W, C), ``labels`` (N,) true classes; ``channels``: None (all) or a list.
    Keras: the layer's activations are computed once and the rest of the network (a tail model)
    reruns per channel; PyTorch: a forward hook replaces the channel. Returns an
    ``AblationResult`` (``drop[m, c]``: how much class c's accuracy falls without channel m).
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}.")
    e = _Explained(model, images, None, score)
    x = e.x
    labels = np.asarray(labels)
    if labels.shape != (len(x),) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be one integer class per image, shape ({len(x)},); got shape "
                         f"{labels.shape} and dtype {labels.dtype}.")
    name = _engine_layer(e.engine, layer, x)
    acts = layer_activations(model, x, layer, batch_size=batch_size)
    if acts.ndim != 4:
        raise ValueError(f"Layer {layer!r} has output shape {acts.shape[1:]}, not feature maps (h, w, k): "
                         "channel ablation needs a convolutional (or pooling) layer.")
    k = acts.shape[-1]
    channels = np.arange(k) if channels is None else np.asarray(channels)
    if channels.ndim != 1 or channels.dtype.kind not in "iu" or len(channels) == 0 or np.any(channels < 0) \
            or np.any(channels >= k):
        raise ValueError(f"channels must be None or a non-empty list of channel indices 0..{k - 1}, got {channels!r}.")
    fills = acts.mean(axis=(0, 1, 2))[channels] if mode == "mean" else np.zeros(len(channels))
    classes = np.unique(labels)
    keras_tail = None if _is_torch_module(model) else _keras_tail(e.engine.model, name, score)

    def predict(channel, fill):
        if keras_tail is None:
            return _ablated_predictions(model, x, layer, None if channel is None else int(channel), float(fill), score)
        out = []
        for start in range(0, len(acts), batch_size):
            a = acts[start:start + batch_size].copy()
            if channel is not None:
                a[..., channel] = fill
            out.append(np.asarray(keras_tail(a, training=False)).argmax(axis=1))
        return np.concatenate(out)

    def per_class(pred):
        right = pred == labels
        return np.array([right[labels == c].mean() for c in classes]), float(right.mean())

    base, base_all = per_class(predict(None, 0.0))
    accuracy, overall = np.empty((len(channels), len(classes))), np.empty(len(channels))
    for m, (channel, fill) in enumerate(zip(channels, fills)):
        accuracy[m], overall[m] = per_class(predict(channel, fill))
    return AblationResult(str(layer), mode, channels, classes, base, accuracy, base[None] - accuracy,
                          base_all - overall, np.asarray(fills, dtype=np.float64))
