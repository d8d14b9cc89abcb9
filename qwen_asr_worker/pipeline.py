"""One request's pass over its windows: plan them (voice activity detection or the whole file), run the ASR
through the model's batcher, align when timestamps are asked, and build the result and its log line.

The engine (`engine.py`) owns the models; this module only uses the `LoadedModel` (`loaded_model.py`) a request
was given, so LoadModel and Free can swap models while requests run.
"""

from __future__ import annotations

import enum
import logging
import sys
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import runtime, torch_state, vad
from .audio import SAMPLE_RATE, decode_audio
from .chunking import Window
from .diarization import DiarizeSettings
from .errors import Cancelled
from .languages import detected_to_iso, to_iso
from .options import WorkerOptions
from .planning import WindowPlan
from .segments import Segment, Word, build_segments, repair_times
from .speakers import Turn, speaker_at, word_speakers
from .spool import SPILL_BYTES, Samples

if TYPE_CHECKING:
    from qwen_asr import Qwen3ForcedAligner

    from .loaded_model import LoadedModel

log = logging.getLogger("qwen_asr_worker.engine")  # the request lines stay where operators filter for them

MIN_WINDOW_SAMPLES = SAMPLE_RATE // 2  # the model needs half a second; shorter windows are padded with silence
_POLL_S = 0.05


class Granularity(enum.Enum):
    """What timing detail a request asked for."""

    NONE = "none"
    SEGMENT = "segment"
    WORD = "word"


@dataclass(frozen=True)
class TranscriptionRequest:
    """One request in domain terms: a decoded-later file path, a canonical language or None, a context.

    `diarize` and `temperature` are what the client (or LocalAI's defaults) asked for: `diarize` labels speakers
    when the model was loaded with diarization (else it is served without labels), with the hints in
    `speakers`; decoding is greedy at any temperature.
    """

    path: str
    language: str | None = None
    context: str = ""
    granularity: Granularity = Granularity.NONE
    model_identity: str = ""
    diarize: bool = False
    temperature: float = 0.0
    speakers: DiarizeSettings = field(default_factory=DiarizeSettings)


@dataclass(frozen=True)
class Transcription:
    """The result: text, ISO language code(s), seconds of audio, sentence segments, and (when diarized) the
    speaker turns the segments' labels came from."""

    text: str
    language: str
    duration: float
    segments: tuple[Segment, ...]
    granularity: Granularity
    turns: tuple[Turn, ...] = ()


IsCancelled = Callable[[], bool]


def never_cancelled() -> bool:
    """The default: a request nobody cancels."""
    return False


