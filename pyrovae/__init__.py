"""Variational autoencoders for single-cell RNA-seq counts, written as Pyro models and guides.

>>> import pyrovae
>>> adata = pyrovae.datasets.pbmc68k()
>>> model = pyrovae.fit(adata, likelihood="zinb")      # writes adata.obsm["X_pyrovae"]
>>> expr = model.get_normalized_expression(adata)
>>> table = model.differential_expression(adata, "cell_type", "CD14+ Monocyte")
"""

__version__ = "0.1.0"

import pyro  # noqa: E402

# Parameters live in their modules, not in Pyro's global parameter store, so that two
# models coexist in one process and a model saves with its state_dict. PyroModules built
# after importing pyrovae (the user's own too) follow this setting.
pyro.settings.set(module_local_params=True)

from . import checkpoint, criticism, datasets, de, imputation, likelihoods, metrics, plotting, priors  # noqa: E402
from .api import fit, resume  # noqa: E402
from .compare import compare  # noqa: E402
from .criticism import posterior_predictive_check  # noqa: E402
from .data import InvalidDataError  # noqa: E402
from .nn import Architecture  # noqa: E402
from .train import TrainingPlan  # noqa: E402
from .vae import VAE, load  # noqa: E402

__all__ = [
    "Architecture",
    "InvalidDataError",
    "TrainingPlan",
    "VAE",
    "__version__",
    "checkpoint",
    "compare",
    "criticism",
    "datasets",
    "de",
    "fit",
    "imputation",
    "likelihoods",
    "load",
    "metrics",
    "plotting",
    "posterior_predictive_check",
    "priors",
    "resume",
]
