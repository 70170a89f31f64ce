"""`python -m data_prep --out DIR [--source PATH] [--limit N] [--force]`."""

from __future__ import annotations

from ae.beton import MAX_COUNT
from ae.errors import OneLineParser, friendly_errors
from data_prep.sources import ACCEPTED


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m data_prep",
        description=(
            "Write CIFAR-10 as FFCV betons (DIR/train.beton, DIR/test.beton, raw 32x32 RGB pixels, "
            "exactly as in the source) and DIR/manifest.json."
        ),
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="folder to write the betons and manifest into"
    )
    parser.add_argument(
        "--source",
        metavar="PATH",
        help=f"local copy of CIFAR-10: {ACCEPTED}. Without it, CIFAR-10 is downloaded with torchvision into DIR/raw.",
    )
    parser.add_argument(
        "--limit", type=int, metavar="N", help=f"keep only the first N images of each split (1..{MAX_COUNT})"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite DIR even if it was prepared from another source or limit",
    )
    return parser


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data_prep.writer import prepare

    prepare(args.out, source=args.source, limit=args.limit, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
