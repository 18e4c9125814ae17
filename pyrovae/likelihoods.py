"""Observation models: one registry of functions from decoder outputs to distributions.

Every entry maps the decoder's heads (one value per cell and gene), the per-gene
parameters and the cell's library size to a ``pyro.distributions`` object with batch
shape ``(cells, genes)``. The model calls the entry; it never branches on its name, so a
new likelihood is one more ``@register_likelihood`` function::

    @register_likelihood("poisson", heads={"log_rho": "log_softmax"})
    def poisson(log_rho, *, library):
        return dist.Poisson(library * log_rho.exp())

Count likelihoods (``data="counts"``) put the mean at ``library * rho`` with
``rho = softmax(decoder)`` over genes, and ``library`` the cell's observed total count;
they receive ``log_rho = log_softmax(decoder)``, so that the mean is handled in log space
(``log_mu = log l + log_rho``) and a tiny ``rho`` never underflows to zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.util import broadcast_shape
from torch.distributions import Distribution
from torch.distributions.utils import lazy_property
from torch.nn import functional as F

__all__ = [
    "LIKELIHOODS",
    "Likelihood",
    "NegativeBinomial2",
    "get_likelihood",
    "register_likelihood",
]

Activation = Literal["softmax", "log_softmax", "identity"]
DataKind = Literal["counts", "unit_interval", "real"]


@dataclass(frozen=True)
class Likelihood:
    """A registered observation model.

    Attributes
    ----------
    name
        Registry key, e.g. ``"zinb"``.
    distribution
        ``distribution(**heads, **gene_params, library=...) -> Distribution`` with batch
        shape ``(cells, genes)``.
    heads
        Decoder outputs the distribution needs, with the activation the decoder applies:
        ``"softmax"`` or ``"log_softmax"`` (over genes), or ``"identity"``.
    gene_params
        Per-gene parameters learned as point estimates, unconstrained (e.g. ``log_theta``),
        each initialised at zero.
    data
        What the observations are: ``"counts"`` (non-negative integers),
        ``"unit_interval"`` (values in [0, 1]) or ``"real"`` (e.g. log-normalised).
    """

    name: str
    distribution: Callable[..., Distribution]
    heads: Mapping[str, Activation]
    gene_params: tuple[str, ...] = ()
    data: DataKind = "counts"
    doc: str = field(default="", compare=False)

    @property
    def is_count(self) -> bool:
        return self.data == "counts"

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder sees ``log1p`` counts, or continuous data as they are."""
        return torch.log1p(x) if self.is_count else x

    def __call__(
        self, heads: Mapping[str, torch.Tensor], gene_params: Mapping[str, torch.Tensor], library
    ) -> Distribution:
        params = {name: gene_params[name] for name in self.gene_params}
        return self.distribution(**heads, **params, library=library)

    def expression(
        self,
        heads: Mapping[str, torch.Tensor],
        gene_params: Mapping[str, torch.Tensor],
        library_size: float,
    ) -> torch.Tensor:
        """Denoised expression: ``library_size * rho`` for counts (zero inflation left out,
        as in scVI), the distribution's mean for continuous data."""
        if self.is_count:
            return library_size * heads["log_rho"].exp()
        return self(heads, gene_params, library=None).mean


LIKELIHOODS: dict[str, Likelihood] = {}


def register_likelihood(
    name: str,
    *,
    heads: Mapping[str, Activation],
    gene_params: tuple[str, ...] = (),
    data: DataKind = "counts",
) -> Callable[[Callable[..., Distribution]], Callable[..., Distribution]]:
    """Add a likelihood to :data:`LIKELIHOODS` (decorator)."""

    def decorator(fn: Callable[..., Distribution]) -> Callable[..., Distribution]:
        if name in LIKELIHOODS:
            raise ValueError(f"a likelihood named {name!r} is already registered")
        if data == "counts" and heads.get("log_rho") != "log_softmax":
            raise ValueError("a count likelihood needs a 'log_rho' head with a log_softmax activation")
        LIKELIHOODS[name] = Likelihood(
            name, fn, dict(heads), tuple(gene_params), data, fn.__doc__ or ""
        )
        return fn

    return decorator


