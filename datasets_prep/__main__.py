"""`python -m datasets_prep <command>`: each command is one function plus one subparser."""

import argparse
import sys

from trainers.errors import UserError


def positive_int(text: str) -> int:
    """Reject zero and negatives at parse time, so the user gets argparse's one-line error."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def run_digits(args: argparse.Namespace) -> int:
    """Write the scikit-learn digits imagefolder; imported here so other commands skip sklearn."""
    from datasets_prep.digits import write_digits_dataset

    count = write_digits_dataset(args.out, n=args.n, size=args.size, seed=args.seed)
    print(f"wrote {count} images to {args.out}")
    return 0


def add_digits(commands) -> None:
    """Register `digits`: a small real captioned dataset that needs no download."""
    parser = commands.add_parser("digits", help="write scikit-learn's handwritten digits as an imagefolder")
    parser.add_argument("--out", required=True, help="output folder (images/ and metadata.jsonl)")
    parser.add_argument("--n", type=positive_int, default=None, help="number of images (default: all 1797)")
    parser.add_argument("--size", type=positive_int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed for order, colours and backgrounds")
    parser.set_defaults(run=run_digits)


COMMANDS = (add_digits,)


def build_parser() -> argparse.ArgumentParser:
    """One subparser per command, so adding a command touches only COMMANDS."""
    parser = argparse.ArgumentParser(prog="python -m datasets_prep", description="Prepare datasets for difftune.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a UserError becomes one line on stderr and its exit code, not a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
