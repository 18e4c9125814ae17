"""Observation models: one registry of functions from decoder outputs to distributions.

Every entry maps the decoder's heads (one value per cell and gene), the per-gene
parameters and the cell's library size to a ``pyro.distributions`` object with batch
shape ``(cells, genes)``. The model calls the entry; it never branches on its name, so a
new likelihood is one more ``@register_likelihood`` function::

    @register_likelihood("poisson", heads={"log_rho": "log_softmax"})
    def poisson(log_rho, *, library):
        return dist.Poisson(library * log_rho.exp())

A head is one value per cell and gene unless its registration gives it another width,
e.g. ``heads={"log_rho": "log_softmax", "log_size": ("identity", 1)}`` for one value per
cell, ``(cells, 1)``, broadcast over the genes by the distribution. Per-gene parameters
start at zero unless their registration says otherwise:
``gene_params={"log_theta": 2.0}`` (a constant) or a callable of the parameter's shape.

Count likelihoods (``data="counts"``) put the mean at ``library * rho`` with
``rho = softmax(decoder)`` over genes, and ``library`` the cell's observed total count;
they receive ``log_rho = log_softmax(decoder)``, so that the mean is handled in log space
(``log_mu = log l + log_rho``) and a tiny ``rho`` never underflows to zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence, Union

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
    "ZeroInflatedNegativeBinomial2",
    "get_likelihood",
    "register_likelihood",
]

Activation = Literal["softmax", "log_softmax", "identity"]
DataKind = Literal["counts", "unit_interval", "real"]
#: a head's declaration: its activation (one value per gene), or ``(activation, width)``
HeadSpec = Union[Activation, tuple[Activation, int]]
#: a per-gene parameter's initial value: a constant, or ``init(shape) -> tensor``
GeneParamInit = Union[float, Callable[[torch.Size], torch.Tensor]]


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
        ``"softmax"`` or ``"log_softmax"`` (over the head's values), or ``"identity"``.
    gene_params
        Per-gene parameters learned as point estimates, unconstrained (e.g. ``log_theta``).
    data
        What the observations are: ``"counts"`` (non-negative integers),
        ``"unit_interval"`` (values in [0, 1]) or ``"real"`` (e.g. log-normalised).
    head_widths
        Heads with another width than one value per gene, e.g. ``{"log_size": 1}`` for
        a ``(cells, 1)`` head; the others have one per gene.
    gene_param_init
        Initial value of the per-gene parameters not at zero: a constant or a callable
        of the parameter's shape (``(n_genes,)``, or ``(n_batches, n_genes)`` per batch).

    Examples
    --------
    >>> from pyrovae.likelihoods import get_likelihood
    >>> zinb = get_likelihood("zinb")
    >>> zinb.heads, zinb.gene_params, zinb.is_count
    ({'log_rho': 'log_softmax', 'gate_logits': 'identity'}, ('log_theta',), True)
    """

    name: str
    distribution: Callable[..., Distribution]
    heads: Mapping[str, Activation]
    gene_params: tuple[str, ...] = ()
    data: DataKind = "counts"
    doc: str = field(default="", compare=False)
    head_widths: Mapping[str, int] = field(default_factory=dict)
    gene_param_init: Mapping[str, GeneParamInit] = field(default_factory=dict, compare=False)

    @property
    def is_count(self) -> bool:
        return self.data == "counts"

    def initial_value(self, name: str, shape: Sequence[int]) -> torch.Tensor:
        """The initial value of per-gene parameter ``name`` with ``shape``."""
        shape = torch.Size(shape)
        init = self.gene_param_init.get(name, 0.0)
        if callable(init):
            value = torch.as_tensor(init(shape), dtype=torch.float32)
            if value.shape != shape:
                raise ValueError(
                    f"the initial value of {self.name!r}'s {name!r} has shape "
                    f"{tuple(value.shape)}; its init must return shape {tuple(shape)}"
                )
            return value.clone()
        return torch.full(shape, float(init))

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
    heads: Mapping[str, HeadSpec],
    gene_params: Sequence[str] | Mapping[str, GeneParamInit] = (),
    data: DataKind = "counts",
    overwrite: bool = False,
) -> Callable[[Callable[..., Distribution]], Callable[..., Distribution]]:
    """Add a likelihood to :data:`LIKELIHOODS` (decorator).

    Parameters
    ----------
    name
        Registry key (what ``pyrovae.fit(adata, likelihood=name)`` and saved models use).
    heads
        The decoder outputs the function takes, each with its activation: one value per
        gene, or ``(activation, width)`` for another width, e.g. ``("identity", 1)`` for
        one value per cell.
    gene_params
        Names of the per-gene parameters the function takes (starting at zero), or a
        mapping from each name to its initial value: a constant or a callable of the
        parameter's shape, e.g. ``{"log_theta": 2.0}``.
    data
        What the observations are (see :class:`Likelihood`).
    overwrite
        Replace a different function registered under ``name``. Registering the same
        function again, or one of the same module and qualified name (a notebook cell
        run again), is always allowed.

    Raises
    ------
    ValueError
        ``name`` is taken by another likelihood and ``overwrite`` is False, or a count
        likelihood lacks a per-gene ``log_rho`` head with a log_softmax activation.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> from pyrovae.likelihoods import LIKELIHOODS, register_likelihood
    >>> @register_likelihood("poisson_x2", heads={"log_rho": "log_softmax"})
    ... def poisson_x2(log_rho, *, library):
    ...     return dist.Poisson(2 * library * log_rho.exp())
    >>> LIKELIHOODS["poisson_x2"].heads
    {'log_rho': 'log_softmax'}
    >>> del LIKELIHOODS["poisson_x2"]
    """
    activations: dict[str, str] = {}
    widths: dict[str, int] = {}
    for head, spec in heads.items():
        activation, width = (spec, None) if isinstance(spec, str) else tuple(spec)
        if activation not in ("softmax", "log_softmax", "identity"):
            raise ValueError(
                f"head {head!r}: the activation must be 'softmax', 'log_softmax' or "
                f"'identity', got {activation!r}"
            )
        if width is not None:
            if int(width) < 1:
                raise ValueError(f"head {head!r}: the width must be positive, got {width}")
            widths[head] = int(width)
        activations[head] = activation
    if isinstance(gene_params, Mapping):
        init, names = dict(gene_params), tuple(gene_params)
    else:
        init, names = {}, tuple(gene_params)

    def decorator(fn: Callable[..., Distribution]) -> Callable[..., Distribution]:
        old = LIKELIHOODS.get(name)
        if old is not None and not overwrite and not same_definition(old.distribution, fn):
            raise ValueError(
                f"a likelihood named {name!r} is already registered; pass overwrite=True to "
                "replace it, or choose another name"
            )
        if data == "counts" and (activations.get("log_rho") != "log_softmax" or "log_rho" in widths):
            raise ValueError(
                "a count likelihood needs a per-gene 'log_rho' head with a log_softmax activation"
            )
        LIKELIHOODS[name] = Likelihood(
            name, fn, activations, names, data, fn.__doc__ or "", widths, init
        )
        return fn

    return decorator


