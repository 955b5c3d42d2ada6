"""Ctrl-C and SIGTERM turned into a call, for the runs that must stop cleanly (finish files, write summaries)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


class StopSignals:
    """While active in the main thread, SIGINT and SIGTERM call `on_signal(signum, count)` (count: how many came,
    this one included) instead of raising KeyboardInterrupt wherever the main thread happens to be (an exception
    raised inside a lock's wait corrupts the lock). The previous handlers come back on exit. Only the main thread can
    install handlers: elsewhere this does nothing."""

    def __init__(self, on_signal: Callable[[int, int], None]) -> None:
        self.on_signal = on_signal
        self.count = 0
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        self.count += 1
        self.on_signal(signum, self.count)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}
