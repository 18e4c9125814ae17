"""One training loop: an ``ELBO()(model, guide)`` loss module and a torch optimiser."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import pandas as pd
import pyro
import torch

from . import distributed
from .data import CountData, Shard, on_device
from .module import VAEModule
from .progress import progress_bar

__all__ = ["TrainingDivergedError", "TrainingPlan", "default_max_epochs", "resolve_device", "train"]

Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class TrainingPlan:
    """How to train.

    Attributes
    ----------
    max_epochs
        Passes over the training cells; ``None`` picks scVI's rule,
        ``min(400, 8e6 / n_cells)``.
    batch_size
        Cells per minibatch (per process when training on several, see
        :mod:`pyrovae.distributed`).
    lr, weight_decay
        Adam's learning rate and L2 penalty.
    kl_warmup_epochs
        The latent sites' weight rises linearly from 0 to 1 over this many epochs.
    validation_fraction
        Share of cells held out to compute the validation ELBO each epoch (0 for none).
    early_stopping
        Stop when the validation ELBO has not improved for ``patience`` epochs after the
        warm-up, and keep the weights of the best epoch.
    analytic_kl
        Use the closed-form KL divergence where the prior and posterior have one
        (``TraceMeanField_ELBO``) instead of its one-sample estimate (``Trace_ELBO``).
        Priors with other needs choose their own estimator (a mixture that enumerates
        its cluster trains with ``TraceEnum_ELBO``).
    seed
        Seeds the split, the minibatches, the Monte Carlo draws and dropout: a CPU run is
        reproducible bit for bit. The caller's global random state is left as it was.
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:1"``. On a GPU
        the counts are moved there once when they take under half its free memory.
    progress
        Show a progress bar.
    """

    max_epochs: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    kl_warmup_epochs: int = 50
    validation_fraction: float = 0.1
    early_stopping: bool = True
    patience: int = 30
    analytic_kl: bool = True
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, got {self.max_epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2, got {self.batch_size}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must lie in [0, 1), got {self.validation_fraction}"
            )
        if self.kl_warmup_epochs < 0 or self.patience < 1:
            raise ValueError("kl_warmup_epochs must be >= 0 and patience >= 1")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


def default_max_epochs(n_cells: int) -> int:
    """scVI's rule: 400 epochs up to 20,000 cells, fewer (down to 1) beyond."""
    return max(1, min(400, round(20_000 / n_cells * 400)))


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but torch sees no CUDA GPU")
    return device


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """A seeded torch RNG; the caller's RNG state is restored after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def split_cells(n_obs: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random training and validation positions (validation empty if it would be < 1 cell)."""
    n_val = int(round(n_obs * fraction))
    if n_obs - n_val < 2:
        raise ValueError(f"{n_obs} cells leave too few to train on; at least 2 are needed")
    perm = rng.permutation(n_obs)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def adam(params, plan: TrainingPlan) -> torch.optim.Adam:
    """scVI's Adam (``eps=0.01``), fused into one kernel where torch offers it."""
    params = list(params)
    options = dict(lr=plan.lr, weight_decay=plan.weight_decay, eps=0.01)
    try:
        return torch.optim.Adam(params, fused=True, **options)
    except (RuntimeError, ValueError):  # a device without a fused Adam
        return torch.optim.Adam(params, **options)


