"""The parent watch: a worker whose spawner dies exits by itself; `LOCALAI_BACKEND_PARENT_WATCH=false` keeps it.

The process tests start the real worker (run.sh) from a short-lived intermediate Python process, as LocalAI would
spawn it, then end the intermediate. While a test runs, the pytest process is a child subreaper (Linux), so the
orphaned worker is handed to us rather than to init: we can wait for it and read its exit code.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

import backend_pb2
import backend_pb2_grpc
from qwen_asr_worker import parent_watch
from qwen_asr_worker.parent_watch import DEFAULT_INTERVAL, MAX_INTERVAL, MIN_INTERVAL, parse_interval
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent

# --- parse_interval, enabled, start -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("200ms", 0.2),
        ("2s", 2.0),
        ("3", 3.0),
        ("1.5", 1.5),
        (".5s", 0.5),
        (" 2s\n", 2.0),
        ("500 ms", 0.5),
        ("2S", 2.0),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("15000us", 0.015),
        ("1500us", MIN_INTERVAL),
        ("1ns", MIN_INTERVAL),
        ("100000h", MAX_INTERVAL),
        ("9" * 400, MAX_INTERVAL),
    ],
)
def test_parse_interval(text: str, seconds: float) -> None:
    assert parse_interval(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "garbage", "-1", "-2s", "0", "0ms", "0s", "1x", "ms", "s", "1e3", "nan", "inf", "1.5.5s", "1ms5", "∞"]
)
def test_parse_interval_garbage_gives_the_default(text: str, caplog: pytest.LogCaptureFixture) -> None:
    assert parse_interval(text) == DEFAULT_INTERVAL
    if text:
        assert parent_watch.INTERVAL_ENV in caplog.text  # a typo is logged, not silently ignored


@pytest.mark.parametrize(
    ("value", "on"),
    [(None, True), ("", True), ("true", True), ("yes", True), ("false", False), ("0", False), (" OFF ", False)],
)
def test_enabled(monkeypatch: pytest.MonkeyPatch, value: str | None, on: bool) -> None:
    if value is None:
        monkeypatch.delenv(parent_watch.ENABLE_ENV, raising=False)
    else:
        monkeypatch.setenv(parent_watch.ENABLE_ENV, value)
    assert parent_watch.enabled() is on


def test_start_calls_back_once_when_the_parent_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(parent_watch.ENABLE_ENV, "true")
    monkeypatch.setenv(parent_watch.INTERVAL_ENV, "10ms")
    calls: list[int] = []
    # A parent pid read earlier that is no longer ours: the spawner died before the watch started.
    thread = parent_watch.start(lambda: calls.append(1), parent=os.getppid() + 1_000_000)
    assert thread is not None
    assert wait_until(lambda: bool(calls), timeout=5)
    thread.join(timeout=5)
    assert not thread.is_alive() and calls == [1]


def test_start_keeps_quiet_while_the_parent_lives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(parent_watch.ENABLE_ENV, "true")
    monkeypatch.setenv(parent_watch.INTERVAL_ENV, "10ms")
    called = threading.Event()
    thread = parent_watch.start(called.set)
    assert thread is not None and thread.is_alive()
    assert not called.wait(0.3)  # 30 looks at a living parent
    assert thread.is_alive()
    monkeypatch.setattr(parent_watch.os, "getppid", lambda: -1)  # now the parent "dies": the thread ends
    assert called.wait(5)
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_start_does_nothing_when_disabled_or_started_by_init(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(parent_watch.ENABLE_ENV, "false")
    assert parent_watch.start(lambda: None) is None
    monkeypatch.setenv(parent_watch.ENABLE_ENV, "true")
    assert parent_watch.start(lambda: None, parent=1) is None


# --- the real process ---------------------------------------------------------------------------------------------

_PR_SET_CHILD_SUBREAPER = 36

# Spawns the worker in its own session, prints its pid, and exits when told (a line on stdin), leaving it orphaned.
_INTERMEDIATE = """
import os, subprocess, sys
run_sh, addr, log = sys.argv[1:4]
with open(log, "w") as out:
    worker = subprocess.Popen([run_sh, "--addr", addr], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
print(worker.pid, flush=True)
sys.stdin.readline()
os._exit(0)
"""


@contextmanager
def _subreaper() -> Iterator[None]:
    """Make this process the reaper of orphaned descendants for the duration (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Orphan:
    """A worker started through run.sh by an intermediate process that exits on `release()`."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.addr = f"127.0.0.1:{_free_port()}"
        self.log = tmp_path / "worker.log"
        self.intermediate = subprocess.Popen(
            [sys.executable, "-c", _INTERMEDIATE, str(ROOT / "run.sh"), self.addr, str(self.log)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        assert self.intermediate.stdout is not None
        self.pid = int(self.intermediate.stdout.readline())
        self.status: int | None = None
        self.channel = grpc.insecure_channel(self.addr)
        self.stub = backend_pb2_grpc.BackendStub(self.channel)

    def output(self) -> str:
        """The worker's log so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def release(self) -> None:
        """End the intermediate: the worker's parent is gone."""
        assert self.intermediate.stdin is not None
        self.intermediate.stdin.write("\n")
        self.intermediate.stdin.close()
        assert self.intermediate.wait(timeout=30) == 0

    def exited(self) -> bool:
        """Whether the worker has exited (reaping it: it is our child once orphaned)."""
        if self.status is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not ours yet: the intermediate still lives
                return False
            if pid == self.pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status is not None

    def healthy(self) -> bool:
        """Whether Health answers."""
        try:
            return self.stub.Health(backend_pb2.HealthMessage(), timeout=2).message == b"OK"
        except grpc.RpcError:
            return False

    def close(self) -> None:
        """Kill whatever is left: the intermediate, and the worker if it is still there."""
        self.channel.close()
        if self.intermediate.poll() is None:
            self.intermediate.kill()
            self.intermediate.wait()
        if not self.exited():
            os.kill(self.pid, signal.SIGKILL)
            wait_until(self.exited, timeout=30)


@pytest.fixture
def orphan_env() -> dict[str, str]:
    """A quick watch, and none of the outer environment's settings for it."""
    return {parent_watch.ENABLE_ENV: "true", parent_watch.INTERVAL_ENV: "200ms"}


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses prctl and /proc (Linux)")


def test_worker_exits_when_its_parent_dies(tmp_path: Path, orphan_env: dict[str, str]) -> None:
    with _subreaper():
        worker = Orphan(tmp_path, orphan_env)
        try:
            assert wait_until(lambda: worker.healthy() or worker.exited(), timeout=120), worker.output()
            assert not worker.exited(), worker.output()  # a living parent is not mistaken for a dead one
            worker.release()
            started = time.monotonic()
            assert wait_until(worker.exited, timeout=15), worker.output()
            assert time.monotonic() - started < 15
            assert worker.status == 0, worker.output()
            assert "is gone; shutting down" in worker.output()
        finally:
            worker.close()


def test_worker_whose_parent_dies_during_startup_exits(tmp_path: Path, orphan_env: dict[str, str]) -> None:
    # The parent dies while the worker still imports torch: the watch must compare with the parent it had at
    # process start, not with whoever adopted it by the time the server is up.
    with _subreaper():
        worker = Orphan(tmp_path, orphan_env)
        try:
            assert wait_until(lambda: "starting:" in worker.output() or worker.exited(), timeout=60), worker.output()
            worker.release()
            assert wait_until(worker.exited, timeout=120), worker.output()
            assert worker.status == 0, worker.output()
            assert "is gone; shutting down" in worker.output()
        finally:
            worker.close()


def test_worker_keeps_running_with_the_watch_disabled(tmp_path: Path, orphan_env: dict[str, str]) -> None:
    with _subreaper():
        worker = Orphan(tmp_path, {**orphan_env, parent_watch.ENABLE_ENV: "false"})
        try:
            assert wait_until(lambda: worker.healthy() or worker.exited(), timeout=120), worker.output()
            worker.release()
            assert not wait_until(worker.exited, timeout=3)  # 15 intervals of 200 ms
            assert worker.healthy()
            assert "parent watch disabled" in worker.output()
            os.kill(worker.pid, signal.SIGTERM)
            assert wait_until(worker.exited, timeout=30), worker.output()
            assert worker.status == 0, worker.output()
        finally:
            worker.close()
