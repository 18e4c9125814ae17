"""Imputation benchmark, as in scVI's paper (Lopez et al. 2018, "Imputation").

Hide a random share of the non-zero counts (set them to 0 in a copy), fit a model to the
masked counts, and compare what each method predicts at the hidden entries with the
counts that were there. Every method predicts the mean count of cell ``n`` and gene ``g``
as the cell's observed (masked) library ``l_n`` times a share of it:

``model``
    ``l_n * rho_ng``: the fitted model's normalised expression, averaged over posterior
    draws, zero inflation left out (as scVI, whose imputed value is the negative
    binomial's mean).
``gene_mean``
    ``l_n * sum_m x_mg / sum_m l_m``: the gene's share of all masked counts.
``knn``
    ``l_n * mean_{m in N(n)} x_mg / l_m``: the average share in the cell's ``k`` nearest
    neighbours, found in the principal components of the log-normalised masked counts.

The score is the median absolute error ``median |prediction - truth|`` over the hidden
entries (scVI's "median L1 distance"), with the mean absolute error and the correlation of
``log1p(prediction)`` with ``log1p(truth)`` beside it. Read the median with the other two:
most hidden counts are small (often half of them 1), so a prediction near 1 everywhere
scores a low median error while it says nothing about which counts are large.

- :func:`hide_counts`, :func:`gene_mean_prediction` and :func:`knn_prediction` work on
  matrices;
- :func:`imputation_benchmark` takes an AnnData, fits a model and scores all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .data import InvalidDataError
from .metrics import _neighbours

if TYPE_CHECKING:
    from .vae import VAE

__all__ = [
    "Imputation",
    "gene_mean_prediction",
    "hide_counts",
    "imputation_benchmark",
    "knn_prediction",
]


def hide_counts(X, fraction: float = 0.1, *, seed: int = 0
                ) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """Set a random share of the non-zero entries of ``X`` to 0, in a copy.

    Entries are drawn uniformly without replacement among the non-zero ones. A cell or a
    gene that would lose all its counts gets one of its hidden entries back (a model
    cannot be fitted to a cell without counts), so slightly fewer than ``fraction`` of the
    entries may end up hidden.

    Parameters
    ----------
    X
        Cells x genes counts, dense or sparse; not modified.
    fraction
        Share of the non-zero entries to hide, in (0, 1).
    seed
        Seeds the choice.

    Returns
    -------
    ``(masked, rows, cols, values)``: the masked counts (CSR, float32) and the positions
    and original values of the hidden entries.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.imputation import hide_counts
    >>> X = np.arange(1, 21, dtype=float).reshape(4, 5)
    >>> masked, rows, cols, values = hide_counts(X, fraction=0.25, seed=0)
    >>> len(values), masked.nnz, bool((masked[rows, cols] == 0).all())
    (5, 15, True)
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    masked = sp.csr_matrix(X, dtype=np.float32, copy=True)
    masked.eliminate_zeros()
    masked.sort_indices()
    n_hidden = int(round(fraction * masked.nnz))
    if n_hidden == 0:
        raise InvalidDataError(
            f"hiding {fraction:g} of {masked.nnz} non-zero counts hides none; use more data"
        )
    rng = np.random.default_rng(seed)
    hidden = np.zeros(masked.nnz, dtype=bool)
    hidden[rng.choice(masked.nnz, size=n_hidden, replace=False)] = True
    rows = np.repeat(np.arange(masked.shape[0]), np.diff(masked.indptr))
    cols = masked.indices
    for line in (rows, cols):  # give back one hidden entry of each emptied cell, then gene
        emptied = np.setdiff1d(line[hidden], line[~hidden])
        where = np.flatnonzero(hidden)
        found, first = np.unique(line[where], return_index=True)
        hidden[where[first[np.isin(found, emptied)]]] = False
    values = masked.data[hidden].copy()
    rows, cols = rows[hidden], cols[hidden].copy()
    masked.data[hidden] = 0.0
    masked.eliminate_zeros()
    return masked, rows, cols, values


