"""pyrovae beside plain Pyro code: no global state, public model / guide / arguments that
Pyro's own tools accept, prior swapping without surprises, registries for extensions."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO

import pyrovae
from pyrovae import files
from pyrovae.likelihoods import LIKELIHOODS, NegativeBinomial2, get_likelihood, register_likelihood
from pyrovae.priors import PRIORS, GaussianMixture, Prior, VampPrior, register_prior

from .checks import checked_traces

ROOT = Path(__file__).resolve().parents[1]

# The user's script of issue 15: a PyroModule regression with point-estimated weights
# (plain nn.Parameters) and an AutoNormal guide on the noise, trained by SVI + pyro.optim.
USER_SCRIPT = textwrap.dedent("""
    def user_regression():
        import pyro, pyro.distributions as dist, torch
        from pyro.infer import SVI, Trace_ELBO
        from pyro.infer.autoguide import AutoNormal
        from pyro.nn import PyroModule

        class Regression(PyroModule):
            def __init__(self):
                super().__init__()
                self.linear = PyroModule[torch.nn.Linear](1, 1)

            def forward(self, x, y=None):
                sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
                mean = self.linear(x).squeeze(-1)
                with pyro.plate("data", len(x)):
                    return pyro.sample("obs", dist.Normal(mean, sigma), obs=y)

        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        x = torch.linspace(0, 1, 50).unsqueeze(-1)
        y = 2 * x.squeeze(-1) + 1 + 0.1 * torch.randn(50)
        model = Regression()
        svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
        losses = [svi.step(x, y) for _ in range(100)]
        return losses[-1], sorted(pyro.get_param_store().keys())
