"""Run by ``tests/test_distributed.py`` under ``torchrun --nproc_per_node=2``; writes what
each rank saw to ``OUT/rank{r}.pt``.

For each prior (standard normal; a Gaussian mixture whose cluster is enumerated):

1. gradients: every rank takes its own 64 cells; with the random draws fixed per cell and
   the networks in evaluation mode (no dropout, batch norm from running statistics), the
   gradient that DistributedDataParallel averages over the ranks must equal the gradient
   of one process on the union of the ranks' cells;
2. training: two epochs of ``VAE.train`` through the launcher's process group; the
   weights and the history must come out the same on every rank.

Then checkpoints: a run that writes a checkpoint every 2 of its 5 epochs (rank 0 writes,
with every rank's random state), resumed by every rank from its first checkpoint, must end
with the weights of the run itself.
"""

import math
import sys
from pathlib import Path

import numpy as np
import torch

import pyrovae
from pyrovae import distributed
from pyrovae.data import read_data
from pyrovae.priors import GaussianMixture
from pyrovae.train import model_args


def make_prior(name):
    return "normal" if name == "normal" else GaussianMixture(3)


def gradients(sim, prior_name, cells, rank):
    """The DDP-averaged gradient of this rank, the single-process gradient on the union of
    the ranks' cells, and the single-process gradient on this rank's cells."""
    data, n_obs = read_data(sim), sim.n_obs
    noise = torch.randn(8, n_obs, 10, generator=torch.Generator().manual_seed(5))
    current = {}

    def fixed_noise(shape, dtype=None, device=None):  # eps of Normal.rsample, by cell
        index = current["cells"]
        lead = math.prod(shape) // (len(index) * shape[-1])
        return noise[:lead, index, : shape[-1]].reshape(shape).to(dtype)

    original, torch.distributions.normal._standard_normal = torch.distributions.normal._standard_normal, fixed_noise

    def grads(ddp, index):
        module = pyrovae.VAE(sim.var_names, likelihood="nb", prior=make_prior(prior_name), seed=0).module
        module.eval()
        loss_fn = module.prior.elbo(True)(module.model, module.guide)
        step_fn = distributed.wrap(loss_fn, torch.device("cpu")) if ddp else loss_fn
        current["cells"] = torch.as_tensor(index)
        loss = step_fn(*model_args(data.minibatch(index), index, n_obs), 1.0)
        loss.backward()
        return {name: p.grad.clone() for name, p in loss_fn.named_parameters() if p.grad is not None}

    try:
        averaged = grads(True, cells[rank])
        union = grads(False, np.sort(np.concatenate(cells)))
        own = grads(False, cells[rank])  # without DDP: this rank's cells only
    finally:
        torch.distributions.normal._standard_normal = original
    return averaged, union, own


def main(out: Path) -> None:
    torch.set_num_threads(1)
    distributed.join(torch.device("cpu"))
    rank, size = distributed.rank_and_size()
    sim = pyrovae.datasets.simulate(240, 40, 3, likelihood="nb", separation=3.0, seed=1)
    cells = [np.arange(64 * r, 64 * (r + 1)) for r in range(size)]
    result = {"rank": rank, "size": size}
    for prior_name in ("normal", "gmm"):
        averaged, union, own = gradients(sim, prior_name, cells, rank)
        model = pyrovae.VAE(sim.var_names, likelihood="nb", prior=make_prior(prior_name), seed=rank)
        model.train(sim, max_epochs=2, batch_size=32, kl_warmup_epochs=1, progress=False, seed=0)
        result[prior_name] = {
            "averaged": averaged, "union": union, "own": own,
            "state": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
            "history": model.history[["train_elbo", "validation_elbo"]].to_numpy(),
        }
    result["resumed_equal"] = resumed_equals_the_run(sim, out, rank)
    torch.save(result, out / f"rank{rank}.pt")


def resumed_equals_the_run(sim, out: Path, rank: int) -> bool:
    import shutil

    from pyrovae import checkpoint

    path, first = out / "run.ckpt", out / "first.ckpt"
    original = checkpoint.write

    def write(target, content):  # keep the first checkpoint (only rank 0 writes)
        original(target, content)
        if rank == 0 and not first.exists():
            shutil.copy(target, first)

    checkpoint.write = write
    try:
        run = pyrovae.VAE(sim.var_names, likelihood="nb", seed=0)
        run.train(sim, max_epochs=5, batch_size=32, kl_warmup_epochs=1, progress=False,
                  checkpoint=str(path), checkpoint_every=2)
    finally:
        checkpoint.write = original
    torch.distributed.barrier()
    resumed = pyrovae.resume(first, sim)
    return all(torch.equal(v, resumed.module.state_dict()[k]) for k, v in run.module.state_dict().items())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
