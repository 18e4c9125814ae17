"""Held-out ELBO on pbmc68k: pyrovae's defaults, and scvi-tools' SCVI when installed.

    python benchmarks/pbmc68k_quality.py [--seeds 0 1 2] [--no-scvi] [--threads 1]

The split is the one the project's quality bar names: cells permuted with
``numpy.random.default_rng(0)``, the first 70 held out, the other 630 trained on. pyrovae
runs with its defaults (ZINB, one hidden layer of 128, latent 10, early stopping on a 10 %
validation split). SCVI runs with its defaults (ZINB, the same network, 400 epochs, batch
128, KL warm-up over 400 epochs, ``train_size=0.9``). Both report the ELBO per held-out
cell in nats (higher is better); pyrovae averages 50 posterior draws per cell, SCVI's
``get_elbo`` uses one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import pyrovae

N_HELD_OUT = 70


def split():
    adata = pyrovae.datasets.pbmc68k()
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    return adata[perm[N_HELD_OUT:]].copy(), adata[perm[:N_HELD_OUT]].copy()


def run_pyrovae(train, test, seed):
    start = time.perf_counter()
    model = pyrovae.fit(train, "zinb", seed=seed, progress=False)
    seconds = time.perf_counter() - start
    elbo = model.elbo(test, n_samples=50)
    return float(elbo["elbo"].mean()), int(model.history["epoch"].iloc[-1]), seconds


def run_scvi(train, test, seed):
    import scvi

    scvi.settings.seed = seed
    scvi.settings.verbosity = 0
    train, test = train.copy(), test.copy()
    scvi.model.SCVI.setup_anndata(train)
    model = scvi.model.SCVI(train)
    start = time.perf_counter()
    model.train(max_epochs=400, batch_size=128, enable_progress_bar=False)
    seconds = time.perf_counter() - start
    scvi.model.SCVI.setup_anndata(test)
    return float(model.get_elbo(test)), 400, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-scvi", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady on a shared machine; see benchmarks/README.md)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    contenders = {"pyrovae": run_pyrovae}
    if not args.no_scvi:
        try:
            import scvi  # noqa: F401

            contenders["scvi-tools SCVI"] = run_scvi
        except ImportError:
            print("scvi-tools is not installed: running pyrovae only (see benchmarks/README.md)")
    train, test = split()
    results = {name: [] for name in contenders}
    for seed in args.seeds:  # interleaved, so both see the same machine load
        for name, run in contenders.items():
            elbo, epochs, seconds = run(train, test, seed)
            results[name].append(elbo)
            print(f"seed {seed}  {name:16s} held-out ELBO {elbo:8.1f}  ({epochs} epochs, {seconds:.0f} s)", flush=True)
    print()
    print(f"{'model':16s} {'held-out ELBO per cell (mean ± sd over seeds)':>46s}")
    for name, values in results.items():
        print(f"{name:16s} {np.mean(values):38.1f} ± {np.std(values):.1f}")
    if len(results) == 2:
        diff = np.mean(results["pyrovae"]) - np.mean(results["scvi-tools SCVI"])
        print(f"pyrovae - SCVI: {diff:+.1f} nats per held-out cell")


if __name__ == "__main__":
    main()
