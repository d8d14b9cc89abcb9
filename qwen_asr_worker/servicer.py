"""The gRPC servicer: converts between LocalAI's proto messages and the engine's domain types.

No model logic lives here. Each handler parses its request, calls the engine, and builds the reply; every
exception is mapped to a status code in one place (`_status_for`), with the domain's message, so a client
always learns what went wrong and the worker keeps serving.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np

import backend_pb2
import backend_pb2_grpc

from .audio import AudioError
from .diarization import DiarizeSettings
from .engine import (
    Diarization,
    DiarizationRequest,
    Engine,
    Granularity,
    LoadSpec,
    State,
    Transcription,
    TranscriptionRequest,
)
from .errors import Cancelled, InvalidRequest, ModelIdentityMismatch, NotReady, Overloaded, Unsupported, shown
from .languages import LanguageError, resolve_language
from .live import AudioInbox, LiveConfig, LiveUpdate, check_sample_rate, drive
from .models import resolve_reference
from .options import OptionsError, parse_live_params, parse_options

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 16_384
NS_PER_SECOND = 1_000_000_000
_GRANULARITIES = {"word": Granularity.WORD, "segment": Granularity.SEGMENT}
_STATES = {
    State.UNINITIALIZED: backend_pb2.StatusResponse.UNINITIALIZED,
    State.READY: backend_pb2.StatusResponse.READY,
    State.BUSY: backend_pb2.StatusResponse.BUSY,
    State.ERROR: backend_pb2.StatusResponse.ERROR,
}

T = TypeVar("T")


def _status_for(exc: BaseException, context: grpc.ServicerContext) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidRequest | AudioError | LanguageError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotReady):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, Unsupported):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc)
    if isinstance(exc, ModelIdentityMismatch):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, Cancelled):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return (grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED), str(exc)
    log.exception("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc} (see the worker log)"


def _abort(exc: Exception, context: grpc.ServicerContext, rpc: str, started: float) -> Any:
    code, message = _status_for(exc, context)
    log.info("%s failed after %.2f s with %s: %s", rpc, time.perf_counter() - started, code.name, message)
    context.abort(code, message)


def _unary(handler: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(handler)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> T:
        started = time.perf_counter()
        try:
            return handler(self, request, context)
        except Exception as exc:
            return _abort(exc, context, handler.__name__, started)

    return wrapper


def _streaming(handler: Callable[..., Iterable[T]]) -> Callable[..., Iterator[T]]:
    @functools.wraps(handler)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[T]:
        started = time.perf_counter()
        try:
            yield from handler(self, request, context)
        except Exception as exc:
            _abort(exc, context, handler.__name__, started)

    return wrapper


def parse_granularity(values: Iterable[str]) -> Granularity:
    """`word` (with or without `segment`) → WORD; `segment` → SEGMENT; nothing → NONE."""
    found = set()
    for raw in values:
        value = raw.strip().lower()
        if value not in _GRANULARITIES:
            raise InvalidRequest(f"unknown timestamp granularity '{shown(raw, 40)}'; use 'word' and/or 'segment'")
        found.add(_GRANULARITIES[value])
    if Granularity.WORD in found:
        return Granularity.WORD
    return Granularity.SEGMENT if found else Granularity.NONE


def to_request(request: backend_pb2.TranscriptRequest) -> TranscriptionRequest:
    """Validate a proto request and turn it into the engine's request.

    Every field LocalAI fills by default is served: `diarize` (true unless the form says false) and
    `temperature` go to the engine, which serves them its own way; `threads` (the model config's) is not per
    request here, since torch's CPU threads are process-wide and set at LoadModel; `stream` is the RPC's choice.
    Only `translate=true` is refused: the model cannot translate.
    """
    if request.translate:
        raise InvalidRequest(
            "translation is not supported: Qwen3-ASR transcribes in the spoken language; send translate=false "
            "(in LocalAI, remove 'translate: true' from the model YAML's parameters)"
        )
    if not request.dst:
        raise InvalidRequest("no audio file given: dst is empty")
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            f"prompt is {len(request.prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted as context"
        )
    return TranscriptionRequest(
        path=request.dst,
        language=resolve_language(request.language),
        context=request.prompt,
        granularity=parse_granularity(request.timestamp_granularities),
        model_identity=request.ModelIdentity,
        diarize=request.diarize,
        temperature=request.temperature,
    )


def to_diarization_request(request: backend_pb2.DiarizeRequest) -> DiarizationRequest:
    """Validate a `Diarize` call: every field is honoured; a bad value is named in the error. `threads` is not per
    request here (torch's CPU threads are process-wide, set at LoadModel)."""
    if not request.dst:
        raise InvalidRequest("no audio file given: dst is empty")
    settings = DiarizeSettings(
        num_speakers=request.num_speakers,
        min_speakers=request.min_speakers,
        max_speakers=request.max_speakers,
        clustering_threshold=request.clustering_threshold,
        min_duration_on=request.min_duration_on,
        min_duration_off=request.min_duration_off,
    )
    return DiarizationRequest(
        path=request.dst,
        settings=settings,
        include_text=request.include_text,
        language=resolve_language(request.language),
        model_identity=request.ModelIdentity,
    )


def to_diarize_response(result: Diarization) -> backend_pb2.DiarizeResponse:
    """Turns as `DiarizeSegment`s, in seconds, labelled `SPEAKER_NN` in order of first appearance."""
    segments = [
        backend_pb2.DiarizeSegment(id=i, start=turn.start, end=turn.end, speaker=turn.speaker, text=text)
        for i, (turn, text) in enumerate(zip(result.turns, result.texts, strict=True))
    ]
    return backend_pb2.DiarizeResponse(
        segments=segments,
        num_speakers=len({turn.speaker for turn in result.turns}),
        duration=result.duration,
        language=result.language,
    )


def _ns(seconds: float) -> int:
    return round(seconds * NS_PER_SECOND)


def to_result(result: Transcription) -> backend_pb2.TranscriptResult:
    """Build the proto result; segment and word times in nanoseconds, words only for `word` granularity."""
    with_words = result.granularity is Granularity.WORD
    segments = [
        backend_pb2.TranscriptSegment(
            id=i,
            start=_ns(seg.start),
            end=_ns(seg.end),
            text=seg.text,
            speaker=seg.speaker,
            words=[
                backend_pb2.TranscriptWord(start=_ns(w.start), end=_ns(w.end), text=w.text)
                for w in (seg.words if with_words else ())
            ],
        )
        for i, seg in enumerate(result.segments)
    ]
    return backend_pb2.TranscriptResult(
        segments=segments, text=result.text, language=result.language, duration=result.duration
    )


def to_live_config(request: backend_pb2.TranscriptLiveRequest) -> LiveConfig:
    """Validate a live session's first message, which must carry its config."""
    if request.WhichOneof("payload") != "config":
        raise InvalidRequest(
            "the first message of a live transcription stream must carry the config (language, sample_rate, "
            "params), not audio; send the config first"
        )
    config = request.config
    try:
        settings = parse_live_params(dict(config.params))
    except OptionsError as exc:
        raise InvalidRequest(str(exc)) from None
    return LiveConfig(resolve_language(config.language), check_sample_rate(config.sample_rate), settings)


def to_live_response(event: LiveUpdate | Transcription) -> backend_pb2.TranscriptLiveResponse:
    """A delta with its words (nanoseconds from the stream's start), or the terminal final result."""
    if isinstance(event, Transcription):
        return backend_pb2.TranscriptLiveResponse(final_result=to_result(event))
    words = [backend_pb2.TranscriptWord(start=_ns(w.start), end=_ns(w.end), text=w.text) for w in event.words]
    return backend_pb2.TranscriptLiveResponse(delta=event.delta, words=words)


def read_live_audio(
    requests: Iterator[backend_pb2.TranscriptLiveRequest], inbox: AudioInbox, is_active: Callable[[], bool]
) -> None:
    """Hand a live stream's audio messages to the session (runs on its own thread); a bad message or a broken
    stream is handed over as the error that ends the session."""
    try:
        for number, message in enumerate(requests, start=2):
            kind = message.WhichOneof("payload")
            if kind == "audio":
                inbox.put(np.asarray(message.audio.pcm, np.float32))
                continue
            if kind == "config":
                problem = "carries a second config; a session takes one, first (open a new stream to change it)"
            else:
                problem = "is empty; set its audio (or, first, its config)"
            inbox.put(InvalidRequest(f"live transcription message {number} {problem}"))
            return
        inbox.end()
    except Exception as exc:
        inbox.put(exc if is_active() else Cancelled("the client cancelled the live session"))


def to_load_spec(request: backend_pb2.ModelOptions) -> LoadSpec:
    """Parse options and resolve the model reference (`ModelFile` when it exists, else `Model`)."""
    items = list(request.Options)
    if request.DType and not any(i.split(":", 1)[0].strip().lower() in ("torch_dtype", "dtype") for i in items):
        items.append(f"torch_dtype:{request.DType}")
    options = parse_options(items)
    model_file = request.ModelFile
    if model_file and os.path.exists(model_file):
        reference = model_file
    else:
        reference = resolve_reference(request.Model, request.ModelPath, what="model")
    return LoadSpec(
        name=request.Model,
        reference=reference,
        model_path=request.ModelPath,
        options=options,
        cuda=request.CUDA,
        threads=request.Threads,
    )


class BackendServicer(backend_pb2_grpc.BackendServicer):
    """LocalAI's `backend.Backend` service on top of an `Engine`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def Health(self, request: backend_pb2.HealthMessage, context: grpc.ServicerContext) -> backend_pb2.Reply:
        return backend_pb2.Reply(message=b"OK")

    def LoadModel(self, request: backend_pb2.ModelOptions, context: grpc.ServicerContext) -> backend_pb2.Result:
        try:
            spec = to_load_spec(request)
        except (OptionsError, InvalidRequest) as exc:
            log.warning("LoadModel rejected: %s", exc)
            self.engine.record_load_failure(str(exc))
            return backend_pb2.Result(success=False, message=str(exc))
        except Exception as exc:  # LocalAI reads every load failure from Result, never from a status
            log.exception("LoadModel options could not be read")
            message = f"LoadModel could not read its request: {type(exc).__name__}: {exc}"
            self.engine.record_load_failure(message)
            return backend_pb2.Result(success=False, message=message)
        try:
            model = self.engine.load(spec)
        except InvalidRequest as exc:
            log.warning("LoadModel rejected: %s", exc)
            return backend_pb2.Result(success=False, message=str(exc))
        except Exception as exc:
            log.exception("LoadModel failed")
            return backend_pb2.Result(success=False, message=f"failed to load model {request.Model!r}: {exc}")
        aligner = "attached" if model.aligner_attached else "loads on the first timestamp request"
        if not spec.options.timestamps_enabled:
            aligner = "disabled"
        return backend_pb2.Result(
            success=True,
            message=f"loaded {spec.reference} on {model.device} ({str(model.dtype).removeprefix('torch.')}); "
            f"forced aligner {aligner}",
        )

    def Free(self, request: backend_pb2.HealthMessage, context: grpc.ServicerContext) -> backend_pb2.Result:
        freed = self.engine.free()
        return backend_pb2.Result(success=True, message="model unloaded" if freed else "no model was loaded")

    def Status(self, request: backend_pb2.HealthMessage, context: grpc.ServicerContext) -> backend_pb2.StatusResponse:
        status = self.engine.status()
        breakdown = {
            "base_model_weights": status.base_bytes,
            "aligner_weights": status.aligner_bytes,
            "rss": status.rss_bytes,
        }
        if status.cuda_bytes:
            breakdown["cuda_allocated"] = status.cuda_bytes
        if status.diarizer_bytes:
            breakdown["diarization_weights"] = status.diarizer_bytes
        return backend_pb2.StatusResponse(
            state=_STATES[status.state],
            memory=backend_pb2.MemoryUsageData(total=status.rss_bytes, breakdown=breakdown),
        )

    @_unary
    def AudioTranscription(
        self, request: backend_pb2.TranscriptRequest, context: grpc.ServicerContext
    ) -> backend_pb2.TranscriptResult:
        result = self.engine.transcribe(to_request(request), cancelled=lambda: not context.is_active())
        return to_result(result)

    @_unary
    def Diarize(
        self, request: backend_pb2.DiarizeRequest, context: grpc.ServicerContext
    ) -> backend_pb2.DiarizeResponse:
        result = self.engine.diarize(to_diarization_request(request), cancelled=lambda: not context.is_active())
        return to_diarize_response(result)

    @_unary
    def VAD(self, request: backend_pb2.VADRequest, context: grpc.ServicerContext) -> backend_pb2.VADResponse:
        samples = np.asarray(request.audio, np.float32)
        runs = self.engine.speech(samples, request.ModelIdentity)
        return backend_pb2.VADResponse(segments=[backend_pb2.VADSegment(start=a, end=b) for a, b in runs])

    @_streaming
    def AudioTranscriptionLive(
        self, request_iterator: Iterator[backend_pb2.TranscriptLiveRequest], context: grpc.ServicerContext
    ) -> Iterator[backend_pb2.TranscriptLiveResponse]:
        requests = iter(request_iterator)
        first = next(requests, None)
        if first is None:  # the client closed without a config: nothing to do
            return
        config = to_live_config(first)
        with self.engine.live(config, cancelled=lambda: not context.is_active()) as session:
            yield backend_pb2.TranscriptLiveResponse(ready=True)
            inbox = AudioInbox()
            threading.Thread(
                target=read_live_audio, args=(requests, inbox, context.is_active), name="live-reader", daemon=True
            ).start()
            try:
                for event in drive(session, inbox):
                    yield to_live_response(event)
            finally:
                inbox.stop()

    @_streaming
    def AudioTranscriptionStream(
        self, request: backend_pb2.TranscriptRequest, context: grpc.ServicerContext
    ) -> Iterator[backend_pb2.TranscriptStreamResponse]:
        for event in self.engine.stream(to_request(request), cancelled=lambda: not context.is_active()):
            if isinstance(event, Transcription):
                yield backend_pb2.TranscriptStreamResponse(final_result=to_result(event))
            else:
                yield backend_pb2.TranscriptStreamResponse(delta=event)
