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

    Returns
    -------
    AnnData with sparse float32 counts in ``X``, ``obs["cluster"]`` (categorical),
    ``obs["library"]``, the true latent positions in ``obsm["X_true_latent"]``, the gene
    parameters in ``var`` and the settings in ``uns["simulation"]``.
    """
    if likelihood not in ("poisson", "nb", "zip", "zinb"):
        raise ValueError(f"simulate draws counts: likelihood must be poisson, nb, zip or zinb, got {likelihood!r}")
    if min(n_cells, n_genes, n_clusters, n_latent) < 1:
        raise ValueError("n_cells, n_genes, n_clusters and n_latent must be positive")
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
    blocks = []
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        logits = z[start:stop] @ weights + bias
        rho = np.exp(logits - logits.max(1, keepdims=True))
        rho /= rho.sum(1, keepdims=True)
        mu = library[start:stop, None] * rho
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
    out = ad.AnnData(X=X, obs=obs, var=var)
    out.obsm["X_true_latent"] = z.astype(np.float32)
    out.uns["simulation"] = {
        "likelihood": likelihood, "n_clusters": n_clusters, "n_latent": n_latent,
        "separation": separation, "library_size": library_size, "seed": seed,
        "centres": centres,
    }
    return out
