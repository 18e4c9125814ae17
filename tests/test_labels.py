"""The semi-supervised 'labels' prior, label prediction, novelty, calibration and ECE."""

import warnings

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

import pyrovae
from pyrovae.labels import SemiSupervised
from pyrovae.metrics import expected_calibration_error, reliability_table


def labelled(adata, fraction=0.2, seed=0, key="lab"):
    rng = np.random.default_rng(seed)
    values = adata.obs["cluster"].astype(str).to_numpy().copy()
    known = rng.random(len(values)) < fraction
    values[~known] = "Unknown"
    adata.obs[key] = pd.Categorical(values)
    return known


@pytest.fixture(params=["body", "latent"])
def fitted(request, small, quick):
    known = labelled(small)
    model = pyrovae.fit(small, labels_key="lab", unlabeled_category="Unknown",
                        classifier_input=request.param, **quick)
    return model, small, known


def test_fit_writes_labels_and_predict_shapes(fitted):
    model, adata, _ = fitted
    assert isinstance(model.prior, SemiSupervised)
    assert model.prior.labels == ["0", "1", "2", "3"]
    hard = model.predict(adata)
    soft = model.predict(adata, soft=True)
    assert list(hard.index) == list(adata.obs_names) and list(soft.columns) == ["0", "1", "2", "3"]
    assert soft.shape == (adata.n_obs, 4)
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-5)
    assert (hard.astype(str).to_numpy() == soft.columns[soft.to_numpy().argmax(1)]).all()
    assert (adata.obs["pyrovae_label"].astype(str).to_numpy() == hard.astype(str).to_numpy()).all()
    np.testing.assert_allclose(adata.obsm["pyrovae_label_probabilities"].to_numpy(), soft.to_numpy(), rtol=1e-5)
    # a query without the labels column is predicted too
    query = adata.copy()
    del query.obs["lab"]
    pd.testing.assert_frame_equal(model.predict(query, soft=True), soft)


def test_a_labels_model_reads_cells_without_the_labels_column(fitted):
    # regression: get_latent (and elbo) of a labels model needed adata.obs[labels_key]
    model, adata, _ = fitted
    query = adata.copy()
    del query.obs["lab"]
    unlabelled = adata.copy()
    unlabelled.obs["lab"] = pd.Categorical(["Unknown"] * adata.n_obs)
    np.testing.assert_array_equal(model.get_latent(query), model.get_latent(adata))
    pd.testing.assert_frame_equal(model.elbo(query, n_samples=2), model.elbo(unlabelled, n_samples=2))
    assert model.predict(query).shape == (adata.n_obs,)
    assert "lab" not in query.obs  # nothing written
    with pytest.raises(ValueError, match="lab"):  # training still needs the labels
        model.train(query, max_epochs=1, progress=False)


def test_labelled_cells_observe_y_and_sites_match(fitted):
    model, adata, known = fitted
    args = model.model_args(adata, indices=np.arange(40))
    guide = poutine.trace(model.guide).get_trace(*args)
    trace = poutine.trace(poutine.replay(model.model, guide)).get_trace(*args)
    site = trace.nodes["y_known"]
    assert site["is_observed"]
    cls = model.prior.code_to_class[args[4]]
    assert ((cls >= 0).numpy() == known[:40]).all()
    np.testing.assert_array_equal(site["value"][cls >= 0].numpy(), cls[cls >= 0].numpy())
    pyro.util.check_model_guide_match(trace, guide, max_plate_nesting=1)
    # a labelled cell's z follows its own label's component, whatever the enumerated y
    assert set(guide.nodes) >= {"y", "z", "classification"}


def test_enumerated_loss_is_the_explicit_sum_over_labels(fitted):
    """For unlabelled cells, TraceEnum_ELBO = sum_k q(k|x)[log p(x,z,k) - log q(z|x) - log q(k|x)]."""
    model, adata, known = fitted
    cells = np.flatnonzero(~known)[:30]
    args = model.model_args(adata, indices=cells)
    args = args[:-2] + (torch.arange(len(cells)), len(cells))
    model.module.eval()
    with torch.no_grad(), pyro.validation_enabled(False):
        torch.manual_seed(3)
        loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model.model, model.guide, *args)
        x, _, covariates = args[:3]
        inputs = model.module.guide.encoder_input(x, covariates)
        log_q_y = model.prior.label_logits(model.module.guide.encoder, inputs).log_softmax(-1)
        total = 0.0
        for k in range(4):
            torch.manual_seed(3)
            y = {"y": torch.full((len(cells),), k)}
            guide = poutine.trace(poutine.condition(model.guide, data=y)).get_trace(*args)
            fixed = poutine.condition(model.model, data=y)
            trace = poutine.trace(poutine.replay(fixed, guide)).get_trace(*args)
            trace.compute_log_prob()
            guide.compute_log_prob()
            log_p = sum(trace.nodes[s]["log_prob"] for s in ("y", "z", "x"))
            log_qz = guide.nodes["z"]["log_prob"]
            total = total + (log_q_y[:, k].exp() * (log_p - log_qz - log_q_y[:, k])).sum()
    np.testing.assert_allclose(loss, -float(total), rtol=1e-4)


