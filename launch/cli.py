"""Shared entry-point behaviour: a user error is one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import sys


def run_cli(main, *args) -> int:
    from trainers.errors import UserError
    from trainers.versions import check_versions

    try:
        check_versions()
        return main(*args) or 0
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def one_line(message: str) -> str:
    """The user's message alone, also when a DataLoader worker wrapped it in a traceback."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if "Original Traceback" in message and lines:
        return lines[-1].split("Error: ", 1)[-1]
    return " ".join(line.strip() for line in lines)
