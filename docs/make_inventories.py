"""Write the small intersphinx inventories in ``docs/_inventories/`` (no network needed).

    python docs/make_inventories.py            # write docs/_inventories/<project>.inv
    python docs/make_inventories.py --check    # with network: compare with the real ones

The documentation build runs offline (CI and the project's machines reach only PyPI), so
``docs/conf.py`` points intersphinx at these committed files instead of downloading each
project's ``objects.inv``; the links still go to the projects' real documentation. Each
inventory holds only the names the site references, in the table ``NAMES`` below (type
hints in signatures point to a class's defining module, e.g.
``anndata._core.anndata.AnnData``, so those names are listed too).

To refresh them (a project moved a page, or the docs reference a new name): add or fix the
entry in ``NAMES``, run this script, and commit ``docs/_inventories/``. Where the network is
there, ``--check`` downloads each project's real ``objects.inv`` and reports every name whose
address differs or which the real inventory lacks, so the table can be corrected from it.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
import zlib
from pathlib import Path

from sphinx.util.inventory import InventoryFile

HERE = Path(__file__).resolve().parent
OUT = HERE / "_inventories"

# project -> (base URL, version, {(domain:role, name): page relative to the base URL})
NAMES: dict[str, tuple[str, str, dict[tuple[str, str], str]]] = {
    "anndata": ("https://anndata.readthedocs.io/en/stable/", "0.12", {
        ("py:class", "anndata.AnnData"): "generated/anndata.AnnData.html#anndata.AnnData",
        # where autodoc's type hints point (the class's defining module)
        ("py:class", "anndata._core.anndata.AnnData"):
            "generated/anndata.AnnData.html#anndata.AnnData",
        ("py:function", "anndata.io.read_h5ad"):
            "generated/anndata.io.read_h5ad.html#anndata.io.read_h5ad",
    }),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", "1.11", {
        ("py:function", f"scanpy.{name}"): f"generated/scanpy.{name}.html#scanpy.{name}"
        for name in ("pp.neighbors", "tl.umap", "tl.leiden", "pl.umap", "pp.filter_cells",
                     "pp.filter_genes")
    }),
    "pyro": ("https://docs.pyro.ai/en/stable/", "1.9", {
        ("py:class", "pyro.infer.TraceEnum_ELBO"):
            "inference_algos.html#pyro.infer.traceenum_elbo.TraceEnum_ELBO",
        ("py:class", "pyro.infer.TraceMeanField_ELBO"):
            "inference_algos.html#pyro.infer.trace_mean_field_elbo.TraceMeanField_ELBO",
        ("py:class", "pyro.infer.Predictive"):
            "inference_algos.html#pyro.infer.predictive.Predictive",
        ("py:class", "pyro.nn.PyroModule"): "nn.html#pyro.nn.module.PyroModule",
        ("py:class", "pyro.plate"): "primitives.html#pyro.primitives.plate",
        ("py:class", "pyro.distributions.GammaPoisson"):
            "distributions.html#pyro.distributions.GammaPoisson",
        ("py:class", "pyro.distributions.ZeroInflatedDistribution"):
            "distributions.html#pyro.distributions.ZeroInflatedDistribution",
        ("py:class", "pyro.distributions.Distribution"):
            "distributions.html#pyro.distributions.Distribution",
    }),
    "torch": ("https://docs.pytorch.org/docs/stable/", "2.13", {
        ("py:class", "torch.Tensor"): "tensors.html#torch.Tensor",
        ("py:class", "torch.device"): "tensor_attributes.html#torch.device",
        ("py:class", "torch.nn.Module"): "generated/torch.nn.Module.html#torch.nn.Module",
        ("py:function", "torch.set_num_threads"):
            "generated/torch.set_num_threads.html#torch.set_num_threads",
        ("py:class", "torch.nn.parallel.DistributedDataParallel"):
            "generated/torch.nn.parallel.DistributedDataParallel.html"
            "#torch.nn.parallel.DistributedDataParallel",
        ("std:doc", "elastic/run"): "elastic/run.html",
    }),
    "numpy": ("https://numpy.org/doc/stable/", "2", {
        ("py:class", "numpy.ndarray"): "reference/generated/numpy.ndarray.html#numpy.ndarray",
    }),
    "pandas": ("https://pandas.pydata.org/docs/", "2", {
        ("py:class", "pandas.DataFrame"):
            "reference/api/pandas.DataFrame.html#pandas.DataFrame",
        ("py:class", "pandas.core.frame.DataFrame"):  # type hints' target
            "reference/api/pandas.DataFrame.html#pandas.DataFrame",
        ("py:class", "pandas.core.series.Series"):
            "reference/api/pandas.Series.html#pandas.Series",
    }),
}


def inventory_bytes(project: str, version: str, names: dict[tuple[str, str], str]) -> bytes:
    """An ``objects.inv`` (format version 2) holding ``names``."""
    header = (f"# Sphinx inventory version 2\n# Project: {project}\n# Version: {version}\n"
              "# The remainder of this file is compressed using zlib.\n")
    lines = []
    for (role, name), uri in sorted(names.items(), key=lambda item: item[0][1]):
        lines.append(f"{name} {role} 1 {uri} -\n")  # "-": display the name itself
    return header.encode() + zlib.compress("".join(lines).encode())


def write() -> None:
    OUT.mkdir(exist_ok=True)
    for project, (_, version, names) in NAMES.items():
        path = OUT / f"{project}.inv"
        path.write_bytes(inventory_bytes(project, version, names))
        # read back with Sphinx's own reader: what intersphinx will see
        loaded = InventoryFile.loads(path.read_bytes(), uri="").data
        n = sum(len(entries) for entries in loaded.values())
        print(f"wrote {path.relative_to(HERE.parent)} ({n} names)")


def check() -> int:
    """Compare each entry with the project's real inventory; the number of mismatches."""
    bad = 0
    for project, (base, _, names) in NAMES.items():
        with urllib.request.urlopen(base + "objects.inv", timeout=30) as response:
            real = InventoryFile.loads(response.read(), uri=base).data
        for (role, name), uri in names.items():
            found = real.get(role, {}).get(name)
            got = None if found is None else found.uri
            if got != base + uri:
                bad += 1
                print(f"{project}: {role} {name}: table {uri!r}, real inventory {got!r}")
    print(f"{bad} mismatches")
    return bad


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the real inventories (needs the network)")
    args = parser.parse_args()
    sys.exit(1 if args.check and check() else (write() or 0))
