"""PyTorch part of cnn_utils: VGG16 loading, pre-processing, feature inversion.

PyTorch only: this file never imports TensorFlow (conftest imports torch and
torchvision first; see the README's known trap).
"""

import cnnlib.vgg16
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

import cnn_utils  # noqa: E402


def wrong_axes_tv(x, beta=2):
    """The widely copied total variation: it differences axes 1 and 2 of an (N, C, H, W)
    tensor, i.e. channels and rows, instead of rows and columns."""
    to_check = x[:, :-1, :-1]
    one_bottom = x[:, 1:, :-1]
    one_right = x[:, :-1, 1:]
    return (((to_check - one_bottom) ** 2 + (to_check - one_right) ** 2) ** (beta / 2)).sum()


def columns_only_image():
    """One channel, 3 x 3, columns 0, 1, 3: varies along the columns only."""
    return torch.tensor([[0.0, 1.0, 3.0]] * 3).reshape(1, 1, 3, 3)


def channels_only_image():
    """Spatially constant, but each of the 3 channels holds another value."""
    return torch.tensor([0.0, 1.0, 5.0]).reshape(1, 3, 1, 1).expand(1, 3, 4, 4).clone()


class TinyNet(torch.nn.Module):
    """A small network with VGG's layout: `features` is an nn.Sequential."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(inplace=True),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(inplace=True),
        )


@pytest.fixture(scope="session")
def random_vgg16():
    return cnn_utils.load_vgg16(pretrained=False, device="cpu")


@pytest.fixture(scope="session")
def chelsea():
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.chelsea()


# --- total variation -------------------------------------------------------

def test_tv_of_an_image_varying_along_columns_is_the_hand_value():
    # rows 0 and 1 (the last row and column are not anchors): column steps 1 and 2
    # beta=2: 2 rows x (1^2 + 2^2) = 10; beta=1: 2 rows x (1 + 2) = 6
    x = columns_only_image()
    assert float(cnn_utils.total_variation_norm(x, beta=2)) == pytest.approx(10.0)
    assert float(cnn_utils.total_variation_norm(x, beta=1)) == pytest.approx(6.0, abs=1e-3)
    # the same along the rows (transposed)
    assert float(cnn_utils.total_variation_norm(x.transpose(2, 3), beta=2)) == pytest.approx(10.0)


def test_tv_mixes_both_directions_per_pixel():
    # x[i, j] = i + j: at each of the 4 anchors both steps are 1, so (1 + 1)^(beta/2)
    x = (torch.arange(3.0).view(3, 1) + torch.arange(3.0).view(1, 3)).reshape(1, 1, 3, 3)
    assert float(cnn_utils.total_variation_norm(x, beta=1)) == pytest.approx(4 * np.sqrt(2), abs=1e-3)
    assert float(cnn_utils.total_variation_norm(x, beta=2)) == pytest.approx(8.0)


def test_tv_is_zero_for_a_spatially_constant_image_with_different_channels():
    x = channels_only_image()
    assert float(cnn_utils.total_variation_norm(x, beta=2)) == 0.0
    assert float(cnn_utils.total_variation_norm(x, beta=1)) == 0.0
    assert float(cnn_utils.total_variation_norm(x[0], beta=2)) == 0.0  # (C, H, W) as well


def test_the_tv_cases_catch_the_wrong_axes_implementation():
    assert float(wrong_axes_tv(columns_only_image())) == 0.0      # should be 10
    assert float(wrong_axes_tv(channels_only_image())) > 0.0      # should be 0


def test_tv_gradient_stays_finite_for_beta_below_two():
    x = channels_only_image().requires_grad_(True)
    cnn_utils.total_variation_norm(x, beta=1).backward()
    assert torch.isfinite(x.grad).all()


# --- alpha norm and the relative Euclidean loss -----------------------------

def test_alpha_norm_with_odd_alpha_uses_absolute_values():
    x = torch.tensor([-2.0, 1.0, -1.0])
    assert float(cnn_utils.alpha_norm(x, 3)) == pytest.approx(8 + 1 + 1)   # not -8 + 1 - 1
    assert float(cnn_utils.alpha_norm(x, 1)) == pytest.approx(4.0)
    assert float(cnn_utils.alpha_norm(x, 6)) == pytest.approx(64 + 1 + 1)


def test_euclidian_loss_hand_value_zero_and_scale_invariance():
    a = torch.tensor([3.0, 4.0])
    b = torch.tensor([3.0, 0.0])
    assert float(cnn_utils.euclidian_loss(a, b)) == pytest.approx(16 / 25)
    assert float(cnn_utils.euclidian_loss(a, a.clone())) == 0.0
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    ref = float(cnn_utils.euclidian_loss(x, y))
    for k in (0.01, 3.0, -7.0):
        assert float(cnn_utils.euclidian_loss(k * x, k * y)) == pytest.approx(ref, rel=1e-5)


# --- pre-processing ----------------------------------------------------------

def test_recreate_image_inverts_preprocess_image(chelsea):
    from PIL import Image

    x = cnn_utils.preprocess_image(chelsea, size=(40, 56))
    assert tuple(x.shape) == (1, 3, 40, 56) and x.dtype == torch.float32
    expected = np.asarray(Image.fromarray(chelsea).resize((56, 40), Image.Resampling.BICUBIC))
    back = cnn_utils.recreate_image(x)
    assert back.dtype == np.uint8 and back.shape == (40, 56, 3)
    assert np.abs(back.astype(int) - expected.astype(int)).max() <= 1


def test_preprocess_normalises_with_imagenet_statistics():
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0] = 255
    x = cnn_utils.preprocess_image(img, size=8)
    mean, std = cnn_utils.IMAGENET_MEAN, cnn_utils.IMAGENET_STD
    assert float(x[0, 0, 3, 3]) == pytest.approx((1 - mean[0]) / std[0], abs=1e-5)
    assert float(x[0, 2, 3, 3]) == pytest.approx((0 - mean[2]) / std[2], abs=1e-5)


def test_imagenet_normalize_and_denormalize_by_hand():
    x = torch.zeros(2, 3, 2, 2)
    x[:, 0] = 1.0                                     # red 1, green and blue 0
    y = cnn_utils.imagenet_normalize(x)
    mean, std = cnn_utils.IMAGENET_MEAN, cnn_utils.IMAGENET_STD
    assert float(y[1, 0, 1, 1]) == pytest.approx((1 - mean[0]) / std[0])
    assert float(y[0, 2, 0, 1]) == pytest.approx(-mean[2] / std[2])
    torch.testing.assert_close(cnn_utils.imagenet_normalize(x[0]), y[0])          # (3, H, W) as well
    torch.testing.assert_close(cnn_utils.imagenet_denormalize(y), x, rtol=0, atol=1e-6)
    assert cnn_utils.imagenet_normalize(x.double()).dtype == torch.float64
    with pytest.raises(ValueError, match=r"x must be RGB images.*got shape \(2, 1, 2, 2\)"):
        cnn_utils.imagenet_normalize(torch.zeros(2, 1, 2, 2))
    with pytest.raises(TypeError, match="x must be a torch tensor"):
        cnn_utils.imagenet_denormalize(np.zeros((3, 2, 2)))


def test_preprocess_accepts_path_pil_float_and_grey(tmp_path, chelsea):
    from PIL import Image

    path = tmp_path / "cat.png"
    Image.fromarray(chelsea).save(path)
    from_path = cnn_utils.preprocess_image(path, size=32)
    from_pil = cnn_utils.preprocess_image(Image.fromarray(chelsea), size=32)
    from_float = cnn_utils.preprocess_image(chelsea / 255.0, size=32)
    assert torch.equal(from_path, from_pil)
    assert torch.allclose(from_float, from_pil)
    grey = cnn_utils.preprocess_image(np.full((10, 10), 128, np.uint8), size=10)
    assert grey.shape == (1, 3, 10, 10)
    assert np.all(cnn_utils.recreate_image(grey) == 128)


def test_preprocess_errors():
    with pytest.raises(FileNotFoundError, match="No image file"):
        cnn_utils.preprocess_image("/no/such/photo.jpg")
    with pytest.raises(ValueError, match=r"\(H, W, 3\).*alpha"):
        cnn_utils.preprocess_image(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        cnn_utils.preprocess_image(np.zeros((3, 8, 8, 2)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cnn_utils.preprocess_image(np.full((8, 8, 3), 200.0))
    with pytest.raises(TypeError, match="PIL image"):
        cnn_utils.preprocess_image({"not": "an image"})
    with pytest.raises(ValueError, match=r"\(1, 3, H, W\)"):
        cnn_utils.recreate_image(torch.zeros(1, 4, 5, 5))


# --- feature inversion --------------------------------------------------------

def test_feature_inversion_lowers_the_feature_loss_tenfold_on_a_small_network(chelsea):
    net = TinyNet()
    x = cnn_utils.preprocess_image(chelsea, size=32)
    res = cnn_utils.feature_inversion(net, x, layer_index=4, iterations=60, lr=0.1,
                                      n_snapshots=3, progress=False)
    loss = res["feature_loss"]
    assert len(loss) == len(res["loss"]) == 60
    assert np.all(np.isfinite(res["loss"]))
    assert loss[-1] * 10 <= loss[0], (loss[0], loss[-1])
    assert res["snapshot_steps"] == [20, 40, 60]
    assert all(s.shape == (32, 32, 3) and s.dtype == np.uint8 for s in res["snapshots"])
    assert res["image"].shape == (32, 32, 3)
    # the weights are left as they were (trainable), and got no gradients
    assert all(p.requires_grad and p.grad is None for p in net.parameters())


def test_feature_inversion_keeps_each_submodules_train_eval_flag(chelsea):
    net = TinyNet()
    net.train()
    net.features[1].eval()          # a submodule the user put in eval mode inside a training model
    before = [m.training for m in net.modules()]
    cnn_utils.feature_inversion(net, cnn_utils.preprocess_image(chelsea, size=16), layer_index=2,
                                iterations=2, progress=False)
    assert [m.training for m in net.modules()] == before


def test_feature_inversion_runs_only_the_layers_up_to_the_target(chelsea):
    net = TinyNet()
    calls = []
    for i, layer in enumerate(net.features):
        layer.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    cnn_utils.feature_inversion(net, cnn_utils.preprocess_image(chelsea, size=16), layer_index=2,
                                iterations=4, progress=False)
    # 1 target pass + 4 steps, each through layers 0..2 only
    assert calls == [0, 1, 2] * 5


def test_feature_inversion_reconstructs_from_an_early_vgg16_layer(random_vgg16, chelsea):
    # Measured on this machine: SSIM 0.982 and PSNR 36.0 dB between the original and
    # the relu1_2 reconstruction of VGG16 with random weights, 48 x 48, 80 Adam steps
    # from seeded noise. For scale: a flat grey image scores SSIM 0.13, the starting
    # noise 0.05.
    x = cnn_utils.preprocess_image(chelsea, size=48)
    res = cnn_utils.feature_inversion(random_vgg16, x, layer_index=3, iterations=80, progress=False)
    original = cnn_utils.recreate_image(x)
    ssim, psnr = cnn_utils.image_similarity(original, res["image"])
    assert res["layer_name"] == "relu1_2"
    assert ssim > 0.95, ssim
    assert psnr > 33, psnr
    assert res["feature_loss"][-1] * 10 <= res["feature_loss"][0]
    assert cnn_utils.image_similarity(original, np.full_like(original, 128))[0] < 0.2


def test_feature_inversion_bad_layer_index_lists_the_layers(random_vgg16):
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"valid indices are 0 to 30.*0 conv1_1.*30 pool5"):
        cnn_utils.feature_inversion(random_vgg16, x, layer_index=31, progress=False)
    with pytest.raises(ValueError, match="0 to 30"):
        cnn_utils.feature_inversion(random_vgg16, x, layer_index=-1, progress=False)
    with pytest.raises(TypeError, match="integer"):
        cnn_utils.feature_inversion(random_vgg16, x, layer_index="conv1_1", progress=False)
    with pytest.raises(TypeError, match="features"):
        cnn_utils.feature_inversion(torch.nn.Linear(2, 2), x, layer_index=0, progress=False)


def test_feature_inversion_bad_image_shape():
    with pytest.raises(ValueError, match=r"\(1, 3, H, W\)"):
        cnn_utils.feature_inversion(TinyNet(), torch.zeros(1, 1, 16, 16), 0, progress=False)
    with pytest.raises(ValueError, match=r"\(1, 3, H, W\)"):
        cnn_utils.feature_inversion(TinyNet(), torch.zeros(2, 3, 16, 16), 0, progress=False)


def test_vgg_layer_names_and_feature_maps(random_vgg16, chelsea):
    names = cnn_utils.vgg_layer_names(random_vgg16)
    assert len(names) == 31
    assert names[:5] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1"]
    assert names[28:] == ["conv5_3", "relu5_3", "pool5"]
    maps = cnn_utils.vgg_feature_maps(random_vgg16, cnn_utils.preprocess_image(chelsea, 32), [2, 3, 30])
    assert maps[2].shape == (64, 32, 32) and maps[30].shape == (512, 1, 1)
    # the conv map is copied before the in-place ReLU runs: it keeps its negative values
    assert maps[2].min() < 0 and maps[3].min() >= 0
    np.testing.assert_allclose(np.maximum(maps[2], 0), maps[3], atol=1e-6)


def test_gradient_saliency_of_a_linear_score_is_its_weight():
    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)))

        def forward(self, x):
            return (x.unsqueeze(1) * self.w).flatten(2).sum(-1)

    model = Linear()
    sal, cls = cnn_utils.gradient_saliency(model, torch.zeros(1, 3, 4, 4), class_index=1)
    assert cls == 1
    np.testing.assert_allclose(sal, model.w[1].abs().amax(0).detach().numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="0 to 1"):
        cnn_utils.gradient_saliency(model, torch.zeros(1, 3, 4, 4), class_index=2)


def test_image_similarity_identical_and_different():
    a = np.zeros((16, 16, 3), np.uint8)
    b = a.copy()
    b[0, 0] = 255
    assert cnn_utils.image_similarity(a, a) == (1.0, np.inf)
    ssim, psnr = cnn_utils.image_similarity(a, b)
    # MSE = 3 * 255^2 / (16 * 16 * 3), PSNR = 10 log10(255^2 / MSE) = 10 log10(256)
    assert psnr == pytest.approx(10 * np.log10(256))
    assert ssim < 1


# --- loading VGG16 -------------------------------------------------------------

def test_load_vgg16_offline_fallback(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    monkeypatch.delenv(cnn_utils.OFFLINE_ENV_VAR, raising=False)

    def fail(*args, **kwargs):
        raise OSError("no network (simulated)")

    monkeypatch.setattr(cnnlib.vgg16, "_download_vgg16_state_dict", fail)
    model = cnn_utils.load_vgg16(device="cpu")
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "make prefetch" in out and "python -m course prefetch" in out
    assert "no network (simulated)" in out and str(tmp_path) in out
    assert model.pretrained is False and not model.training
    assert len(model.class_names) == 1000 and model.class_names[281] == "tabby"
    preds = cnn_utils.top_k_predictions(model, torch.zeros(1, 3, 32, 32), k=5)
    assert len(preds) == 5 and all(0 <= p <= 1 for _, p in preds)
    assert sum(p for _, p in preds) <= 1 + 1e-6


def test_load_vgg16_loads_the_weights_torchvision_gives(monkeypatch, random_vgg16, capsys):
    state = {k: torch.full_like(v, 0.25) for k, v in random_vgg16.state_dict().items()}
    monkeypatch.setattr(cnnlib.vgg16, "_download_vgg16_state_dict", lambda *a, **k: state)
    model = cnn_utils.load_vgg16(device="cpu")
    assert model.pretrained is True and not model.training
    assert capsys.readouterr().out == ""
    assert model.features[0].weight[0, 0, 0, 0].item() == 0.25
    assert model.classifier[6].bias[999].item() == 0.25


def test_load_vgg16_offline_env_var_skips_the_download(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(cnn_utils.OFFLINE_ENV_VAR, "1")
    monkeypatch.setattr(cnnlib.vgg16, "_download_vgg16_state_dict",
                        lambda *a, **k: pytest.fail("no download may be tried"))
    model = cnn_utils.load_vgg16(device="cpu")
    assert model.pretrained is False
    assert f"{cnn_utils.OFFLINE_ENV_VAR} is set" in capsys.readouterr().out


def test_load_vgg16_uses_torchvisions_cache_and_reports_a_corrupt_file(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = cnn_utils.vgg16_weights_path()
    assert path == tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")  # e.g. an interrupted copy
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: pytest.fail("no download"))
    model = cnn_utils.load_vgg16(device="cpu")
    out = capsys.readouterr().out
    assert model.pretrained is False
    assert f"the cached file {path} could not be read" in out and "RANDOM weights" in out


def test_prefetch_fills_the_cache_load_vgg16_reads(monkeypatch, tmp_path, capfd):
    # the prefetch child process runs in an empty cache: offline, it fails with advice
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = cnn_utils.vgg16_weights_path()
    path.parent.mkdir(parents=True)
    # a (tiny) valid checkpoint where load_vgg16 looks: the child must find it, not download
    torch.save({"w": torch.zeros(1)}, path)
    import course

    course.prefetch(datasets=(), vgg16=True)
    assert f"cached in {path}" in capfd.readouterr().out
    path.unlink()
    if _online():  # pragma: no cover - never download 528 MB in the tests
        return
    with pytest.raises(course.CourseError, match="python -m course prefetch"):
        course.prefetch(datasets=(), vgg16=True)
    err = capfd.readouterr().err
    assert "VGG16 weights: " in err and "Traceback" not in err     # one line, no traceback


def _online():
    import socket

    try:
        socket.create_connection(("download.pytorch.org", 443), timeout=2).close()
        return True
    except OSError:
        return False



def test_the_inversion_loop_shown_in_notebook_07_equals_feature_inversion(chelsea):
    # The notebook's readable loop (cell tagged "inversion-loop") and the fast function, from the
    # same noise for the same steps, on a small network and on two settings of the regularizers.
    import json
    from pathlib import Path

    nb = json.loads((Path(__file__).resolve().parents[1] / "notebooks" /
                     "07_vgg16_feature_inversion.ipynb").read_text())
    cells = [c for c in nb["cells"] if "inversion-loop" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "notebook 07 must have exactly one cell tagged 'inversion-loop'"
    namespace = {"torch": torch, "cnn_utils": cnn_utils, "SEED": 7}
    exec("".join(cells[0]["source"]), namespace)
    net = TinyNet().requires_grad_(False)
    x0 = cnn_utils.preprocess_image(chelsea, size=24)
    for kwargs in ({}, {"tv_beta": 1.5, "tv_weight": 1.0, "alpha_weight": 1e-3, "lr": 0.05}):
        readable = namespace["invert"](net, x0, 4, steps=7, seed=7, **kwargs)
        fast = cnn_utils.feature_inversion(net, x0, 4, iterations=7, seed=7, progress=False, **kwargs)
        assert readable.shape == fast["tensor"].shape == x0.shape
        torch.testing.assert_close(readable, fast["tensor"], rtol=1e-5, atol=1e-6)
        # and both moved away from the starting noise (the comparison is not of two untouched inputs)
        start = namespace["invert"](net, x0, 4, steps=1, seed=7, lr=0.0, **{k: v for k, v in kwargs.items() if k != "lr"})
        assert (readable - start).abs().max() > 1e-3

# --- what a user can hand the PyTorch helpers by mistake ---------------------------

def test_preprocess_applies_the_exif_orientation(tmp_path):
    from PIL import Image

    # a 20 x 40 landscape photo stored as is, tagged "rotate 90 degrees clockwise to view"
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = 255                          # left half white
    exif = Image.Exif()
    exif[0x0112] = 6                           # Orientation = 6 (rotate 90 CW)
    path = tmp_path / "phone.jpg"
    Image.fromarray(img).save(path, exif=exif, quality=95)
    upright = np.rot90(img, k=-1)              # what the phone shows: 40 x 20, white on top
    x = cnn_utils.preprocess_image(path, size=(40, 20))
    np.testing.assert_allclose(cnn_utils.recreate_image(x).astype(float),
                               np.asarray(cnn_utils.recreate_image(cnn_utils.preprocess_image(
                                   np.ascontiguousarray(upright), size=(40, 20)))).astype(float), atol=8)
    back = cnn_utils.recreate_image(x)
    assert back[:15].mean() > 240 and back[25:].mean() < 15   # white on top, not on the left


def test_preprocess_keeps_the_range_of_16_bit_pngs(tmp_path):
    from PIL import Image

    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))   # dark to light
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")      # really stored as 16-bit
    eight_bit = np.round(ramp / 257.0).astype(np.uint8)
    expected = cnn_utils.preprocess_image(eight_bit, size=32)
    for image in (path, ramp):                 # the file and the uint16 array
        x = cnn_utils.preprocess_image(image, size=32)
        assert torch.allclose(x, expected, atol=0.02)       # not clipped to white
    assert cnn_utils.recreate_image(cnn_utils.preprocess_image(path, size=32))[:, 0].max() < 10


def test_preprocess_integer_arrays_and_channels_first(chelsea):
    as_int64 = chelsea.astype(np.int64)
    assert torch.equal(cnn_utils.preprocess_image(as_int64, size=16), cnn_utils.preprocess_image(chelsea, size=16))
    with pytest.raises(ValueError, match=r"channels first.*np.moveaxis"):
        cnn_utils.preprocess_image(np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(ValueError, match=r"integer image must hold 0\.\.255"):
        cnn_utils.preprocess_image(np.full((8, 8, 3), 300))
    with pytest.raises(ValueError, match=r"They look like 0\.\.255: divide by 255"):
        cnn_utils.preprocess_image(chelsea.astype(np.float32))


def test_preprocess_refuses_empty_and_huge_images(monkeypatch, tmp_path):
    from PIL import Image

    for empty in (np.zeros((0, 0, 3), np.uint8), np.zeros((0, 5), np.uint8)):
        with pytest.raises(ValueError, match="is empty"):
            cnn_utils.preprocess_image(empty)
    monkeypatch.setattr(cnn_utils, "MAX_IMAGE_PIXELS", 1000)
    big = np.zeros((40, 30, 3), np.uint8)
    path = tmp_path / "big.png"
    Image.fromarray(big).save(path)
    for image in (big, Image.fromarray(big), path):
        with pytest.raises(ValueError, match=r"40 x 30 = .* megapixels, more than the limit.*thumbnail"):
            cnn_utils.preprocess_image(image, size=16)
    with pytest.raises(ValueError, match="size must be positive"):
        cnn_utils.preprocess_image(np.zeros((8, 8, 3), np.uint8), size=100)


@pytest.mark.parametrize("content, message", [
    (b"this is not a picture", "not an image file Pillow can read"),
    (None, "truncated or corrupt"),
])
def test_preprocess_bad_files(tmp_path, chelsea, content, message):
    import io

    from PIL import Image

    path = tmp_path / "photo.jpg"
    if content is None:                        # a JPEG cut in half
        buffer = io.BytesIO()
        Image.fromarray(chelsea).save(buffer, format="JPEG")
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        cnn_utils.preprocess_image(path)


@pytest.mark.parametrize("size", [0, -3, 2.5, "224", (10,), (10, 0), True])
def test_preprocess_bad_size(size):
    with pytest.raises(ValueError, match="size must be"):
        cnn_utils.preprocess_image(np.zeros((8, 8, 3), np.uint8), size=size)


@pytest.mark.parametrize("tensor, error, message", [
    ([[1, 2]], ValueError, r"expects a tensor \(1, 3, H, W\) or \(3, H, W\).*got shape \(1, 2\)"),
    ("image", TypeError, r"tensor must be a torch tensor or array \(1, 3, H, W\).*got str"),
    (torch.full((1, 3, 4, 4), float("nan")), ValueError, "NaN"),
    (torch.zeros(2, 3, 4, 4), ValueError, r"got shape \(2, 3, 4, 4\)"),
])
def test_recreate_image_errors(tensor, error, message):
    with pytest.raises(error, match=message):
        cnn_utils.recreate_image(tensor)


def test_euclidian_loss_refuses_shapes_that_only_broadcast():
    target = torch.ones(1, 4, 5, 5)
    for current in (torch.ones(4, 5, 5), torch.ones(1, 1, 5, 5), torch.ones(2, 4, 5, 5)):
        with pytest.raises(ValueError, match="target and current must have the same shape"):
            cnn_utils.euclidian_loss(target, current)
    with pytest.raises(TypeError, match="current must be a torch tensor"):
        cnn_utils.euclidian_loss(target, np.ones((1, 4, 5, 5)))
    # argument order: relative to the first (the target features)
    assert float(cnn_utils.euclidian_loss(torch.tensor([2.0]), torch.tensor([3.0]))) == pytest.approx(1 / 4)


@pytest.mark.parametrize("call, message", [
    (lambda: cnn_utils.alpha_norm(torch.ones(3), alpha=0), "alpha must be a positive number"),
    (lambda: cnn_utils.alpha_norm([1.0, 2.0]), "x must be a torch tensor"),
    (lambda: cnn_utils.total_variation_norm(torch.ones(1, 3, 4, 4), beta=-1), "beta must be a positive number"),
    (lambda: cnn_utils.total_variation_norm(torch.ones(1, 3, 4, 4, dtype=torch.int64)), "floating-point"),
])
def test_regularizer_arguments(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_image_similarity_on_float_images_uses_the_unit_range():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 1, (2, 64, 64, 3))
    ssim_float, psnr_float = cnn_utils.image_similarity(a, b)
    assert abs(ssim_float) < 0.05                      # independent noise: SSIM near 0, not 0.997
    a8, b8 = np.round(a * 255).astype(np.uint8), np.round(b * 255).astype(np.uint8)
    ssim_8, psnr_8 = cnn_utils.image_similarity(a8, b8)
    assert ssim_8 == pytest.approx(ssim_float, abs=0.01) and psnr_8 == pytest.approx(psnr_float, abs=0.1)
    # uint8 against float in [0, 1]: the same scale
    assert cnn_utils.image_similarity(a8, a8 / 255.0)[0] == pytest.approx(1.0)
    # PSNR by hand on [0, 1]: MSE 0.01 -> 20 dB
    assert cnn_utils.image_similarity(np.full((8, 8, 3), 0.5), np.full((8, 8, 3), 0.6))[1] == pytest.approx(20.0)


@pytest.mark.parametrize("a, b, error, message", [
    (np.full((8, 8, 3), 200.0), np.zeros((8, 8, 3)), ValueError, r"float image must lie in \[0, 1\]"),
    (np.zeros((8, 8, 3), np.int64), np.zeros((8, 8, 3)), TypeError, "uint8"),
    (np.zeros((8, 8, 3)), np.zeros((8, 9, 3)), ValueError, "same shape"),
    (np.zeros((5, 5, 3)), np.zeros((5, 5, 3)), ValueError, "at least 7 x 7"),
])
def test_image_similarity_errors(a, b, error, message):
    with pytest.raises(error, match=message):
        cnn_utils.image_similarity(a, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(iterations=0), "iterations must be an integer of at least 1"),
    (dict(iterations=2.5), "iterations must be"), (dict(lr=0), "lr must be a positive number"),
    (dict(lr=float("nan")), "lr must be"), (dict(alpha=-6), "alpha must be"),
    (dict(tv_beta=0), "tv_beta must be"), (dict(tv_weight=-0.1), "tv_weight must be a number >= 0"),
    (dict(alpha_weight="1e-5"), "alpha_weight must be"), (dict(n_snapshots=0), "n_snapshots must be"),
    (dict(seed=-1), "seed must be"), (dict(optimizer="lbfgs"), "optimizer must be"),
])
def test_feature_inversion_argument_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cnn_utils.feature_inversion(TinyNet(), torch.zeros(1, 3, 16, 16), 0, progress=False, **kwargs)


def test_feature_inversion_refuses_other_models_and_nan_images():
    with pytest.raises(TypeError, match="must be a PyTorch model"):
        cnn_utils.feature_inversion("vgg16", torch.zeros(1, 3, 16, 16), 0)
    with pytest.raises(ValueError, match="NaN"):
        cnn_utils.feature_inversion(TinyNet(), torch.full((1, 3, 16, 16), float("nan")), 0, progress=False)


def test_image_similarity_of_empty_or_nan_images():
    with pytest.raises(ValueError, match="original is empty"):
        cnn_utils.image_similarity(np.zeros((0, 0, 3)), np.zeros((0, 0, 3)))
    with pytest.raises(ValueError, match="reconstruction contains NaN"):
        cnn_utils.image_similarity(np.zeros((8, 8, 3)), np.full((8, 8, 3), np.nan))


# --- second campaign (issue 13): bad arguments to the VGG helpers ----------------------------------

class _SmallVGG(torch.nn.Module):
    """VGG's attributes (features, avgpool, classifier) at a size that builds in milliseconds."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2))
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.classifier = torch.nn.Sequential(torch.nn.Linear(8, 4))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_a_refused_feature_visualization_leaves_the_model_as_it_was():
    net = _SmallVGG()
    with pytest.raises(ValueError, match="lr must be a number >= 0"):
        cnn_utils.vgg_feature_visualization(net, "relu2_1", 0, size=32, steps=1, lr=-1, progress=False)
    assert all(not m._forward_hooks for m in net.modules())           # no hook left behind
    assert all(p.requires_grad for p in net.parameters())
    out = cnn_utils.vgg_feature_visualization(net, "logits", [1, 2], size=32, steps=2, progress=False)
    assert out["images"].shape == (2, 32, 32, 3)


