"""Peak memory of training on a large simulated data set, in memory and streamed from disk.

    python benchmarks/memory.py [--cells 1000000] [--genes 2000] [--epochs 1] [--threads 1]

The counts (``pyrovae.datasets.simulate(cells, genes)``, ZINB, CSR float32) are simulated
once and written to ``benchmarks/.cache/simulated_<cells>x<genes>.h5ad`` (ignored by git;
reused by later runs). Then each way of training runs in a fresh process, so that its peak
resident memory (``VmHWM``) is its own:

* ``baseline``: ``import pyrovae`` and one step on a tiny AnnData: what any run costs;
* ``in-memory``: ``ad.read_h5ad(path)``, then ``pyrovae.fit(adata, max_epochs=E)``
  (defaults otherwise: ZINB, batch 128, a 10 % validation split scored every epoch);
* ``backed``: ``ad.read_h5ad(path, backed="r")``, then the same ``pyrovae.fit``: the
  counts are streamed in chunks of 16,384 cells.

Printed: the size of the CSR matrix (data + indices + indptr as stored), each run's peak
and time, and the issue's bounds: in-memory below 1.5 x CSR + 1 GiB, backed below 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3
CACHE = Path(__file__).resolve().parent / ".cache"  # also read by data.simulated


def peak_gib() -> float:
    """This process's peak resident memory: ``VmHWM`` of its address space. (Not
    ``ru_maxrss``, which a child inherits from its parent across fork and exec.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def simulate_to_disk(cells: int, genes: int) -> Path:
    path = CACHE / f"simulated_{cells}x{genes}.h5ad"
    if path.exists():
        return path
    import pyrovae

    CACHE.mkdir(exist_ok=True)
    start = time.perf_counter()
    adata = pyrovae.datasets.simulate(cells, genes, likelihood="zinb", seed=0)
    adata.uns = {}
    partial = path.with_suffix(".partial")
    adata.write_h5ad(partial)
    partial.rename(path)
    print(f"simulated {cells:,} x {genes:,} in {time.perf_counter() - start:.0f} s -> {path}")
    return path


def csr_gib(path: Path) -> float:
    import h5py

    with h5py.File(path, "r") as f:
        X = f["X"]
        return sum(X[k].dtype.itemsize * X[k].shape[0] for k in ("data", "indices", "indptr")) / GIB


def child(mode: str, path: str, epochs: int, threads: int) -> None:
    """One way of training, in this process; prints a JSON line."""
    import torch

    torch.set_num_threads(threads)
    import anndata as ad

    import pyrovae

    start = time.perf_counter()
    if mode == "baseline":
        adata = pyrovae.datasets.simulate(200, 50, seed=0)
        pyrovae.fit(adata, max_epochs=1, progress=False)
    else:
        adata = ad.read_h5ad(path, backed="r" if mode == "backed" else None)
        loaded = peak_gib()
        model = pyrovae.fit(adata, max_epochs=epochs, progress=True)
        assert adata.obsm["X_pyrovae"].shape == (adata.n_obs, 10)
    result = {"mode": mode, "peak_gib": peak_gib(), "seconds": time.perf_counter() - start}
    if mode != "baseline":
        result.update(peak_after_reading_gib=loaded,
                      seconds_per_epoch=float(model.history["seconds"].median()))
    print(json.dumps(result), flush=True)


def run(mode: str, path: Path, epochs: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(path), "--epochs", str(epochs),
         "--threads", str(threads)],
        stdout=subprocess.PIPE, text=True, env=env, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=["baseline", "in-memory", "backed"])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.epochs, args.threads)
        return {}
    path = simulate_to_disk(args.cells, args.genes)
    csr = csr_gib(path)
    print(f"{args.cells:,} cells x {args.genes:,} genes: CSR {csr:.2f} GiB; "
          f"{args.epochs} epoch(s), {args.threads} thread(s), load {os.getloadavg()[0]:.1f}")
    bounds = {"in-memory": 1.5 * csr + 1.0, "backed": 2.0}
    rows = []
    for mode in args.modes:
        result = run(mode, path, args.epochs, args.threads)
        rows.append(result)
        bound = bounds.get(mode)
        verdict = "" if bound is None else (
            f"  bound {bound:.2f} GiB: {'met' if result['peak_gib'] < bound else 'NOT met'}")
        extra = (f", after reading {result['peak_after_reading_gib']:.2f} GiB, "
                 f"{result['seconds_per_epoch']:.0f} s per epoch" if mode != "baseline" else "")
        print(f"{mode:>10}: peak {result['peak_gib']:.2f} GiB{extra}, "
              f"{result['seconds']:.0f} s in all{verdict}", flush=True)
    return {"cells": args.cells, "genes": args.genes, "csr_gib": csr, "rows": rows}


if __name__ == "__main__":
    main()
