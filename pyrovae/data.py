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

__all__ = [
    "CountData", "CovariateSpec", "Encoded", "InvalidDataError", "check_genes", "read_data",
]

DataKind = Literal["counts", "unit_interval", "real"]
_CHUNK = 1 << 22  # values checked at a time, to bound temporary memory


class InvalidDataError(ValueError):
    """The AnnData cannot be used as given; the message says what is wrong and what to do."""


@dataclass
class Encoded:
    """Covariates of some cells as arrays: what the networks see and the indices the
    model's per-batch and per-label parameters are picked by."""

    covariates: np.ndarray  # (cells, n_covariates) float32: one-hot blocks, then continuous
    batch: np.ndarray  # (cells,) int64 batch index (0 without a batch key)
    label: np.ndarray  # (cells,) int64 label index (0 without a labels key)

    def rows(self, index) -> "Encoded":
        return Encoded(self.covariates[index], self.batch[index], self.label[index])

    def to(self, device) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        covariates = torch.from_numpy(self.covariates).to(device) if self.covariates.shape[1] else None
        return covariates, torch.from_numpy(self.batch).to(device), torch.from_numpy(self.label).to(device)


@dataclass
class CovariateSpec:
    """Which columns of ``adata.obs`` a model reads, and how it encodes them.

    Fixed when the model is first trained: the categories of each categorical column (the
    batch key first) and the mean and standard deviation of each continuous column, so
    that any later AnnData is encoded the same way.
    """

    batch_key: str | None = None
    categorical: dict[str, list[str]] | None = None  # key -> categories, batch key first
    continuous: dict[str, list[float]] | None = None  # key -> [mean, std]
    labels_key: str | None = None
    labels: list[str] | None = None

    def __post_init__(self):
        self.categorical = dict(self.categorical or {})
        self.continuous = dict(self.continuous or {})

    @classmethod
    def from_obs(
        cls,
        obs: pd.DataFrame,
        *,
        batch_key: str | None = None,
        categorical_covariate_keys: Sequence[str] = (),
        continuous_covariate_keys: Sequence[str] = (),
        labels_key: str | None = None,
    ) -> "CovariateSpec":
        keys = ([batch_key] if batch_key else []) + [k for k in categorical_covariate_keys if k != batch_key]
        for key in keys + list(continuous_covariate_keys) + ([labels_key] if labels_key else []):
            _require_column(obs, key)
        categorical = {key: _categories(obs, key) for key in keys}
        continuous = {}
        for key in continuous_covariate_keys:
            values = _continuous(obs, key)
            continuous[key] = [float(values.mean()), float(values.std()) or 1.0]
        labels = _categories(obs, labels_key) if labels_key else None
        return cls(batch_key, categorical, continuous, labels_key, labels)

    @property
    def n_covariates(self) -> int:
        return sum(len(c) for c in self.categorical.values()) + len(self.continuous)

    @property
    def n_batches(self) -> int:
        return len(self.categorical[self.batch_key]) if self.batch_key else 1

    @property
    def n_labels(self) -> int:
        return len(self.labels) if self.labels_key else 1

    @property
    def keys(self) -> list[str]:
        return list(self.categorical) + list(self.continuous)

    def to_dict(self) -> dict:
        return {"batch_key": self.batch_key, "categorical": self.categorical,
                "continuous": self.continuous, "labels_key": self.labels_key, "labels": self.labels}

    def encode(self, obs: pd.DataFrame) -> Encoded:
        """Encode the covariates of these cells; unknown categories and missing columns are
        errors that name them."""
        n = len(obs)
        blocks = [self._one_hot(key, obs) for key in self.categorical]
        for key, (mean, std) in self.continuous.items():
            _require_column(obs, key)
            blocks.append(((_continuous(obs, key) - mean) / std)[:, None])
        covariates = np.concatenate(blocks, axis=1).astype(np.float32) if blocks else np.zeros((n, 0), np.float32)
        batch = (self._codes(self.batch_key, obs, self.categorical[self.batch_key])
                 if self.batch_key else np.zeros(n, np.int64))
        label = (self._codes(self.labels_key, obs, self.labels) if self.labels_key
                 else np.zeros(n, np.int64))
        return Encoded(covariates, batch, label)

    def encode_values(self, values: dict, n: int) -> Encoded:
        """The same covariates for ``n`` generated cells: ``values`` maps every covariate
        key to one category (or number)."""
        missing = [k for k in self.keys if k not in values]
        if missing:
            raise InvalidDataError(
                f"the model has covariates {self.keys}: give a value for each, missing {missing}"
            )
        unknown = [k for k in values if k not in self.keys]
        if unknown:
            raise InvalidDataError(f"{unknown} are not covariates of this model; it has {self.keys}")
        obs = pd.DataFrame({k: [values[k]] * n for k in self.keys}, index=[str(i) for i in range(n)])
        if self.labels_key:
            obs[self.labels_key] = self.labels[0]
        return self.encode(obs)

    def batch_one_hot_columns(self) -> slice:
        """Where the batch's one-hot block sits in the covariates."""
        return slice(0, self.n_batches if self.batch_key else 0)

    def _one_hot(self, key: str, obs: pd.DataFrame) -> np.ndarray:
        categories = self.categorical[key]
        codes = self._codes(key, obs, categories)
        return np.eye(len(categories), dtype=np.float32)[codes]

    @staticmethod
    def _codes(key: str, obs: pd.DataFrame, categories: list[str]) -> np.ndarray:
        _require_column(obs, key)
        values = obs[key]
        if values.isna().any():
            raise InvalidDataError(
                f"adata.obs[{key!r}] is missing for {int(values.isna().sum())} cells; "
                "fill or remove them first"
            )
        values = values.astype(str)
        unknown = sorted(set(values) - set(categories))
        if unknown:
            raise InvalidDataError(
                f"adata.obs[{key!r}] holds categories the model was not trained on: "
                f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}; it knows {categories}"
            )
        return pd.Categorical(values, categories=categories).codes.astype(np.int64)