def test_learns_labels_on_simulated_data(small):
    known = labelled(small, fraction=0.1, seed=1)
    model = pyrovae.fit(small, labels_key="lab", unlabeled_category="Unknown", max_epochs=40,
                        kl_warmup_epochs=20, progress=False, seed=0)
    pred = model.predict(small).astype(str).to_numpy()
    truth = small.obs["cluster"].astype(str).to_numpy()
    assert (pred[~known] == truth[~known]).mean() > 0.9


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    truth = np.array([0, 1, 1, 1])
    # bins of width 1/15: 0.9 -> (0.867, 0.933], 0.8 -> (0.733, 0.8], 0.7, 0.6 in their own
    # accuracies 1, 0, 1, 1 against confidences 0.9, 0.8, 0.7, 0.6
    expected = (0.1 + 0.8 + 0.3 + 0.4) / 4
    assert expected_calibration_error(probs, truth) == pytest.approx(expected)
    table = reliability_table(probs, truth)
    assert len(table) == 15 and table["n_cells"].sum() == 4
    frame = pd.DataFrame(probs, columns=["a", "b"])
    assert expected_calibration_error(frame, ["a", "b", "b", "b"]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="not among the classes"):
        expected_calibration_error(frame, ["a", "b", "c", "b"])


def test_nll_calibration_lowers_nll_and_keeps_predictions(fitted):
    model, adata, known = fitted
    held = adata[known].copy()
    truth = held.obs["cluster"].astype(str).to_numpy()

    def nll():
        soft = model.predict(held, soft=True)
        p = soft.to_numpy()[np.arange(len(truth)), [soft.columns.get_loc(t) for t in truth]]
        return -np.log(p).mean()

    before, labels_before = nll(), model.predict(held).to_numpy()
    temperature = model.calibrate(held, method="nll")
    assert temperature > 0 and temperature != 1.0
    at_t = nll()
    assert at_t <= before + 1e-9
    for factor in (0.9, 1.1):  # T is the minimum of the held-out NLL
        model.prior.calibration_temperature.fill_(temperature * factor)
        assert nll() >= at_t - 1e-9
    model.prior.calibration_temperature.fill_(temperature)
    assert (model.predict(held).to_numpy() == labels_before).all()


def test_novelty_scores(fitted):
    model, adata, _ = fitted
    entropy = model.novelty(adata)
    top = model.novelty(adata, score="max_probability")
    soft = model.predict(adata, soft=True).to_numpy()
    np.testing.assert_allclose(top.to_numpy(), 1 - soft.max(1), rtol=1e-6)
    assert ((entropy >= -1e-9) & (entropy <= 1 + 1e-9)).all()


def test_novelty_density_and_distance_by_hand(fitted):
    model, adata, _ = fitted
    prior = model.prior
    z = torch.as_tensor(model.get_latent(adata))
    with torch.no_grad():
        log_p = torch.logsumexp(torch.distributions.Normal(prior.locs, prior.scales).log_prob(
            z.unsqueeze(1)).sum(-1) + prior.weight_logits.log_softmax(-1), -1)
        distance = ((z.unsqueeze(1) - prior.locs) / prior.scales).norm(dim=-1).min(-1).values
    density = model.novelty(adata, score="density")
    np.testing.assert_allclose(density.to_numpy(), -log_p.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.novelty(adata, score="distance").to_numpy(), distance.numpy(),
                               rtol=1e-4, atol=1e-5)
    assert density.name == "pyrovae_novelty_density" and list(density.index) == list(adata.obs_names)
    # the cells farthest from every component score highest on both
    far = np.argmax(distance.numpy())
    assert density.to_numpy()[far] > np.median(density.to_numpy())
    with pytest.raises(ValueError, match="score must be one of"):
        model.novelty(adata, score="surprise")


def test_save_load_round_trip(fitted, tmp_path):
    model, adata, known = fitted
    model.calibrate(adata[known].copy())
    model.save(tmp_path / "m.pt")
    back = pyrovae.load(tmp_path / "m.pt")
    assert isinstance(back.prior, SemiSupervised)
    pd.testing.assert_frame_equal(back.predict(adata, soft=True), model.predict(adata, soft=True))


def test_errors_name_the_problem(small, quick):
    labelled(small)
    with pytest.raises(ValueError, match="labels_key"):
        pyrovae.fit(small, prior="labels", **quick)
    with pytest.raises(ValueError, match="neither known labels"):
        SemiSupervised(["a", "b"], label_codes=["a", "b", "c"])
    plain = pyrovae.fit(small, **quick)
    with pytest.raises(ValueError, match="'labels' prior"):
        plain.predict(small)


