"""Stopping a run early: a signal is a request; the ranks' agreement turns it into a stop.

`StopSignals` owns both halves. Its SIGUSR1/SIGTERM handlers only record the request (the
signal's name); a SIGTERM before the first step stops the run at once (nothing to save yet, so
no reason to keep a launcher or Slurm waiting). After every step with one process, and every `STOP_SYNC_EVERY` steps and at each
epoch's end with several, the ranks agree through one all-reduce (`ae.agreement.any_rank`): if any
of them was asked, every rank stops at that same step, checkpoints and exits. A rank never stops
on its own flag.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from accelerate import Accelerator

from ae.agreement import any_rank
from ae.interrupt import stop_now

STOP_SYNC_EVERY = 10  # steps between the ranks' agreement on a stop request (also at each epoch end)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignals:
    """The signal handlers (installed on creation, put back by `restore`) and the agreed stop."""

    def __init__(self, starting: Callable[[], bool] = lambda: False) -> None:
        """`starting`: is the run still starting (no step trained)? Then SIGTERM stops it at once."""
        self.requested: str | None = None  # a signal this process received: a request only
        self.reason: str | None = None  # agreed by every rank: all of them stop at this step
        self._starting = starting
        self._previous = {sig: signal.signal(sig, self._request) for sig in STOP_SIGNALS}

    def _request(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGTERM and self._starting():
            stop_now(signum)  # nothing trained to save yet: stop at once (exit 143, ae.interrupt)
        self.request(signum)

    def request(self, signum: int) -> None:
        """Record a stop request as the signal `signum` would (also the hidden stop-at-step hook's way in)."""
        if not self.requested:
            self.requested = signal.Signals(signum).name
            print(
                f"[cae-train] {self.requested} received: stopping at the next agreed step with a checkpoint",
                flush=True,
            )

    def agree_if_due(self, accelerator: Accelerator, step: int, steps_per_epoch: int) -> None:
        """At an agreement point, every rank sets `reason` if any rank was asked to stop."""
        due = accelerator.num_processes == 1 or step % STOP_SYNC_EVERY == 0 or step % steps_per_epoch == 0
        if due and not self.reason and any_rank(accelerator, self.requested is not None):
            self.reason = self.requested or "a signal to another rank"

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
