"""Training speed: pyrovae vs a plain PyTorch reference VAE vs scvi-tools' SCVI.

    python benchmarks/speed.py --data pbmc68k bladder --epochs 20 --repeats 3
    python benchmarks/speed.py --scaling 10000 100000 1000000 --epochs 1

Comparison mode (``--data``). For each data set the cells are permuted with
``numpy.random.default_rng(0)``; the first 10 % are held out, the rest trained on by every
contender, for the same number of epochs, no early stopping, no validation pass, batch
size 128, all in this one process with the same ``torch.set_num_threads``. Each repeat
runs every contender once (round robin; the order rotates from repeat to repeat so that
none always runs first), repeat ``r`` with seed ``r`` for all.

- ``pyrovae``: ``pyrovae.VAE(var_names, seed=r).train(train, max_epochs=E,
  early_stopping=False, validation_fraction=0, progress=False)``, defaults otherwise (ZINB,
  128 hidden, latent 10, Adam lr 1e-3, KL warm-up over 50 epochs).
- ``reference``: ``benchmarks/reference_vae.py``, the same network, loss, optimiser,
  minibatching and KL warm-up in plain PyTorch.
- ``scvi``: ``scvi.model.SCVI(train)`` with its defaults (ZINB, 128 hidden, latent 10, KL
  warm-up over 400 epochs), ``train(max_epochs=E, batch_size=128, train_size=1.0,
  early_stopping=False, enable_progress_bar=False)``; skipped when scvi-tools is not
  installed.

What is timed, per epoch: one pass over the training cells, i.e. cutting the minibatches
out of the CSR matrix and densifying them, forward, backward and optimiser step for each,
and each trainer's own per-epoch bookkeeping; no validation (none of the three runs one).
The clock is read the same way for all three, at the start of every epoch and once when
training ends: pyrovae through a stand-in for the (disabled) ``tqdm`` bar its training loop
iterates over (its own ``history["seconds"]`` is kept in the JSON and agrees); the
reference in its loop; scvi by a Lightning callback (``on_train_epoch_start``,
``on_train_end``), so Lightning's per-step logging and epoch-end hooks are inside. Two
clocks: wall time (``time.perf_counter``) and the process's CPU time
(``time.process_time``, all threads). On a shared machine the CPU time is the steadier
figure, since it does not count time spent descheduled; with 2 threads it also counts
OpenMP workers spinning. The first epoch is a warm-up and left out; a run's figure is the
median over epochs 2..E (robust to bursts of load from other processes; the wall-clock
mean is printed too); the table shows the median over repeats, and the ratio of pyrovae
to each contender computed per repeat (runs back to back) and then its median. The wall
time of each whole training call (set-up included) is printed too.

Held-out ELBO per cell (nats, higher is better), after the same E epochs: pyrovae
``model.elbo(test)`` (10 draws of z per cell, closed-form KL), the reference's
``evaluate_elbo`` (the same computation), scvi ``model.get_elbo(test)`` (one draw).

Scaling mode (``--scaling N ...``): simulated ZINB counts, ``pyrovae.datasets.simulate(N,
2000)``, all cells trained on; pyrovae and the reference, one after the other for each size (order rotating), seconds per epoch (the
last epoch when E > 1, else the only one), wall clock and CPU, CPU microseconds per cell,
and each size's CPU time per cell relative to the smallest size's (1.00 = linear). Every
contender first trains one epoch on 1,000 simulated cells, so that one-time costs (first
calls in the process) do not land on the smallest size.
``--from-json FILE`` prints the table of an earlier run again.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyrovae  # noqa: E402
from benchmarks import data as bench_data  # noqa: E402
from benchmarks.reference_vae import ReferenceVAE, evaluate_elbo, train_reference  # noqa: E402

HELD_OUT = 0.1


@dataclass
class Run:
    contender: str
    repeat: int
    epoch_seconds: list[float]
    epoch_cpu_seconds: list[float]
    wall_seconds: float
    held_out_elbo: float = float("nan")
    threads: int = 0
    extra: dict = field(default_factory=dict)

    @staticmethod
    def _per_epoch(s) -> float:
        """Median over epochs 2..E (the first is a warm-up; the median, not the mean, so
        that a burst of load from other processes on the shared machine does not decide
        it); the only epoch when E = 1."""
        return float(np.median(s[1:] if len(s) > 1 else s)) if len(s) else float("nan")

    @property
    def seconds_per_epoch(self) -> float:
        return self._per_epoch(self.epoch_seconds)

    @property
    def cpu_seconds_per_epoch(self) -> float:
        return self._per_epoch(self.epoch_cpu_seconds)

    @property
    def mean_seconds_per_epoch(self) -> float:
        s = self.epoch_seconds
        return float(np.mean(s[1:] if len(s) > 1 else s))


class Clock:
    """Wall-clock and process CPU time at each epoch's start and at the end of training."""

    def __init__(self):
        self.wall, self.cpu = [], []

    def mark(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def epochs(self) -> tuple[list[float], list[float]]:
        return np.diff(self.wall).tolist(), np.diff(self.cpu).tolist()


class _EpochClockBar:
    """Stands in for ``tqdm`` inside ``pyrovae.train`` during a benchmark run (its bar is
    disabled anyway): marks the clock as each epoch starts and when training closes the bar."""

    clock: Clock | None = None

    def __init__(self, iterable, *args, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        for item in self.iterable:
            self.clock.mark()
            yield item

    def set_postfix(self, *args, **kwargs):
        pass

    def set_description(self, *args, **kwargs):
        pass

    def close(self):
        self.clock.mark()


# ---------------------------------------------------------------------------- contenders
def run_pyrovae(train, test, epochs: int, seed: int, prior=None, name: str = "pyrovae") -> Run:
    import pyrovae.train as pyrovae_train

    model = pyrovae.VAE(train.var_names, seed=seed, likelihood="zinb", prior=prior or "normal")
    clock = Clock()
    hooked = hasattr(pyrovae_train, "tqdm")
    if hooked:
        _EpochClockBar.clock = clock
        saved, pyrovae_train.tqdm = pyrovae_train.tqdm, _EpochClockBar
    start = time.perf_counter()
    try:
        model.train(
            train, max_epochs=epochs, early_stopping=False, validation_fraction=0.0,
            progress=False, seed=seed, device="cpu",
        )
    finally:
        if hooked:
            pyrovae_train.tqdm = saved
    wall = time.perf_counter() - start
    elbo = float(model.elbo(test)["elbo"].mean()) if test is not None else float("nan")
    history_seconds = model.history["seconds"].tolist()
    if len(clock.wall) == epochs + 1:
        epoch_wall, epoch_cpu = clock.epochs()
    else:  # pyrovae's loop changed: fall back on its own per-epoch times (wall clock only)
        epoch_wall, epoch_cpu = history_seconds, []
    return Run(name, seed, epoch_wall, epoch_cpu, wall, elbo,
               extra={"final_train_elbo": float(model.history["train_elbo"].iloc[-1]),
                      "history_seconds": history_seconds})


def run_reference(train, test, epochs: int, seed: int) -> Run:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # same initial weights as pyrovae.VAE(seed=seed)
        model = ReferenceVAE(train.n_vars)
    clock = Clock()
    start = time.perf_counter()
    history = train_reference(model, train.X, max_epochs=epochs, seed=seed, on_epoch_start=clock.mark)
    clock.mark()
    wall = time.perf_counter() - start
    elbo = float(evaluate_elbo(model, test.X).mean()) if test is not None else float("nan")
    epoch_wall, epoch_cpu = clock.epochs()
    return Run("reference", seed, epoch_wall, epoch_cpu, wall, elbo,
               extra={"final_train_elbo": float(history["train_elbo"].iloc[-1]),
                      "history_seconds": history["seconds"].tolist()})


def run_scvi(train, test, epochs: int, seed: int, kl_warmup: int | None = None) -> Run:
    import scvi
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        def __init__(self):
            self.clock = Clock()

        def on_train_epoch_start(self, trainer, pl_module):
            self.clock.mark()

        def on_train_end(self, trainer, pl_module):
            self.clock.mark()

    threads = torch.get_num_threads()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    scvi.settings.seed = seed
    scvi.settings.verbosity = 0
    train = train.copy()
    scvi.model.SCVI.setup_anndata(train)
    model = scvi.model.SCVI(train)
    timer = EpochTimer()
    plan_kwargs = {} if kl_warmup is None else {"n_epochs_kl_warmup": kl_warmup}
    start = time.perf_counter()
    model.train(
        max_epochs=epochs, batch_size=128, train_size=1.0, early_stopping=False,
        enable_progress_bar=False, callbacks=[timer], plan_kwargs=plan_kwargs,
        accelerator="cpu", logger=False,
    )
    wall = time.perf_counter() - start
    torch.set_num_threads(threads)  # in case anything changed it
    epoch_wall, epoch_cpu = timer.clock.epochs()
    elbo = float("nan")
    if test is not None:
        test = test.copy()
        scvi.model.SCVI.setup_anndata(test)
        elbo = float(model.get_elbo(test))
    return Run("scvi", seed, epoch_wall, epoch_cpu, wall, elbo)


def scvi_available() -> bool:
    try:
        import scvi  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------- comparison
def split(adata):
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    n_test = int(round(HELD_OUT * adata.n_obs))
    return adata[perm[n_test:]].copy(), adata[perm[:n_test]].copy()


def compare(name: str, adata, contenders: dict, epochs: int, repeats: int, threads: int) -> dict:
    train, test = split(adata)
    print(f"\n== {name}: {train.n_obs} cells trained on, {test.n_obs} held out, {adata.n_vars} genes; "
          f"{epochs} epochs, {repeats} repeats, {threads} threads", flush=True)
    names = list(contenders)
    runs: list[Run] = []
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for contender in order:
            gc.collect()
            torch.set_num_threads(threads)
            run = contenders[contender](train, test, epochs, r)
            run.threads = torch.get_num_threads()
            run.extra["load_average_1min"] = os.getloadavg()[0]
            runs.append(run)
            print(f"  repeat {r} {contender:9s} {run.seconds_per_epoch:8.3f} s/epoch, CPU "
                  f"{run.cpu_seconds_per_epoch:.3f} s (wall mean {run.mean_seconds_per_epoch:.3f}; "
                  f"first epoch {run.epoch_seconds[0]:.3f} s; "
                  f"whole train call {run.wall_seconds:.1f} s) held-out ELBO {run.held_out_elbo:9.2f}  "
                  f"[load {run.extra['load_average_1min']:.1f}]", flush=True)
    summary = summarise(runs, names)
    print_table(name, summary, epochs)
    return {"data": name, "n_train": train.n_obs, "n_test": test.n_obs, "n_genes": adata.n_vars,
            "epochs": epochs, "repeats": repeats, "threads": threads,
            "runs": [asdict(r) for r in runs], "summary": summary}


def summarise(runs: list[Run], names: list[str]) -> dict:
    by = {n: [r for r in runs if r.contender == n] for n in names}
    out = {}
    for n, rs in by.items():
        elbo = [r.held_out_elbo for r in rs]
        out[n] = {"held_out_elbo_mean": float(np.mean(elbo)), "held_out_elbo_sd": float(np.std(elbo))}
        for key, attr in (("seconds_per_epoch", "seconds_per_epoch"),
                          ("cpu_seconds_per_epoch", "cpu_seconds_per_epoch")):
            v = [getattr(r, attr) for r in rs]
            out[n].update({f"{key}_median": float(np.median(v)), f"{key}_min": float(np.min(v)),
                           f"{key}_max": float(np.max(v))})
    for mine in [n for n in names if n.startswith("pyrovae")]:
        others = [n for n in names if not n.startswith("pyrovae")]
        if mine != "pyrovae" and "pyrovae" in names:
            others.append("pyrovae")  # what the mixture costs over the standard-normal VAE
        for n in others:
            ratio = out[f"{mine}/{n}"] = {}
            for key, attr in (("wall", "seconds_per_epoch"), ("cpu", "cpu_seconds_per_epoch")):
                paired = [getattr(p, attr) / getattr(o, attr) for p, o in zip(by[mine], by[n])]
                ratio.update({f"{key}_median": float(np.median(paired)),
                              f"{key}_min": float(np.min(paired)),
                              f"{key}_max": float(np.max(paired))})
    return out


def print_table(name: str, summary: dict, epochs: int) -> None:
    print(f"\n{name}: per epoch, the median of epochs 2..{epochs}, then the median [min, max] over "
          f"repeats, wall clock and process CPU time; held-out ELBO per cell after {epochs} epochs "
          "(mean ± sd over repeats)")
    print(f"{'contender':20s} {'wall s/epoch':>12s} {'range':>17s} {'CPU s/epoch':>12s} "
          f"{'range':>17s} {'held-out ELBO':>20s}")
    for n, s in summary.items():
        if "/" in n:
            continue
        wr = f"[{s['seconds_per_epoch_min']:.3f}, {s['seconds_per_epoch_max']:.3f}]"
        cr = f"[{s['cpu_seconds_per_epoch_min']:.3f}, {s['cpu_seconds_per_epoch_max']:.3f}]"
        print(f"{n:20s} {s['seconds_per_epoch_median']:12.3f} {wr:>17s} "
              f"{s['cpu_seconds_per_epoch_median']:12.3f} {cr:>17s} "
              f"{s['held_out_elbo_mean']:12.2f} ± {s['held_out_elbo_sd']:.2f}")
    for n, s in summary.items():
        if "/" in n:
            print(f"{n + ' time per epoch':40s} wall {s['wall_median']:.3f} "
                  f"[{s['wall_min']:.3f}, {s['wall_max']:.3f}], CPU {s['cpu_median']:.3f} "
                  f"[{s['cpu_min']:.3f}, {s['cpu_max']:.3f}]  (ratios paired per repeat)")
    sys.stdout.flush()


# ---------------------------------------------------------------------------- scaling
def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def scaling(sizes: list[int], n_genes: int, epochs: int, threads: int, contenders: dict) -> dict:
    rows = []
    names = list(contenders)
    # one-time costs (imports, first calls, allocator) must not land on the first size
    warm = bench_data.simulated(1000, n_genes, seed=1)
    for contender in names:
        contenders[contender](warm, None, 1, 0)
    del warm
    for i, n in enumerate(sizes):
        start = time.perf_counter()
        adata = bench_data.simulated(n, n_genes)
        made = time.perf_counter() - start
        nnz = adata.X.nnz
        print(f"\n== simulated {n:,} cells x {n_genes} genes: simulated in {made:.0f} s, "
              f"{nnz / n:.0f} non-zeros per cell, CSR {adata.X.data.nbytes * 2 / 2**30:.2f} GiB; "
              f"peak RSS so far {max_rss_gib():.1f} GiB", flush=True)
        order = names[i % len(names):] + names[: i % len(names)]
        for contender in order:
            gc.collect()
            torch.set_num_threads(threads)
            run = contenders[contender](adata, None, epochs, 0)
            s = run.epoch_seconds[-1]
            rows.append({"n_cells": n, "contender": contender, "seconds_per_epoch": s,
                         "cpu_seconds_per_epoch": run.epoch_cpu_seconds[-1] if run.epoch_cpu_seconds else float("nan"),
                         "epoch_seconds": run.epoch_seconds, "epoch_cpu_seconds": run.epoch_cpu_seconds,
                         "wall_seconds": run.wall_seconds,
                         "us_per_cell": s / n * 1e6, "simulate_seconds": made,
                         "peak_rss_gib": max_rss_gib()})
            rows[-1]["load_average_1min"] = os.getloadavg()[0]
            print(f"  {contender:9s} {s:9.2f} s/epoch (CPU {rows[-1]['cpu_seconds_per_epoch']:.2f} s)  "
                  f"{s / n * 1e6:7.1f} us/cell  "
                  f"(whole train call {run.wall_seconds:.1f} s; peak RSS {max_rss_gib():.1f} GiB) "
                  f"[load {os.getloadavg()[0]:.1f}]", flush=True)
        del adata
    print_scaling(rows, sizes, names, epochs)
    return {"mode": "scaling", "n_genes": n_genes, "epochs": epochs, "threads": threads, "rows": rows}


def print_scaling(rows: list[dict], sizes: list[int], names: list[str], epochs: int) -> None:
    """Per size and contender: wall and CPU seconds per epoch, CPU microseconds per cell and
    that relative to the smallest size (1.00 = linear); then pyrovae's ratios to the reference."""
    print(f"\nscaling: seconds per epoch ({'the last of ' + str(epochs) if epochs > 1 else 'one'} "
          f"epoch), wall clock and CPU; CPU microseconds per cell, and relative to "
          f"{sizes[0]:,} cells (1.00 = linear)")
    get = {(r["contender"], r["n_cells"]): r for r in rows}
    print(f"{'contender':20s} {'cells':>10s} {'wall s':>9s} {'CPU s':>9s} {'CPU us/cell':>12s} {'rel':>5s}")
    for c in names:
        base = get[c, sizes[0]]["cpu_seconds_per_epoch"] / sizes[0]
        for n in sizes:
            r = get[c, n]
            per = r["cpu_seconds_per_epoch"] / n
            print(f"{c:14s} {n:10,d} {r['seconds_per_epoch']:9.2f} {r['cpu_seconds_per_epoch']:9.2f} "
                  f"{per * 1e6:12.1f} {per / base:5.2f}")
    if "reference" in names:
        for c in [c for c in names if c.startswith("pyrovae")]:
            ratios = ", ".join(
                f"{n:,}: CPU {get[c, n]['cpu_seconds_per_epoch'] / get['reference', n]['cpu_seconds_per_epoch']:.2f}"
                f" (wall {get[c, n]['seconds_per_epoch'] / get['reference', n]['seconds_per_epoch']:.2f})"
                for n in sizes)
            print(f"{c}/reference time per epoch  {ratios}")
    sys.stdout.flush()


# ---------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", nargs="+", default=["pbmc68k", "bladder"],
                        help="pbmc68k, bladder, simulated:<cells>[x<genes>]")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clusters", type=int, default=10,
                        help="K of the pyrovae-gmm contenders (enumerated Gaussian mixture; "
                             "-shared: q(z|x) shared by the clusters, so one decoder pass)")
    parser.add_argument("--contenders", nargs="+", default=["pyrovae", "reference", "scvi"],
                        choices=["pyrovae", "reference", "scvi", "pyrovae-gmm", "pyrovae-gmm-shared"])
    parser.add_argument("--scvi-kl-warmup", type=int, default=None,
                        help="SCVI's n_epochs_kl_warmup (default: scvi-tools' own, 400)")
    parser.add_argument("--scaling", type=int, nargs="+", metavar="N_CELLS",
                        help="scaling mode: simulated data sets of these sizes")
    parser.add_argument("--genes", type=int, default=2000, help="genes in scaling mode")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--from-json", type=Path,
                        help="print the tables of an earlier run's JSON file and stop")
    args = parser.parse_args(argv)
    if args.from_json:
        return reprint(json.loads(args.from_json.read_text()))

    torch.set_num_threads(args.threads)
    print(f"python {platform.python_version()}, torch {torch.__version__}, pyro "
          f"{__import__('pyro').__version__}, pyrovae {pyrovae.__version__}, "
          f"torch threads {torch.get_num_threads()}, {platform.machine()}", flush=True)
    available = {"pyrovae": run_pyrovae, "reference": run_reference}
    for shared in (False, True):  # the enumerated GMVAE, K = --clusters
        name = "pyrovae-gmm" + ("-shared" if shared else "")
        available[name] = lambda tr, te, e, s, shared=shared, name=name: run_pyrovae(
            tr, te, e, s, name=name,
            prior=pyrovae.priors.GaussianMixture(args.clusters, conditional_posterior=not shared))
    if "scvi" in args.contenders:
        if scvi_available():
            import scvi

            print(f"scvi-tools {scvi.__version__}", flush=True)
            available["scvi"] = lambda tr, te, e, s: run_scvi(tr, te, e, s, args.scvi_kl_warmup)
        else:
            print("scvi-tools is not installed: skipping that contender (see benchmarks/README.md)")
    contenders = {c: available[c] for c in args.contenders if c in available}

    if args.scaling:
        contenders = {c: f for c, f in contenders.items() if c != "scvi"}
        result = scaling(sorted(args.scaling), args.genes, args.epochs, args.threads, contenders)
    else:
        result = {"mode": "compare", "data": []}
        for name, adata in bench_data.present(args.data):
            result["data"].append(compare(name, adata, contenders, args.epochs, args.repeats,
                                          args.threads))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


def reprint(result: dict) -> dict:
    """Print the tables of a result written by ``--json``."""
    if result["mode"] == "scaling":
        names = list(dict.fromkeys(r["contender"] for r in result["rows"]))
        sizes = sorted({r["n_cells"] for r in result["rows"]})
        print_scaling(result["rows"], sizes, names, result["epochs"])
    else:
        for d in result["data"]:
            print(f"\n== {d['data']}: {d['n_train']} cells trained on, {d['n_test']} held out, "
                  f"{d['n_genes']} genes; {d['epochs']} epochs, {d['repeats']} repeats, "
                  f"{d['threads']} threads")
            print_table(d["data"], d["summary"], d["epochs"])
    return result


if __name__ == "__main__":
    main()
