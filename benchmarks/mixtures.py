"""Three ways to handle a mixture's cluster y, on the same data and network, for several K.

    python benchmarks/mixtures.py [--data pbmc68k bladder] [--seeds 0] [--threads 2]
                                  [--n-clusters K ...] [--init leiden] [--max-epochs N]

For each data set (``benchmarks/data.py``): 10 % of the cells are held out (permutation by
``numpy.random.default_rng(0)``); on the rest, for each K of ``--n-clusters`` (default: the
number of annotated cell types), a ZINB VAE with a Gaussian-mixture prior of K components
is fitted with ``pyrovae.fit`` defaults (``--max-epochs`` caps the epochs of every
contender, the pre-training of ``min(50, max_epochs // 2)`` epochs included), ``y``
handled by

* ``enumerate``: exact sum over K (``TraceEnum_ELBO``, parallel enumeration),
* ``gumbel``: Gumbel-Softmax relaxation (temperature 1 -> 0.5), ``Trace_ELBO``,
* ``marginal``: ``y`` summed out of the prior (``MixtureSameFamily``), ``q(y|x)`` by Bayes,

and, as the baseline, a standard-normal VAE (one fit per seed) with KMeans (K clusters,
each K) on its latent means. Every mixture starts from the same standard-normal
pre-training (the KL warm-up), whose latent means place the K components by ``--init``
(the prior's default, Leiden, unless told ``kmeans``).

Reported per contender and K: the ELBO per held-out cell (``model.elbo``: the discrete
mixture, y summed exactly; the Gumbel model is scored as the discrete model it relaxes),
ARI and NMI of ``argmax q(y|x)`` against the cell types on all cells (for the baseline, of
KMeans), seconds per epoch of the mixture stage (median), and the Monte Carlo variance of
the encoder's gradient: the training loss of one fixed minibatch of 128 cells is
differentiated 64 times with fresh random draws (dropout and batch norm in evaluation mode,
so only the estimator's own randomness varies), and the summed per-parameter variance is
reported relative to the squared norm of the mean gradient.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyrovae  # noqa: E402
from benchmarks import data as datasets  # noqa: E402
from benchmarks.tables import markdown  # noqa: E402
from pyrovae.data import read_data  # noqa: E402
from pyrovae.priors import GaussianMixture  # noqa: E402

MODES = ["enumerate", "gumbel", "marginal"]


def gradient_variance(model: pyrovae.VAE, adata, n_replicates: int = 64, seed: int = 0) -> float:
    """Relative Monte Carlo variance of the encoder's gradient on one fixed minibatch."""
    module = model.module
    data = read_data(adata, layer=model.layer)
    index = np.sort(np.random.default_rng(seed).choice(data.n_obs, 128, replace=False))
    x = data.batch(index, model.device)
    args = (x, x.sum(-1, keepdim=True), None, None, None, torch.arange(len(x)), len(x))
    loss_fn = module.prior.elbo()(module.model, module.guide)
    params = [p for p in module.guide.encoder.parameters() if p.requires_grad]
    module.eval()
    grads = []
    for r in range(n_replicates):
        torch.manual_seed(seed + r)
        loss = loss_fn(*args) / len(x)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    grads = torch.stack(grads).double()
    return float(grads.var(0).sum() / grads.mean(0).pow(2).sum())


