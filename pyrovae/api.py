"""``pyrovae.fit``: train a VAE on an AnnData and write its latent space back;
``pyrovae.resume``: finish a run from its checkpoint."""

from __future__ import annotations

import inspect
import os
import tempfile
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from . import checkpoint
from .clusters import prune_clusters
from .data import CovariateSpec, is_paths, open_backed
from .likelihoods import Likelihood
from .nn import Architecture
from .labels import hide_labels, labels_prior
from .priors import PRIORS, GaussianMixture, Prior, get_prior, prior_from_config
from .train import (TrainingInterruptedWarning, TrainingPlan, TrainingState, default_max_epochs,
                    history_frame)
from .vae import VAE, load

__all__ = ["fit", "resume"]

#: the share of the KL warm-up a mixture that finds K takes as its standard-normal
#: pre-training by default (``fit(pretrain_epochs=None)``): K is found, and the components
#: start, on the latent space of that epoch, and the warm-up's last epochs are the mixture's
PRETRAIN_SHARE = 0.7

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
    prior: Literal["normal", "gmm", "vamp", "labels"] | Prior = "normal",
    unlabeled_category: str | None = None,
    classification_weight: float = 50.0,
    class_balance: bool = True,
    classifier_input: Literal["body", "latent"] = "body",
    calibration_fraction: float = 0.0,
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
    on_failure: Literal["restore", "last_epoch"] = "restore",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
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
    unlabeled_category
        With ``labels_key``: the category of cells whose label is unknown. Given, it
        chooses ``prior="labels"``: semi-supervised training with one mixture component
        per known label, the label observed where known and enumerated where not
        (:class:`pyrovae.labels.SemiSupervised`); ``prior="labels"`` alone takes
        ``"Unknown"``.
    classification_weight
        For ``prior="labels"``: the weight of M2's classification term ``log q(y | x)``
        on the labelled cells.
    class_balance
        For ``prior="labels"``: weigh each labelled cell's classification term by the
        inverse of its label's share of the labelled cells (normalised to average 1), so
        that rare types weigh as much as common ones
        (:class:`pyrovae.labels.SemiSupervised`'s ``class_balance``).
    classifier_input
        For ``prior="labels"``: what the classifier ``q(y | x)`` reads, the encoder body
        (``"body"``) or the posterior mean of ``z`` (``"latent"``, as scANVI)
        (:class:`pyrovae.labels.SemiSupervised`'s ``classifier_input``).
    calibration_fraction
        For ``prior="labels"``: the share of the labelled cells (drawn with ``seed``) whose
        labels are hidden in training and then used to calibrate ``q(y | x)`` by
        temperature scaling (:func:`pyrovae.labels.calibrate`: the temperature at which the
        unlabelled cells' mean confidence equals the accuracy on the hidden cells); 0 for
        none.
    n_clusters
        For a prior given by name: the number of mixture components, the clusters of
        ``"gmm"`` (default: chosen from the pre-trained latent means by
        :func:`pyrovae.priors.merged_leiden`, Leiden at scanpy's default resolution with
        the clusters the kNN graph still joins merged; the components left empty by
        training then removed by
        :func:`pyrovae.clusters.prune_clusters`) or the pseudo-inputs of ``"vamp"``
        (default 50); ignored, with a warning, by priors without components.
    mode
        For ``prior="gmm"``: how the cluster is handled in training: summed out exactly
        by enumeration, relaxed by Gumbel-Softmax, or marginalised out of the prior (the
        ``mode`` of :class:`pyrovae.priors.GaussianMixture` and of ``set_prior``).
    pretrain_epochs
        For a mixture whose components start from the latent space (``init="leiden"``,
        the default, or ``"kmeans"``): epochs of a standard-normal VAE first, whose posterior means then place
        the components (and, with ``n_clusters=None``, give K); the mixture trains for the
        remaining epochs, and the KL warm-up goes on where the pre-training left it.
        ``None`` takes, at most half of ``max_epochs``, 70 % of the KL warm-up
        (``kl_warmup_epochs``) when K is found from the data (``n_clusters=None``) and the
        whole warm-up when K is given; ``0`` trains the mixture from the first epoch.
        Measured in ``docs/mixtures.md``: at full KL weight the standard normal prior draws
        nearby populations together, and K found after the whole warm-up merged more of
        them (pbmc68k, 10 seeds: K = 7 on 5 seeds, against 1 after 70 %); with
        ``n_clusters=16`` on bladder the start after the whole warm-up scored higher.
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
    on_failure
        What a failed training leaves (see :class:`pyrovae.train.TrainingPlan`); ``adata``
        is never changed by a failed ``fit``.
    checkpoint, checkpoint_every
        Write a checkpoint file every ``checkpoint_every`` epochs and at the end;
        ``pyrovae.resume(checkpoint, adata)`` finishes the run from it, exactly as it would
        have ended uninterrupted.
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
    ``adata`` changes, and nothing at all when ``fit`` fails. With ``prior="labels"``
    also ``adata.obs["pyrovae_label"]`` (the most probable known label) and
    ``adata.obsm["pyrovae_label_probabilities"]`` (cells x labels ``q(y | x)``). The writing is
    :meth:`VAE.annotate`'s, which writes the same for a model changed later
    (``set_prior`` and ``train``).

    Ctrl-C (or a Jupyter kernel interrupt) stops training at the end of the current step;
    ``fit`` then keeps the best weights so far, warns, and writes its outputs as usual
    (interrupted during a mixture's pre-training, it returns the pre-trained standard
    normal model).
    """
    if mixture is not None:
        warnings.warn("fit(mixture=...) is now fit(mode=...), the name GaussianMixture and "
                      "set_prior use; mixture= will be removed", FutureWarning, stacklevel=2)
        mode = mixture
    semi_supervised = prior == "labels" or (unlabeled_category is not None and prior == "normal")
    if semi_supervised and labels_key is None:
        raise ValueError("semi-supervised training (prior='labels' or unlabeled_category) needs "
                         "labels_key, the adata.obs column of the known labels")
    if isinstance(prior, str) and not semi_supervised:
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
        on_failure=on_failure, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
    )
    files = is_paths(adata)
    if files:  # streamed from disk: the obs and genes are read, the counts chunk by chunk
        _, parts = open_backed(adata)
        obs, var_names = pd.concat([p.obs for p in parts]), parts[0].var_names
    elif isinstance(adata, ad.AnnData):
        obs, var_names = adata.obs, adata.var_names
    else:
        raise TypeError(f"expected an AnnData or .h5ad path(s), got {type(adata).__name__}")
    held = None
    if semi_supervised and calibration_fraction > 0:  # before the prior counts the labels
        adata, held = hide_labels(adata, labels_key, unlabeled_category or "Unknown",
                                  calibration_fraction, seed)
        obs = held[0].obs
    if semi_supervised:
        prior = labels_prior(CovariateSpec.from_obs(obs, labels_key=labels_key),
                             unlabeled_category=unlabeled_category or "Unknown",
                             classification_weight=classification_weight,
                             class_balance=class_balance, classifier_input=classifier_input,
                             obs=obs)
    total = max_epochs or default_max_epochs(len(obs))
    if pretrain_epochs is None:  # K found from the data: before the warm-up ends (PRETRAIN_SHARE)
        finds_k = isinstance(prior, GaussianMixture) and prior.n_clusters is None
        share = PRETRAIN_SHARE if finds_k else 1.0
        pretrain_epochs = min(round(share * kl_warmup_epochs), total // 2)
    elif isinstance(pretrain_epochs, bool) or not isinstance(pretrain_epochs, (int, np.integer)) \
            or pretrain_epochs < 0:
        raise ValueError(f"pretrain_epochs must be a whole number >= 0 (or None), got {pretrain_epochs!r}")
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
    run = {
        "kind": "fit", "stage": "pretrain" if staged else "single", "total": total,
        "pretrain_epochs": pretrain_epochs if staged else 0, "key_added": key_added,
        "plan": asdict(plan), "prior": prior.name, "prior_config": prior.config(),
    }
    _fit_stages(model, adata if held is None else held[0], plan, run, prior=prior)
    if held is not None:  # T matches the unlabelled cells' mean confidence to the hold-out's accuracy
        training, hidden = held
        unlabelled = ~hidden & (training.obs[labels_key].astype(str).to_numpy()
                                == (unlabeled_category or "Unknown"))
        model.calibrate(adata[hidden], labels_key=labels_key,
                        cells=training[unlabelled] if unlabelled.any() else None)
    if not files and not semi_supervised and isinstance(model.prior, GaussianMixture) and (
            model.prior.selection.get("method") != "given"):
        prune_clusters(model, adata)  # a K chosen from the data: drop the empty components
    if not files:
        write_outputs(model, adata, run)
    return model


def _fit_stages(model: VAE, adata, plan: TrainingPlan, run: dict[str, Any], *,
                prior: Prior | None = None, state: TrainingState | None = None, data=None) -> None:
    """``fit``'s training from ``run["stage"]`` on: one call; or, for a mixture that starts
    from the latent space, a standard-normal pre-training, then the mixture at full KL
    weight. ``state`` continues the current stage from a checkpoint."""

    def stage(stage_plan: TrainingPlan, **options) -> None:
        if state is not None and state.finished:  # the checkpoint is of this stage's end
            model._record(state.history(), stage_plan)
        else:
            model._train(adata, stage_plan, state=state, run=run, data=data, **options)

    if run["stage"] == "pretrain":
        stage(replace(plan, max_epochs=run["pretrain_epochs"], early_stopping=False),
              label="pre-training", warn_unfinished_warmup=False,
              interrupt_note="; the mixture prior was not trained: the model keeps its "
                             "standard normal prior")
        if model.interrupted:
            return
        run, state = {**run, "stage": "mixture"}, None
        pretrained = model.prior
        try:
            model.set_prior(prior or prior_from_config(run["prior"], run["prior_config"]), adata)
        except KeyboardInterrupt:  # Ctrl-C while the mixture starts (Leiden can take seconds)
            model.module.set_prior(pretrained)
            model.interrupted = True
            warnings.warn("fit interrupted while the mixture prior was set up after the "
                          "pre-training; the model keeps its pre-trained standard normal prior",
                          TrainingInterruptedWarning, stacklevel=3)
            return
    if run["stage"] == "mixture":
        # the warm-up goes on from the pre-training's last KL weight (VAE._warmup_done)
        stage(replace(plan, max_epochs=run["total"] - run["pretrain_epochs"]))
    else:
        stage(plan)


def write_outputs(model: VAE, adata: ad.AnnData, run: dict[str, Any]) -> None:
    """What ``fit`` writes into ``adata`` (:meth:`VAE.annotate`, all computed before
    anything is written), with the run's pre-training epochs in the settings."""
    model.annotate(adata, key_added=run["key_added"])
    adata.uns["pyrovae"]["settings"]["pretrain_epochs"] = run["pretrain_epochs"]


def resume(path: str | os.PathLike, adata, *, progress: bool | None = None, **expected) -> VAE:
    """Continue a training run from its checkpoint and finish it; returns the model.

    The run (a :func:`fit` or a :meth:`VAE.train` given ``checkpoint=``) goes on from its
    last checkpoint with the optimiser, early stopping and random streams where they were:
    on the CPU the final weights, latent space and history (all but ``seconds``) are
    bit-identical to a run that was never interrupted. A ``fit`` resumed writes its
    outputs into ``adata`` as ``fit`` does; a finished run is only loaded (and written).

    Parameters
    ----------
    path
        The checkpoint file.
    adata
        The data the run was started on (an AnnData, or the same ``.h5ad`` path(s)).
    progress
        Show a progress bar (default: as the run did).
    expected
        Settings the run must have, e.g. ``likelihood="zinb", max_epochs=400``: any that
        differs is refused.

    Raises
    ------
    pyrovae.checkpoint.CheckpointError
        When ``path`` is not a readable checkpoint.
    pyrovae.checkpoint.CheckpointMismatchError
        When the checkpoint is for other data (other genes, cells or counts), other
        settings than ``expected``, or another number of processes.
    """
    content = checkpoint.read(path)
    with tempfile.TemporaryDirectory(prefix="pyrovae-") as folder:
        model_file = Path(folder) / "model.pt"
        model_file.write_bytes(content["model_file"])
        model = load(model_file)
    model.seed = content["seed"]
    model.history = history_frame(content["history"])
    if content["model_plan"] is not None:
        model.training_plan = TrainingPlan(**content["model_plan"])
    plan = TrainingPlan(**content["plan"])
    if progress is not None:
        plan = replace(plan, progress=progress)
    run = content["run"]
    settings = {**model.settings(), **asdict(plan), **(run.get("plan") or {})}  # as fit was called
    settings.update(prior=run.get("prior", settings["prior"]),
                    **{f"prior_{k}": v for k, v in run.get("prior_config", {}).items()})
    checkpoint.check_settings(content, settings, expected, path)
    try:
        data = model._read(adata, for_training=True)
    except ValueError as err:
        raise checkpoint.CheckpointMismatchError(
            f"{os.fspath(path)!r} cannot continue on this data: {err}") from err
    checkpoint.check_data(content, data, path)
    state = TrainingState.from_dict(content["state"])
    if run["kind"] == "fit":
        base = replace(TrainingPlan(**run["plan"]), progress=plan.progress, checkpoint=os.fspath(path))
        _fit_stages(model, adata, base, run, state=state, data=data)
    elif state.finished:
        model._record(state.history(), plan)
    else:
        model._train(adata, replace(plan, checkpoint=os.fspath(path)), state=state, run=run, data=data)
    if run["kind"] == "fit" and not is_paths(adata):
        write_outputs(model, adata, run)
    return model