def test_set_prior_labels_on_a_fitted_unsupervised_model(small, quick):
    known = labelled(small, fraction=0.2)
    plain = pyrovae.fit(small, **quick)
    decoder = {k: v.clone() for k, v in plain.module.model.decoder.state_dict().items()}
    model = plain.set_prior("labels", small, labels_key="lab")
    assert isinstance(model.prior, SemiSupervised) and model.covariates.labels_key == "lab"
    for k, v in model.module.model.decoder.state_dict().items():
        torch.testing.assert_close(v, decoder[k])
    model.train(small, max_epochs=2, progress=False)
    assert model.predict(small, soft=True).shape == (small.n_obs, 4)
    with pytest.raises(ValueError, match="labels_key"):
        pyrovae.fit(small, **quick).set_prior("labels", small)


@pytest.fixture(scope="module")
def reference_and_query():
    adata = pyrovae.datasets.simulate(400, 60, 4, likelihood="nb", separation=3.0, seed=2, n_batches=3)
    labelled(adata, fraction=0.3)
    ref = adata[adata.obs["batch"] != "b2"].copy()
    query = adata[adata.obs["batch"] == "b2"].copy()
    ref.obs["batch"] = ref.obs["batch"].astype(str)
    reference = pyrovae.fit(ref, batch_key="batch", labels_key="lab", unlabeled_category="Unknown",
                            max_epochs=3, progress=False, seed=0)
    return reference, ref, query


def test_map_query_leaves_reference_unchanged_and_freezes_weights(reference_and_query):
    reference, ref, query = reference_and_query
    before = {k: v.clone() for k, v in reference.module.state_dict().items()}
    del query.obs["lab"]
    mapped = reference.map_query(query, max_epochs=3)
    for k, v in reference.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    after = mapped.module.state_dict()
    # frozen: every weight that exists in the reference with the same shape is unchanged
    for k, v in before.items():
        if after[k].shape == v.shape:
            assert torch.equal(after[k], v), k
    # the first encoder layer: old columns unchanged, the new batch's column trained
    name = next(k for k in after if after[k].shape != before[k].shape and k.startswith("guide.encoder"))
    old, new = before[name], after[name]
    n_genes = len(reference.var_names)
    torch.testing.assert_close(new[:, :n_genes + 2], old[:, :n_genes + 2], rtol=0, atol=0)
    assert new[:, n_genes + 2].abs().sum() > 0
    assert mapped.covariates.categorical["batch"] == ["b0", "b1", "b2"]
    assert "lab" not in query.obs  # no labels column: the query is read as unlabelled
    assert mapped.get_latent(query).shape == (query.n_obs, reference.n_latent)
    assert mapped.predict(query).shape == (query.n_obs,)


def test_map_query_starts_new_batches_at_the_reference_average(reference_and_query):
    reference, _, query = reference_and_query
    n_genes = len(reference.var_names)
    before = reference.module.state_dict()["guide.encoder.body.0.weight"]
    for init, expected in (("reference", before[:, n_genes:n_genes + 2].mean(1)),
                           ("zero", torch.zeros(before.shape[0]))):
        # lr so small that one epoch leaves the start in place
        mapped = reference.map_query(query, max_epochs=1, lr=1e-12, init=init)
        after = mapped.module.state_dict()["guide.encoder.body.0.weight"]
        torch.testing.assert_close(after[:, n_genes + 2], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="init"):
        reference.map_query(query, max_epochs=1, init="random")


def test_map_query_learns_gene_offsets_of_the_new_batch_only(reference_and_query, tmp_path):
    reference, _, query = reference_and_query
    assert not hasattr(reference.module.model, "gene_offsets")
    mapped = reference.map_query(query, max_epochs=2)
    offsets = mapped.module.model.gene_offsets.detach()
    assert offsets.shape == (3, len(reference.var_names))
    assert torch.equal(offsets[:2], torch.zeros_like(offsets[:2]))  # the reference's batches
    assert offsets[2].abs().sum() > 0
    # the decoder scales the expression shares by exp(o_bg), renormalised
    z = torch.zeros(4, reference.n_latent)
    args = mapped.model_args(query, indices=range(4))
    model = mapped.module.model
    with torch.no_grad():
        shifted, _ = model.decode(z, args[2], args[3], args[4])
        plain = model.decoder(torch.cat([z, args[2]], -1))["log_rho"]
    torch.testing.assert_close(shifted["log_rho"], (plain + offsets[args[3]]).log_softmax(-1))
    # the encoder reads x exp(-o_b)
    guide = mapped.module.guide
    expected = torch.cat([torch.log1p(args[0] * torch.exp(-offsets[args[3]])), args[2]], -1)
    torch.testing.assert_close(guide.encoder_input(args[0], args[2], args[3]), expected)
    mapped.save(tmp_path / "query.pt")
    again = pyrovae.load(tmp_path / "query.pt")
    np.testing.assert_allclose(again.get_latent(query), mapped.get_latent(query), rtol=1e-6)
    plain_mapped = reference.map_query(query, max_epochs=1, gene_offsets=False)
    assert not hasattr(plain_mapped.module.model, "gene_offsets")


