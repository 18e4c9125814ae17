"""The scvi-tools contender of ``benchmarks/mixtures.py --auto``, run by a Python with
scvi-tools:

    python mixtures_scvi.py DATA.h5ad LATENT.npy SEED THREADS

Trains ``scvi.model.SCVI`` with its defaults (ZINB, 10 latent dimensions, its default
number of epochs) on the cells whose ``obs["split"]`` is ``"train"``, writes the latent
means of all cells of DATA.h5ad to LATENT.npy (``get_representation``, in DATA's order;
``benchmarks/mixtures.py`` runs the scanpy neighbours and Leiden on them, as for pyrovae),
and prints as its last line ``{"seconds", "epochs", "s_per_epoch", "held_out_elbo"}``
(``held_out_elbo``: ``get_elbo`` on the ``"test"`` cells, the mean ELBO per cell).
"""

import json
import sys
import time

import anndata as ad
import numpy as np
import scvi
import torch

path, out, seed, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
scvi.settings.seed = seed
adata = ad.read_h5ad(path)
train = adata[adata.obs["split"] == "train"].copy()
test = adata[adata.obs["split"] == "test"].copy()
scvi.model.SCVI.setup_anndata(train)
vae = scvi.model.SCVI(train)
start = time.perf_counter()
vae.train()
seconds = time.perf_counter() - start
epochs = int(len(vae.history["elbo_train"]))
np.save(out, vae.get_latent_representation(adata))
print(json.dumps({"seconds": seconds, "epochs": epochs, "s_per_epoch": seconds / max(epochs, 1),
                  "held_out_elbo": float(vae.get_elbo(test))}))
