"""The training loop (``pyrovae/train.py``): failures that leave the model as it was,
Ctrl-C that stops cleanly, the KL warm-up continued, and the history's marks."""

import os
import signal
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

import pyrovae
from pyrovae.plotting import history_events
from pyrovae.priors import GaussianMixture, StandardNormal
from pyrovae.train import (TrainingDivergedError, TrainingInterruptedWarning,
                           UnfinishedWarmupWarning)


class Hooked(StandardNormal):
    """A standard normal prior that counts its epochs in a buffer and, at the start of the
    given (0-based) epoch of a call, raises an error or sends this process SIGINT."""

    def __init__(self, at=None, action="raise", times=1):
        super().__init__()
        self.at, self.action, self.times = at, action, times
        self.register_buffer("epochs_seen", torch.zeros(()))

    def on_epoch(self, epoch):
        self.epochs_seen += 1
        if epoch != self.at:
            return
        if self.action == "raise":
            raise RuntimeError("a bug in the user's prior")
        if self.action == "keyboard":
            raise KeyboardInterrupt
        for _ in range(self.times):
            os.kill(os.getpid(), signal.SIGINT)


def snapshot(model):
    return ({k: v.clone() for k, v in model.module.state_dict().items()}, model.history.copy(),
            repr(model), model.training_plan, model.module.training)


def assert_unchanged(model, before):
    state, history, text, plan, training = before
    after = model.module.state_dict()
    assert after.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(after[name], value), name
    pd.testing.assert_frame_equal(model.history, history)
    assert repr(model) == text and model.training_plan == plan
    assert model.module.training == training


def assert_same_weights(a, b):
    for name, value in a.module.state_dict().items():
        assert torch.equal(value, b.module.state_dict()[name]), name


# ---------------------------------------------------------------------------- failures
def test_a_diverged_train_leaves_the_model_as_it_was(sim):
    """The reproduction of issue 11: NaN weights, a stale repr and NaN ELBOs before."""
    model = pyrovae.fit(sim.copy(), "nb", max_epochs=2, progress=False)
    before = snapshot(model)
    with pytest.raises(TrainingDivergedError, match=r"in epoch 1 of 3.*restored to its state before"):
        model.train(sim, max_epochs=3, lr=1e8, progress=False)
    assert_unchanged(model, before)
    assert "epochs_trained=2" in repr(model)
    assert np.isfinite(model.elbo(sim)["elbo"]).all()


def test_an_error_in_a_users_prior_restores_the_prior_and_says_where(sim):
    model = pyrovae.VAE(sim.var_names, likelihood="nb", prior=Hooked(at=2))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="a bug in the user's prior") as info:
        model.train(sim, max_epochs=4, progress=False)
    assert info.value.__notes__ == ["pyrovae: training failed in epoch 3 of 4; the model was "
                                    "restored to its state before this call"]
    assert model.prior.epochs_seen == 0  # the prior's own buffer too
    assert not bool(model.module.library_fitted)  # what the first epoch prepared is undone
    assert_unchanged(model, before)


def test_on_failure_last_epoch_keeps_the_last_finite_epoch(sim):
    failing = pyrovae.VAE(sim.var_names, likelihood="nb", prior=Hooked(at=2))
    with pytest.raises(RuntimeError, match="bug"):
        failing.train(sim, max_epochs=5, progress=False, on_failure="last_epoch")
    whole = pyrovae.VAE(sim.var_names, likelihood="nb", prior=Hooked())
    whole.train(sim, max_epochs=2, progress=False)
    assert list(failing.history["epoch"]) == [1, 2]
    assert_same_weights(failing, whole)
    assert not failing.module.training


def test_a_failed_fit_leaves_the_anndata_unchanged(small, monkeypatch):
    before = small.copy()
    with pytest.raises(TrainingDivergedError):
        pyrovae.fit(small, "nb", max_epochs=2, lr=1e8, progress=False)
    # a failure after training, while the outputs are computed, writes none of them
    def broken(*args, **kwargs):
        raise RuntimeError("no clusters today")

    monkeypatch.setattr(pyrovae.VAE, "get_cluster_probs", broken)
    with pytest.raises(RuntimeError, match="no clusters today"):
        pyrovae.fit(small, "nb", prior=GaussianMixture(3, init="random"), max_epochs=2, progress=False)
    assert set(small.obsm) == set(before.obsm) and set(small.uns) == set(before.uns)
    pd.testing.assert_frame_equal(small.obs, before.obs)