def test_map_query_genes_are_matched_by_name(reference_and_query):
    reference, _, query = reference_and_query
    with pytest.raises(ValueError, match="lacks 1 of the reference's"):
        reference.map_query(query[:, 1:].copy(), max_epochs=1)
    extra = query.copy()
    extra.var_names = list(query.var_names[:-1]) + ["not_a_reference_gene"]
    with pytest.raises(ValueError, match="lacks"):
        reference.map_query(extra, max_epochs=1)
    import anndata as ad
    import scipy.sparse as sp

    wider = ad.concat([query, ad.AnnData(sp.csr_matrix((query.n_obs, 1), dtype=np.float32),
                                         obs=query.obs, var=pd.DataFrame(index=["extra"]))],
                      axis=1, merge="first")
    wider.obs = query.obs.copy()
    wider = wider[:, ::-1].copy()  # another order too
    with pytest.warns(UserWarning, match="1 query genes are not in the reference"):
        mapped = reference.map_query(wider, max_epochs=1)
    assert list(mapped.var_names) == list(reference.var_names)


def test_map_query_needs_a_batch_covariate(fitted):
    model, adata, _ = fitted
    with pytest.raises(ValueError, match="batch_key"):
        model.map_query(adata)


def test_fit_calibration_fraction_hides_and_calibrates(small, quick):
    labelled(small, fraction=0.3)
    before = small.obs["lab"].copy()
    model = pyrovae.fit(small, labels_key="lab", unlabeled_category="Unknown",
                        calibration_fraction=0.3, **quick)
    assert float(model.prior.calibration_temperature) != 1.0
    pd.testing.assert_series_equal(small.obs["lab"], before)  # the user's labels are untouched
    with pytest.raises(ValueError, match="calibration_fraction"):
        pyrovae.fit(small, labels_key="lab", unlabeled_category="Unknown", calibration_fraction=1.5, **quick)


def test_a_calibration_hold_out_with_no_trained_label_is_refused_before_training(small, quick):
    small.obs["lab"] = pd.Categorical(["Unknown"] * small.n_obs)
    values = small.obs["lab"].astype(str).to_numpy().copy()
    values[:2] = ["a", "b"]  # two labelled cells of two types: any hold-out leaves its type untrained
    small.obs["lab"] = pd.Categorical(values)
    before = small.copy()
    with pytest.raises(ValueError, match="no training cell has"):
        pyrovae.fit(small, labels_key="lab", unlabeled_category="Unknown",
                    calibration_fraction=0.5, **quick)
    assert "X_pyrovae" not in small.obsm and list(small.obs.columns) == list(before.obs.columns)


def test_labels_benchmark_runs_with_a_tiny_budget():
    from benchmarks import labels as bench

    table = bench.main(["--data", "pbmc68k", "--max-epochs", "2"])
    assert set(table["method"]) == {"pyrovae", "knn"}
    assert table[["accuracy", "balanced_accuracy", "ece"]].notna().all().all()
    assert (table.loc[table["method"] == "knn", "k"] == 15).all()
    assert (table.loc[table["method"] == "pyrovae", "classifier"] == "body").all()


def test_labels_benchmark_with_fewer_labelled_cells_than_k(tmp_path):
    """1 % of pbmc68k's 700 cells (8 labelled): kNN takes k = the number of labelled cells (it failed
    with k = 15); pyrovae_all trains on every labelled cell without calibrating; rows of
    runs with other methods and options append to one CSV by column name."""
    from benchmarks import labels as bench

    out = tmp_path / "rows.csv"
    labelled, _ = bench.split(700, 0.01, 0)
    assert labelled.sum() < 15
    table = bench.main(["--data", "pbmc68k", "--fractions", "0.01", "--max-epochs", "2",
                        "--methods", "pyrovae_all", "knn", "--out", str(out)])
    assert list(table["method"]) == ["pyrovae_all", "knn"]
    assert table.loc[1, "k"] == labelled.sum()
    assert "ece_calibrated" not in table and table.loc[0, "classifier"] == "body"
    bench.main(["--data", "pbmc68k", "--fractions", "0.01", "--max-epochs", "2", "--methods",
                "pyrovae_all", "--fit-options", '{"classifier_input": "latent"}', "--out", str(out)])
    rows = pd.read_csv(out)
    assert list(rows["method"]) == ["pyrovae_all", "knn", "pyrovae_all"]
    assert list(rows["classifier"].fillna("")) == ["body", "", "latent"]
    assert rows.loc[1, "k"] == labelled.sum() and rows[["accuracy", "ece"]].notna().all().all()
    assert len(bench.summary(rows)) == 3  # body and latent apart
    pd.testing.assert_frame_equal(bench.main(["--table", str(out)]), rows)


