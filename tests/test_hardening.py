"""Hardening: LocalAI integration guards, hostile and broken input, and faults while requests are in flight.

Every hostile request must get the right status and a message that says what is wrong, and the next valid
request must still work. Tests that only read (bad input, valid variety) share one server with the English model
loaded (`served`); tests that load, free or break models get a fresh `harness`.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf

import backend
import backend_pb2
from qwen_asr_worker import server as server_module
from qwen_asr_worker.server import create_server
from qwen_asr_worker.servicer import MAX_PROMPT_CHARS
from tests.audio_fixtures import tone, write_audio
from tests.conftest import CJK_SENTENCE, SENTENCE, SENTENCE_WORDS, Harness, serving, wait_until

NS = 1_000_000_000
MiB = 1024 * 1024
READY = backend_pb2.StatusResponse.READY
BUSY = backend_pb2.StatusResponse.BUSY
# Longest status message we accept: Python gRPC clients drop trailers over 8 KiB (soft) / 16 KiB (hard).
MAX_DETAILS = 4096


def _error(call: Callable[[], object]) -> grpc.RpcError:
    """Run `call`, which must fail with a gRPC status; return the error."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _words(result: backend_pb2.TranscriptResult) -> list[str]:
    return [w.text for seg in result.segments for w in seg.words]


@pytest.fixture(scope="module")
def served(checkpoints: dict[str, Path]) -> Iterator[Harness]:
    """One server for the read-only tests, with the English model and the aligner configured."""
    with serving(max_workers=16) as harness:
        result = harness.load(checkpoints["asr"], f"forced_aligner:{checkpoints['aligner']}")
        assert result.success, result.message
        yield harness


def _still_serves(harness: Harness, audio: dict[str, Path]) -> None:
    assert harness.transcribe(audio["wav"]).text == SENTENCE


# --- LocalAI integration: binding, message limits, files only, model identity --------------------------------------


def test_default_address_is_loopback() -> None:
    assert backend.parse_args([]).addr == "127.0.0.1:50051"
    assert backend.parse_args(["--addr", "127.0.0.1:7"]).addr == "127.0.0.1:7"


