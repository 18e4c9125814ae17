"""Calibrators of pyrovae's label probabilities compared on the same fitted models.

    python benchmarks/calibration.py [--data bladder pbmc68k] [--seeds 0 1 2]
                                     [--max-epochs 200] [--threads 1] [--cache DIR]
                                     [--held-fraction 0.2] [--fit-options JSON]

For each data set and seed, pyrovae is fitted ONCE as ``benchmarks/labels.py``'s ``pyrovae``
contender is (10 % of the cells labelled, 20 % of those held out, the same draws and fit
options; the fit is saved in ``--cache`` and reused when its files are there), and each
calibrator below is applied to that one fit. ``--held-fraction`` holds out another share
of the labelled cells (the same generator), ``--fit-options`` passes more ``fit`` options
(JSON). Scored as in ``labels.py``: ECE (15 bins), accuracy, balanced accuracy and the mean
confidence (top probability) on the unlabelled cells; ``holdout_ece`` on the held-out
labelled cells (which the calibrators with a fitted ``T`` have seen). A second table gives
``q``'s accuracy and mean confidence on the labelled cells it was trained on.

* ``q``: ``q(y | x) = softmax(c(u))``, not calibrated.
* ``q, T by NLL``: temperature scaling by the held-out negative log-likelihood
  (``model.calibrate(method="nll")``, the default before).
* ``q, T by NLL, MAP log T ~ N(0, s^2)``: the same with a normal prior on ``log T``
  (shrinkage towards 1 when the hold-out is small).
* ``q, T by NLL on the training labelled cells``: biased (the classifier has seen them).
* ``q, T: confidence = accuracy``: the ``T`` at which the unlabelled cells' mean
  confidence equals the hold-out's accuracy, plain (``m / n``) or by Laplace's rule
  (``(m + 1) / (n + 2)``, ``model.calibrate()``'s default), or the hold-out's own mean
  confidence matched to its plain accuracy.
* ``r``: the mixture's own responsibilities at the posterior mean,
  ``p(y | z = E_q[z]) = softmax(log pi_k + log N(E_q[z]; mu_k, sigma_k))``, and ``q*``, the
  ``q(y)`` that maximises the unlabelled cell's ELBO for the fitted ``q(z | x)``,
  ``softmax(log pi_k + E_q[log N(z; mu_k, sigma_k)])``; no parameter is fitted.
* ``sqrt(q r)``: their geometric mean with ``q``, renormalised; ``q r``: the product.

The predictions of ``r``, ``q*`` and the combinations differ from ``q``'s, so their
accuracy is given too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import balanced_accuracy_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyrovae  # noqa: E402
from benchmarks import data as datasets  # noqa: E402
from benchmarks.tables import markdown  # noqa: E402
from pyrovae.labels import confidence_temperature  # noqa: E402
from pyrovae.metrics import expected_calibration_error  # noqa: E402


def split(n: int, seed: int, held_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``labels.py``'s draws: 10 % labelled, ``held_fraction`` of them held out."""
    rng = np.random.default_rng(seed)
    labelled = rng.random(n) < 0.1
    return labelled, labelled & (rng.random(n) < held_fraction)


def fitted_arrays(adata, name: str, seed: int, max_epochs: int, cache: Path,
                  held_fraction: float = 0.2, options: dict | None = None) -> dict:
    """Fit (or reuse) ``labels.py``'s ``pyrovae`` contender; its classifier logits,
    ``q(z | x)`` and mixture parameters as arrays."""
    options = options or {}
    tag = "" if held_fraction == 0.2 else f"_held{held_fraction}"
    tag += "".join(f"_{k}={v}" for k, v in sorted(options.items()))
    stem = cache / f"{name}_s{seed}_80{tag}"
    if not Path(f"{stem}.npz").exists():
        labelled, held = split(adata.n_obs, seed, held_fraction)
        train = adata.copy()
        values = adata.obs["cell_type"].astype(str).to_numpy().copy()
        values[~labelled | held] = "Unknown"
        train.obs["known"] = pd.Categorical(values)
        model = pyrovae.fit(train, labels_key="known", unlabeled_category="Unknown",
                            max_epochs=max_epochs, progress=False, seed=seed, **options)
        model.save(f"{stem}.pyrovae")
        prior = model.prior
        logits = model._map(train, lambda enc, x: prior.label_logits(enc, x), 1024)
        loc = model._map(train, lambda enc, x: enc.loc(enc.body(x)), 1024)
        scale = model._map(train, lambda enc, x: enc.to_scale(enc.scale(enc.body(x))), 1024)
        np.savez(f"{stem}.npz", logits=logits, loc=loc, scale=scale,
                 truth=adata.obs["cell_type"].astype(str).to_numpy(), labelled=labelled, held=held,
                 labels=np.array(prior.labels), locs=prior.locs.detach().numpy(),
                 scales=prior.scales.detach().numpy(),
                 weight_logits=prior.weight_logits.detach().numpy())
    return dict(np.load(f"{stem}.npz", allow_pickle=True))


def nll_temperature(logits, target, prior_sd=None) -> float:
    def loss(log_t):
        value = -log_softmax(logits / math.exp(log_t), 1)[np.arange(len(target)), target].sum()
        return value + (0.5 * (log_t / prior_sd) ** 2 if prior_sd else 0.0)

    return math.exp(minimize_scalar(loss, bounds=(-5, 5), method="bounded").x)


