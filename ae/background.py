"""Work that runs beside the trainer's thread: started at once, waited for where its result is needed.

Start-up builds parts that do not depend on each other; one of them (W&B's start: its import, its
service process, its run) mostly waits on another process, so it runs in a thread while the
trainer builds the rest. An exception in the thread is raised again in the thread that waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class InBackground:
    """`work()` in a daemon thread; `wait()` joins it and raises what it raised."""

    def __init__(self, work: Callable[[], None], name: str):
        self._work = work
        self._error: BaseException | None = None
        self.seconds: float | None = None  # how long the work took, once done
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            self._work()
        except BaseException as err:  # raised again in `wait`
            self._error = err
        finally:
            self.seconds = time.perf_counter() - started

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> float:
        """Block until the work is done; the seconds this call waited."""
        started = time.perf_counter()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return time.perf_counter() - started
