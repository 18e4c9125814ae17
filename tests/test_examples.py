"""The ``Examples`` sections of the public functions' docstrings run and print what they say."""

import doctest
import importlib

import matplotlib
import pytest

MODULES = ["metrics", "de", "imputation", "criticism", "datasets", "plotting", "likelihoods",
           "compare", "testing", "query"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    matplotlib.use("Agg")
    module = importlib.import_module(f"pyrovae.{name}")
    public = [getattr(module, item) for item in module.__all__ if callable(getattr(module, item))]
    without = [f.__name__ for f in public
               if "Examples\n" not in (f.__doc__ or "") and not isinstance(f, dict)]
    assert not without, f"pyrovae.{name}: public names without an Examples section: {without}"
    failed, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert tried > 0 and failed == 0, f"{failed} of {tried} examples of pyrovae.{name} failed"
