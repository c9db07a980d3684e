"""Known-bad package combinations, refused at start-up in one line instead of an ImportError deep in a traceback.

pip cannot express "transformers >= 5.24 needs peft >= 0.22" (peft is optional for transformers), so an
environment upgraded by hand can hold such a pair. The entry points call `check_versions()` before anything
imports transformers, diffusers or peft. constraints.txt (the lock) installs a set that passes; this guard is for
everyone who installs difftune into an environment of their own.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

from trainers.errors import UserError


@dataclass(frozen=True)
class Break:
    """`package` at `at_least` and above fails unless `needs` is at `needs_at_least` or above."""

    package: str
    at_least: str
    needs: str
    needs_at_least: str
    seen: str  # what goes wrong, in a few words

    def fix(self) -> str:
        return (f"pip install '{self.needs}>={self.needs_at_least}' if the index has it, else "
                f"pip install '{self.package}<{self.at_least}' (or reinstall with `make install`, which uses "
                "constraints.txt)")


KNOWN_BREAKS = (
    Break("transformers", "5.24", "peft", "0.22", "transformers' PEFT integration refuses older peft at import"),
)


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def as_tuple(version: str) -> tuple[int, ...]:
    """The release numbers of a version ("5.24.0rc1" -> (5, 24, 0)); enough to compare against the table's bounds."""
    from packaging.version import Version

    return Version(version).release


def problems(version_of=None) -> list[str]:
    """One sentence per known-bad combination present in this environment (or in `version_of`'s answers)."""
    version_of, found = version_of or installed_version, []
    for rule in KNOWN_BREAKS:
        have, need = version_of(rule.package), version_of(rule.needs)
        if have is None or need is None or as_tuple(have) < as_tuple(rule.at_least):
            continue
        if as_tuple(need) < as_tuple(rule.needs_at_least):
            found.append(f"{rule.package} {have} needs {rule.needs} >= {rule.needs_at_least} but {rule.needs} {need} "
                         f"is installed ({rule.seen}); fix: {rule.fix()}")
    return found


def check_versions() -> None:
    """Raise a UserError (exit 2, one line) when the environment holds a known-bad combination."""
    found = problems()
    if found:
        raise UserError("; ".join(found))
