"""A ZINB likelihood for pyrovae whose ``log_prob`` is one hand-written expression.

Not part of pyrovae: the benchmarks use it to measure what replacing the composed
``ZeroInflatedDistribution(GammaPoisson(...))`` would gain. It plugs into pyrovae through
its public API, as a :class:`pyrovae.likelihoods.Likelihood` object::

    pyrovae.VAE(var_names, likelihood=FUSED_ZINB)
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from benchmarks.reference_vae import zinb_log_prob
from pyrovae.likelihoods import Likelihood

__all__ = ["FUSED_ZINB", "FusedZINB"]


class FusedZINB(dist.TorchDistribution):
    """ZINB with mean ``exp(log_mu)``, inverse dispersion ``exp(log_theta)`` and zero
    inflation ``sigmoid(gate_logits)``; its ``log_prob`` is
    :func:`benchmarks.reference_vae.zinb_log_prob` (``lgamma(theta)`` once per gene). Still
    a ``pyro.distributions`` object: it samples, validates and composes like any other."""

    arg_constraints = {"log_mu": constraints.real, "log_theta": constraints.real,
                       "gate_logits": constraints.real}
    support = constraints.nonnegative_integer

    def __init__(self, log_mu, log_theta, gate_logits, validate_args=None):
        self.log_mu, self.log_theta, self.gate_logits = log_mu, log_theta, gate_logits
        batch_shape = torch.broadcast_shapes(log_mu.shape, log_theta.shape, gate_logits.shape)
        super().__init__(batch_shape, validate_args=validate_args)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return zinb_log_prob(value, self.log_mu, self.log_theta, self.gate_logits)

    def sample(self, sample_shape=torch.Size()):
        theta = self.log_theta.exp().expand(self.batch_shape)
        base = dist.GammaPoisson(theta, theta / self.log_mu.exp())
        return dist.ZeroInflatedDistribution(base, gate_logits=self.gate_logits).sample(sample_shape)

    @property
    def mean(self):
        return torch.sigmoid(-self.gate_logits) * self.log_mu.exp()


def fused_zinb(rho, gate_logits, log_theta, *, library):
    """``x ~ ZINB(l * rho, theta, sigmoid(gate_logits))``, one fused ``log_prob``."""
    return FusedZINB(torch.log(library) + torch.log(rho), log_theta, gate_logits)


FUSED_ZINB = Likelihood(
    "zinb_fused", fused_zinb, {"rho": "softmax", "gate_logits": "identity"}, ("log_theta",),
    "counts", fused_zinb.__doc__,
)
