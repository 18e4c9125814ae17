"""Model criticism: posterior predictive checks of a fitted model against its data.

A posterior predictive check (Gelman, Meng & Stern 1996) draws replicated data sets
``x_rep ~ p(x_rep | x)`` from the fitted model, computes a statistic ``T`` of each, and asks
where the observed ``T(x)`` falls among the replicated ``T(x_rep)``. Here the statistics are
the ones single-cell counts are known to break models on:

- per gene: mean, variance, coefficient of variation (standard deviation / mean) and
  fraction of zeros, over cells;
- per cell: library size (total count) and number of detected (non-zero) genes.

Everything below :func:`posterior_predictive_check` works on arrays: ``X`` is the observed
cells x genes matrix (dense or scipy sparse) and ``replicates`` an array
``(n_replicates, cells, genes)``. Per-gene statistics are accumulated from sums over
cells, so replicates can be passed a block of cells at a time and memory stays bounded.

Intervals and p-values
----------------------
For one statistic of one gene (or cell), with ``R`` replicated values ``t_1..t_R`` and the
observed value ``t``:

- ``p_value = P(T_rep > t) + 0.5 P(T_rep = t)`` (the mid-p convention), the fractions taken
  over the ``R`` replicates. Values near 0 or 1 mean the model cannot reproduce ``t``.
- ``t`` is inside the central interval of level ``L`` when ``P(T_rep < t) <= (1 + L) / 2``
  and ``P(T_rep > t) <= (1 + L) / 2``: the interval runs from the smallest replicate ``v``
  with ``P(T_rep <= v) >= (1 - L) / 2`` to the largest ``v`` with
  ``P(T_rep >= v) >= (1 - L) / 2`` (empirical quantiles without interpolation, symmetric
  in the two tails; a value tied with the bound is inside).

The coverage of a level is the fraction of genes (or cells) whose observed value is inside.
For a well-specified model it is close to the level, or above it: posterior predictive
checks use the data twice and are known to be conservative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .vae import VAE

__all__ = [
    "CELL_STATISTICS",
    "GENE_STATISTICS",
    "LEVELS",
    "PosteriorPredictiveCheck",
    "cell_statistics",
    "compare",
    "gene_statistics",
    "posterior_predictive_check",
    "ppc_calibration",
    "ppc_pvalue",
    "ppc_statistics",
    "ppc_summary",
]

GeneStatistic = Literal["mean", "variance", "cv", "zero_fraction"]
CellStatistic = Literal["library_size", "n_detected"]

GENE_STATISTICS: tuple[GeneStatistic, ...] = ("mean", "variance", "cv", "zero_fraction")
CELL_STATISTICS: tuple[CellStatistic, ...] = ("library_size", "n_detected")
#: Nominal levels of the calibration curve: 0.05, 0.10, ..., 0.95.
LEVELS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))

_TOLERANCE = 1e-9  # for comparing fractions of replicates with (1 + level) / 2
_BLOCK_VALUES = 1 << 24  # replicated values summed at a time (as float64: 128 MiB)


# ---------------------------------------------------------------------------- statistics
@dataclass
class _GeneSums:
    """Sums over cells from which the per-gene statistics follow; blocks of cells add up.

    Sums of counts and of squared counts are exact in float64 (integers below 2**53), so
    equal multisets of counts give bit-identical statistics, and ties are real ties.
    """

    n_cells: int
    total: np.ndarray  # (..., genes)
    squares: np.ndarray
    zeros: np.ndarray

    @classmethod
    def of(cls, X) -> "_GeneSums":
        """Sums of a block ``(cells, genes)``, dense or sparse, or ``(..., cells, genes)``."""
        if sp.issparse(X):
            X = sp.csr_matrix(X, dtype=np.float64)
            nonzero = np.asarray((X != 0).sum(axis=0)).ravel()
            return cls(
                X.shape[0],
                np.asarray(X.sum(axis=0)).ravel(),
                np.asarray(X.multiply(X).sum(axis=0)).ravel(),
                (X.shape[0] - nonzero).astype(np.float64),
            )
        X = np.asarray(X)
        return cls(
            X.shape[-2],
            X.sum(axis=-2, dtype=np.float64),
            np.square(X, dtype=np.float64).sum(axis=-2),
            (X == 0).sum(axis=-2).astype(np.float64),
        )

    def __add__(self, other: "_GeneSums") -> "_GeneSums":
        return _GeneSums(self.n_cells + other.n_cells, self.total + other.total,
                         self.squares + other.squares, self.zeros + other.zeros)

    def statistics(self) -> dict[str, np.ndarray]:
        n = self.n_cells
        mean = self.total / n
        # population variance (ddof=0) from the exact sums; clipped at 0 against rounding
        variance = np.maximum(self.squares / n - mean**2, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            cv = np.where(mean > 0, np.sqrt(variance) / mean, 0.0)
        return {"mean": mean, "variance": variance, "cv": cv, "zero_fraction": self.zeros / n}


def _plus(total: _GeneSums | None, part: _GeneSums) -> _GeneSums:
    return part if total is None else total + part


def gene_statistics(X) -> dict[GeneStatistic, np.ndarray]:
    """Per-gene statistics over the cells of ``X``.

    Parameters
    ----------
    X
        Counts ``(cells, genes)``, dense or scipy sparse, or a stack ``(..., cells, genes)``.

    Returns
    -------
    ``{"mean", "variance", "cv", "zero_fraction"}``, each of shape ``(..., genes)``. The
    variance is the population variance (``ddof=0``); ``cv = sqrt(variance) / mean``, and
    0 for a gene without counts (no variation).

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.criticism import gene_statistics
    >>> stats = gene_statistics(np.array([[0, 3], [2, 3]]))
    >>> stats["mean"], stats["zero_fraction"]
    (array([1., 3.]), array([0.5, 0. ]))
    """
    return _GeneSums.of(X).statistics()


def cell_statistics(X) -> dict[CellStatistic, np.ndarray]:
    """Per-cell statistics over the genes of ``X``.

    Parameters
    ----------
    X
        Counts ``(cells, genes)``, dense or scipy sparse, or a stack ``(..., cells, genes)``.

    Returns
    -------
    ``{"library_size", "n_detected"}``: total count and number of non-zero genes, each of
    shape ``(..., cells)``.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.criticism import cell_statistics
    >>> stats = cell_statistics(np.array([[0, 3, 1], [2, 0, 0]]))
    >>> stats["library_size"], stats["n_detected"]
    (array([4., 2.]), array([2., 1.]))
    """
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        return {
            "library_size": np.asarray(X.sum(axis=1, dtype=np.float64)).ravel(),
            "n_detected": np.asarray((X != 0).sum(axis=1)).ravel().astype(np.float64),
        }
    X = np.asarray(X)
    return {
        "library_size": X.sum(axis=-1, dtype=np.float64),
        "n_detected": (X != 0).sum(axis=-1).astype(np.float64),
    }


# ---------------------------------------------------------------------------- comparisons
def _fractions(observed: np.ndarray, replicated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``P(T_rep < t)`` and ``P(T_rep > t)`` over the replicates (axis 0)."""
    observed, replicated = np.asarray(observed), np.asarray(replicated)
    if replicated.shape[1:] != observed.shape:
        raise ValueError(
            f"replicated values {replicated.shape} do not match the observed {observed.shape}: "
            "expected (n_replicates, *observed.shape)"
        )
    return (replicated < observed).mean(0), (replicated > observed).mean(0)


