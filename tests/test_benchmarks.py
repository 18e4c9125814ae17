"""The benchmark helpers: the reference VAE computes pyrovae's quantities, the loaders load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

import pyrovae
from benchmarks import data as bench_data
from benchmarks.reference_vae import (
    ReferenceVAE,
    evaluate_elbo,
    train_reference,
    zinb_log_prob,
)
from pyrovae.likelihoods import get_likelihood
from pyrovae.train import seeded


def _random_zinb_inputs(dtype, seed=0, cells=64, genes=300, log_theta_range=(-4.0, 8.0)):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(cells, genes, generator=g, dtype=torch.float64)
    rho = logits.softmax(-1)
    library = torch.exp(torch.empty(cells, 1, dtype=torch.float64).uniform_(2, 10, generator=g))
    log_theta = torch.empty(genes, dtype=torch.float64).uniform_(*log_theta_range, generator=g)
    gate_logits = 4 * torch.randn(cells, genes, generator=g, dtype=torch.float64)
    # counts near the mean, and many zeros
    mu = library * rho
    x = torch.poisson(mu * torch.empty_like(mu).uniform_(0, 3, generator=g), generator=g)
    x[torch.rand(x.shape, generator=g, dtype=torch.float64) < 0.3] = 0
    return [t.to(dtype) for t in (x, rho, library, log_theta, gate_logits)]


def _both_zinb(dtype, **kwargs):
    x, rho, library, log_theta, gate_logits = _random_zinb_inputs(dtype, **kwargs)
    assert (x == 0).any() and (x > 100).any()
    pyro_lp = get_likelihood("zinb")(
        {"log_rho": rho.log(), "gate_logits": gate_logits}, {"log_theta": log_theta}, library
    ).log_prob(x)
    reference_lp = zinb_log_prob(x, torch.log(library) + torch.log(rho), log_theta, gate_logits)
    assert reference_lp.shape == pyro_lp.shape == x.shape
    return pyro_lp, reference_lp


def test_reference_zinb_equals_pyrovae_zinb_float64():
    pyro_lp, reference_lp = _both_zinb(torch.float64)
    torch.testing.assert_close(reference_lp, pyro_lp, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("log_theta_range", [(-2.0, 4.0), (-4.0, 8.0)])
def test_reference_zinb_equals_pyrovae_zinb_float32(log_theta_range):
    # in float32 both formulas lose up to ~0.02 nats where x is in the thousands or theta
    # in the thousands (lgamma(x + theta) - lgamma(theta) cancels): both stay that close to
    # the float64 value, and agree closely with each other at moderate counts and theta
    kwargs = dict(log_theta_range=log_theta_range)
    x = _random_zinb_inputs(torch.float32, **kwargs)[0]
    truth, _ = _both_zinb(torch.float64, **kwargs)
    pyro_lp, reference_lp = _both_zinb(torch.float32, **kwargs)
    for lp in (pyro_lp, reference_lp):
        torch.testing.assert_close(lp.double(), truth, rtol=1e-4, atol=3e-2)
    if log_theta_range[1] <= 4.0:  # theta up to 55, as fitted on real data
        moderate = x <= 100
        torch.testing.assert_close(
            reference_lp[moderate], pyro_lp[moderate], rtol=1e-5, atol=2e-4
        )


def test_reference_zinb_gradients_equal_pyrovae_zinb():
    x, rho, library, log_theta, gate_logits = _random_zinb_inputs(torch.float64, seed=1)
    grads = []
    for fn in ("pyrovae", "reference"):
        params = [t.clone().requires_grad_() for t in (rho.log(), log_theta, gate_logits)]
        log_rho, lt, gl = params
        if fn == "pyrovae":
            lp = get_likelihood("zinb")(
                {"log_rho": log_rho, "gate_logits": gl}, {"log_theta": lt}, library
            ).log_prob(x)
        else:
            lp = zinb_log_prob(x, torch.log(library) + log_rho, lt, gl)
        lp.sum().backward()
        grads.append([p.grad for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def _copy_pyrovae_weights(module, reference: ReferenceVAE) -> None:
    """Load a pyrovae ``VAEModule``'s default ZINB weights into the reference."""
    state = module.state_dict()
    names = {
        "decoder_body.": "model.decoder.body.",
        "rho.": "model.decoder.heads.log_rho.",
        "gate_logits.": "model.decoder.heads.gate_logits.",
        "log_theta": "model.gene_params.log_theta",
        "encoder_body.": "guide.encoder.body.",
        "loc.": "guide.encoder.loc.",
        "scale.": "guide.encoder.scale.",
    }
    out = {}
    for key in reference.state_dict():
        prefix = next(p for p in names if key.startswith(p))
        out[key] = state[names[prefix] + key[len(prefix):]]
    reference.load_state_dict(out)