def test_message_size_limits_are_set(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    real = grpc.server

    def spy(*args: object, **kwargs: object) -> grpc.Server:
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(server_module.grpc, "server", spy)
    server, _port, _ = create_server("127.0.0.1:0", max_workers=2)
    server.stop(0)
    options = dict(seen["options"])  # type: ignore[arg-type]
    assert options["grpc.max_receive_message_length"] == 16 * MiB
    assert options["grpc.max_send_message_length"] == 256 * MiB


def test_requests_over_grpcs_default_4_mib_reach_the_servicer(served: Harness, audio: dict[str, Path]) -> None:
    big = 5 * MiB  # over gRPC's default receive limit, under ours: the servicer answers, not the transport
    error = _error(lambda: served.transcribe(audio["wav"], prompt="x" * big))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"prompt is {big} characters" in error.details()
    _still_serves(served, audio)


def test_requests_over_16_mib_are_refused_by_the_transport(served: Harness, audio: dict[str, Path]) -> None:
    error = _error(lambda: served.transcribe(audio["wav"], prompt="x" * (17 * MiB)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    _still_serves(served, audio)


@pytest.fixture
def listener() -> Iterator[tuple[int, Callable[[], int]]]:
    """A local TCP port and a function counting the connections made to it."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.05)
    hits = [0]
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            hits[0] += 1
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1], lambda: hits[0]
    stop.set()
    thread.join()
    sock.close()


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{port}/a.wav",
        "https://127.0.0.1:{port}/a.wav",
        "HTTP://127.0.0.1:{port}/a.wav",
        "ftp://127.0.0.1:{port}/a.wav",
        "rtmp://127.0.0.1:{port}/live",
        "tcp://127.0.0.1:{port}",
        "file:///etc/passwd",
        "data:audio/wav;base64,UklGRiQAAABXQVZFZm10IBAAAAABAAEAgD4AAAB9AAACABAAZGF0YQAAAAA=",
        "DATA:,hello",
    ],
)
@pytest.mark.parametrize("rpc", ["unary", "stream"])
def test_urls_and_data_uris_are_refused_and_never_fetched(
    served: Harness, audio: dict[str, Path], listener: tuple[int, Callable[[], int]], template: str, rpc: str
) -> None:
    port, hits = listener
    request = backend_pb2.TranscriptRequest(dst=template.format(port=port))
    if rpc == "unary":
        error = _error(lambda: served.stub.AudioTranscription(request, timeout=60))
    else:
        error = _error(lambda: list(served.stub.AudioTranscriptionStream(request, timeout=60)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "local file path, not a URL or data URI" in error.details()
    assert hits() == 0
    _still_serves(served, audio)


def test_ffmpeg_protocol_prefixes_are_plain_paths(
    served: Harness, audio: dict[str, Path], listener: tuple[int, Callable[[], int]], tmp_path: Path
) -> None:
    port, hits = listener
    for dst in (f"concat:{audio['wav']}|{audio['wav']}", f"subfile:,start,0,end,0,:{audio['wav']}", "pipe:0"):
        error = _error(lambda dst=dst: served.transcribe(dst))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "not found" in error.details()
    playlist = f"#EXTM3U\n#EXTINF:1,\nhttp://127.0.0.1:{port}/seg.ts\n#EXT-X-ENDLIST\n"
    path = tmp_path / "upload.m3u8"
    path.write_text(playlist)
    assert _error(lambda: served.transcribe(path)).code() is grpc.StatusCode.INVALID_ARGUMENT
    assert hits() == 0
    _still_serves(served, audio)


def test_model_identity(harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path]) -> None:
    name = str(checkpoints["asr"])
    assert harness.load(name).success
    for identity in ("another-model", name + "x", name.upper(), " " + name):
        request = backend_pb2.TranscriptRequest(dst=str(audio["wav"]), ModelIdentity=identity)
        for call in (
            lambda r=request: harness.stub.AudioTranscription(r, timeout=60),
            lambda r=request: list(harness.stub.AudioTranscriptionStream(r, timeout=60)),
        ):
            error = _error(call)
            assert error.code() is grpc.StatusCode.NOT_FOUND
            assert "model identity mismatch" in error.details()
            assert repr(identity) in error.details() and repr(name) in error.details()
    assert harness.transcribe(audio["wav"], ModelIdentity=name).text == SENTENCE
    assert harness.transcribe(audio["wav"], ModelIdentity="").text == SENTENCE
    stream = list(harness.stub.AudioTranscriptionStream(backend_pb2.TranscriptRequest(dst=str(audio["wav"]))))
    assert stream[-1].final_result.text == SENTENCE
    assert harness.status().state == READY  # the refused requests left no slot behind
    assert harness.engine.current is not None and harness.engine.current.users == 0


def test_model_identity_unchecked_when_the_load_named_no_model(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path]
) -> None:
    assert harness.load("", ModelFile=str(checkpoints["asr"])).success
    assert harness.transcribe(audio["wav"], ModelIdentity="whatever").text == SENTENCE


def test_model_identity_follows_the_latest_load(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path]
) -> None:
    assert harness.load(checkpoints["asr"]).success
    assert harness.load(checkpoints["cjk"]).success
    error = _error(lambda: harness.transcribe(audio["wav"], ModelIdentity=str(checkpoints["asr"])))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert harness.transcribe(audio["wav"], ModelIdentity=str(checkpoints["cjk"])).text == CJK_SENTENCE


# --- hostile and broken files -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Broken, hostile and unusual-but-valid files."""
    base = tmp_path_factory.mktemp("hostile")
    ok = write_audio(base / "ok.wav", tone(2.0), 16000, "wav")
    rng = np.random.default_rng(7)
    made: dict[str, Path] = {"missing": base / "missing.wav"}
    (base / "folder.wav").mkdir()
    made["directory"] = base / "folder.wav"
    made["empty"] = base / "empty.wav"
    made["empty"].write_bytes(b"")
    made["zero-samples"] = base / "zero.wav"
    with sf.SoundFile(str(made["zero-samples"]), "w", 16000, 1, "PCM_16", format="WAV"):
        pass
    made["header-only"] = base / "header.wav"
    made["header-only"].write_bytes(ok.read_bytes()[:44])  # the header promises 2 s; no data follows
    made["cut-header"] = base / "cut-header.wav"
    made["cut-header"].write_bytes(ok.read_bytes()[:20])
    for ext in ("wav", "mp3", "m4a", "webm", "ogg", "flac"):
        made[f"random.{ext}"] = base / f"random.{ext}"
        made[f"random.{ext}"].write_bytes(rng.bytes(8192))
    made["text.txt"] = base / "notes.txt"
    made["text.txt"].write_text("hello, this is not audio\n" * 100)
    made["text.wav"] = base / "notes.wav"
    made["text.wav"].write_text("hello, this is not audio\n" * 100)
    for name, value, subtype, rate in (("nan", np.nan, "FLOAT", 16000), ("inf", np.inf, "DOUBLE", 22050)):
        samples = tone(1.0, rate)[:, 0].copy()
        samples[100] = value
        made[name] = base / f"{name}.wav"
        sf.write(str(made[name]), samples, rate, subtype=subtype)
    made["-inf-stereo"] = base / "ninf.wav"
    stereo = tone(1.0, 16000, channels=2)
    stereo[5, 1] = -np.inf
    sf.write(str(made["-inf-stereo"]), stereo, 16000, subtype="FLOAT")
    made["link-to-dev-zero"] = base / "zero-link.wav"
    made["link-to-dev-zero"].symlink_to("/dev/zero")
    # Valid but unusual.
    made["single-sample"] = base / "one.wav"
    sf.write(str(made["single-sample"]), np.array([0.25], np.float32), 16000, subtype="PCM_16")
    made["truncated-data"] = base / "truncated.wav"
    data = ok.read_bytes()
    made["truncated-data"].write_bytes(data[: 44 + (len(data) - 44) // 2])  # header says 2 s, 1 s is there
    made["odd-name"] = base / "ünïcødé 音声 file (1).wav"
    shutil.copy(ok, made["odd-name"])
    return made


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("missing", "audio file not found"),
        ("directory", "is a directory"),
        ("empty", "is empty (0 bytes)"),
        ("zero-samples", "contains no audio samples"),
        ("header-only", "contains no audio samples"),
        ("cut-header", "could not decode"),
        ("random.wav", "could not decode"),
        ("random.mp3", "could not decode"),
        ("random.m4a", "could not decode"),
        ("random.webm", "could not decode"),
        ("random.ogg", "could not decode"),
        ("random.flac", "could not decode"),
        ("text.txt", "has no audio stream"),
        ("text.wav", "could not decode"),
        ("nan", "NaN or infinite samples"),
        ("inf", "NaN or infinite samples"),
        ("-inf-stereo", "NaN or infinite samples"),
        ("link-to-dev-zero", "not a regular file"),
    ],
)
@pytest.mark.parametrize("granularity", [[], ["word"]])
def test_bad_files(
    served: Harness,
    files: dict[str, Path],
    audio: dict[str, Path],
    name: str,
    fragment: str,
    granularity: list[str],
) -> None:
    error = _error(lambda: served.transcribe(files[name], timestamp_granularities=granularity))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in error.details()
    assert str(files[name]) in error.details()  # names the file
    _still_serves(served, audio)


@pytest.mark.parametrize(
    ("dst", "fragment"),
    [
        ("/dev/zero", "not a regular file"),
        ("/dev/urandom", "not a regular file"),
        ("/dev/null", "not a regular file"),
        ("/proc/self/status", "is empty"),
        ("/tmp/a\x00b.wav", "embedded null byte"),
        ("/tmp/" + "a" * 5000 + ".wav", "invalid audio path"),
        ("   ", "not found"),
    ],
)
def test_bad_paths(served: Harness, audio: dict[str, Path], dst: str, fragment: str) -> None:
    error = _error(lambda: served.transcribe(dst))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in error.details()
    _still_serves(served, audio)


@pytest.mark.parametrize(
    "field",
    [
        "dst",
        "granularity",
    ],
)
def test_huge_inputs_get_a_short_message(served: Harness, audio: dict[str, Path], field: str) -> None:
    huge = "/nonexistent/" + "a" * 100_000
    fields: dict[str, object] = {"timestamp_granularities": [huge]} if field == "granularity" else {}
    error = _error(lambda: served.transcribe(huge if field == "dst" else audio["wav"], **fields))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.details()) <= MAX_DETAILS
    _still_serves(served, audio)


@pytest.mark.parametrize(
    ("name", "seconds"),
    [("single-sample", 1 / 16000), ("truncated-data", 1.0), ("odd-name", 2.0)],
)
def test_unusual_valid_files(served: Harness, files: dict[str, Path], name: str, seconds: float) -> None:
    result = served.transcribe(files[name])
    assert result.text == SENTENCE
    assert result.duration == pytest.approx(seconds, abs=1e-3)
    timed = served.transcribe(files[name], timestamp_granularities=["word"])
    assert _words(timed) == SENTENCE_WORDS
    for seg in timed.segments:
        assert 0 <= seg.start <= seg.end <= round(timed.duration * NS) + 1


@pytest.fixture(scope="module")
def variety(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int, int], Path]:
    """Writes (once) 1.5 s of tone as a WAV with the given sample format, rate and channel count."""
    base = tmp_path_factory.mktemp("variety")

    def make(subtype: str, rate: int, channels: int) -> Path:
        path = base / f"{subtype}-{rate}-{channels}.wav"
        if not path.exists():
            sf.write(str(path), tone(1.5, rate, channels), rate, subtype=subtype)
        return path

    return make


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_sample_formats(served: Harness, variety: Callable[[str, int, int], Path], subtype: str) -> None:
    result = served.transcribe(variety(subtype, 16000, 1))
    assert result.text == SENTENCE
    assert result.duration == pytest.approx(1.5, abs=1e-3)


@pytest.mark.parametrize("channels", range(1, 9))
def test_channel_counts(served: Harness, variety: Callable[[str, int, int], Path], channels: int) -> None:
    result = served.transcribe(variety("PCM_16", 16000, channels))
    assert result.text == SENTENCE
    assert result.duration == pytest.approx(1.5, abs=1e-3)


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 32000, 44100, 48000, 88200, 96000, 192000])
def test_sample_rates(served: Harness, variety: Callable[[str, int, int], Path], rate: int) -> None:
    result = served.transcribe(variety("PCM_24", rate, 2))
    assert result.text == SENTENCE
    assert result.duration == pytest.approx(1.5, abs=1e-3)


