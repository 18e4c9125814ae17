"""Which count likelihood fits the data best: Poisson, NB, ZIP and ZINB on held-out cells.

    python benchmarks/likelihoods.py [--data pbmc68k bladder] [--seeds 0] [--threads 1]
                                     [--epochs N] [--n-samples 100] [--plot PATH]

For each data set (``benchmarks/data.py``) and seed, one call of :func:`pyrovae.compare`
fits a VAE per likelihood with ``pyrovae.fit`` defaults (standard-normal prior, one hidden
layer of 128, latent 10, early stopping on a 10 % validation split; ``--epochs`` caps the
epochs) on the same training cells and scores all of them on the same held-out cells:
``compare``'s split, 10 % of the cells chosen by ``numpy.random.default_rng(seed)``, so
the split changes with the seed along with the initial weights.

Reported per likelihood, in nats per held-out cell (higher is better):

* ``marginal_ll``: the importance-weighted estimate of ``log p(x)`` (IWAE, Burda et al.
  2015) with ``--n-samples`` draws of ``q`` per cell; the figure to rank likelihoods by;
* ``gap``: ``marginal_ll`` minus the best ``marginal_ll`` of that data set and seed;
* ``elbo`` = ``reconstruction`` - ``kl`` (10 draws per cell);
* ``n_active``: active latent dimensions on the training cells;
* ``kmeans_ari``: ARI of KMeans (K = number of cell types) on the latent means of all
  cells against ``obs[--label-key]`` (when the data have that column);
* ``epochs`` and ``seconds`` of training (held-out scoring not included).

``compare`` has no posterior-predictive or calibration columns; for those see
:func:`pyrovae.posterior_predictive_check`. ``--plot PATH`` saves
:func:`pyrovae.compare.plot_comparison`'s figure, one file per data set and seed
(``PATH`` with ``_<data>_seed<seed>`` before its suffix).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyrovae  # noqa: E402
from benchmarks import data as datasets  # noqa: E402

LIKELIHOODS = ["poisson", "nb", "zip", "zinb"]
COLUMNS = ["data", "seed", "likelihood", "marginal_ll", "gap", "elbo", "reconstruction", "kl",
           "n_active", "kmeans_ari", "kmeans_nmi", "epochs", "seconds"]
FORMATS = {"marginal_ll": "{:.2f}", "gap": "{:.2f}", "elbo": "{:.2f}", "reconstruction": "{:.2f}",
           "kl": "{:.2f}", "kmeans_ari": "{:.3f}", "kmeans_nmi": "{:.3f}", "seconds": "{:.1f}"}


def run(name: str, adata, seed: int, *, likelihoods, epochs, n_samples, label_key, plot) -> pd.DataFrame:
    """One ``pyrovae.compare`` call; its table with ``data``, ``seed`` and ``gap`` added."""
    start = time.perf_counter()
    table = pyrovae.compare(
        adata, likelihoods=likelihoods, label_key=label_key if label_key in adata.obs else None,
        n_samples=n_samples, seed=seed, progress=False, max_epochs=epochs,
    )
    print(f"{name}, seed {seed}: {table.attrs['n_train']} training and {table.attrs['n_test']} "
          f"held-out cells, {adata.n_vars} genes; {time.perf_counter() - start:.0f} s in all",
          flush=True)
    table.insert(0, "data", name)
    table.insert(1, "seed", seed)
    table["gap"] = table["marginal_ll"] - table["marginal_ll"].max()
    if plot is not None:
        from pyrovae.compare import plot_comparison
        import matplotlib.pyplot as plt

        path = Path(plot)
        tag = name.replace(":", "-")
        path = path.with_name(f"{path.stem}_{tag}_seed{seed}{path.suffix or '.png'}")
        plt.close(plot_comparison(table, path=path))
        print(f"plot: {path}", flush=True)
    return table[[c for c in COLUMNS if c in table]]


def show(table: pd.DataFrame) -> None:
    formatters = {c: f.format for c, f in FORMATS.items() if c in table}
    print(table.to_string(index=False, formatters=formatters), flush=True)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["pbmc68k", "bladder"],
                        help="pbmc68k, bladder, simulated:<cells>[x<genes>]")
    parser.add_argument("--likelihoods", nargs="+", default=LIKELIHOODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None,
                        help="cap on the training epochs (default: pyrovae.fit's)")
    parser.add_argument("--n-samples", type=int, default=100,
                        help="importance samples per held-out cell for marginal_ll")
    parser.add_argument("--label-key", default="cell_type")
    parser.add_argument("--plot", default=None, help="save plot_comparison's figure here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tables = []
    for name, adata in datasets.present(args.data):
        for seed in args.seeds:
            table = run(name, adata, seed, likelihoods=args.likelihoods, epochs=args.epochs,
                        n_samples=args.n_samples, label_key=args.label_key, plot=args.plot)
            show(table)
            print(flush=True)
            tables.append(table)
    if not tables:
        return pd.DataFrame(columns=COLUMNS)
    table = pd.concat(tables, ignore_index=True)
    if len(args.seeds) > 1:
        aggregations = {"marginal_ll": "mean", "gap": "mean", "elbo": "mean", "seconds": "median"}
        if "kmeans_ari" in table:
            aggregations["kmeans_ari"] = "mean"
        order = {name: i for i, name in enumerate(table["data"].unique())}
        summary = (table.groupby(["data", "likelihood"], sort=False).agg(aggregations)
                   .reset_index().sort_values("marginal_ll", ascending=False)
                   .sort_values("data", key=lambda d: d.map(order), kind="stable"))
        print(f"mean over seeds {args.seeds} (seconds: median)")
        show(summary)
    return table


if __name__ == "__main__":
    main()
