"""The demo, the command line and the example scripts, at a tiny budget."""

import runpy
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import pyrovae
from pyrovae.cli import main
from pyrovae.demo import run_demo

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.py"))


def test_demo_writes_its_outputs(tmp_path, capsys):
    results = run_demo(tmp_path, max_epochs=3, progress=False)
    out = capsys.readouterr().out
    assert "held-out ELBO per cell" in out and "ARI" in out and "silhouette" in out
    for name in ["pbmc68k_pyrovae.h5ad", "loss_curve.png", "umap_cell_type.png", "model.pt"]:
        assert (tmp_path / name).stat().st_size > 0, name
    adata = ad.read_h5ad(tmp_path / "pbmc68k_pyrovae.h5ad")
    assert adata.obsm["X_pyrovae"].shape == (700, 10) and adata.obsm["X_umap"].shape == (700, 2)
    assert adata.obs["held_out"].sum() == 70
    assert np.isfinite(results["held_out_elbo"]) and -1 <= results["kmeans_ari"] <= 1
    model = pyrovae.load(tmp_path / "model.pt", adata)
    np.testing.assert_array_equal(model.get_latent(adata), adata.obsm["X_pyrovae"])


def test_cli_fit(tmp_path, sim, capsys):
    sim.write_h5ad(tmp_path / "in.h5ad")
    code = main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "out.h5ad"),
                 "--likelihood", "nb", "--max-epochs", "2", "--model", str(tmp_path / "m.pt"), "--quiet"])
    assert code == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.obsm["X_pyrovae"].shape == (sim.n_obs, 10)
    assert pyrovae.load(tmp_path / "m.pt", out).likelihood.name == "nb"
    assert "wrote" in capsys.readouterr().out


def test_cli_reports_bad_data_without_a_traceback(tmp_path, sim, capsys):
    bad = sim.copy()
    bad.X = bad.X * 0.5
    bad.write_h5ad(tmp_path / "bad.h5ad")
    code = main(["fit", str(tmp_path / "bad.h5ad"), "-o", str(tmp_path / "out.h5ad"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "non-integer" in err and "Traceback" not in err
    assert not (tmp_path / "out.h5ad").exists()
    assert main(["fit", str(tmp_path / "missing.h5ad"), "-o", str(tmp_path / "o.h5ad")]) == 2


def test_cli_names_options_as_typed_and_paths_as_given(tmp_path, sim, capsys):
    sim.write_h5ad(tmp_path / "in.h5ad")
    assert main(["fit", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "o.h5ad"),
                 "--max-epochs", "0"]) == 2
    assert "--max-epochs" in capsys.readouterr().err
    folder = tmp_path / "max_epochs_must_stay"  # underscores in a path are not options
    assert main(["fit", str(tmp_path / "in.h5ad"), "-o", str(folder / "out_file.h5ad")]) == 2
    err = capsys.readouterr().err
    assert str(folder / "out_file.h5ad") in err and "does not exist" in err


def test_cli_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "pyrovae", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout and "fit" in done.stdout


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_scripts_run(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYROVAE_EXAMPLE_EPOCHS", "2")
    monkeypatch.setattr(sys, "argv", [str(script)])
    runpy.run_path(str(script), run_name="__main__")


def test_there_are_examples():
    assert EXAMPLES
