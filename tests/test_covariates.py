"""Batches, covariates, library size and dispersion options through model, guide and fit."""

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from pyro import poutine

import pyrovae
from pyrovae import metrics
from pyrovae.data import CovariateSpec, InvalidDataError
from pyrovae.likelihoods import LIKELIHOODS, get_likelihood
from pyrovae.module import Covariates, VAEModule
from pyrovae.nn import Architecture
from pyrovae.priors import GaussianMixture, StandardNormal
from tests.checks import checked_traces

ARCH = Architecture(n_latent=3, n_hidden=(16,))


@pytest.fixture
def with_batches(sim):
    adata = sim.copy()
    rng = np.random.default_rng(0)
    adata.obs["batch"] = pd.Categorical(rng.choice(["b1", "b2", "b3"], adata.n_obs))
    adata.obs["treatment"] = rng.choice(["ctrl", "drug"], adata.n_obs)
    adata.obs["age"] = rng.normal(50, 10, adata.n_obs)
    return adata


def minibatch(likelihood: str, cov: Covariates, n_cells=8, n_genes=12):
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((n_cells, n_genes), 4.0), generator=g) + 1
    kind = get_likelihood(likelihood).data
    x = x if kind == "counts" else torch.log1p(x) if kind == "real" else x / x.max()
    covariates = torch.rand(n_cells, cov.n_covariates, generator=g) if cov.n_covariates else None
    batch = torch.randint(cov.n_batches, (n_cells,), generator=g)
    label = torch.randint(cov.n_labels, (n_cells,), generator=g)
    return x, x.sum(-1, keepdim=True), covariates, batch, label, torch.arange(n_cells), n_cells


OPTIONS = [
    Covariates(n_covariates=5, n_batches=3, n_labels=2, library=library, dispersion=dispersion)
    for library in ("observed", "latent")
    for dispersion in ("gene", "gene-batch", "gene-label", "gene-cell")
] + [Covariates()]


CASES = [  # a latent library is for count likelihoods only
    (cov, likelihood) for cov in OPTIONS for likelihood in sorted(LIKELIHOODS)
    if cov.library == "observed" or get_likelihood(likelihood).is_count
]


@pytest.mark.parametrize("prior", ["normal", "gmm"])
@pytest.mark.parametrize(("cov", "likelihood"), CASES,
                         ids=[f"{c.library}-{c.dispersion}-{c.n_covariates}-{lik}" for c, lik in CASES])
def test_every_option_through_model_and_guide(cov, likelihood, prior):
    torch.manual_seed(0)
    make_prior = StandardNormal if prior == "normal" else (lambda: GaussianMixture(3))
    module = VAEModule(12, get_likelihood(likelihood), make_prior(), ARCH, cov)
    args = minibatch(likelihood, cov)
    with pyro.validation_enabled(True):
        model_trace, _ = checked_traces(module.model, module.guide, *args)
        assert ("l" in model_trace.nodes) == (cov.library == "latent")
        loss_fn = module.prior.elbo()(module.model, module.guide)
        loss = loss_fn(*args)
        loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in loss_fn.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if cov.dispersion != "gene-cell" and get_likelihood(likelihood).gene_params:
        rows = {"gene": (), "gene-batch": (3,), "gene-label": (2,)}[cov.dispersion]
        assert all(p.shape == (*rows, 12) for p in module.model.gene_params.values())


def test_covariate_spec_encodes_consistently(with_batches):
    spec = CovariateSpec.from_obs(with_batches.obs, batch_key="batch",
                                  categorical_covariate_keys=["treatment"],
                                  continuous_covariate_keys=["age"])
    assert spec.categorical == {"batch": ["b1", "b2", "b3"], "treatment": ["ctrl", "drug"]}
    assert spec.n_covariates == 6 and spec.n_batches == 3
    enc = spec.encode(with_batches.obs)
    assert enc.covariates.shape == (with_batches.n_obs, 6)
    np.testing.assert_array_equal(enc.covariates[:, :3].argmax(1), enc.batch)
    assert abs(enc.covariates[:, 5].mean()) < 1e-6 and abs(enc.covariates[:, 5].std() - 1) < 1e-3
    # a subset is encoded the same way: the categories were fixed by the training data
    sub = spec.encode(with_batches.obs.iloc[:5])
    np.testing.assert_array_equal(sub.covariates, enc.covariates[:5])
    back = CovariateSpec(**spec.to_dict())
    np.testing.assert_array_equal(back.encode(with_batches.obs).covariates, enc.covariates)


