"""The course CNN: named layers, training lowers the loss, shipped models reach their accuracy."""
import json

import numpy as np
import pytest

import cnn_utils

LAYERS = ["image", "conv1", "pool1", "conv2", "pool2", "conv3", "flatten", "dense1", "dropout",
          "logits", "probabilities"]


def test_build_named_layers():
    model = cnn_utils.build_mnist_cnn()
    assert [l.name for l in model.layers] == LAYERS
    assert model.output_shape == (None, 10)
    assert model.get_layer("conv1").output.shape[1:] == (26, 26, 32)
    assert model.get_layer("conv3").output.shape[1:] == (3, 3, 64)
    # conv1: 3*3*1*32 + 32 weights and biases, worked out by hand
    assert model.get_layer("conv1").count_params() == 320
    assert model.get_layer("dense1").count_params() == 576 * 128 + 128


def test_logits_are_pre_softmax():
    model = cnn_utils.build_mnist_cnn()
    x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    logits = cnn_utils.predict_logits(model, x)
    probs = model.predict(x, verbose=0)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_same_seed_same_weights():
    a = cnn_utils.build_mnist_cnn(seed=3).get_layer("conv1").get_weights()[0]
    b = cnn_utils.build_mnist_cnn(seed=3).get_layer("conv1").get_weights()[0]
    c = cnn_utils.build_mnist_cnn(seed=4).get_layer("conv1").get_weights()[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_a_few_training_steps_lower_the_loss(mnist):
    (x_train, y_train), _ = mnist
    x, y = x_train[:1024], y_train[:1024]
    model = cnn_utils.build_mnist_cnn(seed=0)
    model.compile(loss="sparse_categorical_crossentropy")
    before = model.evaluate(x, y, verbose=0)
    history = cnn_utils.train_model(model, x, y, epochs=2, batch_size=64, seed=0, verbose=0)
    after = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    assert after < 0.5 * before, (before, after)
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize("name,target", [("mnist", 0.992), ("fashion_mnist", 0.91)])
def test_shipped_model_reaches_recorded_accuracy(name, target):
    info = cnn_utils.model_info(name)
    assert info["test_accuracy"] >= target
    model = cnn_utils.load_model(name)
    _, (x_test, y_test) = cnn_utils.load_dataset(name)
    acc = (model.predict(x_test, batch_size=1000, verbose=0).argmax(1) == y_test).mean()
    assert acc == pytest.approx(info["test_accuracy"], abs=2e-4)
    assert acc >= target
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(info["history"])


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m course train"):
        cnn_utils.load_model(tmp_path / "missing.keras")
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a keras file")
    with pytest.raises(cnn_utils.DataError, match="corrupt"):
        cnn_utils.load_model(bad)
    with pytest.raises(ValueError, match=r"Cannot load 'cifar10': name a shipped model \(mnist, fashion_mnist\)"):
        cnn_utils.load_model("cifar10")


def test_image_batch_validation():
    model = cnn_utils.build_mnist_cnn()
    assert cnn_utils.as_image_batch(np.zeros((28, 28)), model).shape == (1, 28, 28, 1)
    assert cnn_utils.as_image_batch(np.zeros((28, 28, 1)), model).shape == (1, 28, 28, 1)
    assert cnn_utils.as_image_batch(np.zeros((5, 28, 28, 1)), model).shape == (5, 28, 28, 1)
    with pytest.raises(ValueError, match=r"model expects \(28, 28, 1\)"):
        cnn_utils.as_image_batch(np.zeros((2, 32, 32, 1)), model)
    with pytest.raises(ValueError, match="NaN"):
        cnn_utils.as_image_batch(np.full((28, 28, 1), np.nan), model)
    with pytest.raises(ValueError, match=r"batch \(N, H, W, C\)"):
        cnn_utils.as_image_batch(np.zeros(10), model)
    with pytest.raises(TypeError, match="array of numbers"):
        cnn_utils.as_image_batch("a picture", model)


def test_most_confident_mistakes():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.01, 0.99]])
    labels = np.array([0, 0, 1, 0])
    # wrong: #1 (0.8 for class 1), #2 (0.6 for class 0), #3 (0.99 for class 1)
    assert cnn_utils.most_confident_mistakes(probs, labels, k=5).tolist() == [3, 1, 2]
    assert cnn_utils.most_confident_mistakes(probs, labels, k=1).tolist() == [3]


def test_train_cli_writes_model_and_accuracy(tmp_path, monkeypatch):
    """The rebuild command end to end, on a tiny budget (1 epoch, written to tmp_path)."""
    import course

    monkeypatch.setattr(cnn_utils, "train_val_split",
                        lambda x, y, seed: ((x[:2000], y[:2000]), (x[-500:], y[-500:])))
    info = course.train_and_save("mnist", epochs=1, out_dir=tmp_path, verbose=0)
    saved = json.loads((tmp_path / "mnist_cnn.json").read_text())
    assert saved == {k: v for k, v in info.items() if k != "path"}
    assert info["path"] == str(tmp_path / "mnist_cnn.keras") and info["replaced"] is False
    assert 0.5 < info["test_accuracy"] <= 1.0
    assert cnn_utils.load_model(tmp_path / "mnist_cnn.keras").count_params() > 0


def test_model_path_of_another_seed():
    assert cnn_utils.model_path("mnist", seed=cnn_utils.DEFAULT_SEED) == cnn_utils.model_path("mnist")
    assert cnn_utils.model_path("mnist", seed=1).name == "mnist_cnn_seed1.keras"
    with pytest.raises(TypeError, match="seed"):
        cnn_utils.model_path("mnist", seed="1")
    for name in cnn_utils.DATASETS:   # the second-seed models the notebooks compare with are shipped
        assert cnn_utils.model_path(name, seed=1).is_file()
        info = cnn_utils.model_info(name, seed=1)
        assert info["seed"] == 1
        model = cnn_utils.load_model(cnn_utils.model_path(name, seed=1))
        _, (x_test, y_test) = cnn_utils.load_dataset(name)
        acc = (model.predict(x_test, batch_size=1000, verbose=0).argmax(1) == y_test).mean()
        assert acc == pytest.approx(info["test_accuracy"], abs=2e-4)
