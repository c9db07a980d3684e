"""Columnar sources: a saved Hugging Face dataset (`save_to_disk`) and plain parquet files, read as Arrow batches.

Both store an image as {"bytes", "path"} (the datasets Image feature), raw bytes, or a path string; reading
Arrow directly skips PIL decoding in the main process, which only hands bytes to the workers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from datasets_prep.items import Columns, SourceItem, text_value
from trainers.errors import UserError

BATCH_ROWS = 64  # rows materialised at a time: bounds memory to a few dozen encoded images


def needed_columns(available: list[str], columns: Columns, where: str) -> list[str]:
    """The columns to read, or a UserError naming the flag to fix and the columns that exist."""
    names = ", ".join(available)
    if columns.image not in available:
        raise UserError(f"--image-column: {columns.image!r} is not a column of {where} (columns: {names})")
    if columns.caption not in available and columns.require_caption:
        raise UserError(f"--caption-column: {columns.caption!r} is not a column of {where} (columns: {names}); "
                        "pass --caption-policy empty to prepare it without captions")
    return [c for c in (columns.image, columns.caption, columns.conditioning, columns.mask) if c in available]


def image_value(value, base: Path) -> bytes | Path | None:
    """bytes to hand on, or a Path (absolute, or relative to the source) when only a path is stored."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        return Path(value) if Path(value).is_absolute() else base / value
    return None


def row_item(key: str, path: str, row: dict, columns: Columns, base: Path) -> SourceItem:
    """One table row as an item; a missing image or a caption that is not text is reported, not dropped."""
    item = SourceItem(key, path, image=image_value(row.get(columns.image), base))
    caption = row.get(columns.caption)
    item.caption = text_value(caption) if isinstance(caption, (str, bytes, type(None))) else None
    item.conditioning = image_value(row.get(columns.conditioning), base)
    item.mask = image_value(row.get(columns.mask), base)
    if item.image is None:
        item.error = ("missing_file", f"{columns.image} is empty")
    elif item.caption is None and caption is not None:
        item.error = ("bad_metadata", f"{columns.caption} is {type(caption).__name__}, not text")
    return item


class SavedDataset:
    """A dataset written by `Dataset.save_to_disk` (or a DatasetDict: its train split), memory-mapped, not copied."""

    def __init__(self, root: Path, columns: Columns):
        import datasets

        try:
            dataset = datasets.load_from_disk(str(root))
        except Exception as error:  # datasets raises many types for a damaged folder
            raise UserError(f"--source: cannot load {root} as a saved Hugging Face dataset: {error}") from None
        if isinstance(dataset, datasets.DatasetDict):
            splits = list(dataset)
            if "train" not in dataset and len(splits) != 1:
                raise UserError(f"--source: {root} holds splits {', '.join(splits)} and none is 'train'; "
                                "save the split to prepare on its own")
            self.split = "train" if "train" in dataset else splits[0]
            dataset = dataset[self.split]
        else:
            self.split = None
        self.read = needed_columns(dataset.column_names, columns, str(root))
        self.dataset = dataset.with_format("arrow")  # raw {"bytes", "path"} structs, no PIL decode here
        self.root, self.columns = root, columns

    def describe(self) -> dict:
        return {"kind": "hf_dataset", "paths": [str(self.root)], "split": self.split, "rows": len(self.dataset)}

    def count(self) -> int | None:
        return len(self.dataset)

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        for first in range(start, len(self.dataset), BATCH_ROWS):
            rows = self.dataset[first:first + BATCH_ROWS].select(self.read).to_pylist()
            for offset, row in enumerate(rows):
                index = first + offset
                yield row_item(str(index), f"{self.root}[{index}]", row, self.columns, self.root)


class ParquetFiles:
    """Parquet files read in order, a row group at a time, skipping whole files and row groups on resume."""

    def __init__(self, paths: list[Path], columns: Columns, root: Path | None = None):
        import pyarrow.parquet as pq

        if not paths:
            raise UserError(f"--source: {root} holds no .parquet files")
        self.paths, self.columns, self.root = paths, columns, root
        self.metadata = []
        for path in paths:
            try:
                self.metadata.append(pq.read_metadata(path))
            except Exception as error:  # pyarrow raises ArrowInvalid or OSError for a damaged footer
                raise UserError(f"--source: cannot read {path} as parquet: {error}") from None
        self.read = [needed_columns(m.schema.to_arrow_schema().names, columns, str(p))
                     for m, p in zip(self.metadata, paths)]

    def describe(self) -> dict:
        return {"kind": "parquet", "paths": [str(self.root)] if self.root else [str(p) for p in self.paths],
                "files": len(self.paths), "rows": self.count()}

    def count(self) -> int | None:
        return sum(m.num_rows for m in self.metadata)

    def name(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if self.root else path.name

    def file_rows(self, k: int, start: int) -> Iterator[tuple[int, dict]]:
        """(row number, row) from `start` on, reading only from the row group that holds `start`."""
        import pyarrow.parquet as pq

        groups, number, offset = [], None, 0
        for g in range(self.metadata[k].num_row_groups):
            rows = self.metadata[k].row_group(g).num_rows
            if offset + rows > start:
                groups.append(g)
                number = offset if number is None else number
            offset += rows
        batches = pq.ParquetFile(self.paths[k]).iter_batches(BATCH_ROWS, row_groups=groups, columns=self.read[k])
        for batch in batches:
            for row in batch.to_pylist():
                if number >= start:
                    yield number, row
                number += 1

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        for k, path in enumerate(self.paths):
            rows = self.metadata[k].num_rows
            if start >= rows:
                start -= rows
                continue
            base = path.parent
            try:
                for number, row in self.file_rows(k, start):
                    key = f"{self.name(path)}:{number}"
                    yield row_item(key, key, row, self.columns, base)
            except Exception as error:  # a damaged page: report the file and go on with the next one
                yield SourceItem(self.name(path), str(path), error=("corrupt", f"parquet: {error}"))
            start = 0

