"""Each merge of the automatic-K rule, looked at with label-free tests of "one group or two"
(issue 12).

    python benchmarks/merges.py [--data pbmc68k bladder] [--seeds 0 1 2] [--threads 1]
                                [--max-epochs N] [--path] [--converged] [--csv FILE] [--markdown]
    python benchmarks/merges.py --simulated 3 5 8 [--seeds 0 1 2] [--max-epochs N]
    python benchmarks/merges.py --fixed-k 8 10 12 16 20 [--data ...] [--seeds 0 1 2]
    python benchmarks/merges.py --pretrain-epochs 25 30 35 40 45 50 [--data ...] [--seeds 0 1 2]

For each data set and seed: the standard-normal pre-training that ``pyrovae.fit(adata,
prior="gmm")`` runs before its mixture (the training cells of ``benchmarks/mixtures.py``'s
split, the same seed and defaults), stopped where the mixture would start, and its latent
means of the training cells, which :func:`pyrovae.priors.merged_leiden` clusters. The rule's
merges are then replayed one at a time (Leiden at 1.0, then the most connected pair while
its PAGA connectivity is >= 0.3), and the first pair it left apart is added. Per pair:

* ``connectivity``: the PAGA connectivity the rule merges on, and the two clusters' sizes;
* ``sigclust_p``: SigClust (Liu et al. 2008) on the two clusters' cells together: the
  2-means cluster index (within over total sum of squares) against 50 draws from a Gaussian
  with the union's covariance eigenvalues; small: the union is not one Gaussian;
* ``dip_p``: Hartigan's dip test of unimodality of the union projected on the two clusters'
  Fisher discriminant (only when the optional ``diptest`` package is installed);
* ``n_de``: genes with Wilcoxon adjusted p < 0.01 and |log2 fold change| > 1 between the two
  clusters, on counts normalised to 10,000 per cell and log1p (``sc.tl.rank_genes_groups``);
* ``delta_ari``: how much the merge changes the ARI of the partition against the annotated
  cell types. Labels only score here: the question is whether any of the label-free
  columns tells the merges that help from those that hurt.

``--path`` goes on merging the most connected pair past the threshold, down to two clusters
(or until no two clusters share an edge), and adds, for the partition after each merge, its
ARI and three label-free internal criteria on the latent means: the silhouette, the
Calinski-Harabasz index and the Davies-Bouldin index (``sklearn.metrics``), so that a rule
"stop where the criterion is best along the path" can be read against the labels. It then
prints, per seed and as means, the K and ARI where the rule stops and where each criterion
is best along the path (``path_choices``). ``--converged`` clusters the latent of a standard
VAE trained to early stopping (``pyrovae.fit(prior="normal")``, same seed and cells) instead
of the default pre-training (35 epochs, 70 % of the KL warm-up).

``--simulated K ...`` instead prints, for the simulated clusters of
``tests/test_clusters.py`` and each seed, the interval of merge thresholds for which the
rule stops at the true K on the latent the mixture starts from (``threshold_interval``);
``--max-epochs 60`` is the test's fit (30 epochs of pre-training), the default (35) what
``pyrovae.fit`` runs.

``--fixed-k K ...`` instead scores, on the latent a mixture with K given starts from (the
whole warm-up of pre-training), the partitions a mixture with
``n_clusters=K`` could start from (``fixed_k_starts``): ``leiden_labels`` (the package's,
which sub-clusters Leiden's clusters at resolution 1.0 when K is above their number), Leiden
on the whole graph at a resolution searched for K (``global``: the package's rule before),
and the automatic partition of ``merged_leiden`` sub-clustered or merged to K
(``automatic, refined``).

``--pretrain-epochs N ...`` instead scores, for each length N of the standard-normal
pre-training (``pyrovae.fit(pretrain_epochs=N)``, the KL warm-up of 50 epochs going on
through it), the partition the automatic K starts from (``pretrain_starts``): Leiden's K at
1.0, the rule's K, the connectivities merged, and the partition's ARI / NMI.

Results in ``../docs/mixtures.md``. 1 thread: pbmc68k about 10 s a seed, bladder about 1.5 min.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import (
    adjusted_rand_score,
    calinski_harabasz_score,
    davies_bouldin_score,
    silhouette_score,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyrovae  # noqa: E402
from benchmarks import data as datasets  # noqa: E402
from benchmarks.mixtures import _reporter, _split  # noqa: E402
from benchmarks.tables import markdown  # noqa: E402
from pyrovae._threads import torch_threads_kept  # noqa: E402
from pyrovae.priors import (  # noqa: E402
    GaussianMixture,
    _bisect,
    _joined,
    _leiden,
    _most_connected,
    _subclustered,
    knn_connectivities,
    leiden_labels,
    merged_leiden,
)


class _Started(Exception):
    """Raised with the latent means the mixture would start from."""


class _Capture(GaussianMixture):
    def initialize(self, latent: torch.Tensor, x: torch.Tensor) -> None:
        raise _Started(latent.detach().cpu().numpy().astype(np.float64))


def pretrained_latent(train, seed: int, max_epochs: int | None = None,
                      pretrain_epochs: int | None = None, n_clusters: int | None = None) -> np.ndarray:
    """The latent means of ``train`` where ``pyrovae.fit(prior="gmm")`` starts its mixture
    (``n_clusters``: of a mixture with K given, whose default pre-training is longer)."""
    try:
        pyrovae.fit(train.copy(), "zinb", prior=_Capture(n_clusters), seed=seed,
                    max_epochs=max_epochs, pretrain_epochs=pretrain_epochs, progress=False)
    except _Started as started:
        return started.args[0]
    raise RuntimeError("the fit never started its mixture")


def converged_latent(train, seed: int) -> np.ndarray:
    """The latent means of ``train`` under a standard VAE trained to early stopping."""
    fitted = train.copy()
    pyrovae.fit(fitted, "zinb", prior="normal", seed=seed, progress=False)
    return np.asarray(fitted.obsm["X_pyrovae"], dtype=np.float64)


def internal_criteria(points: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    """Label-free scores of a partition: silhouette and Calinski-Harabasz (higher: better
    separated), Davies-Bouldin (lower: better separated)."""
    return {"silhouette": float(silhouette_score(points, clusters)),
            "calinski_harabasz": float(calinski_harabasz_score(points, clusters)),
            "davies_bouldin": float(davies_bouldin_score(points, clusters))}


def cluster_index(points: np.ndarray) -> float:
    """Within-cluster over total sum of squares of 2-means."""
    fit = KMeans(2, n_init=3, random_state=0).fit(points)
    return float(fit.inertia_ / ((points - points.mean(0)) ** 2).sum())


def sigclust(points: np.ndarray, rng: np.random.Generator, n_null: int = 50) -> float:
    """SigClust's p-value: the share of Gaussian draws with the points' covariance
    eigenvalues whose 2-means cluster index is at most the points' own."""
    observed = cluster_index(points)
    scales = np.sqrt(np.clip(np.linalg.eigvalsh(np.cov(points.T)), 1e-12, None))
    null = [cluster_index(rng.normal(size=points.shape) * scales) for _ in range(n_null)]
    return float(np.mean(np.array(null) <= observed))


