"""Differential expression: the statistics on arrays, the choice of groups, planted genes
found in simulated data, and the volcano plot."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import pyrovae
from pyrovae.data import InvalidDataError
from pyrovae.de import change_statistics, log_fold_changes, select_groups


def test_change_statistics_by_hand():
    lfc = np.array([[0.1, 1.0], [0.3, 2.0], [-0.5, 3.0], [0.2, 2.0]])
    table = change_statistics(lfc, delta=0.25)
    np.testing.assert_allclose(table["lfc_mean"], [0.025, 2.0])
    np.testing.assert_allclose(table["lfc_median"], [0.15, 2.0])
    np.testing.assert_allclose(table["proba_de"], [0.5, 1.0])
    # p = 0.5 is even odds; p = 1 is capped by eps = 1e-8
    np.testing.assert_allclose(table["bayes_factor"], [0.0, np.log(1 + 1e-8) - np.log(1e-8)])
    with pytest.raises(ValueError, match="delta"):
        change_statistics(lfc, delta=-1)


def heterogeneous_groups(seed=0, n=200):
    """Gene 0 is 4x higher in group 1 in every cell; gene 1 varies 100-fold between the
    cells of a group, with the same spread of values in both groups; gene 2 is constant."""
    spread = 0.01 * np.exp(np.random.default_rng(seed).normal(0.0, 2.3, n))

    def group(fold):
        cells = np.stack([np.full(n, 0.01 * fold), spread, np.full(n, 0.01)], axis=1)
        return np.broadcast_to(cells, (5, n, 3)).copy()  # 5 identical posterior draws

    return group(4.0), group(1.0)


def test_groups_mode_averages_out_cells_and_cells_mode_does_not():
    first, second = heterogeneous_groups()
    groups = change_statistics(log_fold_changes(first, second, mode="groups", pseudocount=0, seed=1))
    cells = change_statistics(log_fold_changes(first, second, mode="cells", pseudocount=0, seed=1))
    # gene 0: log2(4) = 2 in both modes, with evidence; gene 2: no change in either
    for table in (groups, cells):
        assert table["lfc_mean"][0] == pytest.approx(2.0, abs=1e-4)
        assert table["proba_de"][0] == 1.0 and table["proba_de"][2] == 0.0
    # gene 1: the groups do not differ; random pairs of cells do
    assert abs(groups["lfc_mean"][1]) < 0.1 and cells["proba_de"][1] > 0.9
    assert groups["proba_de"][1] < cells["proba_de"][1] - 0.3
    assert groups["lfc_std"][1] < 0.2 * cells["lfc_std"][1]


def test_log_fold_changes_shapes_and_errors():
    first, second = heterogeneous_groups(n=7)
    assert log_fold_changes(first, second[:, :3], n_comparisons=11).shape == (55, 3)
    with pytest.raises(ValueError, match="same number of draws and genes"):
        log_fold_changes(first, second[:2])
    with pytest.raises(ValueError, match="mode"):
        log_fold_changes(first, second, mode="pairs")
    with pytest.raises(ValueError, match="need cells"):
        log_fold_changes(first, second[:, :0])


@pytest.fixture(scope="module")
def obs():
    return pd.DataFrame({
        "cell_type": pd.Categorical(["T", "T", "B", "NK", "B", None],
                                    categories=["T", "B", "NK", "unused"]),
        "number": [1, 1, 2, 2, 3, 3],
    })


def test_select_groups(obs):
    np.testing.assert_array_equal(select_groups(obs, "cell_type", "T", "B")[0], [0, 1])
    first, rest = select_groups(obs, "cell_type", "B")  # the rest: every other labelled cell
    np.testing.assert_array_equal(first, [2, 4])
    np.testing.assert_array_equal(rest, [0, 1, 3])
    first, second = select_groups(obs, "cell_type", ["T", "NK"], ["B"])
    np.testing.assert_array_equal(first, [0, 1, 3])
    np.testing.assert_array_equal(select_groups(obs, "number", 1, "3")[1], [4, 5])


@pytest.mark.parametrize(("args", "error", "message"), [
    (("cluster", "T"), InvalidDataError, r"adata.obs\['cluster'\] not found.*cell_type"),
    (("cell_type", "Mono"), InvalidDataError, r"group1 \['Mono'\] not found.*'NK'"),
    (("cell_type", "T", ["B", "DC"]), InvalidDataError, r"group2 \['DC'\] not found"),
    (("cell_type", "unused", "T"), InvalidDataError, r"group1 \['unused'\].*has no cells"),
    (("cell_type", ["T", "B", "NK"]), InvalidDataError, r"group2 \(all other cells\).*has no cells"),
    (("cell_type", "T", ["T", "B"]), ValueError, r"share the values \['T'\]"),
])
def test_select_groups_errors(obs, args, error, message):
    with pytest.raises(error, match=message):
        select_groups(obs, *args)


@pytest.fixture(scope="module")
def planted():
    """Conditions A and B with 10 of 100 genes changed 4.5-fold (log 1.5) in B; the true
    latent space (5 dimensions) leaves the model's 10 room to hold the condition."""
    adata = pyrovae.datasets.simulate(800, 100, 4, likelihood="nb", n_latent=5, n_de_genes=10,
                                      de_log_fold_change=1.5, seed=0)
    model = pyrovae.fit(adata, likelihood="nb", max_epochs=60, lr=3e-3, progress=False, seed=0)
    return adata, model


