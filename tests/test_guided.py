"""cnn_utils.guided_backprop / guided_grad_cam / hires_cam: Guided Backprop / Guided Grad-CAM against captum, HiResCAM against
pytorch-grad-cam, the same numbers from Keras and PyTorch, and the user's model left unchanged.
Tolerance: float32 gradients of the same network, 1e-5 relative (1e-6 absolute)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cnn_utils  # noqa: E402


def small_cnn(seed=0, inplace=False, head="flatten"):
    torch.manual_seed(seed)
    layers = [torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(inplace=inplace), torch.nn.MaxPool2d(2),
              torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(inplace=inplace)]
    if head == "flatten":
        layers += [torch.nn.Flatten(), torch.nn.Linear(8 * 7 * 7, 10)]
    else:
        layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)]
    return torch.nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).random((4, 14, 14, 1)).astype(np.float32)


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("inplace", [False, True])
def test_guided_backprop_equals_captum_and_removes_its_hooks(x, inplace):
    captum = pytest.importorskip("captum.attr")
    model = small_cnn(inplace=inplace)
    y = [1, 3, 5, 7]
    ours = cnn_utils.guided_backprop(model, x, y, normalize=False)
    theirs = captum.GuidedBackprop(small_cnn(inplace=inplace)).attribute(nchw(x), target=y)
    np.testing.assert_allclose(ours, theirs.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)
    assert all(not m._forward_hooks for m in model.modules())
    assert not np.allclose(ours, _plain_gradient(model, x, y)), "guided differs from the plain gradient"


def _plain_gradient(model, x, y):
    t = nchw(x).requires_grad_()
    (g,) = torch.autograd.grad(model(t)[range(len(y)), y].sum(), t)
    return g.numpy().transpose(0, 2, 3, 1)


def test_guided_grad_cam_equals_captum_on_a_full_resolution_layer(x):
    captum = pytest.importorskip("captum.attr")
    model = small_cnn()
    y = [0, 2, 4, 6]
    ours = cnn_utils.guided_grad_cam(model, x, y, layer="1", normalize=False)
    theirs = captum.GuidedGradCam(model, model[1]).attribute(nchw(x), target=y)
    np.testing.assert_allclose(ours, theirs.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)


def test_hires_cam_equals_pytorch_grad_cam_and_grad_cam_on_a_gap_head(x):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    import cnn_utils

    model = small_cnn()
    y = [1, 2, 3, 4]
    ours = cnn_utils.hires_cam(model, x, y, layer="1")
    with pgc.HiResCAM(model=model, target_layers=[model[1]]) as cam:
        theirs = cam(input_tensor=nchw(x), targets=[ClassifierOutputTarget(c) for c in y])
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    gap = small_cnn(head="gap")
    np.testing.assert_allclose(cnn_utils.hires_cam(gap, x, y, layer="4"), cnn_utils.grad_cam(gap, x, y, layer="4"),
                               atol=1e-5)
    flat = cnn_utils.grad_cam(model, x, y, layer="4")
    assert np.abs(cnn_utils.hires_cam(model, x, y, layer="4") - flat).max() > 0.05, "differ behind Flatten"


def keras_twin(model):
    keras = pytest.importorskip("keras")
    inp = keras.Input((14, 14, 1))
    c1 = keras.layers.Conv2D(4, 3, padding="same", activation="relu")
    c2 = keras.layers.Conv2D(8, 3, padding="same")
    d = keras.layers.Dense(10, name="logits")
    h = keras.layers.ReLU()(c2(keras.layers.MaxPooling2D(2)(c1(inp))))
    k = keras.Model(inp, d(keras.layers.Flatten()(h)))
    for ck, ct in ((c1, model[0]), (c2, model[3])):
        ck.set_weights([ct.weight.detach().numpy().transpose(2, 3, 1, 0), ct.bias.detach().numpy()])
    w = model[6].weight.detach().numpy().reshape(10, 8, 7, 7).transpose(2, 3, 1, 0).reshape(-1, 10)
    d.set_weights([w, model[6].bias.detach().numpy()])
    return k


def test_keras_gives_the_same_guided_maps_and_is_left_unchanged(x):
    import cnn_utils

    model = small_cnn()
    k = keras_twin(model)
    y = [1, 3, 5, 7]
    before = cnn_utils.saliency_map(k, x, y, normalize=False)
    ours = cnn_utils.guided_backprop(k, x, y, normalize=False)
    np.testing.assert_allclose(ours, cnn_utils.guided_backprop(model, x, y, normalize=False), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cnn_utils.guided_grad_cam(k, x, y), cnn_utils.guided_grad_cam(model, x, y, layer="4"),
                               atol=1e-4)
    np.testing.assert_allclose(cnn_utils.saliency_map(k, x, y, normalize=False), before)
    assert k.layers[1].activation.__name__ == "relu"
    k.layers[-1].set_weights([w * 0 for w in k.layers[-1].get_weights()])     # new weights reach the clone
    assert np.all(cnn_utils.guided_backprop(k, x, y, normalize=False) == 0)


def test_bad_input():
    model = small_cnn()
    with pytest.raises(ValueError, match="layer"):
        cnn_utils.guided_backprop(model, np.zeros((1, 14, 14, 1), np.float32), layer="1")
    with pytest.raises(TypeError, match="normalize"):
        cnn_utils.guided_grad_cam(model, np.zeros((1, 14, 14, 1), np.float32), normalize="yes")
