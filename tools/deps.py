"""The lock of tested versions (constraints.txt): refresh it, or see what the newest versions would break.

    make lock          python tools/deps.py lock   newest versions pyproject.toml admits, installed in a scratch
                                                   venv, the suite run on them; constraints.txt is rewritten only
                                                   if the suite passes
    make test-latest   python tools/deps.py drift  the same install and suite; prints which packages moved and which
                                                   tests broke, never writes the lock, and exits 0 even when tests fail

torch is not locked: the Makefile's TORCH picks it (a CPU build here, CUDA where there is a GPU). Neither command
is part of .ci/run: they depend on what the index offers today, which is what the lock exists to keep out of CI.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
NOT_LOCKED_PREFIXES = ("nvidia-", "cuda-")  # torch's CUDA wheels: they follow TORCH, not the lock
NOT_LOCKED = {"torch", "triton", "difftune"}


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def lockable(name: str) -> bool:
    name = canonical(name)
    return name not in NOT_LOCKED and not name.startswith(NOT_LOCKED_PREFIXES)


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{canonical name: version} of every `name==version` line."""
    pins = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[canonical(name.strip())] = version.split(";", 1)[0].strip()
    return pins


def render_lock(pins: dict[str, str], torch: str, today: datetime.date) -> str:
    header = [
        "# The lock: the versions `make test` last passed with. The Makefile installs through it (pip -c).",
        f"# Written by `make lock` on {today.isoformat()}, CPython {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}, torch from '{torch}' (not locked).",
        "# Refresh: `make lock` (newest versions pyproject.toml admits; rewritten only if the suite passes).",
        "# See what the newest versions break without writing: `make test-latest`.",
    ]
    return "\n".join(header + [f"{name}=={pins[name]}" for name in sorted(pins)]) + "\n"


def drift_rows(locked: dict[str, str], latest: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """(package, locked, latest, change) for every package whose version differs, sorted by name."""
    rows = []
    for name in sorted(set(locked) | set(latest)):
        old, new = locked.get(name), latest.get(name)
        if old == new:
            continue
        change = "new" if old is None else "gone" if new is None else "moved"
        rows.append((name, old or "-", new or "-", change))
    return rows


def markdown_table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| package | locked | newest | change |", "|---|---|---|---|"]
    return "\n".join(lines + [f"| {' | '.join(row)} |" for row in rows])


def failed_tests(junit: Path) -> list[str]:
    """node ids of the failed and errored tests in a pytest junit XML report."""
    if not junit.is_file():
        return []
    failed = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return failed


class InstallFailed(Exception):
    pass


def pip(python: Path, *args: str) -> None:
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
        raise InstallFailed(f"pip install {' '.join(args)} failed: {' / '.join(last)}")


def fresh_venv(where: Path, torch: str) -> Path:
    """A new venv with the newest versions that pyproject.toml admits (and the machine's pip config allows)."""
    shutil.rmtree(where, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    python = where / "bin" / "python"
    step("upgrading pip and setuptools")
    pip(python, "--upgrade", "pip", "setuptools")
    step(f"installing {torch}")
    pip(python, torch)
    step("installing the project with the newest versions its ranges admit")
    pip(python, "-e", ".[dev]")
    return python


def installed(python: Path) -> dict[str, str]:
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    return {canonical(p["name"]): p["version"] for p in json.loads(listed) if lockable(p["name"])}


def run_suite(python: Path, junit: Path, pytest_args: list[str]) -> int:
    step("running the test suite on them (unlocked)")
    env = {**os.environ, "DIFFTUNE_UNLOCKED": "1"}
    workers = ["-n", os.environ.get("JOBS", "2")]  # as `make test`
    return subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           *workers, *pytest_args], cwd=ROOT, env=env).returncode


def capped(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """{name: specifier} of the direct dependencies pyproject.toml caps with an upper bound (torch aside)."""
    import re

    text = pyproject.read_text()
    deps = re.findall(r'^\s*"([A-Za-z0-9_.-]+)([^";]*)[^"]*",', text, flags=re.M)
    return {canonical(n): spec for n, spec in deps if "<" in spec and canonical(n) != "torch"}


def held_back(python: Path) -> list[tuple[str, str, str]]:
    """(package, range, newest on the index) for each cap that keeps the newest release out; a handful of
    look-ups, one per capped package."""
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # a bare interpreter: pip carries its own copy
        from pip._vendor.packaging.specifiers import SpecifierSet

    rows = []
    for name, spec in capped().items():
        answer = subprocess.run([str(python), "-m", "pip", "index", "versions", name], capture_output=True, text=True)
        first = answer.stdout.strip().splitlines()[:1]
        if answer.returncode or not first or "(" not in first[0]:
            continue
        newest = first[0].split("(", 1)[1].rstrip(")")
        if newest not in SpecifierSet(spec):
            rows.append((name, spec, newest))
    return rows


START = time.monotonic()


def step(message: str) -> None:
    print(f"[deps {time.monotonic() - START:6.0f}s] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["lock", "drift"])
    parser.add_argument("--torch", default=os.environ.get("TORCH", "torch==2.13.0"), help="what pip installs as torch")
    parser.add_argument("--venv", type=Path, help="scratch venv (default .cache/deps/MODE, rebuilt every time)")
    parser.add_argument("--lock", type=Path, default=LOCK)
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest, e.g. -x or tests/test_config.py")
    args = parser.parse_args(argv)
    where = args.venv or ROOT / ".cache" / "deps" / args.mode
    try:
        python = fresh_venv(where, args.torch)
    except (InstallFailed, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    latest, locked = installed(python), read_lock(args.lock)
    rows = drift_rows(locked, latest)
    code = run_suite(python, where / "junit.xml", args.pytest_args)
    failed = failed_tests(where / "junit.xml")
    print(f"\n## Newest versions against {args.lock.name}: {len(rows)} of {len(latest)} packages differ\n")
    print(markdown_table(rows) if rows else "(none: the lock is the newest set)")
    print(f"\n## Tests: {'passed' if code == 0 else f'{len(failed)} failed or errored (pytest exit {code})'}\n")
    for name in failed:
        print(f"- {name}")
    held = held_back(python)
    print(f"\n## Held back by pyproject.toml's caps: {len(held)}\n")
    for name, spec, newest in held:
        print(f"- {name}{spec}: the index has {newest} (lift the cap once its break is fixed, then `make lock`)")
    if args.mode == "drift":
        print(f"\ndrift check done in {time.monotonic() - START:.0f} s (not gating; the lock is unchanged)")
        return 0
    if code != 0:
        print(f"\nlock not written: the suite fails on the newest versions; {args.lock} is unchanged. Cap the package "
              "that broke in pyproject.toml (an upper bound for a known break), then run `make lock` again.")
        return 1
    args.lock.write_text(render_lock(latest, args.torch, datetime.date.today()))
    print(f"\nlock written: {args.lock} ({len(latest)} packages, {len(rows)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