def get_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """Look a likelihood up by name (an object passes through)."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    try:
        return LIKELIHOODS[likelihood]
    except KeyError:
        raise ValueError(
            f"unknown likelihood {likelihood!r}; choose one of {sorted(LIKELIHOODS)}"
        ) from None


class NegativeBinomial2(dist.GammaPoisson):
    """Negative binomial with mean ``mu = exp(log_mu)`` and inverse dispersion
    ``theta = exp(log_theta)``: ``GammaPoisson(theta, theta / mu)``, ``Var = mu + mu^2 / theta``.

    The Gamma-Poisson mixture it is, with a ``log_prob`` written out in log space (scVI's
    formula, without its ``eps``)::

        log NB(x) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
                    - theta * softplus(d) + x * (d - softplus(d)),    d = log_mu - log_theta

    It keeps float32 precision from tiny means to huge ``theta`` and, with ``log_theta``
    per gene, computes ``lgamma(theta)`` once per gene rather than once per cell and gene.
    Sampling goes through the Gamma-Poisson mixture.
    """

    arg_constraints = {"log_mu": constraints.real, "log_theta": constraints.real}
    support = constraints.nonnegative_integer

    def __init__(self, log_mu: torch.Tensor, log_theta: torch.Tensor, validate_args=None):
        self.log_mu, self.log_theta = log_mu, log_theta
        batch_shape = torch.Size(broadcast_shape(log_mu.shape, log_theta.shape))
        dist.TorchDistribution.__init__(self, batch_shape, validate_args=validate_args)

    @lazy_property
    def concentration(self) -> torch.Tensor:
        return self.log_theta.exp().expand(self.batch_shape)

    @lazy_property
    def rate(self) -> torch.Tensor:
        return (self.log_theta - self.log_mu).exp().expand(self.batch_shape)

    @lazy_property
    def _gamma(self) -> dist.Gamma:
        return dist.Gamma(self.concentration, self.rate)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(NegativeBinomial2, _instance)
        batch_shape = torch.Size(batch_shape)
        new.log_mu = self.log_mu.expand(batch_shape)
        # theta stays per gene (it broadcasts): lgamma(theta) keeps its gene-sized cost
        new.log_theta = self.log_theta
        dist.TorchDistribution.__init__(new, batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        theta = self.log_theta.exp()
        d = self.log_mu - self.log_theta
        softplus_d = F.softplus(d)
        return (
            torch.lgamma(value + theta) - torch.lgamma(theta) - torch.lgamma(value + 1)
            - theta * softplus_d + value * (d - softplus_d)
        )

    @property
    def mean(self) -> torch.Tensor:
        return self.log_mu.exp().expand(self.batch_shape)

    @property
    def variance(self) -> torch.Tensor:
        mu = self.mean
        return mu + mu.pow(2) * (-self.log_theta).exp()


@register_likelihood("poisson", heads={"log_rho": "log_softmax"})
def poisson(log_rho, *, library):
    """``x ~ Poisson(l * rho)``."""
    return dist.Poisson(library * log_rho.exp())


@register_likelihood("nb", heads={"log_rho": "log_softmax"}, gene_params=("log_theta",))
def nb(log_rho, log_theta, *, library):
    """``x ~ NB(mean = l * rho, inverse dispersion = theta)``, theta per gene:
    ``GammaPoisson(theta, theta / mu)`` (:class:`NegativeBinomial2`)."""
    return NegativeBinomial2(library.log() + log_rho, log_theta)


@register_likelihood("zip", heads={"log_rho": "log_softmax", "gate_logits": "identity"})
def zip(log_rho, gate_logits, *, library):  # noqa: A001 - the registry name
    """``x ~ pi * delta_0 + (1 - pi) * Poisson(l * rho)``, ``pi = sigmoid(gate_logits)``."""
    return dist.ZeroInflatedPoisson(library * log_rho.exp(), gate_logits=gate_logits)


@register_likelihood(
    "zinb", heads={"log_rho": "log_softmax", "gate_logits": "identity"}, gene_params=("log_theta",)
)
def zinb(log_rho, gate_logits, log_theta, *, library):
    """``x ~ pi * delta_0 + (1 - pi) * NB(l * rho, theta)``, ``pi = sigmoid(gate_logits)``."""
    base = NegativeBinomial2(library.log() + log_rho, log_theta)
    return dist.ZeroInflatedDistribution(base, gate_logits=gate_logits)


@register_likelihood(
    "continuous_bernoulli", heads={"logits": "identity"}, data="unit_interval"
)
def continuous_bernoulli(logits, *, library):
    """``x ~ CB(sigmoid(logits))`` for data scaled to [0, 1] (Loaiza-Ganem & Cunningham 2019)."""
    return dist.ContinuousBernoulli(logits=logits)


@register_likelihood(
    "gaussian", heads={"loc": "identity"}, gene_params=("log_scale",), data="real"
)
def gaussian(loc, log_scale, *, library):
    """``x ~ Normal(loc, sigma)``, sigma per gene, for log-normalised data."""
    return dist.Normal(loc, log_scale.exp())
