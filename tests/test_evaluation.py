"""Held-out scores: the importance-weighted marginal likelihood against the ELBO and against
an exact marginal likelihood."""

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

import pyrovae
from pyrovae.inference import log_importance_weight
from pyrovae.likelihoods import get_likelihood
from pyrovae.module import VAEModule
from pyrovae.nn import Architecture
from pyrovae.priors import GaussianMixture

from .conftest import continuous_version


def linear_gaussian_data(n_cells=400, n_genes=8, n_latent=2, seed=0):
    """x = W z + b + noise, z ~ N(0, I): the model class of a VAE with linear networks."""
    rng = np.random.default_rng(seed)
    W = rng.normal(0, 1.0, (n_latent, n_genes))
    b = rng.normal(0, 1.0, n_genes)
    x = rng.normal(size=(n_cells, n_latent)) @ W + b + rng.normal(0, 0.3, (n_cells, n_genes))
    import anndata as ad

    return ad.AnnData(x.astype(np.float32))


def exact_log_likelihood(model: pyrovae.VAE, X: np.ndarray) -> np.ndarray:
    """log N(x; b, W W^T + diag(sigma^2)) for the model's own linear decoder."""
    decoder = model.module.model.decoder
    assert len(decoder.body) == 0, "the decoder must be one linear map"
    W = decoder.heads["loc"].weight.detach().double()  # (genes, latent)
    b = decoder.heads["loc"].bias.detach().double()
    sigma = model.module.model.gene_params["log_scale"].detach().double().exp()
    cov = W @ W.T + torch.diag(sigma**2)
    return MultivariateNormal(b, covariance_matrix=cov).log_prob(torch.as_tensor(X, dtype=torch.float64)).numpy()


@pytest.fixture(scope="module")
def linear_model():
    adata = linear_gaussian_data()
    model = pyrovae.fit(adata, "gaussian", n_latent=2, n_hidden=(), batch_norm=False, dropout=0.0,
                        max_epochs=150, lr=1e-2, kl_warmup_epochs=1, progress=False)
    return model, adata


def test_importance_weighted_estimate_converges_to_the_exact_marginal_likelihood(linear_model):
    model, adata = linear_model
    cells = adata[:40]
    exact = exact_log_likelihood(model, cells.X)
    elbo = model.elbo(cells, n_samples=50)["elbo"].to_numpy()
    iw = {s: model.marginal_log_likelihood(cells, n_samples=s).to_numpy() for s in (1, 10, 1000)}
    gaps = {s: float(np.mean(exact - v)) for s, v in iw.items()}
    assert np.mean(exact - elbo) > 0.02  # the guide is diagonal: the ELBO is a strict bound
    assert gaps[1] > gaps[10] > gaps[1000] > -0.02
    assert gaps[1000] < 0.01
    np.testing.assert_allclose(iw[1000], exact, atol=0.06)


def test_one_importance_sample_is_an_unbiased_elbo_estimate(linear_model):
    model, adata = linear_model
    cells = adata[:40]
    elbo = model.elbo(cells, n_samples=200)["elbo"].mean()
    one = np.mean([model.marginal_log_likelihood(cells, n_samples=1, seed=s).mean() for s in range(100)])
    assert one == pytest.approx(elbo, abs=0.05)


@pytest.mark.parametrize("prior", ["normal", "gmm", "vamp"])
def test_marginal_likelihood_is_above_the_elbo_and_rises_with_samples(sim, prior):
    model = pyrovae.fit(sim.copy(), "nb", prior=prior, n_clusters=3, max_epochs=20, progress=False)
    cells = sim[:60]
    elbo = model.elbo(cells, n_samples=20)["elbo"].mean()
    ll = [model.marginal_log_likelihood(cells, n_samples=s).mean() for s in (1, 5, 50)]
    if prior == "gmm":
        # one sample with y summed out of p and q bounds log p(x) through the marginal
        # q(z | x) = sum_y q(y, z | x): at least the ELBO that keeps y as a latent
        assert ll[0] > elbo - 1.0
    else:
        assert ll[0] == pytest.approx(elbo, abs=3.0)  # one sample: the ELBO, up to noise
    assert ll[0] < ll[1] < ll[2]
    assert ll[2] > elbo


