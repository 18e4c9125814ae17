"""One training loop: an ``ELBO()(model, guide)`` loss module and a torch optimiser.

The loop never loses or corrupts a model:

- **Failures.** On any exception (a diverging loss, an error in a user's prior, ...) the
  module's parameters, buffers, gradients, device and mode are put back as they were before
  the call, bit for bit (or, with ``on_failure="last_epoch"``, as they were at the end of
  the last finite epoch), and the error says which epoch failed and what was restored.
- **Interrupts.** The first Ctrl-C (SIGINT, also a Jupyter kernel interrupt) asks training
  to stop at the end of the current step: the best weights so far are kept (the current
  ones when early stopping has none yet), the module is put in evaluation mode, one
  warning says so, and :func:`train` returns normally with the epochs done. A second
  Ctrl-C goes to the handler that was there before (Python's, which raises
  ``KeyboardInterrupt``), so it can still stop the process.
- **Checkpoints.** Every ``checkpoint_every`` epochs and at the end, ``on_checkpoint`` is
  given everything needed to continue the run exactly (:class:`TrainingState`): the
  optimiser, early stopping and the random streams of numpy and torch.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import numpy as np
import pandas as pd
import pyro
import torch

from . import distributed
from .data import CountData, Shard, on_device
from .module import VAEModule
from .progress import progress_bar

__all__ = [
    "HISTORY_COLUMNS",
    "TrainingDivergedError",
    "TrainingInterruptedWarning",
    "TrainingPlan",
    "TrainingState",
    "UnfinishedWarmupWarning",
    "default_max_epochs",
    "kl_weight",
    "resolve_device",
    "train",
]

Device = Literal["auto", "cpu", "cuda"]
OnFailure = Literal["restore", "last_epoch"]

#: The columns of a training history, one row per epoch.
HISTORY_COLUMNS = ["epoch", "kl_weight", "train_elbo", "validation_elbo", "seconds", "prior"]


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
        The latent sites' weight rises linearly from 0 to 1 over this many epochs. Training
        a model that has been trained before continues the warm-up where it stands (at
        full weight once it is done), also after a prior swap; see ``restart_warmup``.
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
    restart_warmup
        Start the KL warm-up again from weight 0 instead of continuing it.
    on_failure
        What a failed call (any exception) leaves: ``"restore"``, the model exactly as it
        was before the call; ``"last_epoch"``, the weights at the end of the last epoch
        whose loss was finite, with those epochs in the history. The error is raised in
        both cases.
    checkpoint
        Path of a checkpoint file to write every ``checkpoint_every`` epochs and at the
        end (a temporary file in the same folder, then renamed: a crash never leaves a
        broken one); :func:`pyrovae.resume` continues the run from it.
    checkpoint_every
        Epochs between checkpoints.
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
    restart_warmup: bool = False
    on_failure: OnFailure = "restore"
    checkpoint: str | None = None
    checkpoint_every: int = 10

    def __post_init__(self):
        _require_int("max_epochs", self.max_epochs, optional=True)
        for name in ("batch_size", "kl_warmup_epochs", "patience", "checkpoint_every", "seed"):
            _require_int(name, getattr(self, name))
        for name in ("lr", "weight_decay", "validation_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        check_device(self.device)
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
        if self.on_failure not in ("restore", "last_epoch"):
            raise ValueError(
                f"on_failure must be 'restore' or 'last_epoch', got {self.on_failure!r}"
            )
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {self.checkpoint_every}")
        if self.checkpoint is not None:  # a plain string: the plan is written to .h5ad files
            object.__setattr__(self, "checkpoint", os.fspath(self.checkpoint))


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside pyrovae."""
    import sys

    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _require_int(name: str, value, *, optional: bool = False) -> None:
    """Refuse, in pyrovae's words, a setting that must be a whole number."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        kind = "None" if value is None else f"{value!r} ({type(value).__name__})"
        raise ValueError(f"{name} must be a whole number{' or None' if optional else ''}, got {kind}")


_DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(device) -> None:
    """Refuse a device name torch cannot use here, before any work."""
    text = str(device)
    if text == "auto":
        return
    try:
        kind = torch.device(text).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in _DEVICE_TYPES:
        raise ValueError(f"device={device!r} is not a device pyrovae trains on: use 'auto', 'cpu', "
                         "'cuda' or 'cuda:N' (a GPU), or 'mps' (Apple silicon)")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterruptedWarning(UserWarning):
    """Training was stopped by Ctrl-C (SIGINT) and returned what it had."""


class UnfinishedWarmupWarning(UserWarning):
    """Training ended before the KL warm-up did."""


@dataclass
class TrainingState:
    """Where a call of :func:`train` stands after its last whole epoch: what a checkpoint
    holds to continue it exactly.

    Attributes
    ----------
    epoch
        Epochs done in this call.
    rows
        The history rows of those epochs (see :data:`HISTORY_COLUMNS`).
    best, best_epoch, best_state, waited
        Early stopping: the best validation ELBO, its epoch, the module's ``state_dict``
        then, and the epochs since.
    finished
        Whether the call ran to its end (the module then holds its final weights).
    interrupted
        Whether the call was stopped by Ctrl-C (not saved in checkpoints).
    optimizer, numpy_rng, torch_rng
        The optimiser's ``state_dict``, the state of the numpy generator that draws the
        minibatches, and each process's torch random state (``{"cpu": ..., "cuda": ...}``).
    """

    epoch: int = 0
    rows: list = field(default_factory=list)
    best: float = -math.inf
    best_epoch: int = 0
    best_state: dict | None = None
    waited: int = 0
    finished: bool = False
    interrupted: bool = False
    optimizer: dict | None = None
    numpy_rng: dict | None = None
    torch_rng: list | None = None

    _SAVED = ("epoch", "rows", "best", "best_epoch", "best_state", "waited", "finished",
              "optimizer", "numpy_rng", "torch_rng")

    def to_dict(self) -> dict[str, Any]:
        """Plain values and CPU tensors (``torch.load(weights_only=True)`` reads them)."""
        out = {name: getattr(self, name) for name in self._SAVED}
        out["rows"] = [list(row) for row in self.rows]
        if self.best_state is not None:
            out["best_state"] = {k: v.cpu() for k, v in self.best_state.items()}
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainingState":
        state = cls(**{name: values[name] for name in cls._SAVED})
        state.rows = [tuple(row) for row in state.rows]
        return state

    def history(self) -> pd.DataFrame:
        """The rows as a DataFrame with :data:`HISTORY_COLUMNS`."""
        return history_frame(self.rows)


def history_frame(rows) -> pd.DataFrame:
    """A history DataFrame from rows, or from a saved dict of columns (a history saved
    before the ``prior`` column existed reads it as NaN)."""
    if isinstance(rows, dict):
        return pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    return pd.DataFrame(list(rows), columns=HISTORY_COLUMNS)


def default_max_epochs(n_cells: int) -> int:
    """scVI's rule: 400 epochs up to 20,000 cells, fewer (down to 1) beyond."""
    return max(1, min(400, round(20_000 / n_cells * 400)))


