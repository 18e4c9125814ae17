"""Differential expression from a fitted model, in the manner of scVI's "change" mode
(Boyeau et al. 2019).

For two groups of cells, the model's posterior gives draws of each cell's normalised
expression ``rho_ng`` (the share of the cell's counts that gene ``g`` takes, zero inflation
left out). From them come draws of a log2 fold-change ``LFC_g`` of group 1 over group 2
(``c`` a small pseudocount), in one of two ways:

``mode="groups"`` (default): do the groups differ?
    In each posterior draw, resample the cells of each group with replacement (a
    bootstrap) and take the difference of the groups' mean log expression::

        LFC_g = mean_{i in boot(group 1)} log2(rho_ig + c) - mean_{j in boot(group 2)} log2(rho_jg + c)

    The spread of these draws is the uncertainty of the groups' typical expression: the
    posterior's and that of having finitely many cells. Differences between the cells
    within a group average out.

``mode="cells"``: does a cell of group 1 differ from a cell of group 2?
    scVI's pairing: in each posterior draw, random pairs of one cell of each group give
    ``LFC_g = log2(rho_ig + c) - log2(rho_jg + c)``. Its spread also holds the variation of
    the cells within each group, so in heterogeneous groups (several cell types, a
    continuum) every gene varies between random cells and the evidence below is high for
    all of them: compare within one cell type, or use ``"groups"``.

Both modes have the same mean LFC (the difference of the groups' mean log2 expression).
A gene is called differentially expressed when its change is larger than ``delta`` in
either direction; the evidence is the share of draws ``p = P(|LFC| > delta)`` and its log
odds, the Bayes factor ``log(p / (1 - p))``.

- :func:`log_fold_changes` and :func:`change_statistics` work on arrays of draws;
- :func:`select_groups` finds the cells of two groups in ``adata.obs``;
- :func:`differential_expression` takes a fitted model, an AnnData and two groups of cells
  (``VAE.differential_expression`` calls it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Hashable, Literal, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .data import InvalidDataError, _require_column

if TYPE_CHECKING:
    from .vae import VAE

__all__ = ["change_statistics", "differential_expression", "log_fold_changes", "select_groups"]

Mode = Literal["groups", "cells"]
EPS = 1e-8  # keeps the Bayes factor finite when p is 0 or 1 (as scVI)


def log_fold_changes(
    expression1: np.ndarray,
    expression2: np.ndarray,
    *,
    mode: Mode = "groups",
    n_comparisons: int = 100,
    pseudocount: float = 1e-5,
    seed: int = 0,
) -> np.ndarray:
    """Draws of the log2 fold-change of each gene, group 1 over group 2.

    Parameters
    ----------
    expression1, expression2
        Posterior draws of normalised expression, ``(n_samples, cells, genes)``, for the
        cells of each group (the same number of draws and genes; any number of cells).
    mode
        ``"groups"``: each comparison is a bootstrap resample of the cells of each group,
        and its LFC the difference of the groups' mean log2 expression; ``"cells"``: each
        comparison is a random pair of cells, one of each group (see the module's text).
    n_comparisons
        Comparisons per posterior draw.
    pseudocount
        Added to the expression before the log, on the scale of ``expression1``: with
        shares of each cell's counts (``library_size=1``), ``1e-5`` is 0.1 counts per
        10,000. It keeps the fold changes of genes that neither group expresses near 0.
    seed
        Seeds the resampling or pairing.

    Returns
    -------
    ``(n_samples * n_comparisons, genes)``, the comparisons of posterior draw ``s`` in rows
    ``s * n_comparisons`` to ``(s + 1) * n_comparisons - 1``.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.de import log_fold_changes
    >>> rng = np.random.default_rng(0)
    >>> one = rng.gamma(5.0, [4.0, 1.0], size=(5, 30, 2))   # (draws, cells, genes)
    >>> two = rng.gamma(5.0, 1.0, size=(5, 40, 2))
    >>> lfc = log_fold_changes(one, two, n_comparisons=50)
    >>> lfc.shape[-1], bool(lfc[..., 0].mean() > 1 > abs(lfc[..., 1].mean()))
    (2, True)
    """
    expression1, expression2 = np.asarray(expression1), np.asarray(expression2)
    if expression1.ndim != 3 or expression2.ndim != 3:
        raise ValueError(
            "expected posterior draws of shape (n_samples, cells, genes), got shapes "
            f"{expression1.shape} and {expression2.shape}"
        )
    (s1, n1, g1), (s2, n2, g2) = expression1.shape, expression2.shape
    if s1 != s2 or g1 != g2:
        raise ValueError(
            f"the two groups need the same number of draws and genes, got {expression1.shape} "
            f"and {expression2.shape}"
        )
    if n1 == 0 or n2 == 0:
        raise ValueError(f"both groups need cells, got {n1} and {n2}")
    if pseudocount < 0:
        raise ValueError(f"pseudocount must be >= 0, got {pseudocount}")
    if mode not in ("groups", "cells"):
        raise ValueError(f"mode must be 'groups' or 'cells', got {mode!r}")
    rng = np.random.default_rng(seed)
    log1 = np.log2(expression1 + pseudocount)
    log2 = np.log2(expression2 + pseudocount)
    if mode == "groups":  # (draws, comparisons, cells) weights of a bootstrap resample
        def resampled_mean(logs: np.ndarray, n: int) -> np.ndarray:
            weights = rng.multinomial(n, np.full(n, 1.0 / n), size=(s1, n_comparisons)) / n
            return weights.astype(logs.dtype) @ logs

        lfc = resampled_mean(log1, n1) - resampled_mean(log2, n2)
    else:
        i = rng.integers(n1, size=(s1, n_comparisons))
        j = rng.integers(n2, size=(s1, n_comparisons))
        draw = np.arange(s1)[:, None]
        lfc = log1[draw, i] - log2[draw, j]
    return lfc.reshape(s1 * n_comparisons, g1)


def change_statistics(lfc: np.ndarray, *, delta: float = 0.25) -> pd.DataFrame:
    """Per gene, the summaries of log fold-change draws and the evidence of a change.

    Parameters
    ----------
    lfc
        ``(draws, genes)`` log fold-changes (:func:`log_fold_changes`).
    delta
        Smallest change that counts, on the scale of ``lfc`` (log2: 0.25 is a change of
        19 %).

    Returns
    -------
    DataFrame with one row per gene (in the input order): ``lfc_mean``, ``lfc_median``,
    ``lfc_std``, ``proba_de`` (``P(|LFC| > delta)``, the share of draws) and
    ``bayes_factor`` (``log(p + eps) - log(1 - p + eps)``, natural log, ``eps = 1e-8``).

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.de import change_statistics
    >>> rng = np.random.default_rng(0)
    >>> lfc = rng.normal([2.0, 0.0], 0.1, size=(1000, 2))   # draws for 2 genes
    >>> table = change_statistics(lfc)
    >>> bool(table["bayes_factor"].iloc[0] > table["bayes_factor"].iloc[1])
    True
    """
    lfc = np.asarray(lfc)
    if lfc.ndim != 2 or len(lfc) == 0:
        raise ValueError(f"expected log fold-change draws of shape (draws, genes), got {lfc.shape}")
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    p = (np.abs(lfc) > delta).mean(axis=0)
    return pd.DataFrame({
        "lfc_mean": lfc.mean(axis=0),
        "lfc_median": np.median(lfc, axis=0),
        "lfc_std": lfc.std(axis=0),
        "proba_de": p,
        "bayes_factor": np.log(p + EPS) - np.log(1 - p + EPS),
    })


def select_groups(
    obs: pd.DataFrame,
    groupby: str,
    group1: Hashable | Sequence[Hashable],
    group2: Hashable | Sequence[Hashable] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the cells of two groups, given by values of ``obs[groupby]``.

    ``group1`` and ``group2`` are one value or a list of values (compared as strings, so
    ``1`` and ``"1"`` are the same); ``group2=None`` means every other cell with a value.

    Raises
    ------
    InvalidDataError
        If ``groupby`` is not a column (the message lists the columns), a value is neither
        in the column nor one of its categories (the message lists those there are), or a
        group has no cells.
    ValueError
        If the two groups share a value.

    Examples
    --------
    >>> import pandas as pd
    >>> from pyrovae.de import select_groups
    >>> obs = pd.DataFrame({"cell_type": ["B", "T", "B", "NK"]})
    >>> select_groups(obs, "cell_type", "B")             # B against the rest
    (array([0, 2]), array([1, 3]))
    >>> select_groups(obs, "cell_type", "B", "NK")
    (array([0, 2]), array([3]))
    """
    _require_column(obs, groupby)
    column = obs[groupby]
    known = column.notna().to_numpy()
    values = np.where(known, column.astype(str).to_numpy(), "")
    present = sorted(set(values[known]))
    # a category without cells is a known value of an empty group, not a typo
    allowed = set(present) | ({str(c) for c in column.cat.categories}
                              if isinstance(column.dtype, pd.CategoricalDtype) else set())

    def as_list(group) -> list[str]:
        single = isinstance(group, (str, bytes)) or not isinstance(group, Sequence)
        return [str(v) for v in ([group] if single else group)]

    wanted1 = as_list(group1)
    wanted2 = as_list(group2) if group2 is not None else sorted(set(present) - set(wanted1))
    for name, wanted in (("group1", wanted1), ("group2", wanted2 if group2 is not None else [])):
        missing = [v for v in wanted if v not in allowed]
        if missing:
            raise InvalidDataError(
                f"{name} {missing} not found in adata.obs[{groupby!r}]; its values are "
                f"{present[:20]}{' ...' if len(present) > 20 else ''}"
            )
    shared = sorted(set(wanted1) & set(wanted2))
    if shared:
        raise ValueError(f"group1 and group2 share the values {shared}; the groups must not overlap")
    cells1 = np.flatnonzero(known & np.isin(values, wanted1))
    cells2 = np.flatnonzero(known & np.isin(values, wanted2))
    for name, cells, wanted in (("group1", cells1, wanted1), ("group2", cells2, wanted2)):
        if len(cells) == 0:
            what = wanted if (name == "group1" or group2 is not None) else "(all other cells)"
            raise InvalidDataError(f"{name} {what} of adata.obs[{groupby!r}] has no cells")
    return cells1, cells2


def differential_expression(
    model: "VAE",
    adata: ad.AnnData,
    groupby: str,
    group1: Hashable | Sequence[Hashable],
    group2: Hashable | Sequence[Hashable] | None = None,
    *,
    delta: float = 0.25,
    mode: Mode = "groups",
    n_samples: int = 10,
    n_comparisons: int = 100,
    max_cells: int | None = 500,
    pseudocount: float = 1e-5,
    library_size: float = 1e4,
    transform_batch: str | Sequence[str] | None = None,
    batch_size: int = 1024,
    seed: int = 0,
) -> pd.DataFrame:
    """Differential expression between two groups of cells, from the model's posterior.

    In each of ``n_samples`` posterior draws, ``n_comparisons`` comparisons of the two
    groups (bootstrap resamples of each group, or random pairs of cells: ``mode``) give
    draws of each gene's log2 fold-change, group 1 over group 2, in normalised expression
    (:func:`log_fold_changes`); their summaries and the evidence of a change larger than
    ``delta`` are :func:`change_statistics`.

    Parameters
    ----------
    model
        A fitted model with a count likelihood.
    adata
        The cells, with the model's genes (and covariate columns).
    groupby
        Column of ``adata.obs`` that defines the groups.
    group1, group2
        A value of ``adata.obs[groupby]`` or a list of values; ``group2=None`` compares
        ``group1`` with all other cells.
    delta
        Smallest log2 fold-change that counts as a change (0.25: 19 %).
    mode
        ``"groups"``: do the groups' typical expressions differ? ``"cells"``: scVI's
        pairing, does a random cell of one group differ from a random cell of the other?
        (see :mod:`pyrovae.de`).
    n_samples
        Posterior draws per cell.
    n_comparisons
        Comparisons per posterior draw: ``n_samples * n_comparisons`` draws of each LFC.
    max_cells
        At most this many cells of each group (chosen at random, seeded) are decoded;
        None decodes all. The fractions of non-zero counts use every cell. In mode
        ``"groups"`` the bootstrap resamples the decoded cells, so a larger group is
        judged as if it had ``max_cells`` cells: the evidence is on the cautious side.
    pseudocount
        Added to each cell's normalised expression (its share of the counts) before the
        log; ``1e-5`` is 0.1 counts per 10,000.
    library_size
        Scale of the reported expression (``expression1``, ``expression2``): counts per
        ``library_size``. The fold changes do not depend on it.
    transform_batch
        Decode every cell as if it came from this batch, or average over these batches
        (see :meth:`VAE.get_normalized_expression`): batch-corrected DE, for groups whose
        cells come from different batches. ``None`` decodes each cell in its own batch.
    batch_size, seed
        Cells decoded at a time; seeds the choice of cells, the posterior draws and the
        comparisons.

    Returns
    -------
    DataFrame indexed by gene (``index.name == "gene"``), sorted by evidence (Bayes factor,
    then ``|lfc_mean|``, both decreasing), with the columns of :func:`change_statistics`
    and ``expression1``, ``expression2`` (mean normalised expression of each group, counts
    per ``library_size``), ``nonzero1``, ``nonzero2`` (fraction of the group's cells with a
    non-zero count of the gene) and ``expected_fdr`` (the posterior expected share of
    false discoveries if this gene and all above it are called: the running mean of
    ``1 - proba_de``). ``attrs`` records the groups, their sizes, ``delta`` and ``mode``.
    ``adata`` is not modified.

    Examples
    --------
    >>> import pyrovae
    >>> from pyrovae.de import differential_expression
    >>> adata = pyrovae.datasets.simulate(n_cells=120, n_genes=40, n_clusters=3, seed=0)
    >>> model = pyrovae.fit(adata, likelihood="nb", max_epochs=2, kl_warmup_epochs=1,
    ...                     progress=False)
    >>> table = differential_expression(model, adata, "cluster", "0", "1", n_samples=5)
    >>> len(table) == adata.n_vars and "bayes_factor" in table
    True
    """
    if not model.likelihood.is_count:
        raise ValueError(
            f"differential expression compares normalised expression of counts; the model's "
            f"likelihood {model.likelihood.name!r} does not model counts"
        )
    data = model._read(adata)  # checks the genes, the layer and the covariates once
    cells1, cells2 = select_groups(adata.obs, groupby, group1, group2)
    rng = np.random.default_rng(seed)

    def decode(cells: np.ndarray, seed: int) -> np.ndarray:
        if max_cells is not None and len(cells) > max_cells:
            cells = np.sort(rng.choice(cells, size=max_cells, replace=False))
        return model.get_normalized_expression(
            adata[cells], library_size=1.0, transform_batch=transform_batch,
            n_samples=n_samples, return_samples=True, batch_size=batch_size, seed=seed,
        )

    expression1, expression2 = decode(cells1, seed), decode(cells2, seed + 1)
    lfc = log_fold_changes(expression1, expression2, mode=mode, n_comparisons=n_comparisons,
                           pseudocount=pseudocount, seed=seed)
    table = change_statistics(lfc, delta=delta)
    table.index = pd.Index(model.var_names, name="gene")
    table["expression1"] = expression1.mean(axis=(0, 1)) * library_size
    table["expression2"] = expression2.mean(axis=(0, 1)) * library_size
    table["nonzero1"] = _nonzero_fraction(data, cells1, batch_size)
    table["nonzero2"] = _nonzero_fraction(data, cells2, batch_size)
    order = np.lexsort((-table["lfc_mean"].abs().to_numpy(), -table["bayes_factor"].to_numpy()))
    table = table.iloc[order]
    table["expected_fdr"] = np.cumsum(1 - table["proba_de"].to_numpy()) / np.arange(1, len(table) + 1)
    attrs: dict[str, Any] = {
        "groupby": groupby, "group1": group1, "group2": "rest" if group2 is None else group2,
        "n_cells1": len(cells1), "n_cells2": len(cells2), "delta": delta, "mode": mode,
        "transform_batch": transform_batch,
    }
    table.attrs.update(attrs)
    return table


def _nonzero_fraction(data, cells: np.ndarray, chunk: int) -> np.ndarray:
    """Share of ``cells`` with a non-zero count of each gene, read ``chunk`` rows at a time
    (the data may be streamed from disk)."""
    nonzero = np.zeros(data.n_vars)
    for start in range(0, len(cells), chunk):
        nonzero += (data.rows(cells[start:start + chunk]) != 0).sum(axis=0)
    return nonzero / len(cells)
