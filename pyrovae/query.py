"""Query mapping (scArches, Lotfollahi et al. 2022): a trained reference model extended to
the new batches of a query data set, with the reference's weights frozen.

The query's batches become new categories of the reference's batch covariate. The new
model has the reference's encoder, decoder and prior (a labels model keeps its
classifier); the only trainable parameters are the columns of the first encoder and
decoder layers (and of a latent-library encoder) that read the new batches' one-hot
inputs, the per-batch gene parameters of the new batches and (for a count likelihood) a
per-gene offset of each new batch (``gene_offsets``). Batch-norm layers keep the
reference's statistics (they run in evaluation mode). The reference model is not changed.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

if TYPE_CHECKING:
    import anndata as ad

    from .vae import VAE

__all__ = ["map_query"]


def _match_genes(reference: "VAE", query: "ad.AnnData") -> "ad.AnnData":
    """``query`` with the reference's genes in the reference's order: a missing gene is an
    error; extra genes are dropped with a warning."""
    names = pd.Index(query.var_names.astype(str))
    missing = reference.var_names[~reference.var_names.isin(names)]
    if len(missing):
        raise ValueError(
            f"the query lacks {len(missing)} of the reference's {len(reference.var_names)} genes, "
            f"e.g. {list(missing[:5])}; map_query matches genes by name"
        )
    extra = names[~names.isin(reference.var_names)]
    if len(extra):
        warnings.warn(f"{len(extra)} query genes are not in the reference (e.g. {list(extra[:3])}) "
                      "and are dropped", UserWarning, stacklevel=3)
    if len(extra) or not names.equals(pd.Index(reference.var_names.astype(str))):
        return query[:, reference.var_names].copy()
    return query


def _frozen_batch_norm(module: nn.Module) -> None:
    """Every batch-norm layer of ``module`` in evaluation mode at each call (the
    reference's running statistics, never updated)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.register_forward_pre_hook(_evaluation_mode)


def _evaluation_mode(layer: nn.Module, inputs) -> None:
    layer.train(False)


def map_query(
    reference: "VAE",
    query: "ad.AnnData",
    *,
    batch_key: str | None = None,
    max_epochs: int = 50,
    lr: float = 1e-2,
    batch_size: int = 128,
    init: Literal["reference", "zero"] = "reference",
    gene_offsets: bool | None = None,
    seed: int = 0,
    progress: bool = False,
) -> "VAE":
    """A new model for ``query``: the reference extended with the query's batches and
    trained on the query with the reference's weights frozen (see the module docstring).

    Parameters
    ----------
    reference
        A fitted model with a batch covariate (``fit(..., batch_key=...)``); not changed.
    query
        Counts with the reference's genes (matched by name; extra genes dropped with a
        warning), its batches in ``obs[batch_key]``; a labels column is not needed.
    batch_key
        The query's batch column; the reference's by default. Categories the reference
        knows keep its weights; the others are new.
    init
        Where the new batches' parameters start: ``"reference"``, at the average of the
        reference's batches (each new batch's input columns are the mean of the reference
        batches' columns, its per-batch gene parameters their mean), so that before
        training a query cell is read as a cell of an average reference batch;
        ``"zero"``, at zero columns (an input the reference never saw) and fresh
        per-batch parameters.
    gene_offsets
        Learn a per-gene offset for each new batch (:class:`pyrovae.module.Covariates`
        ``gene_offsets``: the batch's expression shares scaled by ``exp(o_g)``, its counts
        read by the encoder divided by it), which captures a gene-specific capture rate
        of the query exactly. By default on for a count likelihood with a ``log_rho``
        head. The reference's batches keep offset 0.
    max_epochs, lr, batch_size, seed, progress
        Training of the new batches' parameters (no weight decay, KL at full weight).

    Returns
    -------
    The new :class:`pyrovae.VAE`; use ``get_latent(query)`` and, for a labels model,
    ``predict(query)``.

    Raises
    ------
    ValueError
        The reference has no batch covariate, the query lacks genes or its batch column.

    Examples
    --------
    >>> import numpy as np, pandas as pd, pyrovae
    >>> adata = pyrovae.datasets.simulate(300, 40, 3, likelihood="nb", seed=0, n_batches=2)
    >>> values = adata.obs["cluster"].astype(str).to_numpy().copy()
    >>> values[np.arange(300) % 5 != 0] = "Unknown"
    >>> adata.obs["known"] = pd.Categorical(values)
    >>> ref = adata[adata.obs["batch"] == "b0"].copy()
    >>> query = adata[adata.obs["batch"] == "b1"].copy()
    >>> del query.obs["known"]  # the query needs no labels column
    >>> reference = pyrovae.fit(ref, batch_key="batch", labels_key="known", unlabeled_category="Unknown",
    ...                         max_epochs=2, kl_warmup_epochs=0, progress=False)
    >>> mapped = reference.map_query(query, max_epochs=2)
    >>> mapped.covariates.categorical["batch"]
    ['b0', 'b1']
    >>> mapped.get_latent(query).shape, mapped.predict(query).shape
    ((152, 10), (152,))
    """
    from .train import TrainingPlan
    from .vae import VAE

    if init not in ("reference", "zero"):
        raise ValueError(f"init must be 'reference' or 'zero', got {init!r}")

    spec = reference.covariates
    if not spec.batch_key:
        raise ValueError("map_query needs a reference fitted with batch_key: the query's "
                         "batches become new categories of that covariate")
    key = batch_key or spec.batch_key
    if key not in query.obs:
        raise ValueError(f"the query has no batch column adata.obs[{key!r}]")
    query = _match_genes(reference, query)
    old_batches = list(spec.categorical[spec.batch_key])
    query_batches = pd.Index(query.obs[key].astype(str).unique())
    new = [b for b in sorted(query_batches) if b not in old_batches]
    obs = query.obs.copy()
    obs[spec.batch_key] = query.obs[key].astype(str)
    if spec.labels_key and spec.labels_key not in obs:
        unknown = getattr(reference.prior, "unlabeled_category", spec.labels[0])
        obs[spec.labels_key] = unknown
    for name in spec.categorical:
        if name != spec.batch_key and name not in obs:
            raise ValueError(f"the query has no covariate column adata.obs[{name!r}]")
    import anndata as ad

    layers = {reference.layer: query.layers[reference.layer]} if reference.layer else None
    query = ad.AnnData(X=query.X, obs=obs, var=query.var[[]], layers=layers)

    categorical = dict(spec.categorical)
    categorical[spec.batch_key] = old_batches + new
    new_spec = dataclasses.replace(spec, categorical=categorical)
    prior = copy.deepcopy(reference.prior)
    prior.__dict__.pop("_owner", None)
    cov = reference.module.cov
    if gene_offsets is None:
        gene_offsets = cov.gene_offsets or "log_rho" in reference.likelihood.heads
    if cov.gene_offsets and not gene_offsets:
        raise ValueError("the reference has gene offsets: its query model keeps them (gene_offsets=True)")
    model = VAE(reference.var_names, likelihood=reference.likelihood.name, prior=prior,
                architecture=reference.architecture, layer=reference.layer, covariates=new_spec,
                library=cov.library, dispersion=cov.dispersion, gene_offsets=gene_offsets, seed=seed)
    n_old, n_new = len(old_batches), len(new)
    old_state = reference.module.state_dict()
    state = model.module.state_dict()
    trainable: dict[str, torch.Tensor] = {}  # name -> mask of its trainable entries
    for name, value in state.items():
        if name not in old_state and name == "model.gene_offsets":  # new: 0 for the reference's batches
            rows = torch.zeros(value.shape, dtype=torch.bool)
            rows[n_old:] = True
            state[name], trainable[name] = torch.zeros_like(value), rows
            continue
        old = old_state[name]
        if old.shape == value.shape:
            state[name] = old.clone()
            continue
        if value.shape[0] == old.shape[0] + n_new and value.shape[1:] == old.shape[1:]:
            rows = torch.zeros(value.shape, dtype=torch.bool)
            rows[n_old:] = True  # per-batch rows: the new batches at the end
            merged = value.clone()
            merged[:n_old] = old
            if init == "reference" and value.is_floating_point():
                merged[n_old:] = old.mean(0)
            state[name], trainable[name] = merged, rows
        elif value.ndim == 2 and value.shape[1] == old.shape[1] + n_new:
            first = old.shape[1] - spec.n_covariates  # the batch block starts here
            start = first + n_old  # first column of the new batches
            merged = torch.zeros_like(value)
            merged[:, :start] = old[:, :start]
            merged[:, start + n_new:] = old[:, start:]
            if init == "reference":
                merged[:, start:start + n_new] = old[:, first:start].mean(1, keepdim=True)
            cols = torch.zeros(value.shape, dtype=torch.bool)
            cols[:, start:start + n_new] = True
            state[name], trainable[name] = merged, cols
        else:
            raise RuntimeError(f"cannot extend {name} from {tuple(old.shape)} to {tuple(value.shape)}")
    model.module.load_state_dict(state)
    _fit_library(model, query, new)
    params = dict(model.module.named_parameters())
    for name, param in params.items():
        mask = trainable.get(name)
        param.requires_grad_(mask is not None)
        if mask is not None:
            param.register_hook(lambda grad, m=mask.to(param.device): grad * m)
    _frozen_batch_norm(model.module)
    model.history = reference.history.copy()
    plan = TrainingPlan(max_epochs=max_epochs, lr=lr, batch_size=batch_size, weight_decay=0.0,
                        kl_warmup_epochs=0, seed=seed, progress=progress, early_stopping=False,
                        validation_fraction=0.0, device=str(reference.device))
    # a query's genes may have no counts in it (they are the reference's genes)
    model._train(query, plan, data=model._read(query))
    return model


def _fit_library(model: "VAE", query: "ad.AnnData", new: list[str]) -> None:
    """The log-normal library prior of each new batch from its cells' total counts."""
    if not new:
        return
    data = model._read(query)
    logs = np.log(np.clip(data.totals(), 1, None))
    batches = data.encoded.batch
    names = model.covariates.categorical[model.covariates.batch_key]
    library = model.module.model
    for b in new:
        code = names.index(b)
        mine = logs[batches == code]
        library.library_loc[code] = float(mine.mean())
        library.library_scale[code] = float(max(mine.std(), 1e-3))