def test_three_hours_of_audio(harness: Harness, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """A 3-hour 8 kHz 8-bit WAV of silence (86 MB): decoded, cut into windows and transcribed, in bounded time."""
    path = tmp_path / "three-hours.wav"
    rate, seconds = 8000, 3 * 3600
    block = np.zeros((rate * 600, 1), np.float32)
    with sf.SoundFile(str(path), "w", rate, 1, "PCM_U8", format="WAV") as out:
        for _ in range(seconds // 600):
            out.write(block)
    try:
        assert harness.load(checkpoints["asr"], "max_new_tokens:8").success
        result = harness.stub.AudioTranscription(backend_pb2.TranscriptRequest(dst=str(path)), timeout=240)
        assert result.duration == pytest.approx(seconds)
        windows = harness.engine.current.windows_transcribed
        assert seconds / 180 <= windows <= seconds / 175 + 1  # windows of at most 180 s, cut in the last 5 s
        cut = "Hello world. This is a"  # 8 new tokens cut the sentence
        assert result.text == " ".join([cut] * windows)
        assert len(result.segments) == 1 and result.segments[0].end == seconds * NS
        assert harness.status().state == READY
    finally:
        path.unlink(missing_ok=True)


# --- hostile request fields ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "language", ["xx", "klingon", "en-", "zz-ZZ", "english!", "\x00", "en\x00", "🙂", "x" * 1_000_000]
)
def test_languages_that_do_not_exist(served: Harness, audio: dict[str, Path], language: str) -> None:
    error = _error(lambda: served.transcribe(audio["wav"], language=language))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "unsupported language" in error.details() and "en (English)" in error.details()
    assert len(error.details()) <= MAX_DETAILS
    _still_serves(served, audio)


@pytest.mark.parametrize("granularities", [["char"], ["words"], [""], ["word", "token"], ["\x00"]])
def test_granularities_that_do_not_exist(served: Harness, audio: dict[str, Path], granularities: list[str]) -> None:
    error = _error(lambda: served.transcribe(audio["wav"], timestamp_granularities=granularities))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown timestamp granularity" in error.details() and "'word' and/or 'segment'" in error.details()
    _still_serves(served, audio)


def test_prompt_cap(served: Harness, audio: dict[str, Path]) -> None:
    assert served.transcribe(audio["wav"], prompt="p" * MAX_PROMPT_CHARS).text == SENTENCE
    for size in (MAX_PROMPT_CHARS + 1, 1024 * 1024):
        error = _error(lambda size=size: served.transcribe(audio["wav"], prompt="p" * size))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert f"prompt is {size} characters; at most {MAX_PROMPT_CHARS}" in error.details()
    _still_serves(served, audio)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ([":"], "has no key"),
        (["key:"], "has no value"),
        ([":value"], "has no key"),
        (["no-colon"], "is not of the form key:value"),
        (["  :  "], "has no key"),
        (["max_new_tokens:"], "has no value"),
        (["max_new_tokens:lots"], "bad value 'lots' for option 'max_new_tokens'"),
        (["max_new_tokens:1e9"], "bad value '1e9'"),
        (["max_segment_seconds:nan"], "bad value 'nan'"),
        (["chunk_seconds:inf"], "bad value 'inf'"),
        (["ключ:значение"], "unknown option 'ключ'"),
        (["\x00:\x00"], "unknown option"),
        (["torch_dtype:fp32", "dtype:bf16"], "given twice"),
    ],
)
def test_garbage_options_fail_the_load_and_keep_the_model(
    served: Harness, audio: dict[str, Path], checkpoints: dict[str, Path], options: list[str], fragment: str
) -> None:
    before = served.engine.current
    result = served.load(checkpoints["cjk"], *options)
    assert not result.success
    assert fragment in result.message
    assert served.engine.current is before
    assert served.status().state == READY
    _still_serves(served, audio)