def kl_weight(epoch: int, warmup_epochs: int, warmup_done: int = 0) -> float:
    """The latent sites' weight in epoch ``epoch`` (0-based) of a call that starts with
    ``warmup_done`` of ``warmup_epochs`` warm-up epochs behind it."""
    return min(1.0, (warmup_done + epoch + 1) / warmup_epochs) if warmup_epochs else 1.0


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


def split_cells(n_obs: int, fraction: float, rng: np.random.Generator,
                keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random training and validation positions (validation empty if it would be < 1 cell).

    ``keep`` (a boolean mask) marks cells that always train: the validation cells, still
    ``round(n_obs * fraction)`` of them or as many as there are, come from the others.
    """
    n_val = int(round(n_obs * fraction))
    if n_obs - n_val < 2:
        raise ValueError(f"{n_obs} cells leave too few to train on; at least 2 are needed")
    if keep is None or not keep.any():
        perm = rng.permutation(n_obs)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    others = np.flatnonzero(~keep)
    val = np.sort(rng.permutation(others)[:min(n_val, len(others))])
    train = np.setdiff1d(np.arange(n_obs), val)
    return train, val


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
            x, covariates, batch, _ = data.minibatch(pick, device)
            inputs = module.guide.encoder_input(x, covariates, batch)
            latent = prior.latent_mean(module.guide.encoder, inputs)
        prior.initialize(latent, inputs)


# ---------------------------------------------------------------------------- safety nets
class _Snapshot:
    """A bit-for-bit copy of a module's parameters, buffers, gradients, device and mode."""

    def __init__(self, module: torch.nn.Module):
        self.state = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}
        self.grads = {p: p.grad for p in module.parameters()}  # fresh tensors replace them
        self.modes = {m: m.training for m in module.modules()}
        self.device = next(module.parameters()).device

    def restore(self, module: torch.nn.Module) -> None:
        module.to(self.device)
        module.load_state_dict(self.state)
        for p, grad in self.grads.items():
            p.grad = grad
        for m, training in self.modes.items():
            m.training = training