def run(name: str, adata, seed: int, n_clusters: list[int] | None = None,
        init: str | None = None, max_epochs: int | None = None,
        label_key: str = "cell_type") -> list[dict]:
    labels = adata.obs[label_key].astype(str).to_numpy()
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    n_test = adata.n_obs // 10
    train, test = adata[np.sort(perm[n_test:])].copy(), adata[np.sort(perm[:n_test])].copy()
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()), flush=True)

    def common(model, fitted, seconds: float) -> dict:
        history = model.history
        stage = history.iloc[int(fitted.uns["pyrovae"]["settings"]["pretrain_epochs"]):]
        return {
            "held_out_elbo": float(model.elbo(test, n_samples=20)["elbo"].mean()),
            "epochs": int(history["epoch"].iloc[-1]),
            "s_per_epoch": float(stage["seconds"].median()),
            "fit_s": seconds,
        }

    fitted = train.copy()
    start = time.perf_counter()
    normal = pyrovae.fit(fitted, "zinb", seed=seed, max_epochs=max_epochs, progress=False)
    normal_row = common(normal, fitted, time.perf_counter() - start)
    latent = normal.get_latent(adata)
    for K in n_clusters or [len(np.unique(labels))]:
        found = pyrovae.metrics.kmeans_scores(latent, labels, n_clusters=K, seed=seed)
        report({"data": name, "seed": seed, "K": K, "contender": "normal + KMeans", **normal_row,
                "ari": found["ari"], "nmi": found["nmi"], "grad_rel_var": np.nan})
        for mode in MODES:
            fitted = train.copy()
            options = {} if init is None else {"init": init}
            start = time.perf_counter()
            model = pyrovae.fit(fitted, "zinb", prior=GaussianMixture(K, mode=mode, **options),
                                seed=seed, max_epochs=max_epochs, progress=False)
            seconds = time.perf_counter() - start
            clusters = model.get_clusters(adata)
            report({"data": name, "seed": seed, "K": K, "contender": mode,
                    **common(model, fitted, seconds),
                    "ari": adjusted_rand_score(labels, clusters),
                    "nmi": normalized_mutual_info_score(labels, clusters),
                    "grad_rel_var": gradient_variance(model, train, seed=seed)})
    return rows


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Means over seeds (ARI range too; seconds per epoch as the median) per data, K, contender."""
    return table.groupby(["data", "K", "contender"], sort=False).agg(
        held_out_elbo=("held_out_elbo", "mean"), ari=("ari", "mean"), ari_min=("ari", "min"),
        ari_max=("ari", "max"), nmi=("nmi", "mean"),
        s_per_epoch=("s_per_epoch", "median"), grad_rel_var=("grad_rel_var", "mean"),
        epochs=("epochs", "mean"), seeds=("seed", "nunique"),
    )


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["pbmc68k", "bladder"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-clusters", type=int, nargs="+", default=None,
                        help="numbers of components K (default: the number of cell types)")
    parser.add_argument("--init", choices=["leiden", "kmeans", "random"], default=None,
                        help="where the components start (default: the prior's, Leiden)")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="cap on the epochs of every fit (default: pyrovae.fit's)")
    parser.add_argument("--csv", default=None, help="also write the per-seed rows here")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="CSV",
                        help="fit nothing: print the summary of rows written by earlier runs "
                             "(e.g. one process per seed)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the per-seed rows and the summary as GitHub tables")
    parser.add_argument("--label-key", default="cell_type", help="obs column of the known labels")
    args = parser.parse_args(argv)
    if args.summarize:
        table = pd.concat([pd.read_csv(path) for path in args.summarize], ignore_index=True)
    else:
        torch.set_num_threads(args.threads)
        rows = []
        for name, adata in datasets.present(args.data):
            for seed in args.seeds:
                rows += run(name, adata, seed, args.n_clusters, args.init, args.max_epochs,
                             args.label_key)
        table = pd.DataFrame(rows)
        if args.csv:
            table.to_csv(args.csv, index=False)
    if args.markdown:
        for name, rows in table.groupby("data", sort=False):
            rows = rows.sort_values(["K", "seed"], kind="stable").drop(columns="data")
            print(f"\n## {name}\n\n{markdown(rows, digits=4)}\n")
            print(markdown(summarize(rows.assign(data=name)).reset_index().drop(columns="data")))
        return table
    with pd.option_context("display.width", 200, "display.max_columns", None,
                           "display.float_format", "{:.3f}".format):
        print()
        print(summarize(table))
    return table


if __name__ == "__main__":
    main()
