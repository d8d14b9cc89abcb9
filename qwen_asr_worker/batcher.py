"""Gather ASR jobs that arrive together into one batched model call.

LocalAI spawns one worker per model and sends it every user's request. Running them one by one leaves most of
the hardware idle; a batched forward pass costs little more than a single one. A job is one audio window with
its own context and language; one thread per loaded model takes the first waiting job, gathers up to
`max_batch_size - 1` more, runs them as one call and resolves each job's future with its own result.

Gathering stops once `window_s` passes without a new job. Each arrival restarts that wait, up to
`MAX_WINDOWS` windows in all: concurrent clients' requests reach the batcher spread over more than one short
window (decoding, gRPC threads on busy cores), and a fixed wait from the first arrival split such a burst in two
calls, while a lone request still waits only one window.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .prefill_cache import PassCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AsrJob:
    """One window to transcribe: 16 kHz mono samples, the prompt context and a forced language or None.

    A live session's job (`raw`) continues a transcript already finalized: `prefix` is the model's earlier raw
    output (`prefix_tokens` tokens long), placed after the prompt so that only the rest is decoded, and its
    result is `(language, prefix + the new raw output)` instead of `(language, text)`.
    """

    samples: np.ndarray
    context: str
    language: str | None
    prefix: str = ""
    prefix_tokens: int = 0
    raw: bool = False
    pass_cache: PassCache | None = field(default=None, compare=False)  # a live session's reusable work
    future: Future[tuple[str, str]] = field(default_factory=Future, compare=False)


RunBatch = Callable[[Sequence[AsrJob]], list[tuple[str, str]]]
MAX_WINDOWS = 5  # a burst may extend the gathering to this many windows; a steady trickle cannot hold it longer
_STOP = object()


class AsrBatcher:
    """A queue and one worker thread that runs queued `AsrJob`s in batches through `run_batch`.

    `run_batch` returns one `(language, text)` per job, in order. If a batched call fails, each job of that
    batch is retried alone, so one job the model chokes on fails only its own request. `max_batch_samples`
    caps the audio in one batch, so a long file's full-length windows run one after another (activation
    memory bounded by one window) while short concurrent clips still share a call.
    """

    def __init__(
        self, run_batch: RunBatch, *, max_batch_size: int, window_s: float, name: str, max_batch_samples: int = 0
    ) -> None:
        self._run_batch = run_batch
        self._max = max_batch_size
        self._window = window_s
        self._budget = max_batch_samples  # 0 = no limit on the audio in one batch
        self._carry: AsrJob | None = None  # a job that did not fit the last batch's budget goes first next time
        self._queue: queue.Queue[AsrJob | object] = queue.Queue()
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()  # how many batches of each size ran (tests, bench)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(
        self,
        samples: np.ndarray,
        context: str,
        language: str | None,
        *,
        prefix: str = "",
        prefix_tokens: int = 0,
        raw: bool = False,
        pass_cache: PassCache | None = None,
    ) -> Future[tuple[str, str]]:
        """Queue one window; the future resolves to `(language, text)` (with `raw`, `(language, raw output)`) or
        to the model's exception."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        job = AsrJob(samples, context, language, prefix, prefix_tokens, raw, pass_cache)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Finish the jobs already queued, then stop the thread (does not wait for it)."""
        self._closed = True
        self._queue.put(_STOP)

    def _gather(self, first: AsrJob) -> tuple[list[AsrJob], bool]:
        batch = [first]
        samples = len(first.samples)
        started = time.monotonic()
        deadline, limit = started + self._window, started + self._window * MAX_WINDOWS
        while len(batch) < self._max:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            assert isinstance(item, AsrJob)
            if self._budget and samples + len(item.samples) > self._budget:
                self._carry = item  # activation memory grows with the audio in a batch: keep it bounded
                break
            batch.append(item)
            samples += len(item.samples)
            deadline = min(time.monotonic() + self._window, limit)
        return batch, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            if self._carry is not None:
                item, self._carry = self._carry, None
            else:
                item = self._queue.get()
            if item is _STOP:
                break
            assert isinstance(item, AsrJob)
            batch, stop = self._gather(item)
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if batch:
                self._run(batch)

    def _run(self, batch: list[AsrJob]) -> None:
        self.batch_sizes[len(batch)] += 1
        try:
            results = self._run_batch(batch)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            log.warning("batched call of %d windows failed (%s); retrying each alone", len(batch), exc)
            for job in batch:
                self._run_one(job)
            return
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)

    def _run_one(self, job: AsrJob) -> None:
        try:
            (result,) = self._run_batch([job])
        except Exception as exc:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
