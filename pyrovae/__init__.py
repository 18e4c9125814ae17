"""Variational autoencoders for single-cell RNA-seq counts, written as Pyro models and guides.

>>> import pyrovae
>>> adata = pyrovae.datasets.pbmc68k()
>>> model = pyrovae.fit(adata, likelihood="zinb")      # writes adata.obsm["X_pyrovae"]
>>> expr = model.get_normalized_expression(adata)
>>> table = model.differential_expression(adata, "cell_type", "CD14+ Monocyte")
"""

__version__ = "0.1.0"

# pyrovae changes no Pyro setting and never uses Pyro's global parameter store: its
# parameters are local torch parameters whatever ``module_local_params`` says (see
# pyrovae.nn.LocalPyroModule), so the user's own Pyro code runs beside it unchanged.

from . import (checkpoint, clusters, criticism, datasets, de, files, imputation,  # noqa: E402
               likelihoods, metrics, plotting, priors)
from . import labels, query  # noqa: E402  (labels registers the 'labels' prior)
from . import compare  # noqa: E402  (a module, callable as its compare function)
from .api import fit, resume  # noqa: E402
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
    "clusters",
    "compare",
    "criticism",
    "datasets",
    "de",
    "files",
    "fit",
    "imputation",
    "labels",
    "likelihoods",
    "load",
    "metrics",
    "plotting",
    "posterior_predictive_check",
    "priors",
    "query",
    "resume",
]
