"""Checkpoint files: what a training run needs to continue exactly where it stopped.

A checkpoint is one torch archive (read with ``weights_only=True``) holding

- ``model_file``: the bytes of the model as :meth:`pyrovae.VAE.save` writes it (settings,
  genes, weights at the checkpoint), and the seed that places a prior swapped in later;
- ``history`` and ``model_plan``: the model's history and plan before this call;
- ``plan``: this call's :class:`~pyrovae.train.TrainingPlan`; ``state``: its
  :class:`~pyrovae.train.TrainingState` (epoch, history rows, early stopping, optimiser,
  numpy and torch random states, one torch state per process);
- ``data``: the number of cells and a SHA-256 fingerprint of the cells' names, genes,
  totals and batches, so that a checkpoint is never continued on other data;
- ``run``: what the rest of the run is (a ``fit`` with its stage and outputs, or a
  ``train`` call), and ``world_size``.

It is written as a verified file (:mod:`pyrovae.files`: a header with its size and
SHA-256, a temporary file in the same folder renamed over the old one), so that a crash or
a kill mid-write leaves the previous checkpoint whole and a damaged one is refused.
:func:`pyrovae.resume` reads it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import __version__, distributed, files
from .train import TrainingPlan, TrainingState

if TYPE_CHECKING:
    from .data import CountData
    from .vae import VAE

__all__ = ["CheckpointError", "CheckpointMismatchError", "FORMAT", "check_folder",
           "fingerprint", "read", "write"]

FORMAT = "pyrovae-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(files.FileFormatError):
    """A file is not a checkpoint pyrovae can read."""


class CheckpointMismatchError(ValueError):
    """A checkpoint is for other data, other settings or another number of processes."""


def check_folder(path: str | os.PathLike) -> None:
    """Refuse, before any training, a checkpoint path that cannot be written."""
    files.check_writable(path, "checkpoint")


def fingerprint(data: CountData) -> dict[str, Any]:
    """The number of cells and a SHA-256 of their names, the genes, each cell's total and
    batch: the same for the same data, different for other cells, genes or counts."""
    digest = hashlib.sha256()
    for names in (data.obs_names, data.var_names):
        digest.update("\n".join(map(str, names)).encode())
        digest.update(b"\0")
    digest.update(np.ascontiguousarray(data.totals(), dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(data.encoded.batch, dtype=np.int64).tobytes())
    return {"n_obs": int(data.n_obs), "sha256": digest.hexdigest()}


def model_bytes(model: VAE) -> bytes:
    """The model file :meth:`VAE.save` writes, as bytes."""
    with tempfile.TemporaryDirectory(prefix="pyrovae-") as folder:
        path = Path(folder) / "model.pt"
        model.save(path)
        return path.read_bytes()


def payload(model: VAE, plan: TrainingPlan, state: TrainingState, data: dict[str, Any],
            run: dict[str, Any], history: dict[str, list], model_plan: TrainingPlan | None) -> dict:
    """Everything :func:`pyrovae.resume` needs, as plain values and CPU tensors."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": __version__,
        "model_file": model_bytes(model),
        "seed": int(model.seed),
        "history": history,
        "model_plan": asdict(model_plan) if model_plan is not None else None,
        "plan": asdict(plan),
        "state": state.to_dict(),
        "data": data,
        "run": run,
        "world_size": distributed.rank_and_size()[1],
    }


def write(path: str | os.PathLike, content: dict) -> None:
    """``content`` to ``path`` atomically and with its SHA-256
    (:func:`pyrovae.files.write_verified`; only rank 0 writes under ``torchrun``)."""
    if distributed.rank_and_size()[0] != 0:
        return
    files.write_verified(path, content, format=FORMAT, format_version=FORMAT_VERSION)


def read(path: str | os.PathLike) -> dict:
    """A checkpoint's content, verified whole; :class:`CheckpointError` for anything that
    is not a whole checkpoint."""
    content = files.read_verified(
        path, format=FORMAT, format_version=FORMAT_VERSION, what="checkpoint",
        error=CheckpointError, others={files.MODEL_FORMAT: ": load it with pyrovae.load"},
    )
    if content.get("format") != FORMAT:  # a bare torch archive of something else
        raise CheckpointError(f"{os.fspath(path)!r} is not a pyrovae checkpoint")
    if content.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{os.fspath(path)!r} was written by a newer pyrovae (checkpoint format "
            f"{content['format_version']}, this one reads up to {FORMAT_VERSION}); upgrade pyrovae"
        )
    return content


def check_data(content: dict, data: CountData, path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose run was on other cells or counts."""
    want, got = content["data"], fingerprint(data)
    if want["n_obs"] != got["n_obs"]:
        raise CheckpointMismatchError(
            f"{os.fspath(path)!r} is a run on {want['n_obs']} cells; this data has "
            f"{got['n_obs']}: resume it on the data it was started with"
        )
    if want["sha256"] != got["sha256"]:
        raise CheckpointMismatchError(
            f"{os.fspath(path)!r} is a run on other data (the same number of cells, but other "
            "cell names, counts or batches): resume it on the data it was started with"
        )


def check_settings(content: dict, settings: dict[str, Any], expected: dict[str, Any],
                   path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose settings are not those the caller expects, or that was
    written by another number of processes."""
    size = distributed.rank_and_size()[1]
    if content["world_size"] != size:
        raise CheckpointMismatchError(
            f"{os.fspath(path)!r} was written by {content['world_size']} process(es); resume it "
            f"with as many (this is {size})"
        )
    for key, value in expected.items():
        if key not in settings:
            raise CheckpointMismatchError(
                f"{key!r} is not a setting of the run in {os.fspath(path)!r}; "
                f"it has {sorted(settings)}"
            )
        have = settings[key]
        if _plain(have) != _plain(value):
            raise CheckpointMismatchError(
                f"{os.fspath(path)!r} is a run with {key}={have!r}, not {value!r}"
            )


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