def test_class_balance_weighs_each_label_alike(small, quick):
    prior = SemiSupervised(["a", "b", "c", "d"], class_balance=True, label_counts=[30, 10, 0, 60])
    w = prior.class_weight.numpy()
    # n / (K' n_c) with n = 100 labelled cells, K' = 3 labels present; 1 where no cell
    np.testing.assert_allclose(w, [100 / 90, 100 / 30, 1.0, 100 / 180], rtol=1e-6)
    np.testing.assert_allclose((w * [30, 10, 0, 60]).sum() / 100, 1.0, rtol=1e-6)
    assert (SemiSupervised(["a", "b"], label_counts=[5, 1]).class_weight == 1).all()
    with pytest.raises(ValueError, match="label_counts"):
        SemiSupervised(["a", "b"], class_balance=True, label_counts=[5])
    # fit counts the training labels, those hidden for calibration left out
    known = labelled(small, fraction=0.3)
    model = pyrovae.fit(small, labels_key="lab", unlabeled_category="Unknown", class_balance=True,
                        calibration_fraction=0.25, **quick)
    counts = model.prior.label_counts
    assert sum(counts) == known.sum() - round(0.25 * known.sum())
    truth = small.obs["lab"].astype(str)
    assert all(counts[i] <= (truth == c).sum() for i, c in enumerate(model.prior.labels))
    # the classification term of a labelled cell is -alpha w_c log q(c | x)
    args = model.model_args(small, indices=np.arange(60))
    model.module.eval()
    with torch.no_grad():
        guide = poutine.trace(model.guide).get_trace(*args)
        guide.compute_log_prob()
        x, _, covariates = args[:3]
        log_q = model.prior.label_logits(model.module.guide.encoder,
                                         model.module.guide.encoder_input(x, covariates)).log_softmax(-1)
    cls = model.prior.code_to_class[args[4]]
    on = cls >= 0
    expected = -model.prior.classification_weight * model.prior.class_weight[cls[on]] * log_q[on, cls[on]]
    factor = guide.nodes["classification"]["log_prob"]
    scale = small.n_obs / 60  # the cells plate's subsample scale, in the trace's log_prob
    torch.testing.assert_close(factor[on], scale * expected, rtol=1e-5, atol=1e-4)
    assert (factor[~on] == 0).all()


def test_class_balance_survives_save_and_load(small, quick, tmp_path):
    labelled(small, fraction=0.3)
    model = pyrovae.fit(small, labels_key="lab", unlabeled_category="Unknown", class_balance=True, **quick)
    assert model.prior.class_balance and not torch.allclose(model.prior.class_weight, torch.ones(4))
    model.save(tmp_path / "m.pt")
    back = pyrovae.load(tmp_path / "m.pt")
    torch.testing.assert_close(back.prior.class_weight, model.prior.class_weight)
    assert back.prior.label_counts == model.prior.label_counts


def test_labelled_cells_are_never_held_out_for_validation(fitted):
    from pyrovae.train import split_cells

    model, adata, known = fitted
    keep = model.prior.always_train(model.model_args(adata)[4].numpy())
    np.testing.assert_array_equal(keep, known)
    train, val = split_cells(adata.n_obs, 0.2, np.random.default_rng(0), keep)
    assert len(val) == round(0.2 * adata.n_obs) and not keep[val].any()
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(adata.n_obs))
    # as many as there are when the unlabelled cells are fewer than the validation share
    few = np.ones(adata.n_obs, dtype=bool)
    few[:3] = False
    train, val = split_cells(adata.n_obs, 0.2, np.random.default_rng(0), few)
    np.testing.assert_array_equal(val, [0, 1, 2])
    # without keep, the split is the one of every other prior
    a = split_cells(adata.n_obs, 0.2, np.random.default_rng(0))
    b = split_cells(adata.n_obs, 0.2, np.random.default_rng(0), None)
    np.testing.assert_array_equal(a[1], b[1])
    assert pyrovae.priors.Prior().always_train(np.zeros(5, dtype=int)) is None


def _loss(model, args, seed=3):
    model.module.eval()
    with torch.no_grad(), pyro.validation_enabled(False):
        torch.manual_seed(seed)
        return TraceEnum_ELBO(max_plate_nesting=1).loss(model.model, model.guide, *args)


def _all_labelled(model, adata, n=40):
    """The first ``n`` cells with every label known, and the model's arguments for them
    as one full minibatch."""
    full = adata[:n].copy()
    full.obs["lab"] = pd.Categorical(full.obs["cluster"].astype(str),
                                     categories=adata.obs["lab"].cat.categories)
    args = model.model_args(full)
    return full, args[:-2] + (torch.arange(full.n_obs), full.n_obs)


def test_all_labelled_loss_is_the_supervised_sum(fitted):
    """Every cell labelled: loss = -sum [log p(x|z) + log p(z|c) + log p(c) - log q(z|x)]
    - sum alpha w_c log q(c|x); the enumerated y cancels."""
    model, adata, _ = fitted
    full, args = _all_labelled(model, adata)
    cls = model.prior.code_to_class[args[4]]
    assert (cls >= 0).all()
    loss = _loss(model, args)
    with torch.no_grad(), pyro.validation_enabled(False):
        torch.manual_seed(3)  # y fixed (any value: it cancels), so that z is the same draw
        y = {"y": torch.zeros(full.n_obs, dtype=torch.long)}
        guide = poutine.trace(poutine.condition(model.guide, data=y)).get_trace(*args)
        trace = poutine.trace(poutine.replay(poutine.condition(model.model, data=y), guide)).get_trace(*args)
        trace.compute_log_prob()
        guide.compute_log_prob()
        x, _, covariates = args[:3]
        log_q = model.prior.label_logits(model.module.guide.encoder,
                                         model.module.guide.encoder_input(x, covariates)).log_softmax(-1)
        prior = model.prior
        z = guide.nodes["z"]["value"]
        log_pz = torch.distributions.Normal(prior.locs[cls], prior.scales[cls]).log_prob(z).sum(-1)
        log_py = prior.weight_logits.log_softmax(-1)[cls]
        elbo = trace.nodes["x"]["log_prob"] + log_pz + log_py - guide.nodes["z"]["log_prob"]
        classification = prior.classification_weight * prior.class_weight[cls] * log_q.gather(
            -1, cls.unsqueeze(-1)).squeeze(-1)
    np.testing.assert_allclose(loss, -float((elbo + classification).sum()), rtol=1e-4)


