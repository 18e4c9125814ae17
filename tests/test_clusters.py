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


# ---------------------------------------------------------------- the number of clusters
def well_separated(k: int):
    import scanpy as sc

    import pyrovae

    adata = pyrovae.datasets.simulate(100 * k + 300, 200, k, likelihood="zinb", separation=3.0, seed=k)
    sc.pp.filter_genes(adata, min_cells=3)
    return adata


# 60 epochs pre-train for 30, half the KL warm-up; from 100 on, the fit pre-trains for the
# default 50, the latent every real fit starts from (benchmarks/merges.py --simulated reads
# the merge thresholds each admits for seed 0: at most 0.35 and 0.47; over seeds 0-9,
# (0.23, 0.29] and (0.19, 0.41], docs/mixtures.md)
@pytest.mark.parametrize("max_epochs", [60, 100])
@pytest.mark.parametrize("k", [3, 5, 8])
def test_automatic_k_finds_the_true_number_of_clusters(k, max_epochs):
    import pyrovae
    from sklearn.metrics import adjusted_rand_score

    adata = well_separated(k)
    pyrovae.fit(adata, "zinb", prior="gmm", seed=0, max_epochs=max_epochs, progress=False)
    found = adata.uns["pyrovae"]["clusters"]
    assert found["method"] == "merged_leiden"
    assert found["n_clusters"] == k
    assert adata.obsm["pyrovae_cluster_probs"].shape == (adata.n_obs, k)
    assert adjusted_rand_score(adata.obs["cluster"], adata.obs["pyrovae_cluster"]) >= 0.9


def test_n_clusters_still_fixes_k():
    import pyrovae

    adata = well_separated(3)
    model = pyrovae.fit(adata, "zinb", prior="gmm", n_clusters=6, seed=0, max_epochs=20, progress=False)
    assert model.prior.n_clusters == 6
    assert adata.uns["pyrovae"]["clusters"] == {"n_clusters": 6, "method": "given"}
    assert adata.obsm["pyrovae_cluster_probs"].shape == (adata.n_obs, 6)


def test_stable_leiden_prefers_the_finest_stable_partition():
    from pyrovae.priors import stable_leiden

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 8, size=(4, 5))
    points = np.concatenate([c + rng.normal(size=(120, 5)) for c in centres])
    labels, search = stable_leiden(points)
    assert labels.max() + 1 == 4
    chosen = search["resolutions"].index(search["resolution"])
    assert search["stability"][chosen] >= max(search["stability"]) - search["tolerance"]
    finer = [s for r, s in zip(search["resolutions"], search["stability"]) if r > search["resolution"]]
    assert all(s < max(search["stability"]) - search["tolerance"] for s in finer)
    with pytest.raises(ValueError, match="needs n_clusters"):
        GaussianMixture(None, init="random")


def test_merged_leiden_joins_what_modularity_cut_and_keeps_separate_clusters_apart():
    from sklearn.metrics import adjusted_rand_score

    from pyrovae.priors import merged_leiden

    rng = np.random.default_rng(1)
    centres = rng.normal(0, 10, size=(3, 6))
    points = np.concatenate([c + rng.normal(size=(400, 6)) for c in centres])
    truth = np.repeat(np.arange(3), 400)
    plain, search = merged_leiden(points, threshold=np.inf)  # Leiden at 1.0 alone
    assert plain.max() + 1 > 3 and search["merges"] == []
    labels, search = merged_leiden(points)
    assert labels.max() + 1 == 3 and search["n_clusters_leiden"] == plain.max() + 1
    assert len(search["merges"]) == search["n_clusters_leiden"] - 3
    assert min(search["merges"]) >= search["threshold"]
    assert adjusted_rand_score(truth, labels) == 1.0


