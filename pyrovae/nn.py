"""The networks: plain ``torch.nn`` modules, used by the Pyro model and guide."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule
from pyro.poutine.runtime import effectful
from torch import nn
from torch.nn import functional as F

__all__ = ["Architecture", "Decoder", "Encoder", "LocalPyroModule", "MLP", "PyroFunction"]


class LocalPyroModule(PyroModule):
    """A ``PyroModule`` whose parameters stay local torch parameters (the model, the guide
    and the priors derive from it).

    When called, a plain ``PyroModule`` opens Pyro's parameter context, in which every
    access to a parameter or sub-network sends a ``pyro.param`` / ``pyro.module`` message
    for parameter handlers to see. pyrovae's parameters are local and trained by a torch
    optimiser through ``ELBO()(model, guide)``; nothing handles those messages, and they
    cost about 0.4 ms per training step, a third of Pyro's own overhead at scVI's network
    size (``benchmarks/profile_step.py``). So this module is called as an ``nn.Module``.

    Pyro's parameter context is therefore never opened: the parameters stay local torch
    parameters whatever ``pyro.settings.get("module_local_params")`` says, and nothing
    reads or writes Pyro's global parameter store. pyrovae changes no Pyro setting.
    """

    __call__ = nn.Module.__call__


def _param_site(name: str, param: nn.Parameter) -> torch.Tensor:
    """Announce ``param`` as a Pyro ``param`` site, without touching the param store, and
    return the site's value (a differentiable view of ``param``, or what a handler made
    of it).

    Under ``poutine.trace`` the site shows in the trace; its value's ``unconstrained()``
    is ``param`` itself, which is how ``pyro.infer.SVI`` collects the tensors that a
    ``pyro.optim`` optimiser steps (as with the param store's own values).
    """
    value = param.view_as(param)
    value.unconstrained = lambda: param
    return effectful(type="param")(lambda *_, **__: value)(
        name, value, constraint=constraints.real, event_dim=None, name=name
    )


class PyroFunction(nn.Module):
    """A Pyro model or guide for Pyro's own tools, over :class:`LocalPyroModule` s.

    Calling it calls ``module`` with the same arguments and returns its result. During
    the call each trainable parameter of the ``parts`` is a Pyro ``param`` site, named by
    its place (e.g. ``"model.decoder.body.0.weight"``), and the networks compute with the
    sites' values, as a ``PyroModule`` does. So ``poutine.trace``,
    ``pyro.render_model(..., render_params=True)``, ``pyro.infer.Predictive``,
    ``poutine.substitute`` and ``pyro.infer.SVI`` with a ``pyro.optim`` optimiser see (and
    train) the parts' own parameters, ``ELBO()(model, guide)`` loss modules find them
    through ``parameters()``, and Pyro's global parameter store is never used.

    Parameters
    ----------
    module
        The model or guide to call.
    parts
        ``(prefix, module)`` pairs whose parameters are announced, ``module`` itself among
        them.
    """

    def __init__(self, module: nn.Module, parts: Iterable[tuple[str, nn.Module]]):
        super().__init__()
        self.module = module
        parts = list(parts)
        self.parts = nn.ModuleList([part for _, part in parts])
        self.__dict__["_prefixes"] = [prefix for prefix, _ in parts]

    def _sites(self) -> list[tuple[str, nn.Module, str, nn.Parameter]]:
        out, seen = [], set()
        for prefix, part in zip(self._prefixes, self.parts):
            for owner_name, owner in part.named_modules(prefix=prefix):
                for attr, param in owner._parameters.items():
                    if param is None or not param.requires_grad or id(param) in seen:
                        continue
                    seen.add(id(param))
                    out.append((f"{owner_name}.{attr}", owner, attr, param))
        return out

    def forward(self, *args, **kwargs):
        sites = self._sites()
        try:
            for name, owner, attr, param in sites:
                # how torch.func.functional_call swaps a parameter for a tensor
                owner._parameters[attr] = _param_site(name, param)
            return self.module(*args, **kwargs)
        finally:
            for _, owner, attr, param in sites:
                owner._parameters[attr] = param

    def __repr__(self) -> str:
        return f"PyroFunction({type(self.module).__name__})"


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
    (over the head's values), or ``"identity"``. A head is ``(cells, n_genes)`` unless
    ``widths`` gives it another width (e.g. 1 for one value per cell). No dropout in the
    decoder, as in scVI.
    """

    def __init__(self, n_in: int, n_genes: int, heads: Mapping[str, str], arch: Architecture,
                 widths: Mapping[str, int] | None = None):
        super().__init__()
        widths = dict(widths or {})
        self.activations = dict(heads)
        self.body = MLP(n_in, arch.n_hidden[::-1], dropout=0.0, batch_norm=arch.batch_norm)
        self.heads = nn.ModuleDict({
            name: nn.Linear(self.body.n_out, widths.get(name, n_genes)) for name in heads
        })

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