def test_reference_loss_and_gradients_equal_pyrovae_loss():
    adata = pyrovae.datasets.simulate(200, 50, seed=3)
    model = pyrovae.VAE(adata.var_names, seed=0)
    reference = ReferenceVAE(adata.n_vars)
    _copy_pyrovae_weights(model.module, reference)
    x = torch.from_numpy(adata.X[:64].toarray())
    library = x.sum(-1, keepdim=True)
    n_obs, kl_weight = 200, 0.3
    model.module.train()
    reference.train()
    with seeded(5, torch.device("cpu")):
        loss_fn = TraceMeanField_ELBO()(model.module.model, model.module.guide)
        expected = loss_fn(x, library, None, None, None, torch.arange(64), n_obs, kl_weight)
    with seeded(5, torch.device("cpu")):
        got = reference(x, n_obs, kl_weight)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    expected.backward()
    got.backward()
    g_pyro = {k: p.grad for k, p in model.module.named_parameters()}
    torch.testing.assert_close(
        reference.log_theta.grad, g_pyro["model.gene_params.log_theta"], rtol=1e-4, atol=1e-2
    )
    torch.testing.assert_close(
        reference.encoder_body[0].weight.grad, g_pyro["guide.encoder.body.0.weight"],
        rtol=1e-4, atol=1e-2,
    )