def _raw(harness: Harness, method: str) -> Callable[..., object]:
    channel = grpc.insecure_channel(f"127.0.0.1:{harness.port}")
    return channel.unary_unary(
        f"/backend.Backend/{method}", request_serializer=lambda data: data, response_deserializer=lambda data: data
    )


def test_non_utf8_options_fail_the_load_with_a_message(
    served: Harness, audio: dict[str, Path], checkpoints: dict[str, Path]
) -> None:
    body = backend_pb2.ModelOptions(Model=str(checkpoints["cjk"]), Options=["@@"]).SerializeToString()
    reply = backend_pb2.Result.FromString(_raw(served, "LoadModel")(body.replace(b"@@", b"\xff\xfe"), timeout=60))
    assert not reply.success
    assert "UTF-8" in reply.message
    assert served.engine.current is not None and served.engine.current.spec.name == str(checkpoints["asr"])
    _still_serves(served, audio)


@pytest.mark.parametrize(
    "body",
    [b"\x12\x02\xff\xfe", b"\x12\x80", b"\xff\xff\xff\xff", b"\x12\x05ab"],
    ids=["non-utf8-dst", "truncated-length", "bad-tag", "short-field"],
)
def test_unparseable_transcription_requests(served: Harness, audio: dict[str, Path], body: bytes) -> None:
    error = _error(lambda: _raw(served, "AudioTranscription")(body, timeout=60))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse" in error.details()
    _still_serves(served, audio)


