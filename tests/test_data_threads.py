"""A data thread that dies or stalls reaches its consumer as an error within seconds, never a hang.

Over a real beton and FFCV's real epoch thread; the faults are made on purpose (an unresolved CUDA
device, as Accelerate gives on one GPU, and errors or a stall patched into FFCV's pipeline step).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from ffcv.loader.epoch_iterator import EpochIterator

from ae import data
from ae.data import DataThreadError, FFCVBatches, _epoch_on_device_class
from ae.devices import with_index

CPU = torch.device("cpu")


def _loader(tiny_data):
    return FFCVBatches(tiny_data, 32, CPU, seed=0, workers=1).loader


@pytest.mark.timeout(30)
def test_an_unindexed_cuda_device_fails_the_consumer_not_hangs_it(tiny_data):
    """The issue's reproduction: the epoch thread built with torch.device("cuda") dies in set_device."""
    loader = _loader(tiny_data)
    iterator = _epoch_on_device_class()(loader, np.arange(256), torch.device("cuda"))
    with pytest.raises(DataThreadError, match="FFCV's data thread died.*specified index") as raised:
        next(iterator)
    assert isinstance(raised.value.__cause__, ValueError)
    iterator.close()


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_ffcvs_own_iterator_hangs_on_the_same_fault(tiny_data):
    """The control: FFCV's plain consumer is still blocked seconds after its thread died."""

    class Dying(EpochIterator):
        def run(self):
            torch.cuda.set_device(torch.device("cuda"))  # raises: no index

    iterator = Dying(_loader(tiny_data), np.arange(256))
    consumer = threading.Thread(target=lambda: next(iterator), daemon=True)
    consumer.start()
    consumer.join(3)
    assert not iterator.is_alive() and consumer.is_alive()  # thread dead, consumer still waiting
    iterator.close()


@pytest.mark.timeout(30)
def test_an_error_mid_epoch_reaches_the_training_loop(tiny_data, monkeypatch):
    """Batches queued before the failure are delivered, then the thread's error, as the cause."""
    cls = _epoch_on_device_class()
    real = cls.run_pipeline

    def failing(self, b_ix, *args):
        if b_ix == 2:
            raise OSError("the beton's disk went away")
        return real(self, b_ix, *args)

    monkeypatch.setattr(cls, "run_pipeline", failing)
    got = []
    with pytest.raises(DataThreadError, match="disk went away") as raised:
        for images in FFCVBatches(tiny_data, 32, CPU, seed=0, workers=1).epoch(0):
            got.append(images)
    assert len(got) == 2 and isinstance(raised.value.__cause__, OSError)


@pytest.mark.timeout(30)
def test_a_stalled_thread_is_an_error_after_the_batch_wait(tiny_data, monkeypatch):
    cls = _epoch_on_device_class()
    real = cls.run_pipeline
    release = threading.Event()

    def stalling(self, b_ix, *args):
        if b_ix == 1:
            release.wait(60)
        return real(self, b_ix, *args)

    monkeypatch.setattr(cls, "run_pipeline", stalling)
    monkeypatch.setattr(data, "BATCH_WAIT_S", 1.0)
    batches = FFCVBatches(tiny_data, 32, CPU, seed=0, workers=1).epoch(0)
    next(batches)
    started = time.monotonic()
    try:
        with pytest.raises(DataThreadError, match="no batch in 1 s: it is stuck"):
            next(batches)
        assert time.monotonic() - started < 10
    finally:
        release.set()
        batches.close()


def test_a_cuda_device_gets_its_index_in_the_calling_thread(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert with_index("cuda") == torch.device("cuda", 3)
    assert with_index(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert with_index("cpu") == CPU


def _stuck_decode(chunk):
    time.sleep(600)


@pytest.mark.timeout(60)
def test_a_stuck_decode_worker_is_an_error_not_a_hang(tmp_path, monkeypatch):
    """data_prep's worker processes: one alive but stuck fails the read after the chunk timeout."""
    from ae.errors import UserError
    from data_prep import sources

    monkeypatch.setattr(sources, "_decode_chunk", _stuck_decode)  # forked workers inherit it
    monkeypatch.setattr(sources, "DECODE_CHUNK_TIMEOUT_S", 1.0)
    with pytest.raises(UserError, match="it is stuck"):
        sources.decode_files([tmp_path / f"{i}.png" for i in range(10)], workers=2)
