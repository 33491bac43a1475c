"""cnn_utils.cached: a hit returns what was stored, a changed key computes again, a damaged file is
computed again with a note, nothing but the cache's own files is written."""
import numpy as np
import pytest

import cnn_utils


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(cnn_utils.CACHE_ENV_VAR, str(folder))
    return folder


def counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value() if callable(value) else value
    return compute, calls


def test_miss_then_hit_returns_the_same_array(cache, capsys):
    feats = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    compute, calls = counting(lambda: feats * 2)
    first = cnn_utils.cached("double", compute, feats=feats, seed=1)
    assert "computed in" in capsys.readouterr().out
    second = cnn_utils.cached("double", compute, feats=feats, seed=1)
    out = capsys.readouterr().out
    assert "from the cache (computed on" in out and len(calls) == 1
    np.testing.assert_array_equal(first, second)
    assert second.dtype == np.float32 and second.shape == (20, 3)
    assert [p.suffix for p in cache.iterdir()] == [".npz"]


def test_dict_of_arrays_and_numbers_round_trips(cache):
    value = {"emb": np.arange(6.0).reshape(3, 2), "seconds": 1.5, "k": 7}
    compute, calls = counting(value)
    cnn_utils.cached("d", compute, x=1)
    got = cnn_utils.cached("d", compute, x=1)
    assert len(calls) == 1 and set(got) == {"emb", "seconds", "k"}
    np.testing.assert_array_equal(got["emb"], value["emb"])
    assert got["seconds"] == 1.5 and got["k"] == 7


@pytest.mark.parametrize("change", ["seed", "array_value", "array_dtype", "name", "new_key"])
def test_a_changed_key_computes_again(cache, change):
    x = np.ones((4, 4), np.float32)
    compute, calls = counting(lambda: np.zeros(3))
    cnn_utils.cached("f", compute, x=x, seed=1)
    kwargs = {"x": x, "seed": 1}
    name = "f"
    if change == "seed":
        kwargs["seed"] = 2
    elif change == "array_value":
        y = x.copy()
        y[0, 0] = 2
        kwargs["x"] = y
    elif change == "array_dtype":
        kwargs["x"] = x.astype(np.float64)
    elif change == "name":
        name = "g"
    else:
        kwargs["dataset"] = "mnist"
    cnn_utils.cached(name, compute, **kwargs)
    assert len(calls) == 2


def test_keys_follow_values_not_objects():
    a = np.arange(10)
    assert cnn_utils.cache_key(a=a, s="x") == cnn_utils.cache_key(s="x", a=a.copy())
    assert cnn_utils.cache_key(a=a) != cnn_utils.cache_key(b=a)
    assert cnn_utils.cache_key(v=1) != cnn_utils.cache_key(v="1")
    with pytest.raises(TypeError, match="cannot key"):
        cnn_utils.cache_key(f=object())


def test_a_damaged_file_is_computed_again_with_a_note(cache, capsys):
    compute, calls = counting(lambda: np.arange(5.0))
    cnn_utils.cached("h", compute, seed=3)
    (path,) = cache.iterdir()
    path.write_bytes(b"not an npz file")
    capsys.readouterr()
    again = cnn_utils.cached("h", compute, seed=3)
    out = capsys.readouterr().out
    assert "could not be read" in out and "computing again" in out and len(calls) == 2
    np.testing.assert_array_equal(again, np.arange(5.0))
    # the damaged entry was replaced by a good one: the next call is a hit
    cnn_utils.cached("h", compute, seed=3)
    assert len(calls) == 2


def test_an_unwritable_cache_still_returns_the_value(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("the user's file")
    monkeypatch.setenv(cnn_utils.CACHE_ENV_VAR, str(blocker / "cache"))
    got = cnn_utils.cached("u", lambda: np.ones(2), seed=0)
    np.testing.assert_array_equal(got, np.ones(2))
    assert "not cached" in capsys.readouterr().out
    assert blocker.read_text() == "the user's file"


def test_values_that_cannot_be_stored_are_returned_uncached(cache, capsys):
    got = cnn_utils.cached("objs", lambda: [np.ones(2), "text"], seed=0)
    assert got[1] == "text" and "not cached" in capsys.readouterr().out
    assert not any(cache.glob("objs-*")) and not any(cache.glob(".*tmp*"))


def test_bad_names_and_compute_are_refused(cache):
    with pytest.raises(ValueError, match="name"):
        cnn_utils.cached("../escape", lambda: 1)
    with pytest.raises(TypeError, match="compute"):
        cnn_utils.cached("ok", 3)


def test_a_keras_model_round_trips_and_its_weights_are_a_key(cache):
    model = cnn_utils.build_mnist_cnn(seed=0)
    x = np.random.default_rng(0).random((4, 28, 28, 1)).astype(np.float32)
    compute, calls = counting(lambda: model)
    cnn_utils.cached("net", compute, seed=0)
    loaded = cnn_utils.cached("net", compute, seed=0)
    assert len(calls) == 1 and loaded is not model
    np.testing.assert_allclose(cnn_utils.predict_logits(loaded, x), cnn_utils.predict_logits(model, x), atol=1e-6)
    # a model as part of the key: other weights, another key
    other = cnn_utils.build_mnist_cnn(seed=1)
    assert cnn_utils.cache_key(model=model) == cnn_utils.cache_key(model=loaded)
    assert cnn_utils.cache_key(model=model) != cnn_utils.cache_key(model=other)
