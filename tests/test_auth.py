"""Bearer-token auth as LocalAI does it: with a token set, every rpc needs `authorization: Bearer <token>`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import backend_pb2
import backend_pb2_grpc
from qwen_asr_worker.auth import TOKEN_ENV, BearerTokenInterceptor
from qwen_asr_worker.server import create_server
from qwen_asr_worker.servicer import BackendServicer
from tests.audio_fixtures import tone
from tests.conftest import FAST, SENTENCE

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret"
GOOD = [("authorization", f"Bearer {TOKEN}")]

Metadata = list[tuple[str, str]]


def _rpcs(
    stub: backend_pb2_grpc.BackendStub, checkpoints: dict[str, Path], audio: dict[str, Path]
) -> dict[str, Callable[[Metadata], object]]:
    """Every rpc of the service, each called with the given metadata (the stream is drained)."""
    request = backend_pb2.TranscriptRequest(dst=str(audio["wav"]))
    health = backend_pb2.HealthMessage()
    load = backend_pb2.ModelOptions(Model=str(checkpoints["asr"]), Options=FAST)
    live = [
        backend_pb2.TranscriptLiveRequest(config=backend_pb2.TranscriptLiveConfig(language="en")),
        backend_pb2.TranscriptLiveRequest(audio=backend_pb2.TranscriptLiveAudio(pcm=tone(1.0, 16000)[:, 0].tolist())),
    ]
    return {
        "Health": lambda md: stub.Health(health, metadata=md, timeout=30),
        "LoadModel": lambda md: stub.LoadModel(load, metadata=md, timeout=120),
        "AudioTranscription": lambda md: stub.AudioTranscription(request, metadata=md, timeout=60),
        "AudioTranscriptionStream": lambda md: list(stub.AudioTranscriptionStream(request, metadata=md, timeout=60)),
        "AudioTranscriptionLive": lambda md: list(stub.AudioTranscriptionLive(iter(live), metadata=md, timeout=60)),
        "Status": lambda md: stub.Status(health, metadata=md, timeout=30),
        "Free": lambda md: stub.Free(health, metadata=md, timeout=30),
    }


RPC_NAMES = [
    "Health",
    "LoadModel",
    "AudioTranscription",
    "AudioTranscriptionStream",
    "AudioTranscriptionLive",
    "Status",
    "Free",
]


@dataclass
class Secured:
    """An in-process server with token auth on: a stub (which sends no metadata by itself) and its channel."""

    stub: backend_pb2_grpc.BackendStub
    channel: grpc.Channel
    servicer: BackendServicer


@pytest.fixture
def secured() -> Iterator[Secured]:
    """A fresh server with `token=TOKEN`."""
    server, port, servicer = create_server("127.0.0.1:0", max_workers=8, token=TOKEN)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Secured(backend_pb2_grpc.BackendStub(channel), channel, servicer)
    finally:
        channel.close()
        servicer.engine.free()
        server.stop(0)


@pytest.mark.parametrize("rpc", RPC_NAMES)
@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("authorization", "Bearer wrong")],
        [("authorization", TOKEN)],  # no scheme
        [("authorization", f"Basic {TOKEN}")],
        [("authorization", f"Bearer {TOKEN}x")],
        [("authorization", f"Bearer {TOKEN[:-1]}")],
        [("authorization", "Bearer ")],
        [("x-api-key", TOKEN)],
    ],
    ids=["none", "wrong", "no-scheme", "basic", "longer", "prefix", "empty", "other-header"],
)
def test_every_rpc_needs_the_token(
    secured: Secured, checkpoints: dict[str, Path], audio: dict[str, Path], rpc: str, metadata: Metadata
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _rpcs(secured.stub, checkpoints, audio)[rpc](metadata)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in info.value.details()
    assert secured.servicer.engine.current is None  # a rejected LoadModel loaded nothing


def test_the_right_token_opens_every_rpc(
    secured: Secured, checkpoints: dict[str, Path], audio: dict[str, Path]
) -> None:
    calls = _rpcs(secured.stub, checkpoints, audio)
    assert calls["Health"](GOOD).message == b"OK"
    assert calls["Status"](GOOD).state == backend_pb2.StatusResponse.UNINITIALIZED
    loaded = calls["LoadModel"](GOOD)
    assert loaded.success, loaded.message
    assert calls["AudioTranscription"](GOOD).text == SENTENCE
    messages = calls["AudioTranscriptionStream"](GOOD)
    assert messages[-1].final_result.text == SENTENCE
    live = calls["AudioTranscriptionLive"](GOOD)
    assert live[0].ready and live[-1].final_result.text == SENTENCE
    assert calls["Status"](GOOD).state == backend_pb2.StatusResponse.READY
    assert calls["Free"](GOOD).success
    assert secured.servicer.engine.current is None


def test_a_denied_request_does_not_disturb_the_next(
    secured: Secured, checkpoints: dict[str, Path], audio: dict[str, Path]
) -> None:
    calls = _rpcs(secured.stub, checkpoints, audio)
    assert calls["LoadModel"](GOOD).success
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as info:
            calls["AudioTranscription"]([("authorization", "Bearer nope")])
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert calls["AudioTranscription"](GOOD).text == SENTENCE


def test_token_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, checkpoints: dict[str, Path], audio: dict[str, Path]
) -> None:
    monkeypatch.setenv(TOKEN_ENV, f"  {TOKEN}\n")  # surrounding blanks from a shell or a YAML file are dropped
    server, port, _ = create_server("127.0.0.1:0", max_workers=4)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = backend_pb2_grpc.BackendStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Health(backend_pb2.HealthMessage(), timeout=30)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert stub.Health(backend_pb2.HealthMessage(), metadata=GOOD, timeout=30).message == b"OK"
    finally:
        channel.close()
        server.stop(0)


@pytest.mark.parametrize("value", [None, "", "   "])
def test_no_token_means_no_auth(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(TOKEN_ENV, value)
    server, port, _ = create_server("127.0.0.1:0", max_workers=4)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = backend_pb2_grpc.BackendStub(channel)
        assert stub.Health(backend_pb2.HealthMessage(), timeout=30).message == b"OK"
        # A client that sends a token to a server without one is still served.
        assert stub.Status(backend_pb2.HealthMessage(), metadata=GOOD, timeout=30).memory.total > 0
    finally:
        channel.close()
        server.stop(0)


def test_explicit_token_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    server, port, _ = create_server("127.0.0.1:0", max_workers=4, token=TOKEN)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = backend_pb2_grpc.BackendStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Health(backend_pb2.HealthMessage(), metadata=[("authorization", "Bearer from-env")], timeout=30)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert stub.Health(backend_pb2.HealthMessage(), metadata=GOOD, timeout=30).message == b"OK"
    finally:
        channel.close()
        server.stop(0)


def test_unknown_method_with_a_token_is_unimplemented(secured: Secured) -> None:
    call = secured.channel.unary_unary("/backend.Backend/Predict")  # LocalAI has it; this worker does not
    with pytest.raises(grpc.RpcError) as info:
        call(b"", metadata=GOOD, timeout=30)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_a_denied_call_is_refused_before_its_payload_is_parsed(secured: Secured) -> None:
    load = secured.channel.unary_unary(
        "/backend.Backend/LoadModel",
        request_serializer=lambda data: data,
        response_deserializer=backend_pb2.Result.FromString,
    )
    garbage = b"\x0a\x02\xff\xfe"  # Model = two bytes that are not UTF-8
    with pytest.raises(grpc.RpcError) as info:
        load(garbage, timeout=30)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    reply = load(garbage, metadata=GOOD, timeout=30)
    assert not reply.success and "does not parse" in reply.message


def test_an_empty_token_is_refused_by_the_interceptor() -> None:
    with pytest.raises(ValueError, match="empty token"):
        BearerTokenInterceptor("")


# --- end to end: the real process started by run.sh with the token in its environment ----------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_run_sh_with_a_token(checkpoints: dict[str, Path], audio: dict[str, Path], tmp_path: Path) -> None:
    addr = f"127.0.0.1:{_free_port()}"
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(ROOT / "run.sh"), "--addr", addr],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, TOKEN_ENV: TOKEN, "LOCALAI_BACKEND_PARENT_WATCH": "false"},
            start_new_session=True,
        )
    channel = grpc.insecure_channel(addr)
    stub = backend_pb2_grpc.BackendStub(channel)
    try:
        deadline = time.monotonic() + 120
        denied = None
        while denied is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                stub.Health(backend_pb2.HealthMessage(), timeout=2)
                raise AssertionError("Health answered without a token")
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.UNAUTHENTICATED:
                    denied = exc
                else:
                    time.sleep(0.1)  # not listening yet (the process imports torch first)
        assert stub.Health(backend_pb2.HealthMessage(), metadata=GOOD, timeout=10).message == b"OK"
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadModel(backend_pb2.ModelOptions(Model=str(checkpoints["asr"]), Options=FAST), timeout=60)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        loaded = stub.LoadModel(
            backend_pb2.ModelOptions(Model=str(checkpoints["asr"]), Options=FAST), metadata=GOOD, timeout=120
        )
        assert loaded.success, loaded.message
        request = backend_pb2.TranscriptRequest(dst=str(audio["wav"]))
        with pytest.raises(grpc.RpcError) as info:
            stub.AudioTranscription(request, metadata=[("authorization", "Bearer wrong")], timeout=60)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert stub.AudioTranscription(request, metadata=GOOD, timeout=60).text == SENTENCE

        # client.py sends the token from the same variable.
        client = [str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "client.py"), "--addr", addr, "status"]
        with_token = subprocess.run(
            client, env={**os.environ, TOKEN_ENV: TOKEN}, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert with_token.returncode == 0, with_token.stderr
        assert '"state": "READY"' in with_token.stdout
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        without = subprocess.run(client, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert without.returncode != 0
        assert "UNAUTHENTICATED" in without.stderr
    finally:
        channel.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
    assert code == 0, log.read_text()
