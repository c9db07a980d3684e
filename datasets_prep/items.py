"""What every raw source yields and how prepare names its columns: shared by the folder sources (sources.py),
tables.py and webdataset.py, which would otherwise import each other."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol


@dataclass
class SourceItem:
    """One input as the source holds it; paths are read by the worker, so the main process only walks the source.

    image / conditioning / mask: bytes, or a Path the worker reads; caption: text, raw bytes (decoded by the worker,
    which reports non-UTF-8), a Path to a caption file, or None when there is none. `error` is a
    (reason, detail) the source already found, e.g. a metadata line that does not parse.
    """

    key: str
    path: str
    image: bytes | Path | None = None
    caption: str | bytes | Path | None = None
    conditioning: bytes | Path | None = None
    mask: bytes | Path | None = None  # greyscale, white = the subject a masked loss weighs
    error: tuple[str, str] | None = None


@dataclass(frozen=True)
class Columns:
    """Which fields hold what, for sources with named columns (metadata files, datasets, parquet, json)."""

    image: str = "image"
    caption: str = "text"
    conditioning: str = "conditioning_image"
    mask: str = "mask"
    require_caption: bool = True  # a missing caption column is an error unless --caption-policy empty


class Source(Protocol):
    """What prepare needs from a source: a description for the report, a size for the bar, items from an offset."""

    def describe(self) -> dict: ...
    def count(self) -> int | None: ...
    def items(self, start: int = 0) -> Iterator[SourceItem]: ...


def text_value(value: str | None) -> str | bytes | None:
    """A caption read with surrogateescape goes back to its raw bytes, so the worker reports it as not UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape")
    return value
