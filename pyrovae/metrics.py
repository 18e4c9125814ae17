"""Scores of a latent space, as plain functions on arrays, and one function that reads an AnnData.

- against known labels: :func:`kmeans_scores`, :func:`leiden_scores`,
  :func:`cluster_scores` (any assignment, e.g. a mixture prior's own components) and
  :func:`silhouette`;
- of the latent space itself: :func:`latent_activity` and :func:`n_active` (Burda et al.
  2015);
- of batch correction: :func:`batch_mixing_entropy` (Lopez et al. 2018);
- all that apply to an AnnData at once: :func:`latent_metrics`.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.neighbors import NearestNeighbors

from ._threads import torch_threads_kept

__all__ = [
    "batch_mixing_entropy",
    "cluster_scores",
    "expected_calibration_error",
    "kmeans_scores",
    "latent_activity",
    "latent_metrics",
    "leiden_scores",
    "n_active",
    "reliability_table",
    "silhouette",
]


def cluster_scores(labels_true, labels_pred) -> dict[str, float]:
    """Agreement of an assignment of cells with known labels.

    Parameters
    ----------
    labels_true
        Known label of each cell.
    labels_pred
        Any assignment of the same cells (cluster numbers, a mixture's argmax, ...).

    Returns
    -------
    ``{"ari", "nmi"}``: adjusted Rand index (Hubert & Arabie 1985; 1 for identical
    partitions, about 0 for chance) and normalised mutual information (arithmetic mean
    normalisation, scikit-learn's default; in [0, 1]).

    Examples
    --------
    >>> from pyrovae.metrics import cluster_scores
    >>> scores = cluster_scores(["a", "a", "b", "b"], [1, 1, 0, 0])
    >>> scores["ari"], scores["nmi"]
    (1.0, 1.0)
    """
    labels_true, labels_pred = np.asarray(labels_true), np.asarray(labels_pred)
    if labels_true.shape != labels_pred.shape or labels_true.ndim != 1:
        raise ValueError(
            f"expected two label vectors of the same length, got shapes {labels_true.shape} "
            f"and {labels_pred.shape}"
        )
    return {
        "ari": float(adjusted_rand_score(labels_true, labels_pred)),
        "nmi": float(normalized_mutual_info_score(labels_true, labels_pred)),
    }


def kmeans_scores(
    latent: np.ndarray, labels, *, n_clusters: int | None = None, seed: int = 0
) -> dict[str, float]:
    """KMeans on ``latent`` (as many clusters as labels unless given); ARI and NMI against
    ``labels`` (see :func:`cluster_scores`).

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.metrics import kmeans_scores
    >>> labels = np.repeat([0, 1, 2], 50)
    >>> latent = np.random.default_rng(0).normal(size=(150, 4)) + 8 * labels[:, None]
    >>> round(kmeans_scores(latent, labels)["ari"], 3)
    1.0
    """
    labels = np.asarray(labels)
    k = n_clusters or len(np.unique(labels))
    found = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(latent)
    return cluster_scores(labels, found)


def leiden_scores(
    latent: np.ndarray,
    labels,
    *,
    resolution: float = 1.0,
    n_neighbors: int = 15,
    seed: int = 0,
) -> dict[str, float]:
    """Leiden clustering of a kNN graph of ``latent``; ARI and NMI against ``labels``.

    The graph and clustering are scanpy's defaults as a user would run them on
    ``use_rep="X_pyrovae"``: ``sc.pp.neighbors`` (UMAP connectivities), then
    ``sc.tl.leiden(flavor="igraph", n_iterations=2, directed=False)``, on a lightweight
    AnnData built here.

    Parameters
    ----------
    latent
        Cells x latent dimensions.
    labels
        Known label of each cell.
    resolution
        Leiden resolution: higher finds more clusters.
    n_neighbors
        Neighbours per cell in the graph.
    seed
        Seeds the neighbour search and Leiden.

    Returns
    -------
    ``{"ari", "nmi", "n_clusters"}``.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.metrics import leiden_scores
    >>> labels = np.repeat([0, 1], 60)
    >>> latent = np.random.default_rng(0).normal(size=(120, 4)) + 10 * labels[:, None]
    >>> leiden_scores(latent, labels, resolution=0.1)["ari"] > 0.9
    True
    """
    import scanpy as sc

    latent = np.asarray(latent, dtype=np.float32)
    light = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(latent))]),
                       obsm={"latent": latent})
    with torch_threads_kept():
        sc.pp.neighbors(light, use_rep="latent", n_neighbors=n_neighbors, random_state=seed)
    sc.tl.leiden(light, resolution=resolution, random_state=seed, flavor="igraph",
                 n_iterations=2, directed=False)
    found = light.obs["leiden"].to_numpy()
    return {**cluster_scores(np.asarray(labels), found), "n_clusters": len(np.unique(found))}


def silhouette(latent: np.ndarray, labels) -> float:
    """Average silhouette width of the cells by label, in [-1, 1] (Rousseeuw 1987).

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.metrics import silhouette
    >>> labels = np.repeat([0, 1], 50)
    >>> latent = np.random.default_rng(0).normal(size=(100, 2)) + 10 * labels[:, None]
    >>> silhouette(latent, labels) > 0.8
    True
    """
    return float(silhouette_score(latent, np.asarray(labels)))


def latent_activity(latent_means: np.ndarray) -> np.ndarray:
    """Activity of each latent dimension (Burda, Grosse & Salakhutdinov 2015).

    ``A_p = Cov_x(E_q[z_p | x])``: the variance across cells (``ddof=0``) of dimension
    ``p`` of the posterior means. A dimension whose mean does not move with the cell
    carries no information about it (the posterior equals the prior there: "posterior
    collapse").

    Parameters
    ----------
    latent_means
        Posterior means, ``(cells, n_latent)``, e.g. ``adata.obsm["X_pyrovae"]``.

    Returns
    -------
    ``(n_latent,)`` activities.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.metrics import latent_activity
    >>> means = np.random.default_rng(0).normal(size=(500, 3)) * [1.0, 0.5, 0.0]
    >>> np.round(latent_activity(means), 1)
    array([1.  , 0.2, 0. ])
    """
    latent_means = np.asarray(latent_means, dtype=np.float64)
    if latent_means.ndim != 2 or len(latent_means) < 2:
        raise ValueError(f"expected latent means (cells >= 2, n_latent), got shape {latent_means.shape}")
    return latent_means.var(axis=0)


def n_active(activity: np.ndarray, *, threshold: float = 0.01) -> int:
    """Number of active dimensions: activity above ``threshold`` (Burda et al. use 0.01).

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.metrics import n_active
    >>> n_active(np.array([0.8, 0.3, 0.001]))
    2
    """
    return int((np.asarray(activity) > threshold).sum())


def batch_mixing_entropy(
    latent: np.ndarray,
    batches,
    *,
    n_neighbors: int = 50,
    n_pools: int = 50,
    n_samples_per_pool: int = 100,
    seed: int = 0,
) -> float:
    """Entropy of batch mixing (Haghverdi et al. 2018, as in scVI, Lopez et al. 2018).

    Definition, as in scVI's ``entropy_batch_mixing``:

    1. find the ``n_neighbors`` nearest neighbours (Euclidean) of every cell in
       ``latent``, the cell itself excluded;
    2. for a cell ``i``, with ``p_ib`` the fraction of its neighbours from batch ``b``, its
       entropy is ``H_i = -sum_b p_ib log p_ib`` (natural log; ``0 log 0 = 0``);
    3. draw ``n_samples_per_pool`` cells uniformly with replacement and average their
       ``H_i``; repeat for ``n_pools`` pools and average the pools.

    Values lie in ``[0, log B]`` for ``B`` batches: 0 when every neighbourhood holds one
    batch, close to ``log B`` when the batches are mixed in equal proportions everywhere.
    scVI's original accepts two batches only; here any number is accepted. Higher is better
    mixed, but only together with a score of biological separation (the latent space of
    random noise mixes batches perfectly).

    Parameters
    ----------
    latent
        Cells x latent dimensions.
    batches
        The batch of each cell.
    n_neighbors
        Neighbours per cell (at most ``cells - 1``).
    n_pools, n_samples_per_pool
        How many cells are averaged, in how many pools.
    seed
        Seeds the choice of cells.

    Returns
    -------
    The averaged entropy, in nats.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.metrics import batch_mixing_entropy
    >>> rng = np.random.default_rng(0)
    >>> latent = rng.normal(size=(200, 5))
    >>> mixed = np.repeat(["a", "b"], 100)          # batches that do not shape the latent
    >>> apart = latent + 10 * (mixed == "b")[:, None]  # batches far apart
    >>> batch_mixing_entropy(latent, mixed) > batch_mixing_entropy(apart, mixed)
    True
    """
    latent = np.asarray(latent, dtype=np.float64)
    codes = pd.factorize(np.asarray(batches))[0]
    if latent.ndim != 2 or codes.shape != (len(latent),):
        raise ValueError(
            f"expected latent (cells, dims) and one batch per cell, got shapes {latent.shape} "
            f"and {codes.shape}"
        )
    if len(latent) < 2:
        raise ValueError("the batch mixing entropy needs at least 2 cells")
    if (codes < 0).any():
        raise ValueError(f"{int((codes < 0).sum())} cells have no batch (missing values)")
    k = min(n_neighbors, len(latent) - 1)
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, len(latent), size=(n_pools, n_samples_per_pool))
    cells, where = np.unique(chosen, return_inverse=True)
    neighbours = _neighbours(latent, cells, k)
    counts = np.zeros((len(cells), codes.max() + 1))
    np.add.at(counts, (np.repeat(np.arange(len(cells)), k), codes[neighbours].ravel()), 1.0)
    p = counts / k
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(entropy[where.reshape(chosen.shape)].mean(axis=1).mean())


def _neighbours(latent: np.ndarray, cells: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` nearest neighbours of ``latent[cells]`` among all cells, each cell itself
    left out (also when another cell sits at the same point)."""
    found = NearestNeighbors(n_neighbors=k + 1).fit(latent).kneighbors(
        latent[cells], return_distance=False)
    is_self = found == cells[:, None]
    # drop the cell itself where it was found, the farthest neighbour where it was not
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(found, dtype=bool)
    keep[np.arange(len(cells)), drop] = False
    return found[keep].reshape(len(cells), k)


def latent_metrics(
    adata: ad.AnnData,
    *,
    use_rep: str = "X_pyrovae",
    label_key: str | None = None,
    batch_key: str | None = None,
    threshold: float = 0.01,
    seed: int = 0,
) -> dict[str, float]:
    """The metrics of this module that apply to ``adata``'s latent space; ``adata`` is not
    modified.

    Parameters
    ----------
    adata
        Holds the latent means in ``adata.obsm[use_rep]``.
    use_rep
        Key of the latent means in ``adata.obsm``.
    label_key
        Column of ``adata.obs`` with known cell labels (cell types, simulated clusters);
        adds the label scores.
    batch_key
        Column of ``adata.obs`` with the batch of each cell; adds the batch mixing entropy.
    threshold
        Activity above which a latent dimension counts as active.
    seed
        Seeds KMeans, Leiden and the batch entropy's choice of cells.

    Returns
    -------
    Always ``n_active`` (active dimensions) and ``n_latent``; with ``label_key``,
    ``silhouette``, ``kmeans_ari``, ``kmeans_nmi``, ``leiden_ari``, ``leiden_nmi`` and
    ``leiden_n_clusters``; with ``batch_key``, ``batch_entropy``.

    Raises
    ------
    KeyError
        If ``use_rep``, ``label_key`` or ``batch_key`` is missing (the message lists what
        there is).
    ValueError
        If the labels or batches of some cells are missing.

    Examples
    --------
    >>> import pyrovae
    >>> from pyrovae.metrics import latent_metrics
    >>> adata = pyrovae.datasets.simulate(n_cells=120, n_genes=40, n_clusters=3, seed=0)
    >>> model = pyrovae.fit(adata, likelihood="nb", max_epochs=2, kl_warmup_epochs=1,
    ...                     progress=False)
    >>> scores = latent_metrics(adata, label_key="cluster")
    >>> {"silhouette", "n_active"} <= set(scores)
    True
    """
    if use_rep not in adata.obsm:
        raise KeyError(f"adata.obsm[{use_rep!r}] not found; available: {list(adata.obsm.keys())}")
    latent = np.asarray(adata.obsm[use_rep])
    out: dict[str, float] = {
        "n_active": n_active(latent_activity(latent), threshold=threshold),
        "n_latent": latent.shape[1],
    }
    if label_key is not None:
        labels = _obs_column(adata, label_key)
        kmeans = kmeans_scores(latent, labels, seed=seed)
        leiden = leiden_scores(latent, labels, seed=seed)
        out.update({
            "silhouette": silhouette(latent, labels),
            "kmeans_ari": kmeans["ari"], "kmeans_nmi": kmeans["nmi"],
            "leiden_ari": leiden["ari"], "leiden_nmi": leiden["nmi"],
            "leiden_n_clusters": leiden["n_clusters"],
        })
    if batch_key is not None:
        out["batch_entropy"] = batch_mixing_entropy(latent, _obs_column(adata, batch_key), seed=seed)
    return out


def _obs_column(adata: ad.AnnData, key: str) -> np.ndarray:
    if key not in adata.obs.columns:
        raise KeyError(f"adata.obs[{key!r}] not found; available columns: {list(adata.obs.columns)}")
    column = adata.obs[key]
    missing = int(column.isna().sum())
    if missing:
        raise ValueError(f"adata.obs[{key!r}] has {missing} missing values; label every cell "
                         "or subset to the labelled cells first")
    return column.astype(str).to_numpy()


def reliability_table(probs, labels_true, *, n_bins: int = 15) -> pd.DataFrame:
    """Confidence against accuracy of probabilistic predictions, in equal-width bins.

    Parameters
    ----------
    probs
        ``(cells, classes)`` predicted probabilities (a DataFrame's columns name the
        classes; an array's columns are classes ``0..K-1``).
    labels_true
        The true class of each cell (a column name of ``probs``, or an index).
    n_bins
        Bins of the confidence ``max_k p_k`` over ``(0, 1]``: bin ``b`` holds
        ``b/n < confidence <= (b+1)/n``.

    Returns
    -------
    One row per bin: ``lower``, ``upper``, ``n_cells``, mean ``confidence`` and
    ``accuracy`` (NaN in empty bins).

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.metrics import reliability_table
    >>> probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    >>> table = reliability_table(probs, [0, 1, 1, 1], n_bins=5)
    >>> table[["n_cells", "confidence", "accuracy"]].tail(3)
       n_cells  confidence  accuracy
    2        1        0.60       0.0
    3        2        0.75       1.0
    4        1        0.90       1.0
    """
    if isinstance(probs, pd.DataFrame):
        classes = np.asarray(probs.columns.astype(str))
        values = probs.to_numpy(dtype=np.float64)
        truth = np.asarray(labels_true).astype(str)
        unknown = ~np.isin(truth, classes)
        if unknown.any():
            raise ValueError(f"{int(unknown.sum())} true labels are not among the classes "
                             f"{list(classes)}, e.g. {truth[unknown][0]!r}")
        correct = classes[values.argmax(1)] == truth
    else:
        values = np.asarray(probs, dtype=np.float64)
        correct = values.argmax(1) == np.asarray(labels_true)
    if values.ndim != 2 or len(values) != len(correct):
        raise ValueError(f"probs must be (cells, classes) with one row per true label, got "
                         f"{values.shape} for {len(correct)} labels")
    confidence = values.max(1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        inside = which == b
        n = int(inside.sum())
        rows.append({"lower": edges[b], "upper": edges[b + 1], "n_cells": n,
                     "confidence": confidence[inside].mean() if n else np.nan,
                     "accuracy": correct[inside].mean() if n else np.nan})
    return pd.DataFrame(rows)


def expected_calibration_error(probs, labels_true, *, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): ``sum_b (n_b / n) |accuracy_b - confidence_b|`` over the
    equal-width confidence bins of :func:`reliability_table` (15 by default).

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.metrics import expected_calibration_error
    >>> probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    >>> round(expected_calibration_error(probs, [0, 1, 1, 1], n_bins=5), 3)  # (0.6 + 2 * 0.25 + 0.1) / 4
    0.3
    """
    table = reliability_table(probs, labels_true, n_bins=n_bins)
    full = table[table["n_cells"] > 0]
    weights = full["n_cells"] / full["n_cells"].sum()
    return float((weights * (full["accuracy"] - full["confidence"]).abs()).sum())
