"""The dataset loader against published facts about MNIST and Fashion-MNIST, and its errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

import cnnlib.data
import cnn_utils
from conftest import ROOT


@pytest.fixture(scope="module")
def fashion():
    return cnn_utils.load_dataset("fashion_mnist")


def test_mnist_facts(mnist):
    (x_train, y_train), (x_test, y_test) = mnist
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert np.issubdtype(y_train.dtype, np.integer)
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0 and x_train.max() == 1.0
    assert y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert x_train.mean() * 255 == pytest.approx(33.32, abs=0.01)
    (_, _), (raw_test, _) = cnnlib.data._raw_dataset("mnist")
    np.testing.assert_array_equal(x_test[..., 0], raw_test.astype(np.float32) / 255.0)   # pixel / 255 exactly


def test_fashion_mnist_facts(fashion):
    (x_train, y_train), (x_test, y_test) = fashion
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert np.bincount(y_train).tolist() == [6000] * 10
    assert np.bincount(y_test).tolist() == [1000] * 10
    assert x_train.mean() * 255 == pytest.approx(72.94, abs=0.01)


def test_class_names():
    assert cnn_utils.CLASS_NAMES["mnist"] == [str(i) for i in range(10)]
    assert len(cnn_utils.CLASS_NAMES["fashion_mnist"]) == 10
    assert cnn_utils.CLASS_NAMES["fashion_mnist"][9] == "Ankle boot"


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="Unknown dataset 'cifar10'.*mnist, fashion_mnist"):
        cnn_utils.load_dataset("cifar10")


def _point_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(cnn_utils.DATA_ENV_VAR, str(tmp_path))


def test_truncated_file(monkeypatch, tmp_path):
    src = cnn_utils.dataset_search_paths("mnist")[0]
    (tmp_path / "mnist.npz").write_bytes(src.read_bytes()[: 1_000_000])
    _point_data_dir(monkeypatch, tmp_path)
    with pytest.raises(cnn_utils.DataError, match="corrupt or truncated.*prefetch"):
        cnn_utils.load_dataset("mnist")


def test_garbage_file(monkeypatch, tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"this is not a zip file" * 100)
    _point_data_dir(monkeypatch, tmp_path)
    with pytest.raises(cnn_utils.DataError, match="corrupt or truncated"):
        cnn_utils.load_dataset("mnist")


def test_wrong_layout(monkeypatch, tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((5, 28, 28), np.uint8))
    _point_data_dir(monkeypatch, tmp_path)
    with pytest.raises(cnn_utils.DataError, match="missing array 'y_train', 'x_test', 'y_test'"):
        cnn_utils.load_dataset("mnist")


def test_wrong_shapes(monkeypatch, tmp_path):
    arrays = {k: np.zeros(s, np.uint8) for k, s in cnnlib.data._EXPECTED_SHAPES.items()}
    arrays["x_train"] = np.zeros((60000, 32, 32), np.uint8)
    np.savez(tmp_path / "mnist.npz", **arrays)
    _point_data_dir(monkeypatch, tmp_path)
    with pytest.raises(cnn_utils.DataError, match=r"x_train has shape \(60000, 32, 32\)"):
        cnn_utils.load_dataset("mnist")


def test_bad_labels(monkeypatch, tmp_path):
    arrays = {k: np.zeros(s, np.uint8) for k, s in cnnlib.data._EXPECTED_SHAPES.items()}
    arrays["y_test"][0] = 12
    np.savez(tmp_path / "mnist.npz", **arrays)
    _point_data_dir(monkeypatch, tmp_path)
    with pytest.raises(cnn_utils.DataError, match="labels in y_test"):
        cnn_utils.load_dataset("mnist")


def test_env_dir_comes_first(monkeypatch, tmp_path):
    _point_data_dir(monkeypatch, tmp_path)
    paths = cnn_utils.dataset_search_paths("mnist")
    assert paths[0] == tmp_path / "mnist.npz"
    assert paths[1] == ROOT / "data" / "mnist.npz"


def test_no_data_and_no_network(monkeypatch, tmp_path):
    """No file anywhere and a download that fails: a clear error that says what to do."""
    _point_data_dir(monkeypatch, tmp_path)
    monkeypatch.setattr(cnn_utils, "DATA_DIR", tmp_path / "empty")

    # Exercise the real download path in a child process with no network route.
    code = (
        "import os, cnn_utils, pathlib, socket\n"
        "def refuse(*a, **k): raise OSError('network is unreachable')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "cnn_utils.DATA_DIR = pathlib.Path(os.environ['EMPTY_DIR'])\n"
        "try:\n"
        "    cnn_utils.load_dataset('mnist')\n"
        "except cnn_utils.DataError as e:\n"
        "    print('DataError:', e)\n"
    )
    env = dict(os.environ, EMPTY_DIR=str(tmp_path / "empty"), CNN_COURSE_DATA=str(tmp_path),
               KERAS_HOME=str(tmp_path / "keras_home"))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert "DataError: The mnist dataset is not on this machine" in out.stdout, out.stderr[-2000:]
    assert "prefetch" in out.stdout


def test_import_is_cheap():
    code = "import sys, cnn_utils; print('tensorflow' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False False", out.stderr


def test_framework_order_guard():
    """Importing TensorFlow first, then asking for torch: a clear error, not a crash."""
    code = (
        "import tensorflow, cnn_utils\n"
        "try:\n"
        "    cnn_utils._torch()\n"
        "except cnn_utils.FrameworkOrderError as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: TensorFlow is already imported" in out.stdout
    assert "Restart the kernel" in out.stdout
