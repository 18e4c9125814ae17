"""Quick start: fit a ZINB VAE, look at the latent space, denoise, check, save and reload.

    python examples/quickstart.py

Set PYROVAE_EXAMPLE_EPOCHS to train for fewer epochs (the test suite uses 2).
"""

import os

import numpy as np
import scanpy as sc

import pyrovae

max_epochs = int(os.environ.get("PYROVAE_EXAMPLE_EPOCHS", 0)) or None

# 700 PBMCs with raw counts and 10 FACS-sorted cell types
adata = pyrovae.datasets.pbmc68k()

# train; writes adata.obsm["X_pyrovae"] and adata.uns["pyrovae"]
model = pyrovae.fit(adata, likelihood="zinb", max_epochs=max_epochs, seed=0)
print(model)

# the latent space works with scanpy like any other representation
sc.pp.neighbors(adata, use_rep="X_pyrovae")
sc.tl.leiden(adata, key_added="leiden_pyrovae", flavor="igraph", n_iterations=2, directed=False)
print(adata.obs.groupby("cell_type", observed=True)["leiden_pyrovae"].agg(lambda s: s.value_counts().index[0]))

# denoised expression at 10,000 counts per cell, kept where scanpy users look
adata.layers["pyrovae_normalized"] = model.get_normalized_expression(adata, library_size=1e4)

# how well does the model explain each cell? (use held-out cells to compare models)
print(model.elbo(adata).describe().loc[["mean", "std"]])

# posterior predictive check: fraction of zeros, observed against replicated
replicates = model.posterior_predictive_sample(adata, n_samples=5)
print(f"zeros: observed {np.mean(adata.X.toarray() == 0):.3f}, replicated {np.mean(replicates == 0):.3f}")

# save and reload: the same latent space, to the last bit
model.save("pbmc68k_zinb.pt")
again = pyrovae.load("pbmc68k_zinb.pt", adata)
assert np.array_equal(again.get_latent(adata), adata.obsm["X_pyrovae"])
