"""Priors: the enumerated mixture's ELBO, its alternatives, swapping priors on a live model."""

import copy
import warnings

import anndata as ad
import numpy as np
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from sklearn.metrics import adjusted_rand_score

import pyrovae
from pyrovae.inference import elbo_per_cell
from pyrovae.likelihoods import get_likelihood
from pyrovae.module import VAEModule
from pyrovae.nn import Architecture
from pyrovae.priors import (
    GaussianMixture,
    StandardNormal,
    VampPrior,
    _leiden,
    kmeans_labels,
    knn_connectivities,
    leiden_labels,
)

ARCH = Architecture(n_latent=2, n_hidden=(8,))
K = 3


def tiny_mixture(mode="enumerate", seed=0, **options):
    """A small ZINB GMVAE with fixed (random, non-trivial) weights and a batch of 5 cells."""
    torch.manual_seed(seed)
    prior = GaussianMixture(K, mode=mode, learn_weights=True, init="random", conditional_posterior=True,
                            **options)
    module = VAEModule(6, get_likelihood("zinb"), prior, ARCH).eval()
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0.0, 0.5)
    x = torch.poisson(torch.full((5, 6), 3.0))
    x[0, 0] = 0.0
    args = (x, x.sum(-1, keepdim=True), None, None, None, torch.arange(5), 5)
    return module, args


def by_hand(module, args, seed):
    """``sum_cells sum_k q(k|x) [log p(k) + log p(z_k|k) + log p(x|z_k) - log q(z_k|x,k) - log q(k|x)]``,
    written out with torch distributions, drawing ``z_k`` with the same random numbers."""
    x, library = args[0], args[1]
    prior, encoder = module.prior, module.guide.encoder
    h = encoder.body(torch.log1p(x))
    log_q_y = prior.classifier(h).log_softmax(-1)  # (cells, K)
    log_p_y = prior.weight_logits.log_softmax(-1)  # (K,)
    locs, scales = [], []
    for k in range(K):
        locs.append(encoder.loc(h) + prior.loc_offsets[k])
        scales.append(torch.nn.functional.softplus(encoder.scale(h) + prior.scale_offsets[k]) + 1e-4)
    loc, scale = torch.stack(locs), torch.stack(scales)  # (K, cells, D)
    torch.manual_seed(seed)
    z = torch.distributions.Normal(loc, scale).rsample()
    total = 0.0
    for k in range(K):
        log_q_z = torch.distributions.Normal(loc[k], scale[k]).log_prob(z[k]).sum(-1)
        log_p_z = torch.distributions.Normal(prior.locs[k], prior.scales[k]).log_prob(z[k]).sum(-1)
        heads = module.model.decoder(z[k])
        log_p_x = module.model.observation(z[k], library).log_prob(x).sum(-1)
        q_k = log_q_y[:, k].exp()
        total = total + (q_k * (log_p_y[k] + log_p_z + log_p_x - log_q_z - log_q_y[:, k])).sum()
        assert heads["log_rho"].shape == x.shape
    return total


def test_enumerated_loss_equals_the_explicit_sum_over_k():
    module, args = tiny_mixture()
    loss_fn = TraceEnum_ELBO(max_plate_nesting=1)(module.model, module.guide)
    with torch.no_grad():
        torch.manual_seed(7)
        loss = loss_fn.elbo.loss(module.model, module.guide, *args)
        elbo = by_hand(module, args, seed=7)
    assert loss == pytest.approx(-elbo.item(), rel=1e-5)


def _loss_and_classifier_grad(module, args, seed=7):
    loss_fn = TraceEnum_ELBO(max_plate_nesting=1)(module.model, module.guide)
    torch.manual_seed(seed)
    loss = loss_fn(*args)
    grad = torch.autograd.grad(loss, module.prior.classifier.weight)[0]
    return loss.detach(), grad


def _kl_y(module, args) -> torch.Tensor:
    """``KL(q(y | x) || p(y))`` per cell, written out."""
    prior, encoder = module.prior, module.guide.encoder
    log_q = prior.classifier(encoder.body(torch.log1p(args[0]))).log_softmax(-1)
    return (log_q.exp() * (log_q - prior.weight_logits.log_softmax(-1))).sum(-1)


