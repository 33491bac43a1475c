"""Embedding helpers: features, t-SNE, trustworthiness, kNN label disagreement."""
import numpy as np
import pytest

import cnnlib.embeddings
import cnn_utils as cu


@pytest.mark.parametrize("k", [1, 5, 12])
def test_trustworthiness_matches_scikit_learn(k):
    from sklearn.decomposition import PCA
    from sklearn.manifold import trustworthiness as sk_trustworthiness

    rng = np.random.default_rng(k)
    x = rng.normal(size=(157, 8))
    for emb in (PCA(2).fit_transform(x), rng.normal(size=(157, 2)), x[:, :2]):
        expected = sk_trustworthiness(x, emb, n_neighbors=k)
        # chunk_size 40 does not divide 157: the last chunk is partial
        assert cu.trustworthiness(x, emb, n_neighbors=k, chunk_size=40) == pytest.approx(expected, abs=1e-12)


def test_trustworthiness_extremes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    assert cu.trustworthiness(x, x, n_neighbors=10) == pytest.approx(1.0)
    # a map that ignores the data keeps about chance-level neighbourhoods (~0.5)
    assert cu.trustworthiness(x, rng.normal(size=(200, 2)), n_neighbors=10) < 0.6
    with pytest.raises(ValueError, match="n / 2"):
        cu.trustworthiness(x[:10], x[:10], n_neighbors=5)
    with pytest.raises(ValueError, match="must match"):
        cu.trustworthiness(x, x[:5])


