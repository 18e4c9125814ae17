"""The fitted model: the object ``pyrovae.fit`` returns, facing AnnData."""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, replace
from typing import Any, Iterator, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch
from pyro import poutine
from torch.distributions import kl_divergence

from . import __version__
from .data import CountData, check_genes, read_data
from .likelihoods import Likelihood, get_likelihood
from .module import VAEModule
from .nn import Architecture
from .priors import Prior, get_prior
from .train import TrainingPlan, resolve_device, seeded, train

__all__ = ["VAE", "load"]

_FORMAT = "pyrovae-model"


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
    seed
        Seeds the initial weights.
    """

    def __init__(
        self,
        var_names: Sequence[str],
        *,
        likelihood: str | Likelihood = "zinb",
        prior: str | Prior = "normal",
        architecture: Architecture | None = None,
        layer: str | None = None,
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
        with seeded(seed, torch.device("cpu")):
            self.module = VAEModule(
                len(self.var_names), self.likelihood, get_prior(prior), self.architecture
            )
        self.history = pd.DataFrame(
            columns=["epoch", "kl_weight", "train_elbo", "validation_elbo", "seconds"]
        )
        self.training_plan: TrainingPlan | None = None

    # ------------------------------------------------------------------ structure
    @property
    def prior(self) -> Prior:
        return self.module.model.prior

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
        e.g. ``model.train(adata, max_epochs=50, lr=5e-4)``.
        """
        plan = replace(plan or TrainingPlan(), **options)
        data = self._read(adata, for_training=True)
        history = train(self.module, data, plan)
        if len(self.history):
            history["epoch"] += int(self.history["epoch"].iloc[-1])
            history = pd.concat([self.history, history], ignore_index=True)
        self.history = history
        self.training_plan = plan
        return self

    # ------------------------------------------------------------------ inference
    def get_latent(self, adata: ad.AnnData, *, batch_size: int = 1024) -> np.ndarray:
        """Posterior mean ``E_q[z | x]`` of each cell, ``(cells, n_latent)``."""
        data = self._read(adata)
        with self._inference(seed=0):
            out = [self.module.guide.posterior(x).mean for _, x in self._batches(data, batch_size)]
        return torch.cat(out).cpu().numpy()

    def get_normalized_expression(
        self,
        adata: ad.AnnData,
        *,
        library_size: float = 1e4,
        n_samples: int = 10,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> np.ndarray:
        """Denoised expression, ``(cells, genes)``, averaged over ``n_samples`` posterior draws.

        For count likelihoods this is ``library_size * rho(z)``: expected counts at a common
        library size (counts per 10,000 by default), zero inflation left out. For the
        continuous likelihoods it is the decoder's mean.
        """
        data = self._read(adata)
        model = self.module.model
        out = []
        with self._inference(seed):
            for _, x in self._batches(data, batch_size):
                z = self.module.guide.posterior(x).sample((n_samples,))
                heads = model.decoder(z.reshape(-1, self.n_latent))
                expr = self.likelihood.expression(heads, model.gene_params, library_size)
                out.append(expr.reshape(n_samples, len(x), -1).mean(0))
        return torch.cat(out).cpu().numpy()

    def elbo(self, adata: ad.AnnData, *, n_samples: int = 10, batch_size: int = 1024,
             seed: int = 0) -> pd.DataFrame:
        """The ELBO of each cell, in nats, for scoring held-out cells.

        Returns a DataFrame indexed by ``obs_names`` with columns ``elbo``,
        ``reconstruction`` (``E_q[log p(x | z)]``, averaged over ``n_samples`` draws) and
        ``kl`` (``KL(q(z | x) || p(z))``, closed form where it exists); ``elbo =
        reconstruction - kl``.
        """
        data = self._read(adata)
        recon, kl = [], []
        with self._inference(seed):
            for index, x in self._batches(data, batch_size):
                r, k = self._elbo_parts(x, n_samples)
                recon.append(r)
                kl.append(k)
        recon, kl = torch.cat(recon).cpu().numpy(), torch.cat(kl).cpu().numpy()
        return pd.DataFrame(
            {"elbo": recon - kl, "reconstruction": recon, "kl": kl}, index=data.obs_names
        )

    def posterior_predictive_sample(self, adata: ad.AnnData, n_samples: int = 1, *,
                                    batch_size: int = 1024, seed: int = 0) -> np.ndarray:
        """Replicated data, ``(n_samples, cells, genes)``: ``z ~ q(z | x)``, ``x_rep ~ p(x | z, l)``."""
        data = self._read(adata)
        out = []
        with self._inference(seed):
            for _, x in self._batches(data, batch_size):
                args = self._args(x)
                draws = []
                for _ in range(n_samples):
                    guide_trace = poutine.trace(self.module.guide).get_trace(*args)
                    model = poutine.uncondition(poutine.replay(self.module.model, trace=guide_trace))
                    draws.append(poutine.trace(model).get_trace(*args).nodes["x"]["value"])
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
            "layer": self.layer,
            "n_genes": len(self.var_names),
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

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the weights, settings, genes and history to one file (a torch archive)."""
        torch.save(
            {
                "format": _FORMAT,
                "version": __version__,
                "likelihood": self.likelihood.name,
                "prior": self.prior.name,
                "architecture": {**asdict(self.architecture), "n_hidden": list(self.architecture.n_hidden)},
                "layer": self.layer,
                "var_names": [str(v) for v in self.var_names],
                "history": {k: self.history[k].to_list() for k in self.history.columns},
                "training_plan": asdict(self.training_plan) if self.training_plan else None,
                "state_dict": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            },
            path,
        )

    # ------------------------------------------------------------------ helpers
    def _read(self, adata: ad.AnnData, *, for_training: bool = False) -> CountData:
        if not isinstance(adata, ad.AnnData):
            raise TypeError(f"expected an AnnData, got {type(adata).__name__}")
        check_genes(adata.var_names, self.var_names)
        return read_data(adata, layer=self.layer, kind=self.likelihood.data,
                         allow_empty_genes=not for_training)

    @contextlib.contextmanager
    def _inference(self, seed: int) -> Iterator[None]:
        """Evaluation mode, no gradients, seeded draws."""
        self.module.eval()
        with seeded(seed, self.device), torch.no_grad():
            yield

    def _batches(self, data: CountData, batch_size: int):
        return data.batches(batch_size, self.device)

    @staticmethod
    def _args(x: torch.Tensor) -> tuple:
        """Model and guide arguments for a whole batch (no minibatch scaling)."""
        return x, x.sum(-1, keepdim=True), torch.arange(len(x), device=x.device), len(x)

    def _elbo_parts(self, x: torch.Tensor, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        args = self._args(x)
        recon = torch.zeros(len(x), device=x.device)
        kl = torch.zeros(len(x), device=x.device)
        for _ in range(n_samples):
            guide_trace = poutine.trace(self.module.guide).get_trace(*args)
            model_trace = poutine.trace(
                poutine.replay(self.module.model, trace=guide_trace)
            ).get_trace(*args)
            for name, site in model_trace.nodes.items():
                if site["type"] != "sample":
                    continue
                if site["is_observed"]:
                    recon += site["fn"].log_prob(site["value"])
                    continue
                q = guide_trace.nodes[name]["fn"]
                try:
                    kl += kl_divergence(q, site["fn"])
                except NotImplementedError:
                    kl += q.log_prob(site["value"]) - site["fn"].log_prob(site["value"])
        return recon / n_samples, kl / n_samples


def load(path: str | os.PathLike, adata: ad.AnnData | None = None, *,
         device: str = "cpu") -> VAE:
    """Load a model written by :meth:`VAE.save`.

    With ``adata``, check at once that its genes are the model's, in the same order.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a model saved by pyrovae")
    arch = state["architecture"]
    model = VAE(
        state["var_names"],
        likelihood=state["likelihood"],
        prior=state["prior"],
        architecture=Architecture(**{**arch, "n_hidden": tuple(arch["n_hidden"])}),
        layer=state["layer"],
    )
    model.module.load_state_dict(state["state_dict"])
    model.module.to(resolve_device(device)).eval()
    model.history = pd.DataFrame(state["history"], columns=model.history.columns)
    if state["training_plan"] is not None:
        model.training_plan = TrainingPlan(**state["training_plan"])
    if adata is not None:
        check_genes(adata.var_names, model.var_names)
    return model
