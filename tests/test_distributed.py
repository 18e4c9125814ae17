"""Data-parallel training on two CPU processes (``gloo``), launched as a user would, with
``torchrun``; the work is in ``tests/distributed_worker.py``."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyrovae.data import near_equal_batches


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    worker = Path(__file__).with_name("distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(worker), str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_processes_joined_one_group(ranks):
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["size"] == 2 for r in ranks)


@pytest.mark.parametrize("prior", ["normal", "gmm"])
def test_averaged_gradient_equals_the_gradient_on_the_union(ranks, prior):
    for rank in ranks:
        averaged, union = rank[prior]["averaged"], rank[prior]["union"]
        assert averaged.keys() == union.keys() and len(union) > 5
        for name in union:
            torch.testing.assert_close(averaged[name], union[name], rtol=1e-4, atol=1e-4 * union[name].abs().max().item() + 1e-6,
                                       msg=f"{prior}: gradient of {name}")
        # alone, a rank's gradient is not the union's: the averaging did the work
        weight = "model.decoder.body.0.weight"
        assert not torch.allclose(rank[prior]["own"][weight], union[weight], rtol=1e-2)


@pytest.mark.parametrize("prior", ["normal", "gmm"])
def test_parameters_stay_identical_across_ranks(ranks, prior):
    """Each rank started from other weights (seed = rank) and trained on other cells;
    DDP broadcast rank 0's weights and averaged every gradient."""
    first, second = ranks[0][prior], ranks[1][prior]
    assert first["state"].keys() == second["state"].keys()
    for name, value in first["state"].items():
        torch.testing.assert_close(second["state"][name], value, rtol=0, atol=0, msg=name)
    np.testing.assert_array_equal(first["history"], second["history"])
    assert np.isfinite(first["history"]).all()


def test_every_rank_resumes_a_checkpoint_exactly(ranks):
    assert [r["resumed_equal"] for r in ranks] == [True, True]


def test_shards_are_disjoint_cover_all_cells_and_take_equal_steps():
    index = np.arange(1000)
    shards = [list(near_equal_batches(index, 64, np.random.default_rng(3), (r, 3))) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # the same number of steps on every rank
    cells = np.concatenate([c for s in shards for c in s])
    assert sorted(cells.tolist()) == list(range(1000))
    assert max(len(c) for s in shards for c in s) <= 64
    alone = list(near_equal_batches(index, 64, np.random.default_rng(3)))
    assert [c.tolist() for c in alone] == [c.tolist() for c in
                                           near_equal_batches(index, 64, np.random.default_rng(3), (0, 1))]


def test_cli_under_torchrun_trains_on_two_processes_and_writes_once(sim, tmp_path):
    source, output = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    sim.write_h5ad(source)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pyrovae.cli", "fit", str(source), "-o", str(output), "--likelihood", "nb",
         "--max-epochs", "2", "--quiet"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1
    import anndata as ad

    assert ad.read_h5ad(output).obsm["X_pyrovae"].shape == (sim.n_obs, 10)