def evaluate_loss(loss_fn, data: CountData, index: np.ndarray, batch_size: int, device,
                  shard: Shard = (0, 1)) -> float:
    """The ELBO per cell of the given cells (KL weight 1), estimated by ``loss_fn``'s ELBO;
    with several processes each scores its share and the sum is shared."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for chunk, minibatch in data.epoch(index, batch_size, None, device, shard):
            args = model_args(minibatch, chunk, n_obs=len(chunk))
            total += loss_fn.elbo.loss(loss_fn.model, loss_fn.guide, *args)
    return -float(distributed.all_reduce_sum(total)) / len(index)


def model_args(minibatch: tuple, index: np.ndarray, n_obs: int) -> tuple:
    """The model's and guide's arguments for a minibatch ``(x, covariates, batch, label)``
    of the cells at ``index``, in a data set of ``n_obs`` cells."""
    x, covariates, batch, label = minibatch
    index = torch.as_tensor(index, device=x.device)
    return x, x.sum(-1, keepdim=True), covariates, batch, label, index, n_obs


def prepare(module: VAEModule, data: CountData, index: np.ndarray, device,
            rng: np.random.Generator, n_max: int = 5000) -> None:
    """Before the first epoch: fit the log-normal of the library sizes of each batch
    (count data), and let the prior initialise itself from the current posterior means of
    up to ``n_max`` cells."""
    likelihood, model = module.model.likelihood, module.model
    if likelihood.is_count and not bool(module.library_fitted):
        logs = np.log(data.totals()[index])
        batches = data.encoded.batch[index]
        for b in range(len(model.library_loc)):
            mine = logs[batches == b] if (batches == b).any() else logs
            model.library_loc[b] = float(mine.mean())
            model.library_scale[b] = float(max(mine.std(), 1e-3))
        if model.cov.library == "latent":  # q(l | x) starts at the typical library size
            with torch.no_grad():
                module.guide.library_encoder.loc.bias.fill_(float(logs.mean()))
        module.library_fitted.fill_(True)
    prior = module.prior
    if hasattr(prior, "initialized") and not bool(prior.initialized):
        pick = np.sort(rng.choice(index, size=min(n_max, len(index)), replace=False))
        module.eval()
        with torch.no_grad():
            x, covariates, _, _ = data.minibatch(pick, device)
            inputs = module.guide.encoder_input(x, covariates)
            latent = prior.latent_mean(module.guide.encoder, inputs)
        prior.initialize(latent, inputs)


def train(module: VAEModule, data: CountData, plan: TrainingPlan) -> pd.DataFrame:
    """Train ``module`` in place on all cells of ``data``; returns the history per epoch.

    Columns: ``epoch``, ``kl_weight``, ``train_elbo`` (the training objective per cell,
    latent sites weighted by ``kl_weight``), ``validation_elbo`` (per held-out cell, full
    weight; NaN without validation cells) and ``seconds``.
    """
    device = resolve_device(plan.device)
    distributed.join(device)
    device = distributed.local_device(device)
    shard = distributed.rank_and_size()
    module.to(device)
    data = on_device(data, device)
    rng = np.random.default_rng(plan.seed)  # alike on every rank: the same split and batches
    train_idx, val_idx = split_cells(data.n_obs, plan.validation_fraction, rng)
    n_train = len(train_idx)
    max_epochs = plan.max_epochs or default_max_epochs(data.n_obs)
    rows, best, best_state, waited = [], -math.inf, None, 0
    # the data were checked once when read: Pyro's per-step argument and support checks
    # would only repeat that work (several ms per step at 2,000 genes)
    # (each rank draws its own Monte Carlo noise and dropout)
    with seeded(plan.seed + 7919 * shard[0], device), pyro.validation_enabled(False):
        prepare(module, data, train_idx, device, rng)
        loss_fn = module.prior.elbo(plan.analytic_kl)(module.model, module.guide)
        step_fn = distributed.wrap(loss_fn, device)  # DistributedDataParallel when several
        optimizer = adam(step_fn.parameters(), plan)
        bar = progress_bar(
            range(max_epochs), desc="training", unit="epoch",
            disable=not plan.progress or shard[0] != 0, mininterval=0.5,
        )
        for epoch in bar:
            start = time.perf_counter()
            kl_weight = min(1.0, (epoch + 1) / plan.kl_warmup_epochs) if plan.kl_warmup_epochs else 1.0
            module.prior.on_epoch(epoch)
            module.train()
            total = torch.zeros((), device=device)
            for chunk, minibatch in data.epoch(train_idx, plan.batch_size, rng, device, shard):
                loss = step_fn(*model_args(minibatch, chunk, n_train), kl_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(chunk)
            train_elbo = -float(distributed.all_reduce_sum(total)) / n_train / n_train
            if not math.isfinite(train_elbo):
                raise TrainingDivergedError(
                    f"the training loss became {train_elbo} at epoch {epoch + 1}; "
                    "try a smaller lr, or check the data"
                )
            distributed.share_buffers(module)
            module.eval()
            val_elbo = (
                evaluate_loss(loss_fn, data, val_idx, 1024, device, shard) if len(val_idx) else math.nan
            )
            rows.append((epoch + 1, kl_weight, train_elbo, val_elbo, time.perf_counter() - start))
            bar.set_postfix(train_elbo=f"{train_elbo:.1f}", val_elbo=f"{val_elbo:.1f}")
            if not (plan.early_stopping and len(val_idx)) or kl_weight < 1.0:
                continue
            if val_elbo > best:
                best, waited = val_elbo, 0
                best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            else:
                waited += 1
                if waited >= plan.patience:
                    bar.set_description(f"stopped early at epoch {epoch + 1}")
                    break
        bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return pd.DataFrame(
        rows, columns=["epoch", "kl_weight", "train_elbo", "validation_elbo", "seconds"]
    )
