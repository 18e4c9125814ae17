"""Where a training step's time goes: pyrovae's loss vs the plain PyTorch reference.

    python benchmarks/profile_step.py [--data bladder|simulated] [--rounds 200] [--threads 2]

One minibatch of 128 cells x 2,000 genes (the bladder data's 2,000 HVGs when the shared
file is present, else ``simulated(2000)``), the default ZINB network, the loss scaled to
the whole data set and KL weight 0.5, as ``pyrovae/train.py`` calls it. Every variant's
forward + backward is timed once per round; the variants run in turn within a round (the
order rotating from round to round), for ``--rounds`` rounds after a warm-up, so that
machine load falls on all alike. The table gives the median and the interquartile range
of each variant, and its time relative to the reference (the median of the per-round
ratios).

Variants, all on the same batch (``module`` = ``pyrovae.module.VAEModule``):

- ``reference``: ``benchmarks/reference_vae.py`` (hand-written ZINB, analytic KL).
- ``reference compiled``: ``torch.compile`` of the same (when it compiles).
- ``pyrovae``: ``TraceMeanField_ELBO()(module.model, module.guide)``, as ``train.py``.
- ``pyrovae Trace_ELBO``: the same with ``Trace_ELBO`` (one-sample KL).
- ``pyrovae fused ZINB``: pyrovae's model and guide with the ZINB likelihood swapped
  for a ``pyro.distributions`` class whose ``log_prob`` is the reference's formula
  (``benchmarks/fused_zinb.py``).
- ``... no validation``: inside ``pyro.validation_enabled(False)`` (Pyro validates every
  distribution's arguments and observed values by default).
- ``pyrovae JitTraceMeanField_ELBO``, ``pyrovae compiled``: when they run.
- the ablation ladder, in plain torch on pyrovae's own encoder and decoder modules:
  ``networks only`` (encoder, one draw of z, decoder, closed-form KL; the decoder's outputs
  summed), ``networks + hand-written ZINB``, ``networks + pyro ZINB distribution`` (pyrovae's
  ``likelihood(...)`` object's ``log_prob``, validation on and off) -- no Pyro tracing.

Then: the optimiser step (``Adam``, as in ``train.py``; also ``foreach`` and ``fused``),
cutting one minibatch out of the CSR matrix, and a ``torch.profiler`` run of both whole
training steps splitting each into time inside aten operators and time outside them
(Python: Pyro's tracing and messengers, distribution construction, module calls).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyrovae  # noqa: E402
from benchmarks import data as bench_data  # noqa: E402
from benchmarks.reference_vae import ReferenceVAE, kl_standard_normal, zinb_log_prob  # noqa: E402
from pyrovae.likelihoods import get_likelihood  # noqa: E402
from pyrovae.module import VAEModule  # noqa: E402
from pyrovae.nn import Architecture  # noqa: E402
from pyrovae.priors import StandardNormal  # noqa: E402

BATCH = 128
KL_WEIGHT = 0.5


# ---------------------------------------------------------------------------- set-up
def load_batch(which: str):
    adata = bench_data.bladder() if which == "bladder" else None
    if adata is None:
        which = "simulated"
        adata = bench_data.simulated(2000, 2000)
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    chunk = np.sort(perm[:BATCH])
    return which, adata, chunk


def make_variants(x, n_obs: int, try_compile: bool = True):
    """name -> (loss closure, parameters) for every variant that builds."""
    G = x.shape[1]
    library = x.sum(-1, keepdim=True)
    index = torch.arange(len(x))
    variants, notes = {}, []

    def pyro_module(likelihood):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = VAEModule(G, get_likelihood(likelihood), StandardNormal(), Architecture())
        module.train()
        return module

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = ReferenceVAE(G).train()
    variants["reference"] = (lambda: ref(x, n_obs, KL_WEIGHT), ref)

    module = pyro_module("zinb")
    tmf = TraceMeanField_ELBO()(module.model, module.guide)
    variants["pyrovae"] = (lambda: tmf(x, library, None, None, None, index, n_obs, KL_WEIGHT), module)
    variants["pyrovae no validation"] = (
        lambda: _novalid(tmf, x, library, None, None, None, index, n_obs, KL_WEIGHT), module)

    module_t = pyro_module("zinb")
    te = Trace_ELBO()(module_t.model, module_t.guide)
    variants["pyrovae Trace_ELBO"] = (lambda: te(x, library, None, None, None, index, n_obs, KL_WEIGHT), module_t)

    # the ablation ladder: pyrovae's networks and distributions without Pyro's tracing
    enc, dec = module.guide.encoder, module.model.decoder
    lik, gene_params = module.model.likelihood, module.model.gene_params
    scale = n_obs / len(x)

    def encode_decode():
        loc, sc = enc(torch.log1p(x))
        z = torch.distributions.Normal(loc, sc).rsample()
        return loc, sc, dec(z)

    def networks_only():
        loc, sc, heads = encode_decode()
        return -scale * (heads["log_rho"].sum() + heads["gate_logits"].sum()
                         - KL_WEIGHT * kl_standard_normal(loc, sc).sum())

    def networks_handwritten():
        loc, sc, heads = encode_decode()
        log_mu = torch.log(library) + heads["log_rho"]
        ll = zinb_log_prob(x, log_mu, gene_params["log_theta"], heads["gate_logits"]).sum()
        return -scale * (ll - KL_WEIGHT * kl_standard_normal(loc, sc).sum())

    def networks_pyro_dist():
        loc, sc, heads = encode_decode()
        px = lik(heads, gene_params, library).to_event(1)
        q = dist.Normal(loc, sc).to_event(1)
        p = dist.Normal(torch.zeros(()), 1.0).expand([loc.shape[-1]]).to_event(1)
        return -scale * (px.log_prob(x).sum() - KL_WEIGHT * kl_divergence(q, p).sum())

    variants["networks only"] = (networks_only, module)
    variants["networks + hand-written ZINB"] = (networks_handwritten, module)
    variants["networks + pyro ZINB distribution"] = (networks_pyro_dist, module)
    variants["networks + pyro ZINB distribution no validation"] = (
        lambda: _novalid(networks_pyro_dist), module)

    if not try_compile:
        notes.append("torch.compile and JitTraceMeanField_ELBO variants skipped (--no-compile)")
        return variants, notes

    # compiled / jitted variants, when they work
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            ref_c = ReferenceVAE(G).train()
        compiled = torch.compile(ref_c)
        start = time.perf_counter()
        _step(lambda: compiled(x, n_obs, KL_WEIGHT), ref_c)
        _step(lambda: compiled(x, n_obs, KL_WEIGHT), ref_c)
        notes.append(f"torch.compile(reference): compiled in {time.perf_counter() - start:.0f} s")
        variants["reference compiled"] = (lambda: compiled(x, n_obs, KL_WEIGHT), ref_c)
    except Exception as err:  # noqa: BLE001 - report whatever stops it
        notes.append(f"torch.compile(reference) failed: {type(err).__name__}: {str(err)[:200]}")

    try:
        module_j = pyro_module("zinb")
        jit = JitTraceMeanField_ELBO(ignore_jit_warnings=True)(module_j.model, module_j.guide)
        fn = lambda: jit(x, library, None, None, None, index, n_obs=n_obs, kl_weight=KL_WEIGHT)  # noqa: E731
        start = time.perf_counter()
        _step(fn, module_j)
        first = time.perf_counter() - start
        grads = [p.grad for p in module_j.parameters()]
        if any(g is None for g in grads) or all(float(g.abs().sum()) == 0 for g in grads):
            notes.append("JitTraceMeanField_ELBO: ran, but the module's parameters got no "
                         "gradient (they are traced as constants): not usable")
        else:
            notes.append(f"JitTraceMeanField_ELBO: first call {first:.1f} s")
            variants["pyrovae JitTraceMeanField_ELBO"] = (fn, module_j)
    except Exception as err:  # noqa: BLE001
        notes.append(f"JitTraceMeanField_ELBO failed: {type(err).__name__}: {str(err)[:300]}")

    try:
        from torch._dynamo.utils import counters

        counters.clear()
        module_c = pyro_module("zinb")
        tmf_c = torch.compile(TraceMeanField_ELBO()(module_c.model, module_c.guide))
        fn = lambda: tmf_c(x, library, None, None, None, index, n_obs, KL_WEIGHT)  # noqa: E731
        start = time.perf_counter()
        for _ in range(12):  # past dynamo's recompile limit (8), if it recompiles each step
            _step(fn, module_c)
        breaks = sum(counters["graph_break"].values())
        notes.append(
            f"torch.compile(pyrovae loss module): 12 first steps in {time.perf_counter() - start:.0f} s; "
            f"{counters['stats']['unique_graphs']} graphs compiled, {breaks} graph breaks "
            f"({'; '.join(list(counters['graph_break'])[:3])[:300]})"
        )
        variants["pyrovae compiled"] = (fn, module_c)
    except Exception as err:  # noqa: BLE001
        notes.append(f"torch.compile(pyrovae loss module) failed: {type(err).__name__}: {str(err)[:300]}")
    return variants, notes


def _novalid(fn, *args):
    with pyro.validation_enabled(False):
        return fn(*args)


def _step(loss_fn, params_of) -> None:
    for p in params_of.parameters():
        p.grad = None
    loss_fn().backward()


# ---------------------------------------------------------------------------- timing
def time_interleaved(variants: dict, rounds: int, warmup: int) -> dict[str, np.ndarray]:
    names = list(variants)
    times = {n: [] for n in names}
    for r in range(warmup + rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, owner = variants[name]
            for p in owner.parameters():
                p.grad = None
            start = time.perf_counter()
            fn().backward()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return {n: np.asarray(t) for n, t in times.items()}


def report(times: dict[str, np.ndarray], base: str = "reference") -> None:
    print(f"\n{'forward + backward, one batch':50s} {'median ms':>9s} {'IQR ms':>15s} {'x ref':>6s}")
    for name, t in times.items():
        q1, med, q3 = np.percentile(t, [25, 50, 75]) * 1e3
        ratio = np.median(t / times[base]) if base in times else float("nan")
        print(f"{name:50s} {med:9.2f} {f'[{q1:.2f}, {q3:.2f}]':>15s} {ratio:6.2f}")


def time_optimizers(module, x, n_obs, rounds: int) -> None:
    library = x.sum(-1, keepdim=True)
    index = torch.arange(len(x))
    loss_fn = TraceMeanField_ELBO()(module.model, module.guide)
    opts = {
        "Adam (train.py's: default, for-loop on CPU)": torch.optim.Adam(
            module.parameters(), lr=1e-3, weight_decay=1e-6, eps=0.01),
        "Adam foreach=True": torch.optim.Adam(
            module.parameters(), lr=1e-3, weight_decay=1e-6, eps=0.01, foreach=True),
        "Adam fused=True": torch.optim.Adam(
            module.parameters(), lr=1e-3, weight_decay=1e-6, eps=0.01, fused=True),
    }
    times = {n: [] for n in opts}
    for r in range(rounds + 5):
        for name, opt in opts.items():
            opt.zero_grad(set_to_none=True)
            loss_fn(x, library, None, None, None, index, n_obs, KL_WEIGHT).backward()
            start = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r >= 5:
                times[name].append(time.perf_counter() - start)
    print(f"\n{'optimiser step + zero_grad (' + str(sum(p.numel() for p in module.parameters())) + ' parameters)':50s} "
          f"{'median ms':>9s} {'IQR ms':>15s}")
    for name, t in times.items():
        q1, med, q3 = np.percentile(t, [25, 50, 75]) * 1e3
        print(f"{name:50s} {med:9.2f} {f'[{q1:.2f}, {q3:.2f}]':>15s}")


def time_minibatch(adata, rounds: int) -> None:
    from pyrovae.data import read_data

    data = read_data(adata)
    rng = np.random.default_rng(1)
    times = []
    for _ in range(rounds):
        chunk = np.sort(rng.choice(adata.n_obs, BATCH, replace=False))
        start = time.perf_counter()
        x = data.batch(chunk)
        x.sum(-1, keepdim=True)
        times.append(time.perf_counter() - start)
    print(f"\ncutting one minibatch from the CSR matrix (pyrovae's CountData.batch): "
          f"median {np.median(times) * 1e3:.2f} ms")


def profile_steps(variants: dict, n_steps: int) -> None:
    """torch.profiler over whole training steps (forward, backward, Adam step)."""
    from torch.profiler import ProfilerActivity, profile

    print(f"\ntorch.profiler, {n_steps} training steps each (forward + backward + Adam step)")
    tables = {}
    for name in ("reference", "pyrovae"):
        fn, owner = variants[name]
        opt = torch.optim.Adam(owner.parameters(), lr=1e-3, weight_decay=1e-6, eps=0.01)
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            fn().backward()
            opt.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(n_steps):
                opt.zero_grad(set_to_none=True)
                fn().backward()
                opt.step()
            wall = (time.perf_counter() - start) / n_steps
        events = prof.key_averages()
        # self CPU time of every operator, per step; the rest of the wall time is Python
        ops = {e.key: e.self_cpu_time_total / 1e3 / n_steps for e in events}
        counts = {e.key: e.count / n_steps for e in events}
        in_ops = sum(ops.values())
        tables[name] = (ops, counts)
        print(f"  {name:10s} {wall * 1e3:7.2f} ms per step under the profiler: {in_ops:6.2f} ms in "
              f"operators ({sum(counts.values()):.0f} operator calls), {wall * 1e3 - in_ops:6.2f} ms outside")
    ref_ops, ref_counts = tables["reference"]
    pyro_ops, pyro_counts = tables["pyrovae"]
    keys = sorted(set(ref_ops) | set(pyro_ops), key=lambda k: -(pyro_ops.get(k, 0) + ref_ops.get(k, 0)))
    print(f"\n  {'operator (self CPU ms per step, calls per step)':52s} {'reference':>16s} {'pyrovae':>16s}")
    for k in keys[:30]:
        print(f"  {k[:52]:52s} {ref_ops.get(k, 0):8.2f} ({ref_counts.get(k, 0):4.0f}) "
              f"{pyro_ops.get(k, 0):8.2f} ({pyro_counts.get(k, 0):4.0f})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["bladder", "simulated"], default="bladder")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile-steps", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile and JIT variants")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    which, adata, chunk = load_batch(args.data)
    x = torch.from_numpy(adata.X[chunk].toarray())
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, pyrovae {pyrovae.__version__}, "
          f"{torch.get_num_threads()} threads; batch {tuple(x.shape)} from {which} "
          f"({adata.n_obs} cells), {(x == 0).float().mean():.0%} zeros; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    variants, notes = make_variants(x, adata.n_obs, try_compile=not args.no_compile)
    for note in notes:
        print(" ", note, flush=True)
    times = time_interleaved(variants, args.rounds, args.warmup)
    report(times)
    with contextlib.suppress(KeyError):
        def step(a, b):  # median over rounds of the paired difference, ms
            return float(np.median(times[a] - times[b]) * 1e3)

        print("\nbreakdown of pyrovae's forward + backward (ms; each step the median of the "
              "per-round differences):")
        print(f"  networks (encoder, draw, decoder, KL)          {np.median(times['networks only']) * 1e3:7.2f}")
        print(f"  + hand-written ZINB log-likelihood             "
              f"{step('networks + hand-written ZINB', 'networks only'):7.2f}")
        print(f"  + composed Pyro ZINB instead (no validation)   "
              f"{step('networks + pyro ZINB distribution no validation', 'networks + hand-written ZINB'):7.2f}")
        print(f"  + Pyro's validation of that distribution       "
              f"{step('networks + pyro ZINB distribution', 'networks + pyro ZINB distribution no validation'):7.2f}")
        print(f"  + Pyro tracing (TraceMeanField_ELBO, plates)   "
              f"{step('pyrovae', 'networks + pyro ZINB distribution'):7.2f}")
        print(f"  pyrovae                                        {np.median(times['pyrovae']) * 1e3:7.2f}"
              f"   (reference {np.median(times['reference']) * 1e3:.2f}; pyrovae - reference "
              f"{step('pyrovae', 'reference'):.2f})")
    time_optimizers(variants["pyrovae"][1], x, adata.n_obs, max(20, args.rounds // 4))
    time_minibatch(adata, 200)
    profile_steps(variants, args.profile_steps)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
