"""A fuzzed input suite (hypothesis): every AnnData either fits, with finite outputs that
save and load, or is refused with a pyrovae error; the user's AnnData is never changed
apart from the documented output keys."""

import re
import warnings
from collections import Counter

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pyrovae  # noqa: E402
from pyrovae.data import InvalidDataError  # noqa: E402

MAX_EXAMPLES = 500
OUTCOMES: Counter = Counter()
REASONS: Counter = Counter()
DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "bool"]
DAMAGE = ["none", "none", "none", "nan", "inf", "negative", "fraction", "empty_cell",
          "empty_gene", "duplicate_cells", "duplicate_genes", "huge"]
COVARIATE = ["none", "none", "categorical", "categorical_missing", "numeric", "numeric_missing",
             "constant"]
OUTPUT_OBSM, OUTPUT_OBS = {"X_pyrovae", "pyrovae_cluster_probs"}, {"pyrovae_cluster"}


@st.composite
def inputs(draw):
    n_cells = draw(st.integers(1, 24))
    n_genes = draw(st.integers(1, 10))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["dense", "csr", "csc"]))
    damage = draw(st.sampled_from(DAMAGE))
    covariate = draw(st.sampled_from(COVARIATE))
    where = draw(st.sampled_from(["X", "layer", "view"]))
    seed = draw(st.integers(0, 2 ** 16))
    return dict(n_cells=n_cells, n_genes=n_genes, dtype=dtype, layout=layout, damage=damage,
                covariate=covariate, where=where, seed=seed)


def build(case) -> tuple[ad.AnnData, dict]:
    rng = np.random.default_rng(case["seed"])
    n, g = case["n_cells"], case["n_genes"]
    X = rng.poisson(rng.gamma(2.0, 2.0, size=(n, g))).astype(np.float64)
    X[:, 0] += 1  # every cell has a count unless damaged
    i, j = rng.integers(n), rng.integers(g)
    damage, dtype = case["damage"], np.dtype(case["dtype"])
    if damage == "nan":
        X[i, j] = np.nan
    elif damage == "inf":
        X[i, j] = np.inf
    elif damage == "negative":
        X[i, j] = -1
    elif damage == "fraction":
        X[i, j] += 0.5
    elif damage == "empty_cell":
        X[i] = 0
    elif damage == "empty_gene":
        X[:, j] = 0
    elif damage == "huge":
        X[i, j] = 1e39
    with np.errstate(invalid="ignore", over="ignore"):
        X = X.astype(dtype)  # a cast may itself damage (NaN to int, -1 to uint, 0.5 to bool)
    if case["layout"] != "dense" and dtype != np.float16:  # scipy.sparse has no float16
        X = getattr(sp, f"{case['layout']}_matrix")(X)
    obs = pd.DataFrame(index=[f"c{k}" for k in range(n)])
    var = pd.DataFrame(index=[f"g{k}" for k in range(g)])
    if damage == "duplicate_cells" and n > 1:
        obs.index = ["c0"] * n
    if damage == "duplicate_genes" and g > 1:
        var.index = ["g0"] * g
    options = {}
    covariate = case["covariate"]
    if covariate.startswith("categorical"):
        values = pd.Series(rng.choice(["a", "b", "c"], n), index=obs.index, dtype="category")
        if covariate.endswith("missing"):
            values.iloc[i] = np.nan
        obs["batch"] = values.values
        options["batch_key"] = "batch"
    elif covariate.startswith("numeric"):
        values = rng.normal(size=n)
        if covariate.endswith("missing"):
            values[i] = np.nan
        obs["age"] = values
        options["continuous_covariate_keys"] = ["age"]
    elif covariate == "constant":
        obs["batch"] = pd.Categorical(["a"] * n)
        options["batch_key"] = "batch"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata on duplicate names
        if case["where"] == "layer":
            adata = ad.AnnData(np.ones((n, g), np.float32), obs=obs, var=var, layers={"counts": X})
            options["layer"] = "counts"
        else:
            adata = ad.AnnData(X, obs=obs, var=var)
        if case["where"] == "view" and n > 2:
            adata = adata[: n - 1]
    return adata, options


def snapshot(adata: ad.AnnData) -> dict:
    def dense(M):
        return np.array(M.toarray() if sp.issparse(M) else M, copy=True)

    return {"X": dense(adata.X), "layers": {k: dense(v) for k, v in adata.layers.items()},
            "obs": adata.obs.copy(), "var": adata.var.copy(), "obsm": set(adata.obsm.keys()),
            "uns": set(adata.uns.keys()), "dtype": adata.X.dtype, "shape": adata.shape}


def assert_unchanged(before: dict, adata: ad.AnnData, fitted: bool) -> None:
    after = snapshot(adata)
    np.testing.assert_array_equal(after["X"], before["X"])
    assert after["dtype"] == before["dtype"] and after["shape"] == before["shape"]
    for key, value in before["layers"].items():
        np.testing.assert_array_equal(after["layers"][key], value)
    pd.testing.assert_frame_equal(after["var"], before["var"])
    pd.testing.assert_frame_equal(after["obs"].drop(columns=list(OUTPUT_OBS & set(after["obs"])),),
                                  before["obs"])
    added = (after["obsm"] - before["obsm"]) | (after["uns"] - before["uns"])
    assert added <= (OUTPUT_OBSM | {"pyrovae"} if fitted else set()), added


@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(inputs())
def test_every_input_fits_or_is_refused_by_name(tmp_path_factory, case):
    adata, options = build(case)
    before = snapshot(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = pyrovae.fit(adata, "nb", max_epochs=1, batch_size=8, n_hidden=8, n_latent=2,
                                kl_warmup_epochs=1, progress=False, **options)
        except (InvalidDataError, ValueError) as err:
            assert str(err).strip(), f"an empty message for {case}"
            OUTCOMES["refused"] += 1
            REASONS[re.sub(r"\d+", "N", str(err).split("(")[0])[:70]] += 1
            assert_unchanged(before, adata, fitted=False)
            return
        latent = np.asarray(adata.obsm["X_pyrovae"])
        assert latent.shape == (adata.n_obs, 2) and np.isfinite(latent).all(), case
        again = model.get_latent(adata)
        assert np.isfinite(again).all()
        path = tmp_path_factory.mktemp("fuzz") / "model.pt"
        model.save(path)
        np.testing.assert_array_equal(pyrovae.load(path, adata).get_latent(adata), again)
        if "batch_key" in options:  # a category the model never saw is a named error
            unseen = adata.copy()
            unseen.obs["batch"] = pd.Categorical(["z"] * unseen.n_obs)
            with pytest.raises(ValueError, match="z"):
                model.get_latent(unseen)
    OUTCOMES["fitted"] += 1
    assert_unchanged(before, adata, fitted=True)


def test_zz_the_fuzz_suite_tried_both_outcomes():
    """Run after the fuzzed test (pytest keeps file order): both kinds of input occurred."""
    if not OUTCOMES:
        pytest.skip("the fuzzed test did not run in this session")
    print(f"\nfuzz: {sum(OUTCOMES.values())} inputs, {OUTCOMES['fitted']} fitted, "
          f"{OUTCOMES['refused']} refused")
    for reason, count in REASONS.most_common():
        print(f"  {count:4d}  {reason}")
    assert OUTCOMES["fitted"] > 20 and OUTCOMES["refused"] > 20, OUTCOMES
