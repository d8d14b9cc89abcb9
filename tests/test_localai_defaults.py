"""Requests as LocalAI builds them, field by field, defaults included: every one is served.

LocalAI's OpenAI endpoint (`core/http/endpoints/openai/transcription.go`) and its backend call
(`core/backend/transcript.go`) fill `TranscriptRequest` with values no client chose: `diarize` is true unless the
form says `false`, `threads` is the model config's, `temperature` is 0 unless the form parses as a float,
`language` and `translate` fall back to the model config's `parameters`, and `ModelIdentity` is the config's
model. Its realtime API sends `diarize=false`, `translate=false`. `localai_request` below rebuilds those rules,
so these tests send what a plain `curl -F file=@talk.m4a` makes LocalAI send.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import backend_pb2
from tests.conftest import SENTENCE, SENTENCE_WORDS, Harness

_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


@dataclass(frozen=True)
class ModelConfig:
    """The parts of a LocalAI model YAML that reach `TranscriptRequest`."""

    model: str
    language: str = ""  # parameters.language
    translate: bool = False  # parameters.translate
    threads: int = 4  # threads (LocalAI's default is the machine's physical cores)


def _go_parse_bool(value: str) -> bool | None:
    return True if value in _GO_TRUE else False if value in _GO_FALSE else None


def _go_parse_float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def localai_request(dst: Path, form: dict[str, str | list[str]], config: ModelConfig) -> backend_pb2.TranscriptRequest:
    """The `TranscriptRequest` LocalAI's HTTP handler sends for a multipart form (`file` aside) and a model config."""

    def value(key: str) -> str:
        got = form.get(key, "")
        return got[0] if isinstance(got, list) else got

    granularities = []
    for key in ("timestamp_granularities[]", "timestamp_granularities"):
        got = form.get(key, [])
        granularities += [v.strip() for v in ([got] if isinstance(got, str) else got) if v.strip()]
    temperature = _go_parse_float(value("temperature")) if value("temperature") else None
    translate = _go_parse_bool(value("translate"))
    return backend_pb2.TranscriptRequest(
        dst=str(dst),
        language=value("language") or config.language,
        translate=config.translate if translate is None else translate,
        diarize=value("diarize") != "false",
        threads=config.threads,
        prompt=value("prompt"),
        temperature=temperature or 0.0,
        timestamp_granularities=granularities,
        stream=_go_parse_bool(value("stream")) or False,
        ModelIdentity=config.model,
    )


def localai_realtime_request(dst: Path, language: str, config: ModelConfig) -> backend_pb2.TranscriptRequest:
    """What LocalAI's realtime API sends to transcribe a committed turn (`Transcribe(ctx, path, language, false,
    false, prompt)`)."""
    return backend_pb2.TranscriptRequest(
        dst=str(dst), language=language, threads=config.threads, ModelIdentity=config.model
    )


def _send(harness: Harness, request: backend_pb2.TranscriptRequest) -> backend_pb2.TranscriptResult:
    """The RPC LocalAI picks: the streaming one when the form said stream=true (it then sets `stream`)."""
    if not request.stream:
        return harness.transcribe(request.dst, **_fields(request))
    responses = list(harness.stub.AudioTranscriptionStream(request, timeout=120))
    assert responses and responses[-1].HasField("final_result")
    assert "".join(r.delta for r in responses[:-1]) == responses[-1].final_result.text
    return responses[-1].final_result


def _fields(request: backend_pb2.TranscriptRequest) -> dict[str, object]:
    return {f.name: v for f, v in request.ListFields() if f.name != "dst"}


@pytest.fixture
def loaded(harness: Harness, checkpoints: dict[str, Path]) -> ModelConfig:
    model = str(checkpoints["asr"])
    assert harness.load(model, f"forced_aligner:{checkpoints['aligner']}").success
    return ModelConfig(model=model)


@pytest.mark.parametrize("stream", ["", "true"])
@pytest.mark.parametrize("granularities", [[], ["word"], ["segment"], ["word", "segment"]])
def test_a_plain_upload_is_served_at_every_granularity(
    harness: Harness, loaded: ModelConfig, audio: dict[str, Path], granularities: list[str], stream: str
) -> None:
    form: dict[str, str | list[str]] = {"timestamp_granularities[]": granularities, "stream": stream}
    request = localai_request(audio["wav"], form, loaded)
    assert request.diarize and request.threads == 4 and request.ModelIdentity == loaded.model
    assert request.stream is (stream == "true")
    result = _send(harness, request)
    assert result.text == SENTENCE and result.language == "en"
    assert result.segments and all(not s.speaker for s in result.segments)
    words = [w.text for s in result.segments for w in s.words]
    assert words == (SENTENCE_WORDS if "word" in granularities else [])
    if granularities:
        assert [s.text for s in result.segments] == ["Hello world.", "This is a test."]