""")


def test_import_fit_save_load_leave_pyro_alone(tmp_path):
    """In a fresh process: the user's script gives the same result before and after
    ``import pyrovae``, a fit, a save and a load, and pyrovae changed no Pyro setting and
    nothing in the param store (which holds the user's parameters throughout)."""
    script = USER_SCRIPT + textwrap.dedent(f"""
        import json, torch, pyro
        torch.set_num_threads(1)
        before = user_regression()
        settings = pyro.settings.get()
        store = {{k: v.detach().clone() for k, v in pyro.get_param_store().items()}}

        import pyrovae
        assert pyro.settings.get() == settings, "import changed a setting"
        adata = pyrovae.datasets.simulate(120, 30, 3, likelihood="nb", seed=1)
        model = pyrovae.fit(adata, "nb", prior="gmm", n_clusters=3, max_epochs=3,
                            progress=False)
        model.save({str(tmp_path / "m.pt")!r})
        pyrovae.load({str(tmp_path / "m.pt")!r}, adata).get_latent(adata)
        assert pyro.settings.get() == settings, "fit, save or load changed a setting"
        now = dict(pyro.get_param_store().items())
        assert now.keys() == store.keys(), "the param store gained or lost entries"
        assert all(torch.equal(now[k].detach(), store[k]) for k in store)

        after = user_regression()
        print(json.dumps({{"before": before, "after": after}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before"] == result["after"]
    assert "AutoNormal.locs.sigma" in result["after"][1]


def test_pyrovae_trains_whatever_module_local_params_says(small, quick):
    for local in (True, False):
        with pyro.settings.context(module_local_params=local):
            pyro.clear_param_store()
            model = pyrovae.fit(small.copy(), "nb", **quick)
            assert len(pyro.get_param_store()) == 0
            assert np.isfinite(model.history["train_elbo"]).all()


def test_two_models_in_one_process_keep_their_own_parameters(small, quick):
    a = pyrovae.fit(small.copy(), "nb", **quick)
    b = pyrovae.fit(small.copy(), "nb", **{**quick, "seed": 1})
    ptrs = {p.data_ptr() for p in a.module.parameters()}
    assert not ptrs & {p.data_ptr() for p in b.module.parameters()}
    frozen = {k: v.clone() for k, v in a.module.state_dict().items()}
    b.train(small, **quick)
    assert all(torch.equal(frozen[k], v) for k, v in a.module.state_dict().items())


# ---------------------------------------------------------------------------- Pyro pieces
@pytest.fixture(scope="module")
def fitted(sim):
    return pyrovae.fit(sim.copy(), "nb", max_epochs=3, progress=False, seed=0)


def test_model_args_for_some_cells(fitted, sim):
    x, library, covariates, batch, label, index, n_obs = fitted.model_args(sim, indices=[3, 1, 7])
    assert x.shape == (3, sim.n_vars) and n_obs == sim.n_obs
    np.testing.assert_array_equal(x.numpy(), sim.X[[3, 1, 7]].toarray())
    assert torch.equal(library.squeeze(-1), x.sum(-1)) and index.tolist() == [3, 1, 7]
    assert covariates is None and batch.shape == (3,)
    assert len(fitted.model_args(sim)[0]) == sim.n_obs
    with pytest.raises(IndexError, match="0..299"):
        fitted.model_args(sim, indices=[300])


def test_model_and_guide_trace_and_match(fitted, sim):
    args = fitted.model_args(sim, indices=range(40))
    model_trace, guide_trace = checked_traces(fitted.model, fitted.guide, *args)
    samples = {n for n, s in model_trace.nodes.items() if s["type"] == "sample"}
    assert {"z", "x"} <= samples and model_trace.nodes["x"]["is_observed"]
    params = {n for n, s in model_trace.nodes.items() if s["type"] == "param"}
    assert "model.gene_params.log_theta" in params
    assert "model.decoder.heads.log_rho.weight" in params
    assert any(n.startswith("guide.encoder.") for n, s in guide_trace.nodes.items()
               if s["type"] == "param")
    # the model computes with its param sites' values: substituting one changes x's mean
    zero = {"model.gene_params.log_theta": torch.full((sim.n_vars,), 5.0)}
    replayed = poutine.trace(poutine.replay(poutine.substitute(fitted.model, data=zero),
                                            trace=guide_trace)).get_trace(*args)
    assert torch.allclose(replayed.nodes["x"]["fn"].base_dist.log_theta, torch.tensor(5.0))


def test_predictive_unconditioned_and_posterior(fitted, sim):
    args = fitted.model_args(sim, indices=range(20))
    prior_draws = Predictive(fitted.model, num_samples=4)(None, *args[1:])
    assert prior_draws["x"].shape == (4, 20, sim.n_vars) and prior_draws["z"].shape == (4, 20, 10)
    assert torch.all(prior_draws["x"] == prior_draws["x"].round())
    z = Predictive(fitted.guide, num_samples=3, return_sites=["z"])(*args)
    replicated = Predictive(fitted.model, posterior_samples=z)(None, *args[1:])
    assert replicated["x"].shape == (3, 20, sim.n_vars)


def test_render_model_shows_the_parameters(fitted, sim):
    pytest.importorskip("graphviz")
    graph = pyro.render_model(fitted.model, model_args=fitted.model_args(sim, indices=range(8)),
                              render_params=True)
    assert '"model.gene_params.log_theta" -> x' in graph.source
    assert "z -> x" in graph.source


@pytest.mark.parametrize("prior", ["normal", "gmm"])
def test_svi_with_pyro_optim_trains_every_parameter(small, quick, prior):
    model = pyrovae.fit(small, "nb", prior=prior, n_clusters=4 if prior == "gmm" else None,
                        **quick)
    before = {n: p.detach().clone() for n, p in model.module.named_parameters() if p.requires_grad}
    args = model.model_args(small, indices=range(64))
    model.module.train()
    pyro.clear_param_store()
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-2}), model.prior.elbo())
    losses = [svi.step(*args) for _ in range(5)]
    assert np.isfinite(losses).all()
    after = dict(model.module.named_parameters())
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert unchanged == [] and len(before) > 10
    assert len(pyro.get_param_store()) == 0


def test_loss_module_finds_every_parameter(fitted):
    loss = Trace_ELBO()(fitted.model, fitted.guide)
    assert {id(p) for p in loss.parameters()} == {id(p) for p in fitted.module.parameters()}


# ---------------------------------------------------------------------------- prior swapping
def test_with_prior_leaves_the_original_bit_identical(small, quick):
    model = pyrovae.fit(small, "nb", **quick)
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    history, prior = model.history.copy(), model.prior
    gmm = model.with_prior("gmm", small, n_clusters=4).train(small, **quick)
    assert gmm is not model and gmm.prior.name == "gmm" and gmm.prior.n_clusters == 4
    assert model.prior is prior and model.prior.name == "normal"
    now = model.module.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(state[k], now[k]) for k in state)
    assert model.history.equals(history)
    assert not {p.data_ptr() for p in gmm.module.parameters()} & {
        p.data_ptr() for p in model.module.parameters()}


def test_set_prior_is_in_place(small, quick):
    model = pyrovae.fit(small, "nb", **quick)
    assert model.set_prior("vamp", small, n_clusters=5) is model
    assert isinstance(model.prior, VampPrior) and model.prior.K == 5


def test_annotate_after_set_prior_and_train(small, quick):
    model = pyrovae.fit(small, "nb", **quick)
    assert "pyrovae_cluster" not in small.obs
    model.set_prior("gmm", small, n_clusters=4).train(small, **quick)
    model.annotate(small)
    assert small.uns["pyrovae"]["settings"]["prior"] == "gmm"
    assert small.obs["pyrovae_cluster"].cat.categories.tolist() == ["0", "1", "2", "3"]
    assert small.obsm["pyrovae_cluster_probs"].shape == (small.n_obs, 4)
    np.testing.assert_allclose(small.obsm["X_pyrovae"], model.get_latent(small))
    assert len(small.uns["pyrovae"]["history"]["epoch"]) == 6
    fig = pyrovae.plotting.plot_clusters(small)
    assert type(fig).__name__ == "Figure"


def test_annotate_writes_what_fit_writes(small, quick):
    fitted = small.copy()
    model = pyrovae.fit(fitted, "nb", prior="gmm", n_clusters=4, pretrain_epochs=0, **quick)
    again = small.copy()
    model.annotate(again)
    assert set(fitted.obsm) == set(again.obsm) and set(fitted.obs) == set(again.obs)
    assert fitted.uns["pyrovae"].keys() == again.uns["pyrovae"].keys()
    settings = dict(fitted.uns["pyrovae"]["settings"])
    assert settings.pop("pretrain_epochs") == 0 and settings == again.uns["pyrovae"]["settings"]


def test_annotate_failing_leaves_adata_unchanged(small, quick):
    model = pyrovae.fit(small.copy(), "nb", **quick)
    other = small[:, :-1].copy()
    with pytest.raises(ValueError):
        model.annotate(other)
    assert "X_pyrovae" not in other.obsm and "pyrovae" not in other.uns


# ---------------------------------------------------------------------------- names
def test_old_names_still_work_with_a_future_warning(small, quick):
    with pytest.warns(FutureWarning, match="mode="):
        model = pyrovae.fit(small, "nb", prior="gmm", n_clusters=3, mixture="marginal",
                            pretrain_epochs=0, **quick)
    assert model.prior.mode == "marginal"
    with pytest.warns(FutureWarning, match="n_clusters"):
        assert VampPrior(n_components=7).K == 7


def test_one_name_for_the_number_of_components(small, quick):
    assert pyrovae.fit(small.copy(), "nb", prior="vamp", n_clusters=6, **quick).prior.K == 6
    assert pyrovae.fit(small.copy(), "nb", prior="vamp", **quick).prior.K == 50
    auto = pyrovae.fit(small.copy(), "nb", prior="gmm", mode="gumbel", pretrain_epochs=0, **quick)
    assert auto.prior.selection["method"] == "merged_leiden"  # no n_clusters: K from the data
    assert auto.prior.K == len(auto.get_cluster_probs(small).T) >= 2
    assert pyrovae.fit(small.copy(), "nb", prior="gmm", n_clusters=7, mode="gumbel",
                       pretrain_epochs=0, **quick).prior.K == 7
    with pytest.warns(UserWarning, match="no mixture components"):
        pyrovae.fit(small.copy(), "nb", prior="normal", n_clusters=3, **quick)


def test_old_saved_vamp_loads_without_warning(small, quick, tmp_path):
    model = pyrovae.fit(small, "nb", prior="vamp", n_clusters=5, **quick)
    model.save(tmp_path / "m.pt")
    kind = dict(format=files.MODEL_FORMAT, format_version=files.MODEL_FORMAT_VERSION)
    state = files.read_verified(tmp_path / "m.pt", **kind)
    state["prior_config"] = {"n_components": 5}  # as saved before the rename
    files.write_verified(tmp_path / "old.pt", state, **kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pyrovae.load(tmp_path / "old.pt").prior.K == 5


def test_compare_is_a_module_and_a_function():
    import pyrovae.compare as pc

    assert pc.__name__ == "pyrovae.compare" and callable(pc.plot_comparison)
    assert callable(pyrovae.compare) and pyrovae.compare.compare is pc.compare


# ---------------------------------------------------------------------------- registries
@pytest.fixture
def registries():
    """Leave PRIORS and LIKELIHOODS as they were."""
    priors, likelihoods = dict(PRIORS), dict(LIKELIHOODS)
    yield
    PRIORS.clear()
    PRIORS.update(priors)
    LIKELIHOODS.clear()
    LIKELIHOODS.update(likelihoods)


def student_t_prior():
    class StudentT(Prior):
        """``p(z) = prod_d StudentT(df, 0, 1)``."""

        def __init__(self, df: float = 3.0):
            super().__init__()
            self.df = float(df)

        def config(self):
            return {"df": self.df}

        def model(self, n_latent):
            return pyro.sample("z", dist.StudentT(self.df, self._zero, 1.0).expand([n_latent])
                               .to_event(1))

        def elbo(self, analytic_kl=True):
            return Trace_ELBO()  # no closed-form KL to a Student-t

    return StudentT


def test_register_prior_fits_saves_and_loads(small, quick, tmp_path, registries):
    StudentT = register_prior("student_t")(student_t_prior())
    model = pyrovae.fit(small, "nb", prior="student_t", **quick)
    assert isinstance(model.prior, StudentT) and model.prior.name == "student_t"
    model.save(tmp_path / "t.pt")
    loaded = pyrovae.load(tmp_path / "t.pt", small)
    assert isinstance(loaded.prior, StudentT) and loaded.prior.df == 3.0
    np.testing.assert_array_equal(loaded.get_latent(small), model.get_latent(small))


def test_registering_again_in_a_notebook(registries):
    register_prior("student_t")(student_t_prior())
    register_prior("student_t")(student_t_prior())  # the cell run again: same definition

    class Other(Prior):
        pass

    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        register_prior("student_t")(Other)
    assert register_prior("student_t", overwrite=True)(Other) is PRIORS["student_t"]
    with pytest.raises(ValueError, match="unknown prior 'nope'.*register_prior"):
        pyrovae.priors.get_prior("nope")

    def define():
        @register_likelihood("poisson2", heads={"log_rho": "log_softmax"})
        def poisson2(log_rho, *, library):
            return dist.Poisson(library * log_rho.exp())

    define()
    define()

    def other(log_rho, *, library):
        return dist.Poisson(library * log_rho.exp())

    with pytest.raises(ValueError, match="already registered"):
        register_likelihood("poisson2", heads={"log_rho": "log_softmax"})(other)
    register_likelihood("poisson2", heads={"log_rho": "log_softmax"}, overwrite=True)(other)
    assert get_likelihood("poisson2").distribution is other


def test_likelihood_with_a_per_cell_head_and_initial_values(small, quick, tmp_path, registries):
    @register_likelihood("nb_cell_size",
                         heads={"log_rho": "log_softmax", "log_size": ("identity", 1)},
                         gene_params={"log_theta": 2.0})
    def nb_cell_size(log_rho, log_size, log_theta, *, library):
        """NB whose mean has a learned per-cell size factor on top of the library."""
        assert log_size.shape[-1] == 1
        return NegativeBinomial2(library.log() + log_rho + log_size, log_theta)

    model = pyrovae.VAE(small.var_names, likelihood="nb_cell_size")
    assert model.module.model.decoder.heads["log_size"].out_features == 1
    assert torch.equal(model.module.model.gene_params["log_theta"], torch.full((small.n_vars,), 2.0))
    model.train(small, **quick)
    heads, _ = model.module.model.decode(torch.zeros(5, 10))
    assert heads["log_size"].shape == (5, 1) and heads["log_rho"].shape == (5, small.n_vars)
    assert model.elbo(small[:20])["elbo"].notna().all()
    model.save(tmp_path / "c.pt")
    np.testing.assert_array_equal(pyrovae.load(tmp_path / "c.pt").get_latent(small),
                                  model.get_latent(small))

    @register_likelihood("nb_init", heads={"log_rho": "log_softmax"},
                         gene_params={"log_theta": lambda shape: torch.linspace(0, 1, shape[-1]).expand(shape)})
    def nb_init(log_rho, log_theta, *, library):
        return NegativeBinomial2(library.log() + log_rho, log_theta)

    by_batch = pyrovae.VAE(small.var_names, likelihood="nb_init")
    assert torch.allclose(by_batch.module.model.gene_params["log_theta"][-1], torch.tensor(1.0))
    with pytest.raises(ValueError, match="per-gene 'log_rho'"):
        register_likelihood("bad", heads={"log_rho": ("log_softmax", 1)})(nb_init)


def test_knn_graph_is_scanpys_without_compiling_it():
    """The mixture's Leiden start builds scanpy's kNN graph in numpy (a first
    ``set_prior("gmm", adata)`` took 37 s compiling UMAP's numba kernels, now 1 s);
    scanpy's own graph, computed here with numba's JIT off, is the reference."""
    script = textwrap.dedent("""
        import numpy as np, anndata as ad, pandas as pd, scanpy as sc
        from pyrovae.priors import knn_connectivities
        points = np.random.default_rng(0).normal(size=(80, 5)).astype(np.float32)
        points[:40] += 3.0
        light = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(80)]), obsm={"X": points})
        sc.pp.neighbors(light, use_rep="X", n_neighbors=15, random_state=0)
        ref, mine = light.obsp["connectivities"], knn_connectivities(points, 15)
        assert ((ref != 0) != (mine != 0)).nnz == 0, "different edges"
        assert abs(ref - mine).max() < 1e-5, abs(ref - mine).max()
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NUMBA_DISABLE_JIT": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]