VGG_CASES = {
    "top_k k=0": (lambda m, p: cnn_utils.top_k_predictions(m, p, k=0), ValueError, "k must be an integer from 1"),
    "top_k k=2000": (lambda m, p: cnn_utils.top_k_predictions(m, p, k=2000), ValueError, "number of classes"),
    "top_k of a Keras model": (lambda m, p: cnn_utils.top_k_predictions(object(), p), TypeError,
                               "must be a PyTorch model"),
    "feature maps []": (lambda m, p: cnn_utils.vgg_feature_maps(m, p, []), ValueError, "layer_indices is empty"),
    "feature maps 'relu1_1'": (lambda m, p: cnn_utils.vgg_feature_maps(m, p, "relu1_1"), TypeError,
                               "layer_indices must be a list"),
    "activations batch_size 0": (lambda m, p: cnn_utils.vgg_layer_activations(m, p, "relu1_1", batch_size=0),
                                 ValueError, "batch_size must be a positive integer"),
    "crops k=-1": (lambda m, p: cnn_utils.top_activating_crops(m, {"a": p}, "relu2_1", 0, k=-1), ValueError,
                   "k must be a positive integer"),
    "crops of two sizes": (lambda m, p: cnn_utils.top_activating_crops(m, {"a": p, "b": p[:16]}, "relu2_1", 0),
                           ValueError, "must all have one size"),
    "crops from a list": (lambda m, p: cnn_utils.top_activating_crops(m, [p], "relu2_1", 0), TypeError,
                          "photos must be a dict"),
    "visualization steps text": (lambda m, p: cnn_utils.vgg_feature_visualization(m, "relu2_1", 0, steps="a"),
                                 ValueError, "steps must be an integer"),
    "visualization jitter -2": (lambda m, p: cnn_utils.vgg_feature_visualization(m, "relu2_1", 0, jitter=-2),
                                ValueError, "jitter must be an integer, jitter >= 0"),
    "layer names of a Keras model": (lambda m, p: cnn_utils.vgg_layer_names(object()), TypeError,
                                     "torchvision's VGG16"),
    "layer explorer of a list": (lambda m, p: cnn_utils.vgg_layer_explorer(m, [p]), TypeError,
                                 "photos must be a dict"),
    "device 'gpu'": (lambda m, p: cnn_utils.torch_device("gpu"), ValueError, "device must be None, 'cpu'"),
    "load_vgg16 seed text": (lambda m, p: cnn_utils.load_vgg16(pretrained=False, seed="a"), ValueError,
                             "seed must be"),
    "composite split text": (lambda m, p: cnn_utils.composite_photo(p, p, 16, split="a"), ValueError,
                             "split must lie strictly between 0 and 1"),
    "composite size None": (lambda m, p: cnn_utils.composite_photo(p, p, None), ValueError, "got None"),
}