def test_merged_leiden_with_threshold_zero_stops_at_the_graphs_components():
    # a threshold of 0 merges every pair that shares an edge; once none does, the loop used
    # to "merge" a cluster with itself for ever (three blobs too far apart for any kNN edge)
    from sklearn.metrics import adjusted_rand_score

    from pyrovae.priors import merged_leiden

    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(c, 1.0, size=(300, 5)) for c in (-100, 0, 100)])
    labels, search = merged_leiden(points, threshold=0.0)
    assert labels.max() + 1 == 3 and len(search["merges"]) == search["n_clusters_leiden"] - 3
    assert adjusted_rand_score(np.repeat(np.arange(3), 300), labels) == 1.0


def test_k_rules_are_recorded_and_checked():
    import pyrovae

    adata = well_separated(3)
    for rule in ("leiden", "stable_leiden"):
        fitted = adata.copy()
        pyrovae.fit(fitted, "zinb", prior=GaussianMixture(k_rule=rule), seed=0, max_epochs=10,
                    progress=False)
        found = fitted.uns["pyrovae"]["clusters"]
        assert found["method"] == rule and found["n_clusters"] >= 2
    with pytest.raises(ValueError, match="k_rule"):
        GaussianMixture(k_rule="bic")
    with pytest.raises(ValueError, match="resolution"):
        GaussianMixture(resolution=0.0)


def test_pruning_leaves_a_model_that_saves_loads_and_scores(tmp_path):
    import pyrovae
    from pyrovae.clusters import prune_clusters

    adata = well_separated(3)
    model = pyrovae.fit(adata, "zinb", prior="gmm", n_clusters=5, seed=0, max_epochs=15, progress=False)
    before = model.get_cluster_probs(adata)
    weights = model.prior.weight_logits.detach().softmax(-1).numpy()
    # make components 1 and 3 empty: no cell is assigned to them
    with torch.no_grad():
        model.prior.classifier.bias[[1, 3]] -= 1e3
    removed = prune_clusters(model, adata)
    assert removed == pytest.approx([weights[1], weights[3]], rel=1e-5)
    assert model.prior.n_clusters == 3
    assert model.prior.selection["pruned_weights"] == removed
    after = model.get_cluster_probs(adata)
    assert after.shape == (adata.n_obs, 3)
    np.testing.assert_allclose(after.argmax(1), before[:, [0, 2, 4]].argmax(1))
    model.annotate(adata)
    assert adata.uns["pyrovae"]["clusters"]["n_clusters"] == 3
    assert adata.uns["pyrovae"]["clusters"]["pruned_weights"] == removed
    assert list(adata.obs["pyrovae_cluster"].cat.categories) == ["0", "1", "2"]
    assert np.isfinite(model.elbo(adata)["elbo"]).all()
    model.train(adata, max_epochs=2)  # a fresh optimiser over the remaining parameters
    path = tmp_path / "pruned.pt"
    model.save(path)
    loaded = pyrovae.load(path)
    assert loaded.prior.n_clusters == 3
    np.testing.assert_allclose(loaded.get_cluster_probs(adata), model.get_cluster_probs(adata), rtol=1e-5)
    assert np.isfinite(loaded.elbo(adata)["elbo"]).all()


def test_plot_clusters_title_shows_k(tmp_path):
    import pyrovae

    adata = well_separated(3)
    pyrovae.fit(adata, "zinb", prior="gmm", seed=0, max_epochs=20, progress=False)
    fig = pyrovae.plotting.plot_clusters(adata, label_key="cluster")
    assert "K = 3" in fig.axes[0].get_title()


def test_a_fit_that_finds_k_does_not_depend_on_torchs_global_seed():
    # torch seeds itself differently in every process; the components a mixture builds once
    # it has found K (and the classifier that starts at them) drew from that RNG, so two runs
    # of the same fit with the same seed gave different models
    import pyrovae

    adata = well_separated(3)
    states = []
    for outside in (1, 2):
        torch.manual_seed(outside)
        model = pyrovae.fit(adata.copy(), "zinb", prior="gmm", seed=0, max_epochs=8, progress=False)
        states.append(model.module.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