def test_neighbours_and_umap_leave_torchs_thread_count_alone(sim):
    """scanpy's neighbours and UMAP (pynndescent, umap-learn) reset numba's threads to all
    cores, and with numba's OpenMP layer torch's too; pyrovae's Leiden scores and UMAP
    set it back (on 2 cores, a mixture then trained 45x slower beside another job)."""
    import numba

    from pyrovae import metrics, plotting

    before = torch.get_num_threads()
    threads = 1 if numba.config.NUMBA_NUM_THREADS > 1 else 2  # not numba's default
    torch.set_num_threads(threads)
    try:
        latent = np.random.default_rng(0).normal(size=(sim.n_obs, 3)).astype(np.float32)
        metrics.leiden_scores(latent, sim.obs["cluster"].to_numpy())
        assert torch.get_num_threads() == threads
        view = sim.copy()
        view.obsm["X_pyrovae"] = latent
        plotting.umap(view)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)

# ---------------------------------------------------------------------------- notebook polish
def test_posterior_predictive_check_has_a_short_repr(fitted, sim):
    check = pyrovae.posterior_predictive_check(fitted, sim[:50], n_samples=5)
    text = repr(check)
    assert len(text.splitlines()) <= 12 and "60 genes, 50 cells, 5 replicated" in text
    assert all(s in text for s in check.summary.index)
    assert "<table" in check._repr_html_()


