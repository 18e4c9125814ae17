"""Cell identification: the clusters of a fitted mixture, with the empty ones removed.

A :class:`~pyrovae.priors.GaussianMixture` built with ``n_clusters=None`` chooses its K
from the cells' latent means when it starts (by default :func:`pyrovae.priors.merged_leiden`:
Leiden at resolution 1.0, then pairs of clusters with a PAGA connectivity >= 0.3 merged); after
training some components may hold no cell. :func:`prune_clusters` removes them, so that
``adata.obs["pyrovae_cluster"]`` has no empty category and K is the number of clusters
the model uses. :func:`pyrovae.fit` calls it for a mixture whose K it chose.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .priors import GaussianMixture

if TYPE_CHECKING:
    import anndata as ad

    from .vae import VAE

__all__ = ["prune_clusters"]


def prune_clusters(model: "VAE", adata: "ad.AnnData", *, min_cells: int = 1) -> list[float]:
    """Remove the mixture components that are the most probable cluster of fewer than
    ``min_cells`` cells of ``adata``; changes ``model`` in place.

    Parameters
    ----------
    model
        A model with a :class:`~pyrovae.priors.GaussianMixture` prior.
    adata
        The cells that decide which components are used (usually the training cells).
    min_cells
        A component is kept when ``argmax_k q(y = k | x)`` is it for at least this many
        cells.

    Returns
    -------
    list of float
        The mixture weights ``pi_k`` of the removed components (also added to
        ``model.prior.selection["pruned_weights"]``); empty when none was removed.

    Raises
    ------
    TypeError
        The model's prior is not a Gaussian mixture.
    """
    prior = model.prior
    if not isinstance(prior, GaussianMixture):
        raise TypeError(f"prune_clusters needs a Gaussian-mixture prior, the model has {prior.name!r}")
    counts = np.bincount(model.get_clusters(adata), minlength=prior.n_clusters)
    keep = counts >= min_cells
    if keep.sum() < 2:  # keep the two largest rather than a one-cluster "mixture"
        keep = np.zeros_like(keep)
        keep[np.argsort(counts)[-2:]] = True
    prior.selection.setdefault("pruned_weights", [])
    return prior.prune(keep)
