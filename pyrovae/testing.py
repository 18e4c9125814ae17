"""Checks for your own priors and likelihoods: the ones pyrovae's own pass in its tests.

pyrovae's test suite runs every registered (prior, likelihood) pair through the same two
checks; a prior or likelihood written in user code can run them too, before it is trained
on real data::

    from pyrovae.testing import check_components

    check_components(MyPrior(), "nb")            # raises if something is wrong

:func:`checked_traces` traces a guide, replays the model on it and checks that their
sample sites match (``pyro.util.check_model_guide_match``) and that every site's shape
fits the one ``cells`` plate; :func:`check_components` builds a small model with the
given prior and likelihood, runs :func:`checked_traces` on it and takes one optimiser
step of the prior's own ELBO, which must be finite and move both the encoder and the
decoder.
"""

from __future__ import annotations

import copy

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.util import check_model_guide_match, check_site_shape

from .likelihoods import Likelihood, get_likelihood
from .module import VAEModule
from .nn import Architecture
from .priors import Prior, get_prior

__all__ = ["check_components", "checked_traces"]


def checked_traces(model, guide, *args) -> tuple[Trace, Trace]:
    """Trace ``guide``, replay ``model`` on it and check that the two match.

    Parameters
    ----------
    model, guide
        Pyro callables taking the same arguments, e.g. ``vae.model`` and ``vae.guide`` of
        a fitted :class:`pyrovae.VAE`.
    *args
        Their arguments, e.g. ``vae.model_args(adata, indices=range(20))``.

    Returns
    -------
    tuple of pyro.poutine.Trace
        ``(model_trace, guide_trace)``, with their log-probabilities computed.

    Raises
    ------
    ValueError
        A sample site's shape does not fit one plate (``pyro.util.check_site_shape``), or
        a log-probability is not finite.

    Warns
    -----
    UserWarning
        The model and guide's latent sites differ (``pyro.util.check_model_guide_match``).

    Examples
    --------
    >>> import pyrovae
    >>> from pyrovae.testing import checked_traces
    >>> adata = pyrovae.datasets.simulate(n_cells=40, n_genes=20, seed=0)
    >>> vae = pyrovae.fit(adata, likelihood="nb", max_epochs=1, kl_warmup_epochs=1,
    ...                   progress=False)
    >>> model_trace, guide_trace = checked_traces(vae.model, vae.guide,
    ...                                           *vae.model_args(adata, indices=range(10)))
    >>> model_trace.nodes["x"]["is_observed"]
    True
    """
    guide_trace = poutine.trace(guide).get_trace(*args)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    check_model_guide_match(model_trace, guide_trace, max_plate_nesting=1)
    for name, trace in (("model", model_trace), ("guide", guide_trace)):
        trace.compute_log_prob()
        for site_name, site in trace.nodes.items():
            if site["type"] == "sample":
                check_site_shape(site, max_plate_nesting=1)
                if "log_prob_sum" in site and not torch.isfinite(site["log_prob_sum"]):
                    raise ValueError(f"the {name}'s site {site_name!r} has a log-probability "
                                     f"of {float(site['log_prob_sum'])}")
    return model_trace, guide_trace


def _batch(likelihood: Likelihood, n_cells: int, n_genes: int, seed: int):
    """Small data of the kind ``likelihood`` observes, and the cells' totals."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.full((n_cells, n_genes), 4.0), generator=g)
    if likelihood.data == "counts":
        x = counts
    elif likelihood.data == "real":
        x = torch.log1p(counts)
    else:
        x = counts / counts.max()
    return x, x.sum(-1, keepdim=True)


# pyrovae's priors whose size comes from the data (a K chosen by fit, the labels of a
# column) are checked, given by name, at a small size
_SMALL = {"gmm": {"n_clusters": 3}, "labels": {"labels": ["a", "b", "c"]}}


def check_components(prior: str | Prior = "normal", likelihood: str | Likelihood = "nb", *,
                     n_cells: int = 8, n_genes: int = 12, seed: int = 0) -> float:
    """Check that a prior and a likelihood make a valid Pyro model and guide that train.

    Builds a small model (3 latent dimensions, one hidden layer of 16 units) with a copy
    of ``prior`` and with ``likelihood`` on ``n_cells`` cells of Poisson counts (or their
    ``log1p``, or counts scaled to [0, 1], as the likelihood's ``data`` says), then

    1. traces the guide and replays the model on it with :func:`checked_traces`, with
       Pyro's validation on: the sites match, their shapes fit the ``cells`` plate, their
       log-probabilities are finite, and ``x`` is observed with one batch entry per cell;
    2. takes one Adam step of ``prior.elbo()``, the prior's own estimator: the loss and
       every gradient are finite, and both encoder and decoder parameters change.

    Parameters
    ----------
    prior
        A :class:`~pyrovae.priors.Prior` (copied, so the object stays unused) or a name in
        :data:`pyrovae.priors.PRIORS` (``"gmm"`` with 3 components, ``"labels"`` with 3
        labels: sizes that :func:`pyrovae.fit` would take from the data).
    likelihood
        A name in :data:`pyrovae.likelihoods.LIKELIHOODS` or a
        :class:`~pyrovae.likelihoods.Likelihood`.
    n_cells, n_genes, seed
        Size and seed of the simulated batch.

    Returns
    -------
    float
        The loss (negative ELBO) of the step, in nats.

    Raises
    ------
    AssertionError
        A check failed; the message names it.

    Examples
    --------
    >>> from pyrovae.testing import check_components
    >>> loss = check_components("gmm", "zinb")
    >>> loss > 0
    True
    """
    prior = copy.deepcopy(prior) if isinstance(prior, Prior) else get_prior(prior, **_SMALL.get(prior, {}))
    likelihood = get_likelihood(likelihood) if isinstance(likelihood, str) else likelihood
    x, library = _batch(likelihood, n_cells, n_genes, seed)
    args = (x, library, None, None, None, torch.arange(n_cells), n_cells, 1.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = VAEModule(n_genes, likelihood, prior, Architecture(n_latent=3, n_hidden=(16,)))
        with pyro.validation_enabled(True):
            model_trace, _ = checked_traces(module.model, module.guide, *args)
            site = model_trace.nodes.get("x")
            assert site is not None and site["is_observed"], "the model has no observed site 'x'"
            assert site["fn"].batch_shape == (n_cells,), (
                f"'x' should have batch shape ({n_cells},) (one entry per cell, genes in the "
                f"event), got {tuple(site['fn'].batch_shape)}")
            loss_fn = module.prior.elbo()(module.model, module.guide)
            optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
            before = {k: v.detach().clone() for k, v in loss_fn.named_parameters()}
            loss = loss_fn(*args)
            loss.backward()
            optimizer.step()
    assert torch.isfinite(loss), f"the loss is {float(loss.detach())}"
    bad = [k for k, v in loss_fn.named_parameters() if v.grad is not None
           and not torch.isfinite(v.grad).all()]
    assert not bad, f"gradients that are not finite: {bad}"
    changed = [k for k, v in loss_fn.named_parameters() if not torch.equal(v, before[k])]
    for part in ("guide.encoder", "model.decoder"):
        assert any(k.startswith(part) for k in changed), f"one step did not change {part}"
    return float(loss.detach())