@pytest.mark.parametrize("case", list(VGG_CASES))
def test_vgg_helpers_bad_arguments(case):
    call, error, message = VGG_CASES[case]
    photo = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    with pytest.raises(error, match=message):
        call(_SmallVGG(), photo)


def test_receptive_fields_take_vggs_layer_names_as_the_attribution_functions_do():
    net = _SmallVGG()
    by_alias = cnn_utils.receptive_fields(net, "relu2_1", (32, 32))
    by_module = cnn_utils.receptive_fields(net, "features.4", (32, 32))
    np.testing.assert_array_equal(by_alias.y.centres, by_module.y.centres)
    assert by_alias.y.size == 8          # 3, +1 (pool), +2 * 2 (conv after a stride-2 pool)


# --- figures of notebook 07 --------------------------------------------------

def test_top_predictions_axis_is_scaled_to_near_uniform_probabilities():
    import matplotlib.pyplot as plt

    img = np.zeros((8, 8, 3), np.uint8)
    flat = [("ibex", 0.00118), ("sidewinder", 0.00112), ("megalith", 0.00105)]
    fig = cnn_utils.plot_top_predictions([img], [flat])
    ax = fig.axes[1]
    assert ax.get_xlim()[1] == pytest.approx(150 * 0.00118)   # 0.118 % fills two thirds, not 0.1 % of the axis
    assert "scaled" in ax.get_xlabel()
    assert [t.get_text() for t in ax.texts] == ["0.105 %", "0.112 %", "0.118 %"]   # format_probability, with %
    plt.close(fig)
    fig = cnn_utils.plot_top_predictions([img], [[("tabby", 0.62), ("tiger cat", 0.3)]])
    assert fig.axes[1].get_xlim() == (0, 100) and [t.get_text() for t in fig.axes[1].texts] == ["30.0 %", "62.0 %"]
    plt.close(fig)


