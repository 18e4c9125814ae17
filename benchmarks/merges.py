"""Each merge of the automatic-K rule, looked at with label-free tests of "one group or two"
(issue 12).

    python benchmarks/merges.py [--data pbmc68k bladder] [--seeds 0 1 2] [--threads 1]
                                [--max-epochs N] [--csv FILE] [--markdown]

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
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyrovae  # noqa: E402
from benchmarks import data as datasets  # noqa: E402
from benchmarks.mixtures import _split  # noqa: E402
from benchmarks.tables import markdown  # noqa: E402
from pyrovae._threads import torch_threads_kept  # noqa: E402
from pyrovae.priors import (  # noqa: E402
    GaussianMixture,
    _cluster_connectivity,
    _leiden,
    knn_connectivities,
)


class _Started(Exception):
    """Raised with the latent means the mixture would start from."""


class _Capture(GaussianMixture):
    def initialize(self, latent: torch.Tensor, x: torch.Tensor) -> None:
        raise _Started(latent.detach().cpu().numpy().astype(np.float64))


def pretrained_latent(train, seed: int, max_epochs: int | None = None) -> np.ndarray:
    """The latent means of ``train`` where ``pyrovae.fit(prior="gmm")`` starts its mixture."""
    try:
        pyrovae.fit(train.copy(), "zinb", prior=_Capture(), seed=seed, max_epochs=max_epochs,
                    progress=False)
    except _Started as started:
        return started.args[0]
    raise RuntimeError("the fit never started its mixture")


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
           max_epochs: int | None = None, threshold: float = 0.3) -> list[dict]:
    import scanpy as sc

    _, train, _ = _split(adata, label_key)
    labels = train.obs[label_key].astype(str).to_numpy()
    points = pretrained_latent(train, seed, max_epochs)
    normalised = train.copy()
    with torch_threads_kept():  # numba kernels reset it too (pyrovae._threads)
        sc.pp.normalize_total(normalised, target_sum=1e4)
        sc.pp.log1p(normalised)
    graph = knn_connectivities(points, 15)
    clusters = _leiden(graph, 1.0, 0)
    rng = np.random.default_rng(seed)
    rows, step = [], 0
    while clusters.max() > 0:
        ratio = _cluster_connectivity(graph, clusters)
        i, j = np.unravel_index(ratio.argmax(), ratio.shape)
        merged = np.unique(np.where(clusters == j, i, clusters), return_inverse=True)[1]
        a, b = clusters == i, clusters == j
        step += 1
        rows.append({"data": name, "seed": seed, "step": step, "merged": bool(ratio[i, j] >= threshold),
                     "K_before": int(clusters.max()) + 1, "connectivity": float(ratio[i, j]),
                     "size_a": int(a.sum()), "size_b": int(b.sum()),
                     "sigclust_p": sigclust(points[a | b], rng), "dip_p": dip(points, a, b),
                     "n_de": n_de(normalised, a, b),
                     "delta_ari": adjusted_rand_score(labels, merged) - adjusted_rand_score(labels, clusters)})
        print(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in rows[-1].items()), flush=True)
        if ratio[i, j] < threshold:  # the first pair the rule left apart
            break
        clusters = merged
    return rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["pbmc68k", "bladder"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label-key", default="cell_type", help="obs column of the known labels")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="the fit's max_epochs, of which the pre-training is min(50, half)")
    parser.add_argument("--csv", default=None, help="also write the rows here")
    parser.add_argument("--markdown", action="store_true", help="print the rows as a GitHub table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, adata in datasets.present(args.data):
        for seed in args.seeds:
            rows += replay(name, adata, seed, args.label_key, args.max_epochs)
    table = pd.DataFrame(rows)
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.markdown:
        print(markdown(table, digits=3))
    return table


if __name__ == "__main__":
    main()
