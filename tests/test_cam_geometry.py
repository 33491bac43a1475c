"""CAM geometry: where a feature-map cell sits in the input (``receptive_fields``,
``cam_upsampling_matrices``).

Checked three ways: by hand for the course CNN; against an independent, empirical
measurement (light one pixel at a time in a network of all-ones kernels and see which
units respond) for Keras and PyTorch chains of every padding, stride and dilation; and on
a network whose Grad-CAM is known by construction (identity kernels, one bright pixel).
"""
import numpy as np
import pytest

import cnn_utils as cu

torch = pytest.importorskip("torch")  # conftest imports torch before TensorFlow


def _keras():
    return cu._keras()


# --- the course CNN, worked by hand ---------------------------------------------------------

def test_course_cnn_geometry_by_hand(mnist_model):
    """conv1 3x3 valid -> pool 2 -> conv2 3x3 valid -> pool 2 -> conv3 3x3 valid, per axis:
    centres 1+j -> 1.5+2j -> 3.5+2j -> 4.5+4j -> 8.5+4j; sizes 3, 4, 8, 10, 18.
    conv3's last unit spans 16.5 +- 9 = pixels 8..25, so pixels 26 and 27 are seen by none."""
    expected = {"conv1": (1.0, 1, 3), "pool1": (1.5, 2, 4), "conv2": (3.5, 2, 8),
                "pool2": (4.5, 4, 10), "conv3": (8.5, 4, 18)}
    for name, (start, stride, size) in expected.items():
        rf = cu.receptive_fields(mnist_model, name)
        n = mnist_model.get_layer(name).output.shape[1]
        for axis in (rf.y, rf.x):
            np.testing.assert_array_equal(axis.centres, start + stride * np.arange(n))
            assert (axis.stride, axis.size) == (stride, size)
    rf = cu.receptive_fields(mnist_model, "conv3")
    np.testing.assert_array_equal(rf.y.centres, [8.5, 12.5, 16.5])
    np.testing.assert_array_equal(np.flatnonzero(~rf.y.seen), [26, 27])
    assert rf.seen.shape == (28, 28) and rf.seen.sum() == 26 * 26
    assert cu.receptive_fields(mnist_model, "conv1").seen.all()


def test_course_cnn_upsampling_matrices(mnist_model):
    r_y, r_x = cu.cam_upsampling_matrices(mnist_model, "conv3", (28, 28))
    np.testing.assert_array_equal(r_y, r_x)
    assert r_y.shape == (28, 3) and r_y.dtype == np.float32
    np.testing.assert_array_equal(r_y[:9], [[1, 0, 0]] * 9)              # up to the first centre 8.5
    np.testing.assert_allclose(r_y[9:13, :2], [[.875, .125], [.625, .375], [.375, .625], [.125, .875]])
    np.testing.assert_array_equal(r_y[17:26], [[0, 0, 1]] * 9)           # from 16.5 to the last seen pixel
    np.testing.assert_array_equal(r_y[26:], 0)                           # seen by no unit: 0
    np.testing.assert_allclose(r_y[:26].sum(axis=1), 1, rtol=1e-6)
    # The naive placement (bilinear resizing) puts the same cells at 4.17 / 13.5 / 22.8.
    naive_y, _ = cu.naive_upsampling_matrices((3, 3), (28, 28))
    assert np.argmax(naive_y[:, 2]) == 23 and np.argmax(r_y[:, 2]) == 17


# --- empirical receptive fields: one bright pixel at a time ---------------------------------

def _measured_keras(model, hw):
    """(h, w, H, W) bool: unit (i, j) responds to a bright pixel at (p, q)."""
    H, W = hw
    probes = np.zeros((H * W, H, W, 1), np.float32)
    probes[np.arange(H * W), np.repeat(np.arange(H), W), np.tile(np.arange(W), H), 0] = 1.0
    out = np.asarray(model.predict(probes, verbose=0))[..., 0]       # (H*W, h, w)
    return np.moveaxis(out > 0, 0, -1).reshape(out.shape[1:] + (H, W))