def test_none_labelled_loss_is_the_unsupervised_mixture(fitted):
    model, adata, _ = fitted
    none = adata[:40].copy()
    none.obs["lab"] = pd.Categorical(["Unknown"] * none.n_obs, categories=adata.obs["lab"].cat.categories)
    args = model.model_args(none)
    args = args[:-2] + (torch.arange(none.n_obs), none.n_obs)
    assert (model.prior.code_to_class[args[4]] < 0).all()
    semi = _loss(model, args)
    model.prior.takes_labels = False  # the plain GaussianMixture sites (label=None)
    try:
        plain = _loss(model, args)
    finally:
        del model.prior.takes_labels
    np.testing.assert_allclose(semi, plain, rtol=1e-5)


def test_classifier_input_picks_what_the_classifier_reads(fitted):
    model, adata, _ = fitted
    prior, encoder = model.prior, model.module.guide.encoder
    args = model.model_args(adata, indices=np.arange(50))
    model.module.eval()
    with torch.no_grad():
        x = model.module.guide.encoder_input(args[0], args[2])
        h = encoder.body(x)
        expected = prior.classifier(h if prior.classifier_input == "body" else encoder.loc(h))
        torch.testing.assert_close(prior.label_logits(encoder, x), expected)
    width = encoder.body.n_out if prior.classifier_input == "body" else model.architecture.n_latent
    assert prior.classifier.in_features == width
    assert prior.config()["classifier_input"] == prior.classifier_input
    # predict (and so novelty and calibrate, which go through it or label_logits) use it
    soft = model.predict(adata[:50], soft=True).to_numpy()
    np.testing.assert_allclose(soft, expected.softmax(-1).numpy(), rtol=1e-5, atol=1e-6)


def test_the_guide_without_labels_is_the_guide_with_every_label_unknown(fitted):
    """label=None (the plain mixture's sites) and an all-"Unknown" column give one q(y | x):
    the classifier of classifier_input, in both paths (a body classifier was used for
    label=None once)."""
    model, adata, _ = fitted
    none = adata[:40].copy()
    none.obs["lab"] = pd.Categorical(["Unknown"] * none.n_obs, categories=adata.obs["lab"].cat.categories)
    args = model.model_args(none)
    x, _, covariates = args[:3]
    model.module.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        unknown = poutine.trace(model.guide).get_trace(*args)
        model.prior.takes_labels = False  # the module then calls guide(encoder, x): label=None
        try:
            torch.manual_seed(0)
            without = poutine.trace(model.guide).get_trace(*args)
        finally:
            del model.prior.takes_labels
        logits = model.prior.label_logits(model.module.guide.encoder,
                                          model.module.guide.encoder_input(x, covariates))
    for trace in (unknown, without):
        torch.testing.assert_close(trace.nodes["y"]["fn"].probs, logits.softmax(-1))
    torch.testing.assert_close(without.nodes["z"]["value"], unknown.nodes["z"]["value"])


def test_classifier_input_is_validated(small, quick):
    with pytest.raises(ValueError, match="classifier_input must be one of"):
        SemiSupervised(["a", "b"], classifier_input="z")
    labelled(small)
    with pytest.raises(ValueError, match="classifier_input must be one of"):
        pyrovae.fit(small, labels_key="lab", unlabeled_category="Unknown", classifier_input="z", **quick)
    assert "X_pyrovae" not in small.obsm


def test_classifier_input_survives_save_and_load(small, quick, tmp_path):
    labelled(small)
    model = pyrovae.fit(small, labels_key="lab", unlabeled_category="Unknown",
                        classifier_input="latent", **quick)
    model.save(tmp_path / "m.pt")
    back = pyrovae.load(tmp_path / "m.pt")
    assert back.prior.classifier_input == "latent"
    pd.testing.assert_frame_equal(back.predict(small, soft=True), model.predict(small, soft=True))


