import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

import pyrovae


def test_pbmc68k_counts_are_rebuilt_exactly():
    adata = pyrovae.datasets.pbmc68k()
    assert adata.shape == (700, 765)
    assert sp.issparse(adata.X) and adata.X.dtype == np.float32
    values = adata.X.data
    assert np.all(values > 0) and np.array_equal(values, np.round(values))
    assert adata.obs["cell_type"].cat.categories.size == 10
    assert adata.obs["cell_type"].value_counts().max() == 240
    reduced = sc.datasets.pbmc68k_reduced()
    assert list(adata.var_names) == list(reduced.raw.var_names)
    # the log-normalisation of the rebuilt counts gives back scanpy's raw.X
    lognorm = np.log1p(adata.X.toarray() / reduced.obs["n_counts"].to_numpy()[:, None] * 1e4)
    np.testing.assert_allclose(lognorm, reduced.raw.X.toarray(), atol=2e-3)
    assert (np.asarray(adata.X.sum(1)).ravel() > 0).all()
    assert (np.asarray(adata.X.sum(0)).ravel() > 0).all()


@pytest.mark.parametrize("likelihood", ["poisson", "nb", "zip", "zinb"])
def test_simulate(likelihood):
    a = pyrovae.datasets.simulate(500, 80, 3, likelihood=likelihood, seed=4)
    b = pyrovae.datasets.simulate(500, 80, 3, likelihood=likelihood, seed=4, chunk_size=77)
    assert a.shape == (500, 80)
    assert (a.X != b.X).nnz == 0, "chunking must not change the draws"
    assert list(a.obs["cluster"].cat.categories) == ["0", "1", "2"]
    assert a.obsm["X_true_latent"].shape == (500, 10)
    X = a.X.toarray()
    assert np.array_equal(X, np.round(X)) and X.min() >= 0
    assert a.uns["simulation"]["likelihood"] == likelihood


def test_simulated_likelihoods_differ_as_they_should():
    X = {lik: pyrovae.datasets.simulate(2000, 50, 1, likelihood=lik, seed=0, separation=0.0).X.toarray()
         for lik in ["poisson", "nb", "zip", "zinb"]}
    zeros = {k: (v == 0).mean() for k, v in X.items()}
    assert zeros["zip"] > zeros["poisson"] + 0.1 and zeros["zinb"] > zeros["nb"] + 0.1
    # the same seed gives the same means; NB adds Var = E[mu^2] / theta on top of Poisson's
    sim_nb = pyrovae.datasets.simulate(2000, 50, 1, likelihood="nb", seed=0, separation=0.0)
    mean, var = X["poisson"].mean(0), X["poisson"].var(0)
    expected_mu2 = (var - mean) + mean**2
    excess = X["nb"].var(0) - var
    ratio = excess / (expected_mu2 / sim_nb.var["theta"].to_numpy())
    assert 0.8 < np.median(ratio) < 1.25
    np.testing.assert_allclose(X["nb"].mean(0), mean, rtol=0.15)


def test_simulate_rejects_continuous_likelihoods():
    with pytest.raises(ValueError, match="simulate draws counts"):
        pyrovae.datasets.simulate(10, 5, 2, likelihood="gaussian")
