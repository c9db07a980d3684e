"""Raw sources as streams of SourceItem, in a fixed order, so a resumed run can skip exactly what is done.

Four kinds are recognised (see `open_source`): a folder of images with same-stem `.txt`/`.caption` files, an
imagefolder with `metadata.jsonl`/`metadata.csv`, a saved Hugging Face dataset or parquet files
(datasets_prep.tables), and webdataset tar shards (datasets_prep.webdataset).
"""
from __future__ import annotations

import csv
import json
import os
from itertools import islice
from pathlib import Path
from typing import Iterator

from datasets_prep.items import Columns, Source, SourceItem, text_value
from trainers.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_SUFFIXES = (".txt", ".caption")  # first found wins


def sorted_walk(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """os.walk in sorted order without hidden folders, so the order is the same on every machine and run."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield Path(folder), sorted(files)


class CaptionFolder:
    """Images anywhere under a folder, each captioned by a same-stem .txt (or .caption) beside it."""

    def __init__(self, root: Path):
        self.root = root

    def describe(self) -> dict:
        return {"kind": "caption_folder", "paths": [str(self.root)]}

    def count(self) -> int | None:
        return None  # counting would walk the tree twice; the bar shows a rate instead

    def walk(self) -> Iterator[SourceItem]:
        for folder, files in sorted_walk(self.root):
            names = set(files)
            for name in files:
                path = folder / name
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                captions = [path.stem + s for s in CAPTION_SUFFIXES if path.stem + s in names]
                caption = folder / captions[0] if captions else None
                yield SourceItem(path.relative_to(self.root).as_posix(), str(path), image=path, caption=caption)

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        return islice(self.walk(), start, None)


class ImageFolder:
    """The Hugging Face imagefolder layout: metadata.jsonl or metadata.csv rows naming files relative to the root."""

    def __init__(self, root: Path, metadata: Path, columns: Columns):
        self.root, self.metadata, self.columns = root, metadata, columns

    def describe(self) -> dict:
        return {"kind": "imagefolder", "paths": [str(self.root)], "metadata": self.metadata.name}

    def count(self) -> int | None:
        if self.metadata.suffix != ".jsonl":
            return None
        with open(self.metadata, "rb") as f:
            return sum(1 for line in f if line.strip())

    def rows(self) -> Iterator[tuple[str, dict | None, str]]:
        """(where, row or None, problem); read with surrogateescape so a bad byte spoils one row, not the file."""
        with open(self.metadata, encoding="utf-8", errors="surrogateescape", newline="") as f:
            if self.metadata.suffix == ".csv":
                yield from self.csv_rows(f)
                return
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.metadata.name}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    yield where, None, f"not JSON: {error}"
                    continue
                yield where, row if isinstance(row, dict) else None, "not a JSON object"

    def csv_rows(self, f) -> Iterator[tuple[str, dict | None, str]]:
        """csv.DictReader rows; a malformed file cannot be read past the bad line, so it stops the run."""
        reader = csv.DictReader(f)
        try:
            for row in reader:
                yield f"{self.metadata.name}:{reader.line_num}", row, ""
        except csv.Error as error:
            raise UserError(f"{self.metadata}: line {reader.line_num}: {error}") from None

    def item(self, where: str, row: dict) -> SourceItem:
        """One metadata row as an item; a wrongly typed field is reported against its line."""
        name, caption = row.get("file_name"), row.get(self.columns.caption)
        conditioning = row.get(self.columns.conditioning) or None
        mask = row.get(self.columns.mask) or None
        if not isinstance(name, str) or not name:
            return SourceItem(where, where, error=("bad_metadata", f"{where}: no file_name"))
        item = SourceItem(name, str(self.root / name), image=self.root / name, caption=text_value(caption))
        for field, value in ((self.columns.caption, caption), (self.columns.conditioning, conditioning),
                             (self.columns.mask, mask)):
            if value is not None and not isinstance(value, str):
                item.error = ("bad_metadata", f"{where}: {field} is {type(value).__name__}, not text")
        if isinstance(conditioning, str):
            item.conditioning = self.root / conditioning
        if isinstance(mask, str):
            item.mask = self.root / mask
        return item

    def walk(self) -> Iterator[SourceItem]:
        for where, row, problem in self.rows():
            if row is None:
                yield SourceItem(where, where, error=("bad_metadata", problem))
            else:
                yield self.item(where, row)

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        return islice(self.walk(), start, None)


def folder_kind(root: Path) -> str | None:
    """What a plain folder holds, in priority order tar > parquet > images, in one walk."""
    found = set()
    for _, files in sorted_walk(root):
        suffixes = {Path(name).suffix.lower() for name in files}
        if ".tar" in suffixes:
            return "webdataset"
        found |= {"parquet"} if ".parquet" in suffixes else set()
        found |= {"images"} if suffixes & IMAGE_SUFFIXES else set()
    return "parquet" if "parquet" in found else "images" if found else None


def files_below(root: Path, suffix: str) -> list[Path]:
    """Every file with this suffix under root, sorted by relative path."""
    return [folder / n for folder, files in sorted_walk(root) for n in files if n.lower().endswith(suffix)]


def open_files(paths: list[Path], columns: Columns) -> Source:
    """Explicit files: all .tar or all .parquet."""
    from datasets_prep.tables import ParquetFiles
    from datasets_prep.webdataset import TarShards

    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"--source: no such file: {missing[0]}")
    suffixes = {p.suffix.lower() for p in paths}
    if suffixes == {".tar"}:
        return TarShards(paths, columns)
    if suffixes == {".parquet"}:
        return ParquetFiles(paths, columns)
    raise UserError(f"--source: files must be all .tar (webdataset) or all .parquet; got {', '.join(sorted(suffixes))}")


def open_source(paths: list[str], columns: Columns = Columns()) -> Source:
    """Recognise what --source names; anything else is a one-line UserError saying what was expected."""
    from datasets_prep.tables import ParquetFiles, SavedDataset
    from datasets_prep.webdataset import TarShards

    roots = [Path(p) for p in paths]
    if len(roots) > 1 or roots[0].is_file():
        return open_files(roots, columns)
    root = roots[0]
    if not root.is_dir():
        raise UserError(f"--source: no such file or folder: {root}")
    if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
        return SavedDataset(root, columns)
    for name in ("metadata.jsonl", "metadata.csv"):
        if (root / name).is_file():
            return ImageFolder(root, root / name, columns)
    kind = folder_kind(root)
    if kind == "webdataset":
        return TarShards(files_below(root, ".tar"), columns, root=root)
    if kind == "parquet":
        return ParquetFiles(files_below(root, ".parquet"), columns, root=root)
    if kind == "images":
        return CaptionFolder(root)
    raise UserError(f"--source: {root} is not a source prepare knows: expected images with .txt/.caption files, "
                    "metadata.jsonl/metadata.csv, a saved Hugging Face dataset, *.parquet or *.tar shards")
