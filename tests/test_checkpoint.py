"""Checkpoints and exact resume (``pyrovae/checkpoint.py``, ``pyrovae.resume``)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import pyrovae
from pyrovae import checkpoint, files
from pyrovae.checkpoint import CheckpointError, CheckpointMismatchError
from pyrovae.priors import GaussianMixture

from .checkpoint_worker import OPTIONS

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def assert_same_run(a, b, adata):
    """Bit-identical weights, latent space and history (all but the seconds)."""
    state_a, state_b = a.module.state_dict(), b.module.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, value in state_a.items():
        assert torch.equal(value, state_b[name]), name
    np.testing.assert_array_equal(a.get_latent(adata), b.get_latent(adata))
    pd.testing.assert_frame_equal(a.history.drop(columns="seconds"),
                                  b.history.drop(columns="seconds"))


def keep_copies(monkeypatch, folder):
    """Patch the checkpoint writer to keep a copy of every checkpoint it writes."""
    original, copies = checkpoint.write, []

    def write(path, content):
        original(path, content)
        copies.append(Path(folder) / f"copy{len(copies) + 1}.ckpt")
        shutil.copy(path, copies[-1])

    monkeypatch.setattr(checkpoint, "write", write)
    return copies


def test_a_run_killed_by_sigkill_resumes_bit_identically(sim, tmp_path):
    source, path = tmp_path / "data.h5ad", tmp_path / "run.ckpt"
    sim.write_h5ad(source)
    worker = Path(__file__).with_name("checkpoint_worker.py")
    child = subprocess.Popen([sys.executable, str(worker), str(source), str(path), "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        line = child.stdout.readline()
        assert line.strip() == "ready", child.stderr.read()[-3000:]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    saved = checkpoint.read(path)
    assert saved["state"]["epoch"] == 4 and not saved["state"]["finished"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries

    resumed_data, whole_data = sim.copy(), sim.copy()
    resumed = pyrovae.resume(path, resumed_data)
    whole = pyrovae.fit(whole_data, **{k: v for k, v in OPTIONS.items() if k != "checkpoint_every"})
    assert_same_run(resumed, whole, sim)
    np.testing.assert_array_equal(resumed_data.obsm["X_pyrovae"], whole_data.obsm["X_pyrovae"])
    assert len(whole.history) > 4  # the resumed part did real work
    assert checkpoint.read(path)["state"]["finished"]


@pytest.mark.parametrize("copy", [1, 2, 3], ids=["in-pre-training", "end-of-pre-training", "in-mixture"])
def test_a_staged_mixture_fit_resumes_from_any_checkpoint(sim, tmp_path, monkeypatch, copy):
    # the warm-up (6 epochs) goes on into the mixture stage: copy 3 is in its middle
    options = dict(likelihood="nb", max_epochs=7, kl_warmup_epochs=6, pretrain_epochs=3,
                   progress=False, seed=2, checkpoint_every=2)
    copies = keep_copies(monkeypatch, tmp_path)
    whole = pyrovae.fit(sim.copy(), prior=GaussianMixture(3, init="kmeans"),
                        checkpoint=tmp_path / "run.ckpt", **options)
    monkeypatch.undo()
    stages = [checkpoint.read(c)["run"]["stage"] for c in copies]
    assert stages == ["pretrain", "pretrain", "mixture", "mixture"]
    adata = sim.copy()
    resumed = pyrovae.resume(copies[copy - 1], adata)
    assert resumed.prior.name == "gmm" and list(resumed.history["prior"]) == ["normal"] * 3 + ["gmm"] * 4
    np.testing.assert_allclose(resumed.history["kl_weight"], [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1, 1])
    assert_same_run(resumed, whole, sim)
    np.testing.assert_array_equal(adata.obs["pyrovae_cluster"], whole.get_clusters(sim).astype(str))


def test_train_resumes_with_early_stopping_state(sim, tmp_path, monkeypatch):
    options = dict(max_epochs=40, kl_warmup_epochs=2, patience=3, lr=1e-2, progress=False,
                   checkpoint_every=2)
    first = pyrovae.VAE(sim.var_names, likelihood="nb", seed=1).train(sim, max_epochs=2, progress=False)
    reference = pyrovae.VAE(sim.var_names, likelihood="nb", seed=1).train(sim, max_epochs=2, progress=False)
    copies = keep_copies(monkeypatch, tmp_path)
    first.train(sim, checkpoint=str(tmp_path / "run.ckpt"), **options)
    monkeypatch.undo()
    reference.train(sim, **options)
    assert len(first.history) < 42  # stopped early, after the checkpoint below
    saved = checkpoint.read(copies[1])
    assert saved["state"]["epoch"] == 4 and saved["state"]["best_state"] is not None
    assert len(first.history) > 2 + 4 + 1
    assert_same_run(pyrovae.resume(copies[1], sim), reference, sim)
    assert_same_run(pyrovae.resume(copies[-1], sim), reference, sim)  # a finished run


def test_checkpoints_refuse_other_data_and_settings(sim, tmp_path):
    path = tmp_path / "run.ckpt"
    pyrovae.fit(sim.copy(), "nb", max_epochs=2, progress=False, checkpoint=path)
    with pytest.raises(CheckpointMismatchError, match="other genes|genes"):
        pyrovae.resume(path, sim[:, 1:].copy())
    with pytest.raises(CheckpointMismatchError, match="run on 300 cells; this data has 299"):
        pyrovae.resume(path, sim[1:].copy())
    other = sim.copy()
    other.X = other.X.copy()
    other.X.data[0] += 1  # one count more in one cell
    with pytest.raises(CheckpointMismatchError, match="other data"):
        pyrovae.resume(path, other)
    with pytest.raises(CheckpointMismatchError, match="likelihood='nb', not 'zinb'"):
        pyrovae.resume(path, sim.copy(), likelihood="zinb")
    with pytest.raises(CheckpointMismatchError, match="not a setting"):
        pyrovae.resume(path, sim.copy(), colour="red")
    assert pyrovae.resume(path, sim.copy(), likelihood="nb", max_epochs=2).settings()["epochs_trained"] == 2


def test_bad_checkpoint_files_are_named_errors(tmp_path, sim):
    with pytest.raises(CheckpointError, match="does not exist"):
        pyrovae.resume(tmp_path / "missing.ckpt", sim)
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint written by pyrovae: it is a text file"):
        pyrovae.resume(tmp_path / "text.ckpt", sim)
    torch.save({"a": 1}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a pyrovae checkpoint"):
        pyrovae.resume(tmp_path / "other.ckpt", sim)


def test_a_checkpoint_folder_that_does_not_exist_is_refused_before_training(sim, tmp_path):
    adata = sim.copy()
    with pytest.raises(ValueError, match="folder .* does not exist"):
        pyrovae.fit(adata, "nb", max_epochs=2, progress=False, checkpoint=tmp_path / "no" / "run.ckpt")
    assert "X_pyrovae" not in adata.obsm


def test_a_failed_write_keeps_the_previous_checkpoint(sim, tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    checkpoint.write(path, {"format": checkpoint.FORMAT, "n": 1})

    def broken(content, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(files.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write(path, {"format": checkpoint.FORMAT, "n": 2})
    monkeypatch.undo()
    assert checkpoint.read(path)["n"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]


def test_cli_writes_a_checkpoint_and_stops_cleanly_on_sigint(sim, tmp_path):
    source, output, path = tmp_path / "in.h5ad", tmp_path / "out.h5ad", tmp_path / "run.ckpt"
    sim.write_h5ad(source)
    child = subprocess.Popen(
        [sys.executable, "-m", "pyrovae.cli", "fit", str(source), "-o", str(output),
         "--likelihood", "nb", "--max-epochs", "100000", "--checkpoint", str(path),
         "--checkpoint-every", "1", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )
    deadline = time.monotonic() + 300
    while not path.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGINT)  # training is under way: its first epoch is on disk
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    assert "interrupted in epoch" in err and "kept the current weights" in err
    assert "wrote" in out
    written = ad.read_h5ad(output)
    assert written.obsm["X_pyrovae"].shape == (sim.n_obs, 10)
    assert np.isfinite(written.obsm["X_pyrovae"]).all()
    assert 1 <= len(written.uns["pyrovae"]["history"]["epoch"]) < 100000


def test_a_damaged_checkpoint_is_refused_by_name(sim, tmp_path):
    path = tmp_path / "run.ckpt"
    pyrovae.fit(sim.copy(), "nb", max_epochs=2, kl_warmup_epochs=1, progress=False, checkpoint=path)
    raw = path.read_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x01
    (tmp_path / "flipped.ckpt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="flipped.ckpt.*corrupted"):
        pyrovae.resume(tmp_path / "flipped.ckpt", sim)
    (tmp_path / "cut.ckpt").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(CheckpointError, match="cut.ckpt.*truncated"):
        pyrovae.resume(tmp_path / "cut.ckpt", sim)
    with pytest.raises(files.ModelFileError, match="is a pyrovae-checkpoint file, not a pyrovae-model file.*resume"):
        pyrovae.load(path)