def test_reconstructions_suptitle_clears_the_two_line_panel_titles():
    import matplotlib.pyplot as plt

    img = np.zeros((16, 16, 3), np.uint8)
    results = [{"image": img, "layer_name": f"relu{i}_2"} for i in range(1, 4)]
    fig = cnn_utils.plot_reconstructions(img, results, [(0.5, 20.0)] * 3, title="What each depth keeps")
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    top_of_titles = max(ax.title.get_window_extent(renderer).y1 for ax in fig.axes)
    suptitle = next(t for t in fig.texts if t.get_text() == "What each depth keeps")
    assert suptitle.get_window_extent(renderer).y0 >= top_of_titles
    plt.close(fig)


def test_units_with_crops_writes_every_patch_value_with_the_same_decimals():
    import matplotlib.pyplot as plt

    img = np.zeros((8, 8, 3), np.float32)
    crops = [[{"crop": img, "photo": "cat", "value": 1.08}, {"crop": img, "photo": "cup", "value": 0.891}]]
    fig = cnn_utils.plot_units_with_crops([img], crops, ["conv3_3 #7"])
    titles = [ax.get_title() for ax in fig.axes[1:]]
    assert titles == ["cat: 1.08", "cup: 0.89"]        # not "1.08" beside "0.891"
    crops[0][0]["value"] = 57.3
    fig2 = cnn_utils.plot_units_with_crops([img], crops, ["conv3_3 #7"])
    assert [ax.get_title() for ax in fig2.axes[1:]] == ["cat: 57.3", "cup: 0.9"]
    plt.close("all")


@pytest.mark.parametrize("eps,beta", [(-1e-8, 2), (0.0, 1), ("1e-8", 2)])
def test_tv_eps_must_be_a_small_non_negative_number(eps, beta):
    with pytest.raises(ValueError, match="eps must be a small number >= 0"):
        cnn_utils.total_variation_norm(columns_only_image(), beta=beta, eps=eps)
    assert float(cnn_utils.total_variation_norm(columns_only_image(), beta=2, eps=0.0)) == pytest.approx(10.0)
