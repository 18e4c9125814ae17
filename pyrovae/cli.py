"""Command line: ``pyrovae demo`` and ``pyrovae fit``."""

from __future__ import annotations

import argparse
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

    import anndata as ad

    from .api import fit
    from .data import InvalidDataError

    if not args.input.exists():
        print(f"pyrovae: {args.input} does not exist", file=sys.stderr)
        return 2
    adata = ad.read_h5ad(args.input)
    try:
        model = fit(
            adata, args.likelihood, layer=args.layer, n_latent=args.n_latent,
            n_hidden=args.n_hidden, max_epochs=args.max_epochs, batch_size=args.batch_size,
            seed=args.seed, device=args.device, progress=not args.quiet,
            checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
        )
    except InvalidDataError as err:
        print(f"pyrovae: {args.input}: {err}", file=sys.stderr)
        return 2
    from .distributed import rank_and_size

    if rank_and_size()[0] != 0:  # under torchrun: every rank trained, rank 0 writes
        return 0
    adata.write_h5ad(args.output)
    if args.model:
        model.save(args.model)
    best = model.settings().get("best_validation_elbo")
    print(f"wrote {args.output} ({model!r}"
          + (f", best validation ELBO {best:.1f}" if best is not None else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
