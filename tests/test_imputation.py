"""Imputation benchmark: hiding counts, the two baselines by hand, and the model beating
the gene mean on simulated counts."""

import numpy as np
import pytest
import scipy.sparse as sp

import pyrovae
from pyrovae.imputation import gene_mean_prediction, hide_counts, imputation_benchmark, knn_prediction


def test_hide_counts():
    rng = np.random.default_rng(0)
    X = rng.poisson(1.0, (200, 50)).astype(np.float32)
    X[0] = 0
    X[0, 3] = 7  # a cell with one count keeps it
    X[:, 5] = 0
    X[9, 5] = 2  # so does a gene
    original = X.copy()
    masked, rows, cols, values = hide_counts(sp.csr_matrix(X), 0.3, seed=1)
    np.testing.assert_array_equal(X, original)  # the input is not modified
    nonzero = np.count_nonzero(X)
    assert abs(len(values) - 0.3 * nonzero) <= 2
    np.testing.assert_array_equal(values, X[rows, cols])
    assert (values > 0).all()
    dense = masked.toarray()
    assert (dense[rows, cols] == 0).all()
    assert np.count_nonzero(dense) == nonzero - len(values)
    assert dense[0, 3] == 7 and dense[9, 5] == 2
    assert (dense.sum(1) > 0).all() and (dense.sum(0) > 0).all()
    again = hide_counts(X, 0.3, seed=1)  # dense input, same seed: same entries
    np.testing.assert_array_equal(again[1], rows)
    assert not np.array_equal(hide_counts(X, 0.3, seed=2)[1], rows)
    with pytest.raises(ValueError, match="fraction"):
        hide_counts(X, 1.0)


def test_gene_mean_prediction_by_hand():
    X = np.array([[1.0, 3.0], [2.0, 2.0]])
    # libraries 4 and 4; the genes' shares of all counts 3/8 and 5/8
    np.testing.assert_allclose(gene_mean_prediction(X, np.array([0, 1]), np.array([1, 0])),
                               [4 * 5 / 8, 4 * 3 / 8])


def test_knn_prediction_averages_the_neighbours_shares():
    # two types of 10 cells; within a type the cells differ in library size only
    rng = np.random.default_rng(0)
    profile = np.array([[0.5, 0.3, 0.2, 0.0], [0.0, 0.1, 0.3, 0.6]])
    library = rng.integers(50, 500, 20).astype(float)
    X = np.round(library[:, None] * profile[np.repeat([0, 1], 10)])
    X[0, 2] = 0  # hidden: cell 0's neighbours are the 9 other cells of its type
    prediction = knn_prediction(X, np.array([0]), np.array([2]), n_neighbors=9, n_pcs=2)
    others = X[1:10]
    expected = X[0].sum() * (others[:, 2] / others.sum(1)).mean()
    np.testing.assert_allclose(prediction, [expected])


def test_model_beats_the_gene_mean_on_simulated_counts():
    adata = pyrovae.datasets.simulate(500, 100, 4, likelihood="nb", seed=0)
    before = adata.X.copy()
    result = imputation_benchmark(adata, fraction=0.1, likelihood="nb", max_epochs=100,
                                  progress=False)
    assert (adata.X != before).nnz == 0 and "X_pyrovae" not in adata.obsm
    summary = result.summary
    assert list(summary.index) == ["model", "gene_mean", "knn"]
    n_hidden = int(summary["n_hidden"].iloc[0])
    assert n_hidden == len(result.hidden) and abs(n_hidden - 0.1 * before.nnz) <= 5
    np.testing.assert_array_equal(
        result.hidden["truth"], before[adata.obs_names.get_indexer(result.hidden["cell"]),
                                       adata.var_names.get_indexer(result.hidden["gene"])].A1)
    errors = summary["median_abs_error"]
    assert errors["model"] < 0.8 * errors["gene_mean"]
    assert summary.loc["model", "log_correlation"] > summary.loc["gene_mean", "log_correlation"]
    assert result.model.history["epoch"].iloc[-1] == 100
