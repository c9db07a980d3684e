"""Shared entry-point behaviour: a user error is one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import sys


def run_cli(main, *args) -> int:
    from trainers.errors import UserError

    try:
        return main(*args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
