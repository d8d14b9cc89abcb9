"""Fuzzing, bounded and deterministic (`derandomize=True`): decoders, parsers and the rpcs on hostile input.

Each target has a contract: `load_audio` returns finite float32 1-D samples or raises `AudioError` (nothing else,
and never hangs); the options, language, granularity and interval parsers raise only their own error types; the
rpcs answer every request with a result or a deliberate status, never INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import math
import string
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import backend_pb2
from qwen_asr_worker.audio import AudioError, load_audio
from qwen_asr_worker.errors import InvalidRequest
from qwen_asr_worker.languages import SUPPORTED, LanguageError, resolve_language
from qwen_asr_worker.options import OptionsError, WorkerOptions, parse_options, valid_keys
from qwen_asr_worker.parent_watch import MAX_INTERVAL, MIN_INTERVAL, parse_interval
from qwen_asr_worker.servicer import parse_granularity, to_load_spec
from tests.audio_fixtures import tone, write_audio
from tests.conftest import SENTENCE, Harness, serving

FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DECODE_TIMEOUT_S = 30.0
SEED_FORMATS = ("wav", "flac", "ogg", "mp3", "m4a", "webm", "mp4")
# Magic numbers that steer random bytes past the format probes into the parsers behind them.
MAGICS = (
    b"RIFF\x24\x00\x00\x00WAVEfmt ",
    b"RIFF\xff\xff\xff\xffWAVEfmt \x10\x00\x00\x00\x01\x00\x02\x00",
    b"fLaC\x00\x00\x00\x22",
    b"OggS\x00\x02",
    b"ID3\x04\x00\x00\x00\x00\x00\x00",
    b"\xff\xfb\x90\x64",
    b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00",
    b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01",
    b"FORM\x00\x00\x00\x00AIFF",
    b".snd\x00\x00\x00\x18",
    b"#EXTM3U\n",
    b"ffconcat version 1.0\n",
)


def _decode_ok_or_audio_error(path: Path) -> None:
    """Decode on a daemon thread, so that a hang fails the test after a timeout instead of stalling the run."""
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(_try_decode(path)), daemon=True, name="fuzz-decode")
    thread.start()
    thread.join(DECODE_TIMEOUT_S)
    if thread.is_alive():
        pytest.fail(f"load_audio({path.name}) did not return within {DECODE_TIMEOUT_S} s")
    (result,) = outcome
    if isinstance(result, AudioError):
        event("AudioError")
        assert str(result)  # a message for the user
        return
    if isinstance(result, BaseException):
        raise result
    event("decoded")
    assert isinstance(result, np.ndarray)
    assert result.dtype == np.float32 and result.ndim == 1 and result.size >= 1
    assert np.isfinite(result).all()


def _try_decode(path: Path) -> object:
    try:
        return load_audio(str(path))
    except BaseException as exc:  # handed to the test thread, which judges it
        return exc


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Small real files (0.25 s, stereo) in every container, plus WAVs in the unusual sample formats."""
    base = tmp_path_factory.mktemp("fuzz-seeds")
    made = {fmt: write_audio(base / f"s.{fmt}", tone(0.25, 16000, 2), 16000, fmt).read_bytes() for fmt in SEED_FORMATS}
    for subtype in ("PCM_U8", "PCM_24", "FLOAT", "DOUBLE"):
        path = base / f"s-{subtype}.wav"
        sf.write(str(path), tone(0.25, 8000, 3), 8000, subtype=subtype)
        made[f"wav-{subtype}"] = path.read_bytes()
    return made


# A mutation: ("flip", position, xor), ("cut", position), ("insert", position, bytes), ("delete", position, length),
# ("repeat", position, length). Positions are taken modulo the current length.
_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 16)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 512)),
    st.tuples(st.just("repeat"), st.integers(0, 1 << 16), st.integers(1, 512)),
)


def _mutate(data: bytes, mutations: list[tuple]) -> bytes:
    out = bytearray(data)
    for mutation in mutations:
        if not out:
            break
        kind, position = mutation[0], mutation[1] % len(out)
        if kind == "flip":
            out[position] ^= mutation[2]
        elif kind == "cut":
            del out[position:]
        elif kind == "insert":
            out[position:position] = mutation[2]
        elif kind == "delete":
            del out[position : position + mutation[2]]
        else:
            out[position:position] = out[position : position + mutation[2]]
    return bytes(out)


