"""Training on several processes with ``torch.distributed`` (data parallel).

Launch any script that calls :func:`pyrovae.fit` (or ``VAE.train``), or the CLI, with
``torchrun``; every process runs the same code on the same data::

    torchrun --nproc_per_node=4 my_script.py                 # one machine, 4 processes
    torchrun --nproc_per_node=4 -m pyrovae.cli fit data.h5ad -o out.h5ad

    # two machines, run on each (node_rank 0 on the first):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 \\
        --master_addr=node0.example.org --master_port=29500 my_script.py

The trainer finds the launcher's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``)
and joins the process group itself (``nccl`` on GPUs, ``gloo`` on CPUs) unless the script
has already called ``torch.distributed.init_process_group``. Then:

- the ELBO loss module is wrapped in ``DistributedDataParallel``, which starts every rank
  from rank 0's weights and averages the gradients after each backward pass, so the
  parameters stay identical on all ranks;
- each epoch's minibatches are shared out: all ranks draw the same permutation, cut it into
  a multiple of the number of ranks, and take every ``size``-th minibatch, so they see
  disjoint cells in the same number of steps (``batch_size`` is per process);
- the training and validation ELBOs are summed over the ranks, so early stopping decides
  the same on all of them;
- on GPUs each process uses ``cuda:LOCAL_RANK``.

Batch norm statistics are those of each process's minibatch (as in scvi-tools); the
running averages used at evaluation come from rank 0.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["all_gather_object", "all_reduce_sum", "is_launched", "join", "local_device", "rank_and_size", "share_buffers", "wrap"]


def is_launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) as one of
    several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def join(device: torch.device) -> None:
    """Join the launcher's process group if there is one and it is not joined yet."""
    if is_launched() and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` when alone)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(device: torch.device) -> torch.device:
    """With several processes on a machine, each takes the GPU of its local rank."""
    if device.type == "cuda" and device.index is None and rank_and_size()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(loss_fn: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The loss module in ``DistributedDataParallel`` when there are several processes."""
    if rank_and_size()[1] == 1:
        return loss_fn
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(loss_fn, device_ids=device_ids)


def share_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (batch norm running statistics) on every rank: DDP sends them at
    the start of each forward pass, so after the last step of an epoch they differ."""
    if rank_and_size()[1] > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the processes (itself when alone)."""
    if rank_and_size()[1] > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_object(value) -> list:
    """Every process's ``value``, by rank (``[value]`` when alone): the random states a
    checkpoint keeps so that each rank resumes its own stream."""
    rank, size = rank_and_size()
    if size == 1:
        return [value]
    out = [None] * size
    dist.all_gather_object(out, value)
    return out
