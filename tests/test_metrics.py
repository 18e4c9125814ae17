"""Latent-space metrics: against scikit-learn where it has the metric, by hand where not."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

import pyrovae
from pyrovae import metrics


def blobs(n_per_blob: int, centres: np.ndarray, *, spread: float = 1.0, seed: int = 0):
    """Points in tight, far-apart blobs: ``(latent, blob of each point)``."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), n_per_blob)
    return centres[labels] + spread * rng.uniform(-0.5, 0.5, (len(labels), centres.shape[1])), labels


LABEL_PAIRS = {
    "identical": ([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2]),
    "renamed": ([0, 0, 1, 1, 2, 2], ["b", "b", "c", "c", "a", "a"]),
    "one moved": ([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]),
    "all in one": ([0, 0, 1, 1, 2, 2], [5, 5, 5, 5, 5, 5]),
    "split": (["x", "x", "x", "x", "y", "y"], [0, 1, 0, 1, 2, 2]),
}


@pytest.mark.parametrize("name", LABEL_PAIRS)
def test_cluster_scores_agree_with_scikit_learn(name):
    truth, found = LABEL_PAIRS[name]
    scores = metrics.cluster_scores(truth, found)
    assert scores == {
        "ari": pytest.approx(adjusted_rand_score(truth, found)),
        "nmi": pytest.approx(normalized_mutual_info_score(truth, found)),
    }
    if name in ("identical", "renamed"):
        assert scores == {"ari": 1.0, "nmi": 1.0}


def test_cluster_scores_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        metrics.cluster_scores([0, 1, 1], [0, 1])


def test_kmeans_leiden_and_silhouette_on_separated_blobs():
    centres = np.array([[0.0, 0, 0], [20, 0, 0], [0, 20, 0], [0, 0, 20]])
    latent, labels = blobs(40, centres)
    assert metrics.kmeans_scores(latent, labels) == {"ari": 1.0, "nmi": 1.0}
    leiden = metrics.leiden_scores(latent, labels, resolution=0.5)
    assert leiden == {"ari": 1.0, "nmi": 1.0, "n_clusters": 4}
    assert metrics.silhouette(latent, labels) == pytest.approx(silhouette_score(latent, labels))
    assert metrics.silhouette(latent, labels) > 0.9


def test_leiden_scores_match_their_own_clusters():
    """The scores are those of the clusters Leiden found, whatever they are."""
    latent, labels = blobs(60, np.array([[0.0, 0], [3, 0]]), spread=4.0)
    a = metrics.leiden_scores(latent, labels, resolution=2.0, n_neighbors=10, seed=3)
    b = metrics.leiden_scores(latent, labels, resolution=2.0, n_neighbors=10, seed=3)
    assert a == b and a["n_clusters"] > 2
    assert 0 <= a["nmi"] <= 1 and -1 <= a["ari"] < 1


def test_latent_activity_by_hand():
    means = np.array([[0.0, 1.0, 0.1], [2.0, 1.0, 0.0], [4.0, 1.0, -0.1]])
    # column 0: deviations -2, 0, 2 -> 8/3; column 1 constant; column 2: 0.02 / 3
    activity = metrics.latent_activity(means)
    np.testing.assert_allclose(activity, [8 / 3, 0.0, 0.02 / 3], atol=1e-15)
    assert metrics.n_active(activity) == 1
    assert metrics.n_active(activity, threshold=0.001) == 2
    assert metrics.n_active(activity, threshold=3.0) == 0
    with pytest.raises(ValueError, match="cells >= 2"):
        metrics.latent_activity(np.zeros(5))


def two_batch_blobs(mixed: bool, *, n_blobs: int = 8, k: int = 9):
    """Blobs of exactly ``k + 1`` cells, far apart, so each cell's ``k`` neighbours are the
    rest of its blob. Mixed: each blob holds 5 cells of batch "a" and 5 of batch "b".
    Separated: each blob holds one batch."""
    centres = 100.0 * np.arange(n_blobs)[:, None] * np.ones((1, 2))
    latent, blob = blobs(k + 1, centres)
    if mixed:
        batches = np.where(np.arange(len(latent)) % 2 == 0, "a", "b")
    else:
        batches = np.where(blob % 2 == 0, "a", "b")
    return latent, batches


def test_batch_mixing_entropy_mixed_and_separated():
    # mixed: a cell's 9 neighbours are 4 of its batch and 5 of the other, for every cell
    expected = -(4 / 9 * np.log(4 / 9) + 5 / 9 * np.log(5 / 9))
    latent, batches = two_batch_blobs(mixed=True)
    mixed = metrics.batch_mixing_entropy(latent, batches, n_neighbors=9)
    assert mixed == pytest.approx(expected, abs=1e-12)
    assert mixed == pytest.approx(np.log(2), abs=0.01)
    latent, batches = two_batch_blobs(mixed=False)
    assert metrics.batch_mixing_entropy(latent, batches, n_neighbors=9) == 0.0