def test_reference_same_initial_weights_as_pyrovae_under_one_seed():
    model = pyrovae.VAE([f"g{i}" for i in range(30)], seed=7)
    with seeded(7, torch.device("cpu")):
        reference = ReferenceVAE(30)
    copied = ReferenceVAE(30)
    _copy_pyrovae_weights(model.module, copied)
    for (name, a), b in zip(reference.state_dict().items(), copied.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_reference_trains_and_evaluates_like_pyrovae():
    adata = pyrovae.datasets.simulate(300, 40, seed=1)
    with seeded(0, torch.device("cpu")):
        reference = ReferenceVAE(adata.n_vars)
    history = train_reference(reference, adata.X, max_epochs=3, seed=0)
    model = pyrovae.VAE(adata.var_names, seed=0).train(
        adata, max_epochs=3, validation_fraction=0.0, early_stopping=False, progress=False,
        seed=0, device="cpu",
    )
    # same weights, batches, draws and dropout masks: the two runs track each other
    np.testing.assert_allclose(history["train_elbo"], model.history["train_elbo"], rtol=1e-4)
    got = evaluate_elbo(reference, adata.X)
    expected = model.elbo(adata)["elbo"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3)


def test_simulated_loader():
    adata = bench_data.load("simulated:50x20")
    assert adata.shape == (50, 20) and adata.X.dtype == np.float32


@pytest.mark.skipif(not bench_data.BLADDER_PATH.exists(), reason="shared bladder data absent")
def test_bladder_loader():
    pytest.importorskip("skmisc")
    adata = bench_data.bladder()
    assert adata.n_vars == 2000 and adata.n_obs > 2000
    assert "cell_type" in adata.obs
    assert np.asarray(adata.X.sum(1)).min() > 0


def test_bladder_absent_is_none(tmp_path, capsys):
    assert bench_data.bladder(path=tmp_path / "missing.h5ad") is None
    assert "skipping" in capsys.readouterr().out


def test_present_skips_absent_data_sets(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_data, "BLADDER_PATH", tmp_path / "missing.h5ad")
    found = list(bench_data.present(["bladder", "simulated:50x10"]))
    assert [name for name, _ in found] == ["simulated:50x10"]
    assert found[0][1].shape == (50, 10)
    assert "skipping" in capsys.readouterr().out


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_speed_benchmark_runs(capsys, keep_threads):
    from benchmarks import speed

    result = speed.main(["--data", "simulated:120x30", "--epochs", "2", "--repeats", "2",
                         "--contenders", "pyrovae", "reference", "--threads", "1"])
    summary = result["data"][0]["summary"]
    assert set(summary) == {"pyrovae", "reference", "pyrovae/reference"}
    # same start, batches and draws: the same held-out ELBO
    assert summary["pyrovae"]["held_out_elbo_mean"] == pytest.approx(
        summary["reference"]["held_out_elbo_mean"], rel=1e-3)
    assert "pyrovae/reference time per epoch" in capsys.readouterr().out


def test_speed_scaling_mode_runs(capsys, keep_threads):
    from benchmarks import speed

    result = speed.main(["--scaling", "100", "200", "--genes", "20", "--epochs", "1",
                         "--contenders", "pyrovae", "reference", "--threads", "1"])
    assert len(result["rows"]) == 4
    assert "1.00 = linear" in capsys.readouterr().out


def test_memory_benchmark_runs_each_mode_in_its_own_process(tmp_path, monkeypatch, capsys):
    from benchmarks import memory

    monkeypatch.setattr(memory, "CACHE", tmp_path)
    result = memory.main(["--cells", "400", "--genes", "60", "--modes", "in-memory", "backed"])
    assert (tmp_path / "simulated_400x60.h5ad").exists()
    assert [r["mode"] for r in result["rows"]] == ["in-memory", "backed"]
    for row in result["rows"]:
        assert 0.1 < row["peak_gib"] < 4 and row["seconds_per_epoch"] > 0
    assert "bound 2.00 GiB: met" in capsys.readouterr().out

def test_likelihoods_benchmark_runs(tmp_path, capsys, keep_threads):
    from benchmarks import likelihoods

    table = likelihoods.main(["--data", "simulated:120x30", "--epochs", "2", "--n-samples", "5",
                              "--label-key", "cluster", "--threads", "1",
                              "--plot", str(tmp_path / "comparison.png")])
    assert sorted(table["likelihood"]) == sorted(likelihoods.LIKELIHOODS)
    assert table["gap"].max() == 0 and (table["gap"] <= 0).all()
    assert table["kmeans_ari"].notna().all()
    assert (tmp_path / "comparison_simulated-120x30_seed0.png").exists()
    assert "marginal_ll" in capsys.readouterr().out


def test_mixtures_benchmark_runs(tmp_path, capsys, keep_threads):
    from benchmarks import mixtures

    csv = tmp_path / "rows.csv"
    table = mixtures.main(["--data", "simulated:150x30", "--n-clusters", "2", "3", "--max-epochs", "4",
                           "--label-key", "cluster", "--threads", "1", "--csv", str(csv)])
    assert list(table["K"]) == [2] * 4 + [3] * 4
    assert list(table["contender"][:4]) == ["normal + KMeans"] + mixtures.MODES
    assert table[["held_out_elbo", "ari", "nmi"]].notna().all().all()
    assert table["grad_rel_var"].isna().sum() == 2  # the baseline has no mixture gradient
    mixture = table[table["contender"] != "normal + KMeans"]
    assert mixture["K_used"].between(1, mixture["K"]).all()  # components some cell's argmax uses
    assert table.loc[table["contender"] == "normal + KMeans", "K_used"].isna().all()
    capsys.readouterr()
    again = mixtures.main(["--summarize", str(csv), str(csv), "--markdown"])
    out = capsys.readouterr().out
    assert len(again) == 16 and "| K | contender | held_out_elbo |" in out


def test_mixtures_benchmark_sweeps_k_with_the_held_out_log_likelihood(keep_threads):
    from benchmarks import mixtures

    table = mixtures.main(["--data", "simulated:150x30", "--n-clusters", "2", "3", "--max-epochs", "4",
                           "--label-key", "cluster", "--threads", "1", "--modes", "enumerate",
                           "--iwae", "4"])
    assert list(table["contender"]) == ["normal + KMeans", "enumerate"] * 2
    # the importance-weighted bound is at least the ELBO, up to Monte Carlo noise
    assert (table["held_out_log_lik"] >= table["held_out_elbo"] - 1.0).all()
    assert "held_out_log_lik" in mixtures.summarize(table).columns
    with pytest.raises(SystemExit):
        mixtures.main(["--auto", "--iwae", "4"])



def test_mixtures_benchmark_automatic_k_against_leiden(tmp_path, capsys, keep_threads):
    from benchmarks import mixtures

    csv = tmp_path / "auto.csv"
    table = mixtures.main(["--auto", "--data", "simulated:150x30", "--modes", "enumerate", "marginal",
                           "--max-epochs", "4", "--label-key", "cluster", "--threads", "1",
                           "--csv", str(csv)])
    assert list(table["contender"]) == [f"normal + Leiden {r}" for r in mixtures.LEIDEN_RESOLUTIONS] + [
        "gmm auto-K merged_leiden enumerate", "gmm auto-K merged_leiden marginal"]
    assert table[["K", "ari", "nmi", "held_out_elbo", "s_per_epoch"]].notna().all().all()
    assert (table["K"] >= 2).all()
    capsys.readouterr()
    again = mixtures.main(["--summarize", str(csv), "--markdown"])
    assert len(again) == 5 and "ratio_s_per_epoch" in capsys.readouterr().out


def test_mixtures_benchmark_passes_gmm_options_and_skips_a_missing_scvi(tmp_path, capsys, keep_threads):
    from benchmarks import mixtures

    assert mixtures.gmm_options(["free_nats_y=1.0", "scale_floor=None", "init=kmeans"]) == {
        "free_nats_y": 1.0, "scale_floor": None, "init": "kmeans"}
    with pytest.raises(SystemExit):
        mixtures.gmm_options(["free_nats_y"])
    table = mixtures.main(["--auto", "--data", "simulated:150x30", "--modes", "enumerate",
                           "--max-epochs", "4", "--label-key", "cluster", "--threads", "1",
                           "--scvi", str(tmp_path / "no-such-python"),
                           "--gmm", "free_nats_y=0.5", "scale_floor=0.2"])
    assert "scvi-tools SCVI skipped" in capsys.readouterr().out
    assert list(table["contender"]) == [f"normal + Leiden {r}" for r in mixtures.LEIDEN_RESOLUTIONS] + [
        "gmm auto-K merged_leiden enumerate free_nats_y=0.5 scale_floor=0.2"]
    assert table[["K", "ari", "nmi", "held_out_elbo"]].notna().all().all()


def test_mixtures_benchmark_trains_each_pre_training_length(keep_threads, capsys):
    from benchmarks import mixtures

    table = mixtures.main(["--auto", "--data", "simulated:150x30", "--modes", "enumerate",
                           "--max-epochs", "6", "--label-key", "cluster", "--threads", "1",
                           "--pretrain-epochs", "1", "3"])
    mixture = table[table["contender"].str.startswith("gmm")]
    assert list(mixture["contender"]) == ["gmm auto-K merged_leiden enumerate pretrain=1",
                                          "gmm auto-K merged_leiden enumerate pretrain=3"]
    assert mixture["pretrain_epochs"].tolist() == [1, 3]  # what each fit pre-trained
    assert mixture["epochs"].tolist() == [6, 6] and mixture["ari"].notna().all()
    with pytest.raises(SystemExit):
        mixtures.main(["--pretrain-epochs", "3"])  # only with --auto


def test_merges_benchmark_scores_the_start_after_each_pre_training_length(keep_threads, capsys):
    from benchmarks import data as datasets
    from benchmarks import merges
    from benchmarks.mixtures import _split
    from pyrovae.priors import merged_leiden
    from sklearn.metrics import adjusted_rand_score

    table = merges.main(["--data", "simulated:150x30", "--seeds", "0", "--label-key", "cluster",
                         "--pretrain-epochs", "2", "5"])
    assert "mean over seeds" in capsys.readouterr().out
    assert table["pretrain_epochs"].tolist() == [2, 5] and (table["K"] <= table["K_leiden"]).all()
    # the start the fit's mixture would take after 5 epochs, scored against the labels
    _, train, _ = _split(datasets.load("simulated:150x30"), "cluster")
    found, search = merged_leiden(merges.pretrained_latent(train, 0, pretrain_epochs=5))
    row = table.iloc[1]
    assert row["K"] == found.max() + 1 and row["K_leiden"] == search["n_clusters_leiden"]
    assert row["ari"] == pytest.approx(adjusted_rand_score(train.obs["cluster"].astype(str), found))


def test_query_benchmark_runs_with_a_tiny_budget(keep_threads, tmp_path, capsys):
    from benchmarks import query

    out, novelty_out = tmp_path / "query.csv", tmp_path / "novelty.csv"
    table, novelty = query.main(["--data", "pbmc68k", "--seeds", "0", "1", "--max-epochs", "2",
                                 "--query-epochs", "1", "--novelty-data", "pbmc68k", "--novelty-types", "1",
                                 "--out", str(out), "--novelty-out", str(novelty_out),
                                 "--fit-options", '{"classifier_input": "latent"}', "--save-models", str(tmp_path)])
    methods = ["pyrovae, query without batch effect", "pyrovae unmapped", "pyrovae"]
    assert list(table["method"]) == methods * 2 and list(table["seed"]) == [0] * 3 + [1] * 3
    assert table[["accuracy", "balanced_accuracy", "ref_accuracy", "mixing", "gap"]].notna().all().all()
    assert np.allclose(table["gap"], table["ref_accuracy"] - table["accuracy"])
    assert (table["within_5"] == (table["gap"] <= 0.05 + 1e-12)).all()
    assert (table["n_ref"] + table["n_query"] <= 700).all()
    assert len(novelty) == 4 and list(novelty["seed"]) == [0, 0, 1, 1]  # the largest type and a small one
    scores = [f"auroc_{s}" for s in pyrovae.labels.NOVELTY_SCORES]
    assert novelty[scores].apply(lambda c: c.between(0, 1)).all().all()
    # every row was appended as it ended; --summarize rebuilds the same tables from the files
    saved = pd.read_csv(out)
    assert len(saved) == 6 and np.allclose(saved["accuracy"], table["accuracy"])
    assert len(pd.read_csv(novelty_out)) == 4
    # --fit-options reach the reference fit; one saved reference per seed
    assert pyrovae.load(tmp_path / "pbmc68k_reference_seed1.pt").prior.classifier_input == "latent"
    assert pyrovae.load(tmp_path / "pbmc68k_reference.pt").prior.classifier_input == "latent"
    mean = query.summary(table)
    assert list(mean["method"]) == methods and (mean["seeds"] == 2).all()
    pyro = mean.set_index("method").loc["pyrovae"]
    assert np.isclose(pyro["gap"], table[table["method"] == "pyrovae"]["gap"].mean())
    assert pyro["within_5"] == f"{int(table[table['method'] == 'pyrovae']['within_5'].sum())}/2"
    assert (mean["vs_scanvi"] == "").all()  # no SCANVI rows to compare with
    capsys.readouterr()
    again, again_novelty = query.main(["--summarize", str(out), str(novelty_out)])
    assert len(again) == 6 and len(again_novelty) == 4
    assert "query mapping, over seeds" in capsys.readouterr().out


def test_query_benchmark_summary_counts_seeds_against_scanvi():
    from benchmarks import query

    rows = [{"data": "d", "seed": s, "method": m, "accuracy": a, "balanced_accuracy": a, "ref_accuracy": r,
             "mixing": 0.5, "ref_seconds": 1.0, "query_seconds": 1.0}
            for s, m, a, r in [(0, "pyrovae", 0.80, 0.84), (0, "scanvi", 0.70, 0.75),
                               (1, "pyrovae", 0.70, 0.80), (1, "scanvi", 0.72, 0.74)]]
    table = pd.DataFrame(query.with_gap(rows))
    assert list(table["within_5"]) == [True, True, False, True]
    mean = query.summary(table).set_index("method")
    assert mean.loc["pyrovae", "within_5"] == "1/2" and mean.loc["scanvi", "within_5"] == "2/2"
    assert mean.loc["pyrovae", "vs_scanvi"] == "1/2" and mean.loc["scanvi", "vs_scanvi"] == ""
    assert np.isclose(mean.loc["pyrovae", "gap"], 0.07) and np.isclose(mean.loc["pyrovae", "accuracy"], 0.75)


def test_query_benchmark_thinning_keeps_counts_integer_and_smaller():
    from benchmarks import query

    adata = bench_data.pbmc68k()
    ref, q = query.split(adata, 0)
    assert ref.n_obs + q.n_obs <= adata.n_obs and "known" not in q.obs
    original = adata[q.obs_names, q.var_names].X.toarray()
    thinned = q.X.toarray()
    assert (thinned <= original).all() and np.array_equal(thinned, np.round(thinned))
    assert 0.2 < thinned.sum() / original.sum() < 0.7  # 0.8 * U(0.3, 1) on average 0.52


def test_merges_benchmark_replays_the_rule_the_fit_ran(keep_threads, capsys):
    import pyrovae
    from benchmarks import data as datasets
    from benchmarks import merges
    from benchmarks.mixtures import _split

    table = merges.main(["--data", "simulated:150x30", "--seeds", "0", "--max-epochs", "8",
                         "--label-key", "cluster"])
    _, train, _ = _split(datasets.load("simulated:150x30"), "cluster")
    pyrovae.fit(train, "zinb", prior="gmm", seed=0, max_epochs=8, progress=False)
    found = train.uns["pyrovae"]["clusters"]
    # the replay starts from the latent the fit's mixture started from, and merges what it merged
    assert table["K_before"].iloc[0] == found["n_clusters_leiden"]
    assert table.loc[table["merged"], "connectivity"].tolist() == pytest.approx(found["merges"])
    assert table[["sigclust_p", "n_de", "delta_ari"]].notna().all().all()
    assert table["sigclust_p"].between(0, 1).all() and (table["n_de"] >= 0).all()


def test_merges_benchmark_path_goes_past_the_threshold_with_internal_criteria(keep_threads, capsys):
    from benchmarks import merges

    rule = merges.main(["--data", "simulated:150x30", "--seeds", "0", "--max-epochs", "8",
                        "--label-key", "cluster"])
    path = merges.main(["--data", "simulated:150x30", "--seeds", "0", "--max-epochs", "8",
                        "--label-key", "cluster", "--path"])
    # the same replay up to the rule's stop, then on towards two clusters
    assert len(path) > len(rule)
    assert path["connectivity"].iloc[:len(rule)].tolist() == pytest.approx(rule["connectivity"].tolist())
    assert path["merged"].tolist()[:len(rule)] == rule["merged"].tolist()
    assert not path["merged"].iloc[len(rule):].any()  # the rule merges nothing after its first miss
    # each merge takes one cluster away and the criteria describe the partition after it
    assert (np.diff(path["K_before"]) == -1).all()
    after = path[path["K_before"] > 2]
    assert after[["silhouette", "calinski_harabasz", "davies_bouldin"]].notna().all().all()
    assert after["silhouette"].between(-1, 1).all() and (after["davies_bouldin"] > 0).all()
    # the ARI after each merge is the ARI before plus its change
    assert path["ari"].iloc[1:].to_numpy() - path["ari"].iloc[:-1].to_numpy() == \
        pytest.approx(path["delta_ari"].iloc[1:].to_numpy(), abs=1e-9)
    assert (path["latent"] == "pre-training").all()
    # where the rule stops and where each criterion is best, read off the same rows
    choice = merges.path_choices(path).iloc[0]
    assert choice["rule_K"] == path["K_before"].iloc[0] - path["merged"].sum()
    best = after.loc[after["davies_bouldin"].idxmin()]
    assert (choice["davies_bouldin_K"], choice["davies_bouldin_ari"]) == (best["K_before"] - 1, best["ari"])


def test_merges_benchmark_scores_the_fixed_k_starts(keep_threads, capsys):
    from benchmarks import data as datasets
    from benchmarks import merges
    from benchmarks.mixtures import _split
    from pyrovae.priors import leiden_labels
    from sklearn.metrics import adjusted_rand_score

    table = merges.main(["--data", "simulated:150x30", "--seeds", "0", "--max-epochs", "8",
                         "--label-key", "cluster", "--fixed-k", "2", "12"])
    assert "mean over seeds" in capsys.readouterr().out
    assert len(table) == 2 * 3 and set(table["start"]) == {"leiden_labels", "global", "automatic, refined"}
    assert table.loc[table["start"] == "leiden_labels", "K_found"].tolist() == [2, 12]
    assert table[["ari", "nmi"]].notna().all().all()
    assert (table["K_leiden_1"] < 12).all()  # K = 12 takes the sub-clustering branch
    # the package's start, scored on the latent the fit's mixture starts from
    _, train, _ = _split(datasets.load("simulated:150x30"), "cluster")
    points = merges.pretrained_latent(train, 0, 8, n_clusters=12)
    row = table[(table["start"] == "leiden_labels") & (table["K"] == 12)].iloc[0]
    truth = train.obs["cluster"].astype(str).to_numpy()
    assert row["ari"] == pytest.approx(adjusted_rand_score(truth, leiden_labels(points, 12)))


def test_threshold_interval_is_where_the_rule_finds_k():
    from benchmarks import merges
    from pyrovae.priors import merged_leiden

    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(c, 1.0, size=(300, 5)) for c in (-10, 0, 10)])
    found = merges.threshold_interval(points, 3)
    assert found["reached"] and found["K_leiden"] > 3 and len(found["merges"]) == found["K_leiden"] - 3
    low, high = found["next"], found["lowest"]
    assert low < high
    # inside the interval the rule stops at 3; above it it merges too little, at its floor too much
    assert merged_leiden(points, threshold=(low + high) / 2)[0].max() + 1 == 3
    assert merged_leiden(points, threshold=high + 1e-6)[0].max() + 1 > 3
    assert merged_leiden(points, threshold=high)[0].max() + 1 == 3
    if low > 0:
        assert merged_leiden(points, threshold=low)[0].max() + 1 < 3


def test_bladder_loader_leaves_torchs_thread_count_alone(tmp_path, keep_threads):
    # scanpy's seurat_v3 gene selection runs numba code that set torch to all cores, so every
    # bladder fit of a benchmark ran with 2 threads whatever --threads said
    pytest.importorskip("skmisc")
    import pyrovae

    adata = pyrovae.datasets.simulate(300, 200, 3, seed=0)
    adata.obs["cell_type"] = adata.obs["cluster"].astype(str)
    adata.write_h5ad(tmp_path / "bladder.h5ad")
    torch.set_num_threads(1)
    loaded = bench_data.bladder(n_top_genes=50, path=tmp_path / "bladder.h5ad")
    assert loaded.n_vars == 50 and list(loaded.obs.columns) == ["cell_type"]
    assert torch.get_num_threads() == 1
