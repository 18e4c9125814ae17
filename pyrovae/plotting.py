"""Figures: training curves and 2-D views of the latent space."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

__all__ = ["plot_embedding", "plot_history", "umap"]


def plot_history(history: pd.DataFrame, ax=None):
    """Training objective and validation ELBO per epoch, with the end of the KL warm-up."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    if len(history) == 0:
        raise ValueError("the model has not been trained yet: the history is empty")
    epoch = history["epoch"].to_numpy()
    ax.plot(epoch, history["train_elbo"], label="training (KL weighted by warm-up)")
    if history["validation_elbo"].notna().any():
        val = history["validation_elbo"]
        ax.plot(epoch, val, label="validation")
        best = int(val.idxmax())
        ax.scatter([epoch[best]], [val.iloc[best]], color="black", zorder=3,
                   label=f"best: {val.iloc[best]:.1f} (epoch {epoch[best]})")
    warm = history.index[history["kl_weight"] < 1]
    if len(warm):
        ax.axvline(epoch[warm[-1]] + 0.5, color="grey", lw=0.8, ls="--", label="end of KL warm-up")
    values = history[["train_elbo", "validation_elbo"]].to_numpy().ravel()
    values = values[np.isfinite(values)]
    tail = values[len(values) // 10 :] if len(values) >= 10 else values
    lo, hi = np.percentile(tail, 2), values.max()
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO per cell (nats)")
    ax.legend(frameon=False, fontsize="small")
    return ax


def umap(adata: ad.AnnData, *, use_rep: str = "X_pyrovae", n_neighbors: int = 15,
         seed: int = 0) -> np.ndarray:
    """2-D UMAP coordinates of ``adata.obsm[use_rep]`` (``adata`` is not modified)."""
    import scanpy as sc

    if use_rep not in adata.obsm:
        raise KeyError(f"adata.obsm[{use_rep!r}] not found; available: {list(adata.obsm.keys())}")
    light = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names), obsm={use_rep: adata.obsm[use_rep]})
    sc.pp.neighbors(light, use_rep=use_rep, n_neighbors=n_neighbors, random_state=seed)
    sc.tl.umap(light, random_state=seed)
    return light.obsm["X_umap"]


def plot_embedding(coords: np.ndarray, labels, *, title: str = "", ax=None, point_size: float = 8):
    """Scatter 2-D coordinates coloured by a categorical label, legend on the right."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 5))
    labels = pd.Categorical(labels)
    cmap = plt.get_cmap("tab10" if len(labels.categories) <= 10 else "tab20")
    for i, cat in enumerate(labels.categories):
        mask = np.asarray(labels == cat)
        ax.scatter(coords[mask, 0], coords[mask, 1], s=point_size, color=cmap(i % cmap.N),
                   label=f"{cat} ({mask.sum()})", linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize="small",
              markerscale=2)
    return ax
