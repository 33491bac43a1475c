"""The attribution API on PyTorch modules: one signature for Keras and PyTorch.

* A tiny Keras CNN and a tiny torch CNN with identical weights give the same maps
  for every method (the two frameworks' paths are tested equal).
* Occlusion is checked against maps worked out by hand, on both frameworks.
* captum and pytorch-grad-cam, on the same torch model, as independent references.
* The course's VGG16: forward takes [0, 1] RGB, VGG's layer names, the default layer.
"""
import hashlib

import cnnlib.geometry
import cnnlib.torch_engine
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

import cnn_utils as cu  # noqa: E402

METHODS = ["saliency_map", "smoothgrad", "integrated_gradients", "grad_cam", "grad_cam_plus_plus",
           "score_cam", "occlusion"]
CAMS = ["grad_cam", "grad_cam_plus_plus", "score_cam"]


# --- a small CNN in both frameworks, same weights ----------------------------------------------

class TorchCNN(torch.nn.Module):
    """conv(3->4, 3x3, same) relu -> maxpool 2 -> conv(4->6, 3x3, valid) relu -> flatten -> linear 5."""

    def __init__(self, size=12, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(4, 6, 3), torch.nn.ReLU(inplace=True))
        side = size // 2 - 2
        self.classifier = torch.nn.Linear(6 * side * side, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def keras_twin(net, size=12):
    """The same network in Keras (channels last): weights transposed, flatten order matched."""
    keras = cu._keras()
    side = size // 2 - 2
    inp = keras.Input((size, size, 3), name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inp)
    h = keras.layers.MaxPooling2D(2, name="pool1")(h)
    h = keras.layers.Conv2D(6, 3, activation="relu", name="conv2")(h)
    h = keras.layers.Permute((3, 1, 2), name="to_channels_first")(h)   # flatten as torch does
    h = keras.layers.Flatten(name="flatten")(h)
    out = keras.layers.Dense(5, name="logits")(h)
    model = keras.Model(inp, out)
    c1, c2, fc = net.features[0], net.features[3], net.classifier
    model.get_layer("conv1").set_weights([c1.weight.detach().numpy().transpose(2, 3, 1, 0), c1.bias.detach().numpy()])
    model.get_layer("conv2").set_weights([c2.weight.detach().numpy().transpose(2, 3, 1, 0), c2.bias.detach().numpy()])
    model.get_layer("logits").set_weights([fc.weight.detach().numpy().T, fc.bias.detach().numpy()])
    assert side * side * 6 == fc.in_features
    return model


@pytest.fixture(scope="module")
def twins():
    net = TorchCNN().eval()
    return net, keras_twin(net)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).random((4, 12, 12, 3)).astype(np.float32)


def run(name, model, x, **kwargs):
    extra = {"smoothgrad": dict(samples=8, noise=0.1, seed=5), "integrated_gradients": dict(steps=16),
             "occlusion": dict(window=4, stride=2)}.get(name, {})
    return getattr(cu, name)(model, x, **{**extra, **kwargs})


