"""Priors on the latent space: small objects that own the latent sites of model and guide.

A prior writes the latent part of both Pyro functions: inside the ``cells`` plate the model
calls ``prior.model(n_latent)`` and the guide calls ``prior.guide(encoder, x)`` (``x`` as
the encoder sees it), and both return ``z``. The encoder body and the decoder belong to the
VAE, so a prior can be swapped on a trained model and training continued with their
weights; what the prior adds to the guide (a classifier ``q(y | x)``, offsets of
``q(z | x, y)``) is its own.

Priors that need the network sizes create their parameters in :meth:`Prior.setup`, called
when the prior is attached to a model.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Iterator, Literal, Sequence, TypeVar, get_args

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from torch import nn
from torch.nn import functional as F

from .likelihoods import same_definition
from .nn import Encoder, LocalPyroModule

__all__ = [
    "PRIORS",
    "GaussianMixture",
    "Prior",
    "StandardNormal",
    "VampPrior",
    "get_prior",
    "merged_leiden",
    "prior_from_config",
    "register_prior",
    "stable_leiden",
]

MixtureMode = Literal["enumerate", "gumbel", "marginal"]
KRule = Literal["merged_leiden", "leiden", "stable_leiden"]

SCALE_FLOOR = 0.05  # the smallest standard deviation of a mixture component


def _inverse_scale(std, floor: float = SCALE_FLOOR):
    """The unconstrained value whose ``softplus(.) + floor`` is ``std``."""
    return np.log(np.expm1(np.asarray(std, dtype=np.float64) - floor))


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """``module`` in evaluation mode (frozen batch-norm statistics, no dropout), its mode
    restored after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class Prior(LocalPyroModule):
    """Base class: ``p(z) = N(0, I)`` and ``q(z | x) = N(loc(x), diag(scale(x)^2))``.

    Subclasses override :meth:`model` (and :meth:`guide` when they add latent sites to the
    guide), and the hooks below when they need them.
    """

    name: str = "normal"

    def __init__(self):
        super().__init__()
        self.register_buffer("_zero", torch.zeros(()), persistent=False)
        self.n_latent: int | None = None

    # ---- structure -------------------------------------------------------------
    def setup(self, n_latent: int, encoder: Encoder) -> None:
        """Create parameters that depend on the network sizes (called once per model).

        Subclasses call this first; it refuses a prior that belongs to another model, whose
        parameters would otherwise be shared.
        """
        owner = self.__dict__.get("_owner")
        if owner is not None and owner is not encoder:
            raise ValueError(
                f"this {type(self).__name__} already belongs to another model; give each "
                "model its own prior object (e.g. copy.deepcopy(prior) before training)"
            )
        self.__dict__["_owner"] = encoder
        self.n_latent = n_latent

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this prior (saved with the model)."""
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Prior":
        """The prior that :meth:`config` saved (a model file, a checkpoint); a subclass
        whose options grew fills in here what older files lack."""
        return cls(**config)

    @property
    def n_clusters(self) -> int | None:
        """Number of clusters for priors that have them, else None."""
        return None

    # ---- the Pyro sites --------------------------------------------------------
    def model(self, n_latent: int) -> torch.Tensor:
        """Sample the latent sites of the model; returns ``z``."""
        return pyro.sample("z", dist.Normal(self._zero, 1.0).expand([n_latent]).to_event(1))

    def guide(self, encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
        """Sample the latent sites of the guide; returns ``z``."""
        loc, scale = encoder(x)
        return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ---- how to train ----------------------------------------------------------
    def elbo(self, analytic_kl: bool = True) -> ELBO:
        """A fresh ELBO estimator suited to this prior's sites."""
        return TraceMeanField_ELBO() if analytic_kl else Trace_ELBO()

    def initialize(self, latent: torch.Tensor, x: torch.Tensor) -> None:
        """Data-dependent initialisation before training: ``latent`` are the current
        posterior means and ``x`` encoder inputs of (up to a few thousand) training cells."""

    def on_epoch(self, epoch: int) -> None:
        """Called at the start of each training epoch (0-based), e.g. for schedules."""

    def always_train(self, label: np.ndarray) -> np.ndarray | None:
        """Cells (a boolean mask, from each cell's label code) that training must not hold
        out for validation; None for none (the default)."""
        return None

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """The sites to score and sample with after training (the trained ones by default)."""
        yield

    # ---- summaries of q --------------------------------------------------------
    def latent_mean(self, encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
        """``E_q[z | x]``."""
        return encoder(x)[0]

    def cluster_probs(self, encoder: Encoder, x: torch.Tensor) -> torch.Tensor | None:
        """``q(y | x)`` as ``(cells, n_clusters)`` for priors with clusters, else None."""
        return None

    def sample_z(self, n: int, cluster: int | None = None) -> torch.Tensor:
        """Draw ``n`` latent points from the prior (from one component if ``cluster``)."""
        if cluster is not None:
            raise ValueError(f"the {self.name!r} prior has no clusters")
        return torch.randn(n, self.n_latent, device=self._zero.device)


class StandardNormal(Prior):
    """``p(z) = N(0, I)``; ``q(z | x) = N(mu(x), diag(sigma(x)^2))``."""

    name = "normal"


class GaussianMixture(Prior):
    """A Gaussian-mixture prior with a categorical cluster ``y`` (the GMVAE of Grønbech et al.).

    Generative::

        y ~ Cat(pi)                                   uniform, or learned weights
        z | y ~ N(mu_y, diag(sigma_y^2))              learned means and scales

    Inference::

        q(y | x) = Cat(softmax(c(h)))                 a classifier head on the encoder body h
        q(z | x, y) = N(loc(h) + a_y, softplus(s(h) + b_y))

    so that the ELBO is ``sum_k q(k | x) [log p(x | z_k) + log p(z_k | k) - log q(z_k | x, k)]
    - KL(q(y | x) || p(y))``. The offsets ``a_y, b_y`` start at zero: a mixture swapped onto
    a trained model starts from its posterior.

    Parameters
    ----------
    n_clusters
        Number of components ``K``; ``None`` (the default) chooses it from the data when
        the prior starts from the latent means, by ``k_rule``, with no labels. After
        training, :func:`pyrovae.clusters.prune_clusters` removes the components no cell
        is assigned to. :attr:`selection` records how K was found.
    mode
        How ``y`` is handled in training:
        ``"enumerate"`` sums over the K values exactly (``TraceEnum_ELBO``, parallel
        enumeration); ``"gumbel"`` draws a Gumbel-Softmax relaxation of ``y`` in model and
        guide (``RelaxedOneHotCategorical``, Jang et al. 2017) with an annealed temperature,
        trained with ``Trace_ELBO``; ``"marginal"`` sums ``y`` out of the prior
        analytically (``z ~ MixtureSameFamily``), uses a guide on ``z`` only and recovers
        ``q(y | x)`` afterwards by Bayes' rule, ``E_q(z|x)[p(y | z)]``.
    learn_weights
        Learn the mixture weights ``pi`` (else uniform): cell types are rarely equal in
        number.
    init
        Where the components start, from the current latent means when training starts
        (or when the prior is swapped onto a trained model): ``"leiden"`` (Leiden on a kNN
        graph with K clusters, :func:`leiden_labels`: a coarser resolution for fewer
        clusters than at resolution 1.0, a sub-clustering of those for more; follows
        clusters of any shape and size), ``"kmeans"`` (K-means with K clusters: cuts
        large clusters into pieces of similar size), each component at the mean, spread
        and (with ``learn_weights``) share of its cells; or ``"random"`` (``N(0, I)``).
        Measured in ``docs/mixtures.md``: on the bladder data a Leiden start gave
        clusters closer to the annotated cell types than a K-means start in 11 of 12 runs
        (8-20 clusters); on pbmc68k at 6 clusters the K-means start did better.
    temperature
        Gumbel-Softmax temperature: ``(start, end, epochs)``, decaying exponentially from
        ``start`` to ``end`` over ``epochs`` epochs.
    conditional_posterior
        ``q(z | x, y)`` as above (True), or ``q(z | x)`` shared by all clusters (False, the
        default): the decoder then runs once per cell instead of once per cell and
        cluster, since ``z`` no longer depends on ``y``. Measured in ``docs/mixtures.md``
        (bladder, K = 16): the shared posterior trains at about the standard VAE's cost
        per epoch, the conditional one at several times it.
    k_rule
        How ``n_clusters=None`` finds K: ``"merged_leiden"`` (the default,
        :func:`merged_leiden`: Leiden at ``resolution``, then clusters the kNN graph still
        joins, PAGA connectivity >= ``merge_threshold``, merged), ``"leiden"`` (Leiden at
        ``resolution``, no merging) or ``"stable_leiden"`` (:func:`stable_leiden`: the
        finest resolution whose partition is reproduced on subsamples of the cells).
        Compared in ``docs/mixtures.md`` on bladder, pbmc68k and simulated clusters.
    resolution, merge_threshold
        The Leiden resolution (scanpy's default, 1.0) and the merge threshold of
        ``"merged_leiden"`` / ``"leiden"``.
    scale_floor
        The smallest standard deviation of a component, ``sigma_k = softplus(s_k) +
        scale_floor`` (None: 0.05, the fixed floor of earlier versions). A larger floor
        keeps components from shrinking onto a few cells.
    free_nats_y
        Free nats on the KL of ``y`` (scVAE's ``--proportion-of-free-nats-for-y-kl-divergence``
        times ``log K``; Kingma et al. 2016's free bits): in training the term
        ``KL(q(y | x) || p(y))``, averaged over the minibatch's cells, is replaced by
        ``max(KL, free_nats_y)``, so that below ``free_nats_y`` nats ``q(y | x)`` is not
        pulled towards the weights. 0 (the default) leaves the ELBO exact. Added to the
        guide as a factor ``max(0, free_nats_y - KL)`` per cell, only in training mode:
        held-out ELBOs and validation losses are the plain ELBO. The KL is the
        categorical one of the classifier and the weights, exact for ``"enumerate"``; for
        ``"gumbel"`` (whose training KL is a one-sample estimate on the relaxation) it is
        the KL of the discrete ``y`` the relaxation stands for. ``"marginal"`` has no
        ``y`` site and refuses it.

    Examples
    --------
    >>> from pyrovae.priors import GaussianMixture
    >>> GaussianMixture().config()["k_rule"]  # K found from the data when training starts
    'merged_leiden'
    >>> GaussianMixture(10, mode="marginal").n_clusters
    10
    """

    name = "gmm"

    def __init__(
        self,
        n_clusters: int | None = None,
        *,
        mode: MixtureMode = "enumerate",
        learn_weights: bool = True,
        init: Literal["leiden", "kmeans", "random"] = "leiden",
        temperature: tuple[float, float, int] = (1.0, 0.5, 100),
        conditional_posterior: bool = False,
        k_rule: KRule = "merged_leiden",
        resolution: float = 1.0,
        merge_threshold: float = 0.3,
        scale_floor: float | None = None,
        free_nats_y: float = 0.0,
    ):
        super().__init__()
        if scale_floor is not None and not scale_floor > 0:
            raise ValueError(f"scale_floor must be positive (or None), got {scale_floor}")
        if not free_nats_y >= 0:
            raise ValueError(f"free_nats_y must be >= 0, got {free_nats_y}")
        if free_nats_y > 0 and mode == "marginal":
            raise ValueError("free_nats_y acts on the KL of y, and mode='marginal' has no y "
                             "site; use mode='enumerate' or 'gumbel'")
        if k_rule not in get_args(KRule):
            raise ValueError(f"k_rule must be one of {get_args(KRule)}, got {k_rule!r}")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if n_clusters is not None and n_clusters < 2:
            raise ValueError(f"a mixture needs at least 2 clusters, got {n_clusters}")
        if n_clusters is None and init == "random":
            raise ValueError("n_clusters=None chooses K from the cells' latent means; a random "
                             "start (init='random') needs n_clusters")
        if mode not in ("enumerate", "gumbel", "marginal"):
            raise ValueError(f"mode must be 'enumerate', 'gumbel' or 'marginal', got {mode!r}")
        if init not in ("leiden", "kmeans", "random"):
            raise ValueError(f"init must be 'leiden', 'kmeans' or 'random', got {init!r}")
        self.K = n_clusters
        #: how K was found: ``{"method": "given"}`` or the search of ``k_rule``
        #: (:func:`merged_leiden`, :func:`stable_leiden`), plus the weights of components
        #: removed by pruning
        self.selection: dict[str, Any] = {"method": "given" if n_clusters else k_rule}
        self.k_rule = k_rule
        self.resolution = float(resolution)
        self.merge_threshold = float(merge_threshold)
        self.mode = mode
        self.learn_weights = bool(learn_weights)
        self.init = init
        self.temperature_schedule = tuple(temperature)
        self.conditional_posterior = conditional_posterior
        self.scale_floor = None if scale_floor is None else float(scale_floor)
        self.free_nats_y = float(free_nats_y)
        self.register_buffer("temperature", torch.tensor(float(temperature[0])))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def n_clusters(self) -> int | None:
        return self.K

    def config(self) -> dict[str, Any]:
        return {
            "n_clusters": self.K, "mode": self.mode, "learn_weights": self.learn_weights,
            "init": self.init, "temperature": list(self.temperature_schedule),
            "conditional_posterior": self.conditional_posterior, "k_rule": self.k_rule,
            "resolution": self.resolution, "merge_threshold": self.merge_threshold,
            "scale_floor": self.scale_floor, "free_nats_y": self.free_nats_y,
        }

    def setup(self, n_latent: int, encoder: Encoder) -> None:
        first = self.n_latent is None
        super().setup(n_latent, encoder)
        if first and self.K is not None:
            self._build(self.K)

    def _build(self, K: int) -> None:
        """The K components' parameters (and the guide's K-sized heads), fresh."""
        n_latent, encoder = self.n_latent, self.__dict__["_owner"]
        device = self._zero.device
        self.K = K
        self.locs = nn.Parameter(torch.randn(K, n_latent))
        self.raw_scales = nn.Parameter(torch.full((K, n_latent), _inverse_scale(max(1.0, 2 * self.floor), self.floor)))
        self.weight_logits = nn.Parameter(torch.zeros(K), requires_grad=self.learn_weights)
        if self.mode != "marginal":
            self.classifier = nn.Linear(encoder.body.n_out, K)
        if self.mode != "marginal" and self.conditional_posterior:
            self.loc_offsets = nn.Parameter(torch.zeros(K, n_latent))
            self.scale_offsets = nn.Parameter(torch.zeros(K, n_latent))
        self.to(device)

    def prune(self, keep: np.ndarray | Sequence[bool]) -> list[float]:
        """Remove the components where ``keep`` is False; returns their weights ``pi_k``
        (recorded in :attr:`selection`). The remaining weights are renormalised by the
        softmax; the classifier keeps its rows of the remaining clusters."""
        keep = torch.as_tensor(np.asarray(keep, dtype=bool), device=self.locs.device)
        if keep.shape != (self.K,):
            raise ValueError(f"keep must have one entry per component ({self.K}), got {tuple(keep.shape)}")
        if int(keep.sum()) < 2:
            raise ValueError("pruning would leave fewer than 2 components")
        weights = self.weight_logits.detach().softmax(-1)
        removed = [float(w) for w in weights[~keep]]
        if not removed:
            return removed

        def cut(p: torch.Tensor, grad: bool = True) -> nn.Parameter:
            return nn.Parameter(p.detach()[keep].clone(), requires_grad=grad)

        self.locs, self.raw_scales = cut(self.locs), cut(self.raw_scales)
        self.weight_logits = cut(self.weight_logits, self.learn_weights)
        if hasattr(self, "classifier"):
            old = self.classifier
            self.classifier = nn.Linear(old.in_features, int(keep.sum())).to(old.weight.device)
            with torch.no_grad():
                self.classifier.weight.copy_(old.weight[keep])
                self.classifier.bias.copy_(old.bias[keep])
        if hasattr(self, "loc_offsets"):
            self.loc_offsets, self.scale_offsets = cut(self.loc_offsets), cut(self.scale_offsets)
        self.K = int(keep.sum())
        self.selection["pruned_weights"] = self.selection.get("pruned_weights", []) + removed
        return removed

    @property
    def floor(self) -> float:
        """The smallest component scale (``scale_floor``, or :data:`SCALE_FLOOR`)."""
        return SCALE_FLOOR if self.scale_floor is None else self.scale_floor

    @property
    def scales(self) -> torch.Tensor:
        return F.softplus(self.raw_scales) + self.floor

    def _components(self) -> dist.Distribution:
        return dist.Normal(self.locs, self.scales).to_event(1)

    def mixture(self) -> dist.MixtureSameFamily:
        """``p(z) = sum_k pi_k N(z; mu_k, sigma_k)``."""
        return dist.MixtureSameFamily(dist.Categorical(logits=self.weight_logits), self._components())

    # ---- the Pyro sites --------------------------------------------------------
    def model(self, n_latent: int) -> torch.Tensor:
        if self.mode == "marginal":
            return pyro.sample("z", self.mixture())
        if self.mode == "gumbel":
            probs = self.weight_logits.softmax(-1)
            y = pyro.sample("y", dist.RelaxedOneHotCategorical(self.temperature, probs=probs))
        else:
            y = F.one_hot(pyro.sample("y", dist.Categorical(logits=self.weight_logits)), self.K)
        y = y.to(self.locs.dtype)
        return pyro.sample("z", dist.Normal(y @ self.locs, y @ self.scales).to_event(1))

    def guide(self, encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "marginal":
            return super().guide(encoder, x)
        h = encoder.body(x)
        logits = self.classifier(h)
        if self.free_nats_y > 0 and self.training:
            self._free_nats(logits)
        if self.mode == "gumbel":
            y = pyro.sample("y", dist.RelaxedOneHotCategorical(self.temperature, logits=logits))
        else:
            index = pyro.sample(
                "y", dist.Categorical(logits=logits), infer={"enumerate": "parallel"}
            )
            y = F.one_hot(index, self.K)  # (K, 1, K) under enumeration
        loc, scale = self._posterior(encoder, h, y.to(h.dtype))
        return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def _free_nats(self, logits: torch.Tensor) -> None:
        """Free bits on ``y``: ``max(0, free_nats_y - KL)`` added to each cell's loss, ``KL``
        the minibatch's mean ``KL(q(y | x) || p(y))``, so the loss has ``max(KL, free)``.
        A guide factor enters the loss with a plus sign (``-log q``); it is pathwise
        (``has_rsample=True``): with ``False`` Pyro would differentiate it as a score."""
        log_q = logits.log_softmax(-1)
        kl = (log_q.exp() * (log_q - self.weight_logits.log_softmax(-1))).sum(-1)
        gap = (self.free_nats_y - kl.mean()).clamp(min=0.0)
        pyro.factor("y_free_nats", gap.expand(kl.shape), has_rsample=True)

    def _posterior(self, encoder, h, y):
        """``q(z | x, y)`` for one-hot (or relaxed) ``y``, broadcasting over its leading dims."""
        if not self.conditional_posterior:
            return encoder.loc(h), encoder.to_scale(encoder.scale(h))
        loc = encoder.loc(h) + y @ self.loc_offsets
        scale = encoder.to_scale(encoder.scale(h) + y @ self.scale_offsets)
        return loc, scale

    # ---- training --------------------------------------------------------------
    def elbo(self, analytic_kl: bool = True) -> ELBO:
        if self.mode == "enumerate":
            return TraceEnum_ELBO(max_plate_nesting=1)
        if self.mode == "gumbel":
            return Trace_ELBO()
        return super().elbo(analytic_kl)

    def on_epoch(self, epoch: int) -> None:
        start, end, epochs = self.temperature_schedule
        rate = math.log(start / end) / max(epochs, 1)
        self.temperature.fill_(max(end, start * math.exp(-rate * epoch)))

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """A Gumbel-Softmax model is scored and sampled as the discrete mixture it relaxes."""
        mode = self.mode
        if mode == "gumbel":
            self.mode = "enumerate"
        try:
            yield
        finally:
            self.mode = mode

    def initialize(self, latent: torch.Tensor, x: torch.Tensor) -> None:
        if bool(self.initialized) or self.init == "random":
            self.initialized.fill_(True)
            return
        points = latent.detach().cpu().numpy().astype(np.float64)
        if self.K is None:  # K from the data
            if self.k_rule == "stable_leiden":
                labels, search = stable_leiden(points)
            else:
                threshold = self.merge_threshold if self.k_rule == "merged_leiden" else math.inf
                labels, search = merged_leiden(points, resolution=self.resolution, threshold=threshold)
            self.selection = {"method": self.k_rule, **search}
            self._build(int(labels.max()) + 1)
        if len(latent) < self.K:
            raise ValueError(
                f"a mixture of {self.K} clusters starts from the cells' latent means, but only "
                f"{len(latent)} cells were given; use n_clusters <= {len(latent)}"
            )
        if self.selection["method"] == "given" or self.init == "kmeans":
            labels = (kmeans_labels if self.init == "kmeans" else leiden_labels)(points, self.K)
        counts = np.bincount(labels, minlength=self.K)
        centres = np.stack([points[labels == k].mean(0) for k in range(self.K)])
        std = np.stack([points[labels == k].std(0) if counts[k] > 1 else points.std(0)
                        for k in range(self.K)])
        std = np.clip(std, 2 * self.floor, None)
        with torch.no_grad():
            self.locs.copy_(torch.as_tensor(centres, dtype=self.locs.dtype))
            self.raw_scales.copy_(torch.as_tensor(_inverse_scale(std, self.floor),
                                                  dtype=self.locs.dtype))
            if self.learn_weights:
                share = (counts + 1.0) / (counts.sum() + self.K)
                self.weight_logits.copy_(torch.as_tensor(np.log(share), dtype=self.locs.dtype))
        if self.mode != "marginal":
            self._fit_classifier(latent.detach(), x)
        self.initialized.fill_(True)

    def _fit_classifier(self, latent: torch.Tensor, x: torch.Tensor, steps: int = 300) -> None:
        """Start ``q(y | x)`` at the new components' responsibilities for the cells' latent
        means, ``p(y | z = E_q[z | x])``: a fresh classifier would put every cell in every
        cluster alike at first, and the components would drift from where they started."""
        encoder = self.__dict__["_owner"]
        with frozen(encoder), torch.no_grad():
            h = encoder.body(x)
            target = self.responsibilities(latent)
        optimizer = torch.optim.Adam(self.classifier.parameters(), lr=0.05)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                loss = -(target * self.classifier(h).log_softmax(-1)).sum(-1).mean()
                loss.backward()
                optimizer.step()

    # ---- summaries of q --------------------------------------------------------
    def cluster_probs(self, encoder: Encoder, x: torch.Tensor, n_samples: int = 32) -> torch.Tensor:
        if self.mode != "marginal":
            return self.classifier(encoder.body(x)).softmax(-1)
        loc, scale = encoder(x)
        z = dist.Normal(loc, scale).sample((n_samples,))  # (S, cells, D)
        return self.responsibilities(z).mean(0)

    def responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """``p(y | z)`` by Bayes' rule, ``(..., K)`` for latent points ``(..., D)``."""
        log_joint = self._components().log_prob(z.unsqueeze(-2)) + self.weight_logits.log_softmax(-1)
        return log_joint.softmax(-1)

    def latent_mean(self, encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "marginal" or not self.conditional_posterior:
            return super().latent_mean(encoder, x)
        h = encoder.body(x)
        probs = self.classifier(h).softmax(-1)  # (cells, K)
        eye = torch.eye(self.K, dtype=h.dtype, device=h.device).unsqueeze(1)  # (K, 1, K)
        loc, _ = self._posterior(encoder, h, eye)  # (K, cells, D)
        return (probs.T.unsqueeze(-1) * loc).sum(0)

    def sample_z(self, n: int, cluster: int | None = None) -> torch.Tensor:
        if cluster is None:
            y = dist.Categorical(logits=self.weight_logits).sample((n,))
        else:
            if not 0 <= cluster < self.K:
                raise ValueError(f"cluster must be in 0..{self.K - 1}, got {cluster}")
            y = torch.full((n,), cluster, dtype=torch.long, device=self.locs.device)
        return dist.Normal(self.locs[y], self.scales[y]).sample()


class VampPrior(Prior):
    """The VampPrior (Tomczak & Welling 2018): a mixture of the encoder's posteriors at
    learned pseudo-inputs ``u_k``, ``p(z) = 1/K sum_k q(z | u_k)``.

    The pseudo-inputs live where the encoder's inputs do (``log1p`` counts for count
    likelihoods) and start at the inputs of ``n_clusters`` random training cells. The
    encoder sees them with its batch-norm statistics frozen (running averages) and
    without dropout, so the prior does not depend on the minibatch.

    Parameters
    ----------
    n_clusters
        Number of pseudo-inputs ``K``, the components of ``p(z)`` (the same argument as
        :class:`GaussianMixture`'s and :func:`pyrovae.fit`'s). The VampPrior gives cells no
        cluster assignment, so its :attr:`~Prior.n_clusters` property (which tells
        whether a prior clusters the cells) is None.
    n_components
        The old name of ``n_clusters`` (a ``FutureWarning``).
    """

    name = "vamp"

    def __init__(self, n_clusters: int = 50, *, n_components: int | None = None):
        super().__init__()
        if n_components is not None:
            warnings.warn("VampPrior(n_components=...) is now VampPrior(n_clusters=...), as for "
                          "the other priors; n_components= will be removed", FutureWarning,
                          stacklevel=2)
            n_clusters = n_components
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be positive, got {n_clusters}")
        self.K = n_clusters
        self.register_buffer("initialized", torch.tensor(False))

    def config(self) -> dict[str, Any]:
        return {"n_clusters": self.K}

    def setup(self, n_latent: int, encoder: Encoder) -> None:
        first = self.n_latent is None
        super().setup(n_latent, encoder)
        if first:
            n_in = encoder.body[0].in_features if len(encoder.body) else encoder.loc.in_features
            self.pseudo_inputs = nn.Parameter(torch.rand(self.K, n_in))
        self.__dict__["_encoder"] = encoder  # a reference, not a submodule: no second copy

    def initialize(self, latent: torch.Tensor, x: torch.Tensor) -> None:
        if bool(self.initialized):
            return
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(x), generator=g)[: self.K]
        if len(pick) < self.K:
            pick = torch.randint(len(x), (self.K,), generator=g)
        with torch.no_grad():
            self.pseudo_inputs.copy_(x[pick.to(x.device)])
        self.initialized.fill_(True)

    def _components(self) -> dist.Distribution:
        encoder = self.__dict__["_encoder"]
        with frozen(encoder):  # the prior must not depend on the minibatch
            loc, scale = encoder(self.pseudo_inputs)
        return dist.Normal(loc, scale).to_event(1)

    def mixture(self) -> dist.MixtureSameFamily:
        uniform = torch.zeros(self.K, device=self.pseudo_inputs.device)
        return dist.MixtureSameFamily(dist.Categorical(logits=uniform), self._components())

    def model(self, n_latent: int) -> torch.Tensor:
        return pyro.sample("z", self.mixture())

    def sample_z(self, n: int, cluster: int | None = None) -> torch.Tensor:
        if cluster is not None:
            raise ValueError("the VampPrior's components are pseudo-inputs, not clusters")
        return self.mixture().sample((n,))


def kmeans_labels(points: np.ndarray, k: int) -> np.ndarray:
    """K-means labels of ``points`` (10 restarts, seeded)."""
    from sklearn.cluster import KMeans

    return KMeans(k, n_init=10, random_state=0).fit_predict(points)


def knn_connectivities(points: np.ndarray, n_neighbors: int = 15):
    """The kNN graph of ``points`` weighted as ``sc.pp.neighbors`` weights it (UMAP's fuzzy
    simplicial set, Euclidean, exact neighbours, the point itself counted among its
    ``n_neighbors``), as a symmetric CSR matrix.

    Written with numpy and scikit-learn: scanpy's version compiles UMAP's numba kernels on
    first use, 5-35 s of a first ``set_prior("gmm", adata)``.
    """
    import scipy.sparse as sp
    from sklearn.neighbors import NearestNeighbors

    points = np.asarray(points, dtype=np.float32)
    n = len(points)
    k = min(n_neighbors, n)
    dists, idx = NearestNeighbors(n_neighbors=k).fit(points).kneighbors(points)
    dists = dists.astype(np.float32)
    # umap.umap_.smooth_knn_dist with local_connectivity=1, bandwidth=1
    rho = np.array([row[row > 0][0] if (row > 0).any() else 0.0 for row in dists], dtype=np.float32)
    target = np.log2(k)
    lo, hi, mid = np.zeros(n), np.full(n, np.inf), np.ones(n)
    done = np.zeros(n, dtype=bool)
    gaps = dists[:, 1:].astype(np.float64) - rho[:, None]
    for _ in range(64):
        psum = np.where(gaps > 0, np.exp(-np.clip(gaps, 0, None) / mid[:, None]), 1.0).sum(1)
        done |= np.abs(psum - target) < 1e-5
        above = (psum > target) & ~done
        below = (psum <= target) & ~done
        hi[above] = mid[above]
        mid[above] = (lo[above] + hi[above]) / 2
        lo[below] = mid[below]
        grow = below & np.isinf(hi)
        mid[grow] *= 2
        mid[below & ~grow] = (lo[below & ~grow] + hi[below & ~grow]) / 2
        if done.all():
            break
    sigma = mid.astype(np.float32)
    floor = 1e-3 * np.where(rho > 0, dists.mean(1), dists.mean())
    sigma = np.maximum(sigma, floor).astype(np.float32)
    # umap.umap_.compute_membership_strengths
    gap = dists - rho[:, None]
    weights = np.where(gap <= 0, 1.0, np.exp(-gap / sigma[:, None])).astype(np.float32)
    weights[idx == np.arange(n)[:, None]] = 0.0
    a = sp.csr_matrix((weights.ravel(), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n))
    a.eliminate_zeros()
    t = a.T.tocsr()
    out = (a + t - a.multiply(t)).tocsr()
    out.eliminate_zeros()
    return out


def leiden_labels(points: np.ndarray, k: int, *, n_neighbors: int = 15,
                  resolution: float = 1.0) -> np.ndarray:
    """Leiden labels of ``points`` with exactly ``k`` clusters, on the kNN graph
    ``sc.pp.neighbors`` would build (:func:`knn_connectivities`).

    The reference is Leiden at ``resolution`` (scanpy's default, 1.0), with ``K_1`` clusters:

    * ``k <= K_1``: Leiden on the whole graph at a coarser resolution, searched by bisection
      for ``k``;
    * ``k > K_1``: each of the ``K_1`` clusters sub-clustered by Leiden on its own cells'
      part of the graph (as ``sc.tl.leiden(restrict_to=...)`` does), at one resolution
      searched by bisection for ``k`` clusters in all. So the partition refines Leiden's at
      ``resolution``. Raising the resolution of the whole graph instead cuts the large
      clusters into pieces before it separates small ones (the resolution limit of
      modularity): on bladder with ``k = 16`` (6 seeds) the trained mixtures scored mean
      ARI 0.533 from that start and 0.605 from this one (``docs/mixtures.md``).

    Where no resolution gives exactly ``k``, the closest partition is adjusted by merging
    the smallest cluster into its nearest neighbour (by centroid) or splitting the largest
    in two with K-means.
    """
    graph = knn_connectivities(points, min(n_neighbors, len(points) - 1))
    reference = _leiden(graph, resolution, 0)
    if k > reference.max() + 1:
        labels = _bisect(lambda r: _subclustered(graph, reference, r), k)
    else:
        labels = _bisect(lambda r: _leiden(graph, r, 0), k)
    while labels.max() + 1 > k:  # merge the smallest cluster into its nearest
        counts = np.bincount(labels)
        small = counts.argmin()
        centres = np.stack([points[labels == c].mean(0) for c in range(len(counts))])
        distance = np.linalg.norm(centres - centres[small], axis=1)
        distance[small] = np.inf
        labels[labels == small] = distance.argmin()
        labels = np.unique(labels, return_inverse=True)[1]
    while labels.max() + 1 < k:  # split the largest cluster in two
        large = np.bincount(labels).argmax()
        members = np.flatnonzero(labels == large)
        halves = kmeans_labels(points[members], 2)
        labels[members[halves == 1]] = labels.max() + 1
    return labels


def _bisect(partition: Callable[[float], np.ndarray], k: int) -> np.ndarray:
    """The partition ``partition(resolution)`` with exactly ``k`` clusters, the resolution
    searched by bisection on a log scale in ``[1e-3, 20]`` (30 steps); where none gives
    ``k``, the closest one seen (the first of equals)."""
    lo, hi, best = 1e-3, 20.0, None
    for _ in range(30):
        resolution = math.sqrt(lo * hi)
        labels = partition(resolution)
        n = labels.max() + 1
        if best is None or abs(n - k) < abs(best.max() + 1 - k):
            best = labels
        if n == k:
            break
        lo, hi = (resolution, hi) if n < k else (lo, resolution)
    return best.copy()


def _subclustered(graph, labels: np.ndarray, resolution: float) -> np.ndarray:
    """Each cluster of ``labels`` split by Leiden at ``resolution`` on its cells' part of
    ``graph`` (its induced subgraph), numbered ``0..K'-1`` cluster by cluster."""
    out, n = np.zeros_like(labels), 0
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        parts = (_leiden(graph[members][:, members].tocsr(), resolution, 0) if len(members) > 2
                 else np.zeros(len(members), dtype=int))
        out[members] = parts + n
        n += int(parts.max()) + 1
    return out


def _leiden(graph, resolution: float, seed: int) -> np.ndarray:
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    light = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(graph.shape[0])]))
    sc.tl.leiden(light, resolution=resolution, key_added="leiden", flavor="igraph",
                 n_iterations=2, directed=False, random_state=seed, adjacency=graph)
    return light.obs["leiden"].astype(int).to_numpy()


