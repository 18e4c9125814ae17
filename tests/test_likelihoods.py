"""Every likelihood of the registry against an independent reference (scipy.stats)."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from pyrovae.likelihoods import LIKELIHOODS, get_likelihood, register_likelihood

MU = np.array([0.05, 1.0, 7.5, 300.0])
THETA = np.array([0.3, 2.0, 15.0, 1e3])
GATE = np.array([0.1, 0.5, 0.02, 0.3])
LOC = np.array([-1.0, 0.0, 0.5, 3.0])
SCALE = np.array([0.2, 1.0, 2.0, 0.7])
PROB = np.array([0.05, 0.3, 0.5, 0.9])


def logit(p):
    return np.log(p) - np.log1p(-p)


def zero_inflated(base, gate):
    """A zero-inflated scipy distribution: pmf, mean and variance from the base."""

    class ZI:
        def logpmf(self, x):
            return np.log(gate * (x == 0) + (1 - gate) * base.pmf(x))

        def mean(self):
            return (1 - gate) * base.mean()

        def var(self):
            return (1 - gate) * (base.var() + base.mean() ** 2) - self.mean() ** 2

    return ZI()


def _cb_log_norm(lam):
    """log C(lam) = log(2 artanh(1 - 2 lam) / (1 - 2 lam)), which tends to log 2 at lam = 1/2."""
    lam = np.asarray(lam, dtype=float)
    t = 1 - 2 * lam
    safe = np.where(np.abs(t) < 1e-8, 0.5, t)
    return np.where(np.abs(t) < 1e-8, np.log(2.0), np.log(2 * np.arctanh(safe) / safe))


class ContinuousBernoulliReference:
    """Loaiza-Ganem & Cunningham (2019), eq. (7); moments by numerical integration."""

    def __init__(self, lam):
        self.lam = lam

    def logpdf(self, x):
        lam = self.lam
        return x * np.log(lam) + (1 - x) * np.log1p(-lam) + _cb_log_norm(lam)

    def _moment(self, f):
        return np.array([
            integrate.quad(lambda x, i=i: f(x) * np.exp(ContinuousBernoulliReference(self.lam[i]).logpdf(x)), 0, 1)[0]
            for i in range(len(self.lam))
        ])

    def mean(self):
        return self._moment(lambda x: x)

    def var(self):
        return self._moment(lambda x: x**2) - self.mean() ** 2


# name -> (decoder heads, gene params, library, reference distribution, test values)
def cases():
    library = 100.0
    log_rho = np.log(MU / library)
    counts = np.array([0.0, 1.0, 3.0, 280.0])
    yield "poisson", {"log_rho": log_rho}, {}, library, stats.poisson(MU), counts
    yield "nb", {"log_rho": log_rho}, {"log_theta": np.log(THETA)}, library, stats.nbinom(THETA, THETA / (THETA + MU)), counts
    yield ("zip", {"log_rho": log_rho, "gate_logits": logit(GATE)}, {}, library,
           zero_inflated(stats.poisson(MU), GATE), counts)
    yield ("zinb", {"log_rho": log_rho, "gate_logits": logit(GATE)}, {"log_theta": np.log(THETA)}, library,
           zero_inflated(stats.nbinom(THETA, THETA / (THETA + MU)), GATE), counts)
    yield ("continuous_bernoulli", {"logits": logit(PROB)}, {}, None,
           ContinuousBernoulliReference(PROB), np.array([0.0, 0.2, 0.5, 1.0]))
    yield "gaussian", {"loc": LOC}, {"log_scale": np.log(SCALE)}, None, stats.norm(LOC, SCALE), np.array([-2.0, 0.1, 0.5, 4.0])


CASES = {c[0]: c[1:] for c in cases()}


def test_every_registered_likelihood_has_a_reference_case():
    assert set(CASES) == set(LIKELIHOODS)


def make(name, heads, params, library, dtype=torch.float64):
    lik = get_likelihood(name)
    t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    lib = None if library is None else t(library)
    return lik({k: t(v) for k, v in heads.items()}, {k: t(v) for k, v in params.items()}, lib)


@pytest.mark.parametrize("name", sorted(CASES))
def test_log_prob_matches_reference(name):
    heads, params, library, ref, values = CASES[name]
    d = make(name, heads, params, library)
    got = d.log_prob(torch.as_tensor(values)).numpy()
    logp = ref.logpmf(values) if hasattr(ref, "logpmf") else ref.logpdf(values)
    np.testing.assert_allclose(got, logp, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", sorted(CASES))
def test_mean_and_variance_match_reference(name):
    heads, params, library, ref, _ = CASES[name]
    d = make(name, heads, params, library)
    np.testing.assert_allclose(d.mean.numpy(), ref.mean(), rtol=1e-6)
    np.testing.assert_allclose(d.variance.numpy(), ref.var(), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_shapes(name):
    heads, params, library, _, _ = CASES[name]
    cells = 3
    heads = {k: np.tile(v, (cells, 1)) for k, v in heads.items()}
    d = make(name, heads, params, library if library is None else np.full((cells, 1), library))
    assert d.batch_shape == (cells, 4)
    assert d.event_shape == ()
    assert d.sample((5,)).shape == (5, cells, 4)
    assert d.to_event(1).log_prob(d.sample()).shape == (cells,)


@pytest.mark.parametrize("name", ["zip", "zinb"])
def test_gate_limits(name):
    heads, params, library, _, _ = CASES[name]
    base = "poisson" if name == "zip" else "nb"
    values = torch.tensor([0.0, 1.0, 3.0, 280.0], dtype=torch.float64)
    closed = make(name, {**heads, "gate_logits": np.full(4, -40.0)}, params, library)
    plain = make(base, {"log_rho": heads["log_rho"]}, params, library)
    np.testing.assert_allclose(closed.log_prob(values), plain.log_prob(values), rtol=1e-12, atol=1e-12)
    open_ = make(name, {**heads, "gate_logits": np.full(4, 40.0)}, params, library)
    assert torch.all(open_.log_prob(torch.zeros(4, dtype=torch.float64)).abs() < 1e-12)
    assert torch.all(open_.log_prob(values[1:].expand(4, 3).T) < -30)
    torch.manual_seed(0)
    assert torch.all(open_.sample((100,)) == 0)


@pytest.mark.parametrize("name", ["nb", "zinb"])
@pytest.mark.parametrize("theta", [1e-3, 1.0, 1e3, 1e6])
@pytest.mark.parametrize("count", [0.0, 1.0, 1e4])
def test_gradients_finite_at_extremes(name, theta, count):
    """float32, as in training: zero and large counts, tiny to huge theta and means."""
    n = 5
    logits = torch.tensor([-12.0, -3.0, 0.0, 3.0, 8.0], requires_grad=True)
    log_theta = torch.full((n,), math.log(theta), requires_grad=True)
    gate_logits = torch.zeros(n, requires_grad=True)
    heads = {"log_rho": logits.log_softmax(-1)}
    if name == "zinb":
        heads["gate_logits"] = gate_logits
    d = get_likelihood(name)(heads, {"log_theta": log_theta}, torch.tensor(2e4))
    lp = d.log_prob(torch.full((n,), count))
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    for p in (logits, log_theta) + ((gate_logits,) if name == "zinb" else ()):
        assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_large_theta_stays_accurate(theta):
    """In float64 the NB stays exact where it is almost Poisson."""
    counts = np.arange(0.0, 30.0)
    log_rho = torch.full((30,), -math.log(30), dtype=torch.float64)
    lib = torch.tensor(300.0, dtype=torch.float64)
    log_theta = torch.full((30,), math.log(theta), dtype=torch.float64)
    nb = get_likelihood("nb")({"log_rho": log_rho}, {"log_theta": log_theta}, lib)
    ref = stats.nbinom(theta, theta / (theta + 10.0)).logpmf(counts)
    np.testing.assert_allclose(nb.log_prob(torch.as_tensor(counts)).numpy(), ref, rtol=1e-6)


def test_unknown_likelihood_names_the_choices():
    with pytest.raises(ValueError, match="unknown likelihood 'zinbb'.*'zinb'"):
        get_likelihood("zinbb")


def test_registering_a_count_likelihood_needs_a_log_rho_head():
    with pytest.raises(ValueError, match="log_rho"):
        register_likelihood("broken", heads={"mu": "identity"})(lambda mu, *, library: None)
    assert "broken" not in LIKELIHOODS
