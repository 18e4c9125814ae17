"""Run by ``tests/test_checkpoint.py`` in a subprocess: a ``fit`` that writes checkpoints,
and that stops still (to be killed with SIGKILL) once its ``N``-th checkpoint is on disk.

Usage: ``python checkpoint_worker.py DATA.h5ad CHECKPOINT N``; prints ``ready`` when the
N-th checkpoint has been renamed into place.
"""

import sys
import time

import anndata as ad
import torch

import pyrovae
from pyrovae import checkpoint

OPTIONS = dict(likelihood="nb", max_epochs=12, kl_warmup_epochs=2, patience=3, lr=3e-2,
               batch_size=64, progress=False, seed=3, checkpoint_every=2)


def main(data: str, path: str, n: int) -> None:
    torch.set_num_threads(1)
    original, written = checkpoint.write, []

    def write(target, content):
        original(target, content)
        written.append(target)
        if len(written) == n:
            print("ready", flush=True)
            time.sleep(600)  # killed here, mid-run

    checkpoint.write = write
    pyrovae.fit(ad.read_h5ad(data), checkpoint=path, **OPTIONS)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
