"""The ``Examples`` sections of the public functions' docstrings run and print what they say."""

import doctest
import importlib

import matplotlib
import pytest

MODULES = ["metrics", "de", "imputation", "criticism", "datasets", "plotting", "likelihoods",
           "compare", "testing", "query"]
# modules whose examples run, though not every public name has one (the priors' classes)
EXAMPLES_ONLY = ["priors"]


def run_examples(name: str):
    matplotlib.use("Agg")
    module = importlib.import_module(f"pyrovae.{name}")
    failed, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert tried > 0 and failed == 0, f"{failed} of {tried} examples of pyrovae.{name} failed"
    return module


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = run_examples(name)
    public = [getattr(module, item) for item in module.__all__ if callable(getattr(module, item))]
    without = [f.__name__ for f in public
               if "Examples\n" not in (f.__doc__ or "") and not isinstance(f, dict)]
    assert not without, f"pyrovae.{name}: public names without an Examples section: {without}"


@pytest.mark.parametrize("name", EXAMPLES_ONLY)
def test_docstring_examples_run(name):
    # pyrovae.priors' examples ran nowhere before, and the merged_leiden one had gone stale
    # under numpy 2 (it printed np.int64(3))
    run_examples(name)
