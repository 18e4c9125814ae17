"""Data sets that need no download: real PBMCs bundled with scanpy, and simulated counts."""

from __future__ import annotations

from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["pbmc68k", "simulate"]


def pbmc68k() -> ad.AnnData:
    """700 PBMCs x 765 genes, integer UMI counts, 10 cell types in ``obs["cell_type"]``.

    Rebuilt from scanpy's bundled ``pbmc68k_reduced`` (a subsample of Zheng et al. 2017):
    its ``.raw.X`` holds ``log1p(counts / n_counts * 1e4)``, so
    ``round(expm1(raw.X) * n_counts / 1e4)`` gives the counts back. ``obs["cell_type"]``
    is the data set's ``bulk_labels`` (FACS-sorted populations).

    Examples
    --------
    >>> import pyrovae
    >>> adata = pyrovae.datasets.pbmc68k()
    >>> adata.shape, adata.obs["cell_type"].nunique()
    ((700, 765), 10)
    """
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    lognorm = reduced.raw.X
    lognorm = lognorm.tocsr() if sp.issparse(lognorm) else sp.csr_matrix(lognorm)
    size_factor = reduced.obs["n_counts"].to_numpy(np.float64) / 1e4
    counts = lognorm.astype(np.float64)
    counts.data = np.expm1(counts.data)
    counts = sp.csr_matrix(counts.multiply(size_factor[:, None]))
    counts.data = np.round(counts.data)
    counts.eliminate_zeros()
    obs = reduced.obs[["n_genes", "percent_mito", "n_counts", "phase"]].copy()
    obs.insert(0, "cell_type", reduced.obs["bulk_labels"].astype("category"))
    var = pd.DataFrame(index=reduced.raw.var_names.copy())
    return ad.AnnData(X=counts.astype(np.float32), obs=obs, var=var)


