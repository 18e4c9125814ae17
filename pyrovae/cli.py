"""Command line: ``pyrovae demo`` and ``pyrovae fit``."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .likelihoods import LIKELIHOODS

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrovae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a ZINB VAE on 700 PBMCs and report held-out scores")
    demo.add_argument("--out", default="pyrovae_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--max-epochs", type=int, default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")

    fit = sub.add_parser("fit", help="fit a VAE to an .h5ad file and write its latent space")
    fit.add_argument("input", type=Path, help=".h5ad file of cells x genes")
    fit.add_argument("-o", "--output", type=Path, required=True,
                     help=".h5ad to write, with obsm['X_pyrovae'] and uns['pyrovae']")
    fit.add_argument("--likelihood", default="zinb", choices=sorted(LIKELIHOODS))
    fit.add_argument("--layer", default=None, help="read adata.layers[LAYER] instead of X")
    fit.add_argument("--n-latent", type=int, default=10)
    fit.add_argument("--n-hidden", type=int, nargs="+", default=[128])
    fit.add_argument("--max-epochs", type=int, default=None)
    fit.add_argument("--batch-size", type=int, default=128)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default="auto")
    fit.add_argument("--model", type=Path, default=None, help="also save the model here (.pt)")
    fit.add_argument("--checkpoint", type=Path, default=None,
                     help="write a checkpoint here as training goes (pyrovae.resume continues it)")
    fit.add_argument("--checkpoint-every", type=int, default=10, metavar="EPOCHS",
                     help="epochs between checkpoints (default: %(default)s)")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, max_epochs=args.max_epochs, seed=args.seed, progress=not args.quiet)
        return 0

    try:
        return _fit(args)
    except UsageError as err:
        print(f"pyrovae fit: {err}", file=sys.stderr)
        return 2


class UsageError(Exception):
    """A user error in ``pyrovae fit``: reported in one line, exit code 2."""


_OPTIONS = {"max_epochs": "--max-epochs", "batch_size": "--batch-size", "seed": "--seed",
            "device": "--device", "checkpoint_every": "--checkpoint-every"}


def _as_options(message: str) -> str:
    """A TrainingPlan message with the field it names written as this command's option
    (``max_epochs must ...`` -> ``--max-epochs must ...``, ``device='tpu'`` ->
    ``--device='tpu'``); other words (prose, paths) are left as they are."""
    return re.sub(r"(?<![\w/.-])(" + "|".join(_OPTIONS) + r")(?=\s*=|\s+must\b)",
                  lambda m: _OPTIONS[m.group(1)], message)


def _fit(args: argparse.Namespace) -> int:
    """``pyrovae fit``: every check (options, output paths, the input file) before training."""
    import anndata as ad

    from .api import fit
    from .data import InvalidDataError
    from .files import check_writable
    from .train import TrainingPlan

    try:  # the options, as fit would check them, before reading anything
        TrainingPlan(max_epochs=args.max_epochs, batch_size=args.batch_size, seed=args.seed,
                     device=args.device, checkpoint_every=args.checkpoint_every)
        if args.n_latent < 1 or min(args.n_hidden) < 1:
            raise ValueError("--n-latent and --n-hidden must be at least 1")
        for option, path in (("--output", args.output), ("--model", args.model),
                             ("--checkpoint", args.checkpoint)):
            if path is not None:
                check_writable(path, option)
    except ValueError as err:
        raise UsageError(_as_options(str(err))) from None
    if not args.input.is_file():
        raise UsageError(f"{args.input} does not exist" if not args.input.exists()
                         else f"{args.input} is not a file")
    try:
        adata = ad.read_h5ad(args.input)
    except Exception as err:  # not HDF5, truncated, not an AnnData
        raise UsageError(f"{args.input} is not a readable .h5ad file "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    try:
        model = fit(
            adata, args.likelihood, layer=args.layer, n_latent=args.n_latent,
            n_hidden=args.n_hidden, max_epochs=args.max_epochs, batch_size=args.batch_size,
            seed=args.seed, device=args.device, progress=not args.quiet,
            checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
        )
    except (InvalidDataError, ValueError) as err:
        raise UsageError(f"{args.input}: {err}") from None
    from .distributed import rank_and_size

    if rank_and_size()[0] != 0:  # under torchrun: every rank trained, rank 0 writes
        return 0
    _write_h5ad(adata, args.output)
    if args.model:
        model.save(args.model)
    best = model.settings().get("best_validation_elbo")
    print(f"wrote {args.output} ({model!r}"
          + (f", best validation ELBO {best:.1f}" if best is not None else "") + ")")
    return 0


def _write_h5ad(adata, path: Path) -> None:
    """Write to a temporary file beside ``path`` and rename it: whole or not at all."""
    import os
    import tempfile

    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".h5ad",
                                         dir=path.resolve().parent)
    os.close(handle)
    try:
        adata.write_h5ad(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


if __name__ == "__main__":
    sys.exit(main())