@pytest.mark.parametrize(
    "form",
    [
        {"diarize": "false"},
        {"diarize": "true"},
        {"diarize": "0"},  # not the string "false": LocalAI still sends true
        {"temperature": "0.2"},
        {"temperature": "1"},
        {"temperature": "warm"},  # LocalAI tolerates it: 0
        {"temperature": "NaN"},  # Go parses it: NaN reaches the worker
        {"temperature": "-inf"},
        {"prompt": "Names: Qwen, LocalAI."},
        {"language": "en"},
        {"language": "English"},
        {"language": "auto"},
        {"translate": "false"},
        {"response_format": "verbose_json"},
    ],
)
def test_every_form_default_is_served(
    harness: Harness, loaded: ModelConfig, audio: dict[str, Path], form: dict[str, str]
) -> None:
    request = localai_request(audio["wav"], form, loaded)
    result = _send(harness, request)
    assert result.text == SENTENCE and result.language == "en"


@pytest.mark.parametrize(("configured", "reported"), [("english", "en"), ("de", "de"), ("", "en")])
def test_the_model_configs_language_is_served(
    harness: Harness, loaded: ModelConfig, audio: dict[str, Path], configured: str, reported: str
) -> None:
    config = ModelConfig(loaded.model, language=configured)
    result = _send(harness, localai_request(audio["wav"], {}, config))
    assert result.language == reported  # a forced language is reported as asked; the scripted model says English


def test_translate_from_the_model_config_is_refused_with_the_fix(
    harness: Harness, loaded: ModelConfig, audio: dict[str, Path]
) -> None:
    config = ModelConfig(loaded.model, translate=True)
    for stream in ("", "true"):
        request = localai_request(audio["wav"], {"stream": stream}, config)
        with pytest.raises(grpc.RpcError) as error:
            _send(harness, request)
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "translation is not supported" in error.value.details()
        assert "translate=false" in error.value.details() and "translate: true" in error.value.details()
    # The form's translate=false wins over the config, as in LocalAI; the worker kept serving.
    assert _send(harness, localai_request(audio["wav"], {"translate": "false"}, config)).text == SENTENCE


def test_the_realtime_apis_request_is_served(harness: Harness, loaded: ModelConfig, audio: dict[str, Path]) -> None:
    for language in ("", "en"):
        request = localai_realtime_request(audio["wav"], language, loaded)
        assert not request.diarize and not request.translate
        assert _send(harness, request).text == SENTENCE


def test_a_stale_route_is_still_refused(harness: Harness, loaded: ModelConfig, audio: dict[str, Path]) -> None:
    request = localai_request(audio["wav"], {}, ModelConfig("Qwen/Qwen3-ASR-1.7B"))
    with pytest.raises(grpc.RpcError) as error:
        _send(harness, request)
    assert error.value.code() is grpc.StatusCode.NOT_FOUND


def _notes(caplog: pytest.LogCaptureFixture, fragment: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if fragment in r.getMessage()]


def test_diarize_is_said_once_per_loaded_model_at_info(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    config = ModelConfig(str(checkpoints["asr"]))
    with caplog.at_level(logging.INFO, logger="qwen_asr_worker"):
        assert harness.load(config.model).success
        assert _send(harness, localai_request(audio["wav"], {"diarize": "false"}, config)).text == SENTENCE
        assert not _notes(caplog, "diarize=true")
        for stream in ("", "true", ""):
            assert _send(harness, localai_request(audio["wav"], {"stream": stream}, config)).text == SENTENCE
        notes = _notes(caplog, "diarize=true")
        assert len(notes) == 1 and notes[0].levelno == logging.INFO
        assert "without speaker labels" in notes[0].getMessage()
        assert harness.load(config.model).success  # a new loaded model says it again, once
        for _ in range(2):
            assert _send(harness, localai_request(audio["wav"], {}, config)).text == SENTENCE
        assert len(_notes(caplog, "diarize=true")) == 2


def test_a_temperature_is_said_once_and_decoding_stays_greedy(
    harness: Harness, loaded: ModelConfig, audio: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="qwen_asr_worker"):
        texts = {_send(harness, localai_request(audio["wav"], {"temperature": "0.9"}, loaded)).text for _ in range(3)}
    assert texts == {SENTENCE}
    notes = _notes(caplog, "temperature")
    assert len(notes) == 1 and "greedy" in notes[0].getMessage() and "0.9" in notes[0].getMessage()


def test_localai_request_mirrors_the_handlers_parsing() -> None:
    """The helper itself, against the Go rules it copies (strconv.ParseBool, ParseFloat, FormValue)."""
    config = ModelConfig("m", language="de", translate=True, threads=8)
    plain = localai_request(Path("a.wav"), {}, config)
    assert (plain.diarize, plain.translate, plain.language, plain.threads, plain.temperature) == (
        True,
        True,
        "de",
        8,
        0.0,
    )
    custom = localai_request(
        Path("a.wav"),
        {"diarize": "false", "translate": "F", "language": "fr", "temperature": "nan", "stream": "1"},
        config,
    )
    assert not custom.diarize and not custom.translate and custom.language == "fr" and custom.stream
    assert math.isnan(custom.temperature)
    both = localai_request(
        Path("a.wav"), {"timestamp_granularities[]": [" word ", ""], "timestamp_granularities": "segment"}, config
    )
    assert list(both.timestamp_granularities) == ["word", "segment"]