# --- LoadModel failures -------------------------------------------------------------------------------------------


@pytest.fixture
def bad_models(tmp_path: Path, checkpoints: dict[str, Path]) -> dict[str, Path]:
    """Model directories that are not Qwen3-ASR checkpoints."""
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert", "hidden_size": 768}')
    not_json = tmp_path / "not-json"
    not_json.mkdir()
    (not_json / "config.json").write_text("{model_type: qwen3_asr")
    a_list = tmp_path / "a-list"
    a_list.mkdir()
    (a_list / "config.json").write_text("[1, 2, 3]")
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(checkpoints["asr"], no_weights)
    for weights in no_weights.glob("*.safetensors"):
        weights.unlink()
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"\0" * 64)
    return {
        "a-file": a_file,
        "empty": empty,
        "bert": bert,
        "not-json": not_json,
        "a-list": a_list,
        "binary": binary,
        "no-weights": no_weights,
    }


@pytest.mark.parametrize(
    ("model", "fields", "fragment"),
    [
        ("/nonexistent/model", {}, "does not exist"),
        ("empty", {}, "has no config.json"),
        ("bert", {}, "is a bert checkpoint, not Qwen3-ASR"),
        ("not-json", {}, "config.json is unreadable"),
        ("a-list", {}, "config.json is not a JSON object"),
        ("binary", {}, "config.json is unreadable"),
        ("no-weights", {}, "failed to load model"),
        ("ALIGNER", {}, "is a Qwen3-ForcedAligner, not a Qwen3-ASR model"),
        ("a-file", {}, "is a file"),
        ("ASR", {"CUDA": True}, "no CUDA GPU is available"),
        ("ASR", {"Options": ["device:cuda"]}, "no CUDA GPU is available"),
        ("ASR", {"Options": ["device:cuda:3"]}, "no CUDA GPU is available"),
        ("ASR", {"DType": "int4"}, "bad value 'int4' for option 'torch_dtype'"),
    ],
)
def test_load_failures_keep_the_previous_model(
    harness: Harness,
    checkpoints: dict[str, Path],
    bad_models: dict[str, Path],
    audio: dict[str, Path],
    model: str,
    fields: dict[str, object],
    fragment: str,
) -> None:
    import torch

    if torch.cuda.is_available() and "CUDA" in fragment:
        pytest.skip("this machine has a GPU")
    target = {"ASR": checkpoints["asr"], "ALIGNER": checkpoints["aligner"], **bad_models}.get(model, model)
    assert harness.load(checkpoints["asr"]).success
    before = harness.engine.current
    fields = dict(fields)
    options = fields.pop("Options", [])
    result = harness.load(target, *options, **fields)  # type: ignore[misc]
    assert not result.success
    assert fragment in result.message
    assert harness.engine.current is before
    assert harness.status().state == READY
    _still_serves(harness, audio)
    assert harness.load(checkpoints["cjk"]).success  # and a good load still works
    assert harness.transcribe(audio["wav"]).text == CJK_SENTENCE


