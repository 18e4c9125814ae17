"""``pyrovae.compare``: fit several models on one train/held-out split and score them.

The module is also callable: ``pyrovae.compare(adata, ...)`` is
``pyrovae.compare.compare(adata, ...)``, and ``import pyrovae.compare as pc`` gives this
module (``pc.compare``, ``pc.plot_comparison``).
"""

from __future__ import annotations

import itertools
import sys
import time
import types
from typing import Any, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .likelihoods import get_likelihood
from .metrics import cluster_scores, kmeans_scores, latent_activity, n_active

__all__ = ["compare", "plot_comparison"]


def compare(
    adata: ad.AnnData,
    *,
    likelihoods: Sequence[str] = ("poisson", "nb", "zip", "zinb"),
    priors: Sequence[str] = ("normal",),
    n_hidden: Sequence[int | Sequence[int]] = (128,),
    n_latent: Sequence[int] = (10,),
    label_key: str | None = None,
    test_fraction: float = 0.1,
    n_samples: int = 100,
    seed: int = 0,
    progress: bool = True,
    **fit_options: Any,
) -> pd.DataFrame:
    """Fit every combination of the given likelihoods, priors and network sizes on the same
    cells, and score each on the same held-out cells.

    Parameters
    ----------
    adata
        The data (not modified). Likelihoods must model the same kind of data (all count
        likelihoods, say): held-out likelihoods of different data are not comparable.
    likelihoods, priors, n_hidden, n_latent
        The grid; every combination is fitted.
    label_key
        Column of ``adata.obs`` with known labels: adds ARI and NMI of KMeans on the
        latent means (all cells) and, for a mixture prior, of its own clusters.
    test_fraction
        Share of cells held out (chosen with ``numpy.random.default_rng(seed)``).
    n_samples
        Importance samples per held-out cell for the marginal log-likelihood.
    seed, progress, fit_options
        Passed to :func:`pyrovae.fit` (e.g. ``max_epochs=100``, ``layer="counts"``).

    Returns
    -------
    One row per model, best held-out marginal log-likelihood first: ``likelihood``,
    ``prior``, ``n_hidden``, ``n_latent``, ``marginal_ll`` and ``elbo`` (nats per held-out
    cell), ``reconstruction``, ``kl``, ``n_active`` (active latent dimensions on the
    training cells), with ``label_key`` ``kmeans_ari``, ``kmeans_nmi`` (and
    ``cluster_ari``, ``cluster_nmi`` for mixtures), and ``epochs`` and ``seconds`` of
    training. Plot it with :func:`plot_comparison`.

    Examples
    --------
    >>> import pyrovae
    >>> adata = pyrovae.datasets.simulate(n_cells=120, n_genes=40, n_clusters=3, seed=0)
    >>> table = pyrovae.compare(adata, likelihoods=("poisson", "nb"), n_samples=5,
    ...                         max_epochs=2, kl_warmup_epochs=1, progress=False)
    >>> sorted(table["likelihood"]), bool(table["marginal_ll"].is_monotonic_decreasing)
    (['nb', 'poisson'], True)
    """
    from .api import fit
    from .progress import progress_bar

    kinds = {get_likelihood(name).data for name in likelihoods}
    if len(kinds) > 1:
        raise ValueError(
            f"likelihoods {list(likelihoods)} model different kinds of data ({sorted(kinds)}); "
            "held-out likelihoods are only comparable on the same data"
        )
    if label_key is not None and label_key not in adata.obs:
        raise KeyError(f"adata.obs[{label_key!r}] not found; columns: {list(adata.obs.columns)}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(adata.n_obs)
    n_test = max(1, int(round(adata.n_obs * test_fraction)))
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    test = adata[test_idx].copy()
    labels = adata.obs[label_key].astype(str).to_numpy() if label_key else None

    grid = list(itertools.product(likelihoods, priors, n_hidden, n_latent))
    rows = []
    for likelihood, prior, hidden, latent_dim in progress_bar(grid, desc="comparing", disable=not progress):
        train = adata[train_idx].copy()
        options = dict(fit_options)
        if prior == "gmm" and labels is not None:
            options.setdefault("n_clusters", len(np.unique(labels)))
        start = time.perf_counter()
        model = fit(train, likelihood, prior=prior, n_hidden=hidden, n_latent=latent_dim,
                    seed=seed, progress=False, **options)
        seconds = time.perf_counter() - start
        elbo = model.elbo(test, n_samples=10).mean()
        row = {
            "likelihood": likelihood,
            "prior": prior,
            "n_hidden": str([int(h) for h in np.atleast_1d(hidden)]),  # "[128]", not np.int64
            "n_latent": latent_dim,
            "marginal_ll": float(model.marginal_log_likelihood(test, n_samples=n_samples).mean()),
            "elbo": float(elbo["elbo"]),
            "reconstruction": float(elbo["reconstruction"]),
            "kl": float(elbo["kl"]),
            "n_active": n_active(latent_activity(train.obsm["X_pyrovae"])),
        }
        if labels is not None:
            found = kmeans_scores(model.get_latent(adata), labels, seed=seed)
            row.update(kmeans_ari=found["ari"], kmeans_nmi=found["nmi"])
            if model.prior.n_clusters is not None:
                own = cluster_scores(labels, model.get_clusters(adata))
                row.update(cluster_ari=own["ari"], cluster_nmi=own["nmi"])
        row.update(epochs=int(model.history["epoch"].iloc[-1]), seconds=seconds)
        rows.append(row)
    table = pd.DataFrame(rows).sort_values("marginal_ll", ascending=False, ignore_index=True)
    table.attrs.update(n_train=len(train_idx), n_test=n_test, seed=seed, n_samples=n_samples)
    return table


def plot_comparison(table: pd.DataFrame, *, path=None):
    """Held-out marginal log-likelihood and ELBO of each model (points: the nats are far
    from 0, where bars would have to start), and KMeans ARI (bars from 0) when present;
    returns the Figure.

    Examples
    --------
    >>> import pyrovae
    >>> from pyrovae.compare import plot_comparison
    >>> adata = pyrovae.datasets.simulate(n_cells=120, n_genes=40, n_clusters=3, seed=0)
    >>> table = pyrovae.compare(adata, likelihoods=("poisson", "nb"), n_samples=5,
    ...                         max_epochs=2, kl_warmup_epochs=1, progress=False)
    >>> fig = plot_comparison(table)
    >>> len(fig.axes) >= 1
    True
    """
    import matplotlib.pyplot as plt

    from .plotting import _saved

    names = [
        " / ".join(str(row[k]) for k in ("likelihood", "prior", "n_hidden", "n_latent")
                   if table[k].nunique() > 1 or k == "likelihood")
        for _, row in table.iterrows()
    ]
    has_ari = "kmeans_ari" in table
    fig, axes = plt.subplots(1, 2 if has_ari else 1, figsize=(11 if has_ari else 6, 0.5 * len(table) + 1.5),
                             squeeze=False)
    ax = axes[0, 0]
    y = np.arange(len(table))
    for column, offset, marker, label in (("marginal_ll", -0.12, "o", "marginal log-likelihood"),
                                          ("elbo", 0.12, "s", "ELBO")):
        values = table[column].to_numpy(dtype=float)
        ax.hlines(y + offset, values.min(), values, color="lightgrey", lw=1)
        ax.plot(values, y + offset, marker, label=label)
    lo = min(table["elbo"].min(), table["marginal_ll"].min())
    hi = max(table["elbo"].max(), table["marginal_ll"].max())
    ax.set_xlim(lo - 0.1 * (hi - lo) - 1, hi + 0.1 * (hi - lo) + 1)
    ax.set_yticks(y, names)
    ax.set_ylim(len(table) - 0.5, -0.5)
    ax.set_xlabel("nats per held-out cell (higher is better)")
    ax.legend(frameon=False, fontsize="small")
    if has_ari:
        ax = axes[0, 1]
        ax.barh(y - 0.2, table["kmeans_ari"], height=0.4, label="KMeans on latent")
        if "cluster_ari" in table:
            ax.barh(y + 0.2, table["cluster_ari"].fillna(0), height=0.4, label="mixture's own clusters")
        ax.set_yticks(y, [""] * len(y))
        ax.set_ylim(len(table) - 0.5, -0.5)
        ax.set_xlabel("ARI against the labels")
        ax.set_xlim(min(0.0, float(table["kmeans_ari"].min())), 1)
        ax.legend(frameon=False, fontsize="small")
    fig.tight_layout()
    return _saved(fig, path)


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`compare`."""

    def __call__(self, *args, **kwargs) -> pd.DataFrame:
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
