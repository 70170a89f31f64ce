"""Ctrl-C (SIGINT) and SIGTERM stop every tool within 2 s, at any moment, start-up included.

Each entry point calls `stop_on_signals` before its heavy imports (`python -m ae.TOOL` and
`python -m data_prep...` through their package's `__init__`, train.py on its first lines). Until the
tool's `main` runs (imports: nothing is written yet) a signal ends the process at once with one line.
Inside `main` (`ae.errors.friendly_errors` calls `raise_on_signals`) a signal raises `Interrupted`,
so `finally` blocks remove temporary files and folders the tool created; a watchdog ends the process
if that takes longer than `GRACE_S` (a thread stuck in C code, a worker pool). Exit status 128 + the
signal's number: 130 for SIGINT, 143 for SIGTERM. A second signal ends the process at once.

Python cannot raise out of every frame: a handler that runs inside a ctypes callback (numba's
compiler calls back into Python) or a `__del__` has its exception printed and dropped. Such a lost
`Interrupted` reaches `sys.unraisablehook`, which delivers the signal again, without a traceback, so
that it is raised at the next frame that can propagate it.

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
_dropped: list[int] = []  # the signal of a stop a frame dropped, until it is raised again
_dropped_lock = threading.Lock()  # no resend once the main thread has taken it
_in_hook = threading.Event()


def _deliver_dropped_stop(unraisable: sys.UnraisableHookArgs) -> None:
    """`sys.unraisablehook` inside `main`: an `Interrupted` that a frame could not propagate (a
    ctypes callback, a `__del__`) is sent again to the main thread; anything else is printed as usual."""
    stop = unraisable.exc_value
    if not isinstance(stop, Interrupted):
        sys.__unraisablehook__(unraisable)
        return
    _in_hook.set()  # a resent signal handled in here would be dropped again: it waits for the next
    try:
        with _dropped_lock:
            first = not _dropped
            _dropped[:] = [stop.signum]
        if first:
            threading.Thread(target=_resend, daemon=True, name="interrupt resend").start()
    finally:
        _in_hook.clear()


def _resend() -> None:
    """From another thread, so that the handler runs outside the frame that dropped the stop: send
    the signal to the main thread until a handler there has raised it (the watchdog bounds it)."""
    while True:
        while _in_hook.is_set():  # sent from in there, it would be taken there and wasted
            time.sleep(0.001)
        with _dropped_lock:
            if not _dropped:
                return
            signal.pthread_kill(threading.main_thread().ident, _dropped[0])
        time.sleep(0.01)


def _take_dropped_stop() -> int | None:
    """The signal of a dropped stop, now to be raised again (None: none, or not here in the hook)."""
    with _dropped_lock:
        if not _dropped or _in_hook.is_set():
            return None
        return _dropped.pop()


def _watchdog(signum: int) -> None:
    time.sleep(GRACE_S)
    _say_and_exit(signum)


def _in_main(signum: int, _frame: object) -> None:
    """Inside `main`: unwind (cleanup runs), bounded by the watchdog; a second signal ends it now."""
    stop_now(signum)


def stop_now(signum: int) -> None:
    """Raise `Interrupted` for `signum` in the main thread, with the watchdog (a handler's body)."""
    if _stopping.is_set() and _dropped:
        dropped = _take_dropped_stop()
        if dropped is None:
            return  # still in the hook that caught it: the next resend raises it
        raise Interrupted(dropped)  # the same stop again, after a frame dropped it
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
    previous_hook = sys.unraisablehook
    if changed:
        sys.unraisablehook = _deliver_dropped_stop
    try:
        yield
        dropped = _take_dropped_stop()
        if dropped is not None:  # dropped after main's last frame that could raise it: raise it here
            raise Interrupted(dropped)
    finally:  # `main` is over, its outcome stands: a signal now is ignored (also in the teardown,
        for sig in changed:  # where Python would otherwise restore the default action)
            if signal.getsignal(sig) is _in_main:
                signal.signal(sig, signal.SIG_IGN)
        sys.unraisablehook = previous_hook


def started_as_module() -> bool:
    """True while `python -m PACKAGE.MODULE` imports PACKAGE (sys.argv[0] is "-m" until it is found)."""
    return sys.argv[:1] == ["-m"]