@pytest.mark.parametrize("model", ["~no-such-user-here/model", "~\x00/model"])
def test_load_model_answers_with_a_result_for_any_name(
    harness: Harness, audio: dict[str, Path], checkpoints: dict[str, Path], model: str
) -> None:
    assert harness.load(checkpoints["asr"]).success
    result = harness.load(model)
    assert not result.success and result.message
    _still_serves(harness, audio)


def test_threads_are_capped_at_the_cpus(
    harness: Harness, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # record only: the real call is process-wide
    assert harness.load(checkpoints["asr"], Threads=100_000).success
    assert all(1 <= n <= len(os.sched_getaffinity(0)) for n in calls), calls


def test_threads_within_the_cpus_are_applied(
    harness: Harness, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert harness.load(checkpoints["asr"], Threads=1).success
    assert harness.load(checkpoints["asr"], Threads=0).success  # 0: LocalAI's "unset", leaves torch alone
    assert calls == [1]


# --- faults and load: cancellation, reload and free with requests in flight ---------------------------------------


def _slow(harness: Harness, checkpoints: dict[str, Path], tokens: int = 2000, *extra: str) -> None:
    """Load a model whose requests take seconds (generation runs to max_new_tokens, ~1-2 ms a token here), in
    bf16, so that any load during a fault test also switches torch's default dtype (see torch_state)."""
    options = (f"max_new_tokens:{tokens}", f"forced_aligner:{checkpoints['aligner']}", "torch_dtype:bf16", *extra)
    result = harness.load(checkpoints["asr"], *options)
    assert result.success, result.message


def _busy(harness: Harness, future: grpc.Future) -> None:
    assert wait_until(lambda: harness.status().state == BUSY or future.done(), timeout=30)
    assert not future.done(), "the request finished before the worker was seen busy"


def _ready(harness: Harness) -> bool:
    return harness.status().state == READY


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_client_that_goes_away_frees_its_slot(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path], how: str
) -> None:
    # 2500 tokens: at least 2.5 s (the fast decode path takes about 1 ms a token here), past the 1-s deadline.
    _slow(harness, checkpoints, tokens=2500)
    request = backend_pb2.TranscriptRequest(dst=str(audio["long"]))
    future = harness.stub.AudioTranscription.future(request, timeout=120 if how == "cancel" else 1.0)
    _busy(harness, future)
    if how == "cancel":
        assert future.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            future.result()
    else:
        assert _error(future.result).code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: _ready(harness), timeout=30)
    model = harness.engine.current
    assert model is not None and model.users == 0
    assert harness.transcribe(audio["wav"]).text == SENTENCE
    assert harness.status().state == READY


def test_a_cancelled_stream_frees_its_slot(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path]
) -> None:
    _slow(harness, checkpoints, tokens=1000)
    call = harness.stub.AudioTranscriptionStream(backend_pb2.TranscriptRequest(dst=str(audio["long"])), timeout=120)
    assert wait_until(lambda: harness.status().state == BUSY, timeout=30)
    call.cancel()
    assert _error(lambda: list(call)).code() is grpc.StatusCode.CANCELLED
    assert wait_until(lambda: _ready(harness), timeout=30)
    assert harness.transcribe(audio["wav"]).text == SENTENCE


def test_load_model_while_requests_are_in_flight(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path]
) -> None:
    # Three windows, one model call each: a load that switches the default dtype waits for the call in progress
    # (torch_state), so the request must still have calls to make after it.
    _slow(harness, checkpoints, 2000, "chunk_seconds:10", "max_batch_size:1")
    english = harness.engine.current
    request = backend_pb2.TranscriptRequest(dst=str(audio["long"]), timestamp_granularities=["word"])
    in_flight = harness.stub.AudioTranscription.future(request, timeout=120)
    _busy(harness, in_flight)
    assert harness.load(checkpoints["cjk"], "torch_dtype:fp32").success
    assert not in_flight.done()
    assert harness.engine.current is not english
    assert english is not None and english.asr is not None  # retired, but kept for the request in flight
    assert harness.transcribe(audio["wav"]).text == CJK_SENTENCE
    result = in_flight.result()
    windows = result.text.count(SENTENCE)
    assert windows >= 3 and result.text == " ".join([SENTENCE] * windows) and result.language == "en"
    assert _words(result) == SENTENCE_WORDS * windows
    assert wait_until(lambda: english.asr is None, timeout=30)  # closed once its last request finished
    assert harness.transcribe(audio["wav"]).text == CJK_SENTENCE