def test_unknown_categories_and_missing_columns_are_named(with_batches, tmp_path):
    model = pyrovae.fit(with_batches.copy(), "nb", batch_key="batch", max_epochs=2, progress=False)
    other = with_batches.copy()
    other.obs["batch"] = other.obs["batch"].astype(str).replace({"b3": "b9"})
    with pytest.raises(InvalidDataError, match=r"adata.obs\['batch'\] holds categories the model was not trained on: \['b9'\]; it knows \['b1', 'b2', 'b3'\]"):
        model.get_latent(other)
    model.save(tmp_path / "m.pt")
    loaded = pyrovae.load(tmp_path / "m.pt")
    with pytest.raises(InvalidDataError, match="b9"):
        loaded.elbo(other)
    missing = with_batches.copy()
    del missing.obs["batch"]
    with pytest.raises(InvalidDataError, match=r"adata.obs\['batch'\] not found; adata.obs has columns"):
        loaded.get_latent(missing)
    with pytest.raises(InvalidDataError, match=r"adata.obs\['donor'\] not found"):
        pyrovae.fit(with_batches.copy(), batch_key="donor")
    gaps = with_batches.copy()
    gaps.obs["batch"] = gaps.obs["batch"].astype(object)
    gaps.obs.iloc[3, gaps.obs.columns.get_loc("batch")] = None
    with pytest.raises(InvalidDataError, match="missing for 1 cells"):
        pyrovae.fit(gaps, batch_key="batch")


def test_latent_library_prior_uses_each_batch_statistics(with_batches):
    adata = with_batches.copy()
    X = adata.X.toarray()
    X[adata.obs["batch"] == "b2"] *= 4  # a deeper batch
    adata.X = X
    model = pyrovae.fit(adata, "nb", batch_key="batch", library="latent", max_epochs=3,
                        validation_fraction=0.0, progress=False)
    logs = np.log(X.sum(1))
    for b, name in enumerate(["b1", "b2", "b3"]):
        mine = logs[adata.obs["batch"] == name]
        assert float(model.module.model.library_loc[b]) == pytest.approx(mine.mean(), rel=1e-5)
        assert float(model.module.model.library_scale[b]) == pytest.approx(mine.std(), rel=1e-4)
    assert model.module.model.library_loc[1] > model.module.model.library_loc[0] + 1.0
    cells = model.sample(300, covariates={"batch": "b2"})
    assert abs(np.log(cells.obs["library"]).mean() - logs[adata.obs["batch"] == "b2"].mean()) < 0.1


def test_a_latent_library_learns_the_cells_depth():
    """With Poisson counts the total is all the data say about depth: q(l | x) follows it.
    (With over-dispersed counts and few genes the posterior shrinks towards the batch's
    typical depth, as it should.)"""
    adata = pyrovae.datasets.simulate(500, 100, 4, likelihood="poisson", seed=1)
    model = pyrovae.fit(adata.copy(), "poisson", library="latent", max_epochs=80, progress=False)
    args = model._args(model._read(adata).minibatch(np.arange(adata.n_obs)))
    model.module.eval()
    with torch.no_grad():
        trace = poutine.trace(model.module.guide).get_trace(*args)
    inferred = trace.nodes["l"]["fn"].mean.numpy()
    observed = np.asarray(adata.X.sum(1)).ravel()
    assert np.corrcoef(np.log(inferred), np.log(observed))[0, 1] > 0.8


def test_transform_batch_decodes_as_another_batch(with_batches):
    model = pyrovae.fit(with_batches.copy(), "nb", batch_key="batch", max_epochs=3, progress=False)
    cells = with_batches[:10]
    own = model.get_normalized_expression(cells, n_samples=2)
    as_b1 = model.get_normalized_expression(cells, transform_batch="b1", n_samples=2)
    mixed = model.get_normalized_expression(cells, transform_batch=["b1", "b2"], n_samples=2)
    assert own.shape == as_b1.shape == mixed.shape == (10, with_batches.n_vars)
    in_b1 = (cells.obs["batch"] == "b1").to_numpy()
    np.testing.assert_allclose(own[in_b1], as_b1[in_b1], rtol=1e-5)
    assert not np.allclose(own[~in_b1], as_b1[~in_b1])
    samples = model.get_normalized_expression(cells, n_samples=3, return_samples=True)
    assert samples.shape == (3, 10, with_batches.n_vars)
    with pytest.raises(ValueError, match="transform_batch 'b7' is not a batch"):
        model.get_normalized_expression(cells, transform_batch="b7")
    plain = pyrovae.fit(with_batches.copy(), "nb", max_epochs=1, progress=False)
    with pytest.raises(ValueError, match="needs a model trained with a batch_key"):
        plain.get_normalized_expression(cells, transform_batch="b1")