def test_same_scores_in_both_frameworks(twins, images):
    net, kmodel = twins
    with torch.no_grad():
        theirs = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(kmodel.predict(images, verbose=0), theirs, rtol=1e-4, atol=1e-4)
    s_t, c_t = cu.class_scores(net, images)
    s_k, c_k = cu.class_scores(kmodel, images)
    np.testing.assert_array_equal(c_t, c_k)
    np.testing.assert_allclose(s_t, s_k, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("class_index", [None, 2])
def test_keras_and_torch_paths_agree(twins, images, name, class_index):
    net, kmodel = twins
    kw = {"layer": ("conv2", "features.4")} if name in CAMS else {}
    layer_k, layer_t = kw.get("layer", (None, None))
    extra = {"layer": layer_k} if layer_k else {}
    ours_k = run(name, kmodel, images, class_index=class_index, **extra)
    extra = {"layer": layer_t} if layer_t else {}
    ours_t = run(name, net, images, class_index=class_index, **extra)
    assert ours_t.shape == ours_k.shape and ours_t.dtype == np.float32
    expected_shape = images.shape if name == "integrated_gradients" else images.shape[:3]
    assert ours_t.shape == expected_shape
    np.testing.assert_allclose(ours_t, ours_k, rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("name", CAMS)
def test_default_layer_is_the_last_convs_relu(twins, images, name):
    net, kmodel = twins
    assert cnnlib.torch_engine._TorchEngine(net, "logits").resolve_layer(None, images) == "features.4"   # the ReLU
    np.testing.assert_array_equal(run(name, net, images), run(name, net, images, layer="features.4"))
    # on the conv itself (before its ReLU) the map differs: the hook sees the conv's own output
    raw_conv = cu.grad_cam(net, images, layer="features.3", normalize=False, return_weights=True)[1]
    raw_relu = cu.grad_cam(net, images, layer="features.4", normalize=False, return_weights=True)[1]
    assert not np.allclose(raw_conv, raw_relu)


def test_raw_maps_and_weights_in_both_frameworks(twins, images):
    net, kmodel = twins
    for name in CAMS:
        mk, wk = run(name, kmodel, images, layer="conv2", normalize=False, return_weights=True)
        mt, wt = run(name, net, images, layer="features.4", normalize=False, return_weights=True)
        np.testing.assert_allclose(wt, wk, rtol=1e-3, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(mt, mk, rtol=1e-3, atol=1e-4, err_msg=name)


# --- occlusion worked out by hand, both frameworks ---------------------------------------------

def linear_pair():
    """score_0 = sum of the pixels of a 3x3 one-channel image, score_1 = 0."""
    keras = cu._keras()
    inp = keras.Input((3, 3, 1))
    out = keras.layers.Dense(2)(keras.layers.Flatten()(inp))
    kmodel = keras.Model(inp, out)
    kmodel.layers[-1].set_weights([np.stack([np.ones(9), np.zeros(9)], 1).astype(np.float32), np.zeros(2, np.float32)])
    lin = torch.nn.Linear(9, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(np.stack([np.ones(9), np.zeros(9)]), dtype=torch.float32))
        lin.bias.zero_()
    # hand-worked pixels 1..9 lie outside [0, 1]: no input range on these two models
    return (cu.set_input_range(kmodel, None),
            cu.set_input_range(torch.nn.Sequential(torch.nn.Flatten(), lin), None))


X_HAND = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3, 1)   # 1 2 3 / 4 5 6 / 7 8 9


@pytest.mark.parametrize("framework", [0, 1])
def test_occlusion_by_hand(framework):
    model = linear_pair()[framework]
    # 2x2 windows, stride 1: drops 12 (top left), 16 (top right), 24, 28; each pixel averages
    # the windows covering it, e.g. the centre all four: (12 + 16 + 24 + 28) / 4 = 20
    raw = cu.occlusion(model, X_HAND, class_index=0, window=2, stride=1, normalize=False)
    np.testing.assert_allclose(raw[0], [[12, 14, 16], [18, 20, 22], [24, 26, 28]])
    # 1x1 windows: the drop is the pixel's own value
    np.testing.assert_allclose(cu.occlusion(model, X_HAND, class_index=0, window=1, stride=1,
                                            normalize=False)[0], X_HAND[0, ..., 0])
    # baseline 1: the drop of a 1x1 window is x - 1
    np.testing.assert_allclose(cu.occlusion(model, X_HAND, class_index=0, window=1, stride=1, baseline=1.0,
                                            normalize=False)[0], X_HAND[0, ..., 0] - 1)
    # 2x2 windows, stride 2: one window fits (rows/cols 0-1); pixels outside it are 0
    raw = cu.occlusion(model, X_HAND, class_index=0, window=2, stride=2, normalize=False)
    np.testing.assert_allclose(raw[0], [[12, 12, 0], [12, 12, 0], [0, 0, 0]])
    # class 1 ignores the image: no drop anywhere
    np.testing.assert_array_equal(cu.occlusion(model, X_HAND, class_index=1, window=2, stride=1,
                                               normalize=False), 0.0)
    np.testing.assert_allclose(cu.occlusion(model, X_HAND, class_index=0, window=2, stride=1)[0],
                               (np.array([[12, 14, 16], [18, 20, 22], [24, 26, 28]]) - 12) / 16)


def test_occlusion_bad_arguments():
    _, model = linear_pair()
    with pytest.raises(ValueError, match="window"):
        cu.occlusion(model, X_HAND, window=4)
    with pytest.raises(ValueError, match="stride"):
        cu.occlusion(model, X_HAND, window=2, stride=0)
    with pytest.raises(ValueError, match="baseline"):
        cu.occlusion(model, X_HAND, window=2, baseline=np.zeros((2, 2, 1)))
    with pytest.raises(ValueError, match="layer must be None"):
        cu.occlusion(model, X_HAND, layer="0")


# --- shared formulas on NumPy, TF and torch tensors ---------------------------------------------

def test_formulas_accept_numpy_tf_and_torch():
    tf = cu._tf()
    rng = np.random.default_rng(0)
    a = np.maximum(rng.normal(size=(2, 3, 4, 5)), 0).astype(np.float32)
    g = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    for fn in (cu.grad_cam_weights, cu.grad_cam_plus_plus_weights,
               lambda a, g: cu.grad_cam_plus_plus_weights(a, g, renormalize_alphas=True)):
        ref = fn(a, g)
        np.testing.assert_allclose(fn(tf.constant(a), tf.constant(g)).numpy(), ref, rtol=1e-5)
        np.testing.assert_allclose(fn(torch.from_numpy(a), torch.from_numpy(g)).numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(cu.grad_cam_weights(a, g), g.mean(axis=(1, 2)), rtol=1e-6)
    w = cu.grad_cam_weights(a, g)
    np.testing.assert_allclose(cu.class_activation_map(torch.from_numpy(a), torch.from_numpy(w)).numpy(),
                               np.maximum(np.einsum("nhwk,nk->nhw", a, w), 0), rtol=1e-5, atol=1e-6)
    masks, varies = cu.score_cam_masks(torch.from_numpy(a))
    np.testing.assert_allclose(masks.numpy(), cu.score_cam_masks(a)[0], rtol=1e-6)


def test_score_cam_weightings_by_hand():
    s = np.array([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])          # 1 image, 3 channels, 2 classes
    varies = np.array([[True, True, False]])
    p = cu.score_cam_weights(s, np.array([0]), varies)
    np.testing.assert_allclose(p, [[1 / (1 + np.exp(-2)), 1 / (1 + np.e), 0.0]], rtol=1e-6)
    c = cu.score_cam_weights(s, np.array([0]), varies, "channel_softmax")
    np.testing.assert_allclose(c, [[np.exp(2) / (np.exp(2) + 1), 1 / (np.exp(2) + 1), 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="weighting"):
        cu.score_cam_weights(s, np.array([0]), varies, "softmax")


# --- references: captum and pytorch-grad-cam on the same torch model ------------------------------

@pytest.fixture(scope="module")
def ref_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 6)).eval()
    with torch.no_grad():  # scores of a few units, as a trained network's (a random one's are ~0.1)
        net[-1].weight.mul_(100.0)
    x = np.random.default_rng(1).random((3, 32, 32, 3)).astype(np.float32)
    return net, x


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_captum_saliency_and_integrated_gradients(ref_model):
    """captum's "riemann_trapezoid" on n points uses steps 1/n (ends halved), which sum to
    (n - 1) / n; the trapezoidal rule's steps are 1/(n - 1). Rescaled, the two agree."""
    captum = pytest.importorskip("captum.attr")
    net, x = ref_model
    _, cls = cu.class_scores(net, x)
    theirs = captum.Saliency(net).attribute(nchw(x), target=torch.from_numpy(cls), abs=True)
    np.testing.assert_allclose(cu.saliency_map(net, x, normalize=False), theirs.amax(1).numpy(), rtol=1e-5)
    ig = captum.IntegratedGradients(net).attribute(nchw(x), baselines=0.0, target=torch.from_numpy(cls),
                                                   n_steps=33, method="riemann_trapezoid")
    np.testing.assert_allclose(cu.integrated_gradients(net, x, steps=32),
                               ig.permute(0, 2, 3, 1).numpy() * 33 / 32, rtol=1e-4, atol=1e-8)


def test_captum_smoothgrad_on_the_same_noise(ref_model):
    """SmoothGrad's noise fixed: our noisy copies (same seed) through captum's Saliency."""
    captum = pytest.importorskip("captum.attr")
    net, x = ref_model
    _, cls = cu.class_scores(net, x)
    samples, noise = 6, 0.15
    sigma = noise * (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)))
    noisy = np.repeat(x[:, None], samples, axis=1)
    for i in range(len(x)):   # the documented rule: a generator per image, seeded (seed, hash of its pixels)
        digest = hashlib.blake2b(np.ascontiguousarray(x[i]).tobytes(), digest_size=16).digest()
        rng = np.random.default_rng([11] + list(np.frombuffer(digest, dtype=np.uint32)))
        noisy[i] += rng.standard_normal(noisy.shape[1:], dtype=np.float32) * sigma[i]
    sal = captum.Saliency(net)
    theirs = np.stack([sal.attribute(nchw(noisy[:, s]), target=torch.from_numpy(cls), abs=True).numpy()
                       for s in range(samples)]).mean(0).max(1)
    ours = cu.smoothgrad(net, x, samples=samples, noise=noise, seed=11, normalize=False)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)


