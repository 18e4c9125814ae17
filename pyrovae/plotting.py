"""Figures: training curves, 2-D views and activity of the latent space, posterior
predictive checks, and volcano plots of differential expression."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

import anndata as ad
import numpy as np
import pandas as pd

from ._threads import torch_threads_kept

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .criticism import PosteriorPredictiveCheck

__all__ = [
    "plot_clusters",
    "plot_embedding",
    "plot_history",
    "plot_latent_activity",
    "plot_ppc",
    "plot_ppc_calibration",
    "plot_ppc_dispersion",
    "plot_ppc_zeros",
    "plot_reliability",
    "umap",
    "volcano",
]


def plot_history(history: pd.DataFrame, ax=None):
    """Training objective and validation ELBO per epoch, with the training's events.

    Vertical lines mark where each KL warm-up ended (only where the weight really reached
    1), where a warm-up started again (the weight fell), and where the prior changed
    (``prior`` column; histories saved before it existed have no such marks): the jump in
    the ELBO at a prior swap is a change of model, not progress.

    Examples
    --------
    >>> import pyrovae
    >>> from pyrovae.plotting import plot_history
    >>> adata = pyrovae.datasets.simulate(n_cells=120, n_genes=40, n_clusters=3, seed=0)
    >>> model = pyrovae.fit(adata, likelihood="nb", max_epochs=2, kl_warmup_epochs=1,
    ...                     progress=False)
    >>> ax = plot_history(model.history)
    >>> ax.get_xlabel()
    'epoch'
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    if len(history) == 0:
        raise ValueError("the model has not been trained yet: the history is empty")
    epoch = history["epoch"].to_numpy()
    ax.plot(epoch, history["train_elbo"], label="training (KL weighted by warm-up)")
    if history["validation_elbo"].notna().any():
        val = history["validation_elbo"].reset_index(drop=True)
        ax.plot(epoch, val, label="validation")
        best = int(val.idxmax())
        ax.scatter([epoch[best]], [val.iloc[best]], color="black", zorder=3,
                   label=f"best: {val.iloc[best]:.1f} (epoch {epoch[best]})")
    for kind, at in history_events(history):
        style = {"warm-up end": dict(color="grey", ls="--", label="end of KL warm-up"),
                 "warm-up restart": dict(color="tab:red", ls=":", label="KL warm-up restarted"),
                 "prior": dict(color="tab:purple", ls="-.", label=f"prior: {at[1]}")}[kind]
        ax.axvline(at[0] + 0.5, lw=0.8, **style)
    values = history[["train_elbo", "validation_elbo"]].to_numpy(dtype=float).ravel()
    values = values[np.isfinite(values)]
    tail = values[len(values) // 10 :] if len(values) >= 10 else values
    lo, hi = np.percentile(tail, 2), values.max()
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO per cell (nats)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per kind of mark
    ax.legend(unique.values(), unique.keys(), frameon=False, fontsize="small")
    return ax


def history_events(history: pd.DataFrame) -> list[tuple[str, tuple[int, str]]]:
    """The events of a training history, in order: ``("warm-up end", (epoch, ""))`` after
    the last epoch below full KL weight of a warm-up that reached it, ``("warm-up restart",
    (epoch, ""))`` before an epoch whose weight fell, ``("prior", (epoch, "normal -> gmm"))``
    before an epoch with another prior than the one before; ``epoch`` is the epoch the line
    follows."""
    epoch = history["epoch"].to_numpy()
    weight = history["kl_weight"].to_numpy(dtype=float)
    prior = history["prior"].to_numpy() if "prior" in history else np.full(len(epoch), np.nan, object)
    events = []
    for i in range(1, len(epoch)):
        if weight[i] < weight[i - 1]:
            events.append(("warm-up restart", (int(epoch[i - 1]), "")))
        if weight[i] >= 1.0 > weight[i - 1]:
            events.append(("warm-up end", (int(epoch[i - 1]), "")))
        known = isinstance(prior[i], str) and isinstance(prior[i - 1], str)
        if known and prior[i] != prior[i - 1]:
            events.append(("prior", (int(epoch[i - 1]), f"{prior[i - 1]} -> {prior[i]}")))
    return events


def umap(adata: ad.AnnData, *, use_rep: str = "X_pyrovae", n_neighbors: int = 15,
         seed: int = 0) -> np.ndarray:
    """2-D UMAP coordinates of ``adata.obsm[use_rep]`` (``adata`` is not modified).

    Examples
    --------
    >>> import pyrovae
    >>> from pyrovae.plotting import umap
    >>> adata = pyrovae.datasets.simulate(n_cells=120, n_genes=40, n_clusters=3, seed=0)
    >>> model = pyrovae.fit(adata, likelihood="nb", max_epochs=2, kl_warmup_epochs=1,
    ...                     progress=False)
    >>> umap(adata).shape
    (120, 2)
    """
    import scanpy as sc

    if use_rep not in adata.obsm:
        raise KeyError(f"adata.obsm[{use_rep!r}] not found; available: {list(adata.obsm.keys())}")
    light = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names), obsm={use_rep: adata.obsm[use_rep]})
    with torch_threads_kept():  # pynndescent and umap-learn reset it (pyrovae._threads)
        sc.pp.neighbors(light, use_rep=use_rep, n_neighbors=n_neighbors, random_state=seed)
        sc.tl.umap(light, random_state=seed)
    return light.obsm["X_umap"]


