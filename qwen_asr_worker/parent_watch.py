"""Exit when the process that spawned us dies, so an orphaned worker does not hold memory and its port forever.

LocalAI spawns one worker per model; if LocalAI is killed, the worker's parent changes (to init or a subreaper).
`LOCALAI_BACKEND_PARENT_WATCH=false` turns this off; `LOCALAI_BACKEND_PARENT_WATCH_INTERVAL` (a Go-style duration
such as `500ms`, `2s`, `1m`, `1m30s`, or plain seconds) sets how often to look.

The parent to watch must be read as early as possible: the worker spends seconds importing torch before it
serves, and a parent that dies in that time has already been replaced by init when the watch starts. `backend.py`
reads it first thing and passes it to `start`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

ENABLE_ENV = "LOCALAI_BACKEND_PARENT_WATCH"
INTERVAL_ENV = "LOCALAI_BACKEND_PARENT_WATCH_INTERVAL"
DEFAULT_INTERVAL = 1.0
MIN_INTERVAL = 0.01  # `1ns` is a valid Go duration, but polling that often would spin a core
MAX_INTERVAL = 3600.0  # and an Event.wait() beyond threading.TIMEOUT_MAX raises, killing the watch
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PART = re.compile(rf"({_NUMBER})(ns|us|µs|ms|s|m|h)")
_DURATION = re.compile(rf"^(?:{_NUMBER}(?:ns|us|µs|ms|s|m|h))+$")
_SECONDS = re.compile(rf"^{_NUMBER}$")


def parse_interval(text: str) -> float:
    """`500ms` → 0.5, `2s` → 2.0, `1m30s` → 90.0, `3` → 3.0 (Go durations, as LocalAI's other backends read
    this variable, or plain seconds); anything else (or <= 0) → the default, logged. Clamped to
    [`MIN_INTERVAL`, `MAX_INTERVAL`]."""
    value = -1.0
    raw = "".join((text or "").split()).lower()
    if _SECONDS.match(raw):
        value = float(raw)
    elif _DURATION.match(raw):
        value = sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(raw))
    if value > 0:
        return min(max(value, MIN_INTERVAL), MAX_INTERVAL)
    if text:
        log.warning("%s=%r is not a duration like 500ms or 2s; using %.1f s", INTERVAL_ENV, text, DEFAULT_INTERVAL)
    return DEFAULT_INTERVAL


def enabled() -> bool:
    """Whether the watch is on (default on)."""
    return os.environ.get(ENABLE_ENV, "true").strip().lower() not in ("false", "0", "no", "off")


def start(on_orphaned: Callable[[], None], parent: int | None = None) -> threading.Thread | None:
    """Start a daemon thread that calls `on_orphaned` once when our parent pid is no longer `parent`.

    `parent` is the pid read at process start (default: the current parent, which is already init when the
    spawner died before this call). Nothing is watched when the watch is disabled or when the worker was started
    by init itself (pid 1: there is no spawner to outlive).
    """
    if not enabled():
        log.info("parent watch disabled by %s", ENABLE_ENV)
        return None
    interval = parse_interval(os.environ.get(INTERVAL_ENV, ""))
    parent = os.getppid() if parent is None else parent
    if parent <= 1:
        log.info("started by init (parent pid %d): no parent to watch", parent)
        return None

    def watch() -> None:
        stop = threading.Event()
        while True:
            if os.getppid() != parent:
                log.warning("parent process %d is gone; shutting down", parent)
                on_orphaned()
                return
            stop.wait(interval)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread
