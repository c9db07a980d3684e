"""`python -m datasets_prep <command>`: each command is one function plus one subparser."""

import argparse
import os
import sys
from pathlib import Path

from trainers.errors import UserError
from trainers.versions import check_versions


def positive_int(text: str) -> int:
    """Reject zero and negatives at parse time, so the user gets argparse's one-line error."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """Like positive_int, for thresholds where 0 is meaningful."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def run_digits(args: argparse.Namespace) -> int:
    """Write the scikit-learn digits imagefolder; imported here so other commands skip sklearn."""
    from datasets_prep.digits import write_digits_dataset

    count = write_digits_dataset(args.out, n=args.n, size=args.size, seed=args.seed, only=args.only,
                                 subject=args.subject)
    print(f"wrote {count} images to {args.out}")
    return 0


def add_digits(commands) -> None:
    """Register `digits`: a small real captioned dataset that needs no download."""
    parser = commands.add_parser("digits", help="write scikit-learn's handwritten digits as an imagefolder")
    parser.add_argument("--out", required=True, help="output folder (images/ and metadata.jsonl)")
    parser.add_argument("--n", type=positive_int, default=None, help="number of images (default: all 1797)")
    parser.add_argument("--size", type=positive_int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed for order, colours and backgrounds")
    parser.add_argument("--only", type=int, choices=range(10), default=None, help="keep one digit class")
    parser.add_argument("--subject", default=None, help='caption name instead of "handwritten digit <word>", '
                        'e.g. "sks digit" for a DreamBooth instance set')
    parser.set_defaults(run=run_digits)


def run_prepare(args: argparse.Namespace) -> int:
    """Prepare shards from a raw source; Ctrl-C leaves a resumable folder and says so."""
    from datasets_prep.prepare import PrepareOptions, prepare
    from datasets_prep.items import Columns

    if not 1 <= args.jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality must be between 1 and 100, got {args.jpeg_quality}")
    canny = {k: v for k, v in (("canny_low", args.canny_low), ("canny_high", args.canny_high)) if v is not None}
    if canny and args.conditioning != "canny":
        raise UserError("--canny-low/--canny-high apply only with --conditioning canny")
    columns = Columns(image=args.image_column, caption=args.caption_column, conditioning=args.conditioning_column,
                      mask=args.mask_column)
    options = PrepareOptions(
        resolution=args.resolution, buckets=args.buckets, caption_policy=args.caption_policy,
        max_pixels=args.max_pixels, min_size=args.min_size, image_format=args.image_format,
        jpeg_quality=args.jpeg_quality, columns=columns, shard_rows=args.shard_rows, group_rows=args.row_group_rows,
        conditioning=args.conditioning, mask_from_alpha=args.mask_from_alpha, **canny)
    try:
        report = prepare(args.source, args.out, options, workers=args.workers, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"interrupted: re-run the same command to continue where {args.out} stopped", file=sys.stderr)
        return 130
    except OSError as error:  # permissions, a full disk: the message names the file; inputs report their own problems
        raise UserError(f"prepare stopped on a file system error: {error}") from None
    reasons = ", ".join(f"{k} {v}" for k, v in report["skipped_by_reason"].items())
    print(f"kept {report['kept']} of {report['inputs']} inputs in {args.out}"
          + (f"; skipped {reasons} (see skipped.jsonl)" if reasons else ""))
    return 0


def add_prepare(commands) -> None:
    """Register `prepare`: raw images and captions to validated, bucketed parquet shards."""
    parser = commands.add_parser("prepare", help="validate, bucket and resize a raw source into parquet shards")
    parser.add_argument("--source", required=True, nargs="+", metavar="SRC",
                        help="caption folder, imagefolder, saved HF dataset, parquet file(s) or folder, "
                             ".tar shard(s) or folder")
    parser.add_argument("--out", required=True, help="output folder; re-running on it resumes")
    parser.add_argument("--resolution", type=positive_int, default=1024, help="target side; bucket areas are about R^2")
    parser.add_argument("--buckets", choices=("sdxl", "square"), default="sdxl",
                        help="sdxl: multi-aspect buckets (1:4..4:1, multiples of 64); square: one R x R bucket")
    parser.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--caption-policy", choices=("skip", "empty"), default="skip",
                        help="inputs without a caption: skip them, or keep them with an empty caption")
    parser.add_argument("--max-pixels", type=positive_int, default=178_956_970,
                        help="refuse larger images from their header, before decoding (decompression bombs)")
    parser.add_argument("--min-size", type=positive_int, default=64, help="skip images whose short side is smaller")
    parser.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg", help="encoding of stored images")
    parser.add_argument("--jpeg-quality", type=positive_int, default=95, help="JPEG quality (1-100)")
    parser.add_argument("--image-column", default="image", help="image column (datasets, parquet)")
    parser.add_argument("--caption-column", default="text",
                        help="caption column (metadata, datasets, parquet, tar .json)")
    parser.add_argument("--conditioning-column", default="conditioning_image",
                        help="ControlNet conditioning image column")
    parser.add_argument("--mask-column", default="mask",
                        help="masked-loss mask column: a greyscale image per input, white = the subject")
    parser.add_argument("--mask-from-alpha", action="store_true",
                        help="an image's alpha channel becomes its mask where it has no mask of its own")
    parser.add_argument("--conditioning", choices=("canny",), default=None,
                        help="derive a conditioning image for inputs without one: canny = white edges on black, "
                             "found on the resized and cropped image (needs opencv-python-headless)")
    parser.add_argument("--canny-low", type=non_negative_int, default=None,
                        help="Canny's lower hysteresis threshold (default 100)")
    parser.add_argument("--canny-high", type=non_negative_int, default=None,
                        help="Canny's upper hysteresis threshold (default 200)")
    parser.add_argument("--shard-rows", type=positive_int, default=1000, help="rows per parquet shard")
    parser.add_argument("--row-group-rows", type=positive_int, default=16,
                        help="rows per parquet row group, the unit of random access: smaller reads less per record")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output prepared differently")
    parser.set_defaults(run=run_prepare)


