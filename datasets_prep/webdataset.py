"""Webdataset tar shards, read in place: members grouped by key, never extracted to disk, unsafe names refused."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from datasets_prep.items import Columns, SourceItem, text_value

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # first present wins
MAX_MEMBER_BYTES = 512 * 2**20  # a member is read into memory; anything larger is reported, not read


def split_name(name: str) -> tuple[str, str]:
    """Webdataset convention: the key is the path up to the first dot of the file name, the rest the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def unsafe(member: tarfile.TarInfo) -> str:
    """Why a member must not be used: an absolute or parent-relative name, or a link or device; '' if it is fine."""
    path = PurePosixPath(member.name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or member.name[1:3] == ":/":
        return f"unsafe member name {member.name!r}"
    if not member.isfile():
        return f"member {member.name!r} is a link or device, not a regular file"
    return ""


def groups(tar: tarfile.TarFile, tar_name: str) -> Iterator[tuple[str, dict] | SourceItem]:
    """(key, {extension: member}) per sample, members of one key being consecutive; refused members as SourceItems."""
    key, members = None, {}
    for member in tar:  # reads headers only: data is skipped by seeking until a sample is used
        if member.isdir():
            continue
        problem = unsafe(member)
        if problem:
            where = f"{tar_name}/{member.name}"
            yield SourceItem(where, where, error=("unsafe_member", problem))
            continue
        name_key, extension = split_name(member.name)
        if name_key != key and members:
            yield key, members
            members = {}
        key = name_key
        members.setdefault(extension, member)
    if members:
        yield key, members


def json_caption(data: bytes, columns: Columns) -> tuple[str | bytes | None, tuple[str, str] | None]:
    """(caption, error) from a .json member: --caption-column, else "caption", else "text"."""
    try:
        meta = json.loads(data)
    except UnicodeDecodeError:
        return data, None  # handed on as bytes, so the worker reports it as caption_not_utf8
    except json.JSONDecodeError as error:
        return None, ("bad_metadata", f".json member: {error}")
    if not isinstance(meta, dict):
        return None, ("bad_metadata", ".json member is not an object")
    for field in (columns.caption, "caption", "text"):
        if isinstance(meta.get(field), str):
            return text_value(meta[field]), None
    return None, None


class TarShards:
    """Tar files in order; a sample is one key's members: an image (jpg/png/webp) and a .txt or .json caption."""

    def __init__(self, paths: list[Path], columns: Columns, root: Path | None = None):
        self.paths, self.columns, self.root = paths, columns, root

    def describe(self) -> dict:
        paths = [str(self.root)] if self.root else [str(p) for p in self.paths]
        return {"kind": "webdataset", "paths": paths, "files": len(self.paths)}

    def count(self) -> int | None:
        return None  # knowing it means reading every header first

    def read(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
        """A member's bytes, in memory: extractfile() never touches the disk."""
        return tar.extractfile(member).read()

    def item(self, tar: tarfile.TarFile, key: str, members: dict) -> SourceItem:
        """Build one sample, reading only the members it uses."""
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        item = SourceItem(key, key)
        if image is None:
            item.error = ("no_image", f"members: {', '.join(sorted(members)) or 'none'}")
        elif image.size > MAX_MEMBER_BYTES:
            item.error = ("file_too_large", f"{image.name}: {image.size} bytes")
        else:
            item.image = self.read(tar, image)
        if "txt" in members:
            item.caption = self.read(tar, members["txt"])
        elif "json" in members:
            item.caption, error = json_caption(self.read(tar, members["json"]), self.columns)
            item.error = item.error or error
        conditioning = next((m for e, m in members.items() if e.startswith(self.columns.conditioning + ".")), None)
        if conditioning is not None and conditioning.size <= MAX_MEMBER_BYTES:
            item.conditioning = self.read(tar, conditioning)
        mask = next((m for e, m in members.items() if e.startswith(self.columns.mask + ".")), None)
        if mask is not None and mask.size <= MAX_MEMBER_BYTES:
            item.mask = self.read(tar, mask)
        return item

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        index = 0
        for path in self.paths:
            name = path.relative_to(self.root).as_posix() if self.root else path.name
            try:
                with tarfile.open(path, "r:*") as tar:
                    for entry in groups(tar, name):
                        if index >= start and isinstance(entry, SourceItem):
                            yield entry
                        elif index >= start:
                            yield self.item(tar, f"{name}/{entry[0]}", entry[1])
                        index += 1
            except (tarfile.TarError, OSError, EOFError) as error:  # a damaged tar: report it, go on with the next
                if index >= start:
                    yield SourceItem(name, str(path), error=("corrupt", f"tar: {error}"))
                index += 1
