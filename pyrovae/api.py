"""``pyrovae.fit``: train a VAE on an AnnData and write its latent space back."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import replace
from typing import Literal, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .data import CovariateSpec, is_paths, open_backed
from .likelihoods import Likelihood
from .nn import Architecture
from .priors import PRIORS, GaussianMixture, Prior, get_prior
from .train import TrainingPlan, default_max_epochs
from .vae import VAE

__all__ = ["fit"]

LikelihoodName = Literal["poisson", "nb", "zip", "zinb", "continuous_bernoulli", "gaussian"]


def fit(
    adata: ad.AnnData,
    likelihood: LikelihoodName | Likelihood = "zinb",
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    categorical_covariate_keys: Sequence[str] = (),
    continuous_covariate_keys: Sequence[str] = (),
    labels_key: str | None = None,
    library: Literal["observed", "latent"] = "observed",
    dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
    prior: Literal["normal", "gmm", "vamp"] | Prior = "normal",
    n_clusters: int | None = None,
    mode: Literal["enumerate", "gumbel", "marginal"] = "enumerate",
    pretrain_epochs: int | None = None,
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
    mixture: Literal["enumerate", "gumbel", "marginal"] | None = None,
) -> VAE:
    """Train a VAE on the counts in ``adata`` and write its latent space into ``adata``.

    Parameters
    ----------
    adata
        Cells x genes. Count likelihoods need raw counts (non-negative integers, dense or
        sparse, any numeric dtype); ``"continuous_bernoulli"`` needs values in [0, 1] and
        ``"gaussian"`` real values (e.g. log-normalised). An AnnData opened with
        ``backed="r"``, or the path of an ``.h5ad`` file or a list of them (sharing their
        genes), is streamed chunk by chunk: memory does not grow with the number of cells.
        Given paths, nothing is written anywhere: use the returned model's methods.
    likelihood
        Observation model: ``"poisson"``, ``"nb"``, ``"zip"``, ``"zinb"``,
        ``"continuous_bernoulli"`` or ``"gaussian"`` (see :mod:`pyrovae.likelihoods`).
    layer
        Read the data from ``adata.layers[layer]``; ``adata.X`` when None.
    batch_key
        Column of ``adata.obs`` with each cell's batch: given (one-hot) to encoder and
        decoder, as in scVI, so that the latent space need not encode it; the library
        prior and ``dispersion="gene-batch"`` are per batch.
    categorical_covariate_keys, continuous_covariate_keys
        More ``adata.obs`` columns given to encoder and decoder: categorical ones one-hot
        (a condition such as treatment or cell type makes a conditional VAE, see
        :meth:`VAE.sample`), continuous ones standardised.
    labels_key
        Column of ``adata.obs`` with labels, for ``dispersion="gene-label"``.
    library
        ``"observed"``: the cell's total count; ``"latent"``: ``l ~ LogNormal`` with the
        mean and variance of the log library sizes in the cell's batch, inferred by its
        own encoder (scVI's l-encoder).
    dispersion
        How ``theta`` (NB, ZINB) or ``sigma`` (Gaussian) varies: per gene, per gene and
        batch, per gene and label, or per gene and cell.
    prior
        Prior on the latent space: ``"normal"`` (``N(0, I)``), ``"gmm"`` (a Gaussian
        mixture with a cluster for each cell, see :class:`pyrovae.priors.GaussianMixture`),
        ``"vamp"`` (:class:`pyrovae.priors.VampPrior`), or a prior object.
    n_clusters
        For a prior given by name: the number of mixture components, the clusters of
        ``"gmm"`` (default 10) or the pseudo-inputs of ``"vamp"`` (default 50); ignored,
        with a warning, by priors without components.
    mode
        For ``prior="gmm"``: how the cluster is handled in training: summed out exactly
        by enumeration, relaxed by Gumbel-Softmax, or marginalised out of the prior (the
        ``mode`` of :class:`pyrovae.priors.GaussianMixture` and of ``set_prior``).
    pretrain_epochs
        For a mixture whose components start from the latent space (``init="leiden"``,
        the default, or ``"kmeans"``): epochs of a standard-normal VAE first, whose posterior means then place
        the components; the mixture trains for the remaining epochs, with its KL at full
        weight. ``None`` takes the KL warm-up (``kl_warmup_epochs``), at most half of
        ``max_epochs``; ``0`` trains the mixture from the first epoch.
    n_latent
        Dimension of the latent space.
    n_hidden
        Hidden layer width (one layer), or the widths of several layers, e.g. ``(256, 128)``.
    dropout, batch_norm
        Regularisation of the hidden layers (dropout in the encoder only).
    max_epochs, batch_size, lr, kl_warmup_epochs, validation_fraction, early_stopping, patience, seed, device, progress
        How to train; see :class:`pyrovae.train.TrainingPlan`. ``max_epochs=None``
        chooses ``min(400, 8e6 / n_cells)``. Launched with ``torchrun``, training is
        data parallel over the processes (see :mod:`pyrovae.distributed`).
    key_added
        Key of the latent means in ``adata.obsm``.
    mixture
        The old name of ``mode`` (a ``FutureWarning``).

    Returns
    -------
    The fitted :class:`pyrovae.VAE`.

    Notes
    -----
    Writes ``adata.obsm[key_added]`` (the posterior mean of each cell) and
    ``adata.uns["pyrovae"]`` (``settings`` and per-epoch ``history`` of this run, replacing
    any earlier entry). A prior with clusters also writes ``adata.obs["pyrovae_cluster"]``
    (``argmax_k q(y = k | x)``, categorical), ``adata.obsm["pyrovae_cluster_probs"]`` and
    the component means in ``adata.uns["pyrovae"]["component_means"]``. Nothing else in
    ``adata`` changes. The writing is :meth:`VAE.annotate`'s, which writes the same for a
    model changed later (``set_prior`` and ``train``).
    """
    if mixture is not None:
        warnings.warn("fit(mixture=...) is now fit(mode=...), the name GaussianMixture and "
                      "set_prior use; mixture= will be removed", FutureWarning, stacklevel=2)
        mode = mixture
    if isinstance(prior, str):
        accepts = inspect.signature(PRIORS[prior]).parameters if prior in PRIORS else {}
        options: dict = {"mode": mode} if "mode" in accepts else {}
        if n_clusters is not None and "n_clusters" in accepts:
            options["n_clusters"] = n_clusters
        elif n_clusters is not None:
            warnings.warn(f"the {prior!r} prior has no mixture components: n_clusters is "
                          "ignored", UserWarning, stacklevel=2)
        prior = get_prior(prior, **options)
    hidden = (n_hidden,) if isinstance(n_hidden, (int, np.integer)) else tuple(n_hidden)
    plan = TrainingPlan(
        max_epochs=max_epochs, batch_size=batch_size, lr=lr, kl_warmup_epochs=kl_warmup_epochs,
        validation_fraction=validation_fraction, early_stopping=early_stopping,
        patience=patience, seed=seed, device=device, progress=progress,
    )
    files = is_paths(adata)
    if files:  # streamed from disk: the obs and genes are read, the counts chunk by chunk
        _, parts = open_backed(adata)
        obs, var_names = pd.concat([p.obs for p in parts]), parts[0].var_names
    elif isinstance(adata, ad.AnnData):
        obs, var_names = adata.obs, adata.var_names
    else:
        raise TypeError(f"expected an AnnData or .h5ad path(s), got {type(adata).__name__}")
    total = max_epochs or default_max_epochs(len(obs))
    if pretrain_epochs is None:
        pretrain_epochs = min(kl_warmup_epochs, total // 2)
    staged = (
        isinstance(prior, GaussianMixture) and prior.init in ("kmeans", "leiden")
        and not bool(prior.initialized) and 0 < pretrain_epochs < total
    )
    covariates = CovariateSpec.from_obs(
        obs, batch_key=batch_key, categorical_covariate_keys=categorical_covariate_keys,
        continuous_covariate_keys=continuous_covariate_keys, labels_key=labels_key,
    )
    model = VAE(
        var_names,
        likelihood=likelihood,
        prior="normal" if staged else prior,
        architecture=Architecture(n_latent=n_latent, n_hidden=hidden, dropout=dropout,
                                  batch_norm=batch_norm),
        layer=layer,
        covariates=covariates,
        library=library,
        dispersion=dispersion,
        seed=seed,
    )
    if staged:
        model.train(adata, replace(plan, max_epochs=pretrain_epochs, early_stopping=False))
        model.set_prior(prior, adata)
        model.train(adata, replace(plan, max_epochs=total - pretrain_epochs, kl_warmup_epochs=0))
    else:
        model.train(adata, plan)
    if files:
        return model
    model.annotate(adata, key_added=key_added)
    adata.uns["pyrovae"]["settings"]["pretrain_epochs"] = pretrain_epochs if staged else 0
    return model