def test_differential_expression_finds_planted_genes(planted):
    adata, model = planted
    before = adata.copy()
    table = model.differential_expression(adata, "condition", "B", "A")
    truth = adata.var.loc[table.index, "de"].to_numpy()
    assert roc_auc_score(truth, table["bayes_factor"]) >= 0.9
    assert truth[:10].mean() >= 0.8  # the ten with the most evidence are mostly the planted
    # the direction and size: log2 of a 4.5-fold change is 2.16
    true_lfc = adata.var.loc[table.index, "true_log_fold_change"].to_numpy() / np.log(2)
    assert (np.sign(table["lfc_mean"].to_numpy()[truth]) == np.sign(true_lfc[truth])).all()
    assert np.median(np.abs(table["lfc_mean"].to_numpy()[truth])) > 1.0
    # sorted by evidence, one row per gene, what the groups were, adata untouched
    assert (np.diff(table["bayes_factor"].to_numpy()) <= 0).all()
    assert table.index.name == "gene" and sorted(table.index) == sorted(adata.var_names)
    assert table.attrs["n_cells1"] + table.attrs["n_cells2"] == adata.n_obs
    assert {"expression1", "expression2", "nonzero1", "nonzero2", "expected_fdr"} <= set(table.columns)
    assert list(adata.obs.columns) == list(before.obs.columns) and adata.uns.keys() == before.uns.keys()
    assert (adata.X != before.X).nnz == 0


def test_differential_expression_errors_and_options(planted):
    adata, model = planted
    with pytest.raises(InvalidDataError, match=r"adata.obs\['treatment'\] not found"):
        model.differential_expression(adata, "treatment", "B")
    with pytest.raises(InvalidDataError, match=r"group1 \['C'\] not found"):
        model.differential_expression(adata, "condition", "C")
    with pytest.raises(ValueError, match="transform_batch needs a model trained with a batch_key"):
        model.differential_expression(adata, "condition", "B", transform_batch="b0")
    cells = model.differential_expression(adata, "cluster", "0", mode="cells", n_comparisons=20,
                                          max_cells=50, seed=3)
    assert cells.attrs["mode"] == "cells" and cells.attrs["group2"] == "rest" and len(cells) == 100
    gaussian = pyrovae.VAE(adata.var_names, likelihood="gaussian")
    with pytest.raises(ValueError, match="does not model counts"):
        gaussian.differential_expression(adata, "condition", "B")


def test_batch_corrected_differential_expression(quick):
    adata = pyrovae.datasets.simulate(200, 30, 2, likelihood="nb", n_batches=2, n_de_genes=3, seed=2)
    model = pyrovae.fit(adata, likelihood="nb", batch_key="batch", **quick)
    own = model.differential_expression(adata, "condition", "B", n_samples=2)
    corrected = model.differential_expression(adata, "condition", "B", n_samples=2,
                                              transform_batch="b0")
    assert corrected.attrs["transform_batch"] == "b0"
    assert not np.allclose(own.loc[adata.var_names, "expression1"],
                           corrected.loc[adata.var_names, "expression1"])


def test_volcano(planted, tmp_path):
    adata, model = planted
    table = model.differential_expression(adata, "condition", "B", "A", n_samples=3)
    ax = pyrovae.plotting.volcano(table, n_labels=5, path=tmp_path / "volcano.png").axes[0]
    points = sum(len(c.get_offsets()) for c in ax.collections)
    assert points == len(table)
    called = ((table["bayes_factor"] > 3) & (table["lfc_mean"].abs() > 0.25)).sum()
    assert called >= 5
    labels = [t.get_text() for t in ax.texts]
    assert labels == list(table.index[:5])
    assert (tmp_path / "volcano.png").stat().st_size > 0
    with pytest.raises(KeyError, match="lfc_mean"):
        pyrovae.plotting.volcano(table.drop(columns="lfc_mean"))
    plt.close("all")
