"""Concurrent requests are batched, each caller gets exactly its own result; dtype selection."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from qwen_asr_worker import runtime
from tests.audio_fixtures import tone, write_audio
from tests.conftest import SENTENCE, Harness

LANGUAGES = ["", "de", "fr", "", "ja", "en-GB", "", "pt-BR"]
EXPECTED_ISO = ["en", "de", "fr", "en", "ja", "en", "en", "pt"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eight clips of different lengths."""
    base = tmp_path_factory.mktemp("clips")
    return [write_audio(base / f"clip{i}.wav", tone(1.0 + i * 0.4, 16000), 16000, "wav") for i in range(8)]


def _request(harness: Harness, clips: list[Path], i: int) -> tuple[str, str, float]:
    out = harness.transcribe(clips[i], language=LANGUAGES[i], prompt=f"context number {i}")
    return out.text, out.language, round(out.duration, 3)


def test_batched_results_equal_lone_results(harness: Harness, checkpoints: dict[str, Path], clips) -> None:
    assert harness.load(checkpoints["asr"], "batch_window_ms:300", "max_batch_size:8").success
    model = harness.engine.current
    alone = [_request(harness, clips, i) for i in range(8)]
    assert max(model.batcher.batch_sizes) == 1
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: _request(harness, clips, i), range(8)))
    assert together == alone
    assert [lang for _, lang, _ in together] == EXPECTED_ISO
    assert all(text == SENTENCE for text, _, _ in together)
    assert max(model.batcher.batch_sizes) > 1  # they really shared a model call


def test_a_bad_request_fails_only_itself(harness: Harness, checkpoints: dict[str, Path], clips, tmp_path) -> None:
    assert harness.load(checkpoints["asr"], "batch_window_ms:300").success
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")

    def call(i: int) -> str:
        try:
            if i % 3 == 0:
                return harness.transcribe(broken).text
            if i % 3 == 1:
                return harness.transcribe(clips[i % 8], language="xx").text
            return harness.transcribe(clips[i % 8]).text
        except grpc.RpcError as exc:
            return exc.code().name

    with ThreadPoolExecutor(9) as pool:
        results = list(pool.map(call, range(9)))
    assert results == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", SENTENCE] * 3


def test_auto_dtype_follows_the_hardware() -> None:
    fast = runtime.cpu_has_fast_bf16()
    assert runtime.pick_dtype("auto", "cpu")[0] is (torch.bfloat16 if fast else torch.float32)
    assert runtime.pick_dtype("auto", "cuda:0")[0] is torch.bfloat16
    assert runtime.pick_dtype("auto", "mps")[0] is torch.float32
    assert runtime.pick_dtype("fp16", "cpu")[0] is torch.float16


@pytest.mark.parametrize(
    ("option", "dtype"), [("torch_dtype:fp32", torch.float32), ("torch_dtype:bf16", torch.bfloat16)]
)
def test_loaded_dtype(harness: Harness, checkpoints: dict[str, Path], audio, option: str, dtype: torch.dtype) -> None:
    result = harness.load(checkpoints["asr"], option)
    assert result.success
    assert str(dtype).removeprefix("torch.") in result.message
    assert harness.engine.current.asr.model.dtype is dtype
    assert harness.transcribe(audio["wav"]).text == SENTENCE


def test_aligner_follows_base_dtype_unless_told(harness: Harness, checkpoints: dict[str, Path], audio) -> None:
    aligner = f"forced_aligner:{checkpoints['aligner']}"
    assert harness.load(checkpoints["asr"], "torch_dtype:bf16", aligner, "preload_aligner:true").success
    assert harness.engine.current.asr.forced_aligner.model.dtype is torch.bfloat16
    assert harness.load(
        checkpoints["asr"], "torch_dtype:bf16", aligner, "preload_aligner:true", "aligner_dtype:fp32"
    ).success
    assert harness.engine.current.asr.forced_aligner.model.dtype is torch.float32


@pytest.mark.parametrize(("value", "expected"), [(None, 16), ("4", 4), ("0", 1), ("many", 16)])
def test_grpc_pool_size_from_env(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: int) -> None:
    from qwen_asr_worker.server import max_workers_from_env

    if value is None:
        monkeypatch.delenv("PYTHON_GRPC_MAX_WORKERS", raising=False)
    else:
        monkeypatch.setenv("PYTHON_GRPC_MAX_WORKERS", value)
    assert max_workers_from_env() == expected
