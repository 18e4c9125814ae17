"""pyrovae.testing: the checks a user's own prior or likelihood can run."""

import doctest
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyrovae.testing
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.priors import PRIORS, Prior
from pyrovae.testing import check_components


@pytest.mark.parametrize("prior", sorted(PRIORS))
def test_every_registered_prior_passes(prior):
    assert check_components(prior, "nb") > 0


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
def test_every_registered_likelihood_passes(likelihood):
    assert torch.isfinite(torch.tensor(check_components("normal", likelihood)))


def test_the_prior_object_is_left_unused():
    prior = PRIORS["gmm"](3)
    check_components(prior, "poisson")
    check_components(prior, "poisson")  # a used prior would belong to the first model
    assert prior.n_latent is None


class WrongShape(Prior):
    """``z`` drawn once for all cells instead of once per cell: its shape misses the plate."""

    def model(self, n_latent):
        return pyro.sample("z", dist.Normal(self._zero, 1.0).expand([2, n_latent]).to_event(2))


class NoGuideSite(Prior):
    """The guide samples ``w``, the model ``z``: the sites do not match."""

    def guide(self, encoder, x):
        loc, scale = encoder(x)
        return pyro.sample("w", dist.Normal(loc, scale).to_event(1))


def test_a_prior_whose_shape_misses_the_plate_fails():
    with pytest.raises((ValueError, RuntimeError)):
        check_components(WrongShape(), "nb")


def test_a_guide_with_other_sites_fails():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises((UserWarning, ValueError, RuntimeError, KeyError)):
            check_components(NoGuideSite(), "nb")


def test_the_examples_run():
    torch.set_num_threads(1)
    failures, tried = doctest.testmod(pyrovae.testing, optionflags=doctest.ELLIPSIS)
    assert tried >= 4 and failures == 0
