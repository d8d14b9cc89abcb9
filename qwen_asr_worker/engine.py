"""The engine: which `LoadedModel` is current, and the requests that run on it.

Every request holds a reference to the `LoadedModel` it started on, so LoadModel and Free swap the current
model without disturbing requests in flight; a retired model is closed when its last request finishes. What a
request does with the model (windows, batcher, aligner, result) is `pipeline.RequestRun`; a live session is
`live.LiveSession`; the model itself, its batcher and its aligner slot are `loaded_model.LoadedModel`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from . import diarization, models, runtime, vad
from .admission import MIB, AudioBudget
from .audio import SAMPLE_RATE, open_audio
from .diarization import DiarizeSettings
from .errors import InvalidRequest, ModelIdentityMismatch, NotReady, Unsupported, shown
from .languages import to_iso
from .live import LiveConfig, LiveSession, session_bytes
from .loaded_model import LoadedModel, LoadSpec
from .pipeline import (  # the request types are re-exported: callers know them as the engine's
    Granularity,
    IsCancelled,
    RequestRun,
    Transcription,
    TranscriptionRequest,
    joiner,
    never_cancelled,
    request_bytes,
)
from .speakers import Turn, texts_for_turns

__all__ = [
    "DiarizationRequest",
    "Engine",
    "Granularity",
    "LoadSpec",
    "LoadedModel",
    "State",
    "Transcription",
    "TranscriptionRequest",
]

log = logging.getLogger(__name__)


class State(enum.Enum):
    """The worker's state as `Status` reports it."""

    UNINITIALIZED = "uninitialized"
    READY = "ready"
    BUSY = "busy"
    ERROR = "error"


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot for the `Status` rpc."""

    state: State
    base_bytes: int
    aligner_bytes: int
    rss_bytes: int
    cuda_bytes: int
    message: str = ""
    diarizer_bytes: int = 0


@dataclass(frozen=True)
class DiarizationRequest:
    """A `Diarize` call in domain terms: the file, the speaker hints, and whether to add each turn's text."""

    path: str
    settings: DiarizeSettings = field(default_factory=DiarizeSettings)
    include_text: bool = False
    language: str | None = None
    model_identity: str = ""


@dataclass(frozen=True)
class Diarization:
    """Who spoke when in a file: turns (labelled in order of first appearance), each turn's text when asked."""

    turns: tuple[Turn, ...]
    texts: tuple[str, ...]
    duration: float
    language: str


