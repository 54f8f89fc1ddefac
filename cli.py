"""The ``latentwire`` command. Subcommands are thin: each calls the package's public API."""
import argparse
import sys


def _codecs(args):
    from latentwire.demo import codec_table

    print(codec_table(tuple(args.shape), seed=args.seed, levels=args.level))
    return 0


def build_parser():
    p = argparse.ArgumentParser(
        prog="latentwire",
        description="Edge-cloud collaborative diffusion inference: ship a diffusion latent between an edge "
                    "and a cloud process.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("codecs", help="bytes on wire and error of every codec for a real-shaped latent",
                       description="Encode a latent-shaped tensor (noise, a smooth clean-latent stand-in, and "
                                   "their mixtures at early/middle/late steps) with every codec; print bytes "
                                   "on wire, bits per value and error.")
    c.add_argument("--shape", type=int, nargs="+", default=[1, 4, 64, 64], help="latent shape (default SD1.5)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--level", type=int, nargs="+", default=[0, 3], help="zstd levels to show (0 = off)")
    c.set_defaults(func=_codecs)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