class RequestRun:
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
        self._note_served_defaults()
        if self.want_timestamps and not self.opts.timestamps_enabled:
            self.model.acquire_aligner()  # raises the forced_aligner:none error before any work
        with decode_audio(self.request.path, spill_bytes=SPILL_BYTES) as samples:  # past it, a temporary file
            diarizing = self.request.diarize and self.opts.diarization is not None
            plan = WindowPlan(
                samples, samples.available, self.opts, keep_probabilities=diarizing, check=self._check_cancelled
            )
            text = ""
            languages: list[str] = []
            pieces: list[tuple[Window, str]] = []
            words: list[Word] = []
            to_align: list[tuple[Window, str, str]] = []
            aligner: list[Qwen3ForcedAligner] = []  # acquired once the first window is queued, if asked

            def load_aligner() -> None:
                if self.want_timestamps:
                    aligner.append(self.model.acquire_aligner())  # loads while the batcher runs the ASR

            try:
                for window, (language, piece) in self._results(samples, plan, load_aligner):
                    languages.append(language)
                    delta = joiner(text, piece) + piece if piece else ""
                    text += delta
                    pieces.append((window, piece))
                    if self.progressive and delta:
                        yield delta
                    if aligner and piece.strip():
                        if self._align_full(to_align, window):
                            words.extend(self._align(aligner[0], samples, to_align))
                            to_align = []
                        to_align.append((window, language, piece))
                if aligner and to_align:
                    words.extend(self._align(aligner[0], samples, to_align))
            finally:
                if aligner:
                    self.model.release_aligner()
            duration = samples.available(sys.maxsize) / SAMPLE_RATE  # decoded to the end by now: exact
            probabilities = plan.probabilities
            if diarizing and probabilities is None:
                probabilities = vad.frame_probabilities(samples)
            turns = self._diarize(samples, probabilities)
        result = self._result(text, languages, words, duration, pieces, turns)
        self._log(result, plan.windows, time.perf_counter() - started)
        yield result

    def _align_full(self, todo: list[tuple[Window, str, str]], window: Window) -> bool:
        """Whether `window` would take the aligner's next call past `max_batch_size` windows or
        `max_batch_seconds` of audio: the aligner runs a call's windows as one padded batch, so its memory grows
        with them."""
        if not todo:
            return False
        audio = sum(w.end - w.start for w, _, _ in todo) + window.end - window.start
        return len(todo) >= self.opts.max_batch_size or audio > self.opts.max_batch_seconds * SAMPLE_RATE

    def _results(
        self, samples: Samples, windows: Iterable[Window], after_first: Callable[[], None]
    ) -> Iterator[tuple[Window, tuple[str, str]]]:
        """Each window with its `(language, text)`, in order; `after_first` runs once the first is queued.

        Windows are gathered into a batch's worth (`max_batch_size`, or no room left in `max_batch_seconds` for
        another full-length window) and submitted together, so the batcher runs them as one call even while the
        file is still decoding; a stream's first window goes alone, for an early first delta. Submitted windows
        are read and queued ahead of the one awaited, up to `max_batch_size` more and two batches' audio, so the
        batcher has a full batch to run while only those windows' samples are in memory. Results already done
        are given before the next window is planned (which may wait for the file to decode further). Leaving
        early (an error, a cancel, a closed stream) cancels what is still queued.
        """
        ahead = max(1, self.opts.max_batch_size)
        longest = max(self.opts.chunk_seconds * SAMPLE_RATE, MIN_WINDOW_SAMPLES)  # no window is longer
        budget = max(2 * self.opts.max_batch_seconds * SAMPLE_RATE, longest)
        batch_audio = self.opts.max_batch_seconds * SAMPLE_RATE
        queued: deque[tuple[Window, Future[tuple[str, str]]]] = deque()
        gathered: list[Window] = []
        first = [True]

        def oldest() -> tuple[Window, tuple[str, str]]:
            window, future = queued[0]
            result = self._wait(future)
            queued.popleft()
            return window, result

        def submit() -> Iterator[tuple[Window, tuple[str, str]]]:
            if not gathered:
                return
            for window in gathered:
                while queued and (
                    len(queued) > ahead or sum(w.end - w.start for w, _ in queued) + window.end - window.start > budget
                ):
                    yield oldest()
                queued.append((window, self._submit(samples, window)))
            gathered.clear()
            if first[0]:
                first[0] = False
                after_first()

        try:
            for window in windows:
                self._check_cancelled()
                gathered.append(window)
                if first[0] and self.progressive:
                    yield from submit()
                    yield oldest()
                elif len(gathered) >= ahead or sum(w.end - w.start for w in gathered) + longest > batch_audio:
                    yield from submit()
                while queued and queued[0][1].done():
                    yield oldest()
            yield from submit()
            while queued:
                yield oldest()
        finally:
            for _, pending in queued:
                pending.cancel()

    def _note_served_defaults(self) -> None:
        """LocalAI's HTTP API sends `diarize=true` unless the form says `false`, and OpenAI clients may send a
        temperature: both are served, and said once per loaded model."""
        if self.request.diarize and self.opts.diarization is None:
            self.model.note_once(
                "diarize",
                "diarize=true asked (LocalAI's HTTP API sends it unless the form says diarize=false): served "
                "without speaker labels, since this model was loaded without diarization; set the model option "
                "diarization:on for labels, or send diarize=false to say you expect none. Said once for this model",
            )
        if self.request.temperature != 0:
            self.model.note_once(
                "temperature",
                "temperature %.4g asked: decoding is greedy (the most likely token each step), so it is not used. "
                "Said once for this model",
                self.request.temperature,
            )

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

    def _diarize(self, samples: Samples, probabilities: np.ndarray | None) -> tuple[Turn, ...]:
        """Who spoke when, for a request that asked (`diarize`) on a model loaded with diarization; the VAD's
        frame probabilities are the ones the windows were planned from."""
        if not self.request.diarize or self.opts.diarization is None:
            return ()
        self._check_cancelled()
        diarizer = self.model.acquire_diarizer()
        try:
            return tuple(diarizer(samples, self.request.speakers, probabilities))
        finally:
            self.model.release_diarizer()

    def _submit(self, samples: Samples, window: Window) -> Future[tuple[str, str]]:
        return self.model.batcher.submit(
            pad_window(samples[window.start : window.end]), self.request.context, self.request.language
        )

    def _check_cancelled(self) -> None:
        if self.cancelled():
            raise Cancelled("the client cancelled the request or its deadline passed")

    def _wait(self, future: Future[tuple[str, str]]) -> tuple[str, str]:
        """Wait for one window's result, polling for cancellation (the caller cancels what is queued)."""
        while True:
            try:
                return future.result(timeout=_POLL_S)
            except FutureTimeout:
                if self.cancelled():
                    raise Cancelled("the client cancelled the request or its deadline passed") from None

    def _align(self, aligner: Qwen3ForcedAligner, samples: Samples, todo: list[tuple[Window, str, str]]) -> list[Word]:
        """Word times for windows with text, in one aligner call."""
        self._check_cancelled()
        with torch_state.forward_pass():
            aligned = aligner.align(
                audio=[(pad_window(samples[w.start : w.end]), SAMPLE_RATE) for w, _, _ in todo],
                text=[piece for _, _, piece in todo],
                language=[self.request.language or lang.split(",")[0] for _, lang, _ in todo],
            )
        runtime.trim_heap()
        words: list[Word] = []
        for (window, _, _), result in zip(todo, aligned, strict=True):
            end = window.end / SAMPLE_RATE
            words.extend(window_words(result.items, window.offset_seconds, end, window.speech_seconds))
        return words

    def _result(
        self,
        text: str,
        languages: list[str],
        words: list[Word],
        duration: float,
        pieces: list[tuple[Window, str]],
        turns: tuple[Turn, ...],
    ) -> Transcription:
        """The final result. With speaker turns, words take the speaker who overlaps them most and segments are
        cut where it changes; without word times, each window's segment takes its main speaker."""
        language = to_iso(self.request.language) if self.request.language else detected_to_iso(",".join(languages))
        if self.want_timestamps:
            speakers = word_speakers([(w.start, w.end) for w in words], turns) if turns else None
            segments = build_segments(
                text,
                words,
                duration,
                max_segment_seconds=self.opts.max_segment_seconds,
                times_repaired=True,
                speakers=speakers,
            )
        elif self.opts.vad:  # one segment per window, from its first to its last speech
            segments = [
                Segment(piece, w.speech_seconds[0], w.speech_seconds[1], (), speaker_at(*w.speech_seconds, turns))
                for w, piece in pieces
                if piece.strip()
            ]
        elif text:
            segments = [Segment(text, 0.0, duration, (), speaker_at(0.0, duration, turns))]
        else:
            segments = []
        return Transcription(text, language, duration, tuple(segments), self.request.granularity, turns)