def ppc_pvalue(observed: np.ndarray, replicated: np.ndarray) -> np.ndarray:
    """Posterior predictive p-values, mid-p convention: ``P(T_rep > t) + 0.5 P(T_rep = t)``.

    Parameters
    ----------
    observed
        Observed statistics ``t``, any shape ``S``.
    replicated
        Replicated statistics, ``(n_replicates, *S)``.

    Returns
    -------
    p-values of shape ``S``, in [0, 1]; 0.5 when every replicate equals ``t``.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.criticism import ppc_pvalue
    >>> replicated = np.array([[1.0], [2.0], [3.0], [4.0]])
    >>> ppc_pvalue(np.array([2.0]), replicated)   # P(T_rep > 2) + P(T_rep = 2) / 2
    array([0.625])
    """
    return _mid_p(*_fractions(observed, replicated))


def _mid_p(below: np.ndarray, above: np.ndarray) -> np.ndarray:
    return above + 0.5 * (1.0 - below - above)


def _inside(below: np.ndarray, above: np.ndarray, level: float) -> np.ndarray:
    bound = (1.0 + level) / 2.0 + _TOLERANCE
    return (below <= bound) & (above <= bound)


def compare(observed: np.ndarray, replicated: np.ndarray, *,
            index: Sequence[str] | pd.Index | None = None) -> pd.DataFrame:
    """Where each observed statistic falls among its replicates.

    Parameters
    ----------
    observed
        Observed statistic of each item (gene or cell), ``(items,)``.
    replicated
        The statistic of each replicated data set, ``(n_replicates, items)``.
    index
        Names of the items (genes or cells).

    Returns
    -------
    One row per item: ``observed``; ``replicated_mean``; ``lower_90`` and ``upper_90``,
    the central 90 % interval of the replicates; ``below`` and ``above``, the fractions of
    replicates below and above the observed value; ``p_value`` (mid-p); ``in_50`` and
    ``in_90``, whether the observed value is inside the central 50 % and 90 % intervals
    (see the module docstring for the exact definition).

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.criticism import compare
    >>> replicated = np.arange(100, dtype=float).reshape(100, 1)   # 100 replicates, 1 gene
    >>> compare(np.array([99.5]), replicated)[["p_value", "in_50", "in_90"]]
       p_value  in_50  in_90
    0      0.0  False  False
    """
    observed = np.asarray(observed, dtype=np.float64)
    replicated = np.asarray(replicated, dtype=np.float64)
    below, above = _fractions(observed, replicated)
    ordered = np.sort(replicated, axis=0)
    n_rep = len(ordered)
    # the bounds of the interval defined in the module docstring, for L = 0.9
    k = int(np.ceil(0.05 * n_rep - _TOLERANCE))
    lower, upper = ordered[max(k - 1, 0)], ordered[n_rep - max(k, 1)]
    return pd.DataFrame(
        {
            "observed": observed,
            "replicated_mean": replicated.mean(0),
            "lower_90": lower,
            "upper_90": upper,
            "below": below,
            "above": above,
            "p_value": _mid_p(below, above),
            "in_50": _inside(below, above, 0.5),
            "in_90": _inside(below, above, 0.9),
        },
        index=None if index is None else pd.Index(index),
    )


