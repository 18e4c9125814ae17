"""The generative model and the amortised guide, as Pyro functions on tensors.

Both take the same arguments (Pyro's contract), for a minibatch of cells:

``x``
    ``(cells, genes)`` observations, or ``None`` in the model to generate.
``library``
    ``(cells, 1)`` observed total counts.
``covariates``
    ``(cells, n_covariates)`` one-hot categorical and standardised continuous covariates,
    fed to the encoder and the decoder; ``None`` without covariates.
``batch``, ``label``
    ``(cells,)`` integer batch and label of each cell: they pick the per-batch library
    prior and per-batch or per-label dispersions.
``index``
    ``(cells,)`` positions of these cells in the data set; with ``n_obs`` they scale the
    minibatch to the whole data set through ``pyro.plate(size=n_obs, subsample=index)``.
``kl_weight``
    Weight of the latent sites (KL warm-up); 1 gives the ELBO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .likelihoods import Likelihood
from .nn import Architecture, Decoder, Encoder, LocalPyroModule
from .priors import Prior

__all__ = ["Covariates", "Guide", "Model", "VAEModule", "with_covariates"]

Dispersion = Literal["gene", "gene-batch", "gene-label", "gene-cell"]
LibrarySize = Literal["observed", "latent"]


@dataclass(frozen=True)
class Covariates:
    """Sizes the networks need to know about the cells' covariates and parameters.

    Attributes
    ----------
    n_covariates
        Width of the covariate vector given to encoder and decoder.
    n_batches, n_labels
        Number of batches and labels (1 without them).
    library
        ``"observed"``: the cell's total count; ``"latent"``: ``l ~ LogNormal`` with the
        mean and variance of the log library sizes of the cell's batch (scVI), inferred by
        its own encoder.
    dispersion
        How the likelihood's per-gene parameters (``theta``, ``sigma``) vary: per gene,
        per gene and batch, per gene and label, or per gene and cell (a decoder output).
    gene_offsets
        Per-batch gene offsets ``o_bg`` (a count likelihood with a ``log_rho`` head): a
        cell of batch ``b`` has expression shares ``rho_g(z, s) exp(o_bg)``, renormalised,
        and its encoder reads ``x_g exp(-o_bg)``. A gene-specific capture rate of a batch
        (``x_g`` thinned with rate ``r_g``) is ``o_bg = log r_g``. Query mapping
        (:func:`pyrovae.query.map_query`) learns them for the new batches.
    """

    n_covariates: int = 0
    n_batches: int = 1
    n_labels: int = 1
    library: LibrarySize = "observed"
    dispersion: Dispersion = "gene"
    gene_offsets: bool = False

    def __post_init__(self):
        if self.library not in ("observed", "latent"):
            raise ValueError(f"library must be 'observed' or 'latent', got {self.library!r}")
        if self.dispersion not in ("gene", "gene-batch", "gene-label", "gene-cell"):
            raise ValueError(
                f"dispersion must be 'gene', 'gene-batch', 'gene-label' or 'gene-cell', "
                f"got {self.dispersion!r}"
            )


def with_covariates(h: torch.Tensor, covariates: torch.Tensor | None) -> torch.Tensor:
    """``[h, covariates]``, the covariates broadcast over any leading dimensions of ``h``
    (an enumerated cluster dimension, say)."""
    if covariates is None:
        return h
    shape = torch.broadcast_shapes(h.shape[:-1], covariates.shape[:-1])
    return torch.cat([h.expand(*shape, h.shape[-1]), covariates.expand(*shape, covariates.shape[-1])], -1)


class Model(LocalPyroModule):
    """``z ~ prior``, ``l``, ``x_g | z, l ~ Likelihood(decoder(z, s), theta_g, l)`` per cell.

    With the default prior and ``likelihood="zinb"``::

        p(z) = N(0, I)
        l = sum_g x_g                                   (or l ~ LogNormal(m_b, v_b))
        p(x | z, l, s) = prod_g ZINB(x_g; mean = l * rho_g(z, s), theta_g, pi_g(z, s))

    where ``s`` are the cell's covariates. The prior object samples the latent sites
    (``z``, and ``y`` for a mixture).
    """

    def __init__(self, n_genes: int, likelihood: Likelihood, prior: Prior, arch: Architecture,
                 cov: Covariates):
        super().__init__()
        self.n_latent = arch.n_latent
        self.likelihood = likelihood
        self.cov = cov
        self.prior = prior
        per_cell = likelihood.gene_params if cov.dispersion == "gene-cell" else ()
        heads = {**likelihood.heads, **{name: "identity" for name in per_cell}}
        self.decoder = Decoder(arch.n_latent + cov.n_covariates, n_genes, heads, arch,
                               likelihood.head_widths)
        for name in per_cell:  # a decoder output per cell and gene: its bias at the init given
            if name in likelihood.gene_param_init:
                with torch.no_grad():
                    self.decoder.heads[name].bias.copy_(likelihood.initial_value(name, (n_genes,)))
        rows = {"gene": (), "gene-batch": (cov.n_batches,), "gene-label": (cov.n_labels,)}
        self.gene_params = nn.ParameterDict({
            name: nn.Parameter(likelihood.initial_value(name, (*rows[cov.dispersion], n_genes)))
            for name in likelihood.gene_params if cov.dispersion != "gene-cell"
        })
        if cov.gene_offsets:
            if "log_rho" not in likelihood.heads:
                raise ValueError(f"gene offsets need a count likelihood with a 'log_rho' head, "
                                 f"not {likelihood.name!r}")
            self.gene_offsets = nn.Parameter(torch.zeros(cov.n_batches, n_genes))
        # log-normal of the training cells' log library sizes, per batch
        self.register_buffer("library_loc", torch.zeros(cov.n_batches))
        self.register_buffer("library_scale", torch.ones(cov.n_batches))

    def decode(self, z, covariates=None, batch=None, label=None):
        """``(heads, gene_params)`` of the likelihood for latent ``z`` and covariates."""
        heads = self.decoder(with_covariates(z, covariates))
        if self.cov.gene_offsets and batch is not None:
            heads["log_rho"] = (heads["log_rho"] + self.gene_offsets[batch]).log_softmax(-1)
        if self.cov.dispersion == "gene-cell":
            params = {name: heads.pop(name) for name in self.likelihood.gene_params}
        elif self.cov.dispersion == "gene":
            params = dict(self.gene_params)
        else:
            rows = batch if self.cov.dispersion == "gene-batch" else label
            params = {name: p[rows] for name, p in self.gene_params.items()}
        return heads, params

    def observation(self, z, library, covariates=None, batch=None, label=None) -> dist.Distribution:
        """``p(x | z, l, s)``, with batch shape ``(..., cells, genes)``."""
        return self.likelihood(*self.decode(z, covariates, batch, label), library)

    def expression(self, z, library_size: float, covariates=None, batch=None, label=None):
        """Denoised expression at ``z`` (see :meth:`Likelihood.expression`)."""
        return self.likelihood.expression(*self.decode(z, covariates, batch, label), library_size)

    def library_prior(self, batch: torch.Tensor) -> dist.Distribution:
        return dist.LogNormal(self.library_loc[batch], self.library_scale[batch])

    def forward(self, x, library, covariates, batch, label, index, n_obs: int,
                kl_weight: float = 1.0):
        with pyro.plate("cells", n_obs, subsample=index):
            with poutine.scale(scale=kl_weight):
                known = {"label": label} if getattr(self.prior, "takes_labels", False) else {}
                z = self.prior.model(self.n_latent, **known)
            if self.cov.library == "latent":
                library = pyro.sample("l", self.library_prior(batch)).unsqueeze(-1)
            px = self.observation(z, library, covariates, batch, label)
            return pyro.sample("x", px.to_event(1), obs=x)


class Guide(LocalPyroModule):
    """Encoders of ``log1p`` counts and covariates; the prior object samples the latent
    sites from the first (with the default prior ``q(z | x, s) = N(mu, diag(sigma^2))``),
    and a latent library has its own, ``q(l | x, s) = LogNormal(m(x, s), v(x, s))``."""

    def __init__(self, n_genes: int, likelihood: Likelihood, arch: Architecture, cov: Covariates):
        super().__init__()
        self.likelihood = likelihood
        self.cov = cov
        self.encoder = Encoder(n_genes + cov.n_covariates, arch.n_latent, arch)
        if cov.library == "latent":
            small = Architecture(n_latent=1, n_hidden=arch.n_hidden[:1], dropout=arch.dropout,
                                 batch_norm=arch.batch_norm)
            self.library_encoder = Encoder(n_genes + cov.n_covariates, 1, small)

    @property
    def prior(self) -> Prior:
        return self.__dict__["_prior"]  # owned (and registered) by the model

    def encoder_input(self, x, covariates, batch=None) -> torch.Tensor:
        """What the encoders read: ``log1p`` counts (with per-batch gene offsets,
        ``x_g exp(-o_bg)``) and the covariates."""
        offsets = self.__dict__.get("_gene_offsets")
        if offsets is not None and batch is not None:
            x = x * torch.exp(-offsets[batch])
        return with_covariates(self.likelihood.encoder_input(x), covariates)

    def forward(self, x, library, covariates, batch, label, index, n_obs: int,
                kl_weight: float = 1.0):
        inputs = self.encoder_input(x, covariates, batch)
        with pyro.plate("cells", n_obs, subsample=index):
            with poutine.scale(scale=kl_weight):
                known = {"label": label} if getattr(self.prior, "takes_labels", False) else {}
                z = self.prior.guide(self.encoder, inputs, **known)
            if self.cov.library == "latent":
                loc, scale = self.library_encoder(inputs)
                pyro.sample("l", dist.LogNormal(loc.squeeze(-1), scale.squeeze(-1)))
            return z


class VAEModule(nn.Module):
    """The model and the guide together: one ``state_dict``, one ``.to(device)``."""

    def __init__(self, n_genes: int, likelihood: Likelihood, prior: Prior, arch: Architecture,
                 cov: Covariates | None = None):
        super().__init__()
        cov = cov or Covariates()
        self.cov = cov
        self.guide = Guide(n_genes, likelihood, arch, cov)
        self.model = Model(n_genes, likelihood, prior, arch, cov)
        if cov.gene_offsets:  # owned by the model, read by the guide too
            self.guide.__dict__["_gene_offsets"] = self.model.gene_offsets
        self.set_prior(prior)
        self.register_buffer("library_fitted", torch.tensor(False))

    @property
    def prior(self) -> Prior:
        return self.model.prior

    def set_prior(self, prior: Prior) -> None:
        """Attach ``prior`` to model and guide, keeping the encoder and decoder."""
        prior.setup(self.model.n_latent, self.guide.encoder)
        device = next(self.guide.encoder.parameters()).device
        self.model.prior = prior.to(device)
        self.guide.__dict__["_prior"] = prior
