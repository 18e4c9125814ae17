"""The scvi-tools contender of ``benchmarks/labels.py``, run by a Python with scvi-tools:

    python labels_scvi.py DATA.h5ad OUT.csv SEED

Trains ``SCVI`` then ``SCANVI.from_scvi_model(unlabeled_category="Unknown")`` with their
default epochs on ``obs["known"]``, writes the soft predictions (cells x labels) to
``OUT.csv`` and prints ``{"seconds": ...}`` as its last line.
"""

import json
import sys
import time

import anndata as ad
import scvi
import torch

torch.set_num_threads(1)
path, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
scvi.settings.seed = seed
adata = ad.read_h5ad(path)
start = time.perf_counter()
scvi.model.SCVI.setup_anndata(adata, labels_key="known")
vae = scvi.model.SCVI(adata)
vae.train()
scanvi = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
scanvi.train()
seconds = time.perf_counter() - start
scanvi.predict(adata, soft=True).to_csv(out)
print(json.dumps({"seconds": seconds}))
