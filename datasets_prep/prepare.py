"""`prepare`: stream a raw source through the workers into bucketed parquet shards, resumably."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from datasets_prep import conditioning
from datasets_prep.buckets import make_buckets
from datasets_prep.parallel import results
from datasets_prep.process import ProcessConfig, Skipped
from datasets_prep.progress import Progress, SkipLog, open_output, seen_hashes
from datasets_prep.report import write_report
from datasets_prep.shards import ShardWriter, write_atomically
from datasets_prep.items import Columns, Source
from datasets_prep.sources import open_source
from trainers.errors import UserError

FORMAT = 1  # bump when the shard layout changes, so old outputs are not resumed into new ones
CONDITIONING = ("conditioning", "canny_low", "canny_high")  # PrepareOptions fields recorded only with --conditioning


@dataclass(frozen=True)
class PrepareOptions:
    """What decides the output; all of it is recorded in progress.json, and a resume must match it."""

    resolution: int = 1024
    buckets: str = "sdxl"  # sdxl | square
    caption_policy: str = "skip"  # skip: drop inputs without a caption; empty: keep them with ""
    max_pixels: int = 178_956_970  # PIL's DecompressionBombError threshold, checked from the header
    min_size: int = 64  # shortest side in source pixels
    image_format: str = "jpeg"  # jpeg | png
    jpeg_quality: int = 95
    columns: Columns = field(default_factory=Columns)
    shard_rows: int = 1000
    group_rows: int = 16  # rows per parquet row group: the unit the reader fetches for one record
    conditioning: str | None = None  # canny: derive an edge map for inputs without a conditioning image
    canny_low: int = 100  # Canny hysteresis thresholds (diffusers' ControlNet examples use 100 and 200)
    canny_high: int = 200
    mask_from_alpha: bool = False  # an image's alpha channel is its mask where no mask file is given

    def params(self, sources: list[str]) -> dict:
        """A flat, JSON-able record of the options and the resolved source paths.

        The conditioning and mask options appear only when used, so outputs prepared before they existed still resume.
        """
        flat = {k: v for k, v in vars(self).items() if k not in ("columns", "mask_from_alpha", *CONDITIONING)}
        flat |= {"mask_from_alpha": True} if self.mask_from_alpha else {}
        columns = {f"{k}_column": v for k, v in vars(self.columns).items()
                   if k != "require_caption" and (k, v) != ("mask", Columns.mask)}
        derived = {k: getattr(self, k) for k in CONDITIONING} if self.conditioning else {}
        return {"format": FORMAT, "source": [str(Path(s).resolve()) for s in sources], **flat, **columns, **derived}


def bucket_list(options: PrepareOptions) -> list[tuple[int, int]]:
    try:
        return make_buckets(options.buckets, options.resolution)
    except ValueError as error:
        raise UserError(f"--resolution/--buckets: {error}") from None


def check_paths(sources: list[str], out: Path) -> None:
    """Refuse an output inside the source: its shards would be read back as input on the next run."""
    for source in sources:
        root = Path(source).resolve()
        if root.is_dir() and (out.resolve() == root or root in out.resolve().parents):
            raise UserError(f"--out {out} is inside --source {source}; choose a folder outside it")


def resumed_items(source: Source, progress: Progress):
    """The source from the first unconsumed item, after checking the item before it is the one recorded."""
    start, expected = progress.last["consumed"], progress.last.get("last_key")
    items = source.items(max(start - 1, 0))
    if start:
        found = next(items, None)
        if found is None or found.key != expected:
            raise UserError(f"the source changed since the interrupted run (input {start} was {expected!r}, now "
                            f"{found.key if found else 'missing'!r}); pass --overwrite to start over")
    return items


class Consumer:
    """The main-process side: decides duplicates in source order, writes rows and skips, closes shards."""

    def __init__(self, out: Path, progress: Progress, options: PrepareOptions):
        self.out, self.progress = out, progress
        self.seen = seen_hashes(out, progress)
        self.skips = SkipLog(out / "skipped.jsonl", progress.last["skipped_bytes"])
        self.writer = ShardWriter(out / "shards", len(progress.shards), options.shard_rows, options.group_rows)
        self.consumed, self.key = progress.last["consumed"], progress.last.get("last_key")
        self.masks = 0  # rows with a mask in the open shard

    def take(self, output: dict | Skipped) -> None:
        """One processed input, in source order."""
        self.consumed += 1
        if isinstance(output, Skipped):
            self.key = output.key
            self.skips.write(output)
            return
        self.key, path = output["key"], output.pop("source_path")
        digest = bytes.fromhex(output["sha256"][:32])
        if digest in self.seen:
            detail = f"same bytes as an earlier image (sha256 {output['sha256']})"
            self.skips.write(Skipped(self.key, path, "duplicate", detail))
        else:
            self.seen.add(digest)
            self.masks += output["mask"] is not None
            if self.writer.add(output):
                self.close_shard()

    def close_shard(self) -> None:
        """Shard file first, then the skip log, then progress.json: a crash in between only repeats work."""
        name, rows = self.writer.close_shard()
        masks = {"masks": self.masks} if self.masks else {}
        self.progress.shards.append({"name": name, "rows": rows, "consumed": self.consumed,
                                     "skipped_bytes": self.skips.commit(), "last_key": self.key, **masks})
        self.masks = 0
        self.progress.save(self.out)

    def finish(self) -> None:
        if self.writer.rows:
            self.close_shard()
        self.progress.finished = {"consumed": self.consumed, "skipped_bytes": self.skips.commit()}
        self.progress.save(self.out)

    def close(self) -> None:
        self.writer.abort()
        self.skips.close()


def run(source: Source, out: Path, progress: Progress, config: ProcessConfig, options: PrepareOptions,
        workers: int) -> None:
    """Feed the source through the workers into the consumer, with a progress bar."""
    consumer = Consumer(out, progress, options)
    bar = tqdm(total=source.count(), initial=consumer.consumed, unit="img", desc="prepare", disable=None)
    try:
        with results(resumed_items(source, progress), config, workers) as outputs:
            for output in outputs:
                consumer.take(output)
                bar.update()
        consumer.finish()
    finally:
        consumer.close()
        bar.close()


def prepare(sources: list[str], out, options: PrepareOptions = PrepareOptions(), workers: int = 1,
            overwrite: bool = False) -> dict:
    """Prepare (or finish preparing) `sources` into `out`; returns the report."""
    out = Path(out)
    check_paths(sources, out)
    buckets = bucket_list(options)
    if options.conditioning:
        conditioning.check(options.conditioning, options.canny_low, options.canny_high)
    columns = replace(options.columns, require_caption=options.caption_policy == "skip")
    source = open_source(sources, columns)
    progress = open_output(out, options.params(sources), overwrite)
    bucket_file = {"kind": options.buckets, "resolution": options.resolution, "buckets": [list(b) for b in buckets]}
    write_atomically(out / "buckets.json", json.dumps(bucket_file) + "\n")
    if progress.finished is None:
        config = ProcessConfig(tuple(buckets), options.caption_policy, options.max_pixels, options.min_size,
                               options.image_format, options.jpeg_quality, options.conditioning,
                               options.canny_low, options.canny_high, options.mask_from_alpha)
        run(source, out, progress, config, options, workers)
    return write_report(out, progress, source.describe(), buckets)
