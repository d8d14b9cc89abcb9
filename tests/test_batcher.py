"""The batcher on its own: gathering, per-job results, failure isolation, shutdown.

The batch function here is a plain deterministic function of each job (the model-backed behaviour is covered
in test_engine.py with the tiny checkpoints); it records the batches it saw so the gathering can be checked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from qwen_asr_worker.batcher import AsrBatcher, AsrJob


class Recorder:
    """A batch function: returns (language, f"{context}:{len}") per job, fails on a poisoned context."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, jobs: Sequence[AsrJob]) -> list[tuple[str, str]]:
        with self.lock:
            self.batches.append(len(jobs))
        time.sleep(self.delay)
        if any(job.context == "poison" for job in jobs):
            raise RuntimeError("poisoned job")
        return [(job.language or "", f"{job.context}:{len(job.samples)}") for job in jobs]


def _submit_together(batcher: AsrBatcher, n: int) -> list:
    return [batcher.submit(np.zeros(100 + i, np.float32), f"ctx{i}", "German" if i % 2 else None) for i in range(n)]


def test_jobs_arriving_together_share_a_batch() -> None:
    rec = Recorder(delay=0.05)
    batcher = AsrBatcher(rec, max_batch_size=8, window_s=0.2, name="t")
    futures = _submit_together(batcher, 6)
    results = [f.result(timeout=5) for f in futures]
    assert results == [("German" if i % 2 else "", f"ctx{i}:{100 + i}") for i in range(6)]
    assert rec.batches == [6]
    batcher.close()


def test_batch_size_is_capped() -> None:
    rec = Recorder(delay=0.05)
    batcher = AsrBatcher(rec, max_batch_size=3, window_s=0.2, name="t")
    results = [f.result(timeout=5) for f in _submit_together(batcher, 7)]
    assert len(results) == 7
    assert max(rec.batches) <= 3
    assert sum(rec.batches) == 7
    batcher.close()


def test_lone_job_is_not_held_much_longer_than_the_window() -> None:
    rec = Recorder()
    batcher = AsrBatcher(rec, max_batch_size=8, window_s=0.05, name="t")
    started = time.monotonic()
    batcher.submit(np.zeros(10, np.float32), "a", None).result(timeout=5)
    assert time.monotonic() - started < 1.0
    assert rec.batches == [1]
    batcher.close()


def test_a_burst_spread_over_more_than_one_window_shares_a_batch() -> None:
    """Jobs 0.1 windows apart, 12 of them: more than one window from first to last, never a window's gap."""
    rec = Recorder()
    window = 0.2
    batcher = AsrBatcher(rec, max_batch_size=16, window_s=window, name="t")
    futures = []
    for i in range(12):
        futures.append(batcher.submit(np.zeros(10, np.float32), f"j{i}", None))
        time.sleep(window / 10)
    assert [f.result(timeout=5)[1] for f in futures] == [f"j{i}:10" for i in range(12)]
    assert rec.batches == [12]
    batcher.close()


def test_a_steady_trickle_cannot_hold_the_first_job_forever() -> None:
    from qwen_asr_worker.batcher import MAX_WINDOWS

    rec = Recorder()
    window = 0.05
    batcher = AsrBatcher(rec, max_batch_size=1000, window_s=window, name="t")
    first = batcher.submit(np.zeros(10, np.float32), "first", None)
    started = time.monotonic()
    while not first.done() and time.monotonic() - started < 5:  # a job every 0.2 windows, for up to 5 s
        batcher.submit(np.zeros(10, np.float32), "more", None)
        time.sleep(window / 5)
    first.result(timeout=5)
    assert time.monotonic() - started < MAX_WINDOWS * window + 0.5
    assert rec.batches[0] >= 2  # the trickle did join the first batch before the cap cut it
    batcher.close()


def test_a_failing_job_fails_only_itself() -> None:
    rec = Recorder(delay=0.05)
    batcher = AsrBatcher(rec, max_batch_size=8, window_s=0.2, name="t")
    good = batcher.submit(np.zeros(5, np.float32), "good", None)
    bad = batcher.submit(np.zeros(5, np.float32), "poison", None)
    other = batcher.submit(np.zeros(7, np.float32), "other", None)
    assert good.result(timeout=5) == ("", "good:5")
    assert other.result(timeout=5) == ("", "other:7")
    with pytest.raises(RuntimeError, match="poisoned"):
        bad.result(timeout=5)
    assert rec.batches[0] == 3  # tried together first, then one by one
    batcher.close()


def test_cancelled_jobs_are_skipped() -> None:
    rec = Recorder(delay=0.2)
    batcher = AsrBatcher(rec, max_batch_size=1, window_s=0.0, name="t")
    first = batcher.submit(np.zeros(1, np.float32), "first", None)
    second = batcher.submit(np.zeros(1, np.float32), "second", None)
    assert second.cancel()
    assert first.result(timeout=5) == ("", "first:1")
    time.sleep(0.3)
    assert rec.batches == [1]
    batcher.close()


def test_close_drains_queue_and_rejects_new_jobs() -> None:
    rec = Recorder(delay=0.05)
    batcher = AsrBatcher(rec, max_batch_size=2, window_s=0.0, name="t")
    futures = _submit_together(batcher, 4)
    batcher.close()
    assert [f.result(timeout=5)[1] for f in futures] == [f"ctx{i}:{100 + i}" for i in range(4)]
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(np.zeros(1, np.float32), "late", None)


def test_audio_budget_keeps_long_windows_apart() -> None:
    rec = Recorder(delay=0.05)
    batcher = AsrBatcher(rec, max_batch_size=8, window_s=0.2, name="t", max_batch_samples=1000)
    long_jobs = [batcher.submit(np.zeros(900, np.float32), f"long{i}", None) for i in range(3)]
    short_jobs = [batcher.submit(np.zeros(100, np.float32), f"short{i}", None) for i in range(4)]
    assert [f.result(timeout=5)[1] for f in long_jobs] == ["long0:900", "long1:900", "long2:900"]
    assert [f.result(timeout=5)[1] for f in short_jobs] == [f"short{i}:100" for i in range(4)]
    assert rec.batches[:2] == [1, 1]  # each 900-sample job alone: two never fit in 1000
    assert sum(rec.batches) == 7
    batcher.close()