@pytest.mark.parametrize("free", [0.3, 50.0])
def test_free_nats_on_y_replace_the_kl_by_its_maximum(free):
    """The training loss has ``max(mean KL of y, free_nats_y)`` per cell in place of the KL:
    the loss moves by ``n max(0, free - KL)`` and, below the free nats, the KL's gradient
    on q(y | x) is cancelled; in evaluation mode the loss is the plain ELBO."""
    off, args = tiny_mixture()
    on, _ = tiny_mixture(free_nats_y=free)
    on.prior.train()  # the factor acts in training only (networks stay in evaluation mode)
    loss_off, grad_off = _loss_and_classifier_grad(off, args)
    loss_on, grad_on = _loss_and_classifier_grad(on, args)
    kl = _kl_y(off, args)
    gap = max(0.0, free - kl.mean().item())
    assert loss_on.item() == pytest.approx(loss_off.item() + 5 * gap, rel=1e-5)
    if gap > 0:
        grad_kl = torch.autograd.grad(kl.sum(), off.prior.classifier.weight)[0]
        torch.testing.assert_close(grad_on, grad_off - grad_kl, rtol=1e-4, atol=1e-5)
    else:  # the KL is above the free nats: nothing changes
        torch.testing.assert_close(grad_on, grad_off)
    on.prior.eval()
    assert _loss_and_classifier_grad(on, args)[0].item() == pytest.approx(loss_off.item(), rel=1e-6)
    assert 5 * max(0.0, 50.0 - kl.mean().item()) > 0  # 50 nats is above the KL: the test bites


def test_free_nats_off_and_no_floor_leave_the_loss_unchanged():
    explicit, args = tiny_mixture(scale_floor=None, free_nats_y=0.0)
    default, _ = tiny_mixture()
    explicit.prior.train()
    assert _loss_and_classifier_grad(explicit, args)[0] == _loss_and_classifier_grad(default, args)[0]


def test_scale_floor_bounds_the_component_scales():
    module, args = tiny_mixture(scale_floor=0.5)
    default, _ = tiny_mixture()
    with torch.no_grad():
        module.prior.raw_scales.fill_(-20.0)
    assert module.prior.scales.min().item() == pytest.approx(0.5)
    torch.testing.assert_close(module.prior.scales - 0.5 + 0.05,
                               torch.nn.functional.softplus(module.prior.raw_scales) + 0.05)
    assert default.prior.floor == 0.05
    with torch.no_grad():
        default.prior.raw_scales.fill_(-20.0)
    assert _loss_and_classifier_grad(module, args)[0] != _loss_and_classifier_grad(default, args)[0]


def test_free_nats_and_scale_floor_are_checked():
    with pytest.raises(ValueError, match="no y"):
        GaussianMixture(3, mode="marginal", free_nats_y=1.0)
    with pytest.raises(ValueError, match="scale_floor"):
        GaussianMixture(3, scale_floor=0.0)
    with pytest.raises(ValueError, match="free_nats_y"):
        GaussianMixture(3, free_nats_y=-1.0)


def test_free_nats_and_scale_floor_save_and_load(sim, quick, tmp_path):
    prior = GaussianMixture(3, scale_floor=0.3, free_nats_y=0.5)
    model = pyrovae.fit(sim.copy(), "nb", prior=prior, **quick)
    assert model.prior.scales.min().item() >= 0.3
    model.save(tmp_path / "m.pt")
    loaded = pyrovae.load(tmp_path / "m.pt", sim)
    assert loaded.prior.config()["scale_floor"] == 0.3
    assert loaded.prior.config()["free_nats_y"] == 0.5
    torch.testing.assert_close(loaded.prior.scales, model.prior.scales)
    np.testing.assert_array_equal(loaded.get_cluster_probs(sim), model.get_cluster_probs(sim))


