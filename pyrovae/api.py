"""``pyrovae.fit``: train a VAE on an AnnData and write its latent space back."""

from __future__ import annotations

from typing import Literal, Sequence

import anndata as ad
import numpy as np

from .likelihoods import Likelihood
from .nn import Architecture
from .priors import Prior
from .train import TrainingPlan
from .vae import VAE

__all__ = ["fit"]

LikelihoodName = Literal["poisson", "nb", "zip", "zinb", "continuous_bernoulli", "gaussian"]


def fit(
    adata: ad.AnnData,
    likelihood: LikelihoodName | Likelihood = "zinb",
    *,
    layer: str | None = None,
    prior: Literal["normal"] | Prior = "normal",
    n_latent: int = 10,
    n_hidden: int | Sequence[int] = 128,
    dropout: float = 0.1,
    batch_norm: bool = True,
    max_epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    kl_warmup_epochs: int = 50,
    validation_fraction: float = 0.1,
    early_stopping: bool = True,
    patience: int = 30,
    seed: int = 0,
    device: Literal["auto", "cpu", "cuda"] | str = "auto",
    progress: bool = True,
    key_added: str = "X_pyrovae",
) -> VAE:
    """Train a VAE on the counts in ``adata`` and write its latent space into ``adata``.

    Parameters
    ----------
    adata
        Cells x genes. Count likelihoods need raw counts (non-negative integers, dense or
        sparse, any numeric dtype); ``"continuous_bernoulli"`` needs values in [0, 1] and
        ``"gaussian"`` real values (e.g. log-normalised).
    likelihood
        Observation model: ``"poisson"``, ``"nb"``, ``"zip"``, ``"zinb"``,
        ``"continuous_bernoulli"`` or ``"gaussian"`` (see :mod:`pyrovae.likelihoods`).
    layer
        Read the data from ``adata.layers[layer]``; ``adata.X`` when None.
    prior
        Prior on the latent space, by name or as a :class:`pyrovae.priors.Prior`.
    n_latent
        Dimension of the latent space.
    n_hidden
        Hidden layer width (one layer), or the widths of several layers, e.g. ``(256, 128)``.
    dropout, batch_norm
        Regularisation of the hidden layers (dropout in the encoder only).
    max_epochs, batch_size, lr, kl_warmup_epochs, validation_fraction, early_stopping, patience, seed, device, progress
        How to train; see :class:`pyrovae.train.TrainingPlan`. ``max_epochs=None``
        chooses ``min(400, 8e6 / n_cells)``.
    key_added
        Key of the latent means in ``adata.obsm``.

    Returns
    -------
    The fitted :class:`pyrovae.VAE`.

    Notes
    -----
    Writes ``adata.obsm[key_added]`` (the posterior mean of each cell) and
    ``adata.uns["pyrovae"]`` (``settings`` and per-epoch ``history`` of this run, replacing
    any earlier entry); nothing else in ``adata`` changes.
    """
    hidden = (n_hidden,) if isinstance(n_hidden, (int, np.integer)) else tuple(n_hidden)
    model = VAE(
        adata.var_names,
        likelihood=likelihood,
        prior=prior,
        architecture=Architecture(n_latent=n_latent, n_hidden=hidden, dropout=dropout,
                                  batch_norm=batch_norm),
        layer=layer,
        seed=seed,
    )
    plan = TrainingPlan(
        max_epochs=max_epochs, batch_size=batch_size, lr=lr, kl_warmup_epochs=kl_warmup_epochs,
        validation_fraction=validation_fraction, early_stopping=early_stopping,
        patience=patience, seed=seed, device=device, progress=progress,
    )
    model.train(adata, plan)
    latent = model.get_latent(adata)
    adata.obsm[key_added] = latent
    adata.uns["pyrovae"] = {
        "settings": {**model.settings(), "obsm_key": key_added, "n_cells": adata.n_obs},
        "history": {k: model.history[k].to_numpy() for k in model.history.columns},
    }
    return model