def dip(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """The dip test's p-value of ``points[a | b]`` on the Fisher discriminant of a and b."""
    try:
        import diptest
    except ImportError:
        return float("nan")
    pa, pb = points[a], points[b]
    within = np.cov(np.concatenate([pa - pa.mean(0), pb - pb.mean(0)]).T)
    direction = np.linalg.solve(within + 1e-6 * np.eye(points.shape[1]), pa.mean(0) - pb.mean(0))
    return float(diptest.diptest(points[a | b] @ direction)[1])


def n_de(normalised, a: np.ndarray, b: np.ndarray) -> int:
    """Genes with Wilcoxon adjusted p < 0.01 and |log2 fold change| > 1, a against b."""
    import scanpy as sc

    both = normalised[a | b].copy()
    both.obs["side"] = np.where(a[a | b], "a", "b")
    # scanpy's Wilcoxon test runs numba code that resets torch's thread count (pyrovae._threads),
    # which would change how the next seed's pre-training rounds its floats
    with warnings.catch_warnings(), torch_threads_kept():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(both, "side", groups=["a"], reference="b", method="wilcoxon")
    table = sc.get.rank_genes_groups_df(both, "a")
    return int(((table["pvals_adj"] < 0.01) & (table["logfoldchanges"].abs() > 1)).sum())


def replay(name: str, adata, seed: int, label_key: str = "cell_type",
           max_epochs: int | None = None, threshold: float = 0.3, *, path: bool = False,
           converged: bool = False) -> list[dict]:
    import scanpy as sc

    _, train, _ = _split(adata, label_key)
    labels = train.obs[label_key].astype(str).to_numpy()
    points = converged_latent(train, seed) if converged else pretrained_latent(train, seed, max_epochs)
    normalised = train.copy()
    with torch_threads_kept():  # numba kernels reset it too (pyrovae._threads)
        sc.pp.normalize_total(normalised, target_sum=1e4)
        sc.pp.log1p(normalised)
    graph = knn_connectivities(points, 15)
    clusters = _leiden(graph, 1.0, 0)
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    report = _reporter(rows, digits=3)
    step, stopped, ari = 0, False, adjusted_rand_score(labels, clusters)
    while clusters.max() > 0 and (pair := _most_connected(graph, clusters)) is not None:
        i, j, connectivity = pair
        merged = _joined(clusters, i, j)
        merged_ari = adjusted_rand_score(labels, merged)
        a, b = clusters == i, clusters == j
        step += 1
        stopped = stopped or not connectivity >= threshold  # the rule merges until the first miss
        row = {"data": name, "seed": seed, "step": step, "merged": not stopped,
               "K_before": int(clusters.max()) + 1, "connectivity": connectivity,
               "size_a": int(a.sum()), "size_b": int(b.sum()),
               "sigclust_p": sigclust(points[a | b], rng), "dip_p": dip(points, a, b),
               "n_de": n_de(normalised, a, b), "delta_ari": merged_ari - ari}
        if path:
            row["latent"] = "converged" if converged else "pre-training"
            row["ari"] = merged_ari
            if merged.max() > 0:
                row.update(internal_criteria(points, merged))
        report(row)
        if stopped and not path:  # the first pair the rule left apart
            break
        clusters, ari = merged, merged_ari
    return rows


def merged_down(graph, clusters: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    """``clusters`` with the most connected pair merged, one at a time, until ``k`` are left
    (or no two share an edge), and the connectivity of each merge: the rule's merge step
    without its threshold."""
    merges = []
    while clusters.max() + 1 > k and (pair := _most_connected(graph, clusters)) is not None:
        merges.append(pair[2])
        clusters = _joined(clusters, pair[0], pair[1])
    return clusters, merges


def threshold_interval(points: np.ndarray, k: int) -> dict:
    """The merge thresholds ``t`` for which :func:`pyrovae.priors.merged_leiden` on
    ``points`` stops at ``k`` clusters: ``(next, lowest]``, where ``lowest`` is the
    smallest connectivity among the merges from Leiden's partition down to ``k`` clusters
    (``inf`` when Leiden finds ``k`` itself) and ``next`` the connectivity of the pair it
    would merge after that. Empty (``next >= lowest``) or ``reached=False`` when no
    threshold gives ``k``."""
    graph = knn_connectivities(points, 15)
    clusters = _leiden(graph, 1.0, 0)
    first = int(clusters.max()) + 1
    clusters, merges = merged_down(graph, clusters, k)
    after = _most_connected(graph, clusters) if clusters.max() > 0 else None
    return {"K_leiden": first, "reached": bool(clusters.max() + 1 == k), "merges": merges,
            "next": after[2] if after else 0.0, "lowest": min(merges, default=float("inf"))}


def simulated_intervals(ks: list[int], seeds: list[int], max_epochs: int | None) -> pd.DataFrame:
    """``threshold_interval`` on the latent the mixture starts from, for the simulated
    clusters of ``tests/test_clusters.py`` (``simulate(100 k + 300, 200, k, separation=3)``,
    genes in >= 3 cells), each K and seed."""
    import scanpy as sc

    rows: list[dict] = []
    report = _reporter(rows, digits=3)
    for k in ks:
        adata = pyrovae.datasets.simulate(100 * k + 300, 200, k, likelihood="zinb", separation=3.0, seed=k)
        sc.pp.filter_genes(adata, min_cells=3)
        for seed in seeds:
            found = threshold_interval(pretrained_latent(adata, seed, max_epochs), k)
            report({"K": k, "seed": seed, "max_epochs": max_epochs, "K_leiden": found["K_leiden"],
                    "reached": found["reached"], "merges": " ".join(f"{c:.2f}" for c in found["merges"]),
                    "threshold_above": found["next"], "threshold_at_most": found["lowest"]})
    return pd.DataFrame(rows)


def fixed_k_starts(name: str, adata, seed: int, ks: list[int], label_key: str = "cell_type",
                   max_epochs: int | None = None) -> list[dict]:
    """ARI / NMI of the start partitions with K clusters (see the module's docstring) on the
    latent the mixture starts from, and the K each found (the two variants without the
    package's final adjustment to exactly K)."""
    from sklearn.metrics import normalized_mutual_info_score

    _, train, _ = _split(adata, label_key)
    labels = train.obs[label_key].astype(str).to_numpy()
    points = pretrained_latent(train, seed, max_epochs, n_clusters=max(ks))  # K given
    graph = knn_connectivities(points, 15)
    reference = int(_leiden(graph, 1.0, 0).max()) + 1
    automatic = merged_leiden(points)[0]
    rows: list[dict] = []
    report = _reporter(rows, digits=3)
    for k in ks:
        refined, _ = merged_down(graph, automatic, k)
        if refined.max() + 1 < k:
            refined = _bisect(lambda r: _subclustered(graph, automatic, r), k)
        starts = {"leiden_labels": leiden_labels(points, k),
                  "global": _bisect(lambda r: _leiden(graph, r, 0), k),
                  "automatic, refined": refined}
        for method, found in starts.items():
            report({"data": name, "seed": seed, "K": k, "K_leiden_1": reference,
                    "K_automatic": int(automatic.max()) + 1, "start": method,
                    "K_found": int(found.max()) + 1, "ari": adjusted_rand_score(labels, found),
                    "nmi": normalized_mutual_info_score(labels, found)})
    return rows


def pretrain_starts(name: str, adata, seed: int, lengths: list[int],
                    label_key: str = "cell_type") -> list[dict]:
    """The automatic K's start partition (:func:`merged_leiden`) after each length of
    pre-training, scored against the labels."""
    from sklearn.metrics import normalized_mutual_info_score

    _, train, _ = _split(adata, label_key)
    labels = train.obs[label_key].astype(str).to_numpy()
    rows: list[dict] = []
    report = _reporter(rows, digits=3)
    for epochs in lengths:
        found, search = merged_leiden(pretrained_latent(train, seed, pretrain_epochs=epochs))
        report({"data": name, "seed": seed, "pretrain_epochs": epochs,
                "K_leiden": search["n_clusters_leiden"], "K": int(found.max()) + 1,
                "ari": adjusted_rand_score(labels, found),
                "nmi": normalized_mutual_info_score(labels, found),
                "merges": " ".join(f"{c:.2f}" for c in search["merges"])})
    return rows


CRITERIA = {"silhouette": "max", "calinski_harabasz": "max", "davies_bouldin": "min"}


def path_choices(table: pd.DataFrame) -> pd.DataFrame:
    """Per data set, latent and seed: the K and ARI of the rule (the partition after its last
    merge) and of "the partition along the path where each internal criterion is best"
    (among the partitions after each merge, down to 2 clusters)."""
    rows = []
    for (name, latent, seed), steps in table.groupby(["data", "latent", "seed"], sort=False):
        steps = steps.dropna(subset=list(CRITERIA))
        merged = steps[steps["merged"]]
        rule = merged.iloc[-1] if len(merged) else None
        row = {"data": name, "latent": latent, "seed": seed,
               "rule_K": int(rule["K_before"]) - 1 if rule is not None else int(steps["K_before"].iloc[0]),
               "rule_ari": float(rule["ari"]) if rule is not None
               else float(steps["ari"].iloc[0] - steps["delta_ari"].iloc[0])}
        for criterion, best in CRITERIA.items():
            pick = steps.loc[steps[criterion].idxmax() if best == "max" else steps[criterion].idxmin()]
            row[f"{criterion}_K"], row[f"{criterion}_ari"] = int(pick["K_before"]) - 1, float(pick["ari"])
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["pbmc68k", "bladder"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label-key", default="cell_type", help="obs column of the known labels")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="the fit's max_epochs, of which the pre-training is min(35, half) "
                             "(--fixed-k: min(50, half), as for a given K)")
    parser.add_argument("--path", action="store_true",
                        help="merge past the threshold down to 2 clusters, with internal criteria")
    parser.add_argument("--converged", action="store_true",
                        help="cluster a standard VAE trained to early stopping, not the pre-training")
    parser.add_argument("--simulated", type=int, nargs="+", default=None, metavar="K",
                        help="instead: the thresholds that find K on the test's simulated clusters")
    parser.add_argument("--fixed-k", type=int, nargs="+", default=None, metavar="K",
                        help="instead: the start partitions of a mixture with n_clusters=K")
    parser.add_argument("--pretrain-epochs", type=int, nargs="+", default=None, metavar="N",
                        help="instead: the automatic K's start after N epochs of pre-training")
    parser.add_argument("--csv", default=None, help="also write the rows here")
    parser.add_argument("--markdown", action="store_true", help="print the rows as a GitHub table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.simulated:
        table = simulated_intervals(args.simulated, args.seeds, args.max_epochs)
    elif args.fixed_k:
        table = pd.DataFrame([row for name, adata in datasets.present(args.data)
                              for seed in args.seeds
                              for row in fixed_k_starts(name, adata, seed, args.fixed_k,
                                                        args.label_key, args.max_epochs)])
        means = table.groupby(["data", "K", "start"], sort=False)[["K_found", "ari", "nmi"]].mean()
        print("\nmean over seeds\n" + markdown(means.reset_index(), digits=3))
    elif args.pretrain_epochs:
        table = pd.DataFrame([row for name, adata in datasets.present(args.data)
                              for seed in args.seeds
                              for row in pretrain_starts(name, adata, seed, args.pretrain_epochs,
                                                         args.label_key)])
        means = table.groupby(["data", "pretrain_epochs"], sort=False).agg(
            K=("K", "mean"), K_min=("K", "min"), K_max=("K", "max"), ari=("ari", "mean"),
            ari_min=("ari", "min"), nmi=("nmi", "mean"), seeds=("seed", "nunique"))
        print("\nmean over seeds\n" + markdown(means.reset_index(), digits=3))
    else:
        rows = []
        for name, adata in datasets.present(args.data):
            for seed in args.seeds:
                rows += replay(name, adata, seed, args.label_key, args.max_epochs,
                               path=args.path, converged=args.converged)
        table = pd.DataFrame(rows)
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.markdown:
        print(markdown(table, digits=3))
    if args.path and not args.simulated:
        choices = path_choices(table)
        means = choices.groupby(["data", "latent"], sort=False).mean(numeric_only=True).reset_index()
        print("\nK and ARI where the rule stops and where each criterion is best along the path")
        print(markdown(pd.concat([choices, means.assign(seed="mean")]), digits=3))
    return table


if __name__ == "__main__":
    main()
