"""Sample photos, composites and the user's own photo files (``load_photo``)."""
import numpy as np
import pytest
from PIL import Image

import cnnlib.photos
import cnn_utils


def test_sample_photos_are_rgb_in_unit_range():
    photos = cnn_utils.sample_photos(size=64)
    assert list(photos) == list(cnn_utils.SAMPLE_PHOTOS)
    for name, p in photos.items():
        assert p.shape == (64, 64, 3) and p.dtype == np.float32, name
        assert 0 <= p.min() and p.max() <= 1 and p.std() > 0.05, name
    assert cnn_utils.sample_photos(["coffee"], size=(32, 48))["coffee"].shape == (32, 48, 3)
    with pytest.raises(ValueError, match="Unknown sample photo.*'dog'.*chelsea"):
        cnn_utils.sample_photos(["dog"])


def test_centre_crop_by_hand():
    # 2 x 6 image, columns 0..5 with values 0..5: a square crop keeps the middle columns 2, 3
    img = np.tile(np.arange(6, dtype=np.uint8) * 40, (2, 1))
    out = cnn_utils.load_photo(img, size=(2, 2))
    np.testing.assert_allclose(out[..., 0], [[80 / 255, 120 / 255]] * 2, atol=1e-6)
    stretched = cnn_utils.load_photo(img, size=(2, 6), fit="stretch")
    np.testing.assert_allclose(stretched[..., 1], img / 255.0, atol=1e-6)
    assert cnnlib.photos._centre_crop_box(300, 451, 1.0) == (75, 0, 375, 300)


def test_scales_and_shapes():
    u8 = np.full((4, 4, 3), 255, np.uint8)
    np.testing.assert_allclose(cnn_utils.load_photo(u8, None), 1.0)
    u16 = np.full((4, 4), 65535 // 2, np.uint16)
    np.testing.assert_allclose(cnn_utils.load_photo(u16, None), 0.5, atol=1e-4)
    rgba = np.zeros((4, 4, 4), np.float32)  # fully transparent black -> white
    np.testing.assert_allclose(cnn_utils.load_photo(rgba, None), 1.0)
    gray = cnn_utils.load_photo(np.full((5, 7, 1), 0.25), 3)
    assert gray.shape == (3, 3, 3)
    np.testing.assert_allclose(gray, 0.25, atol=1e-5)


@pytest.mark.parametrize("bad, error, message", [
    (np.zeros((3, 8, 8)), ValueError, "channels first"),
    (np.full((4, 4, 3), 200.0), ValueError, "divide by 255"),
    (np.full((4, 4, 3), np.nan), ValueError, "NaN"),
    (np.zeros((0, 4, 3)), ValueError, "empty"),
    (np.zeros((4, 4, 3), np.int64), TypeError, "dtype int64"),
    (np.zeros((4, 4, 2)), ValueError, r"\(H, W, 3\)"),
    ("not an array", FileNotFoundError, "no such file"),
    ([["a"]], TypeError, "array of numbers"),
])
def test_bad_arrays(bad, error, message):
    with pytest.raises(error, match=message):
        cnn_utils.load_photo(bad)


def test_bad_sizes():
    for size in (0, (2, 0), 2.5, (1, 2, 3), True):
        with pytest.raises(ValueError, match="size"):
            cnn_utils.load_photo(np.zeros((4, 4, 3)), size)
    with pytest.raises(ValueError, match="fit"):
        cnn_utils.load_photo(np.zeros((4, 4, 3)), fit="pad")


def test_files(tmp_path):
    rgb = (np.arange(20 * 30 * 3) % 251).astype(np.uint8).reshape(20, 30, 3)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_allclose(cnn_utils.load_photo(tmp_path / "a.png", None), rgb / 255.0, atol=1e-6)
    # 16-bit grey PNG: scaled by 65535, not clipped to white
    Image.fromarray(np.full((6, 6), 30000, np.uint16)).save(tmp_path / "g16.png")
    np.testing.assert_allclose(cnn_utils.load_photo(tmp_path / "g16.png", None), 30000 / 65535, atol=1e-5)
    # EXIF orientation 6 (rotate 90 degrees clockwise to view): a 20 x 30 file shows as 30 x 20
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "phone.jpg", exif=exif)
    assert cnn_utils.load_photo(tmp_path / "phone.jpg", None).shape == (30, 20, 3)
    # not an image, truncated, a folder
    (tmp_path / "notes.jpg").write_text("hello")
    with pytest.raises(ValueError, match="notes.jpg is not an image file"):
        cnn_utils.load_photo(tmp_path / "notes.jpg")
    data = (tmp_path / "phone.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.jpg could not be decoded"):
        cnn_utils.load_photo(tmp_path / "cut.jpg")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        cnn_utils.load_photo(tmp_path)


def test_huge_file_is_refused(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(cnn_utils, "MAX_PHOTO_PIXELS", 1000)
    with pytest.raises(ValueError, match="40 x 40 pixels, more than MAX_PHOTO_PIXELS"):
        cnn_utils.load_photo(tmp_path / "big.png")


def test_composite_puts_each_photo_in_its_half():
    red = np.zeros((10, 10, 3)); red[..., 0] = 1
    blue = np.zeros((30, 10, 3)); blue[..., 2] = 1
    c = cnn_utils.composite_photo(red, blue, size=8)
    assert c.shape == (8, 8, 3) and c.dtype == np.float32
    np.testing.assert_allclose(c[:, :4], np.broadcast_to([1, 0, 0], (8, 4, 3)), atol=1e-6)
    np.testing.assert_allclose(c[:, 4:], np.broadcast_to([0, 0, 1], (8, 4, 3)), atol=1e-6)
    assert cnn_utils.composite_photo(red, blue, size=10, split=0.3)[:, :3, 0].min() == 1.0
    with pytest.raises(ValueError, match="split"):
        cnn_utils.composite_photo(red, blue, split=1.0)


def test_a_file_object_and_a_float_tiff_of_0_to_255(tmp_path):
    rgb = (np.arange(12 * 16 * 3) % 251).astype(np.uint8).reshape(12, 16, 3)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    with open(tmp_path / "a.png", "rb") as f:
        np.testing.assert_allclose(cnn_utils.load_photo(f, None), rgb / 255.0, atol=1e-6)
    # a 32-bit float TIFF holding 0..255 is divided by 255, not by 65535
    grey = np.linspace(0, 255, 8 * 8, dtype=np.float32).reshape(8, 8)
    Image.fromarray(grey, mode="F").save(tmp_path / "f.tif")
    np.testing.assert_allclose(cnn_utils.load_photo(tmp_path / "f.tif", None)[..., 0], grey / 255.0, atol=1e-6)
    Image.fromarray(grey / 255.0, mode="F").save(tmp_path / "unit.tif")      # [0, 1] stays as it is
    np.testing.assert_allclose(cnn_utils.load_photo(tmp_path / "unit.tif", None)[..., 0], grey / 255.0, atol=1e-6)


def test_preprocess_image_refuses_a_decompression_bomb_as_load_photo_does(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)    # 1600 pixels: more than twice Pillow's limit
    for call in (cnn_utils.load_photo, cnn_utils.preprocess_image):
        with pytest.raises(ValueError, match="bomb"):
            call(tmp_path / "bomb.png")
