"""Per-cell quantities computed from Pyro traces of a model and guide, on tensors.

Every function takes the model and guide arguments of one minibatch, ``(x, library, index,
n_obs)`` with ``n_obs == len(x)`` so that nothing is rescaled, and works for every prior: a
discrete site the guide marks for parallel enumeration (a mixture's ``y``) is summed out
exactly.
"""

from __future__ import annotations

from typing import Callable

import torch
from pyro import poutine
from torch.distributions import kl_divergence

__all__ = ["elbo_per_cell", "posterior_predictive"]


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
