"""The Pyro model and guide: every likelihood and prior through the site checks and a step."""

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyrovae.labels import SemiSupervised
from pyrovae.likelihoods import LIKELIHOODS, get_likelihood
from pyrovae.module import VAEModule
from pyrovae.nn import Architecture
from pyrovae.priors import GaussianMixture, StandardNormal, VampPrior, get_prior
from tests.checks import checked_traces

ARCH = Architecture(n_latent=3, n_hidden=(16,))

# every prior, and every way a mixture handles its cluster
PRIOR_CASES = {
    "normal": StandardNormal,
    "gmm-enumerate": lambda: GaussianMixture(4, mode="enumerate"),
    "gmm-conditional-posterior": lambda: GaussianMixture(4, conditional_posterior=True),
    "gmm-gumbel": lambda: GaussianMixture(4, mode="gumbel"),
    "gmm-marginal": lambda: GaussianMixture(4, mode="marginal"),
    "gmm-shared-posterior": lambda: GaussianMixture(4, conditional_posterior=False),
    "vamp": lambda: VampPrior(5),
    # without label codes (label=None) every cell is unlabelled; tests/test_labels.py checks
    # the labelled cells
    "labels": lambda: SemiSupervised(["a", "b", "c"]),
}


def batch(likelihood, n_cells=8, n_genes=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.full((n_cells, n_genes), 4.0), generator=g)
    kind = get_likelihood(likelihood).data
    if kind == "counts":
        x = counts
    elif kind == "real":
        x = torch.log1p(counts)
    else:
        x = counts / counts.max()
    return x, x.sum(-1, keepdim=True)


def args(x, library, n_obs=None, kl_weight=1.0):
    return x, library, None, None, None, torch.arange(len(x)), n_obs or len(x), kl_weight


def test_every_registered_prior_has_a_case():
    from pyrovae.priors import PRIORS

    assert {type(make()).name for make in PRIOR_CASES.values()} == set(PRIORS)


@pytest.mark.parametrize("prior", sorted(PRIOR_CASES))
@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
def test_model_and_guide_match_and_take_a_finite_step(likelihood, prior):
    torch.manual_seed(0)
    x, library = batch(likelihood)
    module = VAEModule(x.shape[1], get_likelihood(likelihood), PRIOR_CASES[prior](), ARCH)
    with pyro.validation_enabled(True):
        model_trace, _ = checked_traces(module.model, module.guide, *args(x, library))
        assert model_trace.nodes["x"]["is_observed"]
        assert model_trace.nodes["x"]["fn"].batch_shape == (len(x),)

        loss_fn = module.prior.elbo()(module.model, module.guide)
        optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
        before = {k: v.detach().clone() for k, v in loss_fn.named_parameters()}
        loss = loss_fn(*args(x, library))
        loss.backward()
        grads = [p.grad for p in loss_fn.parameters() if p.grad is not None]
        optimizer.step()
    assert torch.isfinite(loss)
    assert grads and all(torch.isfinite(g).all() for g in grads)
    changed = [k for k, v in loss_fn.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("guide.encoder") for k in changed)
    assert any(k.startswith("model.decoder") for k in changed)
    assert all(torch.isfinite(v).all() for v in loss_fn.parameters())


def test_gene_parameters_are_learned_per_gene():
    module = VAEModule(12, get_likelihood("zinb"), get_prior("normal"), ARCH)
    assert module.model.gene_params["log_theta"].shape == (12,)
    assert set(module.model.decoder.heads) == {"log_rho", "gate_logits"}


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_minibatch_is_scaled_by_the_plate(elbo):
    """The same cells as a minibatch of a data set 3 times larger weigh 3 times as much."""
    module = VAEModule(12, get_likelihood("nb"), get_prior("normal"), ARCH).eval()
    x, library = batch("nb")
    loss_fn = elbo()(module.model, module.guide)
    losses = []
    for n_obs in (len(x), 3 * len(x)):
        torch.manual_seed(1)
        losses.append(loss_fn(*args(x, library, n_obs=n_obs)).item())
    assert losses[1] == pytest.approx(3 * losses[0], rel=1e-6)


def test_kl_weight_scales_only_the_latent_sites():
    module = VAEModule(12, get_likelihood("nb"), get_prior("normal"), ARCH).eval()
    x, library = batch("nb")
    loss_fn = TraceMeanField_ELBO()(module.model, module.guide)
    losses = {}
    for w in (0.25, 0.5, 1.0):
        torch.manual_seed(2)
        losses[w] = loss_fn(*args(x, library, kl_weight=w)).item()
    torch.manual_seed(2)
    loc, scale = module.guide.encoder(torch.log1p(x))
    q = torch.distributions.Independent(torch.distributions.Normal(loc, scale), 1)
    z = q.rsample()
    recon = module.model.observation(z, library).to_event(1).log_prob(x).sum().item()
    p = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(3), 1.0), 1)
    kl = torch.distributions.kl_divergence(q, p).sum().item()
    for w, loss in losses.items():
        assert loss == pytest.approx(-recon + w * kl, rel=1e-5)


def test_model_generates_when_x_is_none():
    module = VAEModule(12, get_likelihood("zinb"), get_prior("normal"), ARCH).eval()
    library = torch.full((5, 1), 100.0)
    with torch.no_grad():
        x = module.model(None, library, None, None, None, torch.arange(5), 5)
    assert x.shape == (5, 12)
    assert torch.all(x >= 0) and torch.equal(x, x.round())


def test_unknown_prior():
    with pytest.raises(ValueError, match="unknown prior 'vamp.*'normal'"):
        get_prior("vampp")


def test_architecture_validation():
    assert Architecture(n_hidden=64).n_hidden == (64,)
    with pytest.raises(ValueError, match="dropout"):
        Architecture(dropout=1.0)
    with pytest.raises(ValueError, match="positive"):
        Architecture(n_latent=0)


def test_no_parameters_in_the_global_param_store():
    pyro.clear_param_store()
    module = VAEModule(12, get_likelihood("zinb"), get_prior("normal"), ARCH)
    x, library = batch("zinb")
    Trace_ELBO()(module.model, module.guide)(*args(x, library)).backward()
    assert len(pyro.get_param_store()) == 0
    assert np.isfinite(sum(p.sum().item() for p in module.parameters()))
