"""The scvi-tools contender of ``benchmarks/query.py``, run by a Python with scvi-tools:

    python query_scvi.py FOLDER SEED QUERY_EPOCHS

Reads ``FOLDER/ref.h5ad`` and ``FOLDER/query.h5ad`` (labels in ``obs["known"]``, the query
all ``"Unknown"``; batches in ``obs["batch"]``), trains ``SCVI`` then
``SCANVI.from_scvi_model(unlabeled_category="Unknown")`` on the reference with their default
epochs, maps the query with ``SCANVI.load_query_data`` trained ``QUERY_EPOCHS`` epochs with
``plan_kwargs={"weight_decay": 0.0}`` (scvi-tools' scArches tutorial), and writes the
predictions (``pred_ref.csv``, ``pred_query.csv``) and latent means (``latent_ref.npy``,
``latent_query.npy``) into FOLDER; its last line is ``{"ref_seconds": ..., "query_seconds": ...}``.
"""

import json
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scvi
import torch

torch.set_num_threads(1)
folder, seed, query_epochs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
scvi.settings.seed = seed
ref = ad.read_h5ad(folder / "ref.h5ad")
query = ad.read_h5ad(folder / "query.h5ad")
start = time.perf_counter()
scvi.model.SCVI.setup_anndata(ref, batch_key="batch", labels_key="known")
vae = scvi.model.SCVI(ref)
vae.train()
scanvi = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
scanvi.train()
ref_seconds = time.perf_counter() - start
pd.Series(scanvi.predict(ref), index=ref.obs_names).to_csv(folder / "pred_ref.csv")
np.save(folder / "latent_ref.npy", scanvi.get_latent_representation(ref))
start = time.perf_counter()
scvi.model.SCANVI.prepare_query_anndata(query, scanvi)
mapped = scvi.model.SCANVI.load_query_data(query, scanvi)
mapped.train(max_epochs=query_epochs, plan_kwargs={"weight_decay": 0.0})
query_seconds = time.perf_counter() - start
pd.Series(mapped.predict(query), index=query.obs_names).to_csv(folder / "pred_query.csv")
np.save(folder / "latent_query.npy", mapped.get_latent_representation(query))
print(json.dumps({"ref_seconds": ref_seconds, "query_seconds": query_seconds}))