def test_free_while_requests_are_in_flight(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path]
) -> None:
    _slow(harness, checkpoints)
    model = harness.engine.current
    request = backend_pb2.TranscriptRequest(dst=str(audio["long"]))
    in_flight = [harness.stub.AudioTranscription.future(request, timeout=120) for _ in range(2)]
    assert model is not None and wait_until(lambda: model.users == 2 or any(f.done() for f in in_flight), timeout=30)
    assert not any(f.done() for f in in_flight), "a request finished before both were in flight"
    assert harness.stub.Free(backend_pb2.HealthMessage(), timeout=30).success
    later = _error(lambda: harness.transcribe(audio["wav"]))
    assert later.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "Free" in later.details()
    for future in in_flight:
        assert future.result().text == SENTENCE
    assert wait_until(lambda: model is not None and model.asr is None, timeout=30)
    status = harness.status()
    assert status.state == backend_pb2.StatusResponse.UNINITIALIZED
    assert status.memory.breakdown["base_model_weights"] == 0
    assert harness.load(checkpoints["asr"]).success
    assert harness.transcribe(audio["wav"]).text == SENTENCE


# --- the aligner failing to load never takes the base model down ---------------------------------------------------


@pytest.fixture
def corrupt_aligner(tmp_path: Path, checkpoints: dict[str, Path]) -> Path:
    """A copy of the aligner checkpoint whose weights file is cut in half."""
    copy = tmp_path / "corrupt-aligner"
    shutil.copytree(checkpoints["aligner"], copy)
    weights = copy / "model.safetensors"
    assert weights.exists()
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    return copy


@pytest.mark.parametrize(
    ("aligner", "fragment"),
    [
        ("/nonexistent/aligner", "does not exist"),
        ("CORRUPT", "could not be loaded"),
        ("EMPTY", "has no config.json"),
        ("ASR", "is not a Qwen3-ForcedAligner checkpoint"),
    ],
)
def test_a_broken_aligner_never_takes_the_base_model_down(
    harness: Harness,
    checkpoints: dict[str, Path],
    audio: dict[str, Path],
    corrupt_aligner: Path,
    tmp_path: Path,
    aligner: str,
    fragment: str,
) -> None:
    (tmp_path / "empty").mkdir()
    path = {"CORRUPT": corrupt_aligner, "EMPTY": tmp_path / "empty", "ASR": checkpoints["asr"]}.get(aligner, aligner)
    # float32: the failing loads run while plain requests do (see test_no_forward_pass_while_a_load_...).
    assert harness.load(checkpoints["asr"], f"forced_aligner:{path}", "torch_dtype:fp32").success
    model = harness.engine.current
    base = model.asr.model

    def timed(path: Path) -> backend_pb2.TranscriptResult:
        return harness.transcribe(path, timestamp_granularities=["word"])

    with ThreadPoolExecutor(6) as pool:  # timestamp and plain requests at once
        futures = [pool.submit(timed if i % 2 else harness.transcribe, audio["wav"]) for i in range(6)]
    for i, future in enumerate(futures):
        if i % 2:
            error = future.exception()
            assert isinstance(error, grpc.RpcError)
            assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "could not be loaded" in error.details() and fragment in error.details()
            assert "plain transcription still works" in error.details()
        else:
            assert future.result().text == SENTENCE
    assert harness.engine.current is model and model.asr is not None and model.asr.model is base
    assert model.aligner_loads == 0 and not model.aligner_attached
    assert harness.status().state == READY
    assert harness.status().memory.breakdown["base_model_weights"] > 0
    stream = list(harness.stub.AudioTranscriptionStream(backend_pb2.TranscriptRequest(dst=str(audio["wav"]))))
    assert stream[-1].final_result.text == SENTENCE


def test_a_corrupt_preloaded_aligner_fails_the_load_and_keeps_the_old_model(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path], corrupt_aligner: Path
) -> None:
    assert harness.load(checkpoints["asr"], f"forced_aligner:{checkpoints['aligner']}").success
    before = harness.engine.current
    result = harness.load(checkpoints["cjk"], f"forced_aligner:{corrupt_aligner}", "preload_aligner:true")
    assert not result.success
    assert "could not be loaded" in result.message
    assert harness.engine.current is before
    assert _words(harness.transcribe(audio["wav"], timestamp_granularities=["word"])) == SENTENCE_WORDS


