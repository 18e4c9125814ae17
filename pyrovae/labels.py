"""Known labels: a semi-supervised mixture whose components are the cell types (Kingma et
al. 2014's M2, scANVI), label prediction with a novelty score, and temperature scaling.

The prior :class:`SemiSupervised` (registered as ``"labels"``) has one component per known
label. Its cluster ``y`` is observed for labelled cells and summed out exactly
(``TraceEnum_ELBO``) for the others, and its guide adds M2's classification term on
``q(y | x)`` for the labelled cells. :func:`predict`, :func:`novelty` and :func:`calibrate`
work on a fitted :class:`pyrovae.VAE` with this prior (also as its methods ``predict``,
``novelty`` and ``calibrate``).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Literal, Sequence, get_args

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from torch.nn import functional as F

from .nn import Encoder
from .priors import GaussianMixture, register_prior
from .train import user_stacklevel

if TYPE_CHECKING:
    import anndata as ad

    from .data import CovariateSpec
    from .vae import VAE

__all__ = ["CALIBRATION_METHODS", "CLASSIFIER_INPUTS", "MIN_CALIBRATION_CELLS", "NOVELTY_SCORES",
           "TEMPERATURE_RANGE", "SemiSupervised", "calibrate", "confidence_temperature", "hide_labels",
           "labels_prior", "nll_temperature", "novelty", "predict", "with_labels_column"]


#: below this many labelled cells :func:`calibrate` warns: a temperature fitted on few cells
#: is unreliable (pbmc68k, 10 % labels: ~14 held-out cells raised the ECE on two seeds of
#: three, docs/labels.md)
MIN_CALIBRATION_CELLS = 100

ClassifierInput = Literal["body", "latent"]
CLASSIFIER_INPUTS: tuple[str, ...] = get_args(ClassifierInput)


@register_prior("labels")
class SemiSupervised(GaussianMixture):
    """A Gaussian mixture with one component per known label, the label observed where it
    is known and enumerated where it is not.

    Generative, for a cell with label ``c`` (known) or without (unknown)::

        y ~ Cat(pi)                                   observed, y = c, where c is known
        z | y ~ N(mu_y, diag(sigma_y^2))
        x | z ~ likelihood of the VAE

    Inference::

        q(y | x) = Cat(softmax(c(u) / T))             a linear classifier c on u:
                                                      u = h, the encoder body ("body"), or
                                                      u = loc(h), the mean of q(z | x) ("latent")
        q(z | x) = N(loc(h), diag(scale(h)^2))        shared by all labels

    The loss of a labelled cell is ``-[log p(x | z) + log p(z | c) + log p(c) - log q(z | x)]
    - alpha log q(c | x)`` (M2's classification term, weight ``alpha``); that of an
    unlabelled cell is ``-sum_k q(k | x) [log p(x | z) + log p(z | k) - log q(z | x)]
    + KL(q(y | x) || p(y))``, the sum over ``k`` done by parallel enumeration. The
    classification term's gradient is not M2's: its factor is not reparameterised
    (``has_rsample=False``), so Pyro weighs it by ``1 + L`` (the cell's loss, held fixed);
    the plain gradient was measured worse (docs/labels.md, "The classification term's
    gradient").

    Both kinds of cells share one minibatch and one enumerated site ``"y"``: for a labelled
    cell its model and guide distributions are both uniform, so that they cancel in the
    ELBO, and ``z`` depends on the known label instead (``torch.where``); the label itself
    is the observed site ``"y_known"``. ``T`` is 1 in training and is set by
    :func:`calibrate` (temperature scaling, Guo et al. 2017).

    Parameters
    ----------
    labels
        The known labels, in the order of the components.
    label_codes
        The categories of the model's labels column (:class:`pyrovae.data.CovariateSpec`
        ``labels``), in their code order: each is one of ``labels`` or
        ``unlabeled_category``. Default: ``labels``.
    unlabeled_category
        The category of cells without a known label.
    classification_weight
        ``alpha``, the weight of ``log q(c | x)`` for labelled cells (50, as scANVI).
    learn_weights
        Learn the label proportions ``pi``.
    class_balance
        Weigh each labelled cell's classification term by ``n / (K' n_c)`` (``n`` labelled
        cells, ``n_c`` of them with label ``c``, ``K'`` labels with at least one cell), so
        that every label counts alike in it and the weights average 1 over the labelled
        cells: a rare type is then not drowned by the common ones. Needs
        ``label_counts``; without them the weights are 1.
    label_counts
        The number of labelled training cells of each of ``labels``.
    classifier_input
        What the classifier ``q(y | x)`` reads: ``"body"``, the encoder body ``h`` (the
        hidden layer before the heads of ``q(z | x)``), or ``"latent"``, the posterior mean
        ``loc(h)`` of ``z`` (as scANVI's classifier reads ``z``). Every use of ``q(y | x)``
        goes through it: the guide, :meth:`label_logits`, :meth:`cluster_probs`,
        :func:`predict`, :func:`novelty`, :func:`calibrate` and query mapping. Model
        files saved before this option existed load as ``"body"``
        (:meth:`from_config`).
    """

    name = "labels"
    takes_labels = True  # module.Model / Guide give the prior each cell's label code

    def __init__(
        self,
        labels: Sequence[str],
        *,
        label_codes: Sequence[str] | None = None,
        unlabeled_category: str = "Unknown",
        classification_weight: float = 50.0,
        learn_weights: bool = True,
        class_balance: bool = False,
        label_counts: Sequence[int] | None = None,
        classifier_input: ClassifierInput = "body",
    ):
        labels = [str(x) for x in labels]
        if len(labels) < 2:
            raise ValueError(f"semi-supervised training needs at least 2 known labels, got {labels}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"the known labels repeat: {labels}")
        if unlabeled_category in labels:
            raise ValueError(f"the unlabeled category {unlabeled_category!r} is among the known labels")
        if classifier_input not in CLASSIFIER_INPUTS:
            raise ValueError(f"classifier_input must be one of {CLASSIFIER_INPUTS}, got {classifier_input!r}")
        if classification_weight < 0:
            raise ValueError(f"classification_weight must be >= 0, got {classification_weight}")
        if label_counts is not None and (len(label_counts) != len(labels) or min(label_counts) < 0):
            raise ValueError(f"label_counts must give a count >= 0 for each of the {len(labels)} "
                             f"labels, got {list(label_counts)}")
        super().__init__(len(labels), mode="enumerate", learn_weights=learn_weights,
                         init="random", conditional_posterior=False)
        codes = [str(x) for x in (label_codes if label_codes is not None else labels)]
        stray = [c for c in codes if c not in labels and c != unlabeled_category]
        if stray:
            raise ValueError(f"label categories {stray} are neither known labels {labels} "
                             f"nor the unlabeled category {unlabeled_category!r}")
        self.labels = labels
        self.label_codes = codes
        self.classifier_input = classifier_input
        self.unlabeled_category = unlabeled_category
        self.classification_weight = float(classification_weight)
        self.register_buffer("code_to_class", torch.tensor(
            [labels.index(c) if c in labels else -1 for c in codes], dtype=torch.long))
        self.register_buffer("calibration_temperature", torch.tensor(1.0))
        self.class_balance = bool(class_balance)
        self.label_counts = None if label_counts is None else [int(c) for c in label_counts]
        self.register_buffer("class_weight", _class_weights(self.label_counts, len(labels))
                             if self.class_balance else torch.ones(len(labels)))

    def config(self) -> dict[str, Any]:
        return {"labels": self.labels, "label_codes": self.label_codes,
                "unlabeled_category": self.unlabeled_category,
                "classification_weight": self.classification_weight,
                "learn_weights": self.learn_weights, "class_balance": self.class_balance,
                "label_counts": self.label_counts, "classifier_input": self.classifier_input}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SemiSupervised":
        """The prior saved with ``config``; a config without ``classifier_input`` (saved
        before the option existed, when the classifier read the encoder body) is ``"body"``."""
        return cls(**{"classifier_input": "body", **config})

    def _build(self, K: int) -> None:
        super()._build(K)
        if self.classifier_input == "latent":  # c reads loc(h), the mean of q(z | x)
            self.classifier = torch.nn.Linear(self.n_latent, K).to(self.locs.device)

    def _logits(self, encoder: Encoder, h: torch.Tensor) -> torch.Tensor:
        """``c(u)`` from the encoder body ``h``: ``u = h`` or ``u = loc(h)``."""
        return self.classifier(h if self.classifier_input == "body" else encoder.loc(h))

    def _known(self, label: torch.Tensor):
        """Class index (clamped at 0) and whether it is known, per cell."""
        cls = self.code_to_class[label]
        known = cls >= 0
        return cls.clamp(min=0), known

    # ---- the Pyro sites --------------------------------------------------------
    def model(self, n_latent: int, label: torch.Tensor | None = None) -> torch.Tensor:
        if label is None:  # no labels given: every cell's label is unknown
            return super().model(n_latent)
        cls, known = self._known(label)
        logits = torch.where(known.unsqueeze(-1), torch.zeros_like(self.weight_logits),
                             self.weight_logits)
        y = pyro.sample("y", dist.Categorical(logits=logits))  # (K, 1) under enumeration
        pyro.sample("y_known", dist.Categorical(logits=self.weight_logits).mask(known), obs=cls)
        y = torch.where(known, cls, y)
        return pyro.sample("z", dist.Normal(self.locs[y], self.scales[y]).to_event(1))

    def guide(self, encoder: Encoder, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        h = encoder.body(x)
        logits = self._logits(encoder, h)
        if label is None:  # no labels given: every cell's label is unknown
            pyro.sample("y", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
        else:
            self._labelled_y(logits, label)
        loc, scale = encoder.loc(h), encoder.to_scale(encoder.scale(h))
        return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def _labelled_y(self, logits: torch.Tensor, label: torch.Tensor) -> None:
        """The guide's ``y`` where some labels are known (uniform for those cells, so that
        it cancels with the model's), and M2's classification term on them."""
        cls, known = self._known(label)
        q_logits = torch.where(known.unsqueeze(-1), torch.zeros_like(logits), logits)
        pyro.sample("y", dist.Categorical(logits=q_logits), infer={"enumerate": "parallel"})
        if self.classification_weight > 0:  # in the guide: -log q enters the ELBO, hence the sign
            log_q = logits.log_softmax(-1).gather(-1, cls.unsqueeze(-1)).squeeze(-1)
            weight = self.classification_weight * self.class_weight[cls]
            # has_rsample=False, kept as measured: Pyro treats the factor as a
            # non-reparameterised site, so the classifier's gradient is that of
            # sum_i f_i (1 + L_i), L_i the cell's loss held fixed, not M2's sum_i f_i.
            # The plain (pathwise) gradient was measured worse: docs/labels.md.
            pyro.factor("classification", -weight * log_q * known,
                        has_rsample=False)

    def initialize(self, latent: torch.Tensor, x: torch.Tensor) -> None:
        self.initialized.fill_(True)  # the labelled cells place the components

    def always_train(self, label: np.ndarray) -> np.ndarray:
        """The labelled cells: validation takes only unlabelled ones, so that no known
        label is kept from training (they are few where labels are scarce)."""
        return self.code_to_class.cpu().numpy()[np.asarray(label)] >= 0

    # ---- summaries of q --------------------------------------------------------
    def label_logits(self, encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
        """``c(u)``, the classifier's logits before temperature scaling."""
        return self._logits(encoder, encoder.body(x))

    def cluster_probs(self, encoder: Encoder, x: torch.Tensor, n_samples: int = 32) -> torch.Tensor:
        return (self.label_logits(encoder, x) / self.calibration_temperature).softmax(-1)


def _class_weights(counts: Sequence[int] | None, n_labels: int) -> torch.Tensor:
    """``n / (K' n_c)`` for each label with ``n_c > 0`` labelled cells (``K'`` such labels,
    ``n`` cells in all), 1 for the others and for all when ``counts`` is None."""
    if counts is None:
        return torch.ones(n_labels)
    n = torch.as_tensor(counts, dtype=torch.float32)
    present = n > 0
    if not present.any():
        return torch.ones(n_labels)
    return torch.where(present, n.sum() / (present.sum() * n.clamp(min=1)), torch.ones(n_labels))


def labels_prior(covariates: "CovariateSpec", *, unlabeled_category: str = "Unknown",
                 classification_weight: float = 50.0, class_balance: bool = True,
                 classifier_input: ClassifierInput = "body",
                 obs: pd.DataFrame | None = None) -> SemiSupervised:
    """The :class:`SemiSupervised` prior for a model's labels column: its known labels
    are the column's categories but ``unlabeled_category``; ``obs`` (the training cells'
    ``adata.obs``) gives the label counts that ``class_balance`` needs."""
    if not covariates.labels_key:
        raise ValueError("the 'labels' prior needs labels_key, the adata.obs column of the labels")
    codes = list(covariates.labels)
    known = [c for c in codes if c != unlabeled_category]
    if len(known) == len(codes):
        warnings.warn(f"no cell of adata.obs[{covariates.labels_key!r}] is {unlabeled_category!r}: "
                      "every cell is labelled", UserWarning, stacklevel=3)
    counts = None
    if obs is not None:
        column = obs[covariates.labels_key].astype(str)
        counts = [int((column == c).sum()) for c in known]
    return SemiSupervised(known, label_codes=codes, unlabeled_category=unlabeled_category,
                          classification_weight=classification_weight,
                          class_balance=class_balance, label_counts=counts,
                          classifier_input=classifier_input)


def with_labels_column(covariates: "CovariateSpec", obs: pd.DataFrame, labels_key: str) -> "CovariateSpec":
    """``covariates`` that also read ``labels_key`` (for a model fitted without labels
    that switches to the ``"labels"`` prior); refused when it reads another labels column."""
    import dataclasses

    from .data import CovariateSpec

    if covariates.labels_key not in (None, labels_key):
        raise ValueError(f"this model reads its labels from adata.obs[{covariates.labels_key!r}], "
                         f"not {labels_key!r}")
    labels = CovariateSpec.from_obs(obs, labels_key=labels_key).labels
    return dataclasses.replace(covariates, labels_key=labels_key, labels=labels)


def hide_labels(adata: "ad.AnnData", labels_key: str, unlabeled_category: str, fraction: float,
                seed: int) -> tuple["ad.AnnData", tuple["ad.AnnData", np.ndarray]]:
    """``(adata, (training, held))``: ``training`` shares ``adata``'s counts, its labels
    column says ``unlabeled_category`` for the ``held`` labelled cells (a share
    ``fraction`` of them, drawn by ``numpy.random.default_rng(seed)``)."""
    import anndata as ad

    if not 0 < fraction < 1:
        raise ValueError(f"calibration_fraction must lie in (0, 1), got {fraction}")
    if not isinstance(adata, ad.AnnData):
        raise TypeError("calibration_fraction needs an AnnData in memory")
    values = adata.obs[labels_key].astype(str).to_numpy()
    known = np.flatnonzero(values != unlabeled_category)
    n = int(round(fraction * len(known)))
    if n < 1 or n == len(known):
        raise ValueError(f"calibration_fraction={fraction} of {len(known)} labelled cells "
                         "leaves no cell to calibrate on or none to train on")
    held = np.zeros(adata.n_obs, dtype=bool)
    held[np.random.default_rng(seed).choice(known, size=n, replace=False)] = True
    trained = set(values[known[~held[known]]])
    if not trained & set(values[held]):
        raise ValueError(f"calibration_fraction={fraction} holds out {n} labelled cells whose labels "
                         f"({', '.join(sorted(set(values[held])))}) no training cell has, so there is "
                         "nothing to calibrate on; label more cells or use calibration_fraction=0")
    obs = adata.obs.copy()
    column = obs[labels_key].astype(str)
    column[held] = unlabeled_category
    obs[labels_key] = pd.Categorical(column, categories=sorted(set(values)))
    layers = dict(adata.layers) if len(adata.layers) else None
    training = ad.AnnData(X=adata.X, obs=obs, var=adata.var[[]], layers=layers)
    return adata, (training, held)


def _require(model: "VAE") -> SemiSupervised:
    if not isinstance(model.prior, SemiSupervised):
        raise ValueError(f"this model's prior is {model.prior.name!r}; label prediction needs "
                         "the 'labels' prior (pyrovae.fit(..., labels_key=..., unlabeled_category=...))")
    return model.prior


def predict(model: "VAE", adata: "ad.AnnData", *, soft: bool = False,
            batch_size: int = 1024) -> pd.Series | pd.DataFrame:
    """The label of each cell by ``argmax q(y | x)``, or ``q(y | x)`` itself.

    Parameters
    ----------
    model
        A model with the ``"labels"`` prior.
    adata
        Cells with the model's genes (a labels column is not needed).
    soft
        Return the probabilities, a ``(cells, labels)`` DataFrame, instead of the labels.
    batch_size
        Cells per forward pass.

    Returns
    -------
    A categorical Series of labels indexed by ``adata.obs_names`` (``soft=False``) or a
    DataFrame of probabilities with the labels as columns (``soft=True``); the
    probabilities are temperature-scaled when :func:`calibrate` was run.
    """
    prior = _require(model)
    probs = model.get_cluster_probs(adata, batch_size=batch_size)
    index = pd.Index(adata.obs_names)
    if soft:
        return pd.DataFrame(probs, index=index, columns=prior.labels)
    return pd.Series(pd.Categorical.from_codes(probs.argmax(1), categories=prior.labels),
                     index=index, name="pyrovae_label")


NoveltyScore = Literal["entropy", "max_probability", "density", "distance"]
NOVELTY_SCORES: tuple[str, ...] = get_args(NoveltyScore)


def novelty(model: "VAE", adata: "ad.AnnData", *, score: NoveltyScore = "entropy") -> pd.Series:
    """How unlike every known label each cell looks; higher means more likely a type
    missing from the labels.

    Parameters
    ----------
    model
        A model with the ``"labels"`` prior.
    adata
        Cells with the model's genes (a labels column is not needed).
    score
        ``"entropy"``: the entropy of ``q(y | x)`` divided by ``log K`` (0: certain, 1:
        uniform). ``"max_probability"``: ``1 - max_k q(k | x)``. ``"density"``: ``-log
        p(z)`` at the cell's posterior mean ``z = E_q[z | x]`` under the fitted mixture
        ``p(z) = sum_k pi_k N(z; mu_k, sigma_k)`` (nats). ``"distance"``: the distance of
        ``z`` to the nearest component in its own scale, ``min_k ||(z - mu_k) /
        sigma_k||``. The first two look at the classifier only, the last two at where the
        cell lies in the latent space.

    Returns
    -------
    A Series indexed by ``adata.obs_names``, named ``pyrovae_novelty_<score>``.

    Examples
    --------
    >>> import numpy as np, pandas as pd, pyrovae
    >>> adata = pyrovae.datasets.simulate(200, 40, 3, likelihood="nb", seed=0)
    >>> values = adata.obs["cluster"].astype(str).to_numpy().copy()
    >>> values[(np.arange(200) % 4 != 0) | (values == "2")] = "Unknown"  # type 2 never labelled
    >>> adata.obs["known"] = pd.Categorical(values)
    >>> model = pyrovae.fit(adata, labels_key="known", unlabeled_category="Unknown",
    ...                     max_epochs=2, kl_warmup_epochs=0, progress=False)
    >>> scores = model.novelty(adata, score="density")
    >>> scores.shape, scores.name
    ((200,), 'pyrovae_novelty_density')
    """
    if score not in NOVELTY_SCORES:
        raise ValueError(f"score must be one of {NOVELTY_SCORES}, got {score!r}")
    prior = _require(model)
    index = pd.Index(adata.obs_names)
    if score in ("entropy", "max_probability"):
        probs = predict(model, adata, soft=True).to_numpy()
        if score == "entropy":
            values = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(1) / math.log(probs.shape[1])
        else:
            values = 1.0 - probs.max(1)
    else:
        with torch.no_grad():
            z = torch.as_tensor(model.get_latent(adata), device=prior.locs.device)
            if score == "density":
                values = -prior.mixture().log_prob(z)
            else:
                scaled = (z.unsqueeze(-2) - prior.locs) / prior.scales  # (cells, K, D)
                values = scaled.pow(2).sum(-1).sqrt().min(-1).values
        values = values.double().cpu().numpy()
    return pd.Series(values, index=index, name=f"pyrovae_novelty_{score}")


CalibrationMethod = Literal["accuracy", "nll"]
CALIBRATION_METHODS: tuple[str, ...] = get_args(CalibrationMethod)

#: the range of temperatures :func:`calibrate` searches (``log T`` within it)
TEMPERATURE_RANGE = (1e-2, 1e2)


def calibrate(model: "VAE", adata: "ad.AnnData", *, labels_key: str | None = None,
              method: CalibrationMethod = "accuracy", cells: "ad.AnnData | None" = None,
              steps: int = 200) -> float:
    """Temperature scaling of ``q(y | x)`` on labelled cells held out from training: sets
    ``T`` in ``softmax(c(u) / T)`` on the model and returns it. Accuracy does not change
    (``argmax`` is the same).

    ``method="accuracy"`` (the default) chooses the ``T`` at which the mean confidence
    ``mean_i max_k q_T(k | x_i)`` over ``cells`` equals the accuracy expected on them,
    estimated from the held-out labelled cells by Laplace's rule: ``(m + 1) / (n + 2)`` for
    ``m`` of ``n`` predicted right (the posterior mean under a uniform prior, so that a
    hold-out without errors does not ask for confidence 1); a held-out cell whose label is
    none of the model's (nor the unlabeled category) counts among the ``n``, as an error.
    The mean confidence falls monotonically as ``T`` grows, so ``T`` is found by bisection
    on ``log T``. This zeroes
    the gap ``|accuracy - mean confidence|``, a lower bound of the ECE, and depends on the
    hold-out only through its number of errors. ``method="nll"`` (Guo et al. 2017's
    temperature scaling, the only method before) minimises the held-out cells' negative
    log-likelihood instead; on a few dozen cells its ``T`` follows the few misclassified
    ones and over-sharpened on bladder (docs/labels.md, "Fourth round").

    Parameters
    ----------
    model
        A model with the ``"labels"`` prior; changed in place.
    adata
        Labelled cells held out from training; those of the unlabeled category are
        ignored, and so, by ``"nll"``, are those whose label is not one of the model's.
    labels_key
        Column of the labels; the model's labels column by default.
    method
        ``"accuracy"`` or ``"nll"``, see above.
    cells
        For ``method="accuracy"``: the cells whose mean confidence is matched, typically
        the unlabelled cells to be labelled (no labels column needed). Default: the
        held-out labelled cells themselves. Ignored by ``"nll"``.
    steps
        For ``method="nll"``: L-BFGS iterations on ``log T``; for ``"accuracy"``:
        bisection steps (60 reach machine precision).

    Warns
    -----
    UserWarning
        When fewer than :data:`MIN_CALIBRATION_CELLS` cells have a known label.
    """
    prior = _require(model)
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {CALIBRATION_METHODS}, got {method!r}")
    key = labels_key or model.covariates.labels_key
    values = adata.obs[key].astype(str).to_numpy()
    known = np.isin(values, prior.labels)
    # labelled with a type the model has no label for: always predicted wrong, so they count
    # (as errors) in the accuracy; the likelihood of "nll" cannot use them
    unseen = ~known & (values != prior.unlabeled_category) & (method == "accuracy")
    if known.sum() == 0:
        raise ValueError(f"no cell of adata.obs[{key!r}] has a known label {prior.labels}")
    if known.sum() + unseen.sum() < MIN_CALIBRATION_CELLS:
        warnings.warn(f"calibrating on {int(known.sum() + unseen.sum())} labelled cells (fewer than "
                      f"{MIN_CALIBRATION_CELLS}): a temperature fitted on few cells is unreliable "
                      "and can make the calibration worse; hold out more labelled cells",
                      UserWarning, stacklevel=user_stacklevel())
    target = torch.tensor([prior.labels.index(v) for v in values[known]])

    def logits_of(data):
        return torch.as_tensor(model._map(data, lambda enc, x: prior.label_logits(enc, x), 1024)).double()

    counted = known | unseen
    counted_logits = logits_of(adata[counted])  # once: the held-out cells' default "cells"
    logits = counted_logits[torch.as_tensor(known[counted])]
    if method == "accuracy":
        right, n = int((logits.argmax(-1) == target).sum()), int(counted.sum())
        accuracy = (right + 1) / (n + 2)
        matched = counted_logits if cells is None else logits_of(cells)
        temperature = confidence_temperature(matched, accuracy, steps=steps)
    else:
        temperature = nll_temperature(logits, target, steps=steps)
    prior.calibration_temperature.fill_(temperature)
    return temperature


def confidence_temperature(logits: torch.Tensor, accuracy: float, *, steps: int = 60) -> float:
    """The ``T`` at which ``mean_i max_k softmax(logits_i / T)_k`` equals ``accuracy``,
    by bisection on ``log T`` within :data:`TEMPERATURE_RANGE` (its end where the
    accuracy lies beyond the mean confidences reachable there). The mean confidence is
    monotone: each cell's top probability ``1 / sum_k exp((l_k - l_max) / T)`` falls as
    ``T`` grows."""
    logits = torch.as_tensor(logits, dtype=torch.float64)

    def confidence(log_t: float) -> float:
        return float((logits / math.exp(log_t)).softmax(-1).max(-1).values.mean())

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)  # confidence(low) >= confidence(high)
    for _ in range(max(steps, 1)):
        middle = (low + high) / 2
        if confidence(middle) > accuracy:
            low = middle
        else:
            high = middle
    return math.exp((low + high) / 2)


def nll_temperature(logits: torch.Tensor, target: torch.Tensor, *, steps: int = 200) -> float:
    """The ``T`` minimising the mean negative log-likelihood of ``target`` under
    ``softmax(logits / T)`` (L-BFGS on ``log T``)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    # a line search: plain steps of lr=0.5 overshot once, to T = 1e-53 on 58 cells
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp())
