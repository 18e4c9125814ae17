"""Three ways to handle a mixture's cluster y, on the same data and network, for several K;
and (``--auto``) the mixture with K chosen from the data against the scanpy workflow.

    python benchmarks/mixtures.py [--data pbmc68k bladder] [--seeds 0] [--threads 2]
                                  [--n-clusters K ...] [--init leiden] [--max-epochs N]
                                  [--modes enumerate ...] [--iwae N]
    python benchmarks/mixtures.py --auto [--modes enumerate gumbel marginal] [--seeds 0 1 2]
                                  [--scvi PYTHON] [--gmm KEY=VALUE ...]
                                  [--pretrain-epochs N ...]

``--auto``: on the same held-out split, a standard-normal ZINB VAE (``pyrovae.fit``
defaults), then scanpy's workflow on its latent means of all cells
(``sc.pp.neighbors(use_rep="X_pyrovae")``, ``sc.tl.leiden`` at resolutions 0.5, 1.0 and 2.0,
igraph flavour, 2 iterations), against ``pyrovae.fit(prior=GaussianMixture(mode=...,
k_rule=...))`` with no ``n_clusters``, for each rule of ``--rules`` (K from the pre-trained
latent means by :func:`pyrovae.priors.merged_leiden`, plain Leiden at 1.0, or
:func:`pyrovae.priors.stable_leiden`; empty components pruned),
scored by ``argmax q(y|x)`` on all cells. Per contender: K, ARI, NMI, the held-out ELBO,
and the median seconds per epoch (of the mixture stage for the mixtures), all in one run.
Labels only score; nothing is chosen with them. ``--scvi PYTHON`` (a Python with
scvi-tools) adds scvi-tools' ``SCVI`` with its defaults, trained on the same training
cells by ``benchmarks/mixtures_scvi.py`` in a subprocess, with the same neighbours and
Leiden on its latent means (rows ``scvi + Leiden r``; its seconds per epoch are its
training time over its epochs); skipped with a message when not given or failing.
``--gmm KEY=VALUE`` passes options to every mixture's ``GaussianMixture`` (e.g.
``free_nats_y=1.0``, ``scale_floor=0.2``, ``merge_threshold=0.5``; values read as Python
literals), and the contender's name lists them. ``--pretrain-epochs N ...`` trains each
mixture once per N with ``pyrovae.fit(pretrain_epochs=N)`` (the standard-normal epochs
before the mixture starts; default: ``fit``'s, 35, 70 % of the KL warm-up), named
``pretrain=N``.

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
mixture, y summed exactly; the Gumbel model is scored as the discrete model it relaxes;
with ``--iwae N`` also the held-out log-likelihood per cell, ``model.marginal_log_likelihood``
with N importance samples, the criterion of a sweep over K),
ARI and NMI of ``argmax q(y|x)`` against the cell types on all cells (for the baseline, of
KMeans), ``K_used``: how many of the K components are some cell's ``argmax q(y|x)`` (a
component no cell uses is what pruning removes; ``--n-clusters 30`` asks whether an
over-complete mixture empties components by itself), seconds per epoch of the mixture
stage (median), and the Monte Carlo variance of the encoder's gradient: the training loss
of one fixed minibatch of 128 cells is differentiated 64 times with fresh random draws (dropout and batch norm in evaluation mode,
so only the estimator's own randomness varies), and the summed per-parameter variance is
reported relative to the squared norm of the mean gradient.
"""

from __future__ import annotations

import argparse
import itertools
import ast
import sys
import tempfile
import time
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyrovae  # noqa: E402
from benchmarks import data as datasets  # noqa: E402
from benchmarks.scvi_env import run_script  # noqa: E402
from benchmarks.tables import markdown  # noqa: E402
from pyrovae._threads import torch_threads_kept  # noqa: E402
from pyrovae.data import read_data  # noqa: E402
from pyrovae.priors import GaussianMixture, KRule  # noqa: E402

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


def _split(adata, label_key: str):
    """The labels, and the same 90 % / 10 % train / test split of the cells for every run."""
    labels = adata.obs[label_key].astype(str).to_numpy()
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    n_test = adata.n_obs // 10
    return labels, adata[np.sort(perm[n_test:])].copy(), adata[np.sort(perm[:n_test])].copy()


