"""Label transfer: pyrovae's semi-supervised 'labels' prior against kNN on a standard
pyrovae latent space and scvi-tools' SCANVI, side by side in one run.

    python benchmarks/labels.py [--data bladder pbmc68k] [--seeds 0] [--fractions 0.1]
                                [--max-epochs 200] [--threads 1] [--scvi PYTHON]
                                [--methods pyrovae pyrovae_all knn scanvi] [--out ROWS.csv]
                                [--fit-options JSON]
    python benchmarks/labels.py --table ROWS.csv    # the tables of rows written by --out

For each data set (``benchmarks/data.py``), seed and fraction, the cells with
``numpy.random.default_rng(seed).random(n) < fraction`` are labelled, the others
``"Unknown"``. Contenders:

* ``pyrovae``: ``pyrovae.fit(labels_key=..., unlabeled_category="Unknown")`` trained on 80 %
  of the labelled cells; the other 20 % (chosen with the same generator) are held out to
  calibrate ``q(y | x)`` by temperature scaling (``model.calibrate``). Its ECE is given
  before (``ece``) and after the calibration: ``ece_calibrated`` (and ``temperature``)
  by the default method, the unlabelled cells' mean confidence matched to the hold-out's
  accuracy, ``ece_calibrated_nll`` (``temperature_nll``) by the held-out negative
  log-likelihood; and its accuracy and ECE on the held-out cells before calibration
  (``holdout_accuracy``, ``holdout_ece``).
* ``pyrovae_all``: the same ``fit`` on all the labelled cells, no calibration: the row to
  compare with kNN and SCANVI, which use all the labelled cells too.
* ``knn``: a standard-normal pyrovae VAE on all cells (no labels), then kNN (k = 15, or the
  number of labelled cells where fewer; ``k`` in the row) on its latent means trained on
  all the labelled cells.
* ``scanvi``: scvi-tools ``SCVI`` + ``SCANVI.from_scvi_model(unlabeled_category="Unknown")``
  with their default epochs, run by ``--scvi`` (a Python with scvi-tools) as a
  subprocess (``benchmarks/labels_scvi.py``); skipped when it is not given or fails.

Reported on the cells not labelled: accuracy, balanced accuracy, ECE (15 bins,
:func:`pyrovae.metrics.expected_calibration_error`) and seconds of training; one row per
data set, fraction, seed and method (appended to ``--out`` as each run ends, so that a
long run keeps what it has done), then their mean and standard deviation over the seeds.
``--fit-options`` passes more keyword arguments to the pyrovae contender's ``fit``, e.g.
``'{"class_balance": false}'``; the pyrovae rows name their ``classifier_input``
(``classifier``), and the summary keeps the two apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.neighbors import KNeighborsClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyrovae  # noqa: E402
from benchmarks import data as datasets  # noqa: E402
from benchmarks.scvi_env import run_script  # noqa: E402
from benchmarks.tables import markdown  # noqa: E402
from pyrovae.metrics import expected_calibration_error  # noqa: E402



def split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labelled cells, and (among them) the 20 % held out for calibration."""
    rng = np.random.default_rng(seed)
    labelled = rng.random(n) < fraction
    held = labelled & (rng.random(n) < 0.2)
    return labelled, held


def scores(truth, probs: pd.DataFrame, cells: np.ndarray) -> dict:
    pred = probs.columns.to_numpy()[probs.to_numpy().argmax(1)].astype(str)
    t = np.asarray(truth).astype(str)
    # a class absent from the labelled cells cannot be predicted; ECE counts it as wrong
    missing = ~np.isin(t[cells], probs.columns.astype(str))
    p = probs.iloc[cells]
    ece = expected_calibration_error(
        np.concatenate([p.to_numpy(), np.zeros((len(p), 1))], 1),
        np.where(missing, p.shape[1], [probs.columns.get_loc(x) if x in probs.columns else 0 for x in t[cells]]))
    return {"accuracy": float((pred[cells] == t[cells]).mean()),
            "balanced_accuracy": float(balanced_accuracy_score(t[cells], pred[cells])),
            "ece": ece}


def run_pyrovae(adata, key, labelled, held, max_epochs, seed, options=None, calibrate=True):
    """``(probs, calibrated, seconds, holdout, classifier)``, ``calibrated``
    ``{method: (probs, T)}`` for ``model.calibrate``'s methods ``"accuracy"`` (the
    mean confidence of the unlabelled cells matched to the hold-out's accuracy) and
    ``"nll"``; without ``calibrate`` every labelled cell trains and
    ``calibrated``/``holdout`` are None."""
    train = adata.copy()
    values = adata.obs[key].astype(str).to_numpy().copy()
    hidden = held if calibrate else np.zeros_like(held)
    values[~labelled | hidden] = "Unknown"
    train.obs["known"] = pd.Categorical(values)
    start = time.perf_counter()
    model = pyrovae.fit(train, labels_key="known", unlabeled_category="Unknown",
                        max_epochs=max_epochs, progress=False, seed=seed, **(options or {}))
    seconds = time.perf_counter() - start
    probs = model.predict(train, soft=True)
    classifier = model.prior.classifier_input
    if not calibrate:
        return probs, None, seconds, None, classifier
    truth = adata.obs[key].astype(str).to_numpy()
    holdout = scores(truth, probs, held)
    calibrated = {}
    if np.isin(truth[held], model.prior.labels).any():
        for method in ("nll", "accuracy"):  # the default ("accuracy") last: the model keeps its T
            temperature = model.calibrate(adata[held].copy(), labels_key=key, method=method,
                                          cells=train[~labelled].copy())
            calibrated[method] = (model.predict(train, soft=True), temperature)
    else:  # a tiny fraction: no held-out cell has a label the model trained on
        calibrated = {m: (probs, float("nan")) for m in ("nll", "accuracy")}
    return probs, calibrated, seconds, holdout, classifier