def test_the_mixture_weight_sums_the_cluster_exactly():
    """With the cluster summed out, the weight is log p(x, z) - log q(z | x) for the
    marginal densities, written out here by hand."""
    torch.manual_seed(0)
    prior = GaussianMixture(3, init="random", learn_weights=True)
    module = VAEModule(5, get_likelihood("poisson"), prior, Architecture(n_latent=2, n_hidden=(6,))).eval()
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0, 0.5)
    x = torch.poisson(torch.full((4, 5), 2.0))
    args = (x, x.sum(-1, keepdim=True), None, None, None, torch.arange(4), 4)
    with torch.no_grad():
        torch.manual_seed(5)
        got = log_importance_weight(module.model, module.guide, args)
        torch.manual_seed(5)
        from pyro import poutine

        z = poutine.trace(module.guide).get_trace(*args).nodes["z"]["value"]
        encoder = module.guide.encoder
        h = encoder.body(torch.log1p(x))
        log_q_y = prior.classifier(h).log_softmax(-1)
        eye = torch.eye(3).unsqueeze(1)
        loc, scale = prior._posterior(encoder, h, eye)  # (K, cells, D)
        log_q_z = torch.logsumexp(
            log_q_y.T + torch.distributions.Normal(loc, scale).log_prob(z).sum(-1), 0)
        log_p_z = prior.mixture().log_prob(z)
        log_p_x = module.model.observation(z, args[1]).log_prob(x).sum(-1)
    torch.testing.assert_close(got, log_p_x + log_p_z - log_q_z, rtol=1e-5, atol=1e-4)


def test_gaussian_model_on_log_normalised_data_scores(sim):
    lognorm = continuous_version(sim, "real")
    model = pyrovae.fit(lognorm, "gaussian", max_epochs=3, progress=False)
    assert np.isfinite(model.marginal_log_likelihood(lognorm[:10], n_samples=3)).all()


def test_compare_fits_the_grid_on_one_split(sim):
    table = pyrovae.compare(sim, likelihoods=["poisson", "nb"], priors=["normal", "gmm"],
                            n_latent=[2, 4], label_key="cluster", n_samples=5, max_epochs=4,
                            progress=False)
    assert len(table) == 8
    assert set(table["likelihood"]) == {"poisson", "nb"} and set(table["n_latent"]) == {2, 4}
    assert table["marginal_ll"].is_monotonic_decreasing
    assert (table["marginal_ll"] > table["elbo"] - 1).all()
    assert table.loc[table["prior"] == "gmm", "cluster_ari"].notna().all()
    assert table.loc[table["prior"] == "normal", "cluster_ari"].isna().all()
    assert table.attrs["n_test"] == 30 and table.attrs["n_train"] == 270
    assert "X_pyrovae" not in sim.obsm
    from pyrovae.compare import plot_comparison

    fig = plot_comparison(table)
    assert len(fig.axes) == 2


def test_nb_beats_poisson_on_overdispersed_counts():
    adata = pyrovae.datasets.simulate(600, 80, 3, likelihood="nb", seed=3)
    table = pyrovae.compare(adata, likelihoods=["poisson", "nb"], n_samples=20, max_epochs=60,
                            progress=False)
    assert list(table["likelihood"]) == ["nb", "poisson"]
    gap = table["marginal_ll"].iloc[0] - table["marginal_ll"].iloc[1]
    assert gap > 5.0


def test_compare_refuses_mixed_data_kinds(sim):
    with pytest.raises(ValueError, match="different kinds of data"):
        pyrovae.compare(sim, likelihoods=["nb", "gaussian"])
    with pytest.raises(KeyError, match=r"obs\['celltype'\] not found; columns: \['cluster', 'library'\]"):
        pyrovae.compare(sim, label_key="celltype")


def test_model_methods_for_criticism(sim):
    model = pyrovae.fit(sim.copy(), "nb", prior="gmm", n_clusters=4, max_epochs=6, progress=False)
    scores = model.latent_metrics(sim, label_key="cluster")
    for key in ("silhouette", "kmeans_ari", "leiden_ari", "cluster_ari", "n_active"):
        assert key in scores
    check = model.posterior_predictive_check(sim[:50], n_samples=5)
    assert list(check.summary.index) == ["mean", "variance", "cv", "zero_fraction",
                                         "library_size", "n_detected"]
    assert check.summary.loc["mean", "n"] == sim.n_vars
    assert check.summary.loc["library_size", "n"] == 50
