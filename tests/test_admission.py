"""Admission control: the audio memory account, its bounded queue, and how requests meet it over gRPC."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

import backend_pb2
from qwen_asr_worker.admission import MIB, AudioBudget
from qwen_asr_worker.errors import Cancelled, Overloaded
from qwen_asr_worker.options import parse_options
from qwen_asr_worker.pipeline import request_bytes
from tests.conftest import SENTENCE, Harness, wait_until


def _never() -> bool:
    return False


def test_holds_are_counted_and_released_however_the_block_ends() -> None:
    budget = AudioBudget(100, max_waiting=0)
    with budget.hold(60, "a", _never):
        assert budget.held_bytes == 60
        with budget.hold(40, "b", _never):
            assert budget.held_bytes == 100
        with pytest.raises(RuntimeError), budget.hold(40, "c", _never):
            raise RuntimeError("the request failed")
        assert budget.held_bytes == 60
    assert budget.held_bytes == 0


def test_what_can_never_fit_and_a_full_queue_are_refused_with_the_options() -> None:
    budget = AudioBudget(100, max_waiting=0)
    with pytest.raises(Overloaded, match=r"more than the worker's whole budget of 0 MiB .*audio_memory_mb"):
        budget._acquire(101, "a big one", _never)
    with budget.hold(80, "a", _never), pytest.raises(Overloaded, match="max_waiting_requests"):
        budget._acquire(30, "b", _never)
    assert budget.held_bytes == 0 and budget.waiting == 0


def test_waiters_are_served_first_come_first_served() -> None:
    budget = AudioBudget(100, max_waiting=5)
    order: list[str] = []
    first = budget.hold(100, "first", _never)
    first.__enter__()

    def wait(name: str, nbytes: int) -> None:
        with budget.hold(nbytes, name, _never):
            order.append(name)

    threads = []
    for k, (name, nbytes) in enumerate([("big", 90), ("small", 10)]):
        threads.append(threading.Thread(target=wait, args=(name, nbytes)))
        threads[-1].start()
        assert wait_until(lambda k=k: budget.waiting == k + 1, timeout=10)
    first.__exit__(None, None, None)
    for thread in threads:
        thread.join(10)
    assert order == ["big", "small"]  # the small one fitted first, but did not jump the queue
    assert budget.held_bytes == 0


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    budget = AudioBudget(100, max_waiting=5)
    cancel = threading.Event()
    with budget.hold(100, "first", _never):
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(budget._acquire, 50, "second", cancel.is_set)
            assert wait_until(lambda: budget.waiting == 1, timeout=10)
            cancel.set()
            with pytest.raises(Cancelled):
                waiting.result(10)
        assert budget.waiting == 0 and budget.held_bytes == 100


def test_the_options_parse_and_bound() -> None:
    opts = parse_options(["audio_memory_mb:512", "max_waiting_requests:0"])
    assert (opts.audio_memory_mb, opts.max_waiting_requests) == (512, 0)
    assert parse_options([]).audio_memory_mb is None
    with pytest.raises(ValueError, match="audio_memory_mb"):
        parse_options(["audio_memory_mb:10"])


def _gate(harness: Harness) -> threading.Event:
    """Hold every model call until the returned event is set."""
    model = harness.engine.current
    gate = threading.Event()
    run = model.batcher._run_batch

    def gated(jobs):  # type: ignore[no-untyped-def]
        gate.wait(60)
        return run(jobs)

    model.batcher._run_batch = gated
    return gate


def test_requests_past_the_budget_wait_or_are_refused_and_the_worker_keeps_serving(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path]
) -> None:
    """A budget with room for one request and one waiter: of four concurrent requests, two are served (one after
    waiting), two are refused with RESOURCE_EXHAUSTED naming both options; then the account is empty."""
    need = request_bytes(parse_options([]))
    mb = -(-need // MIB)
    assert harness.load(checkpoints["asr"], f"audio_memory_mb:{mb}", "max_waiting_requests:1").success
    budget = harness.engine.budget
    assert budget.limit_bytes == mb * MIB
    gate = _gate(harness)
    with ThreadPoolExecutor(4) as pool:
        served = [pool.submit(harness.transcribe, audio["wav"])]
        assert wait_until(lambda: budget.held_bytes == need, timeout=30)
        served.append(pool.submit(harness.transcribe, audio["wav"]))
        assert wait_until(lambda: budget.waiting == 1, timeout=30)
        refused = [pool.submit(harness.transcribe, audio["wav"]) for _ in range(2)]
        for future in refused:
            with pytest.raises(grpc.RpcError) as error:
                future.result(30)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "audio_memory_mb" in error.value.details()
            assert "max_waiting_requests" in error.value.details()
        gate.set()
        assert [f.result(60).text for f in served] == [SENTENCE, SENTENCE]
    assert budget.held_bytes == 0 and budget.waiting == 0
    assert harness.transcribe(audio["wav"]).text == SENTENCE


def test_a_request_larger_than_the_budget_is_refused_at_once(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path]
) -> None:
    assert harness.load(checkpoints["asr"], "audio_memory_mb:64").success
    with pytest.raises(grpc.RpcError) as error:
        harness.transcribe(audio["wav"])
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "whole budget of 64 MiB" in error.value.details()
    assert harness.status().state == backend_pb2.StatusResponse.READY


def test_a_cancelled_stream_releases_its_account(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path]
) -> None:
    assert harness.load(checkpoints["asr"]).success
    budget = harness.engine.budget
    gate = _gate(harness)
    call = harness.stub.AudioTranscriptionStream(backend_pb2.TranscriptRequest(dst=str(audio["wav"])), timeout=60)
    assert wait_until(lambda: budget.held_bytes > 0, timeout=30)
    call.cancel()
    gate.set()
    with pytest.raises(grpc.RpcError):
        list(call)
    assert wait_until(lambda: budget.held_bytes == 0, timeout=30)
    assert harness.transcribe(audio["wav"]).text == SENTENCE


def test_live_sessions_count_against_the_budget(harness: Harness, checkpoints: dict[str, Path]) -> None:
    """A live session is refused while the budget is taken (no queue), and served, then released, once it is
    free."""
    from tests.test_live import ON, code_of, config, run_live, speech, split

    assert harness.load(checkpoints["asr"], *ON, "audio_memory_mb:64", "max_waiting_requests:0").success
    budget = harness.engine.budget
    with budget.hold(budget.limit_bytes, "everything", _never):
        code, details = code_of(harness.stub.AudioTranscriptionLive(iter([config()]), timeout=30))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "audio_memory_mb" in details
    _, final = split(run_live(harness, speech("quiet.opus")))
    assert final.text == SENTENCE
    assert wait_until(lambda: budget.held_bytes == 0, timeout=10)