def test_per_cell_elbo_sums_to_the_enumerated_loss():
    module, args = tiny_mixture()
    with torch.no_grad():
        torch.manual_seed(3)
        _, per_cell = elbo_per_cell(module.model, module.guide, args)
        torch.manual_seed(3)
        loss = TraceEnum_ELBO(max_plate_nesting=1).loss(module.model, module.guide, *args)
    # elbo_per_cell uses the closed-form KL of z; the loss a one-sample estimate: compare
    # against a long average of the loss instead of one draw
    with torch.no_grad():
        losses = [TraceEnum_ELBO(max_plate_nesting=1).loss(module.model, module.guide, *args)
                  for _ in range(1000)]
    assert np.isfinite(loss)
    assert per_cell.sum().item() == pytest.approx(-np.mean(losses), abs=4 * np.std(losses) / np.sqrt(1000) + 0.05)


def test_monte_carlo_over_y_agrees_with_enumeration():
    """Sampling y from q(y|x) instead of summing over it estimates the same ELBO."""
    module, args = tiny_mixture()
    n = 1500
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Trace_ELBO notes y could be enumerated
        torch.manual_seed(11)
        enumerated = np.array([TraceEnum_ELBO(max_plate_nesting=1).loss(module.model, module.guide, *args) for _ in range(n)])
        sampled = np.array([Trace_ELBO().loss(module.model, module.guide, *args) for _ in range(n)])
    se = np.sqrt(enumerated.var() / n + sampled.var() / n)
    assert abs(enumerated.mean() - sampled.mean()) < 4 * se
    assert sampled.std() > enumerated.std(), "enumeration should have lower variance"