@settings(FUZZ, max_examples=400)
@given(
    seed=st.sampled_from([*SEED_FORMATS, "wav-PCM_U8", "wav-PCM_24", "wav-FLOAT", "wav-DOUBLE"]),
    ext=st.sampled_from(["wav", "mp3", "m4a", "webm", "flac", "ogg", "bin"]),
    mutations=st.lists(_MUTATION, min_size=1, max_size=6),
    early=st.booleans(),
)
def test_mutated_real_files(
    tmp_path: Path,
    seeds: dict[str, bytes],
    seed: str,
    ext: str,
    mutations: list[tuple],
    early: bool,
) -> None:
    data = seeds[seed]
    if early:  # aim at the headers, where the parsers decide how much to read
        mutations = [(m[0], m[1] % 128, *m[2:]) for m in mutations]
    path = tmp_path / f"fuzz.{ext}"
    path.write_bytes(_mutate(data, mutations))
    _decode_ok_or_audio_error(path)


@settings(FUZZ, max_examples=200)
@given(
    magic=st.sampled_from(MAGICS),
    body=st.binary(min_size=0, max_size=2048),
    ext=st.sampled_from(["wav", "mp3", "m4a", "webm", "flac", "ogg", "aiff", "au", "m3u8"]),
)
def test_magic_numbers_with_random_bodies(tmp_path: Path, magic: bytes, body: bytes, ext: str) -> None:
    path = tmp_path / f"fuzz.{ext}"
    path.write_bytes(magic + body)
    _decode_ok_or_audio_error(path)


@settings(FUZZ, max_examples=100)
@given(
    values=st.lists(
        st.floats(allow_subnormal=False, width=32) | st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1e30]),
        min_size=1,
        max_size=400,
    ),
    channels=st.integers(1, 4),
    rate=st.sampled_from([8000, 16000, 44100]),
    subtype=st.sampled_from(["FLOAT", "DOUBLE", "PCM_16"]),
)
def test_extreme_sample_values(tmp_path: Path, values: list[float], channels: int, rate: int, subtype: str) -> None:
    frames = np.array(values[: len(values) // channels * channels] or values[:1] * channels, np.float64)
    path = tmp_path / "extreme.wav"
    sf.write(str(path), frames.reshape(-1, channels), rate, subtype=subtype)
    _decode_ok_or_audio_error(path)


# --- parsers ------------------------------------------------------------------------------------------------------

_KEYS = st.sampled_from([*valid_keys(), "dtype", "aligner", "DEVICE", " max_new_tokens "])
_VALUES = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["auto", "fp32", "bf16", "none", "true", "0", "-1", "1e400", "nan", "cuda:0", "cuda:x", ":"]),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_subnormal=False).map(str),
)


@settings(FUZZ, max_examples=300)
@given(items=st.lists(st.text(max_size=40) | st.tuples(_KEYS, _VALUES).map(":".join), max_size=6))
def test_options_parser_raises_only_options_error(items: list[str]) -> None:
    try:
        options = parse_options(items)
    except OptionsError as exc:
        assert str(exc)
        return
    assert isinstance(options, WorkerOptions)
    assert 1 <= options.max_new_tokens <= 32768
    assert options.max_segment_seconds > 0 and math.isfinite(options.max_segment_seconds)
    assert 10 <= options.chunk_seconds <= 180


_SUBTAG = st.text(alphabet=string.ascii_letters + string.digits, min_size=0, max_size=9)
_CODES = st.sampled_from(["zh", "en", "de", "yue", "fil", "pt", "und", "auto", "xx", "zh-HK", "Chinese", "mandarin"])


@settings(FUZZ, max_examples=300)
@given(
    value=st.text(max_size=60)
    | st.tuples(_CODES, st.lists(_SUBTAG, max_size=4), st.sampled_from(["-", "_", " ", "--"])).map(
        lambda t: t[2].join([t[0], *t[1]])
    )
)
def test_language_parser_raises_only_language_error(value: str) -> None:
    try:
        name = resolve_language(value)
    except LanguageError as exc:
        assert "unsupported language" in str(exc)
        assert len(str(exc)) < 2000  # the input is shortened in the message
        return
    assert name is None or name in SUPPORTED


