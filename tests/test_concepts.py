"""cnnlib.concepts: CAVs, TCAV and its t-test, NMF concept discovery, channel attribution,
channel ablation and class selectivity, for Keras models and PyTorch modules.

* Hand-worked models: a layer whose channels are the input's channels (identity 1x1
  convolution), followed by global average pooling and a dense layer with chosen weights, so
  the concept direction, every directional derivative, each ablation's effect and each
  channel's selectivity are known by construction. The same model in both frameworks.
* TCAV against captum's ``TCAV`` on a small torch CNN, on the same layer and concept sets.
"""
import numpy as np
import pytest
from scipy import stats

torch = pytest.importorskip("torch")

from cnnlib import concepts as C  # noqa: E402

SIZE = 4


# --- hand-worked models: layer "features" = the input's 3 channels ---------------------------

def keras_model(head):
    """image (4, 4, 3) -> features (identity 1x1 conv, ReLU) -> mean over positions -> logits = head."""
    import keras

    inp = keras.Input((SIZE, SIZE, 3), name="image")
    feats = keras.layers.Conv2D(3, 1, activation="relu", name="features")(inp)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(feats)
    logits = keras.layers.Dense(head.shape[1], name="logits")(pooled)
    model = keras.Model(inp, logits)
    model.get_layer("features").set_weights([np.eye(3, dtype=np.float32)[None, None], np.zeros(3, np.float32)])
    model.get_layer("logits").set_weights([head.astype(np.float32), np.zeros(head.shape[1], np.float32)])
    return model


def torch_model(head):
    """The same network as a PyTorch module (layer "features.0" holds the channels)."""
    conv = torch.nn.Conv2d(3, 3, 1)
    dense = torch.nn.Linear(3, head.shape[1])
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3)[:, :, None, None])
        conv.bias.zero_()
        dense.weight.copy_(torch.tensor(head.T, dtype=torch.float32))
        dense.bias.zero_()
    model = torch.nn.Sequential()
    model.add_module("features", torch.nn.Sequential(conv, torch.nn.ReLU()))
    model.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", torch.nn.Flatten())
    model.add_module("logits", dense)
    return model.eval()


FRAMEWORKS = {"keras": (keras_model, "features"), "torch": (torch_model, "features")}

# class 0's score is the mean of channel 2, class 1's its negative
CONCEPT_HEAD = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, -1.0]])


def noise(n, seed, scale=0.5):
    return (np.random.default_rng(seed).random((n, SIZE, SIZE, 3)) * scale).astype(np.float32)


def channel_indicator(channel):
    v = np.zeros((SIZE, SIZE, 3))
    v[..., channel] = 1
    return v.ravel() / np.linalg.norm(v)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("classifier", ["sgd", "logistic"])
def test_cav_is_the_concept_channel(framework, classifier):
    build, layer = FRAMEWORKS[framework]
    model = build(CONCEPT_HEAD)
    concept = noise(60, 1)
    concept[..., 2] += 0.5                      # the concept: channel 2 brighter
    randoms = C.random_image_sets(noise(200, 2), n_sets=4, set_size=60, seed=0)
    cavs = C.train_cavs(model, layer, concept, randoms, classifier=classifier, seed=0)
    assert cavs.vectors.shape == (4, SIZE * SIZE * 3)
    np.testing.assert_allclose(np.linalg.norm(cavs.vectors, axis=1), 1, atol=1e-9)
    # every CAV points along channel 2 (cosine with the channel's indicator), and separates perfectly
    cosines = cavs.vectors @ channel_indicator(2)
    assert cosines.min() > 0.8, cosines
    assert np.all(cavs.accuracies == 1.0)
    # random vs random: no direction to find, held-out accuracy near chance
    assert np.abs(cavs.random_vectors @ channel_indicator(2)).max() < 0.6
    assert cavs.random_accuracies.mean() < 0.8
    # class 0's gradient is +1/16 on channel 2: every image's score rises along every concept CAV
    up = C.tcav(model, noise(30, 3), 0, cavs, n_tests=2)
    down = C.tcav(model, noise(30, 3), 1, cavs, n_tests=2)
    assert np.all(up.scores == 1.0) and np.all(down.scores == 0.0)
    # the gradient is the same for every image (a linear head): each random CAV scores 0 or 1
    assert set(np.unique(up.random_scores)) <= {0.0, 1.0}
    np.testing.assert_array_equal(up.random_scores, 1 - down.random_scores)