def _measured_torch(module, hw):
    H, W = hw
    probes = torch.zeros(H * W, 1, H, W)
    probes[torch.arange(H * W), 0, torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)] = 1.0
    with torch.no_grad():
        out = module(probes)[:, 0].numpy()
    return np.moveaxis(out > 0, 0, -1).reshape(out.shape[1:] + (H, W))


def _check_against_measurement(rf, seen_by_unit, hw):
    """Every unit's response lies inside its traced receptive field, fills it to both ends
    where that field lies inside the image, and the union of responses is ``rf.seen``."""
    H, W = hw
    h, w = seen_by_unit.shape[:2]
    assert (len(rf.y.centres), len(rf.x.centres)) == (h, w)
    inside = 0
    for i in range(h):
        for j in range(w):
            rows = np.flatnonzero(seen_by_unit[i, j].any(axis=1))
            cols = np.flatnonzero(seen_by_unit[i, j].any(axis=0))
            if not rows.size:   # a unit made of explicit padding (ZeroPad2d) sees nothing
                continue
            for idx, c, axis, n in ((rows, rf.y.centres[i], rf.y, H), (cols, rf.x.centres[j], rf.x, W)):
                lo, hi = c - (axis.size - 1) / 2, c + (axis.size - 1) / 2
                assert lo <= idx.min() and idx.max() <= hi, (i, j, idx, lo, hi)
                if lo >= 0:
                    assert idx.min() == lo
                if hi <= n - 1:
                    assert idx.max() == hi
                inside += lo >= 0 and hi <= n - 1
    assert inside >= 2       # some receptive fields lie wholly inside and were matched exactly
    np.testing.assert_array_equal(seen_by_unit.any(axis=(0, 1)), rf.seen)


def _keras_chain(specs, hw, merge=False):
    """A Keras model of all-ones kernels (no bias) from ``specs``: (kind, kwargs) pairs."""
    keras = _keras()
    L = keras.layers
    inp = keras.Input(hw + (1,), name="image")
    x = inp
    for n, (kind, kw) in enumerate(specs):
        if kind == "conv":
            x = L.Conv2D(1, kernel_initializer="ones", use_bias=False, name=f"l{n}", **kw)(x)
        elif kind == "max":
            x = L.MaxPooling2D(name=f"l{n}", **kw)(x)
        elif kind == "avg":
            x = L.AveragePooling2D(name=f"l{n}", **kw)(x)
        elif kind == "pad":
            x = L.ZeroPadding2D(name=f"l{n}", **kw)(x)
        elif kind == "crop":
            x = L.Cropping2D(name=f"l{n}", **kw)(x)
        elif kind == "relu":
            x = L.ReLU(name=f"l{n}")(x)
    if merge:  # a residual-style branch of the same geometry: 3x3 same + 1x1
        a = L.Conv2D(1, 3, padding="same", kernel_initializer="ones", use_bias=False, name="branch_a")(x)
        b = L.Conv2D(1, 1, kernel_initializer="ones", use_bias=False, name="branch_b")(x)
        x = L.Add(name="merged")([L.BatchNormalization(name="bn")(a), b])
    return keras.Model(inp, x)


KERAS_CHAINS = {
    "course_cnn": ([("conv", dict(kernel_size=3)), ("relu", {}), ("max", dict(pool_size=2)),
                    ("conv", dict(kernel_size=3)), ("max", dict(pool_size=2)),
                    ("conv", dict(kernel_size=3))], (28, 28), False),
    "same_strided_dilated": ([("conv", dict(kernel_size=3, strides=2, padding="same")),
                              ("conv", dict(kernel_size=5, dilation_rate=2, padding="same")),
                              ("avg", dict(pool_size=3, strides=2, padding="same")),
                              ("conv", dict(kernel_size=(4, 2), strides=(3, 1)))], (61, 47), False),
    "even_kernels_same": ([("conv", dict(kernel_size=2, padding="same")),
                           ("conv", dict(kernel_size=4, strides=2, padding="same")),
                           ("max", dict(pool_size=3, strides=2))], (23, 20), False),
    "pad_crop_merge": ([("pad", dict(padding=((1, 2), (0, 3)))), ("conv", dict(kernel_size=3)),
                        ("crop", dict(cropping=((2, 0), (1, 1)))), ("max", dict(pool_size=2))],
                       (19, 17), True),
    "stride_beyond_kernel": ([("conv", dict(kernel_size=2, strides=4)),
                              ("conv", dict(kernel_size=3, dilation_rate=2))], (26, 26), False),
}