def test_batch_mixing_entropy_details():
    # three batches, equal thirds in each blob of 10: neighbours 3/3/3 (or 2/4/3 ...)
    centres = np.array([[0.0, 0], [100, 0], [0, 100]])
    latent, blob = blobs(9, centres)
    batches = np.tile(["a", "b", "c"], 9)
    # each blob of 9 has 3 of each batch; a cell's 8 neighbours: 2 of its own, 3 + 3 others
    expected = -(2 / 8 * np.log(2 / 8) + 2 * 3 / 8 * np.log(3 / 8))
    assert metrics.batch_mixing_entropy(latent, batches, n_neighbors=8) == pytest.approx(expected)
    # cells sitting on the same point: each leaves itself out, keeps the other two
    triplets = np.repeat(np.arange(5.0)[:, None] * 100, 3, axis=0)
    cells = np.arange(15)
    found = metrics._neighbours(triplets, cells, 2)
    for cell, neighbours in zip(cells, found):
        assert set(neighbours) == set(range(3 * (cell // 3), 3 * (cell // 3) + 3)) - {cell}
    with pytest.raises(ValueError, match="2 cells have no batch"):
        metrics.batch_mixing_entropy(np.arange(4.0)[:, None], ["a", None, "b", np.nan])
    # more neighbours than cells: all other cells
    assert metrics.batch_mixing_entropy(np.arange(4.0)[:, None], ["a", "b", "a", "b"],
                                        n_neighbors=50) == pytest.approx(
        -(1 / 3 * np.log(1 / 3) + 2 / 3 * np.log(2 / 3)))
    # random latent, two balanced batches: close to log 2, seeded
    rng = np.random.default_rng(0)
    noise, halves = rng.normal(size=(600, 5)), np.repeat(["a", "b"], 300)
    a = metrics.batch_mixing_entropy(noise, halves, seed=1)
    assert a == metrics.batch_mixing_entropy(noise, halves, seed=1)
    assert np.log(2) - 0.03 < a <= np.log(2)


def test_latent_metrics_reads_obs_and_writes_nothing(sim):
    adata = sim.copy()
    adata.obsm["X_pyrovae"] = adata.obsm["X_true_latent"]
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 2, "b1", "b2"))
    before = adata.copy()
    out = metrics.latent_metrics(adata, label_key="cluster", batch_key="batch")
    assert set(out) == {"n_active", "n_latent", "silhouette", "kmeans_ari", "kmeans_nmi",
                        "leiden_ari", "leiden_nmi", "leiden_n_clusters", "batch_entropy"}
    assert out["n_active"] == out["n_latent"] == 10
    assert out["kmeans_ari"] > 0.9 and out["silhouette"] > 0.2
    labels = adata.obs["cluster"]
    assert out["silhouette"] == pytest.approx(silhouette_score(adata.obsm["X_pyrovae"], labels))
    assert out["batch_entropy"] > 0.6  # the batches are assigned at random
    assert set(metrics.latent_metrics(adata)) == {"n_active", "n_latent"}
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    assert set(adata.obsm) == set(before.obsm) and set(adata.uns) == set(before.uns)
    assert set(adata.obsp) == set(before.obsp)


def test_latent_metrics_name_what_is_missing(sim):
    adata = sim.copy()
    with pytest.raises(KeyError, match=r"adata.obsm\['X_pyrovae'\] not found; available: \['X_true_latent'\]"):
        metrics.latent_metrics(adata)
    adata.obsm["X_pyrovae"] = adata.obsm["X_true_latent"]
    with pytest.raises(KeyError, match=r"adata.obs\['cell_type'\] not found; available columns: \['cluster', 'library'\]"):
        metrics.latent_metrics(adata, label_key="cell_type")
    with pytest.raises(KeyError, match=r"adata.obs\['batch'\]"):
        metrics.latent_metrics(adata, batch_key="batch")
    adata.obs["partial"] = pd.Series(["a"] * (adata.n_obs - 2) + [None, None], index=adata.obs_names)
    with pytest.raises(ValueError, match=r"adata.obs\['partial'\] has 2 missing values"):
        metrics.latent_metrics(adata, label_key="partial")


def test_plot_latent_activity(tmp_path):
    rng = np.random.default_rng(0)
    means = rng.normal(size=(200, 6)) * np.array([1.0, 0.5, 0.2, 0.05, 0.01, 0.0])
    fig = pyrovae.plotting.plot_latent_activity(means, path=tmp_path / "activity.png")
    assert (tmp_path / "activity.png").stat().st_size > 0
    left = fig.axes[0]
    assert left.get_title() == "3 of 6 dimensions active"
    assert any(line.get_ydata()[0] == 0.01 for line in left.get_lines())
    plt.close("all")