def expected_log_density(mean, var, locs, scales) -> np.ndarray:
    """``E_{N(mean, var)}[log N(z; locs_k, scales_k)]``, (cells, K)."""
    v = scales[None] ** 2
    return (-0.5 * np.log(2 * np.pi * v) - ((mean[:, None] - locs[None]) ** 2 + var[:, None]) / (2 * v)).sum(-1)


def calibrators(d: dict) -> dict[str, np.ndarray]:
    """Log-probabilities (cells, K) of every calibrator."""
    labels, truth = list(d["labels"]), d["truth"]
    logits = d["logits"].astype(np.float64)
    held, trained = d["held"], d["labelled"] & ~d["held"]
    known = np.isin(truth, labels)
    hk, tk, scored = held & known, trained & known, ~d["labelled"]
    code = lambda m: np.array([labels.index(x) for x in truth[m]])  # noqa: E731
    right = int((logits[held].argmax(1) == np.array([labels.index(x) if x in labels else -1
                                                     for x in truth[held]])).sum())
    n = int(held.sum())
    log_pi = log_softmax(d["weight_logits"])
    r = log_softmax(log_pi + expected_log_density(d["loc"], 0 * d["scale"], d["locs"], d["scales"]), 1)
    q_star = log_softmax(log_pi + expected_log_density(d["loc"], d["scale"] ** 2, d["locs"], d["scales"]), 1)
    q = log_softmax(logits, 1)
    out = {"q": q}

    def scaled(name, t):
        out[f"{name} (T = {t:.3f})"] = logits / t

    scaled("q, T by NLL", nll_temperature(logits[hk], code(hk)))
    for sd in (0.25, 0.5):
        scaled(f"q, T by NLL, MAP log T ~ N(0, {sd}^2)", nll_temperature(logits[hk], code(hk), sd))
    scaled("q, T by NLL on the training labelled cells", nll_temperature(logits[tk], code(tk)))
    match = lambda cells, acc: confidence_temperature(torch.as_tensor(logits[cells]), acc)  # noqa: E731
    scaled("q, T: confidence(unlabelled) = accuracy m / n", match(scored, right / n))
    scaled("q, T: confidence(unlabelled) = accuracy (m + 1) / (n + 2) [default]",
           match(scored, (right + 1) / (n + 2)))
    scaled("q, T: confidence(hold-out) = accuracy m / n", match(held, right / n))
    out["r = p(y | E z)"] = r
    out["q* = softmax(log pi + E_q log p(z | y))"] = q_star
    out["sqrt(q r)"] = (q + r) / 2
    out["sqrt(q q*)"] = (q + q_star) / 2
    out["q r"] = q + r
    return out


def scores(probs, labels, truth, cells) -> tuple[float, float, float, float]:
    """ECE, accuracy, balanced accuracy and mean confidence on ``cells``."""
    t, p = truth[cells], probs[cells]
    labels = list(labels)
    target = [labels.index(x) if x in labels else len(labels) for x in t]  # unseen: wrong
    ece = expected_calibration_error(np.concatenate([p, np.zeros((len(p), 1))], 1), target)
    pred = np.asarray(labels)[p.argmax(1)]
    return (ece, float((pred == t).mean()), float(balanced_accuracy_score(t, pred)),
            float(p.max(1).mean()))


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["bladder", "pbmc68k"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="calibration_fits", help="folder of the saved fits")
    parser.add_argument("--held-fraction", type=float, default=0.2,
                        help="share of the labelled cells held out from training")
    parser.add_argument("--fit-options", default="{}", help="JSON: more fit() options")
    args = parser.parse_args(argv)
    options = json.loads(args.fit_options)
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows, trained = [], []
    import warnings

    for name in args.data:
        adata = datasets.load(name)
        if adata is None:
            continue
        for seed in args.seeds:
            d = fitted_arrays(adata, name, seed, args.max_epochs, cache, args.held_fraction, options)
            base = {"data": name, "seed": seed, "held": int(d["held"].sum())}
            for method, log_p in calibrators(d).items():
                p = softmax(log_p, 1)
                with warnings.catch_warnings():  # balanced accuracy: a type never predicted
                    warnings.simplefilter("ignore", UserWarning)
                    ece, acc, bacc, conf = scores(p, d["labels"], d["truth"], ~d["labelled"])
                    holdout = scores(p, d["labels"], d["truth"], d["held"])[0]
                    if method == "q":
                        fit_cells = d["labelled"] & ~d["held"]
                        _, t_acc, _, t_conf = scores(p, d["labels"], d["truth"], fit_cells)
                        trained.append({**base, "accuracy": t_acc, "confidence": t_conf})
                rows.append({**base, "method": method, "ece": ece, "accuracy": acc,
                             "balanced_accuracy": bacc, "confidence": conf, "holdout_ece": holdout})
    table = pd.DataFrame(rows)
    print(markdown(table))
    print("\nq on the labelled cells it was trained on\n" + markdown(pd.DataFrame(trained)))
    table["method"] = table["method"].str.replace(r" \(T = [0-9.]+\)", "", regex=True)
    groups = table.groupby(["data", "method"], sort=False)
    mean = groups[["ece", "accuracy", "balanced_accuracy", "confidence", "holdout_ece"]].mean()
    mean.insert(1, "ece_per_seed", groups["ece"].apply(lambda s: " / ".join(f"{v:.3f}" for v in s)))
    print("\nmean over seeds\n" + markdown(mean.reset_index()))
    return table


if __name__ == "__main__":
    main()
