"""Graceful stop: SIGTERM (preemption, `scancel`, `docker stop`) asks the loop to checkpoint and exit 0."""
from __future__ import annotations

import signal
import threading


class StopRequest:
    """A flag the signal handler sets; the loop reads it at step boundaries, never mid-step."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals, self.requested, self._previous = signals, False, {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers install only there
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.requested = True