def test_captum_occlusion(ref_model):
    captum = pytest.importorskip("captum.attr")
    net, x = ref_model
    _, cls = cu.class_scores(net, x)
    theirs = captum.Occlusion(net).attribute(nchw(x), sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4),
                                             baselines=0.0, target=torch.from_numpy(cls))
    ours = cu.occlusion(net, x, window=8, stride=4, normalize=False)
    np.testing.assert_allclose(ours, theirs[:, 0].numpy(), rtol=1e-4, atol=1e-5)


def _pgc_weights(cam_cls, net, x, cls, layer):
    """pytorch-grad-cam's maps and its channel weights for the same call."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [ClassifierOutputTarget(int(c)) for c in cls]
    with cam_cls(model=net, target_layers=[layer]) as cam:
        maps = cam(input_tensor=nchw(x), targets=targets)
        acts = cam.activations_and_grads.activations[0].cpu().numpy()
        grads = cam.activations_and_grads.gradients[0].cpu().numpy() if cam.activations_and_grads.gradients else None
        weights = cam.get_cam_weights(nchw(x), [layer], targets, acts, grads)
    return maps, weights


@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_plus_plus"])
def test_pytorch_grad_cam_gradcam_and_plusplus(ref_model, method):
    """Same channel weights (Grad-CAM++: the paper's alphas, no renormalisation, as theirs;
    they add 1e-6 to the alphas' denominator, negligible unless the gradients are tiny);
    maps agree in rank (their upsampling is cv2's resize)."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    net, x = ref_model
    _, cls = cu.class_scores(net, x)
    cam_cls = {"grad_cam": pgc.GradCAM, "grad_cam_plus_plus": pgc.GradCAMPlusPlus}[method]
    maps, weights = _pgc_weights(cam_cls, net, x, cls, net[7])
    ours, our_w = getattr(cu, method)(net, x, return_weights=True)   # default layer: net[7], the ReLU
    np.testing.assert_allclose(our_w, weights, rtol=2e-3, atol=1e-6)
    assert cu.rank_correlation(ours, maps).min() >= 0.99


def test_pytorch_grad_cam_scorecam(ref_model, monkeypatch):
    """pytorch-grad-cam weights channels by the softmax over channels of the masked logits
    (Algorithm 1 of the paper), weighting="channel_softmax" here, and makes its masks with
    align_corners=True bilinear upsampling. It also scores constant channels (an all-zero
    mask), which get weight 0 here: with the same masks, their weights restricted to the
    varying channels and renormalised are ours."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    net, x = ref_model
    _, cls = cu.class_scores(net, x)
    maps, weights = _pgc_weights(pgc.ScoreCAM, net, x, cls, net[7])
    ours = cu.score_cam(net, x, weighting="channel_softmax")
    assert cu.rank_correlation(ours, maps).min() >= 0.99

    def corner_aligned(model, layer, input_hw, map_hw=None):
        return tuple(cnnlib.geometry._linear_interpolation_matrix(np.arange(m) * (s - 1) / (m - 1), s)
                     for m, s in zip(map_hw, input_hw))
    monkeypatch.setattr(cu, "cam_upsampling_matrices", corner_aligned)
    _, our_w = cu.score_cam(net, x, weighting="channel_softmax", return_weights=True)
    varies = our_w > 0
    assert varies.sum(axis=1).min() >= 4 and (~varies).any()     # the case matters here
    theirs = np.where(varies, weights, 0.0)
    np.testing.assert_allclose(our_w, theirs / theirs.sum(axis=1, keepdims=True), rtol=1e-3, atol=1e-6)


def test_a_repeated_photo_is_masked_once_and_explained_for_each_class(ref_model, monkeypatch):
    """Score-CAM's masked passes and occlusion's occluded passes do not depend on the class:
    a batch repeating a photo for several classes runs them once per photo, and gives
    each row the map it gets alone."""
    net, x = ref_model
    batch, classes = np.stack([x[0], x[1], x[0], x[0]]), [1, 2, 4, 1]
    passes = []
    forward = cnnlib.torch_engine._TorchEngine.forward
    monkeypatch.setattr(cnnlib.torch_engine._TorchEngine, "forward", lambda self, xb: passes.append(len(xb)) or forward(self, xb))
    for f, kwargs in [(cu.score_cam, {}), (cu.occlusion, dict(window=8, stride=8))]:
        passes.clear()
        together = f(net, batch, classes, normalize=False, **kwargs)
        n_together = sum(passes)
        alone = np.stack([f(net, batch[i:i + 1], c, normalize=False, **kwargs)[0] for i, c in enumerate(classes)])
        np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
        assert n_together < sum(passes) - n_together
    assert n_together == 4 + 2 * 16     # occlusion: clean scores, then 16 windows for each distinct photo


def test_faster_score_cam_masks_the_channels_that_vary_most(ref_model):
    """max_masks=m: per image, the m channels of largest spatial variance keep the weight
    they have in full Score-CAM (each channel's weight depends on its own mask only);
    the others get 0."""
    net, x = ref_model
    kept = {}
    handle = net[7].register_forward_hook(lambda m, i, out: kept.update(a=out.detach().numpy()))
    with torch.no_grad():
        net(nchw(x))
    handle.remove()
    spread = kept["a"].reshape(len(x), kept["a"].shape[1], -1).var(axis=2)      # (N, channels)
    _, full = cu.score_cam(net, x, return_weights=True)
    _, faster = cu.score_cam(net, x, return_weights=True, max_masks=3)
    top = np.argsort(-spread, axis=1, kind="stable")[:, :3]
    expected = np.zeros_like(full)
    np.put_along_axis(expected, top, np.take_along_axis(full, top, axis=1), axis=1)
    assert np.all(np.take_along_axis(spread, top, axis=1) > 0)
    np.testing.assert_allclose(faster, expected, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(cu.score_cam(net, x, max_masks=16), cu.score_cam(net, x))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_masks must be a positive int"):
            cu.score_cam(net, x, max_masks=bad)


# --- the course's VGG16 ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vgg():
    return cu.load_vgg16(pretrained=False, device="cpu")


def test_vgg16_forward_takes_images_in_0_1(vgg):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_allclose(vgg(x).numpy(), vgg.forward_normalized(cu.imagenet_normalize(x)).numpy(),
                                   rtol=1e-5, atol=1e-5)
    # the same random weights and state dict as torchvision's own VGG16
    import torchvision
    torch.manual_seed(cu.DEFAULT_SEED)
    plain = torchvision.models.vgg16(weights=None)
    assert list(plain.state_dict()) == list(vgg.state_dict())
    assert torch.equal(plain.features[0].weight, vgg.features[0].weight)


def test_vgg16_layer_names(vgg):
    x = np.random.default_rng(0).random((1, 64, 64, 3)).astype(np.float32)
    engine = cnnlib.torch_engine._TorchEngine(vgg, "logits")
    assert engine.resolve_layer(None, x) == "features.29"          # relu5_3
    assert engine.resolve_layer("conv5_3", x) == "features.28"
    assert engine.resolve_layer("pool5", x) == "features.30"
    np.testing.assert_array_equal(cu.grad_cam(vgg, x), cu.grad_cam(vgg, x, layer="relu5_3"))
    maps = cu.grad_cam(vgg, x, layer="conv4_3")
    assert maps.shape == (1, 64, 64) and maps.max() == 1.0
    with pytest.raises(ValueError, match="Unknown layer 'conv9_9'.*features.28.*relu5_3"):
        cu.grad_cam(vgg, x, layer="conv9_9")


def test_torch_bad_input():
    net = TorchCNN().eval()
    x = np.zeros((1, 12, 12, 3), np.float32)
    with pytest.raises(ValueError, match="channels"):
        cu.saliency_map(net, np.zeros((1, 3, 12, 12), np.float32))
    with pytest.raises(ValueError, match="empty"):
        cu.grad_cam(net, np.zeros((0, 12, 12, 3), np.float32))
    with pytest.raises(ValueError, match="spatial"):
        cu.grad_cam(net, x, layer="classifier")
    with pytest.raises(ValueError, match=r"0\.\.4"):
        cu.saliency_map(net, x, class_index=5)

    class TwoOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TorchCNN()

        def forward(self, x):
            out = self.net(x)
            return out, out

    with pytest.raises(TypeError, match="one tensor of class scores"):
        cu.grad_cam(TwoOutputs(), x)


# --- what a user hands a PyTorch module by mistake (issue 13, second campaign) -------------------

def small_module(out=5, softmax=False, channels=3):
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(channels, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
              torch.nn.Linear(4 * 5 * 5, out)]
    return torch.nn.Sequential(*layers, *([torch.nn.Softmax(dim=1)] if softmax else [])).eval()


X12 = np.random.default_rng(5).random((2, 12, 12, 3)).astype(np.float32)


def test_a_module_ending_in_softmax_is_explained_on_its_logits():
    net = small_module(softmax=True)
    t = nchw(X12)
    with torch.no_grad():
        logits, probs = net[:-1](t).numpy(), net(t).numpy()
    np.testing.assert_allclose(cu.class_scores(net, X12, 1)[0], logits[:, 1], rtol=1e-5)
    np.testing.assert_allclose(cu.class_scores(net, X12, 1, score="probability")[0], probs[:, 1], rtol=1e-5)
    np.testing.assert_allclose(cu.class_probabilities(net, X12)[0], probs, rtol=1e-5)
    logits_only = net[:-1]
    np.testing.assert_allclose(cu.grad_cam(net, X12, 1), cu.grad_cam(logits_only, X12, 1), atol=1e-6)


@pytest.mark.parametrize("method", METHODS + ["class_scores", "class_probabilities"])
def test_images_of_the_wrong_size_get_a_message_not_a_torch_error(method):
    fn = getattr(cu, method)
    with pytest.raises(ValueError, match=r"cannot run on images of 10 x 10 pixels with 3 channel\(s\).*size"):
        fn(small_module(), X12[:, :10, :10])


def test_one_channel_modules_take_grey_batches_and_the_explorer():
    net = small_module(channels=1)
    grey = X12[..., 0]                                   # (N, H, W): a batch of grey images
    np.testing.assert_allclose(cu.grad_cam(net, grey), cu.grad_cam(net, grey[..., None]), atol=1e-7)
    app = cu.explorer(net, grey[..., None])
    assert "error" not in app.last
    app.controls["method"].value = cu.ACTIVATIONS_METHOD  # feature maps of a module that is not VGG
    assert "error" not in app.last, app.last.get("error")


def test_a_declared_input_range_holds_for_probabilities_and_the_explorer():
    net = cu.set_input_range(small_module(), (-1, 1))
    u8 = np.round(X12 * 255).astype(np.uint8)
    pm1 = u8.astype(np.float32) / 255 * 2 - 1
    with torch.no_grad():
        expected = torch.softmax(net(nchw(pm1)), 1).numpy()
    np.testing.assert_allclose(cu.class_probabilities(net, u8)[0], expected, rtol=1e-5)
    np.testing.assert_allclose(cu.explorer(net, pm1).probabilities, expected, rtol=1e-5)
    with pytest.raises(ValueError, match=r"outside the model's input range \[-1, 1\]"):
        cu.class_probabilities(net, pm1 * 3)


def test_a_one_output_module_gets_two_class_probabilities():
    net = small_module(out=1)
    with torch.no_grad():
        z = net(nchw(X12)).numpy()[:, 0]
    p = 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(cu.class_probabilities(net, X12)[0], np.stack([1 - p, p], 1), rtol=1e-5)


# --- instructors' own modules, third round (issue 22) -------------------------------------------

class SmallNet(torch.nn.Module):
    """conv-BN-ReLU, pool, conv-ReLU, global mean, dropout, linear; ``tail`` after the logits."""

    def __init__(self, tail=None, k=4):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU())
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(8, k)
        self.tail = tail

    def logits(self, x):
        return self.fc(self.drop(self.features(x).mean(dim=(2, 3))))

    def forward(self, x):
        z = self.logits(x)
        return z if self.tail is None else self.tail(z)


class FunctionalSoftmax(SmallNet):
    def forward(self, x):
        return torch.nn.functional.softmax(self.logits(x), dim=1)


def own_images(n=2, size=16, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


def autograd_saliency(fn, x, cls):
    t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    (g,) = torch.autograd.grad(fn(t).gather(1, torch.as_tensor(cls)[:, None]).sum(), t)
    return g.abs().amax(dim=1).numpy()


def test_probabilities_are_recognised_from_their_values():
    x = own_images()
    cls = np.array([0, 2])
    # a softmax in forward: no logits to be had, and "probability" is not a second softmax
    net = FunctionalSoftmax().eval()
    with pytest.raises(ValueError, match="looks like probabilities"):
        cu.saliency_map(net, x, cls)
    got = cu.saliency_map(net, x, cls, score="probability", normalize=False)
    np.testing.assert_allclose(got, autograd_saliency(net, x, cls), rtol=1e-4, atol=1e-9)
    # nn.Softmax followed by nn.Identity: the softmax's input is the logits
    net = SmallNet(tail=torch.nn.Sequential(torch.nn.Softmax(dim=1), torch.nn.Identity())).eval()
    got = cu.saliency_map(net, x, cls, normalize=False)
    np.testing.assert_allclose(got, autograd_saliency(net.logits, x, cls), rtol=1e-4, atol=1e-9)
    scores, _ = cu.class_scores(net, x, cls, score="probability")
    with torch.no_grad():
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()[np.arange(2), cls]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_a_call_keeps_each_submodules_train_eval_flag():
    net = SmallNet()
    net.train()
    net.features[1].eval()          # a BatchNorm the user froze
    before = {name: m.training for name, m in net.named_modules()}
    for f in (cu.saliency_map, cu.grad_cam, cu.score_cam):
        f(net, own_images())
        assert {name: m.training for name, m in net.named_modules()} == before, f.__name__


def test_all_parameters_frozen_still_give_cams():
    x = own_images()
    net = SmallNet().eval()
    expected = cu.grad_cam(net, x, layer="features.2", normalize=False)
    for p in net.parameters():
        p.requires_grad_(False)
    np.testing.assert_allclose(cu.grad_cam(net, x, layer="features.2", normalize=False), expected, rtol=1e-5)
    assert not any(p.requires_grad for p in net.parameters())


def test_torchscript_models_get_gradients_and_a_clear_refusal_for_cams():
    x = own_images()
    net = SmallNet().eval()
    scripted = torch.jit.script(net)
    np.testing.assert_allclose(cu.saliency_map(scripted, x), cu.saliency_map(net, x), rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError, match="TorchScript.*original nn.Module"):
        cu.grad_cam(scripted, x)


def test_a_tensor_that_requires_grad_is_an_image_batch():
    x = own_images()
    net = SmallNet().eval()
    t = torch.from_numpy(x).requires_grad_(True)
    np.testing.assert_array_equal(cu.saliency_map(net, t), cu.saliency_map(net, x))


class Reordered(torch.nn.Module):
    """Registered pool, conv, conv2, act; forward runs conv, act, pool, conv2, act (act shared)."""

    def __init__(self):
        super().__init__()
        self.pool = torch.nn.MaxPool2d(2)
        self.conv = torch.nn.Conv2d(3, 4, 5, padding=2)
        self.conv2 = torch.nn.Conv2d(4, 4, 3)
        self.act = torch.nn.ReLU()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.conv2(self.pool(self.act(self.conv(x)))))
        return self.fc(h.mean(dim=(2, 3)))


class Sliced(torch.nn.Module):
    """Looks at x[:, :, 4:, 4:] only."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c1(x[:, :, 4:, 4:])).mean(dim=(2, 3)))


class Excited(torch.nn.Module):
    """conv, a squeeze-excite gate (as torchvision's: a pooling module, two 1x1 convs), then a
    strided conv, BN, ReLU."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze = torch.nn.AdaptiveAvgPool2d(1)
        self.fc1 = torch.nn.Conv2d(8, 2, 1)
        self.fc2 = torch.nn.Conv2d(2, 8, 1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.act = torch.nn.ReLU()
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(self.squeeze(h)))))
        h = self.act(self.bn(self.c2(h * gate)))
        return self.fc(h.mean(dim=(2, 3)))


class MeanGate(torch.nn.Module):
    """A channel gate written with tensor methods: h * sigmoid(conv(h.mean((2, 3), keepdim=True)))."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.g = torch.nn.Conv2d(4, 4, 1)
        self.c2 = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = h * torch.sigmoid(self.g(h.mean((2, 3), keepdim=True)))
        return self.fc(torch.relu(self.c2(h)).mean((2, 3)))


@pytest.mark.parametrize("net, layer, cells, first, stride", [
    (MeanGate, "c2", 8, 0.0, 2),
    (Reordered, "conv", 16, 0.0, 1), (Reordered, "act", 6, 2.5, 2),      # act: its last call
    (Sliced, "c1", 12, 4.0, 1), (Excited, "c2", 8, 0.0, 2), (Excited, "act", 8, 0.0, 2)])
def test_receptive_fields_follow_the_forward_pass(net, layer, cells, first, stride):
    """Centres worked out by hand from the forward pass, not from the registration order."""
    rf = cu.receptive_fields(net().eval(), layer, (16, 16))
    np.testing.assert_allclose(rf.y.centres, first + stride * np.arange(cells))
    np.testing.assert_allclose(rf.x.centres, first + stride * np.arange(cells))


def test_cams_after_a_squeeze_excite_gate_and_the_default_block_output():
    x = own_images()
    net = Excited().eval()
    kept = {}
    handle = net.act.register_forward_hook(lambda m, i, o: kept.update(a=o))
    t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    z = net(t)
    handle.remove()
    cls = z.argmax(1)
    (g,) = torch.autograd.grad(z.gather(1, cls[:, None]).sum(), kept["a"])
    _, w = cu.grad_cam(net, x, layer="act", return_weights=True)
    np.testing.assert_allclose(w, g.mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-8)
    assert cnnlib.torch_engine._TorchEngine(net, "logits").resolve_layer(None, x) == "act"
    # torchvision's ResNet: the default is the last block's output, after the add and its ReLU
    import torchvision

    resnet = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    x32 = own_images(1, 32)
    assert cnnlib.torch_engine._TorchEngine(resnet, "logits").resolve_layer(None, x32) == "layer4.1.relu"
    np.testing.assert_allclose(cu.grad_cam(resnet, x32, return_weights=True)[1],
                               cu.grad_cam(resnet, x32, layer="layer4", return_weights=True)[1], rtol=1e-5)
