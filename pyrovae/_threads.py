"""Keep torch's thread count across third-party code that changes it.

scanpy's ``sc.pp.neighbors`` and ``sc.tl.umap`` run numba code through pynndescent and
umap-learn, which call ``numba.set_num_threads`` and then "restore" numba's default (all
cores). With numba's OpenMP threading layer that sets the OpenMP runtime torch shares, so
afterwards ``torch.get_num_threads()`` is the number of cores, whatever the user had set:
measured on a 2-core machine with ``torch.set_num_threads(1)``, one ``sc.pp.neighbors``
call raised it to 2, and with another process on the second core a mixture VAE's epochs
then took 45 times as long. pyrovae's own calls of those functions (Leiden scores, UMAP)
run inside :func:`torch_threads_kept`, so that computing a metric or a plot does not
change how the next model trains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Run the block, then set torch's intra-op thread count back to what it was."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
