"""Per-cell quantities computed from Pyro traces of a model and guide, on tensors.

Every function takes the model and guide arguments of one minibatch, ``(x, library, index,
n_obs)`` with ``n_obs == len(x)`` so that nothing is rescaled, and works for every prior: a
discrete site the guide marks for parallel enumeration (a mixture's ``y``) is summed out
exactly.
"""

from __future__ import annotations

from typing import Callable

import math

import torch
from pyro import poutine
from pyro.infer import config_enumerate
from torch.distributions import kl_divergence

__all__ = ["elbo_per_cell", "log_importance_weight", "marginal_log_likelihood", "posterior_predictive"]


def _is_enumerated(site) -> bool:
    return site["infer"].get("_enumerate_dim") is not None


def elbo_per_cell(
    model: Callable, guide: Callable, args: tuple, n_samples: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reconstruction, elbo)`` of each cell, averaged over ``n_samples`` draws of ``q``.

    ``elbo = E_q[log p(x, latents) - log q(latents | x)]`` with the KL of each continuous
    latent in closed form where torch has it, and ``reconstruction = E_q[log p(x | latents)]``.
    An enumerated site ``y`` contributes ``sum_k q(y=k | x) [...]`` exactly.
    """
    recon_sum, elbo_sum = 0.0, 0.0
    for _ in range(n_samples):
        guide_trace = poutine.trace(poutine.enum(guide, first_available_dim=-2)).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
        log_q_enum, terms, recon = 0.0, 0.0, 0.0
        n_enum = 0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            p, value = site["fn"], site["value"]
            if site["is_observed"]:
                log_lik = p.log_prob(value)
                recon = recon + log_lik
                terms = terms + log_lik
                continue
            q_site = guide_trace.nodes[name]
            q = q_site["fn"]
            if _is_enumerated(q_site):
                n_enum += 1
                log_q = q.log_prob(value)
                log_q_enum = log_q_enum + log_q
                terms = terms + p.log_prob(value) - log_q
                continue
            try:
                terms = terms - kl_divergence(q, p)
            except NotImplementedError:
                terms = terms + p.log_prob(value) - q.log_prob(value)
        if n_enum > 1:
            raise NotImplementedError("at most one enumerated site is supported")
        if n_enum:
            weights = log_q_enum.exp()  # (K, cells)
            terms, recon = (weights * terms).sum(0), (weights * recon).sum(0)
        recon_sum = recon_sum + recon
        elbo_sum = elbo_sum + terms
    return recon_sum / n_samples, elbo_sum / n_samples


def posterior_predictive(model: Callable, guide: Callable, args: tuple) -> torch.Tensor:
    """One replicate ``x_rep ~ p(x | latents)`` with the latents drawn from ``q(. | x)``."""
    guide_trace = poutine.trace(guide).get_trace(*args)
    replayed = poutine.uncondition(poutine.replay(model, trace=guide_trace))
    return poutine.trace(replayed).get_trace(*args).nodes["x"]["value"]


def _log_joint(fn: Callable, values: dict[str, torch.Tensor], args: tuple) -> torch.Tensor:
    """``log sum_y fn(latents = values, y)`` per cell: every sample site of ``fn`` scored at
    the given values, a discrete site left free summed out exactly by enumeration."""
    conditioned = poutine.condition(config_enumerate(fn, default="parallel"), data=values)
    trace = poutine.trace(poutine.enum(conditioned, first_available_dim=-2)).get_trace(*args)
    total, enumerated = 0.0, False
    for site in trace.nodes.values():
        if site["type"] == "sample":
            total = total + site["fn"].log_prob(site["value"])
            enumerated |= _is_enumerated(site)
    return total.logsumexp(0) if enumerated else total


def log_importance_weight(model: Callable, guide: Callable, args: tuple) -> torch.Tensor:
    """``log p(x, z) - log q(z | x)`` per cell for one ``z ~ q(z | x)``, with a discrete
    ``y`` summed out of both: ``p(x, z) = sum_y p(x, z, y)``, ``q(z | x) = sum_y q(y, z | x)``."""
    guide_trace = poutine.trace(guide).get_trace(*args)
    values = {
        name: site["value"] for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site["fn"].has_enumerate_support
    }
    return _log_joint(model, values, args) - _log_joint(guide, values, args)


def marginal_log_likelihood(model: Callable, guide: Callable, args: tuple,
                            n_samples: int = 100) -> torch.Tensor:
    """The importance-weighted estimate of ``log p(x)`` per cell (Burda et al. 2015):
    ``log (1/S) sum_s p(x, z_s) / q(z_s | x)``, ``z_s ~ q(z | x)``, accumulated one draw at
    a time so that memory does not grow with ``S``."""
    running = None
    for _ in range(n_samples):
        log_w = log_importance_weight(model, guide, args)
        running = log_w if running is None else torch.logaddexp(running, log_w)
    return running - math.log(n_samples)