def test_knn_label_disagreement_by_hand():
    # points on a line: 0 1 2 2.5 | 10 11 12 ; labels 0 0 0 1 | 1 1 1 ; k = 2
    x = np.array([0, 1, 2, 2.5, 10, 11, 12], dtype=float)[:, None]
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    r = cu.knn_label_disagreement(x, y, n_neighbors=2)
    # 2.5 (label 1): neighbours 2 (d 0.5) and 1 (d 1.5), both label 0 -> 1.0, vote 0
    # 2   (label 0): neighbours 2.5 (label 1) and 1 (label 0)          -> 0.5, vote tie -> 0
    # 1   (label 0): neighbours 0 and 2 (d 1 each, both label 0)         -> 0.0
    np.testing.assert_allclose(r["disagreement"], [0, 0, 0.5, 1.0, 0, 0, 0])
    np.testing.assert_array_equal(r["vote"], [0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(r["neighbors"][3], [2, 1])
    with pytest.raises(ValueError, match="n_neighbors"):
        cu.knn_label_disagreement(x, y, n_neighbors=7)


def test_spread_out_indices_picks_the_corners():
    grid = np.stack(np.meshgrid(np.linspace(0.3, 0.7, 5), np.linspace(0.3, 0.7, 5)), -1).reshape(-1, 2)
    corners = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=float)
    pts = np.concatenate([grid, corners])
    idx = cu.spread_out_indices(pts, 5, seed=3)
    assert len(set(idx.tolist())) == 5
    assert set(range(25, 29)) <= set(idx.tolist())


@pytest.mark.parametrize("method", cu.TSNE_METHODS)
def test_tsne_of_a_curled_sheet_is_trustworthy(method):
    # a 2-D sheet rolled up in 3-D (swiss roll) plus 7 noise-free zero dimensions
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(400, noise=0.0, random_state=0)
    x = np.concatenate([x, np.zeros((400, 7))], axis=1)
    emb = cu.tsne_embedding(x, perplexity=20, method=method, n_iter=500, n_jobs=1, seed=0)
    assert emb.shape == (400, 2)
    assert np.all(np.isfinite(emb))
    assert cu.trustworthiness(x, emb, n_neighbors=10) > 0.95


def test_umap_of_a_curled_sheet_is_trustworthy():
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(400, noise=0.0, random_state=0)
    x = np.concatenate([x, np.zeros((400, 7))], axis=1)
    emb = cu.umap_embedding(x, n_neighbors=15, seed=0)
    assert emb.shape == (400, 2) and emb.dtype == np.float64
    assert cu.trustworthiness(x, emb, n_neighbors=10) > 0.95
    # a fixed seed gives the same map; with PCA first it still keeps the neighbourhoods
    np.testing.assert_array_equal(emb, cu.umap_embedding(x, n_neighbors=15, seed=0))
    emb_pca = cu.umap_embedding(x, n_neighbors=15, seed=0, pca_components=3)
    assert cu.trustworthiness(x, emb_pca, n_neighbors=10) > 0.95


def test_umap_bad_input():
    with pytest.raises(ValueError, match="n_neighbors"):
        cu.umap_embedding(np.zeros((10, 3)), n_neighbors=10)
    with pytest.raises(ValueError, match="min_dist"):
        cu.umap_embedding(np.random.default_rng(0).normal(size=(30, 3)), min_dist=2)
    with pytest.raises(ValueError, match="pca_components"):
        cu.umap_embedding(np.random.default_rng(0).normal(size=(30, 3)), pca_components=5)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        cu.umap_embedding(np.zeros(20))


def test_umap_loads_without_tensorflow_or_torchvision():
    # `import umap` alone imports TensorFlow, then torchvision (the crash FrameworkOrderError guards against);
    # umap_embedding keeps that module out
    import subprocess
    import sys

    code = ("import sys, cnn_utils, cnnlib.embeddings; cnnlib.embeddings._umap_class(); import umap; "
            "print(sorted(m for m in ('tensorflow', 'torchvision') if m in sys.modules), "
            "'umap.parametric_umap' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(__import__("pathlib").Path(cu.__file__).parent))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[] False"


def test_tsne_bad_input():
    with pytest.raises(ValueError, match="method"):
        cu.tsne_embedding(np.zeros((50, 3)), method="umap")
    with pytest.raises(ValueError, match="perplexity"):
        cu.tsne_embedding(np.zeros((20, 3)), perplexity=30)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        cu.tsne_embedding(np.zeros(20))


@pytest.fixture(scope="module")
def mnist_features(mnist, mnist_model):
    _, (x_test, y_test) = mnist
    return cu.extract_features(mnist_model, x_test[:1000]), y_test[:1000]


def test_extract_features_is_relu_of_dense1(mnist, mnist_model):
    import keras

    _, (x_test, _) = mnist
    feats = cu.extract_features(mnist_model, x_test[:20])
    assert feats.shape == (20, 128) and feats.dtype == np.float32
    # by hand: dense1 = relu(flatten @ W + b)
    flat = keras.Model(mnist_model.inputs, mnist_model.get_layer("flatten").output).predict(x_test[:20], verbose=0)
    w, b = mnist_model.get_layer("dense1").get_weights()
    np.testing.assert_allclose(feats, np.maximum(flat @ w + b, 0), atol=1e-4)
    # the logits are the logits layer applied to these features
    w2, b2 = mnist_model.get_layer("logits").get_weights()
    np.testing.assert_allclose(feats @ w2 + b2, cu.predict_logits(mnist_model, x_test[:20]), atol=1e-3)
    with pytest.raises(ValueError, match="dense1"):
        cu.extract_features(mnist_model, x_test[:2], layer="dense7")


def test_tsne_of_mnist_features_shape_and_trustworthiness(mnist_features):
    from sklearn.decomposition import PCA

    feats, labels = mnist_features
    emb = cu.tsne_embedding(feats, method="opentsne", n_iter=500, seed=0)
    assert emb.shape == (1000, 2)
    t_tsne = cu.trustworthiness(feats, emb, n_neighbors=10)
    t_pca = cu.trustworthiness(feats, PCA(2).fit_transform(feats), n_neighbors=10)
    assert t_tsne > 0.95
    assert t_tsne > t_pca + 0.05  # the linear map keeps neighbourhoods far worse
    # in the learned feature space nearly every digit's neighbours share its label
    assert np.mean(cu.knn_label_disagreement(feats, labels)["disagreement"]) < 0.05


def test_plot_embedding_legend_and_thumbnails():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.offsetbox import AnnotationBbox

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 2))
    labels = np.repeat([0, 1, 2], 10)            # only 3 of 10 classes in this sample
    images = rng.random((30, 28, 28, 1))
    names = [f"c{i}" for i in range(10)]
    fig = cu.plot_embedding({"A": emb, "B": emb}, labels, names, images=images, n_thumbnails=4)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == names
    for ax in fig.axes:
        assert sum(isinstance(a, AnnotationBbox) for a in ax.artists) == 4
    assert [ax.get_title() for ax in fig.axes] == ["A", "B"]
    with pytest.raises(ValueError, match=r"expected \(30, 2\)"):
        cu.plot_embedding(emb[:20], labels, names)
