"""ae.background: work beside the trainer's thread, and its errors raised where it is waited for."""

import threading

import pytest

from ae.background import InBackground


def test_wait_returns_once_the_work_is_done():
    release, done = threading.Event(), []

    def work() -> None:
        release.wait(timeout=30)
        done.append(True)

    job = InBackground(work, "test-work")
    assert not job.done and done == []
    release.set()
    job.wait()
    assert job.done and done == [True] and job.seconds is not None


def test_an_error_in_the_background_is_raised_where_it_is_waited_for():
    def work() -> None:
        raise OSError(28, "No space left on device")

    job = InBackground(work, "test-work")
    with pytest.raises(OSError, match="No space left on device"):
        job.wait()