# ---------------------------------------------------------------------------- interrupts
def test_sigint_stops_at_the_end_of_the_step_and_keeps_the_best_weights(sim):
    options = dict(kl_warmup_epochs=1, patience=100, lr=1e-2, progress=False)
    model = pyrovae.VAE(sim.var_names, likelihood="nb", prior=Hooked(at=6, action="sigint"))
    with pytest.warns(TrainingInterruptedWarning, match=r"interrupted in epoch 7 of 400; kept the "
                                                        r"best weights, epoch (\d+)") as record:
        model.train(sim, max_epochs=400, **options)
    assert len(record) == 1 and model.interrupted
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert list(model.history["epoch"]) == [1, 2, 3, 4, 5, 6]
    best = int(model.history["validation_elbo"].idxmax()) + 1
    assert f"epoch {best}" in str(record[0].message)
    assert not model.module.training
    until_best = pyrovae.VAE(sim.var_names, likelihood="nb", prior=Hooked())
    until_best.train(sim, max_epochs=best, early_stopping=False, **options)
    assert_same_weights(model, until_best)


def test_a_raised_keyboard_interrupt_keeps_the_last_whole_epoch(sim):
    model = pyrovae.VAE(sim.var_names, likelihood="nb", prior=Hooked(at=3, action="keyboard"))
    with pytest.warns(TrainingInterruptedWarning, match="interrupted in epoch 4 of 9; kept the current"):
        model.train(sim, max_epochs=9, progress=False)
    whole = pyrovae.VAE(sim.var_names, likelihood="nb", prior=Hooked())
    whole.train(sim, max_epochs=3, progress=False)
    assert len(model.history) == 3
    assert_same_weights(model, whole)


def test_a_second_sigint_stops_for_good_and_restores_the_model(sim):
    model = pyrovae.VAE(sim.var_names, likelihood="nb", prior=Hooked(at=1, action="sigint", times=2))
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        model.train(sim, max_epochs=5, progress=False)
    assert_unchanged(model, before)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_interrupted_pre_training_returns_the_standard_model_and_writes(small, monkeypatch):
    def interrupt(self, epoch):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(StandardNormal, "on_epoch", interrupt)
    with pytest.warns(TrainingInterruptedWarning, match="pre-training interrupted in epoch 2 of 3.*"
                                                        "mixture prior was not trained") as record:
        model = pyrovae.fit(small, "nb", prior=GaussianMixture(3, init="kmeans"), max_epochs=6,
                            pretrain_epochs=3, progress=False)
    assert len([w for w in record if w.category is TrainingInterruptedWarning]) == 1
    assert model.prior.name == "normal" and len(model.history) == 1
    np.testing.assert_array_equal(small.obsm["X_pyrovae"], model.get_latent(small))
    assert "pyrovae_cluster" not in small.obs


def test_an_interrupt_while_the_mixture_starts_keeps_the_pre_trained_model(small, monkeypatch):
    def interrupt(self, latent, x):
        raise KeyboardInterrupt  # as Ctrl-C in Leiden's clustering would

    monkeypatch.setattr(GaussianMixture, "initialize", interrupt)
    with pytest.warns(TrainingInterruptedWarning, match="while the mixture prior was set up"):
        model = pyrovae.fit(small, "nb", prior=GaussianMixture(3, init="kmeans"), max_epochs=4,
                            kl_warmup_epochs=2, pretrain_epochs=2, progress=False)
    assert model.prior.name == "normal" and model.interrupted and len(model.history) == 2
    assert [name for name, _ in model.module.named_parameters() if "prior" in name] == []
    np.testing.assert_array_equal(small.obsm["X_pyrovae"], model.get_latent(small))


# ---------------------------------------------------------------------------- warm-up
def test_continued_training_continues_the_warm_up(sim):
    model = pyrovae.fit(sim.copy(), "nb", max_epochs=3, kl_warmup_epochs=10, progress=False)
    model.train(sim, max_epochs=2, kl_warmup_epochs=10, progress=False)
    np.testing.assert_allclose(model.history["kl_weight"], [0.1, 0.2, 0.3, 0.4, 0.5])
    model.train(sim, max_epochs=2, kl_warmup_epochs=10, restart_warmup=True, progress=False)
    np.testing.assert_allclose(model.history["kl_weight"].iloc[-2:], [0.1, 0.2])


