import matplotlib
import numpy as np
import pytest
import torch

import pyrovae

matplotlib.use("Agg")
# The tests train tiny networks: one thread is fastest, and on a shared machine a second
# intra-op thread that is descheduled makes every operator wait (up to 10x slower here).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sim():
    """A small simulated count data set with 4 well-separated clusters (do not modify)."""
    return pyrovae.datasets.simulate(300, 60, 4, likelihood="nb", separation=3.0, seed=1)


@pytest.fixture
def small(sim):
    """A fresh copy of ``sim`` that a test may write into."""
    return sim.copy()


@pytest.fixture(scope="session")
def quick():
    """Training options for tests that only need a trained model, not a good one."""
    return dict(max_epochs=3, progress=False, seed=0)


def continuous_version(adata, kind):
    """Data for the continuous likelihoods: log-normalised, or scaled to [0, 1]."""
    out = adata.copy()
    X = out.X.toarray()
    X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    if kind == "unit_interval":
        X = X / X.max(0, keepdims=True)
    out.X = X.astype(np.float32)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts at one torch thread: scanpy's neighbour search (the mixture's
    Leiden start) raises the count, and results compared bit for bit with a one-thread
    subprocess (the checkpoint tests) would then differ."""
    torch.set_num_threads(1)
    yield