def same_definition(old, new) -> bool:
    """The same object, or one defined at the same place (a notebook cell run again)."""
    return old is new or (
        getattr(old, "__module__", None) == getattr(new, "__module__", None)
        and getattr(old, "__qualname__", None) == getattr(new, "__qualname__", None)
    )


def get_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """Look a likelihood up by name (an object passes through).

    Examples
    --------
    >>> from pyrovae.likelihoods import get_likelihood
    >>> get_likelihood("nb").name
    'nb'
    >>> get_likelihood("negbin")
    Traceback (most recent call last):
    ...
    ValueError: unknown likelihood 'negbin'...
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    try:
        return LIKELIHOODS[likelihood]
    except KeyError:
        raise ValueError(
            f"unknown likelihood {likelihood!r}; choose one of {sorted(LIKELIHOODS)}"
        ) from None


def _count_term(value: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The part of the negative binomial's log-probability that ``mu`` does not enter:
    ``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``."""
    return torch.lgamma(value + theta) - torch.lgamma(theta) - torch.lgamma(value + 1)


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

    Examples
    --------
    >>> import torch
    >>> from pyrovae.likelihoods import NegativeBinomial2
    >>> nb = NegativeBinomial2(torch.tensor(2.0).log(), torch.tensor(4.0).log())  # mu 2, theta 4
    >>> float(nb.mean), float(nb.variance)                 # mu + mu^2 / theta
    (2.0, 3.0)
    >>> round(float(nb.log_prob(torch.tensor(0.0)).exp()), 4)  # (theta / (theta + mu))^theta
    0.1975
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
        return _count_term(value, theta) - theta * softplus_d + value * (d - softplus_d)

    @property
    def mean(self) -> torch.Tensor:
        return self.log_mu.exp().expand(self.batch_shape)

    @property
    def variance(self) -> torch.Tensor:
        mu = self.mean
        return mu + mu.pow(2) * (-self.log_theta).exp()


