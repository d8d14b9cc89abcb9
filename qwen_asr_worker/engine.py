"""The model holder: the loaded base model, its request batcher and its lazily attached forced aligner.

The base Qwen3-ASR model loads eagerly at LoadModel. The Qwen3-ForcedAligner costs about as much memory again,
so it loads on the first request that asks for timestamps, under a lock, exactly once, and is attached to the
loaded model in place (`Qwen3ASRModel.forced_aligner` is a plain attribute): the base model is never
reloaded, copied or dropped for it. Requests that want no timestamps never touch that lock.

Every request holds a reference to the `LoadedModel` it started on, so LoadModel and Free swap the current
model without disturbing requests in flight; a retired model is closed when its last request finishes.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import models, runtime, torch_state, vad
from .audio import SAMPLE_RATE, load_audio
from .batcher import AsrBatcher, AsrJob
from .chunking import Window, plan_speech_windows, plan_windows
from .errors import Cancelled, ModelIdentityMismatch, NotReady
from .languages import detected_to_iso, to_iso
from .options import WorkerOptions
from .segments import Segment, Word, build_segments

if TYPE_CHECKING:
    from qwen_asr import Qwen3ASRModel, Qwen3ForcedAligner

log = logging.getLogger(__name__)

MIN_WINDOW_SAMPLES = SAMPLE_RATE // 2  # the model needs half a second; shorter windows are padded with silence
PROMPT_TOKENS = 16  # room for the "language X<asr_text>" prefix the model writes before the transcript
_POLL_S = 0.05


class Granularity(enum.Enum):
    """What timing detail a request asked for."""

    NONE = "none"
    SEGMENT = "segment"
    WORD = "word"


class State(enum.Enum):
    """The worker's state as `Status` reports it."""

    UNINITIALIZED = "uninitialized"
    READY = "ready"
    BUSY = "busy"
    ERROR = "error"


@dataclass(frozen=True)
class LoadSpec:
    """Everything LoadModel decided: what to load, where, how."""

    name: str
    reference: str
    model_path: str
    options: WorkerOptions
    cuda: bool = False
    threads: int = 0


@dataclass(frozen=True)
class TranscriptionRequest:
    """One request in domain terms: a decoded-later file path, a canonical language or None, a context."""

    path: str
    language: str | None = None
    context: str = ""
    granularity: Granularity = Granularity.NONE
    model_identity: str = ""