def test_a_mixture_that_finds_k_pre_trains_for_most_of_the_warm_up_and_finishes_it(sim):
    adata = sim.copy()
    model = pyrovae.fit(adata, "nb", prior=GaussianMixture(), max_epochs=16, kl_warmup_epochs=10,
                        progress=False)
    assert adata.uns["pyrovae"]["settings"]["pretrain_epochs"] == 7  # PRETRAIN_SHARE of 10
    assert list(model.history["prior"]) == ["normal"] * 7 + ["gmm"] * 9
    np.testing.assert_allclose(model.history["kl_weight"], [i / 10 for i in range(1, 11)] + [1.0] * 6)
    # a given K starts after the whole warm-up; either way at most half of the epochs
    given = pyrovae.fit(sim.copy(), "nb", prior=GaussianMixture(3, init="kmeans"), max_epochs=16,
                        kl_warmup_epochs=6, progress=False)
    assert list(given.history["prior"]) == ["normal"] * 6 + ["gmm"] * 10
    with pytest.warns(UnfinishedWarmupWarning, match="KL weight at 0.80"):  # the mixture's stage
        short = pyrovae.fit(sim.copy(), "nb", prior=GaussianMixture(3, init="kmeans"), max_epochs=8,
                            kl_warmup_epochs=10, progress=False)
    assert list(short.history["prior"]) == ["normal"] * 4 + ["gmm"] * 4
    np.testing.assert_allclose(short.history["kl_weight"], [i / 10 for i in range(1, 9)])


def test_a_trained_model_goes_on_with_data_where_some_genes_are_empty(sim):
    from pyrovae.data import InvalidDataError

    adata = sim.copy()
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.array(adata.X)
    X[:, 1] = 0  # a small query or subset in which one gene has no counts
    subset = adata.copy()
    subset.X = X
    with pytest.raises(InvalidDataError, match="genes have no counts"):
        pyrovae.fit(subset.copy(), "nb", max_epochs=1, progress=False)  # a first fit refuses it
    model = pyrovae.fit(adata, "nb", max_epochs=2, progress=False)
    model.train(subset, max_epochs=2, progress=False)
    assert len(model.history) == 4 and np.isfinite(model.history["train_elbo"]).all()


def test_the_readme_prior_swap_trains_on_at_full_kl_weight(sim):
    adata = sim.copy()
    model = pyrovae.fit(adata, "nb", max_epochs=4, kl_warmup_epochs=2, progress=False)
    model.set_prior("gmm", adata, n_clusters=3, init="kmeans")
    model.train(adata, max_epochs=2, progress=False)
    assert list(model.history["kl_weight"]) == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert list(model.history["prior"]) == ["normal"] * 4 + ["gmm"] * 2


def test_a_fit_that_ends_before_its_warm_up_says_so(sim):
    with pytest.warns(UnfinishedWarmupWarning, match="KL weight at 0.60, before the end of its "
                                                     "5-epoch warm-up"):
        pyrovae.fit(sim.copy(), "nb", max_epochs=3, kl_warmup_epochs=5, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnfinishedWarmupWarning)
        pyrovae.fit(sim.copy(), "nb", max_epochs=3, kl_warmup_epochs=3, progress=False)
        # a mixture's pre-training ends mid warm-up by design
        pyrovae.fit(sim.copy(), "nb", prior=GaussianMixture(3, init="kmeans"), max_epochs=4,
                    kl_warmup_epochs=4, pretrain_epochs=2, progress=False)


# ---------------------------------------------------------------------------- history marks
def test_plot_history_marks_swaps_restarts_and_only_real_warm_up_ends(sim):
    adata = sim.copy()
    with pytest.warns(UnfinishedWarmupWarning):
        model = pyrovae.fit(adata, "nb", max_epochs=3, kl_warmup_epochs=10, progress=False)
    ax = model.plot_history()
    assert "end of KL warm-up" not in [line.get_label() for line in ax.lines]  # never ended
    plt.close("all")
    model.train(adata, max_epochs=8, kl_warmup_epochs=10, early_stopping=False, progress=False)
    model.set_prior("gmm", adata, n_clusters=3, init="kmeans")
    model.train(adata, max_epochs=2, kl_warmup_epochs=2, restart_warmup=True, progress=False)
    assert history_events(model.history) == [
        ("warm-up end", (9, "")), ("warm-up restart", (11, "")), ("prior", (11, "normal -> gmm")),
        ("warm-up end", (12, "")),
    ]
    ax = model.plot_history()
    labels = [line.get_label() for line in ax.lines]
    assert labels.count("end of KL warm-up") == 2
    assert "KL warm-up restarted" in labels and "prior: normal -> gmm" in labels
    plt.close("all")
    old = model.history.drop(columns="prior")  # a history saved before the column existed
    assert [kind for kind, _ in history_events(old)] == ["warm-up end", "warm-up restart", "warm-up end"]
    pyrovae.plotting.plot_history(old)
    plt.close("all")