@pytest.mark.parametrize("mode", ["enumerate", "gumbel", "marginal"])
def test_mixture_outputs(small, quick, mode):
    model = pyrovae.fit(small, "nb", prior="gmm", n_clusters=4, mixture=mode, **quick)
    probs = small.obsm["pyrovae_cluster_probs"]
    assert probs.shape == (small.n_obs, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert list(small.obs["pyrovae_cluster"].cat.categories) == ["0", "1", "2", "3"]
    np.testing.assert_array_equal(small.obs["pyrovae_cluster"].astype(int), probs.argmax(1))
    assert small.uns["pyrovae"]["component_means"].shape == (4, 10)
    assert small.uns["pyrovae"]["settings"]["prior_mode"] == mode
    elbo = model.elbo(small[:30])
    assert np.isfinite(elbo.to_numpy()).all() and (elbo["kl"] > 0).all()
    assert np.isfinite(model.get_normalized_expression(small[:30], n_samples=2)).all()


def test_sample_from_one_cluster(sim, quick):
    model = pyrovae.fit(sim.copy(), "zinb", prior="gmm", n_clusters=4, **quick)
    cells = model.sample(200, cluster=2, seed=1)
    assert isinstance(cells, ad.AnnData) and cells.shape == (200, sim.n_vars)
    assert list(cells.var_names) == list(sim.var_names)
    assert (cells.obs["cluster"] == "2").all()
    z = cells.obsm["X_pyrovae"]
    centre = model.prior.locs.detach().numpy()
    distances = np.linalg.norm(z.mean(0) - centre, axis=1)
    assert distances.argmin() == 2
    assert np.array_equal(cells.X, np.round(cells.X)) and cells.X.min() >= 0
    library = np.log(cells.obs["library"])
    train_library = np.log(np.asarray(sim.X.sum(1)).ravel())
    assert abs(library.mean() - train_library.mean()) < 0.15
    with pytest.raises(ValueError, match="cluster must be in 0..3"):
        model.sample(5, cluster=4)
    normal = pyrovae.fit(sim.copy(), "nb", **quick)
    assert normal.sample(10, library_size=1000).shape == (10, sim.n_vars)
    with pytest.raises(ValueError, match="no clusters"):
        normal.sample(5, cluster=0)
    with pytest.raises(ValueError, match="no clusters"):
        normal.get_cluster_probs(sim)


def test_swapping_the_prior_keeps_the_networks_and_training_goes_on(sim, quick):
    model = pyrovae.fit(sim.copy(), "zinb", **{**quick, "max_epochs": 5})
    decoder = {k: v.clone() for k, v in model.module.model.decoder.state_dict().items()}
    encoder = {k: v.clone() for k, v in model.module.guide.encoder.state_dict().items()}
    latent = model.get_latent(sim)
    model.set_prior("gmm", sim, n_clusters=4, init="kmeans")
    for name, value in model.module.model.decoder.state_dict().items():
        assert torch.equal(value, decoder[name]), name
    for name, value in model.module.guide.encoder.state_dict().items():
        assert torch.equal(value, encoder[name]), name
    # the offsets start at zero: each component's posterior mean is the old one
    np.testing.assert_allclose(model.get_latent(sim), latent, atol=1e-5)
    # KMeans on the latent means initialised the components
    from sklearn.cluster import KMeans

    centres = KMeans(4, n_init=10, random_state=0).fit(latent[np.sort(np.random.default_rng(0).choice(len(latent), len(latent), replace=False))]).cluster_centers_
    got = np.sort(model.prior.locs.detach().numpy(), axis=0)
    np.testing.assert_allclose(got, np.sort(centres, axis=0), atol=1e-4)
    model.train(sim, max_epochs=3, progress=False)
    assert np.isfinite(model.history["train_elbo"]).all() and len(model.history) == 8
    assert model.get_cluster_probs(sim).shape == (sim.n_obs, 4)


@pytest.mark.parametrize("mode", ["enumerate", "gumbel"])
def test_a_swapped_mixture_starts_q_y_at_its_components(sim, quick, mode):
    """The classifier ``q(y | x)`` of a new mixture starts at the components' responsibilities
    for the cells' latent means, not at a uniform guess."""
    model = pyrovae.fit(sim.copy(), "zinb", **{**quick, "max_epochs": 5})
    latent = torch.as_tensor(model.get_latent(sim))
    model.set_prior("gmm", sim, n_clusters=4, mode=mode)
    prior = model.prior
    with torch.no_grad():
        bayes = prior.responsibilities(latent).argmax(-1).numpy()
    assert len(np.unique(bayes)) == 4
    assert (model.get_cluster_probs(sim).argmax(1) == bayes).mean() > 0.95


@pytest.mark.parametrize("init", ["leiden", "kmeans"])
def test_more_clusters_than_cells_is_a_clear_error(init):
    adata = pyrovae.datasets.simulate(30, 20, seed=0)
    prior = GaussianMixture(40, init=init)
    with pytest.raises(ValueError, match="40 clusters .* only 30 cells"):
        pyrovae.fit(adata, prior=prior, max_epochs=4, progress=False, validation_fraction=0)
    assert "X_pyrovae" not in adata.obsm  # nothing written


def unequal_clusters():
    """A long, thin cluster of 500 points and two tight ones of 30 each beside it."""
    rng = np.random.default_rng(0)
    points = np.vstack([
        rng.normal(size=(500, 2)) * [6.0, 0.4],
        rng.normal(size=(30, 2)) * 0.3 + [0.0, 5.0],
        rng.normal(size=(30, 2)) * 0.3 + [0.0, -5.0],
    ])
    return points, np.repeat([0, 1, 2], [500, 30, 30])


@pytest.mark.parametrize("k", [2, 3, 4, 7, 20])
def test_leiden_labels_gives_exactly_k_clusters(k):
    points, _ = unequal_clusters()
    labels = leiden_labels(points, k)
    assert sorted(np.unique(labels)) == list(range(k))


@pytest.mark.parametrize("extra", [1, 2, 3, 4])
def test_leiden_labels_above_leidens_own_count_refines_its_clusters(extra):
    """More clusters than Leiden finds at resolution 1.0 come from sub-clustering each of
    its clusters, so every new cluster lies inside one of them. (A higher resolution on the
    whole graph, the rule before, broke this for 2-4 extra clusters on these points.)"""
    points, _ = unequal_clusters()
    reference = _leiden(knn_connectivities(points, 15), 1.0, 0)
    k = reference.max() + 1 + extra
    labels = leiden_labels(points, k)
    assert labels.max() + 1 == k
    for c in range(k):
        assert len(np.unique(reference[labels == c])) == 1, c


def test_leiden_follows_clusters_kmeans_cuts():
    points, truth = unequal_clusters()
    assert adjusted_rand_score(truth, leiden_labels(points, 3)) == 1.0
    assert adjusted_rand_score(truth, kmeans_labels(points, 3)) < 0.2  # cuts the long one


def test_leiden_initialisation_places_components_on_its_clusters():
    points, truth = unequal_clusters()
    prior = GaussianMixture(3, mode="marginal")
    assert prior.init == "leiden" and prior.learn_weights  # the defaults
    VAEModule(6, get_likelihood("nb"), prior, Architecture(n_latent=2, n_hidden=(8,)))
    prior.initialize(torch.as_tensor(points, dtype=torch.float32), torch.zeros(len(points), 6))
    locs = prior.locs.detach().numpy()
    means = np.stack([points[truth == k].mean(0) for k in range(3)])
    match = [int(np.linalg.norm(locs - m, axis=1).argmin()) for m in means]  # cluster -> component
    assert sorted(match) == [0, 1, 2]
    np.testing.assert_allclose(locs[match], means, atol=1e-4)
    shares = prior.weight_logits.softmax(-1).detach().numpy()[match]
    np.testing.assert_allclose(shares, (np.array([500, 30, 30]) + 1) / (560 + 3), rtol=1e-5)
    # each component's spread is its own cluster's, not a common one
    np.testing.assert_allclose(prior.scales.detach().numpy()[match[0]], points[truth == 0].std(0), rtol=1e-3)


def test_models_with_different_priors_live_side_by_side(sim, quick):
    a = pyrovae.fit(sim.copy(), "nb", prior="gmm", n_clusters=3, **quick)
    state_a = {k: v.clone() for k, v in a.module.state_dict().items()}
    b = pyrovae.fit(sim.copy(), "nb", prior="vamp", **quick)
    c = pyrovae.fit(sim.copy(), "nb", **quick)
    for name, value in a.module.state_dict().items():
        assert torch.equal(value, state_a[name]), name
    ids = [{id(p) for p in m.module.parameters()} for m in (a, b, c)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


def test_a_prior_object_belongs_to_one_model(sim, quick):
    prior = GaussianMixture(3)
    pyrovae.fit(sim.copy(), "nb", prior=prior, **quick)
    with pytest.raises(ValueError, match="belongs to another model.*deepcopy"):
        pyrovae.fit(sim.copy(), "nb", prior=prior, **quick)
    pyrovae.fit(sim.copy(), "nb", prior=copy.deepcopy(GaussianMixture(3)), **quick)


@pytest.mark.parametrize("prior", ["gmm", "vamp"])
def test_save_and_load_keep_the_prior(sim, quick, tmp_path, prior):
    model = pyrovae.fit(sim.copy(), "nb", prior=prior, **quick)
    model.save(tmp_path / "m.pt")
    loaded = pyrovae.load(tmp_path / "m.pt", sim)
    assert type(loaded.prior) is type(model.prior)
    assert loaded.prior.config() == model.prior.config()
    np.testing.assert_array_equal(loaded.get_latent(sim), model.get_latent(sim))
    if prior == "gmm":
        np.testing.assert_array_equal(loaded.get_cluster_probs(sim), model.get_cluster_probs(sim))


def test_a_shared_posterior_runs_the_decoder_once_per_cell():
    torch.manual_seed(0)
    prior = GaussianMixture(K, conditional_posterior=False, init="random")
    module = VAEModule(6, get_likelihood("nb"), prior, ARCH).eval()
    x = torch.poisson(torch.full((5, 6), 3.0))
    args = (x, x.sum(-1, keepdim=True), None, None, None, torch.arange(5), 5)
    from pyro import poutine

    guide_trace = poutine.trace(poutine.enum(module.guide, first_available_dim=-2)).get_trace(*args)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(*args)
    assert guide_trace.nodes["z"]["value"].shape == (5, 2)
    assert model_trace.nodes["x"]["fn"].batch_shape == (5,)
    assert model_trace.nodes["z"]["fn"].batch_shape == (K, 5)
    loss = TraceEnum_ELBO(max_plate_nesting=1)(module.model, module.guide)(*args)
    assert torch.isfinite(loss)


def test_gumbel_temperature_anneals():
    prior = GaussianMixture(3, mode="gumbel", temperature=(1.0, 0.5, 10))
    temps = []
    for epoch in range(15):
        prior.on_epoch(epoch)
        temps.append(float(prior.temperature))
    assert temps[0] == 1.0 and temps[-1] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(temps, temps[1:]))
    assert temps[5] == pytest.approx(2 ** -0.5, rel=1e-6)


def test_marginal_mode_recovers_q_y_by_bayes_rule():
    torch.manual_seed(0)
    prior = GaussianMixture(2, mode="marginal", init="random")
    module = VAEModule(4, get_likelihood("nb"), prior, ARCH).eval()
    with torch.no_grad():
        prior.locs.copy_(torch.tensor([[-5.0, 0.0], [5.0, 0.0]]))
        module.guide.encoder.loc.weight.zero_()
        module.guide.encoder.loc.bias.copy_(torch.tensor([4.0, 0.0]))
        module.guide.encoder.scale.bias.fill_(-8.0)
        probs = prior.cluster_probs(module.guide.encoder, torch.zeros(3, 4))
    np.testing.assert_allclose(probs.numpy(), [[0.0, 1.0]] * 3, atol=1e-6)
    assert not hasattr(prior, "classifier")


def test_vamp_prior_starts_at_training_cells(sim, quick):
    model = pyrovae.fit(sim.copy(), "nb", prior=VampPrior(7), **quick)
    pseudo = model.prior.pseudo_inputs.detach()
    assert pseudo.shape == (7, sim.n_vars)
    assert bool(model.prior.initialized)
    mixture = model.prior.mixture()
    assert mixture.component_distribution.batch_shape == (7,)
    assert model.module.training is False


def test_enumerated_gmvae_recovers_simulated_clusters():
    adata = pyrovae.datasets.simulate(1500, 200, 5, likelihood="zinb", seed=2)
    pyrovae.fit(adata, "zinb", prior="gmm", n_clusters=5, max_epochs=100, progress=False)
    assert adjusted_rand_score(adata.obs["cluster"], adata.obs["pyrovae_cluster"]) >= 0.9


def test_unknown_mixture_mode():
    with pytest.raises(ValueError, match="mode must be"):
        GaussianMixture(3, mode="sampled")
    with pytest.raises(ValueError, match="at least 2"):
        GaussianMixture(1)
    assert StandardNormal().n_clusters is None


def test_plot_clusters_beside_known_labels(small, quick, tmp_path):
    import matplotlib.pyplot as plt

    with pytest.raises(KeyError, match="prior='gmm'"):
        pyrovae.plotting.plot_clusters(small)
    pyrovae.fit(small, "nb", prior="gmm", n_clusters=4, **quick)
    before = set(small.obsm)
    fig = pyrovae.plotting.plot_clusters(small, label_key="cluster", path=tmp_path / "clusters.png")
    assert (tmp_path / "clusters.png").stat().st_size > 0 and set(small.obsm) == before
    left, right = fig.axes
    assert "q(y | x)" in left.get_title() and right.get_title() == "cluster"
    # one scatter per category, each with that category's cells
    sizes = {c.get_label(): len(c.get_offsets()) for c in left.collections}
    counts = small.obs["pyrovae_cluster"].value_counts()
    assert sum(sizes.values()) == small.n_obs
    assert all(sizes[f"{k} ({n})"] == n for k, n in counts.items() if n)
    plt.close("all")


def test_a_seeded_mixture_fit_is_reproducible(sim):
    """The staged fit swaps a mixture in after pre-training: its networks' initial weights
    come from the model's seed, not from the global random state."""
    options = dict(prior="gmm", n_clusters=4, max_epochs=6, kl_warmup_epochs=3, progress=False, seed=0)
    first, second = sim.copy(), sim.copy()
    pyrovae.fit(first, "nb", **options)
    torch.randn(100)  # move the global random state on
    pyrovae.fit(second, "nb", **options)
    np.testing.assert_array_equal(first.obsm["X_pyrovae"], second.obsm["X_pyrovae"])
    np.testing.assert_array_equal(first.obsm["pyrovae_cluster_probs"], second.obsm["pyrovae_cluster_probs"])