@dataclass(frozen=True)
class Transcription:
    """The result: text, ISO language code(s), seconds of audio, and sentence segments."""

    text: str
    language: str
    duration: float
    segments: tuple[Segment, ...]
    granularity: Granularity


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot for the `Status` rpc."""

    state: State
    base_bytes: int
    aligner_bytes: int
    rss_bytes: int
    cuda_bytes: int
    message: str = ""


IsCancelled = Callable[[], bool]


def _never() -> bool:
    return False


class LoadedModel:
    """One loaded base model with its batcher and its aligner slot."""

    def __init__(self, spec: LoadSpec, asr: Qwen3ASRModel, device: str, dtype: torch.dtype) -> None:
        self.spec = spec
        self.asr: Qwen3ASRModel | None = asr
        self.device = device
        self.dtype = dtype
        self.aligner_loads = 0
        self.windows_transcribed = 0
        self.users = 0
        self.retired = False
        self._aligner_lock = threading.Lock()
        self._aligner_users = 0
        self._aligner_last_used = time.monotonic()
        self._closed = threading.Event()
        opts = spec.options
        self.batcher = AsrBatcher(
            self._run_batch,
            max_batch_size=opts.max_batch_size,
            window_s=opts.batch_window_ms / 1000.0,
            name=f"asr-batcher-{spec.name or 'model'}",
            max_batch_samples=int(opts.max_batch_seconds * SAMPLE_RATE),
        )
        if opts.aligner_idle_unload > 0:
            threading.Thread(target=self._idle_watch, name="aligner-idle", daemon=True).start()

    # --- the base model -------------------------------------------------------------------------------
    def _run_batch(self, jobs: Sequence[AsrJob]) -> list[tuple[str, str]]:
        asr = self.asr
        if asr is None:
            raise NotReady("the model was unloaded while this request waited; call LoadModel again")
        self.windows_transcribed += len(jobs)
        asr.max_new_tokens = self.token_budget(max(len(job.samples) for job in jobs))  # one batcher thread
        with torch_state.forward_pass():
            results = asr.transcribe(
                audio=[(job.samples, SAMPLE_RATE) for job in jobs],
                context=[job.context for job in jobs],
                language=[job.language for job in jobs],
                return_time_stamps=False,
            )
        runtime.trim_heap()
        return [(r.language, r.text) for r in results]

    def token_budget(self, samples: int) -> int:
        """How many tokens a batch whose longest window has `samples` may generate: `max_new_tokens`, or less
        with `max_tokens_per_second` (a window cannot hold more speech than its length allows)."""
        opts = self.spec.options
        if opts.max_tokens_per_second <= 0:
            return opts.max_new_tokens
        per_audio = math.ceil(opts.max_tokens_per_second * samples / SAMPLE_RATE)
        return max(1, min(opts.max_new_tokens, PROMPT_TOKENS + per_audio))

    # --- the aligner ----------------------------------------------------------------------------------
    @property
    def aligner_attached(self) -> bool:
        """Whether the forced aligner is loaded and attached right now."""
        return self.asr is not None and self.asr.forced_aligner is not None

    def acquire_aligner(self) -> Qwen3ForcedAligner:
        """Return the attached aligner, loading and attaching it first if needed (once, under a lock).

        Callers must pair this with `release_aligner()`; while any caller holds it the idle unloader waits.
        """
        opts = self.spec.options
        if not opts.timestamps_enabled:
            raise NotReady(
                "timestamps are disabled for this model (forced_aligner:none); "
                "set the forced_aligner option to an aligner to get word or segment timestamps"
            )
        with self._aligner_lock:
            asr = self.asr
            if asr is None:
                raise NotReady("the model was unloaded; call LoadModel again")
            if asr.forced_aligner is None:
                asr.forced_aligner = self._load_aligner()
                self.aligner_loads += 1
            self._aligner_users += 1
            self._aligner_last_used = time.monotonic()
            return asr.forced_aligner

    def release_aligner(self) -> None:
        """Mark the end of one use of the aligner (starts the idle clock)."""
        with self._aligner_lock:
            self._aligner_users -= 1
            self._aligner_last_used = time.monotonic()

    def _load_aligner(self) -> Qwen3ForcedAligner:
        opts = self.spec.options
        assert opts.forced_aligner is not None
        try:
            path = models.resolve_reference(opts.forced_aligner, self.spec.model_path, what="forced_aligner")
            dtype = self.dtype
            if opts.aligner_dtype is not None:
                dtype, _ = runtime.pick_dtype(opts.aligner_dtype, self.device)
            return models.load_aligner(
                path, device=self.device, dtype=dtype, attn_implementation=opts.attn_implementation
            )
        except NotReady:
            raise
        except Exception as exc:
            log.warning("forced aligner %s failed to load: %s", opts.forced_aligner, exc)
            raise NotReady(
                f"the forced aligner {opts.forced_aligner!r} could not be loaded: {exc}{models.offline_hint()}; "
                "fix the forced_aligner option (a Hugging Face id, an absolute path, or a path under the "
                "models directory); plain transcription still works"
            ) from exc

    def detach_aligner(self) -> bool:
        """Drop the aligner and give its memory back. Returns whether one was attached."""
        with self._aligner_lock:
            if self.asr is None or self.asr.forced_aligner is None:
                return False
            self.asr.forced_aligner = None
        runtime.release_memory()
        log.info("forced aligner detached and freed")
        return True

    def _idle_watch(self) -> None:
        idle = self.spec.options.aligner_idle_unload
        while not self._closed.wait(min(1.0, idle / 4)):
            with self._aligner_lock:
                due = (
                    self._aligner_users == 0
                    and self.aligner_attached
                    and time.monotonic() - self._aligner_last_used >= idle
                )
            if due:
                log.info("no timestamp request for %.1f s", idle)
                self.detach_aligner()

    # --- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the batcher and watcher and drop both models."""
        self._closed.set()
        self.batcher.close()
        with self._aligner_lock:
            self.asr = None
        runtime.release_memory()

    def weight_bytes(self) -> tuple[int, int]:
        """Bytes of base-model weights and of aligner weights (0 when not attached)."""
        asr = self.asr
        if asr is None:
            return 0, 0
        aligner = asr.forced_aligner
        return runtime.module_bytes(asr.model), runtime.module_bytes(aligner.model if aligner else None)