def run_knn(adata, key, labelled, max_epochs, seed):
    """``(probs, seconds, k)``: k = 15, or the number of labelled cells where fewer."""
    start = time.perf_counter()
    model = pyrovae.fit(adata.copy(), max_epochs=max_epochs, progress=False, seed=seed)
    latent = model.get_latent(adata)
    truth = adata.obs[key].astype(str).to_numpy()
    k = int(min(15, labelled.sum()))
    knn = KNeighborsClassifier(n_neighbors=k).fit(latent[labelled], truth[labelled])
    probs = pd.DataFrame(knn.predict_proba(latent), columns=knn.classes_)
    return probs, time.perf_counter() - start, k


def run_scanvi(python, adata, key, labelled, seed):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.h5ad"
        out = Path(folder) / "probs.csv"
        data = adata.copy()
        values = data.obs[key].astype(str).to_numpy().copy()
        values[~labelled] = "Unknown"
        data.obs["known"] = values
        data.write_h5ad(path)
        info = run_script(python, "labels_scvi.py", path, out, seed, name="scanvi")
        if info is None:
            return None, None
        return pd.read_csv(out, index_col=0), info["seconds"]


def append_rows(path: Path, new: pd.DataFrame) -> None:
    """Add ``new`` to the CSV file ``path``, its columns matched by name (runs with other
    methods write other columns)."""
    if path.exists():
        new = pd.concat([pd.read_csv(path), new], ignore_index=True)
    new.to_csv(path, index=False)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over the seeds of each data set, fraction and method."""
    columns = [c for c in ("accuracy", "balanced_accuracy", "ece", "ece_calibrated",
                           "ece_calibrated_nll", "holdout_accuracy", "holdout_ece", "seconds")
               if c in table]
    keys = ["data", "fraction", "method"] + (["classifier"] if "classifier" in table else [])
    groups = table.groupby(keys, sort=False, dropna=False)[columns]
    mean, sd = groups.mean(), groups.std()
    out = mean.copy()
    for c in columns:
        out[f"{c}_sd"] = sd[c]
    out.insert(0, "seeds", groups.size())
    return out.reset_index()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["bladder", "pbmc68k"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1])
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scvi", default=None, help="a Python with scvi-tools 1.4")
    parser.add_argument("--methods", nargs="+", default=["pyrovae", "knn", "scanvi"],
                        choices=["pyrovae", "pyrovae_all", "knn", "scanvi"])
    parser.add_argument("--out", default=None, help="a CSV file the rows are appended to")
    parser.add_argument("--fit-options", default="{}", help="JSON: more fit() options for pyrovae")
    parser.add_argument("--table", default=None,
                        help="print the tables of the rows in this CSV (an --out file) and stop")
    args = parser.parse_args(argv)
    if args.table:
        table = pd.read_csv(args.table)
        print(markdown(table) + "\n\nmean over seeds\n" + markdown(summary(table)))
        return table
    options = json.loads(args.fit_options)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.data:
        adata = datasets.load(name)
        if adata is None:
            continue
        key = "cell_type"
        truth = adata.obs[key].astype(str).to_numpy()
        for fraction in args.fractions:
            for seed in args.seeds:
                labelled, held = split(adata.n_obs, fraction, seed)
                cells = ~labelled
                base = {"data": name, "fraction": fraction, "seed": seed}
                new = []
                if "pyrovae" in args.methods:
                    probs, calibrated, seconds, holdout, classifier = run_pyrovae(
                        adata, key, labelled, held, args.max_epochs, seed, options)
                    row = {**base, "method": "pyrovae", "classifier": classifier,
                           **scores(truth, probs, cells), "seconds": seconds}
                    for method, suffix in (("accuracy", ""), ("nll", "_nll")):
                        probs_t, temperature = calibrated[method]
                        row[f"ece_calibrated{suffix}"] = scores(truth, probs_t, cells)["ece"]
                        row[f"temperature{suffix}"] = temperature
                    row["holdout_accuracy"], row["holdout_ece"] = holdout["accuracy"], holdout["ece"]
                    new.append(row)
                if "pyrovae_all" in args.methods:
                    probs, _, seconds, _, classifier = run_pyrovae(
                        adata, key, labelled, held, args.max_epochs, seed, options, calibrate=False)
                    new.append({**base, "method": "pyrovae_all", "classifier": classifier,
                                **scores(truth, probs, cells), "seconds": seconds})
                if "knn" in args.methods:
                    probs, seconds, k = run_knn(adata, key, labelled, args.max_epochs, seed)
                    new.append({**base, "method": "knn", **scores(truth, probs, cells),
                                "seconds": seconds, "k": k})
                if args.scvi and "scanvi" in args.methods:
                    probs, seconds = run_scanvi(args.scvi, adata, key, labelled, seed)
                    if probs is not None:
                        new.append({**base, "method": "scanvi", **scores(truth, probs, cells),
                                    "seconds": seconds})
                rows += new
                if args.out and new:
                    append_rows(Path(args.out), pd.DataFrame(new))
                print(pd.DataFrame(new).to_string(), flush=True)
    table = pd.DataFrame(rows)
    print(markdown(table) if len(table) else "no data")
    if len(table):
        print("\nmean over seeds\n" + markdown(summary(table)))
    return table


if __name__ == "__main__":
    main()