def _require_column(obs: pd.DataFrame, key: str) -> None:
    if key not in obs.columns:
        raise InvalidDataError(
            f"adata.obs[{key!r}] not found; adata.obs has columns {list(obs.columns)}"
        )


def _categories(obs: pd.DataFrame, key: str) -> list[str]:
    values = obs[key]
    if values.isna().any():
        raise InvalidDataError(
            f"adata.obs[{key!r}] is missing for {int(values.isna().sum())} cells; "
            "fill or remove them first"
        )
    if isinstance(values.dtype, pd.CategoricalDtype):
        present = set(values.astype(str))
        return [str(c) for c in values.cat.categories if str(c) in present]
    return sorted(set(values.astype(str)))


def _continuous(obs: pd.DataFrame, key: str) -> np.ndarray:
    try:
        values = pd.to_numeric(obs[key]).to_numpy(np.float64)
    except (TypeError, ValueError):
        raise InvalidDataError(f"adata.obs[{key!r}] is not numeric; use it as a categorical covariate") from None
    if not np.isfinite(values).all():
        raise InvalidDataError(
            f"adata.obs[{key!r}] has {int((~np.isfinite(values)).sum())} missing or infinite values"
        )
    return values


@dataclass
class CountData:
    """A cells x genes matrix (CSR or dense, float32) and the cells' encoded covariates,
    cut into dense minibatches on demand."""

    X: sp.csr_matrix | np.ndarray
    obs_names: pd.Index
    var_names: pd.Index
    encoded: Encoded | None = None

    def __post_init__(self):
        if self.encoded is None:
            n = self.X.shape[0]
            self.encoded = Encoded(np.zeros((n, 0), np.float32), np.zeros(n, np.int64), np.zeros(n, np.int64))

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

    def minibatch(self, index: np.ndarray, device: torch.device | str = "cpu"):
        """``(x, covariates, batch, label)`` of the given rows as tensors on ``device``
        (``covariates`` None when the model has none)."""
        return (self.batch(index, device), *self.encoded.rows(index).to(device))

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> Iterator[tuple]:
        """All cells in order, ``(index, (x, covariates, batch, label))`` per minibatch."""
        for start in range(0, self.n_obs, batch_size):
            index = np.arange(start, min(start + batch_size, self.n_obs))
            yield index, self.minibatch(index, device)


def read_data(
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    kind: DataKind = "counts",
    allow_empty_genes: bool = False,
    covariates: CovariateSpec | None = None,
) -> CountData:
    """Take the matrix in ``adata.layers[layer]`` (``adata.X`` when ``layer`` is None) and
    check that a likelihood of data type ``kind`` can model it.

    Raises
    ------
    InvalidDataError
        For an empty AnnData, a missing layer, NaN or infinite values, values the
        likelihood cannot model (negative or non-integer counts, values outside [0, 1]),
        and, for counts, cells without any counts and (unless ``allow_empty_genes``, as
        when scoring a few new cells) genes without any counts; and covariates (given a
        ``CovariateSpec``) that are missing, not numeric or of unknown categories.
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
    encoded = covariates.encode(adata.obs) if covariates is not None else None
    return CountData(X, adata.obs_names.copy(), adata.var_names.copy(), encoded)


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
