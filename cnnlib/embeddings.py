"""Feature space: penultimate-layer features, t-SNE, UMAP and PCA embeddings and their measures.
"""
from __future__ import annotations

import sys

import numpy as np

from .checks import _check_pca_components, _check_seed, _converted, _is_int, _is_number
from .data import DEFAULT_SEED
from .activations import get_activations


#: The layer whose activations serve as the learned feature space (penultimate layer).
FEATURE_LAYER = "dense1"


def extract_features(model, images, layer=FEATURE_LAYER, batch_size=512, input_range="model"):
    """Activations of ``layer`` (default the penultimate ``dense1``) for a batch, flattened.

    Returns a float32 array (N, D) (D = 128 for ``dense1`` of the course CNN).
    Dropout is inactive at inference, so this is what the logits layer sees.
    """
    feats = get_activations(model, images, [layer], batch_size=batch_size, input_range=input_range)[layer]
    return feats.reshape(len(feats), -1)


def _as_points(x, name):
    a = _converted(x, name, "an array of numbers (N, D)")
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D), one row per point; got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contain NaN or infinite values.")
    return a


TSNE_METHODS = ("opentsne", "sklearn")


def _pca_reduce(x, pca_components, seed):
    if not pca_components:
        return x
    from sklearn.decomposition import PCA

    return PCA(n_components=pca_components, random_state=seed).fit_transform(x)


def tsne_embedding(features, perplexity=30.0, method="opentsne", n_iter=750, seed=DEFAULT_SEED,
                   n_jobs=2, pca_components=None):
    """2-D t-SNE of ``features`` (N, D); returns a float64 array (N, 2).

    ``method="opentsne"`` (Policar et al.; FFT-accelerated gradients from 10,000
    points on, Barnes-Hut below; the faster one here, see benchmarks/bench_tsne.py)
    or ``"sklearn"`` (Barnes-Hut). Both start
    from the PCA initialisation, with ``n_iter`` iterations in all (the first 250
    with early exaggeration; 750 is openTSNE's default schedule, 250 + 500). ``pca_components`` first reduces D with PCA (the
    usual step for raw pixels, e.g. 50).
    """
    x = _as_points(features, "features")
    if method not in TSNE_METHODS:
        raise ValueError(f"Unknown t-SNE method {method!r}; choose one of {', '.join(TSNE_METHODS)}.")
    if not _is_number(perplexity) or not _is_int(n_iter):
        raise TypeError(f"perplexity must be a number and n_iter an integer; got {perplexity!r}, {n_iter!r}.")
    if not 1 <= perplexity < len(x):
        raise ValueError(f"perplexity must be at least 1 and below the number of points ({len(x)}), "
                         f"got {perplexity}.")
    if n_iter <= 250:
        raise ValueError(f"n_iter counts the 250 early-exaggeration iterations too; it must exceed 250, "
                         f"got {n_iter}.")
    seed = _check_seed(seed)
    if not _is_int(n_jobs) or n_jobs == 0 or n_jobs < -1:
        raise ValueError(f"n_jobs must be a positive number of threads, or -1 for all cores; got {n_jobs!r}.")
    _check_pca_components(pca_components, x)
    n_distinct = len(np.unique(x, axis=0))
    if n_distinct < 3 * perplexity + 1:
        raise ValueError(
            f"features have only {n_distinct} distinct rows (of {len(x)}); t-SNE with perplexity "
            f"{perplexity} needs at least 3 * perplexity + 1 = {int(3 * perplexity + 1)} distinct "
            "points (duplicates have zero distance and break the perplexity calibration). Remove "
            "duplicates (np.unique(features, axis=0)) or lower perplexity."
        )
    x = _pca_reduce(x, pca_components, seed)
    if method == "opentsne":
        from openTSNE import TSNE

        emb = TSNE(n_components=2, perplexity=perplexity, early_exaggeration_iter=250,
                   n_iter=n_iter - 250, initialization="pca", negative_gradient_method="auto",
                   n_jobs=n_jobs, random_state=seed, verbose=False).fit(x)
        emb = np.asarray(emb, dtype=np.float64)
    else:
        from sklearn.manifold import TSNE

        emb = TSNE(n_components=2, perplexity=perplexity, max_iter=n_iter, init="pca",
                   learning_rate="auto", n_jobs=n_jobs, random_state=seed).fit_transform(x).astype(np.float64)
    if not np.all(np.isfinite(emb)):
        raise FloatingPointError(f"t-SNE ({method}) produced NaN coordinates; check features for "
                                 "near-duplicate rows or a constant column, or lower perplexity.")
    return emb


def _umap_class():
    """umap-learn's ``UMAP``, imported without its ``parametric_umap`` module.

    ``import umap`` also imports ``umap.parametric_umap``, which imports TensorFlow and
    then torchvision: the crash ``FrameworkOrderError`` guards against. The course uses
    plain UMAP only, so that module is kept out while the package loads (``umap.ParametricUMAP``
    is then umap-learn's own placeholder, which raises ImportError when used).
    """
    import warnings

    if "umap" not in sys.modules:
        blocked = "umap.parametric_umap" not in sys.modules
        if blocked:
            sys.modules["umap.parametric_umap"] = None        # makes `from .parametric_umap import` fail
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ImportWarning)
                import umap  # noqa: F401
        finally:
            if blocked and sys.modules.get("umap.parametric_umap", 0) is None:
                del sys.modules["umap.parametric_umap"]
    from umap.umap_ import UMAP

    return UMAP