def run_inspect(args: argparse.Namespace) -> int:
    """Print report.md of a prepared dataset."""
    from datasets_prep.report import summary_text

    print(summary_text(Path(args.dir)), end="")
    return 0


def add_inspect(commands) -> None:
    """Register `inspect`: what a prepared dataset holds and what was skipped."""
    parser = commands.add_parser("inspect", help="print the report of a prepared dataset")
    parser.add_argument("dir", help="a folder written by prepare")
    parser.set_defaults(run=run_inspect)


def run_cache(args: argparse.Namespace) -> int:
    """Encode latents and text once for one model, beside the prepared shards."""
    from datasets_prep.cache import write_cache
    from trainers.config import ModelConfig

    model = ModelConfig(pretrained=args.model, revision=args.revision, variant=args.variant, t5=not args.no_t5,
                        max_sequence_length=args.max_sequence_length)
    print(f"cache written to {write_cache(args.data, model, args.batch_size, args.dtype, args.device)}")
    return 0


def add_cache(commands) -> None:
    """Register `cache`: VAE posteriors and text embeddings, so training skips those encoders."""
    parser = commands.add_parser("cache", help="precompute latents and text embeddings for one model")
    parser.add_argument("--data", required=True, type=Path, help="a folder written by prepare")
    parser.add_argument("--model", required=True, help="the model.pretrained the recipe will train")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--variant", default=None)
    parser.add_argument("--no-t5", action="store_true", help="sd3: as the recipe's model.t5: false (no T5 tokens)")
    parser.add_argument("--max-sequence-length", default=None, type=positive_int,
                        help="T5 tokens per caption, as the recipe's model.max_sequence_length (sd3, flux)")
    parser.add_argument("--batch-size", default=16, type=positive_int)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                        help="storage dtype (float32 reproduces uncached training exactly)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.set_defaults(run=run_cache)


def run_synth(args: argparse.Namespace) -> int:
    """Write the procedural shapes benchmark; numpy and PIL only."""
    from datasets_prep.synth import parse_rules, write_synth_dataset
    from datasets_prep.synth_world2 import COUNTS, write_world2_dataset

    if args.world == "v2" and (args.only or args.exclude):
        raise UserError("synth: --only/--exclude restrict world v1's factors; world v2 draws every value")
    if args.world == "v1" and (args.objects or args.always_name):
        raise UserError("synth: --objects/--always-name are world v2's; world v1 has one object and names every factor")
    try:
        if args.world == "v2":
            count = write_world2_dataset(args.out, n=args.n, size=args.size, seed=args.seed, edges=args.edges,
                                         counts=tuple(args.objects or COUNTS), always=tuple(args.always_name or ()))
        else:
            count = write_synth_dataset(args.out, n=args.n, size=args.size, seed=args.seed, edges=args.edges,
                                        only=parse_rules(args.only), exclude=parse_rules(args.exclude))
    except ValueError as e:
        raise UserError(f"synth: {e}") from None
    print(f"wrote {count} images to {args.out}")
    return 0


def add_synth(commands) -> None:
    """Register `synth`: shapes with known factors, for evaluation (world v1, or v2's open captions)."""
    parser = commands.add_parser("synth", help="write a procedural shapes imagefolder with known ground truth")
    parser.add_argument("--out", required=True, help="output folder (images/, metadata.jsonl, factors.json)")
    parser.add_argument("--n", type=positive_int, required=True, help="number of images; a smaller n is a prefix")
    parser.add_argument("--world", choices=("v1", "v2"), default="v1",
                        help="v1: one shape, every factor in the caption; v2: one to three shapes, captions that "
                             "leave factors open (datasets_prep/synth_world2.py)")
    parser.add_argument("--size", type=int, choices=(32, 64), default=32, help="image side in pixels")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed for factors, jitter and texture")
    parser.add_argument("--edges", action="store_true",
                        help="also write ControlNet outlines (white on black) under conditioning/")
    parser.add_argument("--objects", type=int, action="append", metavar="N",
                        help="v2: only scenes of N objects (repeatable; default 1, 2 and 3)")
    parser.add_argument("--always-name", action="append", metavar="ATTRIBUTE",
                        help="v2: name this attribute on every described object, e.g. fill (repeatable): a curriculum")
    parser.add_argument("--only", action="append", metavar="FACTOR=V[,V]",
                        help="draw only these values of a factor, e.g. colour=purple (repeatable)")
    parser.add_argument("--exclude", action="append", metavar="FACTOR=V[,V]",
                        help="never draw these values, e.g. colour=purple for a teacher without it (repeatable)")
    parser.set_defaults(run=run_synth)


COMMANDS = (add_digits, add_prepare, add_inspect, add_cache, add_synth)


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
        check_versions()
        return args.run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
