"""Admission control: the worker keeps an account of the audio memory its requests and live sessions hold, and a
request that would take it past the budget waits in a bounded queue or is refused, instead of the process being
killed for running out of memory with every request in flight.

Each request is charged, before it decodes anything, what it can hold at most (`pipeline.request_bytes`: the
decoded audio kept in memory before it spills to a temporary file, the VAD's read-ahead, the windows queued for the
model); a live session is charged its utterance buffers (`live.session_bytes`). The charge is released when the
request ends, however it ends. Waiters are served first come, first served; a waiter whose client cancels leaves
the queue at once.

The budget is `audio_memory_mb` (a model option); by default a quarter of the memory the worker may use (the
machine's, or its container's limit where that is lower). `max_waiting_requests` bounds the queue; a request
past it, or one that could never fit, is refused with RESOURCE_EXHAUSTED naming the limit and the option.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import Cancelled, Overloaded

log = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_MAX_WAITING = 32
_POLL_S = 0.05
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def usable_memory_bytes() -> int:
    """The memory this process may use: physical memory, or the cgroup (container) limit where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for name in _CGROUP_LIMITS:
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_budget_bytes() -> int:
    """The audio memory budget with no `audio_memory_mb` option: a quarter of the usable memory."""
    return usable_memory_bytes() // 4


class AudioBudget:
    """An account of the audio memory held, with a first-come first-served queue of bounded length."""

    def __init__(self, limit_bytes: int | None = None, max_waiting: int = DEFAULT_MAX_WAITING) -> None:
        self._cond = threading.Condition()
        self._limit = default_budget_bytes() if limit_bytes is None else limit_bytes
        self._max_waiting = max_waiting
        self._held = 0
        self._holders = 0
        self._queue: deque[object] = deque()

    def configure(self, limit_bytes: int | None, max_waiting: int) -> None:
        """Set the budget (None: the default) and the queue's bound; holders keep what they hold."""
        with self._cond:
            self._limit = default_budget_bytes() if limit_bytes is None else limit_bytes
            self._max_waiting = max_waiting
            self._cond.notify_all()

    @property
    def limit_bytes(self) -> int:
        """The budget."""
        return self._limit

    @property
    def held_bytes(self) -> int:
        """What the requests and sessions in flight hold now."""
        return self._held

    @property
    def waiting(self) -> int:
        """How many wait for room."""
        return len(self._queue)

    @contextmanager
    def hold(self, nbytes: int, what: str, cancelled: Callable[[], bool]) -> Iterator[None]:
        """Hold `nbytes` of the budget for the block, waiting for room if needed.

        Raises:
            Overloaded: `nbytes` is more than the whole budget, or the queue is full.
            Cancelled: the client went away while waiting.
        """
        self._acquire(nbytes, what, cancelled)
        try:
            yield
        finally:
            with self._cond:
                self._held -= nbytes
                self._holders -= 1
                self._cond.notify_all()

    def _acquire(self, nbytes: int, what: str, cancelled: Callable[[], bool]) -> None:
        with self._cond:
            self._check_fits(nbytes, what)
            if not self._queue and self._held + nbytes <= self._limit:
                self._grant(nbytes)
                return
            if len(self._queue) >= self._max_waiting:
                raise Overloaded(
                    f"the worker is at its audio memory budget: {_mib(self._held)} of {_mib(self._limit)} held by "
                    f"{self._holders} requests and sessions, and {len(self._queue)} more wait (model options "
                    "audio_memory_mb and max_waiting_requests); retry later, or raise audio_memory_mb where the "
                    "machine has the memory"
                )
            ticket = object()
            self._queue.append(ticket)
            log.info("%s waits for %s of audio memory (%d waiting)", what, _mib(nbytes), len(self._queue))
            try:
                while not (self._queue[0] is ticket and self._held + nbytes <= self._limit):
                    self._check_fits(nbytes, what)  # a reload may have lowered the budget
                    if cancelled():
                        raise Cancelled("the client cancelled the request or its deadline passed while it waited")
                    self._cond.wait(_POLL_S)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()
            self._grant(nbytes)

    def _check_fits(self, nbytes: int, what: str) -> None:
        if nbytes > self._limit:
            raise Overloaded(
                f"{what} needs {_mib(nbytes)} of audio memory, more than the worker's whole budget of "
                f"{_mib(self._limit)} (model option audio_memory_mb); raise audio_memory_mb, or lower "
                "max_batch_seconds (files) or max_utterance_seconds (live sessions)"
            )

    def _grant(self, nbytes: int) -> None:
        self._held += nbytes
        self._holders += 1


def _mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.0f} MiB"
