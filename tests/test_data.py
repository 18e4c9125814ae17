"""The AnnData edge: every bad input gets a clear error; the user's data never changes."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import pyrovae
from pyrovae.data import InvalidDataError, check_genes, read_data

from .conftest import continuous_version


def _counts(n_cells=6, n_genes=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(3.0, (n_cells, n_genes)).astype(np.float32) + 1
    return ad.AnnData(
        X=X,
        obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )


def _snapshot(adata):
    X = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    return X, adata.obs.copy(), adata.var.copy(), set(adata.obsm), set(adata.uns), set(adata.layers)


def _assert_unchanged(adata, snap):
    X, obs, var, obsm, uns, layers = snap
    now = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    np.testing.assert_array_equal(now, X)
    pd.testing.assert_frame_equal(adata.obs, obs)
    pd.testing.assert_frame_equal(adata.var, var)
    assert (set(adata.obsm), set(adata.uns), set(adata.layers)) == (obsm, uns, layers)


def _with(adata, i, j, value):
    X = adata.X.copy()
    X[i, j] = value
    adata.X = X
    return adata


BAD_COUNTS = {
    "non-integer": (lambda a: _with(a, 2, 1, 1.5), r"1 non-integer value \(first: 1\.5 at cell 'c2', gene 'g1'\).*raw counts"),
    "negative": (lambda a: _with(a, 0, 3, -2.0), r"1 negative value \(first: -2 at cell 'c0', gene 'g3'\)"),
    "nan": (lambda a: _with(a, 4, 0, np.nan), r"1 NaN or infinite value .*cell 'c4', gene 'g0'"),
    "inf": (lambda a: _with(a, 1, 1, np.inf), r"NaN or infinite"),
    "empty cells": (lambda a: _with(_with(a, 3, slice(None), 0), 5, slice(None), 0),
                    r"2 of 6 cells have no counts in adata.X \(e.g. 'c3', 'c5'\).*filter_cells"),
    "empty genes": (lambda a: _with(a, slice(None), 2, 0), r"1 of 4 genes have no counts .*'g2'.*filter_genes"),
}


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("case", sorted(BAD_COUNTS))
def test_bad_counts_raise_a_clear_error_and_change_nothing(case, sparse):
    make_bad, message = BAD_COUNTS[case]
    adata = make_bad(_counts())
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    snap = _snapshot(adata)
    with pytest.raises(InvalidDataError, match=message):
        pyrovae.fit(adata, "zinb", max_epochs=1, progress=False)
    _assert_unchanged(adata, snap)


def test_log_normalised_data_suggests_the_gaussian_likelihood(sim):
    lognorm = continuous_version(sim, "real")
    with pytest.raises(InvalidDataError, match="non-integer.*likelihood='gaussian'"):
        pyrovae.fit(lognorm, "nb", max_epochs=1, progress=False)


def test_missing_layer_names_the_available_ones():
    adata = _counts()
    adata.layers["spliced"] = adata.X.copy()
    with pytest.raises(InvalidDataError, match=r"adata.layers\['counts'\] not found.*\['spliced'\]"):
        pyrovae.fit(adata, layer="counts", max_epochs=1, progress=False)
    assert "X_pyrovae" not in adata.obsm


def test_empty_anndata():
    with pytest.raises(InvalidDataError, match=r"empty \(0 cells x 4 genes\)"):
        read_data(_counts()[:0].copy())


def test_x_none_asks_for_a_layer():
    adata = ad.AnnData(obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=["g"]))
    with pytest.raises(InvalidDataError, match="adata.X is None"):
        read_data(adata)


def test_not_an_anndata():
    with pytest.raises(TypeError, match="expected an AnnData"):
        read_data(np.ones((3, 3)))


def test_continuous_bernoulli_needs_unit_interval(sim):
    with pytest.raises(InvalidDataError, match="outside \\[0, 1\\].*scaled to \\[0, 1\\]"):
        pyrovae.fit(sim.copy(), "continuous_bernoulli", max_epochs=1, progress=False)


def test_gaussian_rejects_nan(sim):
    lognorm = continuous_version(sim, "real")
    lognorm.X[0, 0] = np.nan
    with pytest.raises(InvalidDataError, match="NaN"):
        pyrovae.fit(lognorm, "gaussian", max_epochs=1, progress=False)


FORMATS = {
    "dense float32": lambda X: X.astype(np.float32),
    "dense float64": lambda X: X.astype(np.float64),
    "dense float16": lambda X: X.astype(np.float16),
    "dense int32": lambda X: X.astype(np.int32),
    "dense int64": lambda X: X.astype(np.int64),
    "dense uint16": lambda X: X.astype(np.uint16),
    "csr float32": lambda X: sp.csr_matrix(X.astype(np.float32)),
    "csr int64": lambda X: sp.csr_matrix(X.astype(np.int64)),
    "csc float64": lambda X: sp.csc_matrix(X),
    "csr_array int32": lambda X: sp.csr_array(X.astype(np.int32)),
    "csc_array float32": lambda X: sp.csc_array(X.astype(np.float32)),
}


def test_every_common_matrix_format_gives_the_same_model(sim):
    reference = None
    dense = np.minimum(sim.X.toarray(), 2000)  # float16 holds integers exactly up to 2048
    for name, convert in FORMATS.items():
        adata = ad.AnnData(X=convert(dense), obs=sim.obs[[]].copy(), var=sim.var[[]].copy())
        before = adata.X.copy()
        latent = pyrovae.fit(adata, "nb", max_epochs=2, progress=False, seed=3).get_latent(adata)
        after = adata.X
        assert type(after) is type(before) and after.dtype == before.dtype, name
        diff = after - before
        assert (abs(diff).sum() if sp.issparse(diff) else np.abs(diff).sum()) == 0, name
        if reference is None:
            reference = latent
        np.testing.assert_array_equal(latent, reference, err_msg=name)


def test_layer_is_read_instead_of_x(sim):
    adata = continuous_version(sim, "real")
    adata.layers["counts"] = sim.X.copy()
    model = pyrovae.fit(adata, "nb", layer="counts", max_epochs=1, progress=False)
    assert model.layer == "counts"
    assert model.settings()["layer"] == "counts"


def test_check_genes_messages():
    genes = ["a", "b", "c"]
    check_genes(genes, genes)
    with pytest.raises(InvalidDataError, match="another order.*adata\\[:, model.var_names\\]"):
        check_genes(["b", "a", "c"], genes)
    with pytest.raises(InvalidDataError, match="trained on 3 genes; this AnnData has 2; 1 of the model's genes are missing \\(e.g. 'c'\\)"):
        check_genes(["a", "b"], genes)
    with pytest.raises(InvalidDataError, match="1 genes are not the model's \\(e.g. 'x'\\); subset it"):
        check_genes(["a", "b", "c", "x"], genes)


def test_minibatches_stay_sparse_until_the_batch(sim):
    data = read_data(sim)
    assert sp.issparse(data.X)
    assert data.X is sim.X or data.X.dtype == np.float32
    batch = data.batch(np.array([0, 5, 7]))
    np.testing.assert_array_equal(batch.numpy(), sim.X[[0, 5, 7]].toarray())