class Engine:
    """Owns the current `LoadedModel` and runs requests on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._current: LoadedModel | None = None
        self._ever_loaded = False
        self._error = ""
        self._inflight = 0

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
        device = runtime.pick_device(opts.device, spec.cuda)
        dtype, why = runtime.pick_dtype(opts.torch_dtype, device)
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
        return EngineStatus(state, base, aligner, runtime.rss_bytes(), runtime.cuda_allocated_bytes(), message)

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

    def transcribe(self, request: TranscriptionRequest, cancelled: IsCancelled = _never) -> Transcription:
        """Transcribe a whole file and return the final result."""
        for event in self.stream(request, cancelled, progressive=False):
            if isinstance(event, Transcription):
                return event
        raise AssertionError("stream ended without a final result")

    def stream(
        self, request: TranscriptionRequest, cancelled: IsCancelled = _never, *, progressive: bool = True
    ) -> Iterator[str | Transcription]:
        """Yield one text delta per finished window (when `progressive`), then the final `Transcription`."""
        model = self._acquire(request.model_identity)
        try:
            yield from _Run(model, request, cancelled, progressive).events()
        finally:
            self._release(model)


class _Run:
    """One request's pass over its windows: ASR through the batcher, then alignment when asked."""

    def __init__(
        self, model: LoadedModel, request: TranscriptionRequest, cancelled: IsCancelled, progressive: bool
    ) -> None:
        self.model = model
        self.request = request
        self.cancelled = cancelled
        self.progressive = progressive
        self.opts = model.spec.options
        self.want_timestamps = request.granularity is not Granularity.NONE

    def events(self) -> Iterator[str | Transcription]:
        started = time.perf_counter()
        if self.want_timestamps and not self.opts.timestamps_enabled:
            self.model.acquire_aligner()  # raises the forced_aligner:none error before any work
        samples = load_audio(self.request.path)
        duration = len(samples) / SAMPLE_RATE
        windows = plan_request(samples, self.opts)
        text = ""
        languages: list[str] = []
        pieces: list[tuple[Window, str]] = []
        words: list[Word] = []
        aligner = None
        try:
            for group in self._groups(windows):
                self._check_cancelled()
                futures = [self._submit(samples, w) for w in group]
                if self.want_timestamps and aligner is None:
                    aligner = self.model.acquire_aligner()  # loads while the batcher runs the ASR
                results = self._wait_all(futures)
                for window, (language, piece) in zip(group, results, strict=True):
                    languages.append(language)
                    delta = _joiner(text, piece) + piece if piece else ""
                    text += delta
                    pieces.append((window, piece))
                    if self.progressive and delta:
                        yield delta
                if aligner is not None:
                    words.extend(self._align(aligner, samples, group, results))
        finally:
            if aligner is not None:
                self.model.release_aligner()
        result = self._result(text, languages, words, duration, pieces)
        self._log(result, windows, time.perf_counter() - started)
        yield result

    def _log(self, result: Transcription, windows: list[Window], elapsed: float) -> None:
        """One line per finished request: what was heard, what was skipped, how fast."""
        skipped = ""
        if self.opts.vad:
            heard = sum(w.duration_seconds for w in windows)
            skipped = f", {max(0.0, result.duration - heard):.1f} s skipped (no speech)"
        log.info(
            "transcribed %.1f s of audio in %d window%s%s; timestamps %s; %.2f s wall, %.1fx realtime; language %s",
            result.duration,
            len(windows),
            "" if len(windows) == 1 else "s",
            skipped,
            self.request.granularity.value,
            elapsed,
            result.duration / elapsed if elapsed > 0 else 0.0,
            result.language or "-",
        )

    def _groups(self, windows: list[Window]) -> Iterator[list[Window]]:
        """All windows at once, or for a stream the first alone (an early first delta), then batches."""
        if not windows:
            return
        if not self.progressive:
            yield windows
            return
        yield windows[:1]
        size = max(1, self.opts.max_batch_size)
        for i in range(1, len(windows), size):
            yield windows[i : i + size]

    def _submit(self, samples: np.ndarray, window: Window) -> Future[tuple[str, str]]:
        return self.model.batcher.submit(
            _pad(samples[window.start : window.end]), self.request.context, self.request.language
        )

    def _check_cancelled(self) -> None:
        if self.cancelled():
            raise Cancelled("the client cancelled the request or its deadline passed")

    def _wait_all(self, futures: list[Future[tuple[str, str]]]) -> list[tuple[str, str]]:
        """Wait for a group's windows in order, polling for cancellation; a cancel drops the queued ones."""
        results = []
        for future in futures:
            while True:
                try:
                    results.append(future.result(timeout=_POLL_S))
                    break
                except FutureTimeout:
                    if self.cancelled():
                        for pending in futures:
                            pending.cancel()
                        raise Cancelled("the client cancelled the request or its deadline passed") from None
        return results

    def _align(
        self,
        aligner: Qwen3ForcedAligner,
        samples: np.ndarray,
        group: list[Window],
        results: list[tuple[str, str]],
    ) -> list[Word]:
        todo = [(w, lang, piece) for w, (lang, piece) in zip(group, results, strict=True) if piece.strip()]
        if not todo:
            return []
        self._check_cancelled()
        with torch_state.forward_pass():
            aligned = aligner.align(
                audio=[(_pad(samples[w.start : w.end]), SAMPLE_RATE) for w, _, _ in todo],
                text=[piece for _, _, piece in todo],
                language=[self.request.language or lang.split(",")[0] for _, lang, _ in todo],
            )
        runtime.trim_heap()
        words: list[Word] = []
        for (window, _, _), result in zip(todo, aligned, strict=True):
            offset = window.start / SAMPLE_RATE
            words.extend(Word(it.text, it.start_time + offset, it.end_time + offset) for it in result.items)
        return words

    def _result(
        self,
        text: str,
        languages: list[str],
        words: list[Word],
        duration: float,
        pieces: list[tuple[Window, str]],
    ) -> Transcription:
        language = to_iso(self.request.language) if self.request.language else detected_to_iso(",".join(languages))
        if self.want_timestamps:
            segments = build_segments(text, words, duration, max_segment_seconds=self.opts.max_segment_seconds)
        elif self.opts.vad:  # one segment per window, from its first to its last speech
            segments = [
                Segment(text=piece, start=w.speech_seconds[0], end=w.speech_seconds[1], words=())
                for w, piece in pieces
                if piece.strip()
            ]
        elif text:
            segments = [Segment(text=text, start=0.0, end=duration, words=())]
        else:
            segments = []
        return Transcription(text, language, duration, tuple(segments), self.request.granularity)


def plan_request(samples: np.ndarray, opts: WorkerOptions) -> list[Window]:
    """The windows a request sends to the model: the whole file, or with voice activity detection only its speech.

    The same with and without timestamps, streamed or not: they depend on the audio and the options alone.
    """
    if not opts.vad:
        return plan_windows(samples, max_seconds=opts.chunk_seconds)
    regions = vad.detect_speech(samples, opts.vad_settings)
    return plan_speech_windows(samples, regions, max_seconds=opts.chunk_seconds)


def _pad(samples: np.ndarray) -> np.ndarray:
    if len(samples) >= MIN_WINDOW_SAMPLES:
        return samples
    return np.pad(samples, (0, MIN_WINDOW_SAMPLES - len(samples)))


def _is_cjk(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F") and not unicodedata.category(ch).startswith("Z")


def _joiner(before: str, after: str) -> str:
    """The separator between two windows' texts: none around CJK, a space elsewhere."""
    if not before or not after or before[-1].isspace() or after[0].isspace():
        return ""
    return "" if _is_cjk(before[-1]) or _is_cjk(after[0]) else " "