def _cluster_connectivity(graph, labels: np.ndarray) -> np.ndarray:
    """PAGA's connectivity of clusters on a weighted kNN graph (Wolf et al. 2019): the edge
    weight between clusters ``i`` and ``j`` over the weight expected if the edges ignored
    the clusters, ``w_ij * w / (w_i * w_j)``, as a ``(K, K)`` array with a zero diagonal
    (``w_i``: the total edge weight of cluster ``i``, ``w``: of the graph)."""
    graph = graph.tocoo()
    K = int(labels.max()) + 1
    weights = np.zeros((K, K))
    np.add.at(weights, (labels[graph.row], labels[graph.col]), graph.data)
    degree = weights.sum(1)
    ratio = weights * degree.sum() / np.maximum(np.outer(degree, degree), 1e-12)
    np.fill_diagonal(ratio, 0.0)
    return ratio


def _most_connected(graph, labels: np.ndarray) -> tuple[int, int, float] | None:
    """The pair of clusters with the highest :func:`_cluster_connectivity` and that
    connectivity, or None when no two clusters share an edge (the diagonal is zero, so a
    positive maximum is always a pair of two clusters)."""
    ratio = _cluster_connectivity(graph, labels)
    i, j = np.unravel_index(ratio.argmax(), ratio.shape)
    return (int(i), int(j), float(ratio[i, j])) if ratio[i, j] > 0 else None


