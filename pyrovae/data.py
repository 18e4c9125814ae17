"""The AnnData edge: read the matrix a model needs, check it, and cut it into minibatches.

Nothing below this module knows about AnnData. Nothing here writes into the user's
AnnData or changes their matrix: conversions make copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

__all__ = ["CountData", "InvalidDataError", "check_genes", "read_data"]

DataKind = Literal["counts", "unit_interval", "real"]
_CHUNK = 1 << 22  # values checked at a time, to bound temporary memory


class InvalidDataError(ValueError):
    """The AnnData cannot be used as given; the message says what is wrong and what to do."""


@dataclass
class CountData:
    """A cells x genes matrix (CSR or dense, float32), cut into dense minibatches on demand."""

    X: sp.csr_matrix | np.ndarray
    obs_names: pd.Index
    var_names: pd.Index

    @property
    def n_obs(self) -> int:
        return self.X.shape[0]

    @property
    def n_vars(self) -> int:
        return self.X.shape[1]

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Dense ``float32`` copy of the given rows."""
        block = self.X[index]
        return block.toarray() if sp.issparse(block) else np.asarray(block)

    def batch(self, index: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """The given rows as a dense tensor on ``device``."""
        return torch.from_numpy(self.rows(index)).to(device)

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> Iterator[
        tuple[np.ndarray, torch.Tensor]
    ]:
        """All cells in order, ``(index, x)`` per minibatch."""
        for start in range(0, self.n_obs, batch_size):
            index = np.arange(start, min(start + batch_size, self.n_obs))
            yield index, self.batch(index, device)


def read_data(
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    kind: DataKind = "counts",
    allow_empty_genes: bool = False,
) -> CountData:
    """Take the matrix in ``adata.layers[layer]`` (``adata.X`` when ``layer`` is None) and
    check that a likelihood of data type ``kind`` can model it.

    Raises
    ------
    InvalidDataError
        For an empty AnnData, a missing layer, NaN or infinite values, values the
        likelihood cannot model (negative or non-integer counts, values outside [0, 1]),
        and, for counts, cells without any counts and (unless ``allow_empty_genes``, as
        when scoring a few new cells) genes without any counts.
    """
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"expected an AnnData, got {type(adata).__name__}")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InvalidDataError(
            f"the AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes): nothing to model"
        )
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if layer is None:
        X = adata.X
        if X is None:
            raise InvalidDataError("adata.X is None; pass layer= to use one of adata.layers")
    else:
        if layer not in adata.layers:
            available = list(adata.layers.keys())
            raise InvalidDataError(
                f"{where} not found: this AnnData has "
                + (f"layers {available}" if available else "no layers")
                + "; pass one of those names, or layer=None to use adata.X"
            )
        X = adata.layers[layer]
    X = _as_float32(X, where)
    _check_values(X, kind, where, adata.obs_names, adata.var_names)
    if kind == "counts":
        _check_not_empty(X, where, adata.obs_names, adata.var_names, genes=not allow_empty_genes)
    return CountData(X, adata.obs_names.copy(), adata.var_names.copy())


def check_genes(var_names: Sequence[str], expected: Sequence[str]) -> None:
    """Raise unless ``var_names`` are the model's genes, in the model's order."""
    got, want = pd.Index(var_names), pd.Index(expected)
    if got.equals(want):
        return
    missing, extra = want.difference(got, sort=False), got.difference(want, sort=False)
    if len(missing) == 0 and len(extra) == 0 and len(got) == len(want):
        raise InvalidDataError(
            "this AnnData has the model's genes in another order; "
            "reorder it with adata[:, model.var_names]"
        )
    parts = [f"the model was trained on {len(want)} genes; this AnnData has {len(got)}"]
    if len(missing):
        parts.append(f"{len(missing)} of the model's genes are missing (e.g. {_examples(missing)})")
    if len(extra):
        parts.append(f"{len(extra)} genes are not the model's (e.g. {_examples(extra)})")
    if len(missing) == 0:
        parts.append("subset it with adata[:, model.var_names]")
    elif got.has_duplicates:
        parts.append("var_names hold duplicates; call adata.var_names_make_unique()")
    raise InvalidDataError("; ".join(parts))