class ZeroInflatedNegativeBinomial2(dist.TorchDistribution):
    """Zero-inflated :class:`NegativeBinomial2`, with a fused ``log_prob``.

    ``x ~ pi * delta_0 + (1 - pi) * NB(mu, theta)``, ``pi = sigmoid(gate_logits)``; the same
    distribution as ``ZeroInflatedDistribution(NegativeBinomial2(log_mu, log_theta),
    gate_logits=gate_logits)``, whose ``log_prob`` broadcasts the observed counts to the
    shape of the parameters before any ``lgamma``. Here the terms that depend on the
    counts and ``theta`` only::

        c(x) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)

    are computed at the shape of ``x`` and ``theta`` (once per cell and gene), and only the
    cheap terms at the shape of ``log_mu`` and ``gate_logits``::

        log p(x) = c(x) - theta * softplus(d) + x * (d - softplus(d)) - softplus(g),  x > 0
        log p(0) = logaddexp(log pi, log(1 - pi) - theta * softplus(d)),              d = log_mu - log_theta

    Under parallel enumeration of a mixture's cluster ``y``, ``log_mu`` and ``gate_logits``
    carry a leading cluster dimension ``(K, 1, cells, genes)`` and ``x`` does not: the three
    ``lgamma`` calls, the costliest element-wise operations of the step, run once per cell
    instead of once per cell and cluster. A per-cell ``theta`` (``dispersion="gene-cell"``)
    has the cluster dimension too, and the fused form then costs what the composed one does.

    Examples
    --------
    >>> import torch
    >>> import pyro.distributions as dist
    >>> from pyrovae.likelihoods import NegativeBinomial2, ZeroInflatedNegativeBinomial2
    >>> log_mu, log_theta, gate = torch.tensor([0.0]), torch.tensor([2.0]).log(), torch.tensor([0.0])
    >>> x = torch.tensor([0.0, 3.0])
    >>> ZeroInflatedNegativeBinomial2(log_mu, log_theta, gate).log_prob(x)
    tensor([-0.3254, -3.4136])
    >>> dist.ZeroInflatedDistribution(NegativeBinomial2(log_mu, log_theta), gate_logits=gate).log_prob(x)
    tensor([-0.3254, -3.4136])
    """

    arg_constraints = {
        "log_mu": constraints.real, "log_theta": constraints.real, "gate_logits": constraints.real,
    }
    support = constraints.nonnegative_integer

    def __init__(self, log_mu: torch.Tensor, log_theta: torch.Tensor, gate_logits: torch.Tensor,
                 validate_args=None):
        self.log_mu, self.log_theta, self.gate_logits = log_mu, log_theta, gate_logits
        batch_shape = torch.Size(broadcast_shape(log_mu.shape, log_theta.shape, gate_logits.shape))
        super().__init__(batch_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ZeroInflatedNegativeBinomial2, _instance)
        batch_shape = torch.Size(batch_shape)
        new.log_mu = self.log_mu.expand(batch_shape)
        new.gate_logits = self.gate_logits.expand(batch_shape)
        new.log_theta = self.log_theta  # stays per gene: c(x) keeps the shape of x
        dist.TorchDistribution.__init__(new, batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @lazy_property
    def composed(self) -> dist.ZeroInflatedDistribution:
        """The same distribution composed from Pyro's parts (sampling goes through it)."""
        base = NegativeBinomial2(self.log_mu, self.log_theta).expand(self.batch_shape)
        return dist.ZeroInflatedDistribution(base, gate_logits=self.gate_logits.expand(self.batch_shape))

    def count_term(self, value: torch.Tensor) -> torch.Tensor:
        """``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``, at the shape of ``x`` and
        ``theta`` only."""
        return _count_term(value, self.log_theta.exp())

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        theta = self.log_theta.exp()
        d = self.log_mu - self.log_theta
        softplus_d = F.softplus(d)
        log_nb_zero = -theta * softplus_d  # log NB(0)
        log_one_minus_gate = -F.softplus(self.gate_logits)
        log_gate = -F.softplus(-self.gate_logits)
        positive = self.count_term(value) + log_nb_zero + value * (d - softplus_d) + log_one_minus_gate
        zero = torch.logaddexp(log_gate, log_one_minus_gate + log_nb_zero)
        return torch.where(value == 0, zero, positive)

    def sample(self, sample_shape=torch.Size()):
        return self.composed.sample(sample_shape)

    @property
    def mean(self) -> torch.Tensor:
        return self.composed.mean

    @property
    def variance(self) -> torch.Tensor:
        return self.composed.variance


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
    """``x ~ pi * delta_0 + (1 - pi) * NB(l * rho, theta)``, ``pi = sigmoid(gate_logits)``
    (:class:`ZeroInflatedNegativeBinomial2`: the count terms computed once per cell, not
    once per cell and cluster under enumeration)."""
    return ZeroInflatedNegativeBinomial2(library.log() + log_rho, log_theta, gate_logits)


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
