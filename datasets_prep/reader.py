"""Random access to a prepared dataset by global index, for a sampler that must resume mid-epoch exactly."""
from __future__ import annotations

import io
import json
from bisect import bisect_right
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from trainers.errors import UserError

RECORD_COLUMNS = ["key", "image", "caption", "width", "height", "original_width", "original_height",
                  "crop_top", "crop_left", "bucket", "sha256", "conditioning_image", "mask"]
LATER_COLUMNS = ("mask",)  # absent from shards written before they existed: read as null


def decode_image(data: bytes | None, mode: str = "RGB") -> Image.Image | None:
    """Stored bytes to a PIL image in `mode` (RGB; L for masks), fully loaded so the buffer can go."""
    if data is None:
        return None
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert(mode)


class PreparedDataset:
    """The shards of `prepare` as one indexable sequence: record(i) reads only the row group that holds row i.

    Index i maps to (shard, row group, row) through cumulative row counts from the parquet footers; the bucket
    column of every row is held in memory so a bucketed sampler can group indices without reading images.
    """

    def __init__(self, path, max_open_files: int = 64):
        self.root = Path(path)
        progress = self.root / "progress.json"
        if not progress.is_file():
            raise UserError(f"{self.root} is not a prepared dataset (no progress.json); "
                            "run `python -m datasets_prep prepare --source ... --out ...` first")
        state = json.loads(progress.read_text(encoding="utf-8"))
        if not state.get("finished"):
            raise UserError(f"{self.root} is an unfinished prepare; re-run the same prepare command to complete it")
        self.buckets = [tuple(b) for b in json.loads((self.root / "buckets.json").read_text())["buckets"]]
        self.files = [self.root / "shards" / entry["name"] for entry in state["shards"]]
        self.max_open_files = max_open_files
        self._index_row_groups()
        self._bucket = np.concatenate([pq.read_table(f, columns=["bucket"]).column("bucket").to_numpy()
                                       for f in self.files]) if self.files else np.zeros(0, np.int32)
        self._open: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._group: tuple[int, object] | None = None  # (global row group number, its table)
        self.masks = sum(entry.get("masks", 0) for entry in state["shards"])  # prepare counts them per shard

    def _index_row_groups(self) -> None:
        """First global row of every row group, and which shard and local group it is."""
        starts, where, total = [], [], 0
        for s, file in enumerate(self.files):
            meta = pq.read_metadata(file)
            for g in range(meta.num_row_groups):
                starts.append(total)
                where.append((s, g))
                total += meta.row_group(g).num_rows
        self._starts, self._where, self._len = starts, where, total

    def __len__(self) -> int:
        return self._len

    @property
    def has_masks(self) -> bool:
        return self.masks > 0

    def bucket_of(self, i: int) -> int:
        """Bucket index of row i, from memory: no I/O."""
        return int(self._bucket[i])

    @property
    def bucket_column(self) -> np.ndarray:
        """Bucket index of every row, (N,) int32, for a sampler that batches within buckets."""
        return self._bucket

    def _file(self, s: int) -> pq.ParquetFile:
        """Open shard s, keeping up to max_open_files open (least recently used closes first)."""
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        if len(self._open) >= self.max_open_files:
            self._open.popitem(last=False)[1].close()
        self._open[s] = pq.ParquetFile(self.files[s])
        return self._open[s]

    def _row_group(self, k: int):
        """Row group k as a table; the last one is kept, so reading a shard in order reads each group once."""
        if self._group is None or self._group[0] != k:
            s, g = self._where[k]
            file = self._file(s)
            names = file.schema_arrow.names
            table = file.read_row_group(g, columns=[c for c in RECORD_COLUMNS if c in names])
            for name in LATER_COLUMNS:
                if name not in names:
                    table = table.append_column(name, pa.nulls(table.num_rows, pa.binary()))
            self._group = (k, table)
        return self._group[1]

    def record(self, i: int, decode: bool = True) -> dict:
        """Row i with its image (and conditioning image, or None) decoded to RGB PIL images (or left as bytes)."""
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} records")
        i %= self._len
        k = bisect_right(self._starts, i) - 1
        row = {name: column[0] for name, column in self._row_group(k).slice(i - self._starts[k], 1).to_pydict().items()}
        if decode:
            row["image"] = decode_image(row["image"])
            row["conditioning_image"] = decode_image(row["conditioning_image"])
            row["mask"] = decode_image(row["mask"], "L")
        return row

    def shard_rows(self) -> list[tuple[Path, int]]:
        """(shard file, row count) in index order, for files that sit beside the shards row for row."""
        counts = [0] * len(self.files)
        for (s, _), start, end in zip(self._where, self._starts, [*self._starts[1:], self._len]):
            counts[s] += end - start
        return list(zip(self.files, counts))

    def __getstate__(self) -> dict:
        """Open files and the cached group stay behind when a DataLoader worker receives a copy."""
        state = dict(self.__dict__)
        state["_open"], state["_group"] = OrderedDict(), None
        return state
