"""Run configurations: a fresh worker per configuration, started the way LocalAI starts it, then gRPC.

Each configuration gets its own worker process (`run.sh --addr 127.0.0.1:PORT` on a free port), one LoadModel,
and one AudioTranscription per file, sent one at a time so the wall time per file is the time a lone request
takes. A fresh process per configuration is what makes its peak RSS mean something: within one process, memory
the previous configuration touched (allocator arenas, oneDNN caches, a bigger dtype) would count for the next.

Peak RSS is sampled with psutil while the configuration loads and runs; on Linux the kernel's exact high-water
mark (`VmHWM` in /proc/PID/status) is read too before the worker stops, and the larger of the two is reported.

A file the worker answers with a gRPC error is counted as failed, with the status and message, and the run goes
on. If the worker process itself dies, the configuration's remaining files are failed with its exit code (a
dead worker would otherwise fail each of them slowly), and the next configuration starts a new worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc
import psutil

import backend_pb2
import backend_pb2_grpc

from ..options import parse_options
from .data import Item
from .scoring import Score, score, unit_for

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
RUN_SH = ROOT / "run.sh"
HEALTH_TIMEOUT_S = 300.0  # the first start imports torch from a cold disk
LOAD_TIMEOUT_S = 3600.0  # a first LoadModel of a Hugging Face id downloads the weights
STOP_GRACE_S = 30.0
RSS_INTERVAL_S = 0.05
PROGRESS_INTERVAL_S = 5.0


class ConfigError(ValueError):
    """A configuration string is malformed or has an option the worker would reject."""


@dataclass(frozen=True)
class Config:
    """One set of LoadModel options; empty means the worker's defaults."""

    options: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The options as written on the command line, or `defaults`."""
        return ",".join(self.options) or "defaults"


def parse_configs(text: str) -> list[Config]:
    """`a:1; a:1,b:2; ` → configurations split at `;`, options at `,`; an empty piece is the defaults.

    Each configuration's options are checked with the worker's own parser, so a typo fails before any worker
    starts.

    Raises:
        ConfigError: an option is malformed, unknown, has a bad value, or two configurations are the same.
    """
    configs: list[Config] = []
    for piece in text.split(";"):
        options = tuple(part.strip() for part in piece.split(",") if part.strip())
        try:
            parse_options(options)
        except ValueError as exc:
            raise ConfigError(f"configuration '{piece.strip()}': {exc}") from None
        config = Config(options)
        if config in configs:
            raise ConfigError(f"configuration '{config.label}' is given twice")
        configs.append(config)
    return configs


@dataclass(frozen=True)
class FileResult:
    """One file under one configuration: the hypothesis and its score, or the error it failed with."""

    item: Item
    hypothesis: str = ""
    score: Score | None = None
    duration: float = 0.0
    wall_seconds: float = 0.0
    detected_language: str = ""
    error: str | None = None


@dataclass
class ConfigResult:
    """Everything measured for one configuration."""

    config: Config
    files: list[FileResult] = field(default_factory=list)
    peak_rss_bytes: int = 0
    load_seconds: float = 0.0
    load_error: str | None = None
    log_path: Path | None = None

    @property
    def failed(self) -> int:
        """Files that got no transcript."""
        return sum(1 for f in self.files if f.error is not None)

    @property
    def audio_seconds(self) -> float:
        """Audio transcribed (files that failed have no duration)."""
        return sum(f.duration for f in self.files if f.error is None)

    @property
    def transcription_seconds(self) -> float:
        """Wall time of the successful requests."""
        return sum(f.wall_seconds for f in self.files if f.error is None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def auth_metadata() -> list[tuple[str, str]]:
    """The bearer token the worker expects when LOCALAI_GRPC_AUTH_TOKEN is set (it inherits our environment)."""
    token = os.environ.get("LOCALAI_GRPC_AUTH_TOKEN", "")
    return [("authorization", f"Bearer {token}")] if token else []


class WorkerDied(RuntimeError):
    """The worker process exited while we still needed it."""


class RssSampler:
    """Samples a process's RSS in a background thread; `peak` is the largest seen (plus VmHWM where readable)."""

    def __init__(self, pid: int, interval: float = RSS_INTERVAL_S) -> None:
        self.pid = pid
        self.peak = 0
        self._process = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._process.memory_info().rss)
            except psutil.NoSuchProcess:
                return  # the worker is gone; the runner reports that
            self._stop.wait(self._interval)

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> int:
        """Stop sampling (call while the process still lives, to read its high-water mark) and return the peak."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _vm_hwm(self.pid))
        return self.peak


def _vm_hwm(pid: int) -> int:
    """Linux's lifetime peak RSS of `pid` in bytes; 0 where /proc is not there or the process is gone."""
    status = Path(f"/proc/{pid}/status")
    try:
        text = status.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class Worker:
    """The worker process started through run.sh on a free port, with a stub to it.

    Use as a context manager: entering waits for Health, leaving sends SIGTERM and waits (SIGKILL after
    `STOP_GRACE_S`). Its output goes to `log_path`.
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.addr = f"127.0.0.1:{_free_port()}"
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.stub: backend_pb2_grpc.BackendStub | None = None

    def __enter__(self) -> Worker:
        self._log = open(self.log_path, "wb")  # closed in __exit__
        # run.sh execs Python, so this pid is the worker's own (what psutil measures).
        self.proc = subprocess.Popen(
            [str(RUN_SH), "--addr", self.addr], stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.info("worker pid %d starting on %s (log: %s)", self.proc.pid, self.addr, self.log_path)
        # Replies of hour-long files may exceed gRPC's 4 MiB default; the worker allows up to 256 MiB.
        self.channel = grpc.insecure_channel(self.addr, options=[("grpc.max_receive_message_length", 256 << 20)])
        self.stub = backend_pb2_grpc.BackendStub(self.channel)
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in %.0f s; killing it", self.proc.pid, STOP_GRACE_S)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()

    @property
    def pid(self) -> int:
        """The worker's process id."""
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise `WorkerDied` (naming the exit code and the log) if the process has exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise WorkerDied(f"the worker exited with code {self.proc.returncode}; see {self.log_path}")

    def _wait_healthy(self) -> None:
        assert self.stub is not None
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if self.stub.Health(backend_pb2.HealthMessage(), timeout=2, metadata=auth_metadata()).message:
                    return
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.UNAUTHENTICATED:
                    raise WorkerDied(f"the worker refused our token: {exc.details()}") from None
                time.sleep(0.1)
        raise WorkerDied(f"the worker did not answer Health within {HEALTH_TIMEOUT_S:.0f} s; see {self.log_path}")


