"""The AnnData edge: read the matrix a model needs, check it, and cut it into minibatches.

Nothing below this module knows about AnnData. Nothing here writes into the user's
AnnData or changes their matrix: conversions make copies.
"""

from __future__ import annotations

import math
import warnings
import os
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

__all__ = [
    "BackedData", "CountData", "CovariateSpec", "DeviceData", "Encoded", "InvalidDataError", "check_genes",
    "is_paths", "near_equal_batches", "on_device", "open_backed", "open_h5ad", "read_data",
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
    # set (not saved) for reading cells of a labels model: a missing labels column means
    # every cell is of this category (a query data set)
    unlabeled_category: str | None = None

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
        if not self.labels_key:
            label = np.zeros(n, np.int64)
        elif self.labels_key not in obs.columns and self.unlabeled_category is not None:
            label = np.full(n, self._unlabeled_code(), np.int64)
        else:
            label = self._codes(self.labels_key, obs, self.labels)
        return Encoded(covariates, batch, label)

    def _unlabeled_code(self) -> int:
        """The code of the unlabeled category, for cells read without a labels column."""
        if self.unlabeled_category not in self.labels:
            raise InvalidDataError(
                f"adata.obs[{self.labels_key!r}] not found, and this model was trained with every "
                f"cell labelled (no {self.unlabeled_category!r} cells): add the labels column"
            )
        return self.labels.index(self.unlabeled_category)

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


def _default_encoded(n: int) -> Encoded:
    return Encoded(np.zeros((n, 0), np.float32), np.zeros(n, np.int64), np.zeros(n, np.int64))


Shard = tuple[int, int]  # (rank, number of ranks) of a process in multi-process training


def near_equal_batches(index: np.ndarray, batch_size: int, rng: np.random.Generator | None,
                       shard: Shard = (0, 1)):
    """``index`` cut into near-equal minibatches (shuffled when ``rng`` is given), each sorted;
    never a batch of one cell, which batch norm cannot take.

    With ``shard=(rank, size)`` the cells are cut into a multiple of ``size`` minibatches
    and this rank gets every ``size``-th: the ranks see disjoint cells, together all of
    them, in the same number of steps (``rng`` must be seeded alike on every rank).
    """
    rank, size = shard
    if rng is not None:
        index = rng.permutation(index)
    # as many batches as batch_size asks for, but never so many that one has a single cell
    wanted = math.ceil(len(index) / (batch_size * size))
    n_batches = max(1, min(wanted, len(index) // (2 * size))) * size
    for chunk in np.array_split(index, n_batches)[rank::size]:
        yield np.sort(chunk)


class _Cells:
    """What the training loop and the fitted model need from a data source."""

    obs_names: pd.Index
    var_names: pd.Index
    encoded: Encoded

    @property
    def n_vars(self) -> int:
        return len(self.var_names)

    def rows(self, index: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def batch(self, index: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """The given rows as a dense tensor on ``device``."""
        return torch.from_numpy(self.rows(index)).to(device)

    def minibatch(self, index: np.ndarray, device: torch.device | str = "cpu"):
        """``(x, covariates, batch, label)`` of the given rows as tensors on ``device``
        (``covariates`` None when the model has none)."""
        return (self.batch(index, device), *self.encoded.rows(index).to(device))

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> Iterator[tuple]:
        """All cells in order, ``(index, (x, covariates, batch, label))`` per minibatch."""
        return self.epoch(np.arange(self.n_obs), batch_size, None, device)

    def epoch(self, index: np.ndarray, batch_size: int, rng: np.random.Generator | None,
              device: torch.device | str = "cpu", shard: Shard = (0, 1)) -> Iterator[tuple]:
        """One pass over the cells at ``index``: ``(index, minibatch)`` pairs, shuffled
        when ``rng`` is given, in order otherwise; this rank's share under ``shard``
        (see :func:`near_equal_batches`)."""
        for chunk in near_equal_batches(index, batch_size, rng, shard):
            if len(chunk):
                yield chunk, self.minibatch(chunk, device)


@dataclass
class CountData(_Cells):
    """A cells x genes matrix in memory (CSR or dense, float32) and the cells' encoded
    covariates, cut into dense minibatches on demand."""

    X: sp.csr_matrix | np.ndarray
    obs_names: pd.Index
    var_names: pd.Index
    encoded: Encoded | None = None

    def __post_init__(self):
        if self.encoded is None:
            self.encoded = _default_encoded(self.X.shape[0])

    @property
    def n_obs(self) -> int:
        return self.X.shape[0]

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Dense ``float32`` copy of the given rows."""
        block = self.X[index]
        return block.toarray() if sp.issparse(block) else np.asarray(block)

    def totals(self) -> np.ndarray:
        """Each cell's total count."""
        return np.asarray(self.X.sum(axis=1), dtype=np.float64).ravel()

    @property
    def nbytes(self) -> int:
        X = self.X
        return X.data.nbytes + X.indices.nbytes + X.indptr.nbytes if sp.issparse(X) else X.nbytes


class DeviceData(_Cells):
    """A :class:`CountData` moved once to a device (a GPU): minibatches are cut there, so
    an epoch copies nothing from the host. A CSR matrix stays CSR on the device and each
    minibatch is scattered into a dense block by index arithmetic."""

    def __init__(self, data: CountData, device: torch.device | str):
        self.device = torch.device(device)
        self.obs_names, self.var_names, self.encoded = data.obs_names, data.var_names, data.encoded
        self.n_obs, self._totals = data.n_obs, data.totals()
        X = data.X
        self.sparse = sp.issparse(X)
        if self.sparse:
            self.indptr = torch.from_numpy(X.indptr.astype(np.int64)).to(self.device)
            self.indices = torch.from_numpy(X.indices).to(self.device)
            self.values = torch.from_numpy(X.data).to(self.device)
        else:
            self.dense = torch.from_numpy(X).to(self.device)
        covariates, self.batch_index, self.label = self.encoded.to(self.device)
        self.covariates = covariates

    def totals(self) -> np.ndarray:
        return self._totals

    def rows(self, index: np.ndarray) -> np.ndarray:
        return self.batch(index).cpu().numpy()

    def batch(self, index, device=None) -> torch.Tensor:
        index = torch.as_tensor(index, device=self.device)
        if not self.sparse:
            return self.dense[index]
        starts, stops = self.indptr[index], self.indptr[index + 1]
        counts = stops - starts
        rows = torch.repeat_interleave(torch.arange(len(index), device=self.device), counts)
        first = torch.cumsum(counts, 0) - counts  # where each row's values start in the output
        positions = starts[rows] + torch.arange(len(rows), device=self.device) - first[rows]
        x = torch.zeros(len(index), self.n_vars, device=self.device)
        x[rows, self.indices[positions].long()] = self.values[positions]
        return x

    def minibatch(self, index, device=None):
        where = torch.as_tensor(index, device=self.device)
        covariates = self.covariates[where] if self.covariates is not None else None
        return self.batch(where), covariates, self.batch_index[where], self.label[where]


def on_device(data: _Cells, device: torch.device, share: float = 0.5) -> _Cells:
    """``data`` moved to a GPU ``device`` once when it takes less than ``share`` of the free
    memory there; otherwise (and on the CPU, or for streamed data) ``data`` itself."""
    if device.type != "cuda" or not isinstance(data, CountData):
        return data
    free, _ = torch.cuda.mem_get_info(device)
    return DeviceData(data, device) if data.nbytes < share * free else data


class BackedData(_Cells):
    """Cells in one or more ``.h5ad`` files opened with ``backed="r"``, read in chunks of
    consecutive rows: memory holds one chunk, whatever the number of cells.

    A training epoch visits the chunks in random order and the cells of each chunk in
    random order, minibatch by minibatch (chunk-wise shuffling, as ``AnnLoader`` and
    scvi-tools' large-data loaders do).
    """

    def __init__(self, parts: Sequence[ad.AnnData], *, kind: DataKind = "counts",
                 allow_empty_genes: bool = False, covariates: "CovariateSpec | None" = None,
                 chunk_size: int = 16_384, names: Sequence[str] | None = None):
        self.parts = list(parts)
        self.chunk_size = chunk_size
        names = list(names) if names is not None else [f"file {i}" for i in range(len(self.parts))]
        first = self.parts[0]
        for name, part in zip(names[1:], self.parts[1:]):
            if not part.var_names.equals(first.var_names):
                raise InvalidDataError(
                    f"{name} has other genes than {names[0]} "
                    f"({part.n_vars} vs {first.n_vars}, or another order): files trained "
                    "together must share their var_names"
                )
        self.offsets = np.cumsum([0] + [p.n_obs for p in self.parts])
        self.var_names = first.var_names.copy()
        obs = pd.concat([p.obs for p in self.parts]) if len(self.parts) > 1 else first.obs
        self.obs_names = pd.Index(obs.index)
        if self.n_obs == 0 or self.n_vars == 0:
            raise InvalidDataError(f"the data are empty ({self.n_obs} cells x {self.n_vars} genes)")
        self.encoded = covariates.encode(obs) if covariates is not None else _default_encoded(self.n_obs)
        self._totals = self._check(kind, allow_empty_genes)

    @property
    def n_obs(self) -> int:
        return int(self.offsets[-1])

    def totals(self) -> np.ndarray:
        return self._totals

    def block(self, start: int, stop: int, *, native: bool = False) -> sp.csr_matrix:
        """Rows ``start:stop`` (across files) as one float32 CSR matrix (in the files'
        own dtype with ``native``, as the checks read it)."""
        convert = _native if native else _as_float32
        pieces = []
        for f, part in enumerate(self.parts):
            lo, hi = max(start, self.offsets[f]), min(stop, self.offsets[f + 1])
            if lo < hi:
                piece = part.X[lo - self.offsets[f]: hi - self.offsets[f]]
                pieces.append(sp.csr_matrix(convert(piece, f"rows of file {f}")))
        return pieces[0] if len(pieces) == 1 else sp.vstack(pieces, format="csr")

    def rows(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index)
        order = np.argsort(index, kind="stable")
        out = np.empty((len(index), self.n_vars), np.float32)
        for f, part in enumerate(self.parts):
            mine = order[(index[order] >= self.offsets[f]) & (index[order] < self.offsets[f + 1])]
            if len(mine):
                local = index[mine] - self.offsets[f]
                block = part.X[local]
                out[mine] = block.toarray() if sp.issparse(block) else np.asarray(block)
        return out

    def epoch(self, index, batch_size, rng, device="cpu", shard=(0, 1)):
        index = np.sort(np.asarray(index))
        groups = list(np.array_split(index, max(1, math.ceil(len(index) / self.chunk_size))))
        if rng is not None:
            groups = [groups[g] for g in rng.permutation(len(groups))]
        for group in groups:
            if not len(group):
                continue
            start, stop = int(group[0]), int(group[-1]) + 1
            chunk = self.block(start, stop)  # every rank reads the chunk and takes its share
            for cells in near_equal_batches(group, batch_size, rng, shard):
                if not len(cells):
                    continue
                x = chunk[cells - start]
                x = torch.from_numpy(x.toarray()).to(device)
                yield cells, (x, *self.encoded.rows(cells).to(device))

    def _check(self, kind: DataKind, allow_empty_genes: bool) -> np.ndarray:
        """One pass over all chunks: the value checks of :func:`read_data`; returns the
        cells' totals."""
        totals = np.empty(self.n_obs)
        gene_totals = np.zeros(self.n_vars)
        for start in range(0, self.n_obs, self.chunk_size):
            stop = min(start + self.chunk_size, self.n_obs)
            chunk = self.block(start, stop, native=True)  # checked before the float32 cast
            where = f"X (cells {start}..{stop - 1})"
            _check_values(chunk, kind, where, self.obs_names[start:stop], self.var_names)
            _warn_inexact(chunk, kind, where, self.obs_names[start:stop], self.var_names)
            totals[start:stop] = np.asarray(chunk.sum(axis=1)).ravel()
            gene_totals += np.asarray(chunk.sum(axis=0)).ravel()
        if kind == "counts":
            _report_empty(totals, gene_totals if not allow_empty_genes else None, "X",
                          self.obs_names, self.var_names)
        return totals


def is_paths(source) -> bool:
    """Whether ``source`` names ``.h5ad`` files (a path or a list of paths)."""
    if isinstance(source, (str, os.PathLike)):
        return True
    return isinstance(source, (list, tuple)) and bool(source) and all(
        isinstance(p, (str, os.PathLike)) for p in source)


def open_backed(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[str], list[ad.AnnData]]:
    """The ``.h5ad`` file(s) at ``paths`` opened with ``backed="r"`` (obs in memory, X on
    disk), with their paths as a list."""
    paths = [str(paths)] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"no such file: {missing}")
    return paths, [ad.read_h5ad(p, backed="r") for p in paths]


def open_h5ad(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
              genes: Sequence[str] | None = None, **options) -> BackedData:
    """Open one or more ``.h5ad`` files with ``backed="r"`` as one data source
    (:class:`BackedData`, checked chunk by chunk); the files must share their genes, which
    must be ``genes`` when given."""
    paths, parts = open_backed(paths)
    if genes is not None:
        check_genes(parts[0].var_names, genes)
    return BackedData(parts, names=paths, **options)


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
    if adata.isbacked and layer is None:
        return BackedData([adata], kind=kind, allow_empty_genes=allow_empty_genes,
                          covariates=covariates)
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
    X = _native(X, where)  # checked as given: a cast to float32 could hide 3.00000001 or 1e39
    _check_values(X, kind, where, adata.obs_names, adata.var_names)
    _warn_inexact(X, kind, where, adata.obs_names, adata.var_names)
    X = _as_float32(X, where)
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


def _native(X, where: str) -> sp.csr_matrix | np.ndarray:
    """CSR or a dense array in the dtype given (copying only when in another form)."""
    if hasattr(X, "to_memory"):  # a backed sparse dataset
        X = X.to_memory()
    if sp.issparse(X):
        X = X.tocsr()
        if not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
            raise InvalidDataError(f"{where} must be a numeric matrix, got dtype {X.dtype}")
        if not X.has_canonical_format:  # duplicate entries summed, as a count matrix means them
            X = X.copy()
            X.sum_duplicates()
        return X
    try:
        X = np.asarray(X)
    except Exception as err:  # e.g. a dask array that cannot be computed
        raise InvalidDataError(f"{where} of type {type(X).__name__} is not supported") from err
    if X.ndim != 2 or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise InvalidDataError(f"{where} must be a numeric matrix, got dtype {X.dtype}")
    return X


def _as_float32(X, where: str) -> sp.csr_matrix | np.ndarray:
    """CSR or dense float32, copying only when the input is in another form."""
    X = _native(X, where)
    if sp.issparse(X):
        return X.astype(np.float32) if X.dtype != np.float32 else X
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
    if values.dtype.kind in "fiu" and values.dtype.itemsize > 4 or values.dtype.kind == "u" \
            and values.dtype.itemsize == 4:  # more range or precision than float32 has
        checks.append(("out-of-float32-range", lambda v: np.abs(v) > _FLOAT32_MAX,
                       "pyrovae computes in float32 (largest value about 3.4e38); rescale the data"))
    for label, bad, advice in checks:
        n, first = _first_bad(values, bad)
        if n:
            raise InvalidDataError(
                f"{where} holds {n:,} {label} value{'s' if n > 1 else ''} "
                f"(first: {float(values[first]):.10g} at {_position(X, first, obs_names, var_names)}); "
                + advice
            )


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_EXACT_IN_FLOAT32 = 2 ** 24  # integers above this are rounded by the cast to float32


def _warn_inexact(X, kind: DataKind, where: str, obs_names, var_names) -> None:
    values = _values(X)
    if kind != "counts" or values.dtype.itemsize <= 4 and values.dtype.kind != "u" \
            or values.dtype.kind not in "fiu":
        return
    n, first = _first_bad(values, lambda v: v > _EXACT_IN_FLOAT32)
    if n:
        warnings.warn(
            f"{where} holds {n:,} count{'s' if n > 1 else ''} above 2**24 (first: "
            f"{float(values[first]):.0f} at {_position(X, first, obs_names, var_names)}), which "
            "float32 cannot hold exactly: they are rounded to the nearest float32", UserWarning,
            stacklevel=4)


def _check_not_empty(X, where: str, obs_names, var_names, *, genes: bool) -> None:
    cell_totals = np.asarray(X.sum(axis=1)).ravel()
    gene_totals = np.asarray(X.sum(axis=0)).ravel() if genes else None
    _report_empty(cell_totals, gene_totals, where, obs_names, var_names)


def _report_empty(cell_totals, gene_totals, where: str, obs_names, var_names) -> None:
    """Raise for cells (and, unless ``gene_totals`` is None, genes) without counts."""
    empty = np.flatnonzero(cell_totals == 0)
    if len(empty):
        raise InvalidDataError(
            f"{len(empty):,} of {len(cell_totals):,} cells have no counts in {where} "
            f"(e.g. {_examples(obs_names[empty])}); remove them first, e.g. with "
            "sc.pp.filter_cells(adata, min_counts=1)"
        )
    if gene_totals is None:
        return
    empty = np.flatnonzero(gene_totals == 0)
    if len(empty):
        raise InvalidDataError(
            f"{len(empty):,} of {len(gene_totals):,} genes have no counts in any cell of {where} "
            f"(e.g. {_examples(var_names[empty])}); remove them first, e.g. with "
            "sc.pp.filter_genes(adata, min_cells=1)"
        )
