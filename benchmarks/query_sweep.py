"""Choosing ``map_query``'s options without the query labels: the ELBO of held-out query cells.

    python benchmarks/query.py --data bladder --novelty-types 0 --save-models FOLDER
    python benchmarks/query_sweep.py bladder FOLDER '{"gene_offsets": false}' '{}' '{"lr": 5e-3}'

Rebuilds the split of ``benchmarks/query.py`` (seed 0), loads the reference saved there
(``FOLDER/<data>_reference.pt``), maps 80 % of the query cells with each set of options (a
JSON object of :func:`pyrovae.query.map_query` keywords) and prints the mean ELBO of the
other 20 % (``default_rng(1).random(n) < 0.2``; the criterion) beside the accuracy on all
query cells, the batch mixing and the seconds.
"""

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyrovae  # noqa: E402
from benchmarks import data as datasets  # noqa: E402
from benchmarks import query as bq  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    name, folder, variants = argv[0], Path(argv[1]), [json.loads(v) for v in argv[2:]]
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    ref, query = bq.split(datasets.load(name), 0)
    reference = pyrovae.load(folder / f"{name}_reference.pt")
    hold = np.random.default_rng(1).random(query.n_obs) < 0.2
    train, held = query[~hold].copy(), query[hold].copy()
    latent_ref = reference.get_latent(ref)
    rows = []
    for options in variants:
        start = time.perf_counter()
        mapped = reference.map_query(train, **options)
        seconds = time.perf_counter() - start
        row = {"options": json.dumps(options), "held_out_elbo": float(mapped.elbo(held, n_samples=5)["elbo"].mean()),
               **bq.scores(query.obs[bq.KEY], mapped.predict(query)),
               "mixing": bq.mixing(latent_ref, mapped.get_latent(query)), "seconds": seconds}
        rows.append(row)
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    main()
