"""Parquet shards: the row schema and a writer that makes each shard appear complete or not at all."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("key", pa.string()),  # stable id from the source: relative path, metadata file name, tar/key, table:row
    ("image", pa.binary()),  # encoded JPEG or PNG at the bucket size
    ("caption", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()),  # the bucket, after resize and crop
    ("original_width", pa.int32()), ("original_height", pa.int32()),  # upright source size
    ("crop_top", pa.int32()), ("crop_left", pa.int32()),  # in pixels of the resized image (SDXL micro-conditioning)
    ("bucket", pa.int32()),  # index into buckets.json
    ("sha256", pa.string()),  # of the source file bytes
    ("conditioning_image", pa.binary()),  # PNG resized and cropped as the image, or null
    ("mask", pa.binary()),  # greyscale PNG resized and cropped as the image (white = subject), or null
])
BLOBS = ("image", "conditioning_image", "mask")
SMALL = [name for name in SCHEMA.names if name not in BLOBS]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def fsync_replace(tmp: Path, final: Path) -> None:
    """Flush to disk, then rename: a crash leaves either the old state or the whole new file."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_atomically(path: Path, text: str) -> None:
    """Small metadata files (progress, report, buckets) through a temporary sibling and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    fsync_replace(tmp, path)


class ShardWriter:
    """Rows in, shard files out: `rows_per_shard` rows each, in row groups of `group_rows`, via a .tmp file.

    Row groups are the unit of random access for datasets_prep.reader, so they are kept small; the images are
    already compressed, so only the small columns are.
    """

    def __init__(self, folder: Path, next_index: int, rows_per_shard: int, group_rows: int):
        self.folder, self.index = folder, next_index
        self.rows_per_shard, self.group_rows = rows_per_shard, group_rows
        self.pending: list[dict] = []  # rows of the row group being filled
        self.rows = 0  # rows in the open shard, pending included
        self.writer: pq.ParquetWriter | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def tmp(self) -> Path:
        return self.folder / (shard_name(self.index) + ".tmp")

    def open(self) -> pq.ParquetWriter:
        compression = {name: "none" if name in BLOBS else "zstd" for name in SCHEMA.names}
        return pq.ParquetWriter(self.tmp, SCHEMA, compression=compression, use_dictionary=False,
                                write_statistics=SMALL)

    def flush_group(self) -> None:
        if self.pending:
            self.writer = self.writer or self.open()
            self.writer.write_table(pa.Table.from_pylist(self.pending, schema=SCHEMA))
            self.pending = []

    def add(self, row: dict) -> bool:
        """Buffer a row; True when it filled the shard, which the caller then closes and records."""
        self.pending.append(row)
        self.rows += 1
        if len(self.pending) >= self.group_rows:
            self.flush_group()
        return self.rows >= self.rows_per_shard

    def close_shard(self) -> tuple[str, int]:
        """Finish the open shard and rename it into place; returns (file name, rows)."""
        self.flush_group()
        self.writer.close()
        name, rows = shard_name(self.index), self.rows
        fsync_replace(self.tmp, self.folder / name)
        self.writer, self.rows, self.index = None, 0, self.index + 1
        return name, rows

    def abort(self) -> None:
        """Drop a half-written shard; its inputs are processed again on the next run."""
        if self.writer is not None:
            self.writer.close()
        self.tmp.unlink(missing_ok=True)
