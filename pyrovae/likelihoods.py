"""Observation models: one registry of functions from decoder outputs to distributions.

Every entry maps the decoder's heads (one value per cell and gene), the per-gene
parameters and the cell's library size to a ``pyro.distributions`` object with batch
shape ``(cells, genes)``. The model calls the entry; it never branches on its name, so a
new likelihood is one more ``@register_likelihood`` function::

    @register_likelihood("poisson", heads={"rho": "softmax"})
    def poisson(rho, *, library):
        return dist.Poisson(library * rho)

Count likelihoods (``data="counts"``) put the mean at ``library * rho`` with
``rho = softmax(decoder)`` over genes, and ``library`` the cell's observed total count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import pyro.distributions as dist
import torch
from torch.distributions import Distribution

__all__ = [
    "LIKELIHOODS",
    "Likelihood",
    "get_likelihood",
    "negative_binomial",
    "register_likelihood",
]

Activation = Literal["softmax", "identity"]
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
        ``"softmax"`` (over genes) or ``"identity"``.
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
            return library_size * heads["rho"]
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
        if data == "counts" and heads.get("rho") != "softmax":
            raise ValueError("a count likelihood needs a 'rho' head with a softmax activation")
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


def negative_binomial(mu: torch.Tensor, theta: torch.Tensor) -> dist.GammaPoisson:
    """Negative binomial with mean ``mu`` and inverse dispersion ``theta``.

    ``Var = mu + mu**2 / theta``; the Gamma-Poisson mixture ``Poisson(Gamma(theta, theta / mu))``.
    """
    return dist.GammaPoisson(theta, theta / mu)


@register_likelihood("poisson", heads={"rho": "softmax"})
def poisson(rho, *, library):
    """``x ~ Poisson(l * rho)``."""
    return dist.Poisson(library * rho)


@register_likelihood("nb", heads={"rho": "softmax"}, gene_params=("log_theta",))
def nb(rho, log_theta, *, library):
    """``x ~ NB(mean = l * rho, inverse dispersion = theta)``, theta per gene."""
    return negative_binomial(library * rho, log_theta.exp())


@register_likelihood("zip", heads={"rho": "softmax", "gate_logits": "identity"})
def zip(rho, gate_logits, *, library):  # noqa: A001 - the registry name
    """``x ~ pi * delta_0 + (1 - pi) * Poisson(l * rho)``, ``pi = sigmoid(gate_logits)``."""
    return dist.ZeroInflatedPoisson(library * rho, gate_logits=gate_logits)


@register_likelihood(
    "zinb", heads={"rho": "softmax", "gate_logits": "identity"}, gene_params=("log_theta",)
)
def zinb(rho, gate_logits, log_theta, *, library):
    """``x ~ pi * delta_0 + (1 - pi) * NB(l * rho, theta)``, ``pi = sigmoid(gate_logits)``."""
    base = negative_binomial(library * rho, log_theta.exp())
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
