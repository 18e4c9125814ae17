import hashlib

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


def _digest(adata):
    h = hashlib.sha256()
    for array in (adata.X.indptr, adata.X.indices, adata.X.data, adata.obsm["X_true_latent"]):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize(("likelihood", "digest"), [("nb", "96034ccf42432868"),
                                                     ("zinb", "5cdc310694c39233")])
def test_simulate_without_the_new_options_is_unchanged(likelihood, digest):
    # digests of simulate(200, 40, 3, seed=7) before it had batches and DE genes (commit
    # 895b2e3, numpy 2.4): the options must not move any other draw
    assert _digest(pyrovae.datasets.simulate(200, 40, 3, likelihood=likelihood, seed=7)) == digest


def test_simulate_batches():
    plain = pyrovae.datasets.simulate(3000, 60, 3, likelihood="nb", seed=5)
    a = pyrovae.datasets.simulate(3000, 60, 3, likelihood="nb", seed=5, n_batches=3,
                                  batch_effect=0.7)
    factor = a.varm["true_batch_factor"]
    assert factor.shape == (60, 3) and (factor[:, 0] == 1).all() and (factor[:, 1:] != 1).all()
    assert list(a.obs["batch"].cat.categories) == ["b0", "b1", "b2"]
    assert a.obs["batch"].value_counts().min() > 900
    # the clusters and latent positions are those without batches
    np.testing.assert_array_equal(a.obs["cluster"], plain.obs["cluster"])
    np.testing.assert_array_equal(a.obsm["X_true_latent"], plain.obsm["X_true_latent"])
    # the data carry the factors: mean count of each gene in b1 over b0, within cluster 0
    X, batch, cluster = a.X.toarray(), a.obs["batch"].to_numpy(), a.obs["cluster"].to_numpy()
    in0 = cluster == "0"
    observed = np.log(X[in0 & (batch == "b1")].mean(0) / X[in0 & (batch == "b0")].mean(0))
    assert np.corrcoef(observed, np.log(factor[:, 1]))[0, 1] > 0.9
    # no effect, no change: the counts are drawn from the same streams
    none = pyrovae.datasets.simulate(3000, 60, 3, likelihood="nb", seed=5, n_batches=3,
                                     batch_effect=0.0)
    assert (none.X != plain.X).nnz == 0


def test_simulate_planted_de_genes():
    # one population spread evenly over the genes, so that every gene has counts
    options = dict(likelihood="nb", separation=0.0, seed=6)
    plain = pyrovae.datasets.simulate(10000, 80, 1, **options)
    a = pyrovae.datasets.simulate(10000, 80, 1, n_de_genes=12, de_log_fold_change=1.0, **options)
    de, lfc = a.var["de"].to_numpy(), a.var["true_log_fold_change"].to_numpy()
    assert de.sum() == 12 and set(np.abs(lfc[de])) == {1.0} and (lfc[~de] == 0).all()
    assert 0 < (lfc > 0).sum() < 12  # both directions
    assert list(a.obs["condition"].cat.categories) == ["A", "B"]
    np.testing.assert_array_equal(a.obsm["X_true_latent"], plain.obsm["X_true_latent"])
    # pseudo-bulk log ratio of B over A: the planted change for the DE genes, ~0 elsewhere
    X, b = a.X.toarray(), (a.obs["condition"] == "B").to_numpy()
    observed = np.log(X[b].mean(0) / X[~b].mean(0))
    assert np.abs(observed[de] - lfc[de]).max() < 0.2
    assert np.abs(observed[~de]).max() < 0.2 and np.abs(observed[de]).min() > 0.8
    none = pyrovae.datasets.simulate(10000, 80, 1, n_de_genes=12, de_log_fold_change=0.0, **options)
    assert (none.X != plain.X).nnz == 0 and none.var["de"].sum() == 12


def test_simulate_rejects_bad_options():
    with pytest.raises(ValueError, match="n_de_genes"):
        pyrovae.datasets.simulate(10, 5, 2, n_de_genes=6)
    with pytest.raises(ValueError, match="batch_effect"):
        pyrovae.datasets.simulate(10, 5, 2, n_batches=2, batch_effect=-1.0)
    with pytest.raises(ValueError, match="n_batches"):
        pyrovae.datasets.simulate(10, 5, 2, n_batches=0)
