"""Shared fixtures: tiny random checkpoints built offline, test audio, and an in-process server on port 0."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

import backend_pb2
import backend_pb2_grpc
from qwen_asr_worker.engine import Engine
from qwen_asr_worker.server import create_server
from qwen_asr_worker.testing.checkpoints import build_aligner_checkpoint, build_asr_checkpoint
from tests.audio_fixtures import tone, write_audio

SENTENCE = "Hello world. This is a test."
SENTENCE_WORDS = ["Hello", "world", "This", "is", "a", "test"]
CJK_SENTENCE = "你好世界。这是一个测试。"
# The stand-in audio of most tests (tones, noise with gaps) is not speech, so voice activity detection would
# rightly skip all of it. Those tests are about other things and run with it off; the VAD tests (test_vad.py)
# and the end-to-end tests use the real speech fixtures with it on, as users get it by default.
FAST = ["max_new_tokens:48", "batch_window_ms:5", "vad:off"]
SPEECH_DIR = Path(__file__).resolve().parent / "fixtures" / "speech"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints: an English model, a Chinese one, a silent one, and an aligner."""
    base = tmp_path_factory.mktemp("checkpoints")
    return {
        "asr": build_asr_checkpoint(base / "asr", sentence=SENTENCE, language="English"),
        "cjk": build_asr_checkpoint(base / "cjk", sentence=CJK_SENTENCE, language="Chinese"),
        "silent": build_asr_checkpoint(base / "silent", sentence=""),
        "aligner": build_aligner_checkpoint(base / "aligner"),
    }


@pytest.fixture(scope="session")
def audio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Test audio: 2 s of tone at 16 kHz (WAV) plus other formats and rates."""
    base = tmp_path_factory.mktemp("audio")
    files = {
        "wav": write_audio(base / "speech.wav", tone(2.0, 16000), 16000, "wav"),
        "long": write_audio(base / "long.wav", tone(30.0, 16000), 16000, "wav"),
    }
    empty = base / "empty.wav"
    empty.write_bytes(b"")
    files["empty"] = empty
    garbage = base / "garbage.mp3"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    files["garbage"] = garbage
    return files


@dataclass
class Harness:
    """An in-process server, a stub talking to it, and its engine."""

    stub: backend_pb2_grpc.BackendStub
    engine: Engine
    port: int

    def load(self, model: Path | str, *options: str, **fields: object) -> backend_pb2.Result:
        """LoadModel with the given options (plus the fast test defaults unless overridden)."""
        keys = {o.split(":", 1)[0] for o in options}
        merged = [*options, *(o for o in FAST if o.split(":", 1)[0] not in keys)]
        return self.stub.LoadModel(backend_pb2.ModelOptions(Model=str(model), Options=merged, **fields), timeout=120)

    def transcribe(self, path: Path | str, **fields: object) -> backend_pb2.TranscriptResult:
        """AudioTranscription of one file."""
        return self.stub.AudioTranscription(backend_pb2.TranscriptRequest(dst=str(path), **fields), timeout=120)

    def status(self) -> backend_pb2.StatusResponse:
        """Status."""
        return self.stub.Status(backend_pb2.HealthMessage(), timeout=10)


@contextmanager
def serving(max_workers: int = 32) -> Iterator[Harness]:
    """An in-process server on a free port and a connected stub; on exit the model is freed and the server
    stopped."""
    server, port, servicer = create_server("127.0.0.1:0", max_workers=max_workers)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=10)
    try:
        yield Harness(backend_pb2_grpc.BackendStub(channel), servicer.engine, port)
    finally:
        channel.close()
        servicer.engine.free()
        server.stop(0)


@pytest.fixture
def harness() -> Iterator[Harness]:
    """A fresh server and engine per test."""
    with serving() as served:
        yield served


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
