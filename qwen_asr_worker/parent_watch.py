"""Exit when the process that spawned us dies, so an orphaned worker does not hold memory and its port forever.

LocalAI spawns one worker per model; if LocalAI is killed, the worker's parent changes (to init or a subreaper).
`LOCALAI_BACKEND_PARENT_WATCH=false` turns this off; `LOCALAI_BACKEND_PARENT_WATCH_INTERVAL` (`500ms`, `2s`, or
plain seconds) sets how often to look.
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
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$")


def parse_interval(text: str) -> float:
    """`500ms` → 0.5, `2s` → 2.0, `3` → 3.0; anything else (or <= 0) → the default, logged."""
    match = _DURATION.match(text or "")
    if match:
        value = float(match.group(1)) / (1000.0 if match.group(2) == "ms" else 1.0)
        if value > 0:
            return value
    if text:
        log.warning("%s=%r is not a duration like 500ms or 2s; using %.1f s", INTERVAL_ENV, text, DEFAULT_INTERVAL)
    return DEFAULT_INTERVAL


def enabled() -> bool:
    """Whether the watch is on (default on)."""
    return os.environ.get(ENABLE_ENV, "true").strip().lower() not in ("false", "0", "no", "off")


def start(on_orphaned: Callable[[], None]) -> threading.Thread | None:
    """Start a daemon thread that calls `on_orphaned` once when the parent pid changes."""
    if not enabled():
        log.info("parent watch disabled by %s", ENABLE_ENV)
        return None
    interval = parse_interval(os.environ.get(INTERVAL_ENV, ""))
    parent = os.getppid()

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(interval):
            if os.getppid() != parent:
                log.warning("parent process %d is gone; shutting down", parent)
                on_orphaned()
                return

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread
