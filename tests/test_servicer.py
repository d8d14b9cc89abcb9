"""The servicer on an in-process server with tiny real checkpoints: the worker issue's behaviours."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

import backend_pb2
from tests.conftest import SENTENCE, Harness, wait_until

NS = 1_000_000_000


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code(), info.value.details()


def test_health(harness: Harness) -> None:
    assert harness.stub.Health(backend_pb2.HealthMessage()).message == b"OK"


def test_status_before_load_is_uninitialized(harness: Harness) -> None:
    status = harness.status()
    assert status.state == backend_pb2.StatusResponse.UNINITIALIZED
    assert status.memory.total > 0
    assert status.memory.breakdown["base_model_weights"] == 0


def test_transcription_before_load_is_failed_precondition(harness: Harness, audio: dict[str, Path]) -> None:
    code, details = _code(lambda: harness.transcribe(audio["wav"]))
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert "LoadModel" in details


def test_load_and_transcribe(harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path]) -> None:
    result = harness.load(checkpoints["asr"])
    assert result.success, result.message
    assert "loads on the first timestamp request" in result.message
    status = harness.status()
    assert status.state == backend_pb2.StatusResponse.READY
    assert status.memory.breakdown["base_model_weights"] > 0
    assert status.memory.breakdown["aligner_weights"] == 0

    out = harness.transcribe(audio["wav"])
    assert out.text == SENTENCE
    assert out.language == "en"
    assert out.duration == pytest.approx(2.0, abs=0.01)
    assert len(out.segments) == 1
    seg = out.segments[0]
    assert (seg.start, seg.end, seg.text) == (0, round(out.duration * NS), SENTENCE)
    assert not seg.words


@pytest.mark.parametrize(("language", "iso"), [("de", "de"), ("de-DE", "de"), ("GERMAN", "de"), ("zh_CN", "zh")])
def test_forced_language(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path], language: str, iso: str
) -> None:
    assert harness.load(checkpoints["asr"]).success
    out = harness.transcribe(audio["wav"], language=language)
    assert out.language == iso
    assert out.text == SENTENCE


def test_cjk_model_gives_chinese(harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path]) -> None:
    assert harness.load(checkpoints["cjk"]).success
    out = harness.transcribe(audio["wav"])
    assert out.language == "zh"
    assert out.text == "你好世界。这是一个测试。"


def test_prompt_is_accepted(harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path]) -> None:
    assert harness.load(checkpoints["asr"]).success
    assert harness.transcribe(audio["wav"], prompt="Names: Qwen, LocalAI.").text == SENTENCE


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"dst": "/nonexistent/audio.wav"}, "not found"),
        ({"dst": "/"}, "directory"),
        ({"dst": ""}, "dst is empty"),
        ({"language": "klingon"}, "unsupported language"),
        ({"timestamp_granularities": ["sentence"]}, "unknown timestamp granularity"),
        ({"translate": True}, "translation is not supported"),
        ({"prompt": "x" * 20_000}, "prompt is 20000 characters"),
    ],
)
def test_invalid_requests_then_success(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path], fields: dict, fragment: str
) -> None:
    assert harness.load(checkpoints["asr"]).success
    request = {"dst": str(audio["wav"]), **fields}
    code, details = _code(lambda: harness.stub.AudioTranscription(backend_pb2.TranscriptRequest(**request), timeout=60))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in details
    assert harness.transcribe(audio["wav"]).text == SENTENCE


@pytest.mark.parametrize("name", ["empty", "garbage"])
def test_bad_files_are_invalid_argument(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path], name: str
) -> None:
    assert harness.load(checkpoints["asr"]).success
    code, details = _code(lambda: harness.transcribe(audio[name]))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert str(audio[name]) in details
    assert harness.transcribe(audio["wav"]).text == SENTENCE


@pytest.mark.parametrize(
    ("model", "options", "fragment"),
    [
        ("/nonexistent/model", [], "does not exist"),
        ("no-such-model-name", [], "not found"),
        ("ASR", ["bogus:1"], "unknown option 'bogus'; valid keys:"),
        ("ASR", ["torch_dtype:int4"], "expected one of auto, fp32, bf16, fp16"),
        ("ALIGNER", [], "is a Qwen3-ForcedAligner, not a Qwen3-ASR model"),
        ("TMP", [], "has no config.json"),
    ],
)
def test_load_failures_report_the_cause(
    harness: Harness, checkpoints: dict[str, Path], tmp_path: Path, model: str, options: list[str], fragment: str
) -> None:
    model = {"ASR": str(checkpoints["asr"]), "ALIGNER": str(checkpoints["aligner"]), "TMP": str(tmp_path)}.get(
        model, model
    )
    result = harness.load(model, *options)
    assert not result.success
    assert fragment in result.message
    assert harness.status().state == backend_pb2.StatusResponse.ERROR


def test_cuda_without_gpu_fails_clearly(harness: Harness, checkpoints: dict[str, Path]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = harness.load(checkpoints["asr"], CUDA=True)
    assert not result.success
    assert "no CUDA GPU is available" in result.message


def test_relative_model_path_and_model_file(harness: Harness, checkpoints: dict[str, Path], audio) -> None:
    asr = checkpoints["asr"]
    assert harness.load(asr.name, ModelPath=str(asr.parent)).success
    assert harness.transcribe(audio["wav"]).text == SENTENCE
    assert harness.load("ignored-name", ModelFile=str(asr)).success
    assert harness.transcribe(audio["wav"]).text == SENTENCE


def test_failed_reload_keeps_serving_the_old_model(harness: Harness, checkpoints: dict[str, Path], audio) -> None:
    assert harness.load(checkpoints["asr"]).success
    assert not harness.load("/nonexistent/model").success
    assert harness.status().state == backend_pb2.StatusResponse.READY
    assert harness.transcribe(audio["wav"]).text == SENTENCE


def test_second_load_replaces_the_model(harness: Harness, checkpoints: dict[str, Path], audio) -> None:
    assert harness.load(checkpoints["asr"]).success
    first = harness.engine.current
    assert harness.load(checkpoints["cjk"]).success
    assert harness.engine.current is not first
    assert first is not None and first.asr is None  # closed: nothing was in flight
    assert harness.transcribe(audio["wav"]).text == "你好世界。这是一个测试。"


def test_free_then_status_and_transcription(harness: Harness, checkpoints: dict[str, Path], audio) -> None:
    assert harness.load(checkpoints["asr"]).success
    loaded_rss = harness.status().memory.total
    assert harness.stub.Free(backend_pb2.HealthMessage()).success
    status = harness.status()
    assert status.state == backend_pb2.StatusResponse.UNINITIALIZED
    assert status.memory.breakdown["base_model_weights"] == 0
    assert status.memory.total <= loaded_rss * 1.5
    code, details = _code(lambda: harness.transcribe(audio["wav"]))
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert "Free" in details
    assert harness.load(checkpoints["asr"]).success
    assert harness.transcribe(audio["wav"]).text == SENTENCE


def test_status_is_busy_while_transcribing(harness: Harness, checkpoints: dict[str, Path], audio) -> None:
    assert harness.load(checkpoints["asr"], "max_new_tokens:2000").success
    done = threading.Event()
    thread = threading.Thread(target=lambda: (harness.transcribe(audio["long"]), done.set()))
    thread.start()
    assert wait_until(lambda: harness.status().state == backend_pb2.StatusResponse.BUSY or done.is_set())
    saw_busy = not done.is_set() or harness.status().state == backend_pb2.StatusResponse.BUSY
    thread.join(timeout=120)
    assert saw_busy
    assert harness.status().state == backend_pb2.StatusResponse.READY


def test_stream_sends_final_result(harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path]) -> None:
    assert harness.load(checkpoints["asr"]).success
    messages = list(
        harness.stub.AudioTranscriptionStream(backend_pb2.TranscriptRequest(dst=str(audio["wav"])), timeout=60)
    )
    assert messages[-1].HasField("final_result")
    assert "".join(m.delta for m in messages[:-1]) == messages[-1].final_result.text == SENTENCE
    assert messages[-1].final_result.language == "en"


def test_stream_errors_are_statuses(harness: Harness, checkpoints: dict[str, Path]) -> None:
    assert harness.load(checkpoints["asr"]).success
    code, _ = _code(
        lambda: list(harness.stub.AudioTranscriptionStream(backend_pb2.TranscriptRequest(dst="/missing.wav")))
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
