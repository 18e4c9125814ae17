"""Larger-than-memory data: backed AnnData and lists of .h5ad files, streamed in chunks."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import pyrovae
from pyrovae.data import BackedData, InvalidDataError, open_h5ad, read_data


@pytest.fixture
def files(sim, tmp_path):
    """``sim`` written as three .h5ad files of 100 cells each."""
    paths = []
    for i in range(3):
        path = tmp_path / f"part{i}.h5ad"
        sim[i * 100:(i + 1) * 100].copy().write_h5ad(path)
        paths.append(path)
    return paths


def test_file_list_streams_the_same_rows_as_memory(sim, files):
    data = open_h5ad(files, chunk_size=64)
    memory = read_data(sim)
    assert isinstance(data, BackedData) and data.n_obs == 300
    np.testing.assert_array_equal(data.totals(), memory.totals())
    index = np.array([5, 150, 99, 100, 299, 0])
    np.testing.assert_array_equal(data.rows(index), memory.rows(index))
    seen = np.concatenate([cells for cells, _ in data.epoch(np.arange(300), 32, np.random.default_rng(0))])
    assert sorted(seen.tolist()) == list(range(300))  # every cell once per epoch
    for cells, (x, *_rest) in data.epoch(np.arange(300), 32, np.random.default_rng(1)):
        np.testing.assert_array_equal(x.numpy(), memory.rows(cells))
        assert 2 <= len(cells) <= 32


def test_in_order_pass_matches_in_memory_results(sim, files, quick):
    model = pyrovae.fit(sim.copy(), **quick)
    torch.manual_seed(0)
    from_files = model.get_latent(files)
    backed = ad.read_h5ad(files[1], backed="r")
    np.testing.assert_allclose(from_files, model.get_latent(sim), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.get_latent(backed), model.get_latent(sim[100:200]), rtol=1e-5, atol=1e-5)


def test_fit_on_files_and_backed_anndata(sim, files, quick):
    model = pyrovae.fit(files, likelihood="nb", **quick)
    assert isinstance(model, pyrovae.VAE) and len(model.history) == 3
    assert np.isfinite(model.history["train_elbo"]).all()
    assert model.get_latent(files).shape == (300, 10)
    backed = ad.read_h5ad(files[0], backed="r")
    before = backed.obs.copy()
    trained = pyrovae.fit(backed, **quick)
    assert trained.get_latent(backed).shape == (100, 10)
    assert "X_pyrovae" in backed.obsm  # backed obs/obsm live in memory and are written
    assert backed.obs.drop(columns=[c for c in backed.obs if c.startswith("pyrovae")]).equals(before)


def test_streamed_training_matches_in_memory_training_when_one_chunk(sim, files, quick):
    """With one chunk and the same seed, a file and the same AnnData in memory train alike."""
    one = files[0].parent / "all.h5ad"
    sim.write_h5ad(one)
    a = pyrovae.fit(sim.copy(), **quick)
    b = pyrovae.fit(one, **quick)
    np.testing.assert_allclose(a.history["train_elbo"], b.history["train_elbo"], rtol=1e-4)


def test_files_with_other_genes_are_refused(sim, files, tmp_path):
    other = tmp_path / "other.h5ad"
    sim[:50, ::-1].copy().write_h5ad(other)
    with pytest.raises(InvalidDataError, match="other genes"):
        open_h5ad([files[0], other])
    with pytest.raises(FileNotFoundError, match="nope.h5ad"):
        open_h5ad([files[0], tmp_path / "nope.h5ad"])


def test_bad_values_in_a_later_chunk_are_named(sim, tmp_path):
    bad = sim.copy()
    X = bad.X.toarray()
    X[250, 3] = 0.5
    bad.X = X
    path = tmp_path / "bad.h5ad"
    bad.write_h5ad(path)
    with pytest.raises(InvalidDataError, match=r"non-integer.*cell '.*', gene"):
        open_h5ad(path, chunk_size=64)
    empty = sim.copy()
    X = empty.X.toarray()
    X[10] = 0
    empty.X = X
    empty.write_h5ad(path)
    with pytest.raises(InvalidDataError, match="1 of 300 cells have no counts"):
        open_h5ad(path, chunk_size=64)


def test_model_of_other_genes_refuses_files(sim, files, quick):
    model = pyrovae.fit(sim[:, :50].copy(), **quick)
    with pytest.raises(InvalidDataError, match="trained on 50 genes"):
        model.get_latent(files)


def test_posterior_predictive_check_on_backed_anndata(sim, files, quick):
    model = pyrovae.fit(sim.copy(), **quick)
    backed = ad.read_h5ad(files[2], backed="r")
    check = model.posterior_predictive_check(backed, n_samples=5, seed=0)
    memory = model.posterior_predictive_check(sim[200:].copy(), n_samples=5, seed=0)
    pd.testing.assert_frame_equal(check.cells, memory.cells)
    pd.testing.assert_frame_equal(check.genes, memory.genes)


@pytest.mark.parametrize("sparse", [True, False])
def test_device_resident_data_cuts_the_same_minibatches(sim, sparse):
    from pyrovae.data import DeviceData

    adata = sim.copy()
    if not sparse:
        adata.X = adata.X.toarray()
    memory = read_data(adata)
    on_device = DeviceData(memory, "cpu")  # the GPU code path, run on the CPU
    index = np.array([0, 3, 4, 150, 299])
    for got, want in zip(on_device.minibatch(index), memory.minibatch(index)):
        assert (got is None and want is None) or torch.equal(got, want)
    np.testing.assert_array_equal(on_device.totals(), memory.totals())


def test_training_from_device_resident_data_matches(sim, quick, monkeypatch):
    from pyrovae import train as training
    from pyrovae.data import DeviceData

    plain = pyrovae.fit(sim.copy(), **quick)
    monkeypatch.setattr(training, "on_device", lambda data, device: DeviceData(data, device))
    moved = pyrovae.fit(sim.copy(), **quick)
    np.testing.assert_allclose(moved.history["train_elbo"], plain.history["train_elbo"], rtol=1e-6)