@settings(FUZZ, max_examples=200)
@given(values=st.lists(st.text(max_size=12) | st.sampled_from(["word", "segment", " WORD ", "Segment"]), max_size=5))
def test_granularity_parser_raises_only_invalid_request(values: list[str]) -> None:
    try:
        parse_granularity(values)
    except InvalidRequest as exc:
        assert "unknown timestamp granularity" in str(exc)


@settings(FUZZ, max_examples=300)
@given(
    text=st.text(max_size=30)
    | st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["ns", "us", "µs", "ms", "s", "m", "h", "x", ""]))).map(
        lambda parts: "".join(f"{n}{u}" for n, u in parts)
    )
)
def test_parent_watch_interval_is_always_usable(text: str) -> None:
    interval = parse_interval(text)
    assert MIN_INTERVAL <= interval <= MAX_INTERVAL


@settings(FUZZ, max_examples=200)
@given(
    model=st.text(max_size=40),
    model_path=st.text(max_size=20),
    model_file=st.text(max_size=20),
    dtype=st.text(max_size=8) | st.sampled_from(["", "float16", "bf16"]),
    options=st.lists(st.text(max_size=20), max_size=3),
)
def test_load_spec_raises_only_domain_errors(
    model: str, model_path: str, model_file: str, dtype: str, options: list[str]
) -> None:
    request = backend_pb2.ModelOptions(
        Model=model, ModelPath=model_path, ModelFile=model_file, DType=dtype, Options=options
    )
    try:
        to_load_spec(request)
    except (OptionsError, InvalidRequest) as exc:
        assert str(exc)


# --- the rpcs -----------------------------------------------------------------------------------------------------

_DELIBERATE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
}


@pytest.fixture(scope="module")
def fuzz_server(checkpoints: dict[str, Path]) -> Iterator[Harness]:
    """A module-wide server with the English model (max_new_tokens 16) and the aligner attached."""
    with serving(max_workers=8) as harness:
        loaded = harness.load(
            checkpoints["asr"], "max_new_tokens:16", f"forced_aligner:{checkpoints['aligner']}", "preload_aligner:true"
        )
        assert loaded.success, loaded.message
        yield harness


@settings(FUZZ, max_examples=250)
@given(
    # Valid values most of the time, so that many requests get as far as the model with the others' hostility.
    dst=st.one_of(st.just("GOOD"), st.just("GOOD"), st.sampled_from(["MISSING", "DIR", ""]), st.text(max_size=30)),
    language=st.one_of(st.sampled_from(["", "en", "de-DE", "auto", "zh_CN"]), st.just(""), st.text(max_size=12)),
    prompt=st.text(max_size=50),
    granularities=st.lists(
        st.one_of(st.sampled_from(["word", "segment"]), st.sampled_from(["word", "segment"]), st.text(max_size=8)),
        max_size=2,
    ),
    identity=st.one_of(st.sampled_from(["", "ASR"]), st.just(""), st.text(max_size=10)),
    stream=st.booleans(),
)
def test_transcription_requests_get_a_result_or_a_deliberate_status(
    fuzz_server: Harness,
    audio: dict[str, Path],
    checkpoints: dict[str, Path],
    dst: str,
    language: str,
    prompt: str,
    granularities: list[str],
    identity: str,
    stream: bool,
) -> None:
    places = {"GOOD": str(audio["wav"]), "MISSING": str(audio["wav"]) + ".missing", "DIR": str(audio["wav"].parent)}
    request = backend_pb2.TranscriptRequest(
        dst=places.get(dst, dst),
        language=language,
        prompt=prompt,
        timestamp_granularities=granularities,
        ModelIdentity=str(checkpoints["asr"]) if identity == "ASR" else identity,
    )
    try:
        if stream:
            result = list(fuzz_server.stub.AudioTranscriptionStream(request, timeout=60))[-1].final_result
        else:
            result = fuzz_server.stub.AudioTranscription(request, timeout=60)
    except grpc.RpcError as exc:
        event(exc.code().name)
        assert exc.code() in _DELIBERATE, (request, exc.code(), exc.details())
        assert exc.details()
        return
    event("transcribed")
    assert result.text == SENTENCE