def _examples(names, n: int = 3) -> str:
    shown = ", ".join(repr(str(v)) for v in list(names)[:n])
    return shown + (", ..." if len(names) > n else "")


def _as_float32(X, where: str) -> sp.csr_matrix | np.ndarray:
    """CSR or dense float32, copying only when the input is in another form."""
    if hasattr(X, "to_memory"):  # a backed sparse dataset
        X = X.to_memory()
    if sp.issparse(X):
        X = X.tocsr()
        if X.dtype != np.float32:
            X = X.astype(np.float32)
        if not X.has_canonical_format:
            X = X.copy()
            X.sum_duplicates()
        return X
    try:
        X = np.asarray(X)
    except Exception as err:  # e.g. a dask array that cannot be computed
        raise InvalidDataError(f"{where} of type {type(X).__name__} is not supported") from err
    if X.ndim != 2 or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise InvalidDataError(f"{where} must be a numeric matrix, got dtype {X.dtype}")
    return np.ascontiguousarray(X, dtype=np.float32)


def _values(X) -> np.ndarray:
    return X.data if sp.issparse(X) else X.reshape(-1)


def _position(X, flat: int, obs_names, var_names) -> str:
    """``cell 'c', gene 'g'`` of the ``flat``-th stored value."""
    if sp.issparse(X):
        row = int(np.searchsorted(X.indptr, flat, side="right") - 1)
        col = int(X.indices[flat])
    else:
        row, col = divmod(flat, X.shape[1])
    return f"cell {obs_names[row]!r}, gene {var_names[col]!r}"


def _first_bad(values: np.ndarray, bad) -> tuple[int, int]:
    """Number of values where ``bad`` holds and the position of the first, chunk by chunk."""
    count, first = 0, -1
    for start in range(0, values.size, _CHUNK):
        mask = bad(values[start : start + _CHUNK])
        n = int(mask.sum())
        if n and first < 0:
            first = start + int(np.argmax(mask))
        count += n
    return count, first


def _check_values(X, kind: DataKind, where: str, obs_names, var_names) -> None:
    values = _values(X)
    checks = [("NaN or infinite", lambda v: ~np.isfinite(v),
               "remove or impute them before fitting")]
    if kind == "counts":
        checks += [
            ("negative", lambda v: v < 0,
             "a count likelihood needs raw counts (non-negative integers)"),
            ("non-integer", lambda v: v != np.round(v),
             "a count likelihood needs raw counts; these look normalised or log-transformed. "
             "Pass the raw counts (e.g. layer='counts'), or use likelihood='gaussian' "
             "for log-normalised data"),
        ]
    elif kind == "unit_interval":
        checks.append(("outside [0, 1]", lambda v: (v < 0) | (v > 1),
                       "the continuous Bernoulli likelihood needs data scaled to [0, 1]"))
    for label, bad, advice in checks:
        n, first = _first_bad(values, bad)
        if n:
            raise InvalidDataError(
                f"{where} holds {n:,} {label} value{'s' if n > 1 else ''} "
                f"(first: {float(values[first]):g} at {_position(X, first, obs_names, var_names)}); "
                + advice
            )


def _check_not_empty(X, where: str, obs_names, var_names, *, genes: bool) -> None:
    cell_totals = np.asarray(X.sum(axis=1)).ravel()
    empty = np.flatnonzero(cell_totals == 0)
    if len(empty):
        raise InvalidDataError(
            f"{len(empty):,} of {X.shape[0]:,} cells have no counts in {where} "
            f"(e.g. {_examples(obs_names[empty])}); remove them first, e.g. with "
            "sc.pp.filter_cells(adata, min_counts=1)"
        )
    if not genes:
        return
    gene_totals = np.asarray(X.sum(axis=0)).ravel()
    empty = np.flatnonzero(gene_totals == 0)
    if len(empty):
        raise InvalidDataError(
            f"{len(empty):,} of {X.shape[1]:,} genes have no counts in any cell of {where} "
            f"(e.g. {_examples(var_names[empty])}); remove them first, e.g. with "
            "sc.pp.filter_genes(adata, min_cells=1)"
        )
