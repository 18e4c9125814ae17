"""Downstream analysis: batch correction, differential expression and imputation.

    python benchmarks/downstream.py --threads 1 [--epochs N] [--seeds 0 1 2]
                                    [--only batch de imputation] [--json out.json]

Batch correction
    Simulated ZINB counts (2,000 cells x 500 genes, 5 cell types) in 2 batches, every
    gene's mean in batch b1 multiplied by exp(N(0, s^2)), s = ``--batch-effects``; a model
    fitted without and with ``batch_key="batch"``. Scores of the latent means: scVI's
    batch-mixing entropy (50 neighbours; log 2 = 0.693 is perfect mixing), silhouette by
    batch (0: batches not apart) and by cell type, and the ARI of KMeans (5 clusters)
    against the cell types.
Differential expression
    Simulated counts with 50 of 500 genes changed by a factor e (log2 fold change +-1.44)
    in condition B; condition B against A with ``model.differential_expression``, both
    modes. The AUC of the Bayes factor and of ``|lfc_mean|`` for planted against other
    genes, and how many planted genes are among the 50 with the most evidence. Three
    settings: the true latent space has 5 dimensions (the model's 10 have room for the
    condition), 10 dimensions (it fills the model's latent space), and 10 with the
    condition given to the model as a categorical covariate.
Imputation
    scVI's benchmark (:func:`pyrovae.imputation.imputation_benchmark`): 10 % of the
    non-zero counts hidden; median (and mean) absolute error at the hidden entries of the
    model (ZINB), the gene mean and a 15-nearest-neighbour average (50 PCs), and the
    correlation of log1p(prediction) with log1p(truth), on
    ``pbmc68k()`` and the bladder data (2,000 HVGs; skipped with a note when the file is
    absent), over ``--seeds`` (each a different mask and fit seed).

Every fit uses pyrovae's defaults (ZINB, 128 hidden, latent 10, early stopping on a 10 %
validation split, at most ``min(400, 8e6 / cells)`` epochs) unless ``--epochs`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyrovae  # noqa: E402
from benchmarks import data  # noqa: E402
from benchmarks.tables import markdown  # noqa: E402
from pyrovae import metrics  # noqa: E402
from pyrovae.imputation import imputation_benchmark  # noqa: E402

SIZE = dict(n_cells=2000, n_genes=500, n_clusters=5, likelihood="zinb")


def fitted(adata, epochs: int | None, **options):
    start = time.perf_counter()
    model = pyrovae.fit(adata, "zinb", max_epochs=epochs, progress=False, **options)
    return model, time.perf_counter() - start, int(model.history["epoch"].iloc[-1])


def batch_correction(epochs: int | None, batch_effects: list[float]) -> pd.DataFrame:
    rows = []
    for effect in batch_effects:
        adata = pyrovae.datasets.simulate(**SIZE, n_batches=2, batch_effect=effect, seed=0)
        for key in (None, "batch"):
            model, seconds, trained = fitted(adata, epochs, batch_key=key)
            latent = adata.obsm["X_pyrovae"]
            rows.append({
                "batch effect sd": effect, "batch_key": str(key),
                "mixing entropy": metrics.batch_mixing_entropy(latent, adata.obs["batch"]),
                "silhouette by batch": metrics.silhouette(latent, adata.obs["batch"]),
                "silhouette by type": metrics.silhouette(latent, adata.obs["cluster"]),
                "KMeans ARI": metrics.kmeans_scores(latent, adata.obs["cluster"])["ari"],
                "epochs": trained, "fit s": seconds,
            })
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


DE_SETTINGS = {
    "true latent 5-d": dict(simulate={"n_latent": 5}, fit={}),
    "true latent 10-d": dict(simulate={"n_latent": 10}, fit={}),
    "true latent 10-d, condition as covariate": dict(
        simulate={"n_latent": 10}, fit={"categorical_covariate_keys": ["condition"]}),
}


def differential_expression(epochs: int | None) -> pd.DataFrame:
    rows = []
    for name, setting in DE_SETTINGS.items():
        adata = pyrovae.datasets.simulate(**SIZE, n_de_genes=50, de_log_fold_change=1.0, seed=0,
                                          **setting["simulate"])
        model, seconds, trained = fitted(adata, epochs, **setting["fit"])
        for mode in ("groups", "cells"):
            start = time.perf_counter()
            table = model.differential_expression(adata, "condition", "B", "A", mode=mode)
            truth = adata.var.loc[table.index, "de"].to_numpy()
            rows.append({
                "setting": name, "mode": mode,
                "AUC Bayes factor": roc_auc_score(truth, table["bayes_factor"]),
                "AUC abs(lfc_mean)": roc_auc_score(truth, table["lfc_mean"].abs()),
                "planted in top 50": int(truth[:50].sum()),
                "epochs": trained, "fit s": seconds, "DE s": time.perf_counter() - start,
            })
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def imputation(epochs: int | None, seeds: list[int]) -> pd.DataFrame:
    rows = []
    for name, adata in data.present(["pbmc68k", "bladder"]):
        for seed in seeds:
            start = time.perf_counter()
            result = imputation_benchmark(adata, fraction=0.1, seed=seed, likelihood="zinb",
                                          max_epochs=epochs, progress=False)
            seconds = time.perf_counter() - start
            for method, row in result.summary.iterrows():
                rows.append({
                    "data": f"{name} ({adata.n_obs} x {adata.n_vars})", "seed": seed,
                    "method": method, "median abs error": row["median_abs_error"],
                    "mean abs error": row["mean_abs_error"],
                    "log1p correlation": row["log_correlation"], "hidden entries": int(row["n_hidden"]),
                    "epochs": int(result.model.history["epoch"].iloc[-1]), "seconds": seconds,
                })
                print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def over_seeds(table: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over seeds of the imputation errors, one row per data set and method."""
    def mean_sd(values: pd.Series) -> str:
        return f"{values.mean():.3f} ± {values.std(ddof=0):.3f}"

    columns = ["median abs error", "mean abs error", "log1p correlation"]
    out = table.groupby(["data", "method"], sort=False)[columns]
    out = out.agg(mean_sd).reset_index()
    out.insert(2, "seeds", len(table["seed"].unique()))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--epochs", type=int, default=None,
                        help="max epochs of every fit (default: pyrovae's rule, early stopping)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="imputation seeds")
    parser.add_argument("--batch-effects", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--only", nargs="+", choices=["batch", "de", "imputation"],
                        default=["batch", "de", "imputation"])
    parser.add_argument("--json", type=Path, help="also write the tables here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"pyrovae {pyrovae.__version__}, torch {torch.__version__}, {args.threads} thread(s), "
          f"epochs: {args.epochs or 'default rule with early stopping'}", flush=True)

    start = time.perf_counter()
    tables = {}
    if "batch" in args.only:
        tables["batch correction"] = batch_correction(args.epochs, args.batch_effects)
    if "de" in args.only:
        tables["differential expression"] = differential_expression(args.epochs)
    if "imputation" in args.only:
        tables["imputation"] = imputation(args.epochs, args.seeds)
        if len(tables["imputation"]):
            tables["imputation, mean ± sd over seeds"] = over_seeds(tables["imputation"])
    for name, table in tables.items():
        print(f"\n## {name}\n\n{markdown(table)}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({k: v.to_dict(orient="records") for k, v in tables.items()}, indent=1))


if __name__ == "__main__":
    main()