def test_conditional_generation_gives_cells_of_the_asked_condition():
    """Two conditions that differ in a block of genes: cells generated under each look
    like that condition's cells."""
    adata = pyrovae.datasets.simulate(800, 60, 2, likelihood="nb", seed=5)
    rng = np.random.default_rng(1)
    condition = rng.choice(["A", "B"], adata.n_obs)
    X = adata.X.toarray()
    X[condition == "B", :10] *= 6  # condition B expresses genes 0-9 six times more
    adata.X = np.round(X)
    adata.obs["condition"] = condition
    model = pyrovae.fit(adata, "nb", categorical_covariate_keys=["condition"], max_epochs=60,
                        progress=False)
    for name in ("A", "B"):
        cells = model.sample(400, covariates={"condition": name}, seed=2)
        assert (cells.obs["condition"] == name).all()
        profile = np.log1p(cells.X.mean(0))
        truth = {c: np.log1p(X[condition == c].mean(0)) for c in ("A", "B")}
        other = "B" if name == "A" else "A"
        assert np.abs(profile - truth[name]).mean() < np.abs(profile - truth[other]).mean()
    # the share of genes 0-9 in a cell's counts, condition B over A: generated vs observed
    def share(counts, rows=slice(None)):
        return (counts[rows] / counts[rows].sum(1, keepdims=True))[:, :10].sum(1).mean()

    observed = share(X, condition == "B") / share(X, condition == "A")
    generated = share(model.sample(2000, covariates={"condition": "B"}).X) / \
        share(model.sample(2000, covariates={"condition": "A"}).X)
    assert generated == pytest.approx(observed, rel=0.3)
    with pytest.raises(InvalidDataError, match="give a value for each, missing \\['condition'\\]"):
        model.sample(5)


def test_options_are_checked(with_batches):
    with pytest.raises(ValueError, match="gene-batch.*needs a batch_key"):
        pyrovae.fit(with_batches.copy(), dispersion="gene-batch")
    with pytest.raises(ValueError, match="dispersion must be"):
        pyrovae.fit(with_batches.copy(), dispersion="cell")
    with pytest.raises(ValueError, match="latent library needs a count likelihood"):
        pyrovae.VAE(with_batches.var_names, likelihood="gaussian", library="latent")


def test_settings_and_save_load_keep_the_covariates(with_batches, tmp_path):
    adata = with_batches.copy()
    model = pyrovae.fit(adata, "zinb", batch_key="batch", categorical_covariate_keys=["treatment"],
                        continuous_covariate_keys=["age"], library="latent",
                        dispersion="gene-batch", max_epochs=2, progress=False)
    settings = adata.uns["pyrovae"]["settings"]
    assert settings["batch_key"] == "batch" and settings["categorical_covariate_keys"] == ["treatment"]
    assert settings["library"] == "latent" and settings["dispersion"] == "gene-batch"
    model.save(tmp_path / "m.pt")
    loaded = pyrovae.load(tmp_path / "m.pt", adata)
    np.testing.assert_array_equal(loaded.get_latent(adata), model.get_latent(adata))
    adata.write_h5ad(tmp_path / "a.h5ad")


def test_a_batch_key_mixes_the_batches_and_keeps_the_cell_types_apart():
    """Two batches whose genes differ by factors exp(N(0, 1)): without the batch key the
    latent space separates the batches; with it they mix, and the clusters stay apart."""
    adata = pyrovae.datasets.simulate(600, 100, 4, likelihood="nb", n_batches=2, batch_effect=1.0,
                                      seed=0)
    scores = {}
    for key in (None, "batch"):
        model = pyrovae.fit(adata.copy(), "nb", batch_key=key, max_epochs=30, progress=False)
        latent = model.get_latent(adata)
        scores[key] = {
            "entropy": metrics.batch_mixing_entropy(latent, adata.obs["batch"]),
            "silhouette_batch": metrics.silhouette(latent, adata.obs["batch"]),
            "silhouette_cluster": metrics.silhouette(latent, adata.obs["cluster"]),
            "ari": metrics.kmeans_scores(latent, adata.obs["cluster"])["ari"],
        }
    without, with_key = scores[None], scores["batch"]
    assert with_key["entropy"] > without["entropy"] + 0.1  # log 2 = 0.69 is perfect mixing
    assert abs(with_key["silhouette_batch"]) < 0.5 * abs(without["silhouette_batch"])
    assert with_key["ari"] > 0.9 and with_key["silhouette_cluster"] > 0.3
