"""``pyrovae.fit`` and the fitted model: learning, outputs, reproducibility, persistence."""

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import pyrovae
from pyrovae.data import InvalidDataError
from pyrovae.likelihoods import LIKELIHOODS

from .conftest import continuous_version


def test_training_recovers_simulated_clusters_and_the_loss_falls():
    adata = pyrovae.datasets.simulate(1000, 200, 5, likelihood="zinb", seed=0)
    model = pyrovae.fit(adata, "zinb", max_epochs=40, progress=False)
    scores = pyrovae.metrics.kmeans_scores(adata.obsm["X_pyrovae"], adata.obs["cluster"])
    assert scores["ari"] >= 0.8
    history = model.history
    assert history["validation_elbo"].iloc[-5:].mean() > history["validation_elbo"].iloc[:5].mean() + 20
    assert history["train_elbo"].iloc[-5:].mean() > history["train_elbo"].iloc[:5].mean() + 20


def test_fit_writes_latent_and_uns_and_nothing_else(small, quick, tmp_path):
    before = small.copy()
    model = pyrovae.fit(small, "nb", key_added="X_vae", **quick)
    assert isinstance(model, pyrovae.VAE)
    assert small.obsm["X_vae"].shape == (small.n_obs, 10)
    np.testing.assert_array_equal(small.obsm["X_vae"], model.get_latent(small))
    run = small.uns["pyrovae"]
    assert run["settings"]["likelihood"] == "nb"
    assert run["settings"]["obsm_key"] == "X_vae"
    assert run["settings"]["max_epochs"] == 3
    assert list(run["history"]["epoch"]) == [1, 2, 3]
    assert (small.X != before.X).nnz == 0
    pd.testing.assert_frame_equal(small.obs, before.obs)
    pd.testing.assert_frame_equal(small.var, before.var)
    assert set(small.obsm) == set(before.obsm) | {"X_vae"}
    assert set(small.uns) == set(before.uns) | {"pyrovae"}
    assert set(small.layers) == set(before.layers) and set(small.obsp) == set(before.obsp)
    small.write_h5ad(tmp_path / "out.h5ad")
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(back.uns["pyrovae"]["history"]["train_elbo"],
                                  run["history"]["train_elbo"])


def test_same_seed_is_reproducible_bit_for_bit_and_leaves_global_rng(sim, quick):
    state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    a = pyrovae.fit(sim.copy(), "zinb", **quick)
    b = pyrovae.fit(sim.copy(), "zinb", **quick)
    c = pyrovae.fit(sim.copy(), "zinb", **{**quick, "seed": 1})
    assert torch.equal(torch.get_rng_state(), state)
    assert np.array_equal(np.random.get_state()[1], np_state)
    pd.testing.assert_frame_equal(a.history.drop(columns="seconds"), b.history.drop(columns="seconds"))
    np.testing.assert_array_equal(a.get_latent(sim), b.get_latent(sim))
    for name, p in a.module.state_dict().items():
        assert torch.equal(p, b.module.state_dict()[name]), name
    assert not np.array_equal(a.get_latent(sim), c.get_latent(sim))


def test_two_models_in_one_process_do_not_interfere(sim, quick):
    a = pyrovae.fit(sim.copy(), "nb", **quick)
    state_a = {k: v.clone() for k, v in a.module.state_dict().items()}
    latent_a = a.get_latent(sim)
    b = pyrovae.fit(sim.copy(), "nb", **{**quick, "seed": 5, "max_epochs": 5})
    for name, p in a.module.state_dict().items():
        assert torch.equal(p, state_a[name]), name
    np.testing.assert_array_equal(a.get_latent(sim), latent_a)
    shared = {id(p) for p in a.module.parameters()} & {id(p) for p in b.module.parameters()}
    assert not shared
    a.train(sim, max_epochs=2, progress=False)
    assert list(a.history["epoch"]) == [1, 2, 3, 4, 5]
    assert len(b.history) == 5


def test_save_and_load_round_trip(sim, quick, tmp_path):
    model = pyrovae.fit(sim.copy(), "zinb", **quick)
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = pyrovae.load(path, sim)
    np.testing.assert_array_equal(loaded.get_latent(sim), model.get_latent(sim))
    np.testing.assert_array_equal(
        loaded.get_normalized_expression(sim), model.get_normalized_expression(sim)
    )
    pd.testing.assert_frame_equal(loaded.history, model.history, check_dtype=False)
    assert loaded.settings() == model.settings()
    assert repr(loaded) == repr(model)


def test_loading_onto_other_genes_is_a_clear_error(sim, quick, tmp_path):
    model = pyrovae.fit(sim.copy(), "nb", **quick)
    model.save(tmp_path / "m.pt")
    fewer = sim[:, 5:].copy()
    with pytest.raises(InvalidDataError, match="trained on 60 genes; this AnnData has 55; 5 of the model's genes are missing"):
        pyrovae.load(tmp_path / "m.pt", fewer)
    shuffled = sim[:, ::-1].copy()
    loaded = pyrovae.load(tmp_path / "m.pt")
    with pytest.raises(InvalidDataError, match="another order"):
        loaded.get_latent(shuffled)
    with pytest.raises(InvalidDataError, match="another order"):
        model.elbo(shuffled)


