"""Three ways to handle a mixture's cluster y, on the same data and network.

    python benchmarks/mixtures.py [--data pbmc68k bladder] [--seeds 0] [--threads 2]
                                  [--max-epochs N]

For each data set (``benchmarks/data.py``): 10 % of the cells are held out (permutation by
``numpy.random.default_rng(0)``); on the rest a ZINB VAE with a Gaussian-mixture prior of
K = number of annotated cell types is fitted with ``pyrovae.fit`` defaults (``--max-epochs``
caps the epochs of every contender, the pre-training of ``min(50, max_epochs // 2)`` epochs
included), ``y`` handled by

* ``enumerate``: exact sum over K (``TraceEnum_ELBO``, parallel enumeration),
* ``gumbel``: Gumbel-Softmax relaxation (temperature 1 -> 0.5), ``Trace_ELBO``,
* ``marginal``: ``y`` summed out of the prior (``MixtureSameFamily``), ``q(y|x)`` by Bayes,

and, as the baseline, a standard-normal VAE with KMeans (K clusters) on its latent means.
Every mixture starts from the same standard-normal pre-training (the KL warm-up), whose
latent means place the components by KMeans.

Reported per contender: the ELBO per held-out cell (``model.elbo``: the discrete mixture,
y summed exactly; the Gumbel model is scored as the discrete model it relaxes), ARI and
NMI of ``argmax q(y|x)`` against the cell types on all cells (for the baseline, of KMeans),
seconds per epoch of the mixture stage (median), and the Monte Carlo variance of the
encoder's gradient: the training loss of one fixed minibatch of 128 cells is
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
from pyrovae.data import read_data  # noqa: E402

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


def run(name: str, adata, seed: int, max_epochs: int | None = None) -> list[dict]:
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    K = len(np.unique(labels))
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    n_test = adata.n_obs // 10
    train, test = adata[np.sort(perm[n_test:])].copy(), adata[np.sort(perm[:n_test])].copy()
    rows = []
    for mode in ["normal + KMeans"] + MODES:
        fitted = train.copy()
        start = time.perf_counter()
        if mode == "normal + KMeans":
            model = pyrovae.fit(fitted, "zinb", seed=seed, max_epochs=max_epochs, progress=False)
            found = pyrovae.metrics.kmeans_scores(model.get_latent(adata), labels, seed=seed)
            clusters = None
        else:
            model = pyrovae.fit(fitted, "zinb", prior="gmm", n_clusters=K, mixture=mode,
                                seed=seed, max_epochs=max_epochs, progress=False)
            clusters = model.get_clusters(adata)
        seconds = time.perf_counter() - start
        history = model.history
        stage = history.iloc[int(fitted.uns["pyrovae"]["settings"]["pretrain_epochs"]):]
        row = {
            "data": name, "seed": seed, "contender": mode,
            "held_out_elbo": float(model.elbo(test, n_samples=20)["elbo"].mean()),
            "ari": adjusted_rand_score(labels, clusters) if clusters is not None else found["ari"],
            "nmi": normalized_mutual_info_score(labels, clusters) if clusters is not None else found["nmi"],
            "epochs": int(history["epoch"].iloc[-1]),
            "s_per_epoch": float(stage["seconds"].median()),
            "grad_rel_var": gradient_variance(model, train, seed=seed) if mode in MODES else np.nan,
            "fit_s": seconds,
        }
        rows.append(row)
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["pbmc68k", "bladder"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="cap on the epochs of every fit (default: pyrovae.fit's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.data:
        adata = datasets.load(name)
        if adata is None:
            continue
        for seed in args.seeds:
            rows += run(name, adata, seed, args.max_epochs)
    table = pd.DataFrame(rows)
    summary = table.groupby(["data", "contender"], sort=False).agg(
        held_out_elbo=("held_out_elbo", "mean"), ari=("ari", "mean"), ari_min=("ari", "min"),
        ari_max=("ari", "max"), nmi=("nmi", "mean"),
        s_per_epoch=("s_per_epoch", "median"), grad_rel_var=("grad_rel_var", "mean"),
        epochs=("epochs", "mean"),
    )
    with pd.option_context("display.width", 200, "display.max_columns", None,
                           "display.float_format", "{:.3f}".format):
        print()
        print(summary)


if __name__ == "__main__":
    main()
