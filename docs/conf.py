"""Sphinx configuration: ``sphinx-build -W -b html docs docs/_build/html`` from the repository root.

The tutorials are MyST Markdown notebooks (``docs/tutorials/*.md``), executed at every
build; a cell that raises fails the build, and so does any warning (``-W``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's pyrovae, installed or not

import pyrovae  # noqa: E402

project = "pyrovae"
author = "The pyrovae developers"
copyright = "2026, The pyrovae developers"
release = version = pyrovae.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "_inventories", "_templates", "**.ipynb_checkpoints",
                    "jupyter_execute"]
templates_path = ["_templates"]

# -- API reference ------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
napoleon_use_param = True



#: the submodules with a page in the API reference (docs/api/index.md lists the same)
MODULES = ("priors", "likelihoods", "criticism", "metrics", "plotting", "de", "imputation",
           "datasets", "testing", "checkpoint", "train", "nn", "module", "progress", "files",
           "clusters", "labels", "query")


def _top_level() -> dict[str, list[str]]:
    """Per module, the names of its ``__all__`` that ``pyrovae`` exports as the same
    object (``TrainingPlan`` of ``pyrovae.train``, say): their entry is the top-level one."""
    import importlib

    found = {}
    for name in MODULES:
        module = importlib.import_module(f"pyrovae.{name}")
        found[module.__name__] = [
            member for member in getattr(module, "__all__", [])
            if member in pyrovae.__all__ and getattr(pyrovae, member) is getattr(module, member)
        ]
    return found


def _module_data() -> dict[str, list[tuple[str, str]]]:
    """Public data (names in a module's ``__all__`` that are neither functions, classes nor
    modules) per module, described from their values; autosummary's module template lists
    them (their own docstring would be their type's)."""
    import importlib
    import inspect

    found = {}
    for name in MODULES:
        module = importlib.import_module(f"pyrovae.{name}")
        items = []
        for member in getattr(module, "__all__", []):
            value = getattr(module, member)
            if callable(value) or inspect.ismodule(value):
                continue
            if isinstance(value, dict):
                keys = ", ".join(f"``{key!r}``" for key in value)
                text = f"The registry, by name: {keys} (at the time this page was built)."
            else:
                text = f"``{value!r}``"
            items.append((member, text))
        found[module.__name__] = items
    return found


autosummary_context = {"module_data": _module_data(), "top_level": _top_level()}

# -- intersphinx, offline -----------------------------------------------------------------
# The build has no network (CI and the project's machines reach only PyPI), so intersphinx
# reads small inventories committed in docs/_inventories/ instead of downloading each
# project's objects.inv; the links go to the real documentation at the URLs below.
# Refresh them with `python docs/make_inventories.py` (the names are listed there; with
# network, `python docs/make_inventories.py --check` compares them with the real ones).
_INVENTORIES = {
    "anndata": "https://anndata.readthedocs.io/en/stable/",
    "scanpy": "https://scanpy.readthedocs.io/en/stable/",
    "pyro": "https://docs.pyro.ai/en/stable/",
    "torch": "https://docs.pytorch.org/docs/stable/",
    "numpy": "https://numpy.org/doc/stable/",
    "pandas": "https://pandas.pydata.org/docs/",
}
intersphinx_mapping = {
    name: (url, str(HERE / "_inventories" / f"{name}.inv")) for name, url in _INVENTORIES.items()
}
intersphinx_timeout = 1

# -- MyST and notebooks -------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath"]
myst_heading_anchors = 3
# "force": every build runs every tutorial, so one that stops working fails the build.
# For quick local rebuilds: NB_EXECUTION_MODE=cache sphinx-build ... (cached under _build/).
nb_execution_mode = os.environ.get("NB_EXECUTION_MODE", "force")
nb_execution_raise_on_error = True
nb_execution_timeout = 900
nb_execution_show_tb = True
nb_merge_streams = True
nb_execution_cache_path = str(HERE / "_build" / ".jupyter_cache")

# -- HTML ---------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"pyrovae {release}"
html_static_path = ["_static"]
html_css_files = ["dataframes.css"]
