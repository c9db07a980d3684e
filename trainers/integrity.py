"""What the trainer writes proves itself when read back: file digests, finite weights, and one line for a full disk.

A checkpoint's state.json records every file it holds with its size and a sha256 digest; `verify` checks them
(and that every floating tensor of weights.safetensors is finite) before anything is loaded, as backup tools
validate a checksum before a restore. `refuse_nonfinite` keeps NaN and inf out of every export and upload.
`disk_error` tells a full or read-only disk from a crash, so the save path can say so in one line.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from pathlib import Path

from trainers.errors import UserError

CHUNK = 1 << 20
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


class Damaged(Exception):
    """A checkpoint that fails its check; the message names the file and what is wrong."""


class DiskFull(UserError):
    """A save that the disk refused (no space, quota, read-only). Its own exit code, so a scheduler can tell it
    from a crash (74: EX_IOERR of sysexits.h); the README's troubleshooting section lists it."""

    exit_code = 74


def digest(path: Path) -> str:
    h = hashlib.sha256()  # hardware-accelerated (SHA-NI): twice blake2b's speed on the CI machine
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def record(folder: Path, skip: tuple[str, ...]) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file below `folder` but `skip` (the record's own file)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip)
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": digest(p)} for p in files}


def check_record(folder: Path, files: dict[str, dict]) -> None:
    """Raise Damaged at the first file that is missing, of another size, or of another digest."""
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise Damaged(f"{name} is missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise Damaged(f"{name} is {size} bytes, {expected['size']} were written (truncated?)")
        if digest(path) != expected["sha256"]:
            raise Damaged(f"{name} does not match the digest recorded when it was written (overwritten bytes?)")


def nonfinite_tensor(path: Path) -> str | None:
    """The name of the first floating tensor of a safetensors file holding NaN or inf; Damaged if unreadable."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    return key
    except Exception as error:  # safetensors raises its own error type for a cut or garbled file
        raise Damaged(f"{path.name} cannot be read as safetensors ({first_line(error)})") from None
    return None


def refuse_nonfinite(folder: Path, what: str, files: list[str] | None = None) -> None:
    """UserError (exit 2) naming the file and tensor if a safetensors file below `folder` (or of `files`, relative
    to it) holds NaN or inf."""
    paths = [Path(folder) / f for f in files] if files is not None else Path(folder).rglob("*.safetensors")
    for path in sorted(p for p in paths if p.name.endswith(".safetensors")):
        try:
            bad = nonfinite_tensor(path)
        except Damaged as error:
            raise UserError(f"{what}: {error}") from None
        if bad is not None:
            raise UserError(f"{what}: {path.relative_to(folder)} holds NaN or inf in tensor {bad}; nothing "
                            "non-finite is exported or pushed (resume from an earlier checkpoint, or lower optimizer.lr)")


def disk_error(error: BaseException, folder: Path | None = None, needed: int = 0) -> str | None:
    """What the disk refused ("No space left on device"), or None when `error` is not a disk error. safetensors
    reports OS errors inside its own message ("... Os { code: 28, ... }"), so that is read too; torch.save's zip
    writer loses the errno altogether ("unexpected pos ..."), so with `folder` a disk with less free space than the
    save needed counts as full."""
    if folder is not None and disk_error(error) is None:
        existing = next(p for p in (Path(folder).resolve(), *Path(folder).resolve().parents) if p.exists())
        if shutil.disk_usage(existing).free < needed:
            return os.strerror(errno.ENOSPC)
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
        return error.strerror or errno.errorcode.get(error.errno, str(error.errno))
    match = re.search(r"code: (\d+)", str(error))
    if match and int(match.group(1)) in DISK_ERRNOS:
        return os.strerror(int(match.group(1)))
    return None


def disk_full(what: str, folder: Path, needed: int, reason: str, newest: Path | None) -> DiskFull:
    """The one line for a refused save: where, how much is free, how much it needed, what is still intact."""
    existing = next(p for p in (Path(folder).resolve(), *Path(folder).resolve().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    intact = f"the newest intact checkpoint is {newest}" if newest else "no earlier checkpoint exists"
    return DiskFull(f"{what} not saved: {reason} in {folder} ({gib(free)} free, the save needed about {gib(needed)}); "
                    f"{intact}; free space or lower checkpoint.keep_last, then run again (resume: auto)")


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
