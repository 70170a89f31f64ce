"""Ctrl-C (SIGINT) and SIGTERM stop every tool within 2 s, at any moment, start-up included.

Each entry point calls `stop_on_signals` before its heavy imports (`python -m ae.TOOL` and
`python -m data_prep...` through their package's `__init__`, train.py on its first lines). Until the
tool's `main` runs (imports: nothing is written yet) a signal ends the process at once with one line.
Inside `main` (`ae.errors.friendly_errors` calls `raise_on_signals`) a signal raises `Interrupted`,
so `finally` blocks remove temporary files and folders the tool created; a watchdog ends the process
if that takes longer than `GRACE_S` (a thread stuck in C code, a worker pool). Exit status 128 + the
signal's number: 130 for SIGINT, 143 for SIGTERM. A second signal ends the process at once.

This module imports only the standard library's lightest parts: it runs before anything else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 1.5  # cleanup time after a signal before the watchdog exits (the limit is 2 s)


class Interrupted(BaseException):  # noqa: N818 (not an error: a request to stop)
    """Raised in the main thread by SIGINT/SIGTERM inside a tool's `main` (not caught by `except Exception`)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(_message(signum))


def _message(signum: int) -> str:
    return (
        f"interrupted by {signal.Signals(signum).name}: stopped; nothing half-written was kept "
        "(rerun the same command to start again)"
    )


def _say_and_exit(signum: int) -> None:
    try:
        os.write(2, f"error: {_message(signum)}\n".encode())
    finally:
        os._exit(128 + signum)


def _at_start_up(signum: int, _frame: object) -> None:
    """Before `main`: only imports have run, nothing was written; end now."""
    _say_and_exit(signum)


_stopping = threading.Event()


def _watchdog(signum: int) -> None:
    time.sleep(GRACE_S)
    _say_and_exit(signum)


def _in_main(signum: int, _frame: object) -> None:
    """Inside `main`: unwind (cleanup runs), bounded by the watchdog; a second signal ends it now."""
    stop_now(signum)


def stop_now(signum: int) -> None:
    """Raise `Interrupted` for `signum` in the main thread, with the watchdog (a handler's body)."""
    if _stopping.is_set():
        _say_and_exit(signum)
    _stopping.set()
    threading.Thread(target=_watchdog, args=(signum,), daemon=True, name="interrupt watchdog").start()
    raise Interrupted(signum)


def stop_on_signals() -> None:
    """Install the start-up handlers (main thread of a command-line process only)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _at_start_up)


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """Around a tool's `main`: signals raise `Interrupted`; once it is over they are ignored. A
    process that did not call `stop_on_signals` (a test calling `main` in-process) keeps its own."""
    changed = []
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            if signal.getsignal(sig) is _at_start_up:
                signal.signal(sig, _in_main)
                changed.append(sig)
    try:
        yield
    finally:  # `main` is over, its outcome stands: a signal now is ignored (also in the teardown,
        for sig in changed:  # where Python would otherwise restore the default action)
            if signal.getsignal(sig) is _in_main:
                signal.signal(sig, signal.SIG_IGN)


def started_as_module() -> bool:
    """True while `python -m PACKAGE.MODULE` imports PACKAGE (sys.argv[0] is "-m" until it is found)."""
    return sys.argv[:1] == ["-m"]