def gene_mean_prediction(masked, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The baseline ``l_n * sum_m x_mg / sum_m l_m`` at the entries ``(rows, cols)``.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.imputation import gene_mean_prediction
    >>> X = np.array([[2.0, 2.0], [4.0, 4.0]])
    >>> gene_mean_prediction(X, np.array([0, 1]), np.array([1, 0]))  # l_n * gene share
    array([2., 4.])
    """
    masked = sp.csr_matrix(masked)
    library = np.asarray(masked.sum(axis=1), dtype=np.float64).ravel()
    share = np.asarray(masked.sum(axis=0), dtype=np.float64).ravel() / library.sum()
    return library[rows] * share[cols]


def knn_prediction(masked, rows: np.ndarray, cols: np.ndarray, *, n_neighbors: int = 15,
                   n_pcs: int = 50, seed: int = 0) -> np.ndarray:
    """The baseline ``l_n * mean_{m in N(n)} x_mg / l_m`` at the entries ``(rows, cols)``.

    ``N(n)`` are the ``n_neighbors`` nearest cells to cell ``n`` (itself left out),
    Euclidean in the first ``n_pcs`` principal components of ``log1p(1e4 * x / l)``, the
    masked counts log-normalised as scanpy's ``normalize_total`` and ``log1p`` do.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.imputation import hide_counts, knn_prediction
    >>> X = np.random.default_rng(0).poisson(5.0, size=(60, 20)).astype(float)
    >>> masked, rows, cols, values = hide_counts(X, fraction=0.1, seed=0)
    >>> predicted = knn_prediction(masked, rows, cols, n_neighbors=5, n_pcs=5)
    >>> predicted.shape == values.shape and bool((predicted >= 0).all())
    True
    """
    from sklearn.decomposition import PCA

    masked = sp.csr_matrix(masked, dtype=np.float64)
    library = np.asarray(masked.sum(axis=1)).ravel()
    shares = sp.csr_matrix(masked.multiply(1.0 / library[:, None]))
    lognorm = np.log1p(1e4 * shares.toarray())
    n_pcs = min(n_pcs, min(lognorm.shape) - 1)
    pcs = PCA(n_components=n_pcs, random_state=seed).fit_transform(lognorm)
    k = min(n_neighbors, len(pcs) - 1)
    # the average share of gene g in the neighbours of cell n, only for the cells asked
    cells, where = np.unique(rows, return_inverse=True)
    neighbours = _neighbours(pcs, cells, k)
    average = np.zeros((len(cells), masked.shape[1]))
    for j in range(k):
        average += shares[neighbours[:, j]].toarray()
    return library[rows] * average[where, cols] / k


@dataclass
class Imputation:
    """The result of :func:`imputation_benchmark`.

    Attributes
    ----------
    summary
        One row per method (``model``, ``gene_mean``, ``knn``): ``median_abs_error``,
        ``mean_abs_error`` and ``log_correlation`` (Pearson, of ``log1p`` of prediction
        and truth) over the hidden entries, and ``n_hidden``.
    hidden
        One row per hidden entry: ``cell``, ``gene``, ``truth`` (the hidden count) and each
        method's prediction.
    model
        The model fitted to the masked counts.

    Examples
    --------
    >>> import pyrovae
    >>> from pyrovae.imputation import imputation_benchmark
    >>> adata = pyrovae.datasets.simulate(n_cells=120, n_genes=40, n_clusters=3, seed=0)
    >>> result = imputation_benchmark(adata, max_epochs=2, kl_warmup_epochs=1, n_pcs=10,
    ...                               progress=False)
    >>> type(result.summary).__name__, type(result.hidden).__name__
    ('DataFrame', 'DataFrame')
    """

    summary: pd.DataFrame
    hidden: pd.DataFrame
    model: "VAE"


def imputation_benchmark(
    adata: ad.AnnData,
    *,
    fraction: float = 0.1,
    layer: str | None = None,
    n_neighbors: int = 15,
    n_pcs: int = 50,
    n_samples: int = 10,
    seed: int = 0,
    progress: bool = True,
    **fit_options,
) -> Imputation:
    """Hide ``fraction`` of the non-zero counts, fit a model to the rest, and score its
    predictions of the hidden counts against the gene-mean and kNN baselines.

    Parameters
    ----------
    adata
        Cells x raw counts; not modified (the model is fitted to a masked copy, with the
        same ``obs`` so that covariate keys work).
    fraction
        Share of the non-zero counts to hide (:func:`hide_counts`).
    layer
        Read the counts from ``adata.layers[layer]``; ``adata.X`` when None.
    n_neighbors, n_pcs
        Of the kNN baseline (:func:`knn_prediction`).
    n_samples
        Posterior draws averaged in the model's prediction.
    seed
        Seeds the hidden entries, the fit (unless ``fit_options`` has its own ``seed``)
        and the baselines.
    progress
        Show the training progress bar.
    fit_options
        Passed to :func:`pyrovae.fit`, e.g. ``likelihood="nb"``, ``max_epochs=100``,
        ``batch_key="batch"``.

    Returns
    -------
    :class:`Imputation`.

    Examples
    --------
    >>> import pyrovae
    >>> from pyrovae.imputation import imputation_benchmark
    >>> adata = pyrovae.datasets.simulate(n_cells=120, n_genes=40, n_clusters=3, seed=0)
    >>> result = imputation_benchmark(adata, max_epochs=2, kl_warmup_epochs=1, n_pcs=10,
    ...                               progress=False)
    >>> len(result.summary) >= 2
    True
    """
    from .api import fit

    counts = adata.X if layer is None else adata.layers[layer]
    masked, rows, cols, truth = hide_counts(counts, fraction, seed=seed)
    copy = ad.AnnData(X=masked, obs=adata.obs.copy(), var=pd.DataFrame(index=adata.var_names.copy()))
    fit_options.setdefault("seed", seed)
    model = fit(copy, progress=progress, **fit_options)
    library = np.asarray(masked.sum(axis=1), dtype=np.float64).ravel()
    expression = model.get_normalized_expression(copy, library_size=1.0, n_samples=n_samples,
                                                 seed=seed)
    predictions = {
        "model": library[rows] * expression[rows, cols],
        "gene_mean": gene_mean_prediction(masked, rows, cols),
        "knn": knn_prediction(masked, rows, cols, n_neighbors=n_neighbors, n_pcs=n_pcs, seed=seed),
    }
    hidden = pd.DataFrame({"cell": adata.obs_names[rows], "gene": adata.var_names[cols],
                           "truth": truth, **predictions})
    errors = {name: np.abs(p - truth) for name, p in predictions.items()}
    summary = pd.DataFrame({
        "median_abs_error": {name: float(np.median(e)) for name, e in errors.items()},
        "mean_abs_error": {name: float(e.mean()) for name, e in errors.items()},
        "log_correlation": {name: float(np.corrcoef(np.log1p(p), np.log1p(truth))[0, 1])
                            for name, p in predictions.items()},
        "n_hidden": {name: len(truth) for name in errors},
    })
    summary.index.name = "method"
    return Imputation(summary, hidden, model)