def test_a_model_file_saved_before_classifier_input_loads_as_body(small, quick, tmp_path, monkeypatch):
    labelled(small)
    model = pyrovae.fit(small, labels_key="lab", unlabeled_category="Unknown",
                        classifier_input="body", **quick)
    config = SemiSupervised.config
    monkeypatch.setattr(SemiSupervised, "config",  # the config older pyrovae saved
                        lambda self: {k: v for k, v in config(self).items() if k != "classifier_input"})
    model.save(tmp_path / "old.pt")
    monkeypatch.undo()
    saved = pyrovae.files.read_verified(tmp_path / "old.pt", format=pyrovae.files.MODEL_FORMAT,
                                        format_version=pyrovae.files.MODEL_FORMAT_VERSION)
    assert "classifier_input" not in saved["prior_config"]
    back = pyrovae.load(tmp_path / "old.pt")
    assert back.prior.classifier_input == "body"
    pd.testing.assert_frame_equal(back.predict(small, soft=True), model.predict(small, soft=True))
    assert SemiSupervised.from_config({"labels": ["a", "b"]}).classifier_input == "body"
    assert SemiSupervised.from_config({"labels": ["a", "b"], "classifier_input": "latent"}
                                      ).classifier_input == "latent"


def test_calibrate_warns_below_the_minimum_number_of_cells(fitted):
    from pyrovae.labels import MIN_CALIBRATION_CELLS

    model, adata, known = fitted
    held = adata[known].copy()
    assert len(held) < MIN_CALIBRATION_CELLS
    with pytest.warns(UserWarning, match="unreliable") as record:
        model.calibrate(held)
    assert [w.filename for w in record if "unreliable" in str(w.message)] == [__file__]
    every = adata.copy()  # all 300 cells labelled: no warning
    every.obs["lab"] = pd.Categorical(every.obs["cluster"].astype(str))
    assert every.n_obs >= MIN_CALIBRATION_CELLS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.calibrate(every)


def test_map_query_keeps_a_latent_classifier(reference_and_query):
    _, ref, query = reference_and_query
    reference = pyrovae.fit(ref, batch_key="batch", labels_key="lab", unlabeled_category="Unknown",
                            classifier_input="latent", max_epochs=3, progress=False, seed=0)
    mapped = reference.map_query(query, max_epochs=2)
    assert mapped.prior.classifier_input == "latent"
    assert mapped.prior.classifier.in_features == reference.n_latent
    torch.testing.assert_close(mapped.prior.classifier.weight, reference.prior.classifier.weight)
    # q(y | x) of the query model is its classifier on the query's posterior means
    z = torch.as_tensor(mapped.get_latent(query))
    with torch.no_grad():
        expected = mapped.prior.classifier(z).softmax(-1).numpy()
    np.testing.assert_allclose(mapped.predict(query, soft=True).to_numpy(), expected, rtol=1e-4, atol=1e-5)