def test_plot_functions_return_the_figure_and_display_once(fitted, sim, monkeypatch):
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from pyrovae import plotting

    table = fitted.differential_expression(sim, "cluster", "0", n_samples=3)
    check = pyrovae.posterior_predictive_check(fitted, sim[:50], n_samples=5)
    latent = fitted.get_latent(sim)
    figures = {
        "volcano": lambda: plotting.volcano(table),
        "plot_latent_activity": lambda: plotting.plot_latent_activity(latent),
        "plot_embedding": lambda: plotting.plot_embedding(latent[:, :2], sim.obs["cluster"]),
        "plot_ppc": check.plot,
        "plot_ppc_zeros": check.plot_zeros,
        "plot_ppc_calibration": check.plot_calibration,
    }
    for name, draw in figures.items():
        assert isinstance(draw(), Figure), name
    plt.close("all")
    # under Jupyter's inline backend the figure is closed: it shows once, as the value
    monkeypatch.setattr(matplotlib, "get_backend", lambda: "module://matplotlib_inline.backend_inline")
    for name, draw in figures.items():
        fig = draw()
        assert not plt.fignum_exists(fig.number), name
    # a figure of the caller's is left open
    fig, ax = plt.subplots()
    assert plotting.volcano(table, ax=ax) is fig and plt.fignum_exists(fig.number)
    plt.close("all")


