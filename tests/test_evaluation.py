"""cnnlib.evaluation: hand-worked cases, and the references (Quantus, pytorch-grad-cam)
on the same model and maps.

Tolerances: localisation metrics are exact (1e-12); perturbation curves read the same model on
the same images, so they agree to float32 rounding of the logits (1e-5 relative); the ROAD
imputation solves the same linear system with another solver (1e-6 absolute on [0, 1] pixels).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cnnlib import evaluation as ev  # noqa: E402


# -- models -------------------------------------------------------------------------------

class OnePixel(torch.nn.Module):
    """Class 0 scores pixel (row, col) of channel 0, class 1 scores minus it."""

    def __init__(self, row, col):
        super().__init__()
        self.row, self.col = row, col
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        v = x[:, 0, self.row, self.col] + 0 * self.dummy
        return torch.stack([v, -v], dim=1)


def small_cnn(seed=0, channels=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 7 * 7, 10)).eval()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.random((6, 14, 14, 1)).astype(np.float32)
    maps = rng.random((6, 14, 14))                       # continuous: no ties
    masks = np.zeros((6, 14, 14), bool)
    masks[:, 2:6, 3:8] = True
    masks[3:, 8:12, 8:12] = True
    return x, maps, masks


# -- ground truth, by hand ----------------------------------------------------------------

def test_a_map_that_is_the_ground_truth_scores_one_everywhere(data):
    _, _, masks = data
    maps = masks.astype(float)
    assert np.all(ev.relevance_mass(maps, masks) == 1)
    assert np.all(ev.relevance_rank(maps, masks) == 1)
    assert np.all(ev.pointing_game(maps + 1e-3 * masks * np.arange(14), masks) == 1)


def test_localisation_by_hand():
    mask = np.zeros((4, 4), bool)
    mask[0, :2] = True                                    # 2 pixels of 16
    m = np.zeros((1, 4, 4))
    m[0, 0, 0], m[0, 3, 3], m[0, 2, 2] = 1.0, 3.0, -5.0   # the maximum is outside
    assert ev.pointing_game(m, mask)[0] == 0
    assert ev.relevance_mass(m, mask)[0] == pytest.approx(1 / 4)      # 1 of 1 + 3 positive
    assert ev.relevance_rank(m, mask)[0] == pytest.approx(1 / 2)      # top-2 = (3,3), (0,0)
    flat = np.ones((1, 4, 4))                                          # a constant map is chance
    assert ev.pointing_game(flat, mask)[0] == pytest.approx(2 / 16)
    assert ev.relevance_mass(flat, mask)[0] == pytest.approx(2 / 16)
    assert ev.relevance_mass(np.zeros((1, 4, 4)), mask)[0] == 0


def test_constant_map_rank_is_chance_on_average():
    mask = np.zeros((20, 20), bool)
    mask[:5] = True
    flat = np.zeros((200, 20, 20))
    assert ev.relevance_rank(flat, mask).mean() == pytest.approx(0.25, abs=0.03)


def test_baselines(data):
    x, _, _ = data
    r = ev.random_maps(x, seed=1)
    assert r.shape == (6, 14, 14) and np.array_equal(r, ev.random_maps(x, seed=1))
    img = np.zeros((1, 9, 9, 1), np.float32)
    img[0, :, 5:] = 1.0                                   # one vertical edge between columns 4 and 5
    s = ev.sobel_maps(img)[0]
    assert s.max() == 1 and set(np.flatnonzero(s.max(axis=0) == 1)) <= {4, 5} and s[:, :3].max() == 0


# -- faithfulness, by hand ----------------------------------------------------------------

def one_pixel_case():
    x = np.full((1, 4, 4, 1), 0.5, np.float32)
    x[0, 1, 2, 0] = 0.9
    m = np.arange(16.0).reshape(1, 4, 4) / 100
    m[0, 1, 2] = 1.0                                      # the map points at the pixel the model reads
    return OnePixel(1, 2), x, m


@pytest.mark.parametrize("replacement,fill", [("black", 0.0), ("mean", (0.5 * 15 + 0.9) / 16), (0.3, 0.3)])
def test_deletion_and_insertion_on_a_model_that_reads_one_pixel(replacement, fill):
    model, x, m = one_pixel_case()
    d = ev.deletion(model, x, m, 0, replacement=replacement, steps=16)
    np.testing.assert_allclose(d.scores[0], [0.9] + [fill] * 16, rtol=1e-6)
    np.testing.assert_allclose(d.fractions, np.arange(17) / 16)
    assert d.area[0] == pytest.approx((0.9 + fill) / 2 / 16 + fill * 15 / 16)
    least = ev.deletion(model, x, m, 0, replacement=replacement, steps=16, order="least")
    np.testing.assert_allclose(least.scores[0], [0.9] * 16 + [fill], rtol=1e-6)  # read pixel ranked last
    ins = ev.insertion(model, x, m, 0, replacement=replacement, steps=16)
    np.testing.assert_allclose(ins.scores[0], [fill] + [0.9] * 16, rtol=1e-6)


def test_road_by_hand():
    model, x, m = one_pixel_case()
    x[0, 0, 1:4, 0], x[0, 2, 1:4, 0] = [0.1, 0.2, 0.3], [0.4, 0.6, 0.8]
    r = ev.road(model, x, m, 0, fractions=[1 / 16], noise=0.0)
    # the one removed pixel is the weighted mean of its 8 neighbours (weights 1/6 and 1/12, sum 1)
    n = x[0, :, :, 0]
    expected = (n[0, 2] + n[2, 2] + n[1, 1] + n[1, 3]) / 6 + (n[0, 1] + n[0, 3] + n[2, 1] + n[2, 3]) / 12
    np.testing.assert_allclose(r.scores[0], [0.9, expected], rtol=1e-6)


def test_linear_imputation_is_exact_on_linear_images():
    yy, xx = np.mgrid[0:10, 0:12]
    img = (0.02 * yy + 0.03 * xx + 0.1)[..., None].astype(np.float64)
    removed = np.zeros((10, 12), bool)
    removed[3:7, 4:9] = True                                           # inside: a linear ramp is harmonic
    np.testing.assert_allclose(ev.linear_imputation(img, removed), img, atol=1e-6)


def test_curves_do_not_change_the_model_and_keras_agrees():
    keras = pytest.importorskip("keras")
    model, x, m = one_pixel_case()
    inp = keras.Input((4, 4, 1))
    dense = keras.layers.Dense(2)
    k = keras.Model(inp, dense(keras.layers.Flatten()(inp)))
    w = np.zeros((16, 2), np.float32)
    w[1 * 4 + 2] = [1, -1]
    dense.set_weights([w, np.zeros(2, np.float32)])
    model.train()
    t = ev.deletion(model, x, m, 0, steps=4, replacement="blur", sigma=1.0)
    assert model.training
    kk = ev.deletion(k, x, m, 0, steps=4, replacement="blur", sigma=1.0)
    np.testing.assert_allclose(t.scores, kk.scores, rtol=1e-5, atol=1e-6)


def test_memory_is_bounded_and_results_do_not_depend_on_the_chunks(data, monkeypatch):
    import cnn_utils

    x, maps, _ = data
    model = small_cnn()
    big = ev.deletion(model, x, maps, steps=7)
    monkeypatch.setattr(cnn_utils, "ATTRIBUTION_MEMORY_BUDGET", 1)
    small = ev.deletion(model, x, maps, steps=7)
    np.testing.assert_allclose(big.scores, small.scores, rtol=1e-5, atol=1e-6)


# -- the references -------------------------------------------------------------------------

def test_localisation_equals_quantus(data):
    quantus = pytest.importorskip("quantus")
    x, maps, masks = data
    model = small_cnn()
    common = dict(model=model, x_batch=x.transpose(0, 3, 1, 2), y_batch=np.zeros(len(x), int),
                  a_batch=maps[:, None], s_batch=masks[:, None].astype(float), channel_first=True)
    for ours, theirs in ((ev.pointing_game, quantus.PointingGame), (ev.relevance_mass, quantus.RelevanceMassAccuracy),
                         (ev.relevance_rank, quantus.RelevanceRankAccuracy)):
        q = np.asarray(theirs(abs=False, normalise=False, disable_warnings=True)(**common), float)
        np.testing.assert_allclose(ours(maps, masks), q, atol=1e-12, err_msg=ours.__name__)


def test_deletion_equals_quantus_pixel_flipping(data):
    quantus = pytest.importorskip("quantus")
    x, maps, _ = data
    model = small_cnn()
    y = np.array([0, 3, 5, 7, 2, 9])
    steps, hw = 14, 14 * 14
    ours = ev.deletion(model, x, maps, y, steps=steps, replacement="black")
    # Quantus' "black" is each image's minimum; the course's is the bottom of the input range (0)
    metric = quantus.PixelFlipping(features_in_step=hw // steps, perturb_baseline=0.0, abs=False,
                                   normalise=False, disable_warnings=True)
    q = np.asarray(metric(model=model, x_batch=x.transpose(0, 3, 1, 2), y_batch=y, a_batch=maps[:, None],
                          channel_first=True, softmax=False))
    np.testing.assert_allclose(ours.scores[:, 1:], q, rtol=1e-5, atol=1e-5)


def test_imputation_equals_pytorch_grad_cam():
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    rng = np.random.default_rng(3)
    img = rng.random((3, 16, 18)).astype(np.float32)
    removed = rng.random((16, 18)) < 0.6
    theirs = road.NoisyLinearImputer(noise=0.0)(torch.from_numpy(img), torch.from_numpy((~removed).astype(np.float32)))
    ours = ev.linear_imputation(img.transpose(1, 2, 0), removed)
    np.testing.assert_allclose(ours, theirs.numpy().transpose(1, 2, 0), atol=1e-6)


@pytest.mark.parametrize("order", ["most", "least"])
def test_road_equals_pytorch_grad_cam(data, order):
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    from pytorch_grad_cam.metrics.perturbation_confidence import PerturbationConfidenceMetric
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x, maps, _ = data
    model = small_cnn()
    y = [1, 2, 3, 4, 5, 6]
    t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    remover = road.RemoveMostRelevantFirst if order == "most" else road.RemoveLeastRelevantFirst
    for pct in (20, 50, 80):                        # pytorch-grad-cam's percentile thresholds
        ranked = maps if order == "most" else 1 - maps
        n_removed = (ranked >= np.percentile(ranked, pct, axis=(1, 2), keepdims=True)).sum(axis=(1, 2))
        assert len(set(n_removed)) == 1, "no ties: every map loses the same number of pixels"
        ours = ev.road(model, x, maps, y, order=order, fractions=[n_removed[0] / 196], noise=0.0)
        metric = PerturbationConfidenceMetric(remover(pct, road.NoisyLinearImputer(noise=0.0)))
        theirs = metric(t, maps.astype(np.float32), [ClassifierOutputTarget(c) for c in y], model)
        np.testing.assert_allclose(ours.scores[:, 1] - ours.scores[:, 0], theirs, rtol=1e-4, atol=1e-5)


# -- bad input ------------------------------------------------------------------------------

def test_bad_input_says_what_to_do(data):
    x, maps, masks = data
    model = small_cnn()
    with pytest.raises(ValueError, match="empty"):
        ev.pointing_game(maps, np.zeros((14, 14), bool))
    with pytest.raises(ValueError, match="shape"):
        ev.relevance_mass(maps, masks[:, :5])
    with pytest.raises(ValueError, match="Reduce channels"):
        ev.deletion(model, x, maps[..., None].repeat(3, -1))
    with pytest.raises(ValueError, match="replacement"):
        ev.deletion(model, x, maps, replacement="white")
    with pytest.raises(ValueError, match="order"):
        ev.insertion(model, x, maps, order="top")
    with pytest.raises(ValueError, match="steps"):
        ev.deletion(model, x, maps, steps=0)
    with pytest.raises(ValueError, match="fractions"):
        ev.road(model, x, maps, fractions=[0.5, 1.0])
    with pytest.raises(ValueError, match="NaN"):
        ev.relevance_rank(np.full((1, 14, 14), np.nan), masks[0])