def test_classification_gradient_is_weighted_by_each_cells_loss(fitted):
    """Every cell labelled: the classifier enters the loss only through the factor
    ``f_i = -alpha w_c log q(c_i | x_i)``, declared with ``has_rsample=False``, so Pyro adds
    a score-function part and the classifier's gradient is that of ``sum_i f_i (1 + L_i)``,
    ``L_i`` the cell's loss (its negative ELBO, ``f_i`` included) held fixed. Pinned here
    because it is not M2's plain ``sum_i f_i`` (docs/labels.md, "The classification
    term's gradient"): a change of it must be measured, not slipped in."""
    model, adata, _ = fitted
    full, args = _all_labelled(model, adata)
    prior = model.prior
    cls = prior.code_to_class[args[4]]
    weight = prior.classifier.weight
    model.module.eval()
    with pyro.validation_enabled(False):
        torch.manual_seed(3)
        loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model.model, model.guide, *args)
        (got,) = torch.autograd.grad(loss, weight)
    x, _, covariates = args[:3]
    log_q = prior.label_logits(model.module.guide.encoder,
                               model.module.guide.encoder_input(x, covariates)).log_softmax(-1)
    f = -prior.classification_weight * prior.class_weight[cls] * log_q.gather(-1, cls.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad(), pyro.validation_enabled(False):
        torch.manual_seed(3)  # the same draw of z; y cancels for labelled cells
        y = {"y": torch.zeros(full.n_obs, dtype=torch.long)}
        guide = poutine.trace(poutine.condition(model.guide, data=y)).get_trace(*args)
        trace = poutine.trace(poutine.replay(poutine.condition(model.model, data=y), guide)).get_trace(*args)
        trace.compute_log_prob()
        guide.compute_log_prob()
        z = guide.nodes["z"]["value"]
        log_pz = torch.distributions.Normal(prior.locs[cls], prior.scales[cls]).log_prob(z).sum(-1)
        log_py = prior.weight_logits.log_softmax(-1)[cls]
        cell_loss = -(trace.nodes["x"]["log_prob"] + log_pz + log_py - guide.nodes["z"]["log_prob"]) + f
    (expected,) = torch.autograd.grad((f * (1 + cell_loss)).sum(), weight, retain_graph=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3 * float(expected.abs().max()))
    (plain,) = torch.autograd.grad(f.sum(), weight)
    assert (got - plain).norm() > 0.5 * got.norm()  # far from the plain M2 gradient


@pytest.mark.parametrize("classifier_input", ["body", "latent"])
def test_accuracy_calibration_matches_confidence_to_accuracy_and_lowers_the_ece(small, quick, classifier_input):
    # 30 % of the cells held out (labels hidden in training), 20 % labelled and trained on,
    # the other half scored; 3 epochs leave q(y | x) far from calibrated
    truth = small.obs["cluster"].astype(str).to_numpy()
    draw = np.random.default_rng(0).random(small.n_obs)
    held, scored = draw < 0.3, draw >= 0.5
    values = truth.copy()
    values[held | scored] = "Unknown"
    small.obs["lab"] = pd.Categorical(values)
    model = pyrovae.fit(small, labels_key="lab", unlabeled_category="Unknown",
                        classifier_input=classifier_input, **quick)

    def ece():
        soft = model.predict(small[scored], soft=True)
        return expected_calibration_error(soft.to_numpy(), [soft.columns.get_loc(t) for t in truth[scored]])

    before, labels_before = ece(), model.predict(small).to_numpy()
    hold_out = small[held].copy()
    hold_out.obs["lab"] = pd.Categorical(truth[held])
    temperature = model.calibrate(hold_out, cells=small[scored].copy())
    right = (model.predict(hold_out).astype(str).to_numpy() == truth[held]).sum()
    confidence = model.predict(small[scored], soft=True).to_numpy().max(1).mean()
    assert confidence == pytest.approx((right + 1) / (held.sum() + 2), abs=1e-6)  # Laplace's rule
    assert ece() < 0.5 * before  # measured: 0.41 -> 0.06 (body), 0.27 -> 0.07 (latent)
    assert (model.predict(small).to_numpy() == labels_before).all()
    # without cells, the hold-out's own mean confidence is matched
    model.calibrate(hold_out)
    assert model.predict(hold_out, soft=True).to_numpy().max(1).mean() == pytest.approx(
        (right + 1) / (held.sum() + 2), abs=1e-6)
    assert float(model.prior.calibration_temperature) != temperature
    # a held-out cell of a type the model has no label for counts, as an error
    novel = hold_out.copy()  # (in another column: the model's own may not hold new categories)
    values = truth[held].copy()
    values[:10] = "novel"
    novel.obs["other"] = pd.Categorical(values)
    model.calibrate(novel, labels_key="other", cells=small[scored].copy())
    right = (model.predict(novel).astype(str).to_numpy()[10:] == truth[held][10:]).sum()
    assert model.predict(small[scored], soft=True).to_numpy().max(1).mean() == pytest.approx(
        (right + 1) / (held.sum() + 2), abs=1e-6)
    with pytest.raises(ValueError, match="method must be one of"):
        model.calibrate(hold_out, method="ece")


def test_confidence_temperature_by_hand():
    from pyrovae.labels import TEMPERATURE_RANGE, confidence_temperature

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 2.0, -1.0], [0.5, 0.0, 0.4]],
                          dtype=torch.float64)

    def confidence(t):
        return (logits / t).softmax(-1).max(-1).values.mean().item()

    for accuracy in (0.45, 0.6, 0.9):
        t = confidence_temperature(logits, accuracy)
        assert confidence(t) == pytest.approx(accuracy, abs=1e-9)
    assert confidence_temperature(logits, 0.6) < confidence_temperature(logits, 0.45)  # monotone
    # beyond what the range reaches: its ends (confidence 1 needs T -> 0, 1/3 needs T -> inf)
    assert confidence_temperature(logits, 1.0) == pytest.approx(TEMPERATURE_RANGE[0], rel=1e-6)
    assert confidence_temperature(logits, 0.2) == pytest.approx(TEMPERATURE_RANGE[1], rel=1e-6)


def test_fit_calibration_fraction_matches_the_unlabelled_cells_confidence(small, quick):
    from pyrovae.labels import hide_labels

    labelled(small, fraction=0.4)
    model = pyrovae.fit(small, labels_key="lab", unlabeled_category="Unknown",
                        calibration_fraction=0.5, **quick)
    _, (training, hidden) = hide_labels(small, "lab", "Unknown", 0.5, 0)  # fit's own draw
    truth = small.obs["lab"].astype(str).to_numpy()
    right = (model.predict(small[hidden]).astype(str).to_numpy() == truth[hidden]).sum()
    unlabelled = truth == "Unknown"
    confidence = model.predict(small[unlabelled], soft=True).to_numpy().max(1).mean()
    assert confidence == pytest.approx((right + 1) / (hidden.sum() + 2), abs=1e-6)


def test_calibration_benchmark_runs_with_a_tiny_budget(tmp_path):
    from benchmarks import calibration as bench

    table = bench.main(["--data", "pbmc68k", "--seeds", "0", "--max-epochs", "2", "--cache", str(tmp_path)])
    assert (tmp_path / "pbmc68k_s0_80.pyrovae").exists()
    methods = set(table["method"])
    assert {"q", "q, T by NLL", "r = p(y | E z)", "sqrt(q r)"} <= methods
    assert table["ece"].between(0, 1).all()
    # the fitted T's accuracy is q's: a temperature does not change the argmax
    by = table.set_index("method")
    assert by.loc["q, T by NLL", "accuracy"] == by.loc["q", "accuracy"]
    again = bench.main(["--data", "pbmc68k", "--seeds", "0", "--max-epochs", "2", "--cache", str(tmp_path)])
    pd.testing.assert_frame_equal(again, table)  # the saved fit is reused