def _joined(labels: np.ndarray, i: int, j: int) -> np.ndarray:
    """``labels`` with cluster ``j`` merged into ``i``, renumbered ``0..K-2``."""
    return np.unique(np.where(labels == j, i, labels), return_inverse=True)[1]


def merged_leiden(
    points: np.ndarray,
    *,
    resolution: float = 1.0,
    threshold: float = 0.3,
    n_neighbors: int = 15,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Leiden clusters of ``points`` at scanpy's default resolution, then the pairs of
    clusters the kNN graph still joins merged, with no labels.

    Leiden at ``resolution`` on the kNN graph ``sc.pp.neighbors`` would build
    (:func:`knn_connectivities`); then, while some pair of clusters has a PAGA connectivity
    (``_cluster_connectivity``: their edge weight relative to what it would be if the
    graph ignored the clusters) of at least ``threshold``, the most connected pair is
    merged. Clusters that the graph separates (connectivity near 0) stay apart; pieces of
    one group of cells that modularity cut apart (connectivity near 1) are joined again.
    Measured in ``docs/mixtures.md``: on simulated clusters Leiden at 1.0 alone split them
    (9 found for 3) and the merge restored them (3, 5 and 8 found exactly); on the bladder
    and pbmc68k latent spaces it lands between Leiden at 0.3 and 0.5.

    Parameters
    ----------
    points
        ``(cells, dims)`` coordinates, e.g. the latent means.
    resolution
        The Leiden resolution of the partition before merging (1.0: scanpy's default).
    threshold
        Pairs at or above this connectivity are merged; ``numpy.inf`` merges nothing (plain
        Leiden).
    n_neighbors, seed
        The kNN graph's neighbours (15, as ``sc.pp.neighbors``), and Leiden's random seed.

    Returns
    -------
    labels, search
        The partition (``0..K-1``), and the search: the ``resolution``, ``threshold``,
        ``n_clusters_leiden`` (before merging) and ``merges``, the connectivity of each
        merged pair in the order merged.

    Examples
    --------
    >>> import numpy as np
    >>> from pyrovae.priors import merged_leiden
    >>> rng = np.random.default_rng(0)
    >>> points = np.concatenate([rng.normal(c, 1.0, size=(300, 5)) for c in (-10, 0, 10)])
    >>> labels, search = merged_leiden(points)
    >>> int(labels.max()) + 1, search["n_clusters_leiden"] > 3
    (3, True)
    """
    points = np.asarray(points, dtype=np.float64)
    graph = knn_connectivities(points, min(n_neighbors, len(points) - 1))
    labels = _leiden(graph, resolution, seed)
    first, merges = int(labels.max()) + 1, []
    while labels.max() > 0:
        # stop too when no two clusters share an edge: with threshold <= 0 the loop would
        # otherwise "merge" a cluster with itself for ever on a disconnected kNN graph
        pair = _most_connected(graph, labels)
        if pair is None or not pair[2] >= threshold:
            break
        merges.append(pair[2])
        labels = _joined(labels, pair[0], pair[1])
    if labels.max() < 1:  # everything joined: split it in two
        labels = kmeans_labels(points, 2)
    return labels, {"resolution": float(resolution), "threshold": float(threshold),
                    "n_clusters_leiden": first, "merges": merges}


def stable_leiden(
    points: np.ndarray,
    *,
    resolutions: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0),
    n_subsamples: int = 4,
    fraction: float = 0.8,
    tolerance: float = 0.01,
    n_neighbors: int = 15,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Leiden clusters of ``points`` at a resolution chosen by stability, with no labels.

    For each resolution ``r``, the partition of all points is compared with the partitions
    of ``n_subsamples`` random subsets of ``fraction`` of the points (each with its own kNN
    graph and Leiden seed) by the adjusted Rand index on the shared points; the stability
    of ``r`` is the mean. The chosen resolution is the largest whose stability is within
    ``tolerance`` of the most stable one's: a partition finer than the data support splits
    clusters differently on every subsample, and among equally stable partitions the
    finest keeps the most structure. Measured in ``docs/mixtures.md``: a fixed threshold
    (stability >= 0.9) split simulated clusters (5 found for 3); the most stable
    resolution alone merged them (7 found for 8).

    Returns
    -------
    labels, search
        The chosen partition (``0..K-1``), and the search: ``resolutions``,
        ``stability`` and ``n_clusters_per_resolution``, and the ``resolution`` chosen.
    """
    from sklearn.metrics import adjusted_rand_score

    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    k = min(n_neighbors, n - 1)
    rng = np.random.default_rng(seed)
    graph = knn_connectivities(points, k)
    subsets = [np.sort(rng.choice(n, size=max(int(fraction * n), k + 2), replace=False))
               for _ in range(n_subsamples)]
    graphs = [knn_connectivities(points[s], k) for s in subsets]
    partitions, stability, counts = [], [], []
    for r in resolutions:
        full = _leiden(graph, r, seed)
        scores = [adjusted_rand_score(full[s], _leiden(g, r, seed + 1 + i))
                  for i, (s, g) in enumerate(zip(subsets, graphs))]
        partitions.append(full)
        stability.append(float(np.mean(scores)))
        counts.append(int(full.max()) + 1)
    several = [i for i in range(len(resolutions)) if counts[i] >= 2] or [int(np.argmax(counts))]
    top = max(stability[i] for i in several)
    best = max((i for i in several if stability[i] >= top - tolerance), key=lambda i: resolutions[i])
    labels = partitions[best]
    if labels.max() < 1:  # one cluster at every resolution: split it in two
        labels = kmeans_labels(points, 2)
    return labels, {
        "resolutions": [float(r) for r in resolutions], "stability": stability,
        "n_clusters_per_resolution": counts, "resolution": float(resolutions[best]),
        "tolerance": tolerance,
    }


PRIORS: dict[str, type[Prior]] = {
    "normal": StandardNormal,
    "gmm": GaussianMixture,
    "vamp": VampPrior,
}

P = TypeVar("P", bound=type[Prior])


def register_prior(name: str | None = None, *, overwrite: bool = False) -> Callable[[P], P]:
    """Add a prior class to :data:`PRIORS` (class decorator), so that it is chosen by name
    (``pyrovae.fit(adata, prior=name)``, ``model.set_prior(name, adata)``) and a model
    with it saves and loads (:func:`pyrovae.load` rebuilds it from its name and
    :meth:`Prior.config`)::

        @register_prior("student_t")
        class StudentT(Prior):
            name = "student_t"

            def model(self, n_latent):
                return pyro.sample("z", dist.StudentT(3.0, self._zero, 1.0)
                                   .expand([n_latent]).to_event(1))

    Parameters
    ----------
    name
        Registry key; the class's ``name`` attribute when None. The class's ``name`` is
        set to it, since saved models record ``prior.name``.
    overwrite
        Replace a different class registered under ``name``. Registering the same class
        again, or a class of the same module and qualified name (a notebook cell run
        again), is always allowed.

    Raises
    ------
    ValueError
        ``name`` is taken by another prior and ``overwrite`` is False.
    """

    def decorator(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, Prior)):
            raise TypeError(f"register_prior takes a subclass of pyrovae.priors.Prior, got {cls!r}")
        key = name or cls.name
        old = PRIORS.get(key)
        if old is not None and not overwrite and not same_definition(old, cls):
            raise ValueError(
                f"a prior named {key!r} is already registered ({old.__module__}."
                f"{old.__qualname__}); pass overwrite=True to replace it, or choose another name"
            )
        cls.name = key
        PRIORS[key] = cls
        return cls

    return decorator


def get_prior(prior: str | Prior, **options) -> Prior:
    """A prior object from its name in :data:`PRIORS` and its constructor options (an
    object passes through)."""
    if isinstance(prior, Prior):
        if options:
            raise ValueError("options are for priors given by name; configure the object instead")
        return prior
    return _prior_class(prior)(**options)


def prior_from_config(name: str, config: dict[str, Any]) -> Prior:
    """The prior saved as its name and :meth:`Prior.config` (model files, checkpoints),
    rebuilt by :meth:`Prior.from_config`."""
    return _prior_class(name).from_config(config)


def _prior_class(name: str) -> type[Prior]:
    try:
        return PRIORS[name]
    except KeyError:
        raise ValueError(
            f"unknown prior {name!r}; choose one of {sorted(PRIORS)}, or register yours with "
            "pyrovae.priors.register_prior"
        ) from None
