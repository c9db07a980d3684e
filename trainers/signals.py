"""Graceful stop: SIGTERM (preemption, `scancel`, `docker stop`), SIGUSR1 (Slurm's --signal) and a first
Ctrl-C ask the loop to finish its step, checkpoint and exit 0; a second Ctrl-C aborts at once."""
from __future__ import annotations

import signal
import threading

SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)


class StopRequest:
    """A flag the signal handlers set; the loop reads it at step boundaries, never mid-step."""

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
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
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait
        if self.requested:
            return  # a repeat (Slurm's wrapper re-sends until the trainers exit): said once
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then checkpointing "
              "(Ctrl-C again aborts without a checkpoint)", flush=True)
