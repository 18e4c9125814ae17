"""Priors on the latent ``z``: small objects the model calls, swappable on a fitted model."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

__all__ = ["PRIORS", "Prior", "StandardNormal", "get_prior"]


class Prior(PyroModule):
    """Base class of priors.

    A prior owns the sample sites of the latent variables in the model: inside the
    ``cells`` plate the model calls ``prior(n_latent)`` and gets ``z`` back. Subclasses
    holding learnable parameters register them as ``nn.Parameter`` attributes; they
    train with the rest of the model.
    """

    name: str = "prior"

    def forward(self, n_latent: int) -> torch.Tensor:
        raise NotImplementedError


class StandardNormal(Prior):
    """``p(z) = N(0, I)``."""

    name = "normal"

    def __init__(self):
        super().__init__()
        self.register_buffer("_zero", torch.zeros(()), persistent=False)

    def dist(self, n_latent: int) -> dist.Distribution:
        return dist.Normal(self._zero, 1.0).expand([n_latent]).to_event(1)

    def forward(self, n_latent: int) -> torch.Tensor:
        return pyro.sample("z", self.dist(n_latent))


PRIORS: dict[str, type[Prior]] = {"normal": StandardNormal}


def get_prior(prior: str | Prior) -> Prior:
    """A prior object from its name (an object passes through)."""
    if isinstance(prior, Prior):
        return prior
    try:
        return PRIORS[prior]()
    except KeyError:
        raise ValueError(f"unknown prior {prior!r}; choose one of {sorted(PRIORS)}") from None
