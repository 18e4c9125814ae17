"""The generative model and the amortised guide, as Pyro functions on tensors.

Both take the same arguments (Pyro's contract), for a minibatch of cells:

``x``
    ``(cells, genes)`` observations, or ``None`` in the model to generate.
``library``
    ``(cells, 1)`` observed total counts.
``index``
    ``(cells,)`` positions of these cells in the data set; with ``n_obs`` they scale the
    minibatch to the whole data set through ``pyro.plate(size=n_obs, subsample=index)``.
``kl_weight``
    Weight of the latent sites (KL warm-up); 1 gives the ELBO.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from .likelihoods import Likelihood
from .nn import Architecture, Decoder, Encoder
from .priors import Prior

__all__ = ["Guide", "Model", "VAEModule"]


class Model(PyroModule):
    """``z ~ prior``, ``x_g | z, l ~ Likelihood(decoder(z), theta_g, l)`` for each cell.

    With the default prior and ``likelihood="zinb"``::

        p(z) = N(0, I)
        p(x | z, l) = prod_g ZINB(x_g; mean = l * rho_g(z), theta_g, pi_g(z))

    The prior object samples the latent sites (``z``, and ``y`` for a mixture).
    """

    def __init__(self, n_genes: int, likelihood: Likelihood, prior: Prior, arch: Architecture):
        super().__init__()
        self.n_latent = arch.n_latent
        self.likelihood = likelihood
        self.prior = prior
        self.decoder = Decoder(arch.n_latent, n_genes, likelihood.heads, arch)
        self.gene_params = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(n_genes)) for name in likelihood.gene_params}
        )

    def observation(self, z: torch.Tensor, library: torch.Tensor | None) -> dist.Distribution:
        """``p(x | z, l)``, with batch shape ``(cells, genes)``."""
        return self.likelihood(self.decoder(z), self.gene_params, library)

    def forward(self, x, library, index, n_obs: int, kl_weight: float = 1.0):
        with pyro.plate("cells", n_obs, subsample=index):
            with poutine.scale(scale=kl_weight):
                z = self.prior.model(self.n_latent)
            return pyro.sample("x", self.observation(z, library).to_event(1), obs=x)


class Guide(PyroModule):
    """An encoder of ``log1p`` counts; the prior object samples the latent sites from it.

    With the default prior ``q(z | x) = N(mu(x), diag(sigma(x)^2))``.
    """

    def __init__(self, n_genes: int, likelihood: Likelihood, arch: Architecture):
        super().__init__()
        self.likelihood = likelihood
        self.encoder = Encoder(n_genes, arch.n_latent, arch)

    @property
    def prior(self) -> Prior:
        return self.__dict__["_prior"]  # owned (and registered) by the model

    def forward(self, x, library, index, n_obs: int, kl_weight: float = 1.0):
        with pyro.plate("cells", n_obs, subsample=index):
            with poutine.scale(scale=kl_weight):
                return self.prior.guide(self.encoder, self.likelihood.encoder_input(x))


class VAEModule(nn.Module):
    """The model and the guide together: one ``state_dict``, one ``.to(device)``."""

    def __init__(
        self, n_genes: int, likelihood: Likelihood, prior: Prior, arch: Architecture
    ):
        super().__init__()
        self.guide = Guide(n_genes, likelihood, arch)
        self.model = Model(n_genes, likelihood, prior, arch)
        self.set_prior(prior)
        # log-normal fit to the training cells' library sizes, for generating new cells
        self.register_buffer("log_library_loc", torch.zeros(()))
        self.register_buffer("log_library_scale", torch.ones(()))
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