@pytest.mark.parametrize("chain", sorted(KERAS_CHAINS))
def test_keras_geometry_matches_measurement(chain):
    specs, hw, merge = KERAS_CHAINS[chain]
    model = _keras_chain(specs, hw, merge)
    layer = model.layers[-1].name
    rf = cu.receptive_fields(model, layer)
    _check_against_measurement(rf, _measured_keras(model, hw), hw)
    if chain == "stride_beyond_kernel":   # a stride larger than the kernel leaves holes
        assert not rf.y.seen.all() and rf.y.seen[:2].all() and not rf.y.seen[2:4].any()


def _torch_chain():
    nn = torch.nn
    return {
        "valid": nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(1, 1, 3, dilation=2),
                               nn.BatchNorm2d(1), nn.AvgPool2d(3, stride=2), nn.Conv2d(1, 1, (2, 3), stride=(1, 2))),
        "padded": nn.Sequential(nn.Conv2d(1, 1, 5, stride=2, padding=(1, 3)), nn.ReLU(inplace=True),
                                nn.MaxPool2d(3, stride=2, padding=1, dilation=1, ceil_mode=True),
                                nn.Conv2d(1, 1, 3, padding="same", dilation=2), nn.ZeroPad2d((1, 0, 2, 1)),
                                nn.AvgPool2d(2, ceil_mode=True)),
        "vgg_like": nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 1, 3, padding=1),
                                  nn.MaxPool2d(2, 2), nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(),
                                  nn.MaxPool2d(2, 2), nn.Conv2d(1, 1, 3, padding=1)),
    }


@pytest.mark.parametrize("chain", ["valid", "padded", "vgg_like"])
def test_torch_geometry_matches_measurement(chain):
    net = _torch_chain()[chain]
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
    net.eval()
    hw = (61, 47) if chain == "padded" else (31, 26)
    last = str(len(net) - 1)
    rf = cu.receptive_fields(net, last, hw)
    _check_against_measurement(rf, _measured_torch(net, hw), hw)


def test_same_padded_vgg_like_chain_equals_naive_resizing():
    net = _torch_chain()["vgg_like"]
    for hw in [(28, 28), (32, 24)]:
        for name, h_div in (("0", 1), ("3", 2), ("7", 4)):
            map_hw = (hw[0] // h_div, hw[1] // h_div)
            aligned = cu.cam_upsampling_matrices(net, name, hw, map_hw=map_hw)
            naive = cu.naive_upsampling_matrices(map_hw, hw)
            for a, b in zip(aligned, naive):
                np.testing.assert_allclose(a, b, atol=1e-6)


def test_course_vgg16_equals_naive_resizing():
    vgg = cu.load_vgg16(pretrained=False, device="cpu")     # torchvision's VGG16, [0, 1] input
    for name, size in (("features.3", 224), ("features.22", 28), ("features.29", 14), ("features.30", 7)):
        rf = cu.receptive_fields(vgg, name, (224, 224))
        assert len(rf.y.centres) == size and rf.seen.all()
        aligned = cu.cam_upsampling_matrices(vgg, name, (224, 224))
        for a, b in zip(aligned, cu.naive_upsampling_matrices((size, size), (224, 224))):
            np.testing.assert_allclose(a, b, atol=1e-6)
    rf = cu.receptive_fields(vgg, "features", (224, 224))   # a container: up to its last module
    assert (rf.y.stride, rf.y.size, rf.y.centres[0]) == (32, 212, 15.5)
    # the adaptive pooling to 7 x 7 is the identity on 224 x 224 images, uneven windows on 200 x 200
    avg = cu.receptive_fields(vgg, "avgpool", (224, 224))
    np.testing.assert_array_equal(avg.y.centres, rf.y.centres)
    assert (avg.y.stride, avg.y.size) == (rf.y.stride, rf.y.size)
    with pytest.raises(ValueError, match="adaptive pooling from 6x6 to 7x7.*'avgpool' \\(AdaptiveAvgPool2d\\)"):
        cu.receptive_fields(vgg, "avgpool", (200, 200))


def test_torch_valid_chain_equals_keras_chain():
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3, dilation=2),
                        nn.AvgPool2d(3, stride=2), nn.Conv2d(2, 2, 3, stride=2))
    model = _keras_chain([("conv", dict(kernel_size=3)), ("relu", {}), ("max", dict(pool_size=2)),
                          ("conv", dict(kernel_size=3, dilation_rate=2)),
                          ("avg", dict(pool_size=3, strides=2)), ("conv", dict(kernel_size=3, strides=2))],
                         (45, 38))
    a = cu.receptive_fields(net, "5", (45, 38))
    b = cu.receptive_fields(model, model.layers[-1].name)
    for ga, gb in zip(a, b):
        np.testing.assert_array_equal(ga.centres, gb.centres)
        assert (ga.size, ga.stride) == (gb.size, gb.stride)
        np.testing.assert_array_equal(ga.seen, gb.seen)
    assert not a.seen.all()
    for ma, mb in zip(cu.cam_upsampling_matrices(net, "5", (45, 38)),
                      cu.cam_upsampling_matrices(model, model.layers[-1].name, (45, 38))):
        np.testing.assert_array_equal(ma, mb)


