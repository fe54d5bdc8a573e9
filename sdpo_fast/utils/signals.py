"""SIGINT/SIGTERM handled between steps: the first signal is remembered (the loop saves and stops), a second one
interrupts at once."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(Exception):
    """A run stopped by SIGINT/SIGTERM after saving what it could; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, EXIT_CODES.get(signum, 128 + signum)


class SignalFlag:
    """`received`: the first SIGINT/SIGTERM caught inside `deferred_signals()` (None before)."""

    def __init__(self) -> None:
        self.received: int | None = None


@contextlib.contextmanager
def deferred_signals() -> Iterator[SignalFlag]:
    """Within the block, SIGINT/SIGTERM set the flag instead of killing; a second one raises KeyboardInterrupt.
    Outside the main thread (where handlers cannot be installed) signals keep their default behaviour."""
    flag = SignalFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handle(signum, frame):
        if flag.received is not None:
            raise KeyboardInterrupt
        flag.received = signum

    previous = {sig: signal.signal(sig, handle) for sig in EXIT_CODES}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