def plot_embedding(coords: np.ndarray, labels, *, title: str = "", ax=None, point_size: float = 8,
                   path: str | os.PathLike | None = None) -> "Figure":
    """Scatter 2-D coordinates coloured by a categorical label, legend on the right; returns
    the Figure (of ``ax`` when given).

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.plotting import plot_embedding
    >>> coords = np.random.default_rng(0).normal(size=(30, 2))
    >>> fig = plot_embedding(coords, np.repeat(["a", "b", "c"], 10), title="three groups")
    >>> fig.axes[0].get_title()
    'three groups'
    """
    import matplotlib.pyplot as plt

    owned = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 5))
    labels = pd.Categorical(labels)
    cmap = plt.get_cmap("tab10" if len(labels.categories) <= 10 else "tab20")
    for i, cat in enumerate(labels.categories):
        mask = np.asarray(labels == cat)
        ax.scatter(coords[mask, 0], coords[mask, 1], s=point_size, color=cmap(i % cmap.N),
                   label=f"{cat} ({mask.sum()})", linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize="small",
              markerscale=2)
    return _saved(ax.figure, path, owned=owned)


def plot_clusters(adata: ad.AnnData, *, label_key: str | None = None,
                  cluster_key: str = "pyrovae_cluster", use_rep: str = "X_pyrovae",
                  seed: int = 0, path: str | os.PathLike | None = None) -> "Figure":
    """UMAP of the latent space coloured by the mixture's clusters and, side by side, by
    known labels (``adata.obs[label_key]``).

    The UMAP is ``adata.obsm["X_umap"]`` when there is one, else computed from
    ``adata.obsm[use_rep]`` (``adata`` is not modified). After ``pyrovae.fit(adata,
    prior="gmm")`` the clusters are in ``adata.obs["pyrovae_cluster"]``.

    Examples
    --------
    >>> import pyrovae
    >>> from pyrovae.plotting import plot_clusters
    >>> adata = pyrovae.datasets.simulate(n_cells=120, n_genes=40, n_clusters=3, seed=0)
    >>> model = pyrovae.fit(adata, likelihood="nb", prior="gmm", n_clusters=3, max_epochs=2,
    ...                     kl_warmup_epochs=1, progress=False)
    >>> fig = plot_clusters(adata, label_key="cluster")
    >>> len(fig.axes)
    2
    """
    import matplotlib.pyplot as plt

    keys = [cluster_key] + ([label_key] if label_key else [])
    for key in keys:
        if key not in adata.obs:
            hint = (" (fit with a mixture prior, e.g. pyrovae.fit(adata, prior='gmm'))"
                    if key == cluster_key else "")
            raise KeyError(f"adata.obs[{key!r}] not found{hint}; adata.obs has {list(adata.obs.columns)}")
    coords = adata.obsm["X_umap"] if "X_umap" in adata.obsm else umap(adata, use_rep=use_rep, seed=seed)
    fig, axes = plt.subplots(1, len(keys), figsize=(7.5 * len(keys), 5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        title = key
        if key == cluster_key:
            found = adata.uns.get("pyrovae", {}).get("clusters", {}).get("n_clusters")
            K = int(found) if found is not None else adata.obs[key].nunique()
            title = f"mixture clusters, argmax q(y | x), K = {K}"
        plot_embedding(coords, adata.obs[key].to_numpy(), title=title, ax=ax)
    fig.tight_layout()
    return _saved(fig, path)


# ---------------------------------------------------------------------------- latent space
def plot_latent_activity(latent_means: np.ndarray, *, threshold: float = 0.01,
                         path: str | os.PathLike | None = None) -> "Figure":
    """Activity of each latent dimension and the covariance of the latent means.

    Left: the activity ``A_p = Var_cells(E_q[z_p])`` of each dimension
    (:func:`pyrovae.metrics.latent_activity`, Burda et al. 2015) on a log axis, with the
    ``threshold`` above which a dimension counts as active. Right: the covariance matrix of
    the latent means across cells, as a heat map centred on 0.

    Parameters
    ----------
    latent_means
        Posterior means, ``(cells, n_latent)``, e.g. ``adata.obsm["X_pyrovae"]``.
    threshold
        Activity above which a dimension is active.
    path
        A file to save the figure to.

    Returns
    -------
    The matplotlib Figure.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.plotting import plot_latent_activity
    >>> means = np.random.default_rng(0).normal(size=(200, 4)) * [1.0, 0.5, 0.01, 0.0]
    >>> fig = plot_latent_activity(means)
    >>> len(fig.axes) >= 1
    True
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from .metrics import latent_activity, n_active

    latent_means = np.asarray(latent_means, dtype=np.float64)
    activity = latent_activity(latent_means)
    cov = np.atleast_2d(np.cov(latent_means, rowvar=False, ddof=0))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    dims = np.arange(len(activity))
    active = activity > threshold
    colors = {"active": "C0", "inactive": "darkgrey"}
    left.bar(dims[active], activity[active], color=colors["active"])
    left.bar(dims[~active], np.maximum(activity[~active], 1e-12), color=colors["inactive"])
    line = left.axhline(threshold, color="black", lw=0.8, ls="--")
    # legend entries made by hand: an empty bar group would otherwise lend its entry
    # another colour (or none)
    handles = [Patch(color=c, label=f"{k} ({(active if k == 'active' else ~active).sum()})")
               for k, c in colors.items()] + [line]
    line.set_label(f"threshold {threshold:g}")
    left.set_yscale("log")
    left.set_xticks(dims)
    left.set_xlabel("latent dimension")
    left.set_ylabel("activity: variance of E_q[z] across cells")
    left.set_title(f"{n_active(activity, threshold=threshold)} of {len(activity)} dimensions active")
    left.legend(handles=handles, frameon=False, fontsize="small")
    bound = float(np.abs(cov).max()) or 1.0
    image = right.imshow(cov, cmap="RdBu_r", vmin=-bound, vmax=bound)
    right.set_xticks(dims)
    right.set_yticks(dims)
    right.set_xlabel("latent dimension")
    right.set_ylabel("latent dimension")
    right.set_title("covariance of the latent means")
    fig.colorbar(image, ax=right, shrink=0.8)
    fig.tight_layout()
    return _saved(fig, path)


# ---------------------------------------------------------------------------- model criticism
def plot_ppc_zeros(genes: pd.DataFrame, *, ax=None,
                   path: str | os.PathLike | None = None) -> "Figure":
    """Observed vs replicated fraction of zeros per gene, with the replicates' 90 % intervals.

    Parameters
    ----------
    genes
        :attr:`pyrovae.criticism.PosteriorPredictiveCheck.genes`.
    ax, path
        Axes to draw on (a new figure if None); a file to save the figure to.

    Returns
    -------
    The matplotlib Figure.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.criticism import ppc_statistics
    >>> from pyrovae.plotting import plot_ppc_zeros
    >>> rng = np.random.default_rng(0)
    >>> check = ppc_statistics(rng.poisson(1.0, size=(50, 8)), rng.poisson(1.0, size=(20, 50, 8)))
    >>> fig = plot_ppc_zeros(check.genes)
    >>> len(fig.axes)
    1
    """
    return _plot_observed_vs_replicated(genes, "zero_fraction", log=False, ax=ax, path=path,
                                        label="fraction of zeros")


def plot_ppc_dispersion(genes: pd.DataFrame, *, statistic: Literal["cv", "variance"] = "cv",
                        ax=None, path: str | os.PathLike | None = None) -> "Figure":
    """Observed vs replicated dispersion per gene on log axes, with 90 % intervals.

    A model with too little dispersion (e.g. Poisson for over-dispersed counts) puts the
    genes above the diagonal: the observed value exceeds what it replicates.

    Parameters
    ----------
    genes
        :attr:`pyrovae.criticism.PosteriorPredictiveCheck.genes`.
    statistic
        ``"cv"`` (standard deviation / mean) or ``"variance"``.
    ax, path
        Axes to draw on (a new figure if None); a file to save the figure to.

    Returns
    -------
    The matplotlib Figure.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.criticism import ppc_statistics
    >>> from pyrovae.plotting import plot_ppc_dispersion
    >>> rng = np.random.default_rng(0)
    >>> check = ppc_statistics(rng.poisson(3.0, size=(50, 8)), rng.poisson(3.0, size=(20, 50, 8)))
    >>> fig = plot_ppc_dispersion(check.genes, statistic="variance")
    >>> len(fig.axes)
    1
    """
    if statistic not in ("cv", "variance"):
        raise ValueError(f"statistic must be 'cv' or 'variance', got {statistic!r}")
    label = "coefficient of variation" if statistic == "cv" else "variance"
    return _plot_observed_vs_replicated(genes, statistic, log=True, ax=ax, path=path, label=label)


def plot_ppc_calibration(calibration: pd.DataFrame, *, ax=None,
                         path: str | os.PathLike | None = None) -> "Figure":
    """Observed coverage of central intervals against their nominal level, per statistic.

    Parameters
    ----------
    calibration
        Nominal level x statistic, :attr:`pyrovae.criticism.PosteriorPredictiveCheck.calibration`.
    ax, path
        Axes to draw on (a new figure if None); a file to save the figure to.

    Returns
    -------
    The matplotlib Figure.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.criticism import ppc_statistics
    >>> from pyrovae.plotting import plot_ppc_calibration
    >>> rng = np.random.default_rng(0)
    >>> check = ppc_statistics(rng.poisson(3.0, size=(50, 8)), rng.poisson(3.0, size=(20, 50, 8)))
    >>> fig = plot_ppc_calibration(check.calibration)
    >>> len(fig.axes)
    1
    """
    import matplotlib.pyplot as plt

    owned = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    level = calibration.index.to_numpy(dtype=float)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="calibrated")
    for i, name in enumerate(calibration.columns):
        ax.plot(level, calibration[name], marker="o", ms=3, color=f"C{i}", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("nominal level of the central interval")
    ax.set_ylabel("observed coverage")
    ax.set_title("calibration of the posterior predictive")
    ax.legend(frameon=False, fontsize="small")
    return _saved(ax.figure, path, owned=owned)


def plot_reliability(table: pd.DataFrame, *, ax=None, label: str | None = None,
                     path: str | os.PathLike | None = None) -> "Figure":
    """Reliability diagram: accuracy against confidence per bin, the diagonal being
    perfect calibration.

    Parameters
    ----------
    table
        :func:`pyrovae.metrics.reliability_table` of some predictions.
    ax, label, path
        Axes to draw on (a new figure if None), a legend label for these predictions, a
        file to save the figure to.

    Returns
    -------
    The matplotlib Figure.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.metrics import reliability_table
    >>> from pyrovae.plotting import plot_reliability
    >>> probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    >>> fig = plot_reliability(reliability_table(probs, [0, 1, 1, 1], n_bins=5), label="q(y | x)")
    >>> fig.axes[0].get_xlabel()
    'confidence (max probability)'
    """
    import matplotlib.pyplot as plt

    owned = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    full = table[table["n_cells"] > 0]
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="calibrated")
    ax.plot(full["confidence"], full["accuracy"], marker="o", ms=3, label=label or "predictions")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability of the predicted labels")
    ax.legend(frameon=False, fontsize="small")
    return _saved(ax.figure, path, owned=owned)


def plot_ppc(check: "PosteriorPredictiveCheck", *,
             path: str | os.PathLike | None = None) -> "Figure":
    """Zeros, dispersion (CV) and calibration of a check, side by side.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.criticism import ppc_statistics
    >>> from pyrovae.plotting import plot_ppc
    >>> rng = np.random.default_rng(0)
    >>> check = ppc_statistics(rng.poisson(3.0, size=(50, 8)), rng.poisson(3.0, size=(20, 50, 8)))
    >>> len(plot_ppc(check).axes)
    3
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    plot_ppc_zeros(check.genes, ax=axes[0])
    plot_ppc_dispersion(check.genes, ax=axes[1])
    plot_ppc_calibration(check.calibration, ax=axes[2])
    fig.tight_layout()
    return _saved(fig, path)


def _plot_observed_vs_replicated(genes: pd.DataFrame, statistic: str, *, log: bool, ax,
                                 path, label: str) -> "Figure":
    import matplotlib.pyplot as plt

    owned = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    table = genes.xs(statistic, level="statistic")
    if log:  # genes without counts (0 on both axes) cannot be drawn on log axes
        table = table[(table["observed"] > 0) & (table["replicated_mean"] > 0)]
    observed, replicated = table["observed"].to_numpy(), table["replicated_mean"].to_numpy()
    errors = np.abs(np.stack([replicated - table["lower_90"], table["upper_90"] - replicated]))
    inside = table["in_90"].to_numpy(dtype=bool)
    for mask, color, name in [(inside, "C0", "inside"), (~inside, "C3", "outside")]:
        ax.errorbar(observed[mask], replicated[mask], yerr=errors[:, mask], fmt="o", ms=3,
                    color=color, elinewidth=0.6, alpha=0.8,
                    label=f"{name} the 90 % interval ({mask.sum()} genes)")
    values = np.concatenate([observed, table["lower_90"], table["upper_90"]])
    values = values[values > 0] if log else values
    lo, hi = (values.min(), values.max()) if len(values) else (0.0, 1.0)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(f"observed {label}")
    ax.set_ylabel(f"replicated {label} (mean, 90 % interval)")
    ax.set_title(f"{label} per gene")
    ax.legend(frameon=False, fontsize="small")
    return _saved(ax.figure, path, owned=owned)


# ---------------------------------------------------------------------------- differential expression
def volcano(table: pd.DataFrame, *, n_labels: int = 10, bayes_factor: float = 3.0,
            delta: float | None = None, ax=None, path: str | os.PathLike | None = None):
    """Volcano plot of a differential expression table: ``lfc_mean`` against the Bayes factor.

    The Bayes factor is ``log P(|LFC| > delta) - log P(|LFC| <= delta)`` with ``P`` the
    share of posterior draws, so it caps at ``log(1 / 1e-8)``, about 18.4, for every
    gene whose draws all lie beyond ``delta`` (``p = 1``; the ``1e-8`` keeps it finite,
    as in scVI): the genes on that line differ by more than ``delta`` in every draw,
    and more draws would not separate them. A dotted line marks the cap.

    Genes whose Bayes factor is above ``bayes_factor`` and whose ``|lfc_mean|`` is above
    ``delta`` are drawn in colour (up in group 1 red, down blue), the others grey; the
    ``n_labels`` genes with the most evidence (the table's first rows among the coloured
    ones) are labelled with their names.

    Parameters
    ----------
    table
        The result of :meth:`pyrovae.VAE.differential_expression` (any DataFrame indexed by
        gene with ``lfc_mean`` and ``bayes_factor`` columns, sorted by evidence).
    n_labels
        How many genes to label.
    bayes_factor
        Evidence to call a gene: 3 is ``P(|LFC| > delta) > 0.95``.
    delta
        Smallest ``|lfc_mean|`` to call a gene; the table's ``attrs["delta"]`` (or 0) when
        None. Drawn as dashed lines.
    ax, path
        Axes to draw on (a new figure if None); a file to save the figure to.

    Returns
    -------
    The matplotlib Figure (of ``ax`` when given).

    Examples
    --------
    >>> import pyrovae
    >>> from pyrovae.plotting import volcano
    >>> adata = pyrovae.datasets.simulate(n_cells=120, n_genes=40, n_clusters=3, seed=0)
    >>> model = pyrovae.fit(adata, likelihood="nb", max_epochs=2, kl_warmup_epochs=1,
    ...                     progress=False)
    >>> table = model.differential_expression(adata, "cluster", "0", n_samples=5)
    >>> ax = volcano(table, n_labels=3)
    >>> ax is not None
    True
    """
    import matplotlib.pyplot as plt

    from .de import EPS

    missing = [c for c in ("lfc_mean", "bayes_factor") if c not in table.columns]
    if missing:
        raise KeyError(f"the table has no column {missing}; expected the result of "
                       "VAE.differential_expression")
    owned = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5))
    if delta is None:
        delta = float(table.attrs.get("delta", 0.0))
    lfc, evidence = table["lfc_mean"].to_numpy(), table["bayes_factor"].to_numpy()
    first, second = table.attrs.get("group1", "group 1"), table.attrs.get("group2", "group 2")
    called = (evidence > bayes_factor) & (np.abs(lfc) > delta)
    groups = [(~called, "lightgrey", "not called"), (called & (lfc > 0), "C3", f"up in {first}"),
              (called & (lfc < 0), "C0", f"down in {first}")]
    for mask, color, name in groups:
        ax.scatter(lfc[mask], evidence[mask], s=8, color=color, linewidths=0,
                   label=f"{name} ({mask.sum()})")
    # many genes share the largest Bayes factor (p = 1): stack the labels of close points
    width, height = np.ptp(lfc) or 1.0, np.ptp(evidence) or 1.0
    lines: dict[int, int] = {}  # labelled gene -> line of its label below the point
    for i in np.flatnonzero(called)[:n_labels]:
        near = [line for j, line in lines.items()
                if abs(lfc[j] - lfc[i]) < 0.15 * width and abs(evidence[j] - evidence[i]) < 0.05 * height]
        lines[i] = max(near) + 1 if near else 0
        ax.annotate(str(table.index[i]), (lfc[i], evidence[i]), fontsize="x-small",
                    xytext=(4, 2 - 9 * lines[i]), textcoords="offset points",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"} if lines[i] else None)
    ax.axhline(bayes_factor, color="grey", lw=0.8, ls="--")
    cap = float(np.log((1 + EPS) / EPS))
    if len(evidence) and np.isclose(evidence.max(), cap):
        ax.axhline(cap, color="grey", lw=0.6, ls=":",
                   label=f"cap {cap:.1f}: all draws beyond delta ({np.isclose(evidence, cap).sum()})")
    for x in (-delta, delta) if delta > 0 else ():
        ax.axvline(x, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"mean log2 fold change, {first} over {second}")
    ax.set_ylabel(f"Bayes factor, log P(|LFC| > {delta:g}) / P(|LFC| <= {delta:g})")
    ax.set_title(f"{first} vs {second}: {called.sum()} of {len(table)} genes called")
    ax.legend(frameon=False, fontsize="small")
    return _saved(ax.figure, path, owned=owned)



def _saved(fig: "Figure", path: str | os.PathLike | None, *, owned: bool = True) -> "Figure":
    """Save ``fig`` to ``path`` (if given) and return it, displayed once in Jupyter.

    A figure this module created (``owned``) is closed under an inline backend (Jupyter):
    the returned Figure then displays once, as the cell's value, instead of once by the
    backend and once more as the value. Elsewhere it stays open for ``plt.show()``. A
    figure of the caller's (drawn on their ``ax``) is left as it is.
    """
    if path is not None:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    if owned and _inline_backend():
        import matplotlib.pyplot as plt

        plt.close(fig)
    return fig


def _inline_backend() -> bool:
    import matplotlib

    return "inline" in matplotlib.get_backend().lower()
