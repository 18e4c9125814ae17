"""Data sets for the benchmarks, as AnnData of raw counts (CSR, float32).

``pbmc68k()``
    700 PBMCs x 765 genes, bundled with scanpy (:func:`pyrovae.datasets.pbmc68k`).
``bladder(n_top_genes=2000)``
    2,100 mouse bladder cells (Han et al. 2018) read from the project's shared data folder,
    ``<repository>/../shared/data/mouse_bladder_2100.h5ad``, preprocessed as that folder's
    README says: genes seen in >= 3 cells, then the ``n_top_genes`` highly variable genes
    by ``scanpy.pp.highly_variable_genes(flavor="seurat_v3")`` on the counts (needs the
    ``scikit-misc`` package). ``None`` when the file is not there. Nothing is copied into
    the repository.
``simulated(n_cells, n_genes=2000)``
    Counts drawn by :func:`pyrovae.datasets.simulate` (ZINB, seed 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import anndata as ad
import numpy as np
import scipy.sparse as sp

import pyrovae
from pyrovae._threads import torch_threads_kept

__all__ = ["BLADDER_PATH", "bladder", "load", "pbmc68k", "present", "simulated"]

REPOSITORY = Path(__file__).resolve().parents[1]
BLADDER_PATH = REPOSITORY / ".." / "shared" / "data" / "mouse_bladder_2100.h5ad"


def _counts(adata: ad.AnnData) -> ad.AnnData:
    """CSR float32 counts in ``X``, the form every contender reads without converting."""
    X = adata.X
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(X)
    adata.X = X.astype(np.float32) if X.dtype != np.float32 else X
    return adata


def pbmc68k() -> ad.AnnData:
    """700 PBMCs x 765 genes with ``obs["cell_type"]``."""
    return _counts(pyrovae.datasets.pbmc68k())


def bladder(n_top_genes: int = 2000, path: str | Path | None = None) -> ad.AnnData | None:
    """2,100 mouse bladder cells x ``n_top_genes`` HVGs with ``obs["cell_type"]``; ``None``
    (and a note on stdout) when the file is absent."""
    import scanpy as sc

    path = Path(path) if path is not None else BLADDER_PATH
    if not path.exists():
        print(f"bladder: {path.resolve()} not found; skipping this data set")
        return None
    adata = ad.read_h5ad(path)
    adata = _counts(adata)
    # the seurat_v3 selection runs numba code that sets torch's thread count to all cores
    # (pyrovae._threads): without this, every bladder fit after loading ignored --threads
    with torch_threads_kept():
        sc.pp.filter_genes(adata, min_cells=3)
        sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_top_genes)
    adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    # a cell can lose all its counts to the gene selection; no model can score such a cell
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    if (totals == 0).any():
        adata = adata[totals > 0].copy()
    adata.obs = adata.obs[["cell_type"]].copy()
    adata.var = adata.var[[]].copy()
    adata.uns = {}
    return adata


CACHE = Path(__file__).resolve().parent / ".cache"


def simulated(n_cells: int, n_genes: int = 2000, *, seed: int = 0) -> ad.AnnData:
    """ZINB counts from :func:`pyrovae.datasets.simulate` (5 clusters in ``obs["cluster"]``);
    read from ``benchmarks/.cache/`` when ``benchmarks/memory.py`` has written the same
    data set there (seed 0), which saves minutes at a million cells."""
    cached = CACHE / f"simulated_{n_cells}x{n_genes}.h5ad"
    if seed == 0 and cached.exists():
        return _counts(ad.read_h5ad(cached))
    return _counts(pyrovae.datasets.simulate(n_cells, n_genes, seed=seed))


def load(name: str) -> ad.AnnData | None:
    """A data set by name: ``pbmc68k``, ``bladder``, or ``simulated:<cells>[x<genes>]``
    (e.g. ``simulated:10000`` or ``simulated:5000x1000``)."""
    if name == "pbmc68k":
        return pbmc68k()
    if name == "bladder":
        return bladder()
    if name.startswith("simulated:"):
        size = name.split(":", 1)[1]
        cells, _, genes = size.partition("x")
        return simulated(int(cells), int(genes) if genes else 2000)
    raise ValueError(f"unknown data set {name!r}: pbmc68k, bladder or simulated:<cells>[x<genes>]")


def present(names: Iterable[str]) -> Iterator[tuple[str, ad.AnnData]]:
    """``(name, adata)`` for each data set of ``names`` that is there; an absent one is
    skipped (its loader says so)."""
    for name in names:
        adata = load(name)
        if adata is not None:
            yield name, adata
