"""Issue 11's defects 4-8: each test failed on the code before its fix."""

import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import pyrovae
from pyrovae.data import InvalidDataError, near_equal_batches


@pytest.mark.parametrize("n", [5, 7, 55, 61, 129])
@pytest.mark.parametrize("batch_size", [2, 3, 128])
def test_no_minibatch_has_one_cell(n, batch_size):
    for shard in [(0, 1), (0, 2), (1, 2)]:
        chunks = list(near_equal_batches(np.arange(n), batch_size, np.random.default_rng(0), shard))
        assert min(len(c) for c in chunks) >= 2
        if shard == (0, 1):
            assert max(len(c) for c in chunks) <= max(batch_size, 3)


def test_batch_size_two_with_an_odd_number_of_cells_trains(sim):
    odd = sim[:61].copy()
    model = pyrovae.fit(odd, "nb", max_epochs=2, batch_size=2, kl_warmup_epochs=1, progress=False)
    assert model.settings()["epochs_trained"] == 2


def test_integer_var_names_save_and_load_onto_their_own_data(sim, tmp_path):
    adata = sim.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's warning about a non-string index
        adata.var_names = pd.Index(np.arange(adata.n_vars))
    model = pyrovae.fit(adata, "nb", max_epochs=1, kl_warmup_epochs=1, progress=False)
    model.save(tmp_path / "m.pt")
    loaded = pyrovae.load(tmp_path / "m.pt", adata)
    np.testing.assert_array_equal(loaded.get_latent(adata), model.get_latent(adata))


def test_a_mixture_fit_leaves_the_thread_count_and_later_fits_alone(sim):
    def fit_normal():
        m = pyrovae.fit(sim.copy(), "nb", max_epochs=2, kl_warmup_epochs=1, progress=False, seed=3)
        return m.get_latent(sim)

    torch.set_num_threads(1)
    before = fit_normal()
    pyrovae.fit(sim.copy(), "nb", prior="gmm", n_clusters=4, max_epochs=3, pretrain_epochs=2,
                kl_warmup_epochs=1, progress=False)
    assert torch.get_num_threads() == 1
    np.testing.assert_array_equal(fit_normal(), before)


@pytest.mark.parametrize("option, message", [
    (dict(device="tpu"), "device='tpu' is not a device pyrovae trains on"),
    (dict(max_epochs=2.5), "max_epochs must be a whole number or None, got 2.5"),
    (dict(seed=-1), "seed must be a non-negative integer, got -1"),
    (dict(seed=None), "seed must be a whole number, got None"),
    (dict(batch_size=32.0), "batch_size must be a whole number"),
    (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(pretrain_epochs=-3, prior="gmm", n_clusters=4), "pretrain_epochs must be a whole number >= 0"),
])
def test_bad_settings_are_refused_in_pyrovae_words(sim, option, message):
    adata = sim.copy()
    with pytest.raises(ValueError, match=message):
        pyrovae.fit(adata, "nb", progress=False, **{"max_epochs": 1, **option})
    assert "X_pyrovae" not in adata.obsm


def test_values_are_checked_before_the_float32_cast(sim):
    dense = sim.X.toarray().astype(np.float64)
    near = dense.copy()
    near[3, 5] = 3.00000001  # an integer once cast to float32
    for X in (near, sp.csr_matrix(near)):
        adata = sim.copy()
        adata.X = X
        with pytest.raises(InvalidDataError, match=r"1 non-integer value \(first: 3.00000001 at cell"):
            pyrovae.fit(adata, "nb", max_epochs=1, progress=False)
    huge = dense.copy()
    huge[0, 0] = 1e39  # inf in float32
    adata = sim.copy()
    adata.X = huge
    with pytest.raises(InvalidDataError, match=r"out-of-float32-range value \(first: 1e\+39"):
        pyrovae.fit(adata, "nb", max_epochs=1, progress=False)
    big = dense.astype(np.int64)
    big[0, 0] = 2 ** 24 + 1  # becomes 2**24 in float32
    adata = sim.copy()
    adata.X = big
    with pytest.warns(UserWarning, match=r"above 2\*\*24 \(first: 16777217"):
        pyrovae.fit(adata, "nb", max_epochs=1, kl_warmup_epochs=1, progress=False)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pyrovae", "fit", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_checks_every_path_and_option_before_training(sim, tmp_path):
    source = tmp_path / "in.h5ad"
    sim.write_h5ad(source)
    sim[:1].copy().write_h5ad(tmp_path / "one.h5ad")
    (tmp_path / "broken.h5ad").write_text("not hdf5")
    cases = [
        ((source, "-o", tmp_path / "missing" / "out.h5ad"), "--output=.*folder .* does not exist"),
        ((source, "-o", tmp_path / "o.h5ad", "--model", tmp_path / "no" / "m.pt"), "--model=.*does not exist"),
        ((source, "-o", tmp_path / "o.h5ad", "--checkpoint", tmp_path / "no" / "c"), "--checkpoint=.*does not exist"),
        ((source, "-o", tmp_path / "o.h5ad", "--device", "tpu"), "device='tpu' is not a device"),
        ((source, "-o", tmp_path / "o.h5ad", "--max-epochs", "0"), "max-epochs must be at least 1"),
        ((tmp_path / "one.h5ad", "-o", tmp_path / "o.h5ad"), "one.h5ad: "),
        ((tmp_path / "broken.h5ad", "-o", tmp_path / "o.h5ad"), "not a readable .h5ad file"),
        ((tmp_path / "absent.h5ad", "-o", tmp_path / "o.h5ad"), "absent.h5ad does not exist"),
    ]
    for args, message in cases:
        run = _cli(*args, "--quiet", cwd=tmp_path)
        assert run.returncode == 2, (args, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
        assert pytest.importorskip("re").search(message, lines[0]), (message, lines[0])
    assert not (tmp_path / "o.h5ad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.h5ad", "in.h5ad", "one.h5ad"]


def test_streamed_files_are_checked_before_the_float32_cast(sim, tmp_path):
    dense = sim.X.toarray().astype(np.float64)
    dense[7, 2] = 3.00000001
    adata = sim.copy()
    adata.X = sp.csr_matrix(dense)
    adata.write_h5ad(tmp_path / "near.h5ad")
    with pytest.raises(InvalidDataError, match=r"non-integer value \(first: 3.00000001"):
        pyrovae.fit(tmp_path / "near.h5ad", "nb", max_epochs=1, progress=False)
