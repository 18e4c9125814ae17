"""The networks: plain ``torch.nn`` modules, used by the Pyro model and guide."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from pyro.nn import PyroModule
from torch import nn
from torch.nn import functional as F

__all__ = ["Architecture", "Decoder", "Encoder", "LocalPyroModule", "MLP"]


class LocalPyroModule(PyroModule):
    """A ``PyroModule`` whose parameters stay local torch parameters (the model, the guide
    and the priors derive from it).

    When called, a plain ``PyroModule`` opens Pyro's parameter context, in which every
    access to a parameter or sub-network sends a ``pyro.param`` / ``pyro.module`` message
    for parameter handlers to see. pyrovae's parameters are local and trained by a torch
    optimiser through ``ELBO()(model, guide)``; nothing handles those messages, and they
    cost about 0.4 ms per training step, a third of Pyro's own overhead at scVI's network
    size (``benchmarks/profile_step.py``). So this module is called as an ``nn.Module``.
    """

    __call__ = nn.Module.__call__


@dataclass(frozen=True)
class Architecture:
    """Sizes and regularisation of the encoder and decoder networks.

    The defaults are scVI's (one hidden layer of 128 units, a 10-dimensional latent
    space, dropout 0.1 in the encoder, batch norm), so the two can be compared.
    """

    n_latent: int = 10
    n_hidden: tuple[int, ...] = (128,)
    dropout: float = 0.1
    batch_norm: bool = True

    def __post_init__(self):
        hidden = (self.n_hidden,) if isinstance(self.n_hidden, int) else tuple(self.n_hidden)
        object.__setattr__(self, "n_hidden", hidden)
        if self.n_latent < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"layer sizes must be positive, got {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")


class MLP(nn.Sequential):
    """``[Linear -> BatchNorm -> ReLU -> Dropout] * len(hidden)``, scVI's ``FCLayers``.

    Inputs may carry extra leading dimensions (e.g. an enumerated cluster dimension
    ``(K, cells, features)``); batch norm then pools them with the cells.
    """

    def __init__(self, n_in: int, hidden: Sequence[int], *, dropout: float, batch_norm: bool):
        layers: list[nn.Module] = []
        for n_out in hidden:
            layers.append(nn.Linear(n_in, n_out))
            if batch_norm:
                layers.append(nn.BatchNorm1d(n_out, momentum=0.01, eps=1e-3))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            n_in = n_out
        super().__init__(*layers)
        self.n_out = n_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 2:
            return super().forward(x)
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.n_out)


class Encoder(nn.Module):
    """``x -> (loc, scale)`` of a diagonal Gaussian over ``n_out`` dimensions.

    The steps are exposed so that a prior can condition the posterior on more than ``x``:
    ``h = body(x)``, then ``loc(h)`` and ``to_scale(scale(h))``, where ``scale(h)`` is
    unconstrained.
    """

    def __init__(self, n_in: int, n_out: int, arch: Architecture):
        super().__init__()
        self.body = MLP(n_in, arch.n_hidden, dropout=arch.dropout, batch_norm=arch.batch_norm)
        self.loc = nn.Linear(self.body.n_out, n_out)
        self.scale = nn.Linear(self.body.n_out, n_out)

    @staticmethod
    def to_scale(raw: torch.Tensor) -> torch.Tensor:
        return F.softplus(raw) + 1e-4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.loc(h), self.to_scale(self.scale(h))


class Decoder(nn.Module):
    """``z -> {head: (cells, genes)}``: one shared body, one linear map per head.

    ``heads`` maps each head's name to its activation, ``"softmax"`` or ``"log_softmax"``
    (over genes), or ``"identity"``. No dropout in the decoder, as in scVI.
    """

    def __init__(self, n_in: int, n_genes: int, heads: Mapping[str, str], arch: Architecture):
        super().__init__()
        self.activations = dict(heads)
        self.body = MLP(n_in, arch.n_hidden[::-1], dropout=0.0, batch_norm=arch.batch_norm)
        self.heads = nn.ModuleDict({name: nn.Linear(self.body.n_out, n_genes) for name in heads})

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(z)
        out = {}
        for name, layer in self.heads.items():
            value = layer(h)
            activation = self.activations[name]
            if activation == "softmax":
                value = value.softmax(-1)
            elif activation == "log_softmax":
                value = value.log_softmax(-1)
            out[name] = value
        return out