def test_cav_by_hand_equals_the_library():
    """The idea in a few lines: a CAV is the unit normal of scikit-learn's linear boundary."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, (40, 7)), rng.normal(0, 1, (50, 7))
    x, y = np.r_[pos, neg], np.r_[np.ones(40), np.zeros(50)]
    train, test = train_test_split(np.arange(90), test_size=0.33, random_state=5)
    clf = SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3, random_state=5).fit(x[train], y[train])
    cav = C.concept_activation_vector(pos, neg, seed=5)
    np.testing.assert_allclose(cav.vector, clf.coef_[0] / np.linalg.norm(clf.coef_[0]), atol=1e-12)
    assert cav.accuracy == clf.score(x[test], y[test])
    # reversing the roles reverses the direction
    assert C.concept_activation_vector(neg, pos, seed=5).vector @ cav.vector < 0


def test_tcav_scores_are_the_share_of_positive_directional_derivatives():
    g = np.array([[1.0, 0.0], [-1.0, 2.0], [0.5, -3.0], [0.0, 0.0]])
    cavs = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    np.testing.assert_allclose(C.tcav_scores(g, cavs), [2 / 4, 1 / 4, 1 / 4])    # 0 is not "> 0"
    assert C.tcav_scores(g, cavs[0]) == 0.5
    with pytest.raises(ValueError, match="D = 2"):
        C.tcav_scores(g, np.ones(3))


def test_t_test_is_scipys_two_sided_test_with_bonferroni():
    s, r = np.array([0.9, 0.8, 0.85, 0.95, 0.7]), np.array([0.5, 0.6, 0.4, 0.55, 0.45])
    out = C.tcav_t_test(s, r, n_tests=3, alpha=0.05)
    ref = stats.ttest_ind(s, r)
    assert out["p_value"] == pytest.approx(ref.pvalue) and out["t"] == pytest.approx(ref.statistic)
    assert out["p_corrected"] == pytest.approx(min(1, 3 * ref.pvalue))
    assert out["significant"] == (ref.pvalue < 0.05 / 3)
    # a p-value between alpha / n and alpha: significant alone, not after the correction
    s2 = r + np.array([0.15, 0.1, 0.2, 0.05, 0.12])
    p = stats.ttest_ind(s2, r).pvalue
    assert 0.05 / 20 < p < 0.05, p
    assert C.tcav_t_test(s2, r)["significant"] and not C.tcav_t_test(s2, r, n_tests=20)["significant"]
    # constant scores: scipy gives NaN, the test gives the obvious answer
    assert C.tcav_t_test([1, 1, 1], [1, 1, 1])["p_value"] == 1.0
    assert C.tcav_t_test([1, 1, 1], [0, 0, 0])["significant"]
    for bad in ({"n_tests": 0}, {"alpha": 1.5}):
        with pytest.raises(ValueError):
            C.tcav_t_test(s, r, **bad)


# --- channel ablation and selectivity: channel c carries class c -----------------------------

def class_images():
    """Class c: channel c = 1, the other channels 0.25, 5 images per class."""
    x = np.full((15, SIZE, SIZE, 3), 0.25, np.float32)
    labels = np.repeat(np.arange(3), 5)
    x[np.arange(15), :, :, labels] = 1.0
    return x, labels


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_ablation_removes_the_class_its_channel_carries(framework):
    build, layer = FRAMEWORKS[framework]
    model = build(np.eye(3))                     # logit c = mean of channel c
    x, labels = class_images()
    zero = C.channel_ablation(model, x, labels, layer, mode="zero")
    np.testing.assert_array_equal(zero.base_accuracy, [1, 1, 1])
    np.testing.assert_array_equal(zero.drop, np.eye(3))                  # channel c -> class c gone
    np.testing.assert_allclose(zero.overall_drop, [1 / 3] * 3)
    # mean ablation puts (1 + 0.25 + 0.25) / 3 = 0.5 in place: above 0.25, every class survives
    mean = C.channel_ablation(model, x, labels, layer, mode="mean", channels=[0, 2])
    np.testing.assert_allclose(mean.fill, [0.5, 0.5])
    np.testing.assert_array_equal(mean.drop, np.zeros((2, 3)))
    # selectivity: mu_max = 1, mu_rest = 0.25 -> (1 - 0.25) / (1 + 0.25) = 0.6 for every channel
    acts = C.layer_activations(model, x, layer)
    np.testing.assert_allclose(C.class_selectivity(acts, labels), [0.6, 0.6, 0.6])


def test_selectivity_of_silent_and_unselective_channels():
    labels = np.array([0, 0, 1, 1])
    acts = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    # channel 2: mu = (1, 0): (1 - 0) / (1 + 0) = 1
    np.testing.assert_allclose(C.class_selectivity(acts, labels), [0.0, 0.0, 1.0])


def test_ablation_leaves_the_torch_model_as_it_was():
    model = torch_model(np.eye(3)).train()
    x, labels = class_images()
    C.channel_ablation(model, x, labels, "features", mode="zero")
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_channel_attribution_adds_up_to_the_score():
    """After the layer the network is linear (mean pooling, dense without bias): the sum of
    activation x gradient over channels and positions is the class score itself."""
    model = torch_model(np.array([[0.5, -1.0], [2.0, 0.3], [-0.7, 1.0]]))
    x = noise(6, 4, scale=1.0)
    for cls in (0, 1):
        r = C.channel_attribution(model, x, cls, layer="features")
        assert r.shape == (6, SIZE, SIZE, 3)
        with torch.no_grad():
            scores = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()[:, cls]
        np.testing.assert_allclose(r.sum(axis=(1, 2, 3)), scores, rtol=1e-5, atol=1e-6)


def test_keras_and_torch_give_the_same_gradients():
    head = np.array([[0.5, -1.0], [2.0, 0.3], [-0.7, 1.0]])
    x = noise(5, 6, scale=1.0)
    ka, kg = C.layer_gradients(keras_model(head), x, 1, layer="features")
    ta, tg = C.layer_gradients(torch_model(head), x, 1, layer="features")
    np.testing.assert_allclose(ka, ta, atol=1e-6)
    np.testing.assert_allclose(kg, tg, atol=1e-6)


# --- NMF -------------------------------------------------------------------------------------

def test_nmf_recovers_a_planted_factorisation_and_repeats_with_a_seed():
    rng = np.random.default_rng(0)
    w, h = rng.random((20 * 3 * 3, 3)), rng.random((3, 8))
    acts = (w @ h).reshape(20, 3, 3, 8)
    a = C.nmf_concepts(acts, 3, seed=1, max_iter=2000)
    assert a.heatmaps.shape == (20, 3, 3, 3) and a.components.shape == (3, 8)
    assert a.error < 1e-2
    b = C.nmf_concepts(acts, 3, seed=1, max_iter=2000)
    np.testing.assert_array_equal(a.heatmaps, b.heatmaps)
    np.testing.assert_array_equal(a.components, b.components)
    # random initialisation: the seed decides, and the same seed repeats
    r1, r2 = (C.nmf_concepts(acts, 3, seed=7, init="random") for _ in range(2))
    np.testing.assert_array_equal(r1.components, r2.components)
    # each planted component is found (up to order and scale)
    found = a.components / np.linalg.norm(a.components, axis=1, keepdims=True)
    planted = h / np.linalg.norm(h, axis=1, keepdims=True)
    assert (planted @ found.T).max(axis=1).min() > 0.99


def test_nmf_refuses_negative_activations():
    with pytest.raises(ValueError, match="after its ReLU"):
        C.nmf_concepts(-np.ones((2, 3, 3, 4)), 2)
    with pytest.raises(ValueError, match="n_concepts"):
        C.nmf_concepts(np.ones((2, 3, 3, 4)), 5)


# --- bad input ---------------------------------------------------------------------------------

def test_bad_input_says_what_to_do():
    model = torch_model(CONCEPT_HEAD)
    x = noise(4, 0)
    with pytest.raises(TypeError, match="layer name"):
        C.layer_activations(model, x, 3)
    with pytest.raises(ValueError, match="Unknown layer"):
        C.layer_activations(model, x, "conv9")
    with pytest.raises(ValueError, match="random_sets"):
        C.train_cavs(model, "features", x, [x])
    with pytest.raises(ValueError, match="classifier"):
        C.concept_activation_vector(np.ones((3, 2)), np.zeros((3, 2)), classifier="svm")
    with pytest.raises(ValueError, match="different layers"):
        C.concept_activation_vector(np.ones((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="set_size"):
        C.random_image_sets(x, 2, 10)
    with pytest.raises(ValueError, match="labels"):
        C.channel_ablation(model, x, np.zeros(3, int), "features")
    with pytest.raises(ValueError, match="channels"):
        C.channel_ablation(model, x, np.zeros(4, int), "features", channels=[5])
    with pytest.raises(ValueError, match="mode"):
        C.channel_ablation(model, x, np.zeros(4, int), "features", mode="noise")
    with pytest.raises(TypeError, match="CAVSet"):
        C.tcav(model, x, 0, np.ones((2, 48)))


# --- against captum's TCAV --------------------------------------------------------------------

class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(1, 6, 3)
        self.conv2 = torch.nn.Conv2d(6, 8, 3)
        self.fc = torch.nn.Linear(8 * 8 * 8, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def _captum_sklearn_classifier(seed):
    """captum's ``Classifier`` interface around the same scikit-learn fit (written independently
    of cnnlib): the first concept of an experimental set is the positive class."""
    from captum.concept._utils.classifier import Classifier
    from sklearn.linear_model import SGDClassifier
    from sklearn.model_selection import train_test_split

    class SameFit(Classifier):
        def __init__(self):
            self.w, self.ids = None, None

        def train_and_eval(self, dataloader, **kwargs):
            xs, ys = zip(*dataloader)
            x, y = torch.cat(xs).numpy().astype(np.float64), torch.cat(ys).numpy()
            positive = y == y[0]
            train, test = train_test_split(np.arange(len(y)), test_size=0.33, random_state=seed)
            lm = SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3, random_state=seed)
            lm.fit(x[train], positive[train].astype(int))
            self.w = lm.coef_[0]
            self.ids = [int(y[0]), int(y[~positive][0])]
            return {"accs": lm.score(x[test], positive[test].astype(int))}

        def weights(self):
            return torch.tensor(np.stack([self.w, -self.w]), dtype=torch.float32)

        def classes(self):
            return self.ids

    return SameFit()


@pytest.mark.slow
def test_tcav_agrees_with_captum(tmp_path):
    """Same layer, same concept and random sets, the same linear fit: captum's sign-count scores
    equal ours (tolerance: one input in 40 may flip where float32 dot products sit at 0), and the
    p-values of the same t-test agree to 1e-6 (they come from the same scores)."""
    from captum.concept import TCAV, Concept
    from captum.concept._utils.common import concepts_to_str
    from torch.utils.data import DataLoader

    rng = np.random.default_rng(0)
    n_random, size, seed = 8, 30, 3
    model = SmallCNN().eval()
    yy, xx = np.mgrid[:12, :12]
    concept = rng.random((size, 12, 12, 1)).astype(np.float32) * 0.3
    concept[:, 3:9, 3:9] += 0.7 * ((yy[3:9, 3:9] + xx[3:9, 3:9]) % 2)[None, ..., None]   # a checkerboard patch
    randoms = (rng.random((n_random, size, 12, 12, 1)) * 0.6).astype(np.float32)
    inputs = (rng.random((40, 12, 12, 1))).astype(np.float32)

    cavs = C.train_cavs(model, "conv2", concept, randoms, seed=seed)
    ours = C.tcav(model, inputs, 1, cavs, n_tests=1)

    def as_concept(i, name, images):
        batches = torch.from_numpy(images.transpose(0, 3, 1, 2))
        return Concept(i, name, DataLoader(batches, batch_size=size))
    cc = as_concept(0, "checker", concept)
    rc = [as_concept(i + 1, f"random{i}", r) for i, r in enumerate(randoms)]
    sets = [[cc, r] for r in rc] + [[rc[(i + 1) % n_random], rc[i]] for i in range(n_random)]
    captum_tcav = TCAV(model, ["conv2"], classifier=_captum_sklearn_classifier(seed), save_path=str(tmp_path))
    out = captum_tcav.interpret(torch.from_numpy(inputs.transpose(0, 3, 1, 2)), sets, target=1)
    theirs = np.array([float(out[concepts_to_str(s)]["conv2"]["sign_count"][0]) for s in sets])
    np.testing.assert_allclose(ours.scores, theirs[:n_random], atol=1 / 40 + 1e-9)
    np.testing.assert_allclose(ours.random_scores, theirs[n_random:], atol=1 / 40 + 1e-9)
    p_captum = stats.ttest_ind(theirs[:n_random], theirs[n_random:]).pvalue
    if np.array_equal(ours.scores, theirs[:n_random]) and np.array_equal(ours.random_scores, theirs[n_random:]):
        assert ours.test["p_value"] == pytest.approx(p_captum, abs=1e-6)
    else:  # a flipped input moves the p-value a little
        assert ours.test["p_value"] == pytest.approx(p_captum, abs=0.05)
    assert np.ptp(theirs[:n_random]) + np.ptp(theirs[n_random:]) > 0     # not a degenerate comparison


def test_tcav_of_several_cav_sets_equals_one_at_a_time():
    model = torch_model(CONCEPT_HEAD)
    concept = noise(30, 1)
    concept[..., 2] += 0.5
    randoms = C.random_image_sets(noise(100, 2), n_sets=3, set_size=30, seed=0)
    sets = {"bright 2": C.train_cavs(model, "features", concept, randoms, seed=0),
            "noise": C.train_cavs(model, "features", randoms[0], randoms[1:], seed=1)}
    x = noise(10, 5)
    together = C.tcav(model, x, 0, sets, n_tests=4)
    for key, s in sets.items():
        alone = C.tcav(model, x, 0, s, n_tests=4)
        np.testing.assert_array_equal(together[key].scores, alone.scores)
        np.testing.assert_array_equal(together[key].random_scores, alone.random_scores)
        assert together[key].test == alone.test