class Progress:
    """Files done out of total, elapsed and estimated time left, logged at most every `PROGRESS_INTERVAL_S`."""

    def __init__(self, label: str, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.total = total
        self._clock = clock
        self._start = clock()
        self._last = float("-inf")

    def update(self, done: int, failed: int) -> None:
        """Log progress if enough time passed since the last line, and always for the last file."""
        now = self._clock()
        if now - self._last < PROGRESS_INTERVAL_S and done < self.total:
            return
        self._last = now
        elapsed = now - self._start
        left = elapsed / done * (self.total - done) if done else float("nan")
        failures = f", {failed} failed" if failed else ""
        log.info(
            "[%s] %d/%d files%s, %s elapsed, ~%s left",
            self.label,
            done,
            self.total,
            failures,
            _clock_time(elapsed),
            _clock_time(left),
        )


def _clock_time(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing done yet to estimate from
        return "?"
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def transcribe_one(stub: backend_pb2_grpc.BackendStub, item: Item, timeout: float) -> FileResult:
    """One AudioTranscription of `item`, scored; a gRPC error becomes a failed `FileResult`."""
    request = backend_pb2.TranscriptRequest(dst=str(item.audio), language=item.language or "")
    started = time.perf_counter()
    try:
        reply = stub.AudioTranscription(request, timeout=timeout, metadata=auth_metadata())
    except grpc.RpcError as exc:
        return FileResult(item, error=f"{exc.code().name}: {exc.details()}")
    wall = time.perf_counter() - started
    unit = unit_for(item.reference, item.language)
    return FileResult(
        item,
        hypothesis=reply.text,
        score=score(item.reference, reply.text, unit),
        duration=reply.duration,
        wall_seconds=wall,
        detected_language=reply.language,
    )


def run_config(
    config: Config, model: str, items: Sequence[Item], log_path: Path, label: str, timeout: float
) -> ConfigResult:
    """Start a worker, load `model` with `config`, transcribe every item, stop the worker.

    A failed load or a worker that dies fails the files not yet done, with the reason; nothing is raised.
    """
    result = ConfigResult(config, log_path=log_path)

    def fail_rest(reason: str) -> None:
        result.files.extend(FileResult(item, error=reason) for item in items[len(result.files) :])

    try:
        with Worker(log_path) as worker:
            assert worker.stub is not None
            sampler = RssSampler(worker.pid)
            sampler.start()
            try:
                started = time.perf_counter()
                reply = worker.stub.LoadModel(
                    backend_pb2.ModelOptions(Model=model, Options=list(config.options)),
                    timeout=LOAD_TIMEOUT_S,
                    metadata=auth_metadata(),
                )
                result.load_seconds = time.perf_counter() - started
                if not reply.success:
                    result.load_error = f"LoadModel failed: {reply.message}"
                    log.error("[%s] %s", label, result.load_error)
                    fail_rest(result.load_error)
                    return result
                log.info("[%s] %s in %.1f s", label, reply.message, result.load_seconds)
                progress = Progress(label, len(items))  # from here, so the estimate is not skewed by the load
                for item in items:
                    file_result = transcribe_one(worker.stub, item, timeout)
                    result.files.append(file_result)
                    if file_result.error is not None:
                        log.warning("[%s] %s failed: %s", label, item.audio, file_result.error)
                        worker.check_alive()
                    progress.update(len(result.files), result.failed)
            finally:
                peak = sampler.stop()
                if result.load_error is None:  # a worker without a model says nothing about a configuration
                    result.peak_rss_bytes = peak
    except WorkerDied as exc:
        if result.load_error is None and not result.files:
            result.load_error = str(exc)
        log.error("[%s] %s", label, exc)
        fail_rest(str(exc))
    except grpc.RpcError as exc:  # LoadModel itself failed as a call (deadline, connection lost)
        result.load_error = f"LoadModel failed: {exc.code().name}: {exc.details()}"
        log.error("[%s] %s", label, result.load_error)
        fail_rest(result.load_error)
    return result
