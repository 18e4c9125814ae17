"""Cell identification: the fused ZINB under enumeration, the number of clusters found from
the data, pruning, and where the results are written."""

import numpy as np
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

import pyro.distributions as dist
from pyrovae.likelihoods import NegativeBinomial2, ZeroInflatedNegativeBinomial2, get_likelihood
from pyrovae.module import VAEModule
from pyrovae.nn import Architecture
from pyrovae.priors import GaussianMixture


def composed_zinb(log_mu, log_theta, gate_logits):
    return dist.ZeroInflatedDistribution(NegativeBinomial2(log_mu, log_theta), gate_logits=gate_logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_zinb_equals_the_composed_distribution(dtype):
    g = torch.Generator().manual_seed(0)
    cells, genes, K = 7, 9, 4
    x = torch.poisson(torch.rand(cells, genes, generator=g, dtype=dtype) * 6, generator=g)
    x[0] = 0.0
    x[1, 0] = 500.0
    log_mu = torch.randn(K, 1, cells, genes, generator=g, dtype=dtype) * 2
    log_theta = torch.randn(genes, generator=g, dtype=dtype) * 2
    gate = torch.randn(K, 1, cells, genes, generator=g, dtype=dtype) * 2
    fused = ZeroInflatedNegativeBinomial2(log_mu, log_theta, gate).log_prob(x)
    reference = composed_zinb(log_mu, log_theta, gate).log_prob(x)
    assert fused.shape == (K, 1, cells, genes)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(fused, reference, rtol=tol, atol=tol)


def test_fused_zinb_gradients_equal_the_composed_ones():
    g = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.full((5, 6), 2.0), generator=g)
    params = [torch.randn(3, 1, 5, 6, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(3, 1, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)]
    fused = torch.autograd.grad(ZeroInflatedNegativeBinomial2(*params).log_prob(x).sum(), params)
    reference = torch.autograd.grad(composed_zinb(*params).log_prob(x).sum(), params)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b)


def test_fused_zinb_computes_the_count_terms_at_the_shape_of_the_counts(monkeypatch):
    """Under enumeration the lgamma calls see (cells, genes), not (K, 1, cells, genes)."""
    shapes = []
    lgamma = torch.lgamma
    monkeypatch.setattr(torch, "lgamma", lambda t: shapes.append(tuple(t.shape)) or lgamma(t))
    x = torch.ones(5, 6)
    ZeroInflatedNegativeBinomial2(torch.zeros(3, 1, 5, 6), torch.zeros(6), torch.zeros(3, 1, 5, 6)).log_prob(x)
    assert shapes and all(np.prod(s) <= 30 for s in shapes), shapes


def test_zinb_registry_entry_is_the_fused_distribution_and_samples():
    lik = get_likelihood("zinb")
    d = lik({"log_rho": torch.full((4, 3), -1.0), "gate_logits": torch.zeros(4, 3)},
            {"log_theta": torch.zeros(3)}, torch.full((4, 1), 10.0))
    assert isinstance(d, ZeroInflatedNegativeBinomial2)
    draws = d.sample((2000,))
    assert draws.shape == (2000, 4, 3)
    torch.testing.assert_close(draws.mean(0), d.mean, rtol=0.15, atol=0.1)


def test_enumerated_loss_with_the_fused_zinb_equals_the_explicit_sum_over_k():
    """A conditional posterior makes x depend on y: the fused log_prob broadcasts over K."""
    torch.manual_seed(0)
    K = 3
    prior = GaussianMixture(K, init="random", conditional_posterior=True)
    module = VAEModule(6, get_likelihood("zinb"), prior, Architecture(n_latent=2, n_hidden=(8,))).eval()
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0.0, 0.5)
    x = torch.poisson(torch.full((5, 6), 3.0))
    x[0, 0] = 0.0
    library = x.sum(-1, keepdim=True)
    args = (x, library, None, None, None, torch.arange(5), 5)
    loss_fn = TraceEnum_ELBO(max_plate_nesting=1)(module.model, module.guide)
    encoder = module.guide.encoder
    with torch.no_grad():
        torch.manual_seed(7)
        loss = loss_fn.elbo.loss(module.model, module.guide, *args)
        h = encoder.body(torch.log1p(x))
        log_q_y = prior.classifier(h).log_softmax(-1)
        log_p_y = prior.weight_logits.log_softmax(-1)
        eye = torch.eye(K).unsqueeze(1)
        loc, scale = prior._posterior(encoder, h, eye)
        torch.manual_seed(7)
        z = torch.distributions.Normal(loc, scale).rsample()
        total = 0.0
        for k in range(K):
            heads, params = module.model.decode(z[k])
            base = NegativeBinomial2(library.log() + heads["log_rho"], params["log_theta"])
            px = dist.ZeroInflatedDistribution(base, gate_logits=heads["gate_logits"])
            terms = (log_p_y[k] + dist.Normal(prior.locs[k], prior.scales[k]).log_prob(z[k]).sum(-1)
                     + px.log_prob(x).sum(-1)
                     - dist.Normal(loc[k], scale[k]).log_prob(z[k]).sum(-1) - log_q_y[:, k])
            total = total + (log_q_y[:, k].exp() * terms).sum()
    assert loss == pytest.approx(-total.item(), rel=1e-5)