def test_volcano_says_what_it_shows(fitted, sim):
    import matplotlib.pyplot as plt

    table = fitted.differential_expression(sim, "cluster", "0", n_samples=3, delta=0.5)
    table.loc[table.index[:3], "bayes_factor"] = np.log((1 + 1e-8) / 1e-8)  # three at the cap
    ax = pyrovae.plotting.volcano(table).axes[0]
    assert "genes called" in ax.get_title()
    assert "0.5" in ax.get_ylabel()
    assert any("cap 18.4" in t.get_text() and "(3)" in t.get_text()
               for t in ax.get_legend().get_texts())
    plt.close("all")


def test_latent_activity_legend_colours():
    import matplotlib.pyplot as plt
    from matplotlib.colors import same_color

    latent = np.random.default_rng(0).normal(size=(100, 4)) * [1.0, 1.0, 1.0, 1e-3]
    for data in (latent, latent[:, :3]):  # with and without inactive dimensions
        legend = pyrovae.plotting.plot_latent_activity(data).axes[0].get_legend()
        colours = dict(zip([t.get_text().split(" ")[0] for t in legend.get_texts()],
                           [h.get_facecolor() for h in legend.legend_handles[:2]]))
        assert same_color(colours["active"], "C0") and same_color(colours["inactive"], "darkgrey")
    plt.close("all")


def test_comparison_table_and_plot(small, quick):
    import matplotlib.pyplot as plt

    table = pyrovae.compare(small, likelihoods=("poisson", "nb"), n_hidden=(np.int64(16),),
                            n_samples=5, **quick)
    assert table["n_hidden"].tolist() == ["[16]", "[16]"]
    assert table["n_latent"].dtype.kind == "i" and table["marginal_ll"].dtype.kind == "f"
    ax = pyrovae.compare.plot_comparison(table).axes[0]
    assert not ax.patches  # points, not bars cut by the axis
    lo, hi = ax.get_xlim()
    assert lo < table[["elbo", "marginal_ll"]].min().min() and hi > table[["elbo", "marginal_ll"]].max().max()
    plt.close("all")


def test_progress_bar_without_ipywidgets_is_a_text_bar(monkeypatch):
    import importlib.util

    import tqdm.notebook
    import tqdm.std

    from pyrovae import progress

    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ipywidgets" else real(name, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert progress.bar_class() is tqdm.std.tqdm
        progress.progress_bar(range(3), disable=True).close()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert progress.bar_class() is tqdm.notebook.tqdm
    monkeypatch.setattr(progress, "in_notebook", lambda: False)
    assert progress.bar_class() is tqdm.std.tqdm