def simulate(
    n_cells: int = 2000,
    n_genes: int = 500,
    n_clusters: int = 5,
    *,
    likelihood: Literal["poisson", "nb", "zip", "zinb"] = "zinb",
    n_latent: int = 10,
    separation: float = 2.0,
    library_size: float = 2000.0,
    seed: int = 0,
    chunk_size: int = 10_000,
    n_batches: int = 1,
    batch_effect: float = 0.5,
    n_de_genes: int = 0,
    de_log_fold_change: float = 1.0,
) -> ad.AnnData:
    """Counts drawn from a known generative process, with the true cluster of each cell.

    The process, for cell ``n`` in cluster ``k``::

        c_k ~ N(0, separation^2 I)              cluster centres in a latent space
        z_n ~ N(c_k, I)
        rho_n = softmax(W z_n + b)              W ~ N(0, 1/n_latent), b ~ N(0, 1)
        l_n ~ LogNormal(log(library_size), 0.3)
        x_ng ~ Likelihood(mean = l_n * rho_ng, theta_g, pi_g)

    with ``theta_g ~ LogNormal(log 3, 0.5)`` (``nb``, ``zinb``) and zero-inflation
    ``pi_g = sigmoid(N(-1.5, 0.5))`` (``zip``, ``zinb``). Cells are drawn in chunks, so a
    million cells never sit in memory as a dense matrix.

    Two known effects can be added on top, each multiplying the mean ``l_n * rho_ng``
    before the counts are drawn (so the cells' totals move with them):

    - batches (``n_batches > 1``): each cell is put in one of ``n_batches`` batches
      uniformly at random, and the mean of gene ``g`` in batch ``b`` is multiplied by
      ``f_bg = exp(N(0, batch_effect^2))``. Batch ``b0`` is the reference: its factors are
      all 1, and only batches ``b1, b2, ...`` are drawn, so ``f_bg`` is the effect of
      batch ``b`` relative to ``b0``.
    - differential expression (``n_de_genes > 0``): each cell is in condition ``"A"`` or
      ``"B"`` with probability 1/2, independently of its cluster and batch; ``n_de_genes``
      genes chosen at random have their mean in condition B multiplied by
      ``exp(+de_log_fold_change)`` or ``exp(-de_log_fold_change)`` (sign at random).

    Their random numbers come from their own streams (``rng.spawn``), so with
    ``n_batches=1`` and ``n_de_genes=0`` the result is the same, bit for bit, as without
    these options, and turning one on does not change the cells' clusters, latent
    positions or libraries.

    Parameters
    ----------
    n_cells, n_genes, n_clusters
        Size of the data set and number of cell types.
    likelihood
        Which count distribution the counts are drawn from.
    n_latent, separation
        Dimension of the true latent space and the spread of the cluster centres.
    library_size
        Median library size ``l`` (before the batch and condition factors).
    seed
        Seeds everything.
    chunk_size
        Cells drawn at a time (does not change the draws).
    n_batches, batch_effect
        Number of batches and the standard deviation of the log batch factors.
    n_de_genes, de_log_fold_change
        Number of genes that differ between conditions A and B, and the size of their
        natural-log fold change (B over A).

    Returns
    -------
    AnnData with sparse float32 counts in ``X``, ``obs["cluster"]`` (categorical),
    ``obs["library"]``, the true latent positions in ``obsm["X_true_latent"]``, the gene
    parameters in ``var`` and the settings in ``uns["simulation"]``. With batches, also
    ``obs["batch"]`` (categorical, ``"b0"``, ``"b1"``, ...) and the true factors ``f_bg``
    in ``varm["true_batch_factor"]`` (genes x batches, column 0 all ones). With
    differential expression, also ``obs["condition"]`` (categorical, ``"A"``, ``"B"``),
    ``var["de"]`` (bool) and ``var["true_log_fold_change"]`` (natural log, B over A; 0 for
    the other genes).

    Examples
    --------
    >>> import pyrovae
    >>> adata = pyrovae.datasets.simulate(n_cells=100, n_genes=30, n_clusters=3, seed=0)
    >>> adata.shape, sorted(adata.obs["cluster"].unique())
    ((100, 30), ['0', '1', '2'])
    """
    if likelihood not in ("poisson", "nb", "zip", "zinb"):
        raise ValueError(f"simulate draws counts: likelihood must be poisson, nb, zip or zinb, got {likelihood!r}")
    if min(n_cells, n_genes, n_clusters, n_latent, n_batches) < 1:
        raise ValueError("n_cells, n_genes, n_clusters, n_latent and n_batches must be positive")
    if not 0 <= n_de_genes <= n_genes:
        raise ValueError(f"n_de_genes must be between 0 and n_genes ({n_genes}), got {n_de_genes}")
    if batch_effect < 0:
        raise ValueError(f"batch_effect is a standard deviation, got {batch_effect}")
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, separation, (n_clusters, n_latent))
    weights = rng.normal(0.0, 1.0 / np.sqrt(n_latent), (n_latent, n_genes))
    bias = rng.normal(0.0, 1.0, n_genes)
    theta = np.exp(rng.normal(np.log(3.0), 0.5, n_genes))
    gate = 1.0 / (1.0 + np.exp(-rng.normal(-1.5, 0.5, n_genes)))
    proportions = rng.dirichlet(np.full(n_clusters, 10.0))
    labels = rng.choice(n_clusters, size=n_cells, p=proportions)
    z = centres[labels] + rng.normal(size=(n_cells, n_latent))
    library = np.exp(rng.normal(np.log(library_size), 0.3, n_cells))

    # one stream per kind of draw, so that the counts do not depend on chunk_size
    gamma_rng, poisson_rng, gate_rng = (np.random.default_rng(s) for s in rng.spawn(3))
    # the batch and condition effects draw from streams spawned after those three, so the
    # draws above and the counts' streams are the same whether they are on or off
    batch_rng, de_rng = (np.random.default_rng(s) for s in rng.spawn(2))
    batches = batch_rng.integers(n_batches, size=n_cells) if n_batches > 1 else None
    batch_factor = np.ones((n_batches, n_genes))
    if n_batches > 1:
        batch_factor[1:] = np.exp(batch_rng.normal(0.0, batch_effect, (n_batches - 1, n_genes)))
    log_fold_change = np.zeros(n_genes)
    condition = None
    if n_de_genes > 0:
        condition = de_rng.integers(2, size=n_cells)  # 1 is condition B
        de_genes = de_rng.choice(n_genes, size=n_de_genes, replace=False)
        sign = de_rng.choice([-1.0, 1.0], size=n_de_genes)
        log_fold_change[de_genes] = sign * de_log_fold_change
    blocks = []
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        logits = z[start:stop] @ weights + bias
        rho = np.exp(logits - logits.max(1, keepdims=True))
        rho /= rho.sum(1, keepdims=True)
        mu = library[start:stop, None] * rho
        if batches is not None:
            mu = mu * batch_factor[batches[start:stop]]
        if condition is not None:
            mu = mu * np.exp(np.outer(condition[start:stop], log_fold_change))
        if likelihood in ("nb", "zinb"):
            mu = gamma_rng.gamma(theta, mu / theta)
        counts = poisson_rng.poisson(mu)
        if likelihood in ("zip", "zinb"):
            counts[gate_rng.random(counts.shape) < gate] = 0
        blocks.append(sp.csr_matrix(counts.astype(np.float32)))
    X = sp.vstack(blocks, format="csr")

    obs = pd.DataFrame(
        {
            "cluster": pd.Categorical([str(k) for k in labels], categories=[str(k) for k in range(n_clusters)]),
            "library": np.asarray(X.sum(1)).ravel(),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame({"mean": np.asarray(X.mean(0)).ravel()}, index=[f"gene{g}" for g in range(n_genes)])
    if likelihood in ("nb", "zinb"):
        var["theta"] = theta
    if likelihood in ("zip", "zinb"):
        var["gate"] = gate
    if batches is not None:
        names = [f"b{b}" for b in range(n_batches)]
        obs["batch"] = pd.Categorical([names[b] for b in batches], categories=names)
    if condition is not None:
        obs["condition"] = pd.Categorical(np.where(condition == 1, "B", "A"), categories=["A", "B"])
        var["de"] = np.isin(np.arange(n_genes), de_genes)
        var["true_log_fold_change"] = log_fold_change
    out = ad.AnnData(X=X, obs=obs, var=var)
    out.obsm["X_true_latent"] = z.astype(np.float32)
    out.uns["simulation"] = {
        "likelihood": likelihood, "n_clusters": n_clusters, "n_latent": n_latent,
        "separation": separation, "library_size": library_size, "seed": seed,
        "centres": centres,
    }
    if batches is not None:
        out.varm["true_batch_factor"] = batch_factor.T
        out.uns["simulation"].update(n_batches=n_batches, batch_effect=batch_effect)
    if condition is not None:
        out.uns["simulation"].update(n_de_genes=n_de_genes, de_log_fold_change=de_log_fold_change)
    return out
