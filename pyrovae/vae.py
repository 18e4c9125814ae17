"""The fitted model: the object ``pyrovae.fit`` returns, facing AnnData."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from dataclasses import asdict, replace
from typing import Any, Hashable, Iterator, Literal, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import torch

from . import __version__, checkpoint, files
from .data import CountData, CovariateSpec, check_genes, is_paths, open_h5ad, read_data
from .inference import elbo_per_cell, marginal_log_likelihood, posterior_predictive
from .likelihoods import Likelihood, get_likelihood
from .module import Covariates, Dispersion, LibrarySize, VAEModule
from .nn import Architecture, PyroFunction
from .priors import Prior, get_prior, prior_from_config
from .train import HISTORY_COLUMNS, TrainingPlan, TrainingState, model_args, resolve_device, seeded, train

__all__ = ["VAE", "load"]

_FORMAT = files.MODEL_FORMAT
_MODEL_KEYS = ("likelihood", "prior", "prior_config", "architecture", "layer", "covariates", "library",
               "dispersion", "var_names", "history", "training_plan", "state_dict")


class VAE:
    """A variational autoencoder over a fixed list of genes.

    Build it with :func:`pyrovae.fit`, or construct it and call :meth:`train`. Methods that
    take an AnnData read the same ``layer`` as training, check that its genes are the
    model's, and return new arrays; none of them writes into the AnnData.

    Parameters
    ----------
    var_names
        The genes, in the order the model sees them.
    likelihood
        A name from :data:`pyrovae.likelihoods.LIKELIHOODS` or a :class:`Likelihood`.
    prior
        A name from :data:`pyrovae.priors.PRIORS` or a :class:`Prior` object.
    architecture
        Network sizes (:class:`pyrovae.nn.Architecture`).
    layer
        Where the observations are: ``adata.layers[layer]``, or ``adata.X`` for None.
    covariates
        The ``adata.obs`` columns the model reads and how they are encoded
        (:class:`pyrovae.data.CovariateSpec`, built by :func:`pyrovae.fit` from
        ``batch_key`` and the covariate keys); None for none.
    library
        ``"observed"`` (each cell's total count) or ``"latent"`` (inferred, with a
        log-normal prior per batch).
    dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``: how the
        likelihood's per-gene parameters vary.
    gene_offsets
        Per-batch gene offsets (see :class:`pyrovae.module.Covariates`); a query model
        of :meth:`map_query` has them.
    seed
        Seeds the initial weights.

    Attributes
    ----------
    history
        One row per epoch trained (:data:`pyrovae.train.HISTORY_COLUMNS`): the KL weight,
        training and validation ELBO, seconds and the prior's name.
    training_plan
        The :class:`~pyrovae.train.TrainingPlan` of the last training call.
    interrupted
        Whether the last training call was stopped by Ctrl-C (it kept the best weights
        so far and returned normally).
    """

    def __init__(
        self,
        var_names: Sequence[str],
        *,
        likelihood: str | Likelihood = "zinb",
        prior: str | Prior = "normal",
        architecture: Architecture | None = None,
        layer: str | None = None,
        covariates: CovariateSpec | None = None,
        library: LibrarySize = "observed",
        dispersion: Dispersion = "gene",
        gene_offsets: bool = False,
        seed: int = 0,
    ):
        self.var_names = pd.Index(var_names)
        if self.var_names.has_duplicates:
            dup = self.var_names[self.var_names.duplicated()].unique()
            raise ValueError(
                f"{len(dup)} gene names occur more than once (e.g. {list(dup[:3])}); "
                "call adata.var_names_make_unique() first"
            )
        self.likelihood = get_likelihood(likelihood)
        self.architecture = architecture or Architecture()
        self.layer = layer
        self.covariates = covariates or CovariateSpec()
        spec = self.covariates
        if dispersion == "gene-batch" and not spec.batch_key:
            raise ValueError("dispersion='gene-batch' needs a batch_key")
        if dispersion == "gene-label" and not spec.labels_key:
            raise ValueError("dispersion='gene-label' needs a labels_key")
        if library == "latent" and not self.likelihood.is_count:
            raise ValueError(f"a latent library needs a count likelihood, not {self.likelihood.name!r}")
        cov = Covariates(spec.n_covariates, spec.n_batches, spec.n_labels, library, dispersion,
                         gene_offsets)
        self.seed = seed  # also seeds the weights of a prior swapped in later
        with seeded(seed, torch.device("cpu")):
            self.module = VAEModule(
                len(self.var_names), self.likelihood, get_prior(prior), self.architecture, cov
            )
        self.history = pd.DataFrame(columns=HISTORY_COLUMNS)
        self.training_plan: TrainingPlan | None = None
        self.interrupted = False  # whether the last training call was stopped by Ctrl-C

    # ------------------------------------------------------------------ structure
    @property
    def prior(self) -> Prior:
        return self.module.model.prior

    def set_prior(self, prior: str | Prior, adata: ad.AnnData | None = None, **options) -> "VAE":
        """Swap the prior **in place**, keeping the encoder and decoder weights.

        This changes this model: the old prior is gone, and the returned object is
        ``self`` (so ``gmm = model.set_prior("gmm", adata)`` leaves ``gmm is model``). To
        keep the model as it is and get a second one with the new prior, use
        :meth:`with_prior`.

        Parameters
        ----------
        prior
            A name from :data:`pyrovae.priors.PRIORS` (see
            :func:`pyrovae.priors.register_prior`) or a :class:`~pyrovae.priors.Prior`.
        adata
            With it, the new prior initialises itself from the current posterior means of
            its cells (a mixture clusters them, by Leiden unless told ``init="kmeans"``);
            without, it does so when training resumes.
        **options
            Constructor arguments of the prior given by name, e.g. ``n_clusters=10``; for
            ``"labels"`` (:class:`pyrovae.labels.SemiSupervised`): ``labels_key`` (the
            ``adata.obs`` column of the known labels, read by the model from then on),
            ``unlabeled_category`` (default ``"Unknown"``), ``classification_weight``,
            ``class_balance`` and ``classifier_input``.

        Returns
        -------
        VAE
            ``self``, changed. Continue with :meth:`train` and write the new results into
            the AnnData with :meth:`annotate`::

                model.set_prior("gmm", adata, n_clusters=10)
                model.train(adata, max_epochs=100)
                model.annotate(adata)
        """
        if prior == "labels":  # the known labels come from adata: labels_key=, unlabeled_category=
            new = self._labels_prior(adata, **options)
        else:
            new = get_prior(prior, **options)
        module = self.module
        latent = x = None
        if adata is not None and hasattr(new, "initialized"):
            data = self._read(adata)
            with self._inference(seed=0):
                pick = np.sort(np.random.default_rng(0).choice(
                    data.n_obs, size=min(5000, data.n_obs), replace=False))
                x, covariates, batch, _ = data.minibatch(pick, self.device)
                x = module.guide.encoder_input(x, covariates, batch)
                latent = self.prior.latent_mean(module.guide.encoder, x)
        # its networks' initial weights, and those of the components that a mixture with K
        # from the data builds once it has found K: torch's own seed differs in every process
        with seeded(self.seed, torch.device("cpu")):
            module.set_prior(new)
            if latent is not None:
                new.initialize(latent, x)
        return self

    def _labels_prior(self, adata, *, labels_key: str | None = None,
                      unlabeled_category: str = "Unknown", classification_weight: float = 50.0,
                      class_balance: bool = True, classifier_input: Literal["body", "latent"] = "body"):
        """The ``"labels"`` prior for ``set_prior``; reads the labels column from now on."""
        from .labels import labels_prior, with_labels_column

        key = labels_key or self.covariates.labels_key
        if adata is None or key is None:
            raise ValueError("set_prior('labels', adata, labels_key=...) needs the AnnData and the "
                             "adata.obs column of its known labels")
        spec = with_labels_column(self.covariates, adata.obs, key)
        self.covariates = spec
        return labels_prior(spec, unlabeled_category=unlabeled_category,
                            classification_weight=classification_weight,
                            class_balance=class_balance, classifier_input=classifier_input,
                            obs=adata.obs)

    def with_prior(self, prior: str | Prior, adata: ad.AnnData | None = None, **options) -> "VAE":
        """A copy of this model with another prior; this model is left exactly as it is.

        The copy has this model's trained encoder and decoder weights, history and
        training plan, and the new prior (initialised as by :meth:`set_prior`). Train it
        to adapt the networks to the prior, and keep both side by side::

            gmm = model.with_prior("gmm", adata, n_clusters=10).train(adata, max_epochs=100)
            gmm.elbo(held_out)["elbo"].mean() - model.elbo(held_out)["elbo"].mean()

        Parameters
        ----------
        prior, adata, **options
            As for :meth:`set_prior`.

        Returns
        -------
        VAE
            A new, independent model (no parameter is shared with this one).
        """
        twin = copy.deepcopy(self)
        return twin.set_prior(prior, adata, **options)

    # ------------------------------------------------------------------ Pyro pieces
    @property
    def model(self) -> PyroFunction:
        """The generative model as a Pyro callable, for Pyro's own tools.

        ``model.model(*model.model_args(adata))`` runs ``p(z) p(x | z, l, s)`` for those
        cells (see :mod:`pyrovae.module` for the arguments); its sites are ``"z"`` (and
        ``"y"`` for a mixture, ``"l"`` for a latent library) and the observed ``"x"``.
        Every trainable parameter shows as a ``param`` site (named e.g.
        ``"model.decoder.heads.log_rho.weight"``), so ``poutine.trace``,
        ``pyro.render_model(model.model, model_args=args, render_params=True)`` and
        ``pyro.infer.SVI`` with a ``pyro.optim`` optimiser see this model's own
        parameters; Pyro's global parameter store is not used.

        With ``x`` replaced by None the model is unconditioned and generates counts::

            args = model.model_args(adata, indices=range(100))
            prior_draws = pyro.infer.Predictive(model.model, num_samples=5)(None, *args[1:])
            prior_draws["x"].shape                              # (5, 100, genes)
            z = pyro.infer.Predictive(model.guide, num_samples=5, return_sites=["z"])(*args)
            replicated = pyro.infer.Predictive(model.model, posterior_samples=z)(None, *args[1:])

        The networks are used in whatever mode they are in: a fitted model is in
        evaluation mode (no dropout, batch norm from its running statistics); call
        ``model.module.train()`` before training it with your own loop. Train a mixture
        with ``model.prior.elbo()``, its estimator (``TraceEnum_ELBO`` when ``y`` is
        enumerated); :meth:`train` is the tested way.
        """
        return PyroFunction(self.module.model, [("model", self.module.model)])

    @property
    def guide(self) -> PyroFunction:
        """The amortised guide ``q(z | x, s)`` (and ``q(y | x)``, ``q(l | x, s)`` where the
        model has them) as a Pyro callable, taking the same arguments as :attr:`model`.

        Its ``param`` sites are the encoders' parameters and those of the prior that the
        guide uses (a mixture's classifier and offsets, named ``"model.prior.*"`` as in
        the model).
        """
        module = self.module
        return PyroFunction(module.guide, [("guide", module.guide), ("model.prior", module.prior)])

    def model_args(self, adata: ad.AnnData, indices: Sequence[int] | np.ndarray | None = None) -> tuple:
        """The arguments of :attr:`model` and :attr:`guide` for some cells of ``adata``.

        Parameters
        ----------
        adata
            Cells with this model's genes (read from the model's ``layer``, with its
            covariates encoded as in training).
        indices
            Integer positions of the cells in ``adata``; all cells when None.

        Returns
        -------
        tuple
            ``(x, library, covariates, batch, label, index, n_obs)`` as tensors on the
            model's device (``covariates`` None without covariates): the counts, the
            cells' total counts, covariates, batch and label codes, the cells' positions
            ``index`` and ``n_obs = adata.n_obs``. The model's ``cells`` plate scales a
            subset to the whole data set, as a minibatch in training. Pass ``None`` in
            place of ``x`` to the model to leave it unconditioned.
        """
        data = self._read(adata)
        if indices is None:
            index = np.arange(data.n_obs)
        else:
            index = np.asarray(indices)
            if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
                raise TypeError("indices must be a 1-d sequence of integer positions")
            if len(index) and (index.min() < 0 or index.max() >= data.n_obs):
                raise IndexError(f"indices must lie in 0..{data.n_obs - 1}")
        return model_args(data.minibatch(index, self.device), index, data.n_obs)

    def _require_clusters(self) -> None:
        if self.prior.n_clusters is None:
            raise ValueError(
                f"the {self.prior.name!r} prior has no clusters; use a mixture prior, e.g. "
                "pyrovae.fit(adata, prior='gmm') or model.set_prior('gmm', adata)"
            )

    @property
    def n_latent(self) -> int:
        return self.architecture.n_latent

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def __repr__(self) -> str:
        epochs = int(self.history["epoch"].iloc[-1]) if len(self.history) else 0
        return (
            f"VAE(likelihood={self.likelihood.name!r}, prior={self.prior.name!r}, "
            f"n_genes={len(self.var_names)}, n_latent={self.n_latent}, "
            f"hidden={list(self.architecture.n_hidden)}, epochs_trained={epochs})"
        )

    # ------------------------------------------------------------------ training
    def train(self, adata: ad.AnnData, plan: TrainingPlan | None = None, **options) -> "VAE":
        """Train on ``adata`` (continuing from the current weights); returns ``self``.

        ``options`` override fields of ``plan`` (see :class:`pyrovae.train.TrainingPlan`),
        e.g. ``model.train(adata, max_epochs=50, lr=5e-4)``. A model trained before
        continues its KL warm-up where it stands (at full weight once done), also after
        :meth:`set_prior`, unless ``restart_warmup=True``.

        Training never leaves a broken model: on any error the model (weights, buffers,
        prior, history) is as it was before the call, or with ``on_failure="last_epoch"``
        at the end of its last finite epoch; Ctrl-C stops at the end of the current step,
        keeps the best weights so far, warns, sets :attr:`interrupted` and returns
        normally. ``checkpoint="run.ckpt"`` writes a checkpoint every
        ``checkpoint_every`` epochs that :func:`pyrovae.resume` continues exactly.
        """
        self._train(adata, replace(plan or TrainingPlan(), **options))
        return self

    def _train(self, adata, plan: TrainingPlan, *, data: CountData | None = None,
               state: TrainingState | None = None, run: dict | None = None,
               label: str = "training", interrupt_note: str = "",
               warn_unfinished_warmup: bool = True) -> None:
        """:meth:`train`, for ``fit`` and ``resume`` too: ``state`` continues a checkpointed
        call, ``run`` is what its checkpoints say the rest of the run is."""
        if plan.checkpoint is not None:
            checkpoint.check_folder(plan.checkpoint)
        # a first training refuses genes without counts; a trained model's genes are set,
        # and a data set where some are empty (a small query, a subset) is fine to go on with
        data = data if data is not None else self._read(adata, for_training=True,
                                                         allow_empty_genes=bool(len(self.history)))
        warmup_done = self._warmup_done(plan)
        state = state if state is not None else TrainingState()
        on_checkpoint = None
        if plan.checkpoint is not None:
            on_checkpoint = self._checkpointer(plan, data, run or {"kind": "train"})
        self.interrupted = False
        try:
            history = train(self.module, data, plan, warmup_done=warmup_done, state=state,
                            on_checkpoint=on_checkpoint, label=label,
                            interrupt_note=interrupt_note,
                            warn_unfinished_warmup=warn_unfinished_warmup)
        except BaseException:
            if plan.on_failure == "last_epoch" and state.rows:
                self._record(state.history(), plan)
            raise
        self._record(history, plan)
        self.interrupted = state.interrupted

    def _warmup_done(self, plan: TrainingPlan) -> int:
        """KL warm-up epochs (of ``plan``'s) already behind the model, from its history."""
        if plan.restart_warmup or not len(self.history) or not plan.kl_warmup_epochs:
            return 0
        last = float(self.history["kl_weight"].iloc[-1])
        return plan.kl_warmup_epochs if last >= 1.0 else int(round(last * plan.kl_warmup_epochs))

    def _record(self, history: pd.DataFrame, plan: TrainingPlan) -> None:
        """Append one call's history (its epochs numbered on from the model's)."""
        if len(self.history):
            history["epoch"] += int(self.history["epoch"].iloc[-1])
            history = pd.concat([self.history, history], ignore_index=True)
        self.history = history
        self.training_plan = plan

    def _checkpointer(self, plan: TrainingPlan, data: CountData, run: dict):
        """The function :func:`pyrovae.train.train` calls to write a checkpoint."""
        data_print = checkpoint.fingerprint(data)
        history = {k: self.history[k].to_list() for k in self.history.columns}
        model_plan = self.training_plan

        def write(state: TrainingState) -> None:
            content = checkpoint.payload(self, plan, state, data_print, run, history, model_plan)
            checkpoint.write(plan.checkpoint, content)

        return write

    # ------------------------------------------------------------------ inference
    def get_latent(self, adata: ad.AnnData, *, batch_size: int = 1024) -> np.ndarray:
        """Posterior mean ``E_q[z | x]`` of each cell, ``(cells, n_latent)``."""
        return self._map(adata, lambda enc, x: self.prior.latent_mean(enc, x), batch_size)

    def get_cluster_probs(self, adata: ad.AnnData, *, batch_size: int = 1024) -> np.ndarray:
        """``q(y | x)`` of each cell, ``(cells, n_clusters)``, for a prior with clusters."""
        self._require_clusters()
        return self._map(adata, lambda enc, x: self.prior.cluster_probs(enc, x), batch_size)

    def get_clusters(self, adata: ad.AnnData, *, batch_size: int = 1024) -> np.ndarray:
        """The most probable cluster of each cell, ``argmax_k q(y = k | x)``."""
        return self.get_cluster_probs(adata, batch_size=batch_size).argmax(1)

    def predict(self, adata: ad.AnnData, *, soft: bool = False, batch_size: int = 1024):
        """The most probable known label of each cell (a categorical Series), or with
        ``soft=True`` a ``(cells, labels)`` DataFrame of ``q(y | x)``; for a model with the
        ``"labels"`` prior (see :func:`pyrovae.labels.predict`)."""
        from .labels import predict

        return predict(self, adata, soft=soft, batch_size=batch_size)

    def novelty(self, adata: ad.AnnData, *,
                score: Literal["entropy", "max_probability", "density", "distance"] = "entropy") -> pd.Series:
        """Per-cell novelty score of a labels model (see :func:`pyrovae.labels.novelty`)."""
        from .labels import novelty

        return novelty(self, adata, score=score)

    def calibrate(self, adata: ad.AnnData, *, labels_key: str | None = None,
                  method: Literal["accuracy", "nll"] = "accuracy",
                  cells: ad.AnnData | None = None) -> float:
        """Temperature-scale ``q(y | x)`` on held-out labelled cells, in place; returns the
        temperature (see :func:`pyrovae.labels.calibrate`: by default the mean confidence
        on ``cells`` is matched to the hold-out's accuracy)."""
        from .labels import calibrate

        return calibrate(self, adata, labels_key=labels_key, method=method, cells=cells)

    def map_query(self, query: ad.AnnData, **options) -> "VAE":
        """A new model for a query data set with new batches, trained with this model's
        weights frozen (scArches); this model is not changed. See
        :func:`pyrovae.query.map_query` for the options."""
        from .query import map_query

        return map_query(self, query, **options)

    def _map(self, adata, fn, batch_size: int) -> np.ndarray:
        """``fn(encoder, encoder_input)`` over all cells of ``adata``, concatenated."""
        data = self._read(adata)
        guide = self.module.guide
        with self._inference(seed=0):
            out = [fn(guide.encoder, guide.encoder_input(mb[0], mb[1], mb[2]))
                   for _, mb in self._batches(data, batch_size)]
        return torch.cat(out).cpu().numpy()

    def get_normalized_expression(
        self,
        adata: ad.AnnData,
        *,
        library_size: float = 1e4,
        transform_batch: str | Sequence[str] | None = None,
        n_samples: int = 10,
        return_samples: bool = False,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> np.ndarray:
        """Denoised expression, ``(cells, genes)``, averaged over ``n_samples`` posterior draws.

        For count likelihoods this is ``library_size * rho(z, s)``: expected counts at a
        common library size (counts per 10,000 by default), zero inflation left out. For
        the continuous likelihoods it is the decoder's mean.

        Parameters
        ----------
        transform_batch
            Decode every cell as if it came from this batch (a category of the model's
            ``batch_key``): batch-corrected expression. A list averages over those batches.
            ``z`` is still inferred from each cell's own batch.
        return_samples
            Return every draw, ``(n_samples, cells, genes)``, instead of their mean (for
            differential expression).
        """
        data = self._read(adata)
        module, spec = self.module, self.covariates
        if transform_batch is not None and not spec.batch_key:
            raise ValueError("transform_batch needs a model trained with a batch_key")
        targets = ([None] if transform_batch is None else
                   [transform_batch] if isinstance(transform_batch, str) else list(transform_batch))
        for target in targets:
            if target is not None and str(target) not in spec.categorical[spec.batch_key]:
                raise ValueError(
                    f"transform_batch {target!r} is not a batch of this model; it knows "
                    f"{spec.categorical[spec.batch_key]}"
                )
        out = []
        with self._inference(seed), self.prior.evaluation():
            for _, mb in self._batches(data, batch_size):
                draws = []
                for _ in range(n_samples):
                    z = module.guide(*self._args(mb))
                    total = 0.0
                    for target in targets:
                        covariates = self._with_batch(mb[1], target)
                        batch = mb[2] if target is None else torch.full_like(
                            mb[2], spec.categorical[spec.batch_key].index(str(target)))
                        total = total + module.model.expression(
                            z, library_size, covariates, batch, mb[3])
                    draws.append(total / len(targets))
                draws = torch.stack(draws)
                out.append(draws if return_samples else draws.mean(0))
        return torch.cat(out, dim=1 if return_samples else 0).cpu().numpy()

    def _with_batch(self, covariates: torch.Tensor | None, batch: str | None):
        """The covariates with the batch block set to ``batch`` (unchanged for None)."""
        if batch is None:
            return covariates
        spec = self.covariates
        covariates = covariates.clone()
        block = spec.batch_one_hot_columns()
        covariates[:, block] = 0.0
        covariates[:, spec.categorical[spec.batch_key].index(str(batch))] = 1.0
        return covariates

    def sample(
        self,
        n: int,
        *,
        cluster: int | None = None,
        covariates: dict[str, Any] | None = None,
        library_size: float | None = None,
        seed: int = 0,
    ) -> ad.AnnData:
        """Synthetic cells from the prior: ``z ~ p(z)`` (or ``p(z | y = cluster)``),
        ``x ~ p(x | z, l, s)``.

        Parameters
        ----------
        n
            Number of cells.
        cluster
            Draw ``z`` from this mixture component (priors with clusters).
        covariates
            For a model with covariates (a conditional VAE), the value of each, e.g.
            ``{"batch": "b1", "treatment": "drug"}``: the cells are generated under them.
        library_size
            Every cell's library size; else drawn from the log-normal fitted to the
            training cells of the cell's batch.

        Returns
        -------
        AnnData with the draws in ``X`` (genes as ``var_names``), ``z`` in
        ``obsm["X_pyrovae"]``, ``l`` in ``obs["library"]``, the covariates and (when asked
        for) ``obs["cluster"]``.
        """
        module, spec = self.module, self.covariates
        if spec.keys or covariates:
            encoded = spec.encode_values(covariates or {}, n)
        else:
            encoded = None
        with self._inference(seed), self.prior.evaluation():
            z = self.prior.sample_z(n, cluster)
            if encoded is not None:
                cov, batch, label = encoded.to(z.device)
            else:
                cov, batch, label = None, torch.zeros(n, dtype=torch.long, device=z.device), None
            if library_size is not None:
                library = torch.full((n, 1), float(library_size), device=z.device)
            else:
                if not bool(module.library_fitted):
                    raise ValueError("the model has not been trained: pass library_size=")
                library = module.model.library_prior(batch).sample().unsqueeze(-1)
            x = module.model.observation(z, library, cov, batch, label).sample()
        obs = pd.DataFrame({"library": library.squeeze(1).cpu().numpy()},
                           index=[f"sample{i}" for i in range(n)])
        for key, value in (covariates or {}).items():
            obs[key] = pd.Categorical([str(value)] * n) if key in spec.categorical else float(value)
        out = ad.AnnData(X=x.cpu().numpy(), obs=obs, var=pd.DataFrame(index=self.var_names.copy()))
        out.obsm["X_pyrovae"] = z.cpu().numpy()
        if cluster is not None:
            out.obs["cluster"] = pd.Categorical([str(cluster)] * n)
        return out

    def elbo(self, adata: ad.AnnData, *, n_samples: int = 10, batch_size: int = 1024,
             seed: int = 0) -> pd.DataFrame:
        """The ELBO of each cell, in nats, for scoring held-out cells.

        Returns a DataFrame indexed by ``obs_names`` with columns ``elbo``,
        ``reconstruction`` (``E_q[log p(x | z)]``, averaged over ``n_samples`` draws) and
        ``kl`` (``KL(q || p)`` of all latent variables, closed form where it exists);
        ``elbo = reconstruction - kl``. A mixture's cluster ``y`` is summed out exactly;
        a model trained with the Gumbel-Softmax relaxation is scored as the discrete model
        it approximates.
        """
        data = self._read(adata)
        recon, elbo = [], []
        module = self.module
        with self._inference(seed), self.prior.evaluation():
            for _, mb in self._batches(data, batch_size):
                r, e = elbo_per_cell(module.model, module.guide, self._args(mb), n_samples)
                recon.append(r)
                elbo.append(e)
        recon, elbo = torch.cat(recon).cpu().numpy(), torch.cat(elbo).cpu().numpy()
        return pd.DataFrame(
            {"elbo": elbo, "reconstruction": recon, "kl": recon - elbo}, index=data.obs_names
        )

    def marginal_log_likelihood(self, adata: ad.AnnData, *, n_samples: int = 100,
                                batch_size: int = 256, seed: int = 0) -> pd.Series:
        """The importance-weighted estimate of ``log p(x)`` of each cell, in nats (Burda et
        al. 2015), from ``n_samples`` draws of ``q``; a mixture's cluster is summed out
        exactly inside each weight. It is a lower bound that rises towards ``log p(x)``
        with ``n_samples`` and is never below the ELBO in expectation. Memory is bounded
        by ``batch_size`` cells, whatever ``n_samples``.
        """
        data = self._read(adata)
        module = self.module
        out = []
        with self._inference(seed), self.prior.evaluation():
            for _, mb in self._batches(data, batch_size):
                out.append(marginal_log_likelihood(module.model, module.guide, self._args(mb), n_samples))
        return pd.Series(torch.cat(out).cpu().numpy(), index=data.obs_names, name="log_likelihood")

    def posterior_predictive_check(self, adata: ad.AnnData, *, n_samples: int = 50,
                                   seed: int = 0):
        """Posterior predictive checks per gene and per cell
        (:func:`pyrovae.criticism.posterior_predictive_check`)."""
        from .criticism import posterior_predictive_check

        return posterior_predictive_check(self, adata, n_samples=n_samples, seed=seed)

    def differential_expression(
        self,
        adata: ad.AnnData,
        groupby: str,
        group1: Hashable | Sequence[Hashable],
        group2: Hashable | Sequence[Hashable] | None = None,
        *,
        delta: float = 0.25,
        mode: Literal["groups", "cells"] = "groups",
        n_samples: int = 10,
        batch_size: int = 1024,
        seed: int = 0,
        **options,
    ) -> pd.DataFrame:
        """Differential expression of the cells with ``adata.obs[groupby]`` in ``group1``
        against those in ``group2`` (all other cells when None), one row per gene sorted
        by evidence: ``lfc_mean`` (log2, group 1 over group 2), ``proba_de``
        (``P(|LFC| > delta)``), ``bayes_factor``, ``expression1``, ``expression2``, ...

        See :func:`pyrovae.de.differential_expression` for the method, the columns and
        ``options`` (``transform_batch``, ``max_cells``, ``n_comparisons``,
        ``pseudocount``, ``library_size``); draw a volcano plot of the result with
        :func:`pyrovae.plotting.volcano`. ``adata`` is not modified.
        """
        from .de import differential_expression

        return differential_expression(
            self, adata, groupby, group1, group2, delta=delta, mode=mode, n_samples=n_samples,
            batch_size=batch_size, seed=seed, **options,
        )

    def latent_metrics(self, adata: ad.AnnData, *, label_key: str | None = None,
                       batch_key: str | None = None) -> dict[str, float]:
        """Scores of this model's latent space on ``adata``: silhouette, active dimensions,
        KMeans and Leiden ARI/NMI against ``adata.obs[label_key]``, batch-mixing entropy
        by ``adata.obs[batch_key]``, and for a mixture prior the ARI/NMI of its own
        clusters (``cluster_ari``, ``cluster_nmi``). ``adata`` is not modified."""
        from . import metrics

        light = ad.AnnData(obs=adata.obs.copy(), obsm={"X_pyrovae": self.get_latent(adata)})
        out = metrics.latent_metrics(light, use_rep="X_pyrovae", label_key=label_key, batch_key=batch_key)
        if label_key is not None and self.prior.n_clusters is not None:
            own = metrics.cluster_scores(light.obs[label_key].to_numpy(), self.get_clusters(adata))
            out.update({f"cluster_{k}": v for k, v in own.items()})
        return out

    def posterior_predictive_sample(self, adata: ad.AnnData, n_samples: int = 1, *,
                                    batch_size: int = 1024, seed: int = 0) -> np.ndarray:
        """Replicated data, ``(n_samples, cells, genes)``: ``z ~ q(z | x)``, ``x_rep ~ p(x | z, l)``."""
        data = self._read(adata)
        module = self.module
        out = []
        with self._inference(seed), self.prior.evaluation():
            for _, mb in self._batches(data, batch_size):
                args = self._args(mb)
                draws = [posterior_predictive(module.model, module.guide, args)
                         for _ in range(n_samples)]
                out.append(torch.stack(draws))
        return torch.cat(out, dim=1).cpu().numpy()

    # ------------------------------------------------------------------ reporting
    def plot_history(self, ax=None):
        """Training and validation ELBO per epoch; returns the matplotlib Axes."""
        from .plotting import plot_history

        return plot_history(self.history, ax=ax)

    def settings(self) -> dict[str, Any]:
        """The run's settings as plain values (what ``fit`` writes to ``adata.uns``)."""
        out: dict[str, Any] = {
            "version": __version__,
            "likelihood": self.likelihood.name,
            "prior": self.prior.name,
            **{f"prior_{k}": v for k, v in self.prior.config().items()},
            "layer": self.layer,
            "n_genes": len(self.var_names),
            "batch_key": self.covariates.batch_key,
            "categorical_covariate_keys": [k for k in self.covariates.categorical
                                           if k != self.covariates.batch_key] or None,
            "continuous_covariate_keys": list(self.covariates.continuous) or None,
            "labels_key": self.covariates.labels_key,
            "library": self.module.cov.library,
            "dispersion": self.module.cov.dispersion,
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.architecture).items()},
        }
        if self.training_plan is not None:
            out.update(asdict(self.training_plan))
        if len(self.history):
            out["epochs_trained"] = int(self.history["epoch"].iloc[-1])
            best = self.history["validation_elbo"]
            if best.notna().any():
                out["best_validation_elbo"] = float(best.max())
        return {k: v for k, v in out.items() if v is not None}

    def annotate(self, adata: ad.AnnData, *, key_added: str = "X_pyrovae") -> None:
        """Write this model's results for ``adata`` into it, as :func:`pyrovae.fit` does,
        for the model as it is now (after :meth:`set_prior` and :meth:`train`, say).

        Writes ``adata.obsm[key_added]`` (the posterior mean of each cell) and
        ``adata.uns["pyrovae"]`` (``settings`` and per-epoch ``history``, replacing any
        earlier entry). A prior with clusters also writes ``adata.obs["pyrovae_cluster"]``
        (``argmax_k q(y = k | x)``, categorical), ``adata.obsm["pyrovae_cluster_probs"]``
        and (for a Gaussian mixture) the component means in
        ``adata.uns["pyrovae"]["component_means"]``; the ``"labels"`` prior also writes
        ``adata.obs["pyrovae_label"]`` and ``adata.obsm["pyrovae_label_probabilities"]``
        (a cells x labels DataFrame of ``q(y | x)``). Everything is computed before
        anything is written: on an error ``adata`` is unchanged. Nothing else in ``adata``
        changes.

        Parameters
        ----------
        adata
            An AnnData (in memory or ``backed="r"``) with this model's genes.
        key_added
            Key of the latent means in ``adata.obsm``.
        """
        if not isinstance(adata, ad.AnnData):
            raise TypeError(
                f"annotate writes into an AnnData, got {type(adata).__name__}; for .h5ad "
                "files use the model's methods (get_latent, get_clusters) instead"
            )
        latent = self.get_latent(adata)
        record: dict[str, Any] = {
            "settings": {**self.settings(), "obsm_key": key_added, "n_cells": adata.n_obs},
            "history": {k: self.history[k].to_numpy() for k in self.history.columns},
        }
        probs = None
        if self.prior.n_clusters is not None:
            probs = self.get_cluster_probs(adata)
            locs = getattr(self.prior, "locs", None)
            if isinstance(locs, torch.Tensor):
                record["component_means"] = locs.detach().cpu().numpy()
            record["clusters"] = {"n_clusters": int(self.prior.n_clusters),
                                  **getattr(self.prior, "selection", {})}
        adata.obsm[key_added] = latent
        if probs is not None:
            K = probs.shape[1]
            adata.obsm["pyrovae_cluster_probs"] = probs
            adata.obs["pyrovae_cluster"] = pd.Categorical(
                probs.argmax(1).astype(str), categories=[str(k) for k in range(K)]
            )
        labels = getattr(self.prior, "takes_labels", False) and self.prior.labels
        if labels and probs is not None:  # the 'labels' prior: its clusters are the labels
            adata.obs["pyrovae_label"] = pd.Categorical.from_codes(probs.argmax(1), categories=labels)
            adata.obsm["pyrovae_label_probabilities"] = pd.DataFrame(
                probs, index=adata.obs_names, columns=labels)
        adata.uns["pyrovae"] = record

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the weights, settings, genes and history to one verified file.

        The file (:mod:`pyrovae.files`) carries a format version, its size and the SHA-256
        of its content, and is written to a temporary file renamed into place: a crash
        mid-write leaves any earlier file at ``path`` whole, and :func:`pyrovae.load`
        refuses a damaged file by name instead of loading wrong weights.
        """
        files.check_writable(path, "path")
        files.write_verified(
            path,
            {
                "format": _FORMAT,
                "version": __version__,
                "likelihood": self.likelihood.name,
                "prior": self.prior.name,
                "prior_config": self.prior.config(),
                "architecture": {**asdict(self.architecture), "n_hidden": list(self.architecture.n_hidden)},
                "layer": self.layer,
                "covariates": self.covariates.to_dict(),
                "library": self.module.cov.library,
                "dispersion": self.module.cov.dispersion,
                "gene_offsets": self.module.cov.gene_offsets,
                "var_names": _plain_names(self.var_names),
                "history": {k: self.history[k].to_list() for k in self.history.columns},
                "training_plan": asdict(self.training_plan) if self.training_plan else None,
                "state_dict": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            },
            format=_FORMAT,
            format_version=files.MODEL_FORMAT_VERSION,
        )

    # ------------------------------------------------------------------ helpers
    def _read(self, adata, *, for_training: bool = False,
              allow_empty_genes: bool | None = None) -> CountData:
        """The data of an AnnData (in memory or ``backed="r"``), or of ``.h5ad`` files
        (a path or a list of paths, streamed), checked for this model; genes without
        counts are refused for training unless ``allow_empty_genes``."""
        if allow_empty_genes is None:
            allow_empty_genes = not for_training
        spec = self.covariates
        if not for_training and spec.labels_key and getattr(self.prior, "takes_labels", False):
            # a labels model embeds and predicts cells without a labels column (a query):
            # they are read as unlabelled; training still needs the column
            spec = replace(spec, unlabeled_category=self.prior.unlabeled_category)
        if is_paths(adata):
            if self.layer is not None:
                raise ValueError("files are streamed from their X; a model of a layer needs an AnnData")
            return open_h5ad(adata, genes=self.var_names, kind=self.likelihood.data,
                             allow_empty_genes=allow_empty_genes, covariates=spec)
        if not isinstance(adata, ad.AnnData):
            raise TypeError(f"expected an AnnData or .h5ad path(s), got {type(adata).__name__}")
        check_genes(adata.var_names, self.var_names)
        return read_data(adata, layer=self.layer, kind=self.likelihood.data,
                         allow_empty_genes=allow_empty_genes, covariates=spec)

    @contextlib.contextmanager
    def _inference(self, seed: int) -> Iterator[None]:
        """Evaluation mode, no gradients, seeded draws."""
        self.module.eval()
        with seeded(seed, self.device), torch.no_grad(), pyro.validation_enabled(False):
            yield

    def _batches(self, data: CountData, batch_size: int):
        return data.batches(batch_size, self.device)

    @staticmethod
    def _args(minibatch: tuple) -> tuple:
        """Model and guide arguments for a whole batch (no minibatch scaling)."""
        n = len(minibatch[0])
        return model_args(minibatch, np.arange(n), n)


def _plain_names(names) -> list:
    """Gene names as saved: strings and integers keep their type (so a model fitted on
    integer ``var_names`` loads back onto its own data); anything else as a string."""
    return [v.item() if isinstance(v, np.generic) else v if isinstance(v, (str, int)) else str(v)
            for v in names]


def load(path: str | os.PathLike, adata: ad.AnnData | None = None, *,
         device: str = "cpu") -> VAE:
    """Load a model written by :meth:`VAE.save`.

    With ``adata``, check at once that its genes are the model's, in the same order.

    Raises
    ------
    pyrovae.files.ModelFileError
        Naming the file and what is wrong with it: missing, empty, not a pyrovae model
        file (a text file, a checkpoint, another archive), truncated, corrupted (its
        SHA-256 does not match), written by a newer pyrovae, or lacking a part.
    """
    name = os.fspath(path)
    state = files.read_verified(
        path, format=_FORMAT, format_version=files.MODEL_FORMAT_VERSION, what="model file",
        error=files.ModelFileError,
        others={checkpoint.FORMAT: ": continue the run with pyrovae.resume(path, adata)"},
    )
    if state.get("format") != _FORMAT:
        raise files.ModelFileError(f"{name!r} is not a model saved by pyrovae")
    with open(name, "rb") as f:
        if not f.read(len(files.MAGIC)) == files.MAGIC:
            warnings.warn(f"{name!r} was saved by an earlier pyrovae, before model files carried "
                          "a checksum: loaded without verifying it; save it again to add one",
                          UserWarning, stacklevel=2)
    missing = [key for key in _MODEL_KEYS if key not in state]
    if missing:
        raise files.ModelFileError(f"model file {name!r} lacks {', '.join(map(repr, missing))}")
    arch = state["architecture"]
    with warnings.catch_warnings():  # a file saved under an old argument name is not the user's to fix
        warnings.simplefilter("ignore", FutureWarning)
        prior = prior_from_config(state["prior"], state["prior_config"])
    model = VAE(
        state["var_names"],
        likelihood=state["likelihood"],
        prior=prior,
        architecture=Architecture(**{**arch, "n_hidden": tuple(arch["n_hidden"])}),
        layer=state["layer"],
        covariates=CovariateSpec(**state["covariates"]),
        library=state["library"],
        dispersion=state["dispersion"],
        gene_offsets=bool(state.get("gene_offsets", False)),  # absent from older files
    )
    try:
        model.module.load_state_dict(state["state_dict"])
    except RuntimeError as err:  # weights that do not fit the settings stored beside them
        raise files.ModelFileError(f"model file {name!r}: its weights do not match its settings "
                                   f"({str(err).splitlines()[0]})") from None
    model.module.to(resolve_device(device)).eval()
    model.history = pd.DataFrame(state["history"], columns=model.history.columns)
    if state["training_plan"] is not None:
        plan = state["training_plan"]
        model.training_plan = TrainingPlan(**plan)
    if adata is not None:
        check_genes(adata.var_names, model.var_names)
    return model