# --- a model whose Grad-CAM is known by construction -----------------------------------------

def _identity_model(hw, specs):
    """Single-channel 3x3 convolutions with only the centre tap set (shifts), max pools,
    then one logit = the sum of the last feature map. For class 0, d logit / d A = 1, so
    every Grad-CAM weight is 1 and the CAM is the last feature map itself."""
    keras = _keras()
    chain = _keras_chain(specs, hw)
    logits = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", name="logits")(
        keras.layers.Flatten()(chain.outputs[0]))
    model = keras.Model(chain.inputs, logits)
    kernel = np.zeros((3, 3, 1, 1), np.float32)
    kernel[1, 1] = 1.0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            layer.set_weights([kernel])
    return model, chain.layers[-1].name


def _grad_cam_lowres(model, layer, image):
    """Grad-CAM at the layer's resolution, from its definition."""
    tf, keras = cu._tf(), _keras()
    sub = keras.Model(model.inputs, [model.get_layer(layer).output, model.outputs[0]])
    with tf.GradientTape() as tape:
        feats, scores = sub(image[None])
        score = scores[:, 0]
    grads = tape.gradient(score, feats)
    weights = tf.reduce_mean(grads, axis=(1, 2))
    return tf.nn.relu(tf.einsum("nhwk,nk->nhw", feats, weights))[0].numpy()


def _bright_pixel_cams(model, layer, hw, pixel, lit_cell):
    """Grad-CAM of an image with one bright ``pixel``, which lights ``lit_cell`` alone;
    returns the map brought to the input by receptive-field centres and by naive resizing."""
    image = np.zeros(hw + (1,), np.float32)
    image[pixel] = 1.0
    cam = _grad_cam_lowres(model, layer, image)
    np.testing.assert_array_equal(np.argwhere(cam > 0), [lit_cell])
    r_y, r_x = cu.cam_upsampling_matrices(model, layer, hw)
    n_y, n_x = cu.naive_upsampling_matrices(cam.shape, hw)
    return r_y @ cam @ r_x.T, n_y @ cam @ n_x.T


def test_grad_cam_peak_falls_on_the_bright_pixel():
    """21x21 input, three valid 3x3 shifts (the last two with stride 2): unit (a, b) of the
    last layer copies pixel (4a + 4, 4b + 4), its receptive-field centre. A bright pixel
    at (12, 8) lights unit (2, 1) only."""
    model, layer = _identity_model((21, 21), [("conv", dict(kernel_size=3)),
                                                     ("conv", dict(kernel_size=3, strides=2)),
                                                     ("conv", dict(kernel_size=3, strides=2))])
    np.testing.assert_array_equal(cu.receptive_fields(model, layer).y.centres, [4, 8, 12, 16])
    aligned, naive = _bright_pixel_cams(model, layer, (21, 21), (12, 8), (2, 1))
    assert aligned[12, 8] == aligned.max() == 1.0 and (aligned == 1.0).sum() == 1
    assert tuple(np.unravel_index(np.argmax(naive), naive.shape)) == (13, 7)   # one pixel off on each axis