class Engine:
    """Owns the current `LoadedModel` and runs requests on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._current: LoadedModel | None = None
        self._ever_loaded = False
        self._error = ""
        self._inflight = 0
        self.budget = AudioBudget()  # the audio memory requests and live sessions hold (admission.py)

    # --- load / free ----------------------------------------------------------------------------------
    def load(self, spec: LoadSpec) -> LoadedModel:
        """Load a base model and make it current; the previous one retires when its requests finish.

        A failed load leaves the previous model serving. Raises the loader's exception.
        """
        with self._load_lock:
            try:
                model = self._build(spec)
            except Exception as exc:
                self.record_load_failure(str(exc))
                raise
            opts = spec.options
            limit = None if opts.audio_memory_mb is None else opts.audio_memory_mb * MIB
            self.budget.configure(limit, opts.max_waiting_requests)
            with self._lock:
                old, self._current = self._current, model
                self._ever_loaded = True
                self._error = ""
                if old is not None:
                    self._retire(old)
            return model

    def record_load_failure(self, message: str) -> None:
        """Remember a failed LoadModel for `Status` (ERROR while no model is loaded)."""
        with self._lock:
            self._error = message

    def _build(self, spec: LoadSpec) -> LoadedModel:
        opts = spec.options
        if opts.diarization is not None:
            try:
                diarization.check_available(opts.diarization, spec.model_path)
            except NotReady as exc:
                raise InvalidRequest(str(exc)) from None
        device = runtime.pick_device(opts.device, spec.cuda)
        accelerated = opts.fast_decode or opts.quantization != "none"
        dtype, bf16_weights, why = models.pick_precision(opts.torch_dtype, device, accelerated)
        log.info("dtype %s (%s)", str(dtype).removeprefix("torch."), why)
        if spec.threads > 0:
            threads = min(spec.threads, runtime.usable_cpus())
            if threads < spec.threads:
                log.info("Threads=%d capped at the %d CPUs this process may use", spec.threads, threads)
            torch.set_num_threads(threads)  # process-wide, and it outlives this load: never above the CPUs
        asr = models.load_asr(
            spec.reference,
            device=device,
            dtype=dtype,
            attn_implementation=opts.attn_implementation,
            max_inference_batch_size=opts.max_inference_batch_size,
            max_new_tokens=opts.max_new_tokens,
            fast_decode=opts.fast_decode,
            quantization=opts.quantization,
            bf16_weights=bf16_weights,
            encoder_attention=opts.encoder_attention,
        )
        model = LoadedModel(spec, asr, device, dtype)
        if opts.preload_aligner and opts.timestamps_enabled:
            try:
                model.acquire_aligner()
                model.release_aligner()
            except Exception:
                model.close()
                raise
        return model

    def free(self) -> bool:
        """Unload every model; requests in flight finish first. Returns whether a model was loaded."""
        with self._lock:
            old, self._current = self._current, None
            if old is not None:
                self._retire(old)
        return old is not None

    def _retire(self, model: LoadedModel) -> None:
        model.retired = True
        if model.users == 0:
            model.close()

    @property
    def current(self) -> LoadedModel | None:
        """The model new requests run on, or None."""
        return self._current

    def status(self) -> EngineStatus:
        """State and memory figures for `Status`."""
        with self._lock:
            model, inflight, error, ever = self._current, self._inflight, self._error, self._ever_loaded
        if model is None:
            state = State.ERROR if error else State.UNINITIALIZED
        else:
            state = State.BUSY if inflight else State.READY
        base, aligner = model.weight_bytes() if model else (0, 0)
        message = error or ("freed" if ever and model is None else "")
        return EngineStatus(
            state,
            base,
            aligner,
            runtime.rss_bytes(),
            runtime.cuda_allocated_bytes(),
            message,
            model.diarizer_bytes() if model else 0,
        )

    # --- requests -------------------------------------------------------------------------------------
    def _acquire(self, identity: str) -> LoadedModel:
        with self._lock:
            model = self._current
            if model is None:
                if self._ever_loaded:
                    raise NotReady("no model is loaded: it was unloaded by Free; call LoadModel again")
                raise NotReady("no model is loaded; call LoadModel first")
            if identity and model.spec.name and identity != model.spec.name:
                raise ModelIdentityMismatch(
                    f"model identity mismatch: the request is for {identity!r} "
                    f"but this worker has {model.spec.name!r} loaded"
                )
            model.users += 1
            self._inflight += 1
            return model

    def _release(self, model: LoadedModel) -> None:
        with self._lock:
            model.users -= 1
            self._inflight -= 1
            if model.retired and model.users == 0:
                model.close()

    def _hold_request(
        self, model: LoadedModel, what: str, cancelled: IsCancelled
    ) -> contextlib.AbstractContextManager[None]:
        """A file request's share of the audio memory budget (`pipeline.request_bytes`), held for the block."""
        return self.budget.hold(request_bytes(model.spec.options), what, cancelled)

    @contextmanager
    def live(self, config: LiveConfig, cancelled: IsCancelled = never_cancelled) -> Iterator[LiveSession]:
        """A live session on the current model, which it holds until the session ends."""
        model = self._acquire("")
        try:
            opts = model.spec.options
            if not opts.live:
                raise Unsupported(
                    "qwen3-asr: live transcription unsupported: this model was loaded with the option live:off; "
                    "remove it to stream, or transcribe whole turns as files"
                )
            if config.settings.words and not opts.timestamps_enabled:
                raise NotReady(
                    "words were asked for (params words=true) but timestamps are disabled for this model "
                    "(forced_aligner:none); set the forced_aligner option or drop the words param"
                )
            with self.budget.hold(session_bytes(config.settings), "a live session", cancelled):
                session = LiveSession(model, config, cancelled)
                try:
                    yield session
                finally:
                    session.close()
        finally:
            self._release(model)

    def transcribe(self, request: TranscriptionRequest, cancelled: IsCancelled = never_cancelled) -> Transcription:
        """Transcribe a whole file and return the final result."""
        for event in self.stream(request, cancelled, progressive=False):
            if isinstance(event, Transcription):
                return event
        raise AssertionError("stream ended without a final result")

    def stream(
        self, request: TranscriptionRequest, cancelled: IsCancelled = never_cancelled, *, progressive: bool = True
    ) -> Iterator[str | Transcription]:
        """Yield one text delta per finished window (when `progressive`), then the final `Transcription`."""
        model = self._acquire(request.model_identity)
        try:
            with self._hold_request(model, f"the request for {shown(request.path)}", cancelled):
                yield from RequestRun(model, request, cancelled, progressive).events()
        finally:
            self._release(model)

    def diarize(self, request: DiarizationRequest, cancelled: IsCancelled = never_cancelled) -> Diarization:
        """Who spoke when in a file; with `include_text`, each turn's words from a diarized transcription (with
        word times when the model has an aligner)."""
        model = self._acquire(request.model_identity)
        try:
            if model.spec.options.diarization is None:
                model.acquire_diarizer()  # raises the "diarization is off" error
            if not request.include_text:
                with (
                    self._hold_request(model, f"diarizing {shown(request.path)}", cancelled),
                    open_audio(request.path) as samples,
                ):
                    diarizer = model.acquire_diarizer()
                    try:
                        turns = tuple(diarizer(samples, request.settings))
                    finally:
                        model.release_diarizer()
                    duration = len(samples) / SAMPLE_RATE
                language = to_iso(request.language) if request.language else ""
                return Diarization(turns, ("",) * len(turns), duration, language)
            timed = model.spec.options.timestamps_enabled
            transcription = TranscriptionRequest(
                path=request.path,
                language=request.language,
                granularity=Granularity.WORD if timed else Granularity.NONE,
                diarize=True,
                speakers=request.settings,
            )
            result = None
            with self._hold_request(model, f"diarizing {shown(request.path)}", cancelled):
                for event in RequestRun(model, transcription, cancelled, False).events():
                    if isinstance(event, Transcription):
                        result = event
            assert result is not None, "a request run always ends with its result"
            pieces = [(s.start, s.end, s.speaker, s.text) for s in result.segments]
            texts = tuple(_joined(parts) for parts in texts_for_turns(result.turns, pieces))
            return Diarization(result.turns, texts, result.duration, result.language)
        finally:
            self._release(model)

    def speech(self, samples: np.ndarray, identity: str = "") -> list[tuple[float, float]]:
        """The speech runs `(start, end)` in seconds of 16-kHz samples, by the loaded model's `vad_threshold`
        and `vad_min_silence_seconds`, unpadded (the `VAD` rpc)."""
        model = self._acquire(identity)
        try:
            opts = model.spec.options
            if len(samples) == 0:
                return []
            if not np.isfinite(samples).all():
                raise InvalidRequest(
                    "VAD audio holds non-finite samples (NaN or infinity); send 16-kHz float samples in [-1, 1]"
                )
            regions = vad.detect_speech(samples, opts.vad_settings)
            return [(r.speech_start / SAMPLE_RATE, r.speech_end / SAMPLE_RATE) for r in regions]
        finally:
            self._release(model)


def _joined(parts: list[str]) -> str:
    text = ""
    for part in parts:
        text += joiner(text, part) + part
    return text