def test_load_rejects_other_files(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a model saved by pyrovae"):
        pyrovae.load(tmp_path / "other.pt")


def test_fitted_model_methods(sim, quick):
    model = pyrovae.fit(sim.copy(), "zinb", **quick)
    expr = model.get_normalized_expression(sim, library_size=1e4, n_samples=3)
    assert expr.shape == (sim.n_obs, sim.n_vars)
    np.testing.assert_allclose(expr.sum(1), 1e4, rtol=1e-4)
    elbo = model.elbo(sim[:20], n_samples=4)
    assert list(elbo.columns) == ["elbo", "reconstruction", "kl"]
    assert list(elbo.index) == list(sim.obs_names[:20])
    np.testing.assert_allclose(elbo["elbo"], elbo["reconstruction"] - elbo["kl"], rtol=1e-6)
    assert (elbo["kl"] > 0).all() and (elbo["reconstruction"] < 0).all()
    reps = model.posterior_predictive_sample(sim[:10], 4)
    assert reps.shape == (4, 10, sim.n_vars)
    assert np.all(reps >= 0) and np.array_equal(reps, np.round(reps))
    assert not np.array_equal(reps[0], reps[1])
    ax = model.plot_history()
    assert ax.get_ylabel().startswith("ELBO")
    plt.close("all")


def test_elbo_matches_the_training_loss(sim, quick):
    """The per-cell ELBO agrees with the loss module's estimate on the same cells."""
    model = pyrovae.fit(sim.copy(), "nb", **quick)
    per_cell = model.elbo(sim, n_samples=200)["elbo"].sum()
    from pyrovae.train import evaluate_loss
    from pyro.infer import TraceMeanField_ELBO

    loss_fn = TraceMeanField_ELBO()(model.module.model, model.module.guide)
    data = pyrovae.data.read_data(sim)
    model.module.eval()
    torch.manual_seed(0)
    estimates = [evaluate_loss(loss_fn, data, np.arange(sim.n_obs), 100, "cpu") for _ in range(20)]
    assert per_cell / sim.n_obs == pytest.approx(np.mean(estimates), abs=0.2)


def test_posterior_predictive_resembles_the_data(sim):
    """A trained NB model replicates the depth, gene means and zero fraction of its data."""
    model = pyrovae.fit(sim.copy(), "nb", max_epochs=300, progress=False)
    reps = model.posterior_predictive_sample(sim, 10)  # per-cell totals have sd ~ their mean:
    X = sim.X.toarray()                                # 3,000 draws put the mean within ~2 %
    replicated_library = reps.sum(-1).mean(0)
    assert replicated_library.mean() == pytest.approx(X.sum(1).mean(), rel=0.05)
    gene_means = np.log1p(reps.mean((0, 1))), np.log1p(X.mean(0))
    assert np.corrcoef(*gene_means)[0, 1] > 0.98
    assert abs((reps == 0).mean() - (X == 0).mean()) < 0.03


def test_early_stopping_stops_and_keeps_the_best_weights(sim):
    options = dict(kl_warmup_epochs=5, patience=3, lr=3e-2, progress=False)
    model = pyrovae.fit(sim.copy(), "nb", max_epochs=400, **options)
    history = model.history
    assert len(history) < 400
    best = int(history["validation_elbo"].idxmax())
    assert len(history) - 1 - best == 3
    # training is reproducible, so a run that ends at the best epoch has the same weights
    until_best = pyrovae.fit(sim.copy(), "nb", max_epochs=best + 1, early_stopping=False, **options)
    for name, p in model.module.state_dict().items():
        assert torch.equal(p, until_best.module.state_dict()[name]), name


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
def test_every_likelihood_fits(sim, quick, likelihood):
    kind = LIKELIHOODS[likelihood].data
    adata = sim.copy() if kind == "counts" else continuous_version(sim, kind)
    model = pyrovae.fit(adata, likelihood, **quick)
    assert np.isfinite(model.history["validation_elbo"]).all()
    assert np.isfinite(model.elbo(adata)["elbo"]).all()
    expr = model.get_normalized_expression(adata, n_samples=2)
    assert np.isfinite(expr).all()
    if kind == "unit_interval":
        assert ((expr >= 0) & (expr <= 1)).all()


def test_no_validation_no_early_stopping(sim):
    model = pyrovae.fit(sim.copy(), "nb", max_epochs=4, validation_fraction=0.0, progress=False)
    assert len(model.history) == 4
    assert model.history["validation_elbo"].isna().all()


def test_cuda_without_a_gpu_is_a_clear_error(sim):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="device='cuda'.*no CUDA GPU"):
        pyrovae.fit(sim.copy(), device="cuda", max_epochs=1, progress=False)


def test_training_options_are_checked(sim):
    with pytest.raises(ValueError, match="validation_fraction"):
        pyrovae.fit(sim.copy(), validation_fraction=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        pyrovae.fit(sim.copy(), batch_size=1)


def test_duplicate_gene_names_are_refused(sim):
    adata = sim.copy()
    adata.var_names = ["g"] * adata.n_vars
    with pytest.raises(ValueError, match="var_names_make_unique"):
        pyrovae.fit(adata, max_epochs=1, progress=False)


def test_multi_layer_networks(sim):
    model = pyrovae.fit(sim.copy(), "nb", n_hidden=(32, 16), n_latent=4, max_epochs=2, progress=False)
    assert model.get_latent(sim).shape == (sim.n_obs, 4)
    assert model.settings()["n_hidden"] == [32, 16]


def test_sparse_scoring_allows_empty_genes(sim, quick):
    model = pyrovae.fit(sim.copy(), "nb", **quick)
    few = sim[:3].copy()
    X = few.X.toarray()
    X[:, 0] = 0
    few.X = sp.csr_matrix(X)
    assert np.isfinite(model.elbo(few)["elbo"]).all()