def umap_embedding(features, n_neighbors=15, min_dist=0.1, seed=DEFAULT_SEED, pca_components=None):
    """2-D UMAP of ``features`` (N, D) (McInnes et al. 2018, ``umap-learn``); returns float64 (N, 2).

    Like t-SNE it keeps each point's nearest neighbours (``n_neighbors`` of them
    build the neighbour graph); ``min_dist`` sets how tightly points may pack on the
    map. Spectral initialisation, Euclidean distance, a fixed ``seed`` (which makes
    umap-learn run on one thread). The first call in a Python process compiles
    umap-learn's numba code, which takes seconds. ``pca_components`` first reduces D
    with PCA, as in ``tsne_embedding``.
    """
    x = _as_points(features, "features")
    if not _is_int(n_neighbors) or not 2 <= n_neighbors < len(x):
        raise ValueError(f"n_neighbors must be an integer from 2 to N - 1 = {len(x) - 1}, got {n_neighbors!r}.")
    if not _is_number(min_dist) or not 0 <= min_dist <= 1:
        raise ValueError(f"min_dist must be a number from 0 to 1, got {min_dist!r}.")
    seed = _check_seed(seed)
    _check_pca_components(pca_components, x)
    x = _pca_reduce(x, pca_components, seed)
    import warnings

    with warnings.catch_warnings():   # "n_jobs overridden to 1 by setting random_state": that is the point
        warnings.filterwarnings("ignore", message=".*n_jobs value.*overridden.*", category=UserWarning)
        emb = _umap_class()(n_components=2, n_neighbors=int(n_neighbors), min_dist=float(min_dist), init="spectral",
                   random_state=seed).fit_transform(x)
    emb = np.asarray(emb, dtype=np.float64)
    if not np.all(np.isfinite(emb)):
        raise FloatingPointError("UMAP produced NaN coordinates; check features for duplicate rows or a "
                                 "constant column.")
    return emb


def trustworthiness(features, embedding, n_neighbors=10, chunk_size=500):
    """Trustworthiness of an embedding (Venna & Kaski), as ``sklearn.manifold.trustworthiness``.

    1 when every point's ``n_neighbors`` nearest neighbours on the map are also
    near it in the original space; unexpected map neighbours are penalised by
    their rank in the original space. Same definition and value as scikit-learn's
    (tested), but computed in chunks of rows: scikit-learn's builds three N x N
    arrays (about 2.4 GB for 10,000 points); this needs ``chunk_size`` x N.
    """
    from sklearn.neighbors import NearestNeighbors

    x = _as_points(features, "features")
    e = _as_points(embedding, "embedding")
    for name, value in (("n_neighbors", n_neighbors), ("chunk_size", chunk_size)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    n, k = len(x), int(n_neighbors)
    if len(e) != n:
        raise ValueError(f"features have {n} rows but the embedding has {len(e)}; they must match.")
    if not 1 <= k < n / 2:
        raise ValueError(f"n_neighbors must be at least 1 and below n / 2 = {n / 2}, got {n_neighbors}.")
    map_nb = NearestNeighbors(n_neighbors=k).fit(e).kneighbors(return_distance=False)  # (n, k)
    sq = np.einsum("ij,ij->i", x, x)
    penalty = 0.0
    for start in range(0, n, chunk_size):
        rows = np.arange(start, min(start + chunk_size, n))
        d = sq[rows, None] - 2.0 * x[rows] @ x.T + sq[None, :]     # squared distances
        d[np.arange(len(rows)), rows] = np.inf                      # a point is not its own neighbour
        d_nb = np.take_along_axis(d, map_nb[rows], axis=1)          # (chunk, k)
        # rank of j among i's neighbours in the original space: 1 + points strictly closer
        rank = 1 + (d[:, None, :] < d_nb[:, :, None]).sum(axis=2)
        penalty += np.clip(rank - k, 0, None).sum()
    return float(1.0 - 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0)) * penalty)


def knn_label_disagreement(features, labels, n_neighbors=10):
    """For each point, how many of its nearest neighbours in feature space carry another label.

    Returns a dict: ``disagreement`` (N,) the fraction of the ``n_neighbors``
    neighbours (the point itself excluded) whose label differs; ``vote`` (N,) the
    most common neighbour label (ties to the smaller label); ``neighbors`` (N, k)
    their indices, nearest first. Points with disagreement > 0.5 sit inside
    another class's cluster: outliers, mislabelled or ambiguous examples.
    """
    from sklearn.neighbors import NearestNeighbors

    x = _as_points(features, "features")
    y = np.asarray(labels)
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise ValueError(f"labels must be non-negative integers of shape ({len(x)},); "
                         f"got shape {y.shape}, dtype {y.dtype}.")
    if not _is_int(n_neighbors):
        raise ValueError(f"n_neighbors must be an integer, got {n_neighbors!r}.")
    _, y = np.unique(y, return_inverse=True)   # labels 0..K-1 (e.g. 3, 7, 1000000000 -> 0, 1, 2)
    classes = np.unique(np.asarray(labels))
    k = int(n_neighbors)
    if not 1 <= k < len(x):
        raise ValueError(f"n_neighbors must be between 1 and N - 1 = {len(x) - 1}, got {n_neighbors}.")
    nb = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(return_distance=False)
    nb_labels = y[nb]
    counts = np.apply_along_axis(np.bincount, 1, nb_labels, minlength=int(y.max()) + 1)
    return {"disagreement": (nb_labels != y[:, None]).mean(axis=1),
            "vote": classes[counts.argmax(axis=1)], "neighbors": nb}
