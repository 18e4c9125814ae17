"""One progress bar for all of pyrovae: a widget in Jupyter when ipywidgets is installed, a
text bar otherwise (``tqdm.auto`` would pick the widget bar without ipywidgets, warn with a
``TqdmWarning`` and leave a bar stuck at 0 %)."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(iterable: Any = None, **options: Any):
    """``tqdm(iterable, **options)`` of the kind that works here (see :func:`bar_class`)."""
    return bar_class()(iterable, **options)


def bar_class() -> type:
    """``tqdm.notebook.tqdm`` in a Jupyter kernel with ipywidgets installed, else the text
    bar ``tqdm.std.tqdm``."""
    if in_notebook() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (what ``tqdm.autonotebook`` checks)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})