def _state_dict_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _Interrupt:
    """While active, the first SIGINT only sets :attr:`requested` and hands SIGINT back to
    the handler that was there before, so that a second one acts as it would have."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def __enter__(self) -> "_Interrupt":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only
        previous = signal.getsignal(signal.SIGINT)
        if previous in (signal.SIG_IGN, None):  # ignored, or a handler Python cannot restore
            return self
        self._previous = previous
        signal.signal(signal.SIGINT, self._handle)
        self._installed = True
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc) -> None:
        if self._installed and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)


def _restored_note(label: str, epoch: int, max_epochs: int, kept: str) -> str:
    return f"{label} failed in epoch {epoch} of {max_epochs}; {kept}"


# ---------------------------------------------------------------------------- the loop
def train(
    module: VAEModule,
    data: CountData,
    plan: TrainingPlan,
    *,
    warmup_done: int = 0,
    state: TrainingState | None = None,
    on_checkpoint: Callable[[TrainingState], None] | None = None,
    label: str = "training",
    interrupt_note: str = "",
    warn_unfinished_warmup: bool = True,
) -> pd.DataFrame:
    """Train ``module`` in place on all cells of ``data``; returns the history per epoch.

    Columns (:data:`HISTORY_COLUMNS`): ``epoch``, ``kl_weight``, ``train_elbo`` (the
    training objective per cell, latent sites weighted by ``kl_weight``),
    ``validation_elbo`` (per held-out cell, full weight; NaN without validation cells),
    ``seconds`` and ``prior`` (the prior's name).

    Parameters
    ----------
    module, data, plan
        What to train, on which cells, how.
    warmup_done
        KL warm-up epochs already behind the module (a model trained before continues its
        warm-up; see :func:`kl_weight`).
    state
        Filled in as training goes (read it after a failure or an interrupt); given with
        an ``optimizer`` entry (from a checkpoint), training continues from it exactly: the
        module must then hold the weights it was saved with.
    on_checkpoint
        Called with ``state`` every ``plan.checkpoint_every`` epochs and at the end.
    label, interrupt_note
        How warnings and errors name this call (``"pre-training"``, say), and what an
        interrupt warning adds.
    warn_unfinished_warmup
        Warn (:class:`UnfinishedWarmupWarning`) when training ends before the warm-up.

    Raises
    ------
    TrainingDivergedError
        When the training loss becomes NaN or infinite. This and any other exception leave
        the module as ``plan.on_failure`` says, and name the epoch and what was restored.
    """
    state = state if state is not None else TrainingState()
    resuming = state.optimizer is not None
    before = _Snapshot(module)
    device = resolve_device(plan.device)
    distributed.join(device)
    device = distributed.local_device(device)
    shard = distributed.rank_and_size()
    max_epochs = plan.max_epochs or default_max_epochs(data.n_obs)
    progress = {"epoch": state.epoch, "last": None}  # the last whole epoch's weights
    interrupt = _Interrupt()
    try:
        with interrupt:
            try:
                stopped = _loop(module, data, plan, device, shard, max_epochs, warmup_done,
                                state, resuming, on_checkpoint, interrupt, progress)
            except KeyboardInterrupt:
                # raised, not signalled to our handler (another thread's code, a callback):
                # the current step may be half done, so go back to the last whole epoch
                if interrupt.requested:
                    raise  # a second Ctrl-C: stop for good
                interrupt.requested = True
                if progress["last"] is not None:
                    module.load_state_dict(progress["last"])
                else:
                    before.restore(module)
                stopped = "interrupted"
    except BaseException as err:
        failed = progress["epoch"] + 1
        if plan.on_failure == "last_epoch" and progress["last"] is not None:
            module.load_state_dict(progress["last"])
            module.eval()
            kept = (f"the model was kept at the end of epoch {state.epoch}, its last finite "
                    "epoch (on_failure='last_epoch')")
        else:
            before.restore(module)
            kept = "the model was restored to its state before this call"
        note = _restored_note(label, failed, max_epochs, kept)
        if isinstance(err, TrainingDivergedError):
            err.args = (f"{err.args[0]}; {kept}",)
        else:  # the error keeps its type; the note shows under its traceback
            err.__notes__ = [*getattr(err, "__notes__", []), f"pyrovae: {note}"]
        raise
    if stopped == "interrupted":
        state.interrupted = True
        if state.best_state is not None:
            module.load_state_dict(state.best_state)
            kept = f"kept the best weights, epoch {state.best_epoch}"
        else:
            kept = "kept the current weights"
        where = f"epoch {progress['epoch'] + 1} of {max_epochs}"
        saved = (f"; {plan.checkpoint} holds epoch {progress['saved']}, which "
                 "pyrovae.resume() continues from" if progress.get("saved") else "")
        warnings.warn(f"{label} interrupted in {where}; {kept}{saved}{interrupt_note}",
                      TrainingInterruptedWarning, stacklevel=user_stacklevel())
    else:
        if state.best_state is not None:
            module.load_state_dict(state.best_state)
        state.finished = True
    module.eval()
    rows = state.rows
    if (warn_unfinished_warmup and not state.interrupted and rows and rows[-1][1] < 1.0):
        warnings.warn(
            f"{label} ended at epoch {len(rows)} with the KL weight at {rows[-1][1]:.2f}, "
            f"before the end of its {plan.kl_warmup_epochs}-epoch warm-up: the objective was "
            "not yet the ELBO and early stopping never acted; train on (model.train continues "
            "the warm-up) or lower kl_warmup_epochs", UnfinishedWarmupWarning, stacklevel=user_stacklevel(),
        )
    if state.finished and on_checkpoint is not None:
        on_checkpoint(state)
    return state.history()


def _loop(module, data, plan, device, shard, max_epochs, warmup_done, state, resuming,
          on_checkpoint, interrupt, progress) -> str:
    """The epochs; returns how they ended: ``"done"``, ``"early"`` or ``"interrupted"``."""
    module.to(device)
    data = on_device(data, device)
    rng = np.random.default_rng(plan.seed)  # alike on every rank: the same split and batches
    keep = module.prior.always_train(data.encoded.label)  # the labelled cells of 'labels'
    train_idx, val_idx = split_cells(data.n_obs, plan.validation_fraction, rng, keep)
    n_train = len(train_idx)
    alone = shard[1] == 1
    # the data were checked once when read: Pyro's per-step argument and support checks
    # would only repeat that work (several ms per step at 2,000 genes)
    # (each rank draws its own Monte Carlo noise and dropout)
    with seeded(plan.seed + 7919 * shard[0], device), pyro.validation_enabled(False):
        prepare(module, data, train_idx, device, rng)
        loss_fn = module.prior.elbo(plan.analytic_kl)(module.model, module.guide)
        step_fn = distributed.wrap(loss_fn, device)  # DistributedDataParallel when several
        optimizer = adam(step_fn.parameters(), plan)
        if resuming:
            optimizer.load_state_dict(state.optimizer)
            rng.bit_generator.state = state.numpy_rng
            mine = state.torch_rng[shard[0]]
            torch.set_rng_state(mine["cpu"])
            if device.type == "cuda" and mine.get("cuda") is not None:
                torch.cuda.set_rng_state(mine["cuda"], device)
        prior_name = module.prior.name
        bar = progress_bar(
            range(state.epoch, max_epochs), desc="training", unit="epoch", initial=state.epoch,
            total=max_epochs, disable=not plan.progress or shard[0] != 0, mininterval=0.5,
        )
        ended = "done"
        try:
            for epoch in bar:
                progress["epoch"] = epoch
                start = time.perf_counter()
                weight = kl_weight(epoch, plan.kl_warmup_epochs, warmup_done)
                module.prior.on_epoch(epoch)
                module.train()
                total = torch.zeros((), device=device)
                for chunk, minibatch in data.epoch(train_idx, plan.batch_size, rng, device, shard):
                    loss = step_fn(*model_args(minibatch, chunk, n_train), weight)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.detach() * len(chunk)
                    if alone and interrupt.requested:
                        break  # at the end of this step: the epoch stays unrecorded
                if alone and interrupt.requested:
                    ended = "interrupted"
                    break
                train_elbo = -float(distributed.all_reduce_sum(total)) / n_train / n_train
                if not math.isfinite(train_elbo):
                    raise TrainingDivergedError(
                        f"the training loss became {train_elbo} in epoch {epoch + 1} of {max_epochs}; "
                        "try a smaller lr, or check the data"
                    )
                distributed.share_buffers(module)
                module.eval()
                val_elbo = (
                    evaluate_loss(loss_fn, data, val_idx, 1024, device, shard) if len(val_idx) else math.nan
                )
                state.rows.append((epoch + 1, weight, train_elbo, val_elbo,
                                   time.perf_counter() - start, prior_name))
                state.epoch = epoch + 1
                progress["last"] = _state_dict_copy(module)
                bar.set_postfix(train_elbo=f"{train_elbo:.1f}", val_elbo=f"{val_elbo:.1f}")
                if plan.early_stopping and len(val_idx) and weight >= 1.0:
                    if val_elbo > state.best:
                        state.best, state.best_epoch, state.waited = val_elbo, epoch + 1, 0
                        state.best_state = _state_dict_copy(module)
                    else:
                        state.waited += 1
                        if state.waited >= plan.patience:
                            bar.set_description(f"stopped early at epoch {epoch + 1}")
                            ended = "early"
                if not alone:  # every rank stops after the same epoch
                    flag = torch.tensor(float(interrupt.requested), device=device)
                    interrupt.requested = bool(distributed.all_reduce_sum(flag) > 0)
                if interrupt.requested:
                    ended = "interrupted"
                if (on_checkpoint is not None and ended != "early" and epoch + 1 < max_epochs
                        and (epoch + 1) % plan.checkpoint_every == 0):
                    _capture(state, optimizer, rng, device)
                    on_checkpoint(state)
                    progress["saved"] = epoch + 1
                if ended != "done":
                    break
        finally:
            bar.close()
        if on_checkpoint is not None and ended != "interrupted":
            _capture(state, optimizer, rng, device)
    return ended


def _capture(state: TrainingState, optimizer, rng: np.random.Generator, device) -> None:
    """The optimiser and the random streams into ``state`` (every process's torch state)."""
    state.optimizer = optimizer.state_dict()
    state.numpy_rng = rng.bit_generator.state
    mine = {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    state.torch_rng = distributed.all_gather_object(mine)