def request_bytes(opts: WorkerOptions, spill_bytes: int = SPILL_BYTES) -> int:
    """The most audio memory one file request holds, as admission control charges it: the decoded audio kept in
    memory before it spills (`spill_bytes`), the VAD's read-ahead, and three batches' windows (two queued for the
    model, one in an aligner call). Frame probabilities and energies (about 0.4 MB an hour) are not counted."""
    window = max(opts.max_batch_seconds, opts.chunk_seconds) * SAMPLE_RATE * 4
    return spill_bytes + vad.READ_BYTES + int(3 * window)


def window_words(items: Iterable[Any], start: float, end: float, speech: tuple[float, float]) -> list[Word]:
    """An aligner result's items (window-relative times) as words on the timeline of the window `[start, end)`,
    repaired within it: degenerate times must not spread into a skipped silence or another window. A run of bad
    times with no good neighbour on a side reaches only the `speech` edge there (clamped into the window)."""
    found = [Word(it.text, it.start_time + start, it.end_time + start) for it in items]
    first, last = (min(max(edge, start), end) for edge in speech)
    return repair_times(found, end, start=start, speech=(first, max(first, last)))


def pad_window(samples: np.ndarray) -> np.ndarray:
    """A window as the model gets it: at least `MIN_WINDOW_SAMPLES`, padded with silence."""
    if len(samples) >= MIN_WINDOW_SAMPLES:
        return samples
    return np.pad(samples, (0, MIN_WINDOW_SAMPLES - len(samples)))


def _is_cjk(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F") and not unicodedata.category(ch).startswith("Z")


def joiner(before: str, after: str) -> str:
    """The separator between two windows' texts: none around CJK, a space elsewhere."""
    if not before or not after or before[-1].isspace() or after[0].isspace():
        return ""
    return "" if _is_cjk(before[-1]) or _is_cjk(after[0]) else " "