def _reporter(rows: list[dict], digits: int = 4):
    """A function that keeps a result row and prints it at once (floats to ``digits``
    significant digits)."""
    def report(row: dict) -> None:
        rows.append(row)
        print(", ".join(f"{k}={v:.{digits}g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()), flush=True)
    return report


def run(name: str, adata, seed: int, n_clusters: list[int] | None = None,
        init: str | None = None, max_epochs: int | None = None,
        label_key: str = "cell_type", options: dict | None = None,
        modes: list[str] | None = None, iwae: int | None = None) -> list[dict]:
    labels, train, test = _split(adata, label_key)
    rows: list[dict] = []
    report = _reporter(rows)

    def common(model, fitted, seconds: float) -> dict:
        history = model.history
        stage = history.iloc[int(fitted.uns["pyrovae"]["settings"]["pretrain_epochs"]):]
        scores = {"held_out_elbo": float(model.elbo(test, n_samples=20)["elbo"].mean())}
        if iwae:
            scores["held_out_log_lik"] = float(model.marginal_log_likelihood(test, n_samples=iwae).mean())
        return {
            **scores,
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
        for mode in modes or MODES:
            fitted = train.copy()
            given = {**(options or {}), **({} if init is None else {"init": init})}
            start = time.perf_counter()
            model = pyrovae.fit(fitted, "zinb", prior=GaussianMixture(K, mode=mode, **given),
                                seed=seed, max_epochs=max_epochs, progress=False)
            seconds = time.perf_counter() - start
            clusters = model.get_clusters(adata)
            report({"data": name, "seed": seed, "K": K, "contender": mode,
                    **common(model, fitted, seconds),
                    "ari": adjusted_rand_score(labels, clusters),
                    "nmi": normalized_mutual_info_score(labels, clusters),
                    "K_used": int(len(np.unique(clusters))),
                    "grad_rel_var": gradient_variance(model, train, seed=seed)})
    return rows


LEIDEN_RESOLUTIONS = (0.5, 1.0, 2.0)


K_RULES = list(get_args(KRule))  # the default rule first


def gmm_options(pairs: list[str] | None) -> dict:
    """``["free_nats_y=1.0", "scale_floor=None"]`` as ``GaussianMixture`` keyword arguments."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--gmm takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # a string, e.g. init=kmeans
    return options


def scvi_latent(python: str, adata, train_names, seed: int, threads: int):
    """scvi-tools SCVI (defaults) trained on ``train_names`` by ``mixtures_scvi.py``: the
    latent means of all cells of ``adata`` and the script's timing, or ``(None, None)``."""
    with tempfile.TemporaryDirectory() as folder:
        path, out = Path(folder) / "data.h5ad", Path(folder) / "latent.npy"
        data = adata.copy()
        data.obs["split"] = np.where(data.obs_names.isin(train_names), "train", "test")
        data.write_h5ad(path)
        info = run_script(python, "mixtures_scvi.py", path, out, seed, threads, name="scvi-tools SCVI")
        if info is None:
            return None, None
        return np.load(out), info


def run_auto(name: str, adata, seed: int, modes: list[str], max_epochs: int | None = None,
             label_key: str = "cell_type", rules: list[str] | None = None,
             scvi: str | None = None, options: dict | None = None,
             threads: int = 1, pretrain: list[int] | None = None) -> list[dict]:
    """The scanpy workflow (standard VAE + Leiden; scvi-tools SCVI + Leiden with ``scvi``)
    against the automatic-K mixture (``GaussianMixture(**options)``)."""
    import scanpy as sc

    labels, train, test = _split(adata, label_key)
    rows: list[dict] = []
    report = _reporter(rows)
    options = dict(options or {})
    suffix = "".join(f" {k}={v}" for k, v in options.items())

    def scores(clusters) -> dict:
        return {"K": int(len(np.unique(clusters))), "ari": adjusted_rand_score(labels, clusters),
                "nmi": normalized_mutual_info_score(labels, clusters)}

    def leiden(latent, contender: str, **row) -> None:
        light = adata.copy()
        light.obsm["X_pyrovae"] = latent
        with torch_threads_kept():  # else every later fit in this process runs on all cores
            sc.pp.neighbors(light, use_rep="X_pyrovae", random_state=seed)
        for resolution in LEIDEN_RESOLUTIONS:
            sc.tl.leiden(light, resolution=resolution, flavor="igraph", n_iterations=2,
                         directed=False, random_state=seed, key_added="leiden")
            report({"data": name, "seed": seed, "contender": f"{contender} + Leiden {resolution}",
                    **scores(light.obs["leiden"].to_numpy()), **row, "resolution": resolution})

    fitted = train.copy()
    normal = pyrovae.fit(fitted, "zinb", seed=seed, max_epochs=max_epochs, progress=False)
    normal_s = float(normal.history["seconds"].median())
    leiden(normal.get_latent(adata), "normal",
           held_out_elbo=float(normal.elbo(test, n_samples=20)["elbo"].mean()),
           s_per_epoch=normal_s, ratio_s_per_epoch=1.0,
           epochs=int(normal.history["epoch"].iloc[-1]))
    if scvi:
        latent, info = scvi_latent(scvi, adata, train.obs_names, seed, threads)
        if latent is not None:
            leiden(latent, "scvi", held_out_elbo=info["held_out_elbo"],
                   s_per_epoch=info["s_per_epoch"], ratio_s_per_epoch=info["s_per_epoch"] / normal_s,
                   epochs=info["epochs"])
    for rule, mode, epochs in itertools.product(rules or K_RULES[:1], modes, pretrain or [None]):
        fitted = train.copy()
        prior = GaussianMixture(mode=mode, **{"k_rule": rule, **options})
        model = pyrovae.fit(fitted, "zinb", prior=prior, seed=seed, max_epochs=max_epochs,
                            pretrain_epochs=epochs, progress=False)
        pretrained = int(fitted.uns["pyrovae"]["settings"]["pretrain_epochs"])
        seconds = float(model.history.iloc[pretrained:]["seconds"].median())
        found = fitted.uns["pyrovae"]["clusters"]
        pruned = found.get("pruned_weights", [])
        contender = f"gmm auto-K {rule} {mode}{suffix}" + ("" if epochs is None else f" pretrain={epochs}")
        report({"data": name, "seed": seed, "contender": contender,
                **scores(model.get_clusters(adata)),
                "held_out_elbo": float(model.elbo(test, n_samples=20)["elbo"].mean()),
                "s_per_epoch": seconds, "ratio_s_per_epoch": seconds / normal_s,
                "resolution": found.get("resolution", np.nan),
                "K_start": found["n_clusters"] + len(pruned),
                "K_leiden": found.get("n_clusters_leiden", np.nan), "n_pruned": len(pruned),
                "epochs": int(model.history["epoch"].iloc[-1]), "pretrain_epochs": pretrained})
    return rows


def summarize_auto(table: pd.DataFrame) -> pd.DataFrame:
    """Means over seeds per data set and contender."""
    return table.groupby(["data", "contender"], sort=False).agg(
        K=("K", "mean"), ari=("ari", "mean"), ari_min=("ari", "min"), ari_max=("ari", "max"),
        nmi=("nmi", "mean"), held_out_elbo=("held_out_elbo", "mean"),
        s_per_epoch=("s_per_epoch", "median"), ratio_s_per_epoch=("ratio_s_per_epoch", "median"),
        seeds=("seed", "nunique"),
    )


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Means over seeds (ARI range too; seconds per epoch as the median) per data, K, contender."""
    likelihood = {"held_out_log_lik": ("held_out_log_lik", "mean")} if "held_out_log_lik" in table else {}
    return table.groupby(["data", "K", "contender"], sort=False).agg(
        held_out_elbo=("held_out_elbo", "mean"), **likelihood, ari=("ari", "mean"),
        ari_min=("ari", "min"), ari_max=("ari", "max"), nmi=("nmi", "mean"),
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
    parser.add_argument("--auto", action="store_true",
                        help="the automatic-K mixture against standard VAE + Leiden")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES,
                        help="the mixture modes to train")
    parser.add_argument("--iwae", type=int, default=None, metavar="N",
                        help="without --auto: also the held-out log-likelihood per cell "
                             "(model.marginal_log_likelihood, N importance samples), for a "
                             "sweep over --n-clusters")
    parser.add_argument("--rules", nargs="+", choices=K_RULES, default=K_RULES[:1],
                        help="the rules for K of --auto (GaussianMixture(k_rule=...); default: "
                             "the prior's default, merged_leiden)")
    parser.add_argument("--scvi", default=None, metavar="PYTHON",
                        help="a Python with scvi-tools 1.4: adds SCVI + Leiden to --auto "
                             "(benchmarks/mixtures_scvi.py); skipped when not given or failing")
    parser.add_argument("--gmm", nargs="+", default=None, metavar="KEY=VALUE",
                        help="GaussianMixture options of --auto's mixtures, e.g. free_nats_y=1.0 "
                             "scale_floor=0.2 (values read as Python literals)")
    parser.add_argument("--pretrain-epochs", type=int, nargs="+", default=None, metavar="N",
                        help="--auto: train each mixture once per N with "
                             "pyrovae.fit(pretrain_epochs=N) (default: fit's)")
    args = parser.parse_args(argv)
    if args.pretrain_epochs and not args.auto:
        parser.error("--pretrain-epochs is for --auto")
    if args.iwae and args.auto:
        parser.error("--iwae scores the fixed-K sweep; --auto does not use it")
    options = gmm_options(args.gmm)
    auto = args.auto or (args.summarize and "resolution" in pd.read_csv(args.summarize[0]).columns)
    if args.summarize:
        table = pd.concat([pd.read_csv(path) for path in args.summarize], ignore_index=True)
    else:
        torch.set_num_threads(args.threads)
        rows = []
        for name, adata in datasets.present(args.data):
            for seed in args.seeds:
                if auto:
                    rows += run_auto(name, adata, seed, args.modes, args.max_epochs, args.label_key,
                                     args.rules, args.scvi, options, args.threads,
                                     args.pretrain_epochs)
                else:
                    rows += run(name, adata, seed, args.n_clusters, args.init, args.max_epochs,
                                args.label_key, options, args.modes, args.iwae)
        table = pd.DataFrame(rows)
        if args.csv:
            table.to_csv(args.csv, index=False)
    if auto:
        if args.markdown:
            columns = [c for c in ["data", "seed", "contender", "K", "ari", "nmi", "held_out_elbo",
                                   "s_per_epoch", "ratio_s_per_epoch", "K_leiden", "K_start",
                                   "n_pruned", "epochs"] if c in table.columns]
            print(markdown(table[columns], digits=3))
            print()
            print(markdown(summarize_auto(table).reset_index(), digits=3))
        else:
            with pd.option_context("display.width", 200, "display.max_columns", None,
                                   "display.float_format", "{:.3f}".format):
                print(summarize_auto(table))
        return table
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