def test_fixing_the_aligner_path_needs_only_a_reload(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path], corrupt_aligner: Path
) -> None:
    assert harness.load(checkpoints["asr"], f"forced_aligner:{corrupt_aligner}").success
    assert _error(lambda: harness.transcribe(audio["wav"], timestamp_granularities=["word"])).code() is (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert harness.load(checkpoints["asr"], f"forced_aligner:{checkpoints['aligner']}").success
    assert _words(harness.transcribe(audio["wav"], timestamp_granularities=["word"])) == SENTENCE_WORDS
    assert harness.engine.current.aligner_loads == 1


# --- checkpoint loads share process-wide torch state with everything else running ----------------------------


@pytest.fixture
def torch_globals() -> Iterator[None]:
    """Put back the process-wide torch state that overlapping loads can leave broken, for the tests after."""
    import torch
    from torch import nn

    register, dtype = nn.Module.register_parameter, torch.get_default_dtype()
    yield
    nn.Module.register_parameter = register  # type: ignore[method-assign]
    torch.set_default_dtype(dtype)


def test_model_loads_never_overlap(
    harness: Harness,
    checkpoints: dict[str, Path],
    audio: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    torch_globals: None,
) -> None:
    import qwen_asr

    assert harness.load(checkpoints["asr"], f"forced_aligner:{checkpoints['aligner']}", "torch_dtype:fp32").success
    active, peak, lock = [0], [0], threading.Lock()
    aligner_loading, model_loading = threading.Event(), threading.Event()

    def tracked(real: Callable[..., object], started: threading.Event, chance_for: threading.Event | None):
        def from_pretrained(*args: object, **kwargs: object) -> object:
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            started.set()
            try:
                if chance_for is not None:
                    chance_for.wait(3.0)  # room for another load to start, if nothing keeps it out
                return real(*args, **kwargs)
            finally:
                with lock:
                    active[0] -= 1

        return from_pretrained

    aligner_cls, asr_cls = qwen_asr.Qwen3ForcedAligner, qwen_asr.Qwen3ASRModel
    monkeypatch.setattr(
        aligner_cls, "from_pretrained", tracked(aligner_cls.from_pretrained, aligner_loading, model_loading)
    )
    monkeypatch.setattr(asr_cls, "from_pretrained", tracked(asr_cls.from_pretrained, model_loading, None))
    with ThreadPoolExecutor(2) as pool:
        timed = pool.submit(harness.transcribe, audio["wav"], timestamp_granularities=["word"])
        assert aligner_loading.wait(30)
        reload = pool.submit(harness.load, checkpoints["cjk"], "torch_dtype:fp32")
        assert reload.result().success
        assert _words(timed.result()) == SENTENCE_WORDS
    assert peak[0] == 1


@pytest.mark.parametrize("trigger", ["LoadModel", "aligner"])
def test_no_forward_pass_while_a_load_changes_the_default_dtype(
    harness: Harness,
    checkpoints: dict[str, Path],
    audio: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    torch_globals: None,
    trigger: str,
) -> None:
    import qwen_asr
    import torch

    # bf16 explicitly: `auto` is float32 on CPUs without AVX-512 BF16/AMX, and float32 never changes the default.
    options = ("torch_dtype:bf16", "max_new_tokens:1000", f"forced_aligner:{checkpoints['aligner']}")
    assert harness.load(checkpoints["asr"], *options).success
    running, lock, entered = [0], threading.Lock(), threading.Event()
    violations: list[str] = []

    def counted(real: Callable[..., object]) -> Callable[..., object]:
        def forward(self: object, *args: object, **kwargs: object) -> object:
            with lock:
                running[0] += 1
            entered.set()
            try:
                return real(self, *args, **kwargs)
            finally:
                with lock:
                    running[0] -= 1

        return forward

    real_set = torch.set_default_dtype

    def set_default_dtype(dtype: torch.dtype) -> None:
        if dtype != torch.float32 and running[0]:
            violations.append(f"default dtype set to {dtype} while {running[0]} forward pass(es) ran")
        real_set(dtype)

    monkeypatch.setattr(qwen_asr.Qwen3ASRModel, "transcribe", counted(qwen_asr.Qwen3ASRModel.transcribe))
    monkeypatch.setattr(qwen_asr.Qwen3ForcedAligner, "align", counted(qwen_asr.Qwen3ForcedAligner.align))
    monkeypatch.setattr(torch, "set_default_dtype", set_default_dtype)
    in_flight = harness.stub.AudioTranscription.future(
        backend_pb2.TranscriptRequest(dst=str(audio["long"])), timeout=120
    )
    assert entered.wait(30)
    if trigger == "LoadModel":
        assert harness.load(checkpoints["cjk"], "torch_dtype:bf16").success
    else:
        assert _words(harness.transcribe(audio["wav"], timestamp_granularities=["word"])) == SENTENCE_WORDS
    in_flight.exception()  # wait; a corrupted pass fails it, but the violation is what this test is about
    assert violations == []
    assert in_flight.result().text == SENTENCE