def test_course_architecture_bright_pixel_is_where_the_aligned_map_is_high():
    """The course CNN's geometry (valid 3x3 convs, 2x2 pools) with shift kernels: a bright
    pixel at (16, 8) lights conv3's cell (2, 0) alone (centres 16.5 and 8.5). The aligned map
    holds 0.875 of its peak there; bilinear resizing, centring that cell at (22.8, 4.2),
    holds 0.16 of it and peaks 7 rows further down."""
    model, layer = _identity_model((28, 28), KERAS_CHAINS["course_cnn"][0])
    aligned, naive = _bright_pixel_cams(model, layer, (28, 28), (16, 8), (2, 0))
    assert aligned[16, 8] / aligned.max() == pytest.approx(0.875)
    assert naive[16, 8] / naive.max() < 0.2
    assert np.argwhere(naive == naive.max())[:, 0].min() == 23
    assert aligned[26:].max() == 0 and aligned[:, 26:].max() == 0      # seen by no unit


def test_nested_base_model():
    """Sequential([base, pooling, head]): the layers inside the base are traced from its input."""
    keras = _keras()
    inp = keras.Input((12, 12, 1))
    h = keras.layers.Conv2D(2, 3, name="c1")(inp)
    h = keras.layers.MaxPooling2D(2, name="p1")(h)
    base = keras.Model(inp, keras.layers.Conv2D(2, 3, name="c2")(h), name="base")
    model = keras.Sequential([base, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    rf = cu.receptive_fields(model, "c2")
    np.testing.assert_array_equal(rf.y.centres, [3.5, 5.5, 7.5])     # 1 -> 1.5 + 2j -> 3.5 + 2j
    assert (rf.y.size, rf.y.stride) == (8, 2) and rf.seen.all()


# --- errors ------------------------------------------------------------------------------------

def test_errors(mnist_model):
    with pytest.raises(ValueError, match="'dense1'.*Flatten"):
        cu.receptive_fields(mnist_model, "dense1")
    with pytest.raises(TypeError, match="Keras model or a PyTorch"):
        cu.receptive_fields("mnist", "conv3")
    with pytest.raises(ValueError, match="Unknown layer"):
        cu.receptive_fields(mnist_model, "conv9")
    with pytest.raises(ValueError, match="input_hw"):
        cu.cam_upsampling_matrices(mnist_model, "conv3", (28,))
    with pytest.raises(ValueError, match="predicts 3x3"):
        cu.cam_upsampling_matrices(mnist_model, "conv3", (28, 28), map_hw=(4, 4))
    keras = _keras()
    inp = keras.Input((12, 12, 1))
    a = keras.layers.Conv2D(1, 3, name="a")(inp)
    b = keras.layers.Conv2D(1, 3, padding="same", name="b")(keras.layers.Cropping2D(((2, 0), (2, 0)))(inp))
    bad = keras.Model(inp, keras.layers.Add(name="add")([a, b]))
    cu.receptive_fields(bad, "a")
    with pytest.raises(ValueError, match="different input positions"):
        cu.receptive_fields(bad, "add")
    resized = keras.Model(inp, keras.layers.Resizing(6, 6, name="resize")(inp))
    with pytest.raises(ValueError, match="Resizing"):
        cu.receptive_fields(resized, "resize")
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Upsample(scale_factor=2), nn.Conv2d(1, 1, 3))
    cu.receptive_fields(net, "0", (10, 10))
    with pytest.raises(ValueError, match="Upsample"):
        cu.receptive_fields(net, "2", (10, 10))
    with pytest.raises(ValueError, match="input_hw is required"):
        cu.receptive_fields(net, "0")
    with pytest.raises(ValueError, match="Unknown module"):
        cu.receptive_fields(net, "features.3", (10, 10))
    with pytest.raises(ValueError, match="predicts 8x8, so its geometry is unknown"):
        cu.cam_upsampling_matrices(net, "0", (10, 10), map_hw=(10, 10))