# ---------------------------------------------------------------------------- the result
def ppc_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per statistic of a table of comparisons (``PosteriorPredictiveCheck.genes``,
    ``.cells``, or both concatenated).

    Returns
    -------
    Indexed by statistic: ``n`` (genes or cells compared), ``coverage_50`` and
    ``coverage_90`` (fractions inside the central 50 % and 90 % intervals),
    ``extreme_p`` (fraction of p-values below 0.05 or above 0.95), ``median_p`` and
    ``median_abs_log_ratio``, the median of ``|log(replicated_mean / observed)|`` over the
    items where both are positive (0.1 means replicated and observed typically differ by
    about 10 %).

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.criticism import ppc_statistics, ppc_summary
    >>> rng = np.random.default_rng(0)
    >>> check = ppc_statistics(rng.poisson(3.0, size=(50, 8)), rng.poisson(3.0, size=(20, 50, 8)))
    >>> int(ppc_summary(check.genes).loc["mean", "n"])
    8
    """
    def one(group: pd.DataFrame) -> pd.Series:
        positive = (group["observed"] > 0) & (group["replicated_mean"] > 0)
        ratio = np.log(group.loc[positive, "replicated_mean"] / group.loc[positive, "observed"])
        p = group["p_value"]
        return pd.Series({
            "n": len(group),
            "coverage_50": group["in_50"].mean(),
            "coverage_90": group["in_90"].mean(),
            "extreme_p": ((p < 0.05) | (p > 0.95)).mean(),
            "median_p": p.median(),
            "median_abs_log_ratio": ratio.abs().median() if positive.any() else np.nan,
        })

    statistics = table.index.get_level_values("statistic").unique()
    out = pd.DataFrame({s: one(table.xs(s, level="statistic")) for s in statistics}).T
    out["n"] = out["n"].astype(int)
    out.index.name = "statistic"
    return out


def ppc_calibration(table: pd.DataFrame, levels: Sequence[float] = LEVELS) -> pd.DataFrame:
    """Observed coverage of central intervals at each nominal level, per statistic.

    Returns
    -------
    Indexed by nominal level, one column per statistic: the fraction of genes (or cells)
    whose observed value falls inside the central interval of that level. A calibrated
    model follows the diagonal; a curve far below it means the model's replicates are too
    narrow or off centre for that statistic.

    Examples
    --------
    >>> import numpy as np
    >>> import pandas as pd
    >>> from pyrovae.criticism import compare, ppc_calibration
    >>> rng = np.random.default_rng(0)
    >>> replicated = rng.normal(size=(200, 500))
    >>> table = compare(rng.normal(size=500), replicated)   # a calibrated model
    >>> table.index = pd.MultiIndex.from_product([["mean"], range(500)],
    ...                                          names=["statistic", "gene"])
    >>> coverage = ppc_calibration(table, levels=(0.5, 0.9))
    >>> bool(np.allclose(coverage["mean"], coverage.index, atol=0.06))
    True
    """
    statistics = table.index.get_level_values("statistic").unique()
    out = {}
    for s in statistics:
        part = table.xs(s, level="statistic")
        below, above = part["below"].to_numpy(), part["above"].to_numpy()
        out[s] = [_inside(below, above, level).mean() for level in levels]
    frame = pd.DataFrame(out, index=pd.Index(list(levels), name="level"))
    frame.columns.name = "statistic"
    return frame


@dataclass(frozen=True, repr=False)
class PosteriorPredictiveCheck:
    """The result of a posterior predictive check.

    Attributes
    ----------
    genes
        Per-gene comparisons (see :func:`compare`), indexed by ``(statistic, gene)``, e.g.
        ``check.genes.loc["variance", "p_value"]``.
    cells
        Per-cell comparisons, indexed by ``(statistic, cell)``.
    summary
        :func:`ppc_summary` of both tables, one row per statistic.
    calibration
        :func:`ppc_calibration` of both tables: nominal level x statistic.
    n_replicates
        How many replicated data sets the check drew.

    Examples
    --------
    >>> import pyrovae
    >>> adata = pyrovae.datasets.simulate(n_cells=120, n_genes=40, n_clusters=3, seed=0)
    >>> model = pyrovae.fit(adata, likelihood="nb", max_epochs=2, kl_warmup_epochs=1,
    ...                     progress=False)
    >>> check = pyrovae.posterior_predictive_check(model, adata, n_samples=5)
    >>> check.n_replicates, check.genes.index.names
    (5, FrozenList(['statistic', 'gene']))
    """

    genes: pd.DataFrame
    cells: pd.DataFrame
    summary: pd.DataFrame
    calibration: pd.DataFrame
    n_replicates: int

    def __repr__(self) -> str:
        """A header and the summary, one row per statistic (the tables stay attributes)."""
        n_genes = len(self.genes.index.get_level_values("gene").unique())
        n_cells = len(self.cells.index.get_level_values("cell").unique())
        head = (f"PosteriorPredictiveCheck: {n_genes} genes, {n_cells} cells, "
                f"{self.n_replicates} replicated data sets")
        body = self.summary.to_string(float_format=lambda v: f"{v:.3g}")
        return f"{head}\n{body}\n(tables: .genes, .cells, .summary, .calibration; plots: .plot())"

    def _repr_html_(self) -> str:
        head = repr(self).splitlines()[0]
        return f"<p>{head}</p>{self.summary.to_html(float_format=lambda v: f'{v:.3g}')}"

    @classmethod
    def from_tables(cls, genes: pd.DataFrame, cells: pd.DataFrame,
                    n_replicates: int) -> "PosteriorPredictiveCheck":
        both = pd.concat([genes, cells])
        return cls(genes, cells, ppc_summary(both), ppc_calibration(both), n_replicates)

    def plot_zeros(self, *, ax=None, path=None) -> "Figure":
        """Observed vs replicated fraction of zeros per gene (:func:`pyrovae.plotting.plot_ppc_zeros`)."""
        from .plotting import plot_ppc_zeros

        return plot_ppc_zeros(self.genes, ax=ax, path=path)

    def plot_dispersion(self, *, statistic: Literal["cv", "variance"] = "cv", ax=None,
                        path=None) -> "Figure":
        """Observed vs replicated dispersion per gene, log axes
        (:func:`pyrovae.plotting.plot_ppc_dispersion`)."""
        from .plotting import plot_ppc_dispersion

        return plot_ppc_dispersion(self.genes, statistic=statistic, ax=ax, path=path)

    def plot_calibration(self, *, ax=None, path=None) -> "Figure":
        """Nominal vs observed coverage per statistic (:func:`pyrovae.plotting.plot_ppc_calibration`)."""
        from .plotting import plot_ppc_calibration

        return plot_ppc_calibration(self.calibration, ax=ax, path=path)

    def plot(self, *, path=None) -> "Figure":
        """The three plots side by side; returns the Figure (saved to ``path`` if given)."""
        from .plotting import plot_ppc

        return plot_ppc(self, path=path)


class _Accumulator:
    """Builds a check one block of cells at a time: per-gene sums, per-cell comparisons."""

    def __init__(self) -> None:
        self.observed: _GeneSums | None = None
        self.replicated: _GeneSums | None = None
        self.cells: dict[str, list[pd.DataFrame]] = {s: [] for s in CELL_STATISTICS}
        self.n_replicates: int | None = None

    def add(self, X, replicates: np.ndarray, obs_names: Sequence[str]) -> None:
        """Observed block ``(cells, genes)`` and its replicates ``(n_replicates, cells, genes)``."""
        replicates = np.asarray(replicates)
        if replicates.ndim != 3 or replicates.shape[1:] != X.shape:
            raise ValueError(
                f"replicates of shape {replicates.shape} do not match the observed matrix "
                f"{X.shape}: expected (n_replicates, cells, genes)"
            )
        if len(replicates) < 2:
            raise ValueError(f"a check needs at least 2 replicates, got {len(replicates)}")
        if self.n_replicates not in (None, len(replicates)):
            raise ValueError("every block of cells must have the same number of replicates")
        self.n_replicates = len(replicates)
        observed = cell_statistics(X)
        # cells in slices, so that float64 temporaries stay below _BLOCK_VALUES values
        step = max(1, _BLOCK_VALUES // (replicates.shape[0] * max(1, replicates.shape[2])))
        per_cell: dict[str, list[np.ndarray]] = {s: [] for s in CELL_STATISTICS}
        for start in range(0, X.shape[0], step):
            block = replicates[:, start : start + step]
            self.replicated = _plus(self.replicated, _GeneSums.of(block))
            for s, values in cell_statistics(block).items():
                per_cell[s].append(values)
        self.observed = _plus(self.observed, _GeneSums.of(X))
        for s in CELL_STATISTICS:
            replicated = np.concatenate(per_cell[s], axis=1)
            self.cells[s].append(compare(observed[s], replicated, index=obs_names))

    def result(self, var_names: Sequence[str]) -> PosteriorPredictiveCheck:
        if self.observed is None or self.replicated is None:
            raise ValueError("no cells were added")
        observed, replicated = self.observed.statistics(), self.replicated.statistics()
        genes = pd.concat(
            {s: compare(observed[s], replicated[s], index=var_names) for s in GENE_STATISTICS},
            names=["statistic", "gene"],
        )
        cells = pd.concat({s: pd.concat(self.cells[s]) for s in CELL_STATISTICS},
                          names=["statistic", "cell"])
        return PosteriorPredictiveCheck.from_tables(genes, cells, self.n_replicates)


def ppc_statistics(
    X,
    replicates: np.ndarray,
    *,
    obs_names: Sequence[str] | None = None,
    var_names: Sequence[str] | None = None,
) -> PosteriorPredictiveCheck:
    """Posterior predictive check of observed counts against replicated data sets.

    Parameters
    ----------
    X
        Observed counts, ``(cells, genes)``, dense or scipy sparse.
    replicates
        Replicated data sets, ``(n_replicates, cells, genes)``, at least 2.
    obs_names, var_names
        Names of the cells and genes in the tables (positions ``"0", "1", ...`` if None).

    Returns
    -------
    A :class:`PosteriorPredictiveCheck`: per-gene statistics (mean, variance, cv,
    zero_fraction) and per-cell statistics (library_size, n_detected), each with its
    observed value, replicated mean, mid-p p-value and whether it falls inside the central
    50 % and 90 % intervals of the replicates; the summary and calibration tables.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.criticism import ppc_statistics
    >>> rng = np.random.default_rng(0)
    >>> X = rng.poisson(3.0, size=(50, 8))
    >>> check = ppc_statistics(X, rng.poisson(3.0, size=(20, 50, 8)))
    >>> check.n_replicates, len(check.genes.loc["mean"])
    (20, 8)
    """
    if not sp.issparse(X):
        X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be a (cells, genes) matrix, got shape {X.shape}")
    obs_names = _names(obs_names, X.shape[0], "obs_names")
    var_names = _names(var_names, X.shape[1], "var_names")
    acc = _Accumulator()
    acc.add(X, replicates, obs_names)
    return acc.result(var_names)


def _names(names: Sequence[str] | None, n: int, what: str) -> pd.Index:
    if names is None:
        return pd.Index([str(i) for i in range(n)])
    names = pd.Index(names)
    if len(names) != n:
        raise ValueError(f"{what} has {len(names)} names for {n} rows/columns")
    return names


# ---------------------------------------------------------------------------- AnnData edge
def posterior_predictive_check(
    model: "VAE",
    adata: ad.AnnData,
    *,
    n_samples: int = 50,
    batch_size: int | None = None,
    seed: int = 0,
) -> PosteriorPredictiveCheck:
    """Draw replicated data from a fitted model and compare them with the data.

    Parameters
    ----------
    model
        A fitted :class:`pyrovae.VAE`.
    adata
        Cells x the model's genes; the observed matrix is read as the model reads it (its
        ``layer``, checked for its likelihood). ``adata`` is not modified.
    n_samples
        Replicated data sets: for each, ``z ~ q(z | x)`` and ``x_rep ~ p(x | z, l)`` per
        cell (:meth:`pyrovae.VAE.posterior_predictive_sample`). p-values move in steps of
        ``1 / (2 n_samples)``; 50 gives 90 % intervals between the 3rd smallest and 3rd
        largest replicate.
    batch_size
        Cells whose replicates are held in memory at a time. None chooses it so that one
        block of replicates holds at most about 2**25 values (128 MiB as float32).
    seed
        Seeds the draws. With one block of cells (the default for small data) this is
        ``model.posterior_predictive_sample(adata, n_samples, seed=seed)``; block ``b > 0``
        draws with a seed derived from ``(seed, b)``.

    Returns
    -------
    A :class:`PosteriorPredictiveCheck`, indexed by ``adata.obs_names`` and
    ``adata.var_names``.

    Examples
    --------
    >>> import pyrovae
    >>> adata = pyrovae.datasets.simulate(n_cells=120, n_genes=40, n_clusters=3, seed=0)
    >>> model = pyrovae.fit(adata, likelihood="nb", max_epochs=2, kl_warmup_epochs=1,
    ...                     progress=False)
    >>> check = pyrovae.posterior_predictive_check(model, adata, n_samples=5)
    >>> sorted(check.summary.index)
    ['cv', 'library_size', 'mean', 'n_detected', 'variance', 'zero_fraction']
    """
    from .data import read_data

    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2, got {n_samples}")
    data = read_data(adata, layer=model.layer, kind=model.likelihood.data, allow_empty_genes=True)
    if batch_size is None:
        batch_size = max(1, (1 << 25) // (n_samples * data.n_vars))
    acc = _Accumulator()
    for b, start in enumerate(range(0, data.n_obs, batch_size)):
        index = np.arange(start, min(start + batch_size, data.n_obs))
        block_seed = seed if b == 0 else int(np.random.SeedSequence([seed, b]).generate_state(1)[0])
        replicates = model.posterior_predictive_sample(adata[index], n_samples, seed=block_seed)
        acc.add(data.rows(index), replicates, data.obs_names[index])
    return acc.result(data.var_names)
