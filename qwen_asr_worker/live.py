"""Live transcription (LocalAI's realtime API): finalized text while the user is still speaking.

The idea is upstream qwen-asr's vLLM streaming, on the transformers engine. Audio is buffered; after every
`chunk_seconds` of new audio the model runs again over the utterance so far, with the text it already finalized
placed after the prompt as the start of its answer, so only the tail is decoded again. The last
`rollback_tokens` tokens of each pass stay open (the next pass hears more and may change them); what comes before
them is final and goes out as a delta that is never retracted. An utterance's first `unfixed_chunks` passes
finalize nothing: they have heard too little to trust.

Cost and memory stay bounded. Voice activity detection (the file path's Silero model and `vad_*` options) scores
each 32-ms frame as it arrives. Audio without speech never reaches the model and is dropped but for a pad. At a
pause of `vad_min_silence_seconds` the utterance is committed: decoded once more with everything finalized,
aligned when words were asked for, and its audio dropped; the audio after the pause starts the next one. An
utterance with no pause is committed at `max_utterance_seconds`, cut at its quietest frame near that length. So
a session holds one utterance of audio at most, whatever its length. With the model option `vad:off` every frame
counts as speech: nothing is skipped and utterances end only at the length cap.

Every model pass goes through the model's batcher like a file's windows, so live sessions and file requests share
batches, and a live session holds the model for one call at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import soxr

from . import runtime, torch_state, vad
from .audio import RESAMPLE_QUALITY, SAMPLE_RATE
from .errors import Cancelled, InvalidRequest
from .languages import detected_to_iso, to_iso
from .options import LiveSettings
from .pipeline import Granularity, IsCancelled, Transcription, joiner, pad_window, window_words
from .prefill_cache import PassCache
from .segments import Segment, Word

if TYPE_CHECKING:
    from qwen_asr import Qwen3ForcedAligner

    from .loaded_model import LoadedModel

log = logging.getLogger(__name__)

ASR_TEXT_TAG = "<asr_text>"  # the model writes "language X<asr_text>" before the transcript
MIN_SAMPLE_RATE = 4_000
MAX_SAMPLE_RATE = 384_000
_CUT_SEARCH_SECONDS = 3.0  # a forced commit cuts at the quietest frame of the utterance's last seconds
_POLL_S = 0.05


@dataclass(frozen=True)
class LiveConfig:
    """A session's config: a canonical language name or None (detect), the input rate, the params."""

    language: str | None
    sample_rate: int
    settings: LiveSettings


def session_bytes(settings: LiveSettings) -> int:
    """The audio memory a live session holds at most, as admission control charges it: its utterance buffer, a
    pass's copy of it and the encoder's cached output, each at most `max_utterance_seconds` of 16-kHz float32."""
    return 3 * round(settings.max_utterance_seconds * SAMPLE_RATE) * 4


@dataclass(frozen=True)
class LiveUpdate:
    """Text finalized since the previous update, the words it finalized, and how far into the stream the text
    is now final (seconds; within a pass, estimated from the share of its tokens that were kept)."""

    delta: str
    words: tuple[Word, ...] = ()
    final_until: float = 0.0


def check_sample_rate(rate: int) -> int:
    """The input rate a config asks for: 0 means 16000; others must be plausible audio rates."""
    if rate == 0:
        return SAMPLE_RATE
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidRequest(
            f"sample_rate {rate} is not supported; send {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz "
            "(0 means 16000), mono PCM floats in [-1, 1]"
        )
    return rate


class LiveSession:
    """One live stream's state: the current utterance's audio, frame probabilities and finalized output."""

    def __init__(self, model: LoadedModel, config: LiveConfig, cancelled: IsCancelled) -> None:
        opts = model.spec.options
        self.model = model
        self.config = config
        self.settings = config.settings
        self.cancelled = cancelled
        self._use_vad = opts.vad
        self._vad_settings = opts.vad_settings
        self._vad = vad.StreamingVad()
        self._resampler = (
            soxr.ResampleStream(config.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY)
            if config.sample_rate != SAMPLE_RATE
            else None
        )
        self._chunk_samples = round(self.settings.chunk_seconds * SAMPLE_RATE)
        self._max_samples = round(self.settings.max_utterance_seconds * SAMPLE_RATE)
        self._incoming: list[np.ndarray] = []  # 16 kHz audio received since the last step
        self._new = 0  # its length
        self._fed = 0  # samples received, at the input rate
        self._messages = 0
        # The current utterance (plus any silence before it): audio, one probability per whole frame, and where it
        # starts in the stream. Everything dropped is a whole number of frames, so frames stay on the VAD's grid.
        self._buffer = np.zeros(0, np.float32)
        self._probabilities = np.zeros(0, np.float32)
        self._start = 0
        self._raw = ""  # the model's output finalized so far in this utterance: the next pass's prefix
        self._raw_tokens = 0
        self._passes = 0
        self._final_until = 0  # stream sample up to which the text is final (estimated within a pass)
        self._sent = ""  # this utterance's finalized text already sent, without trailing whitespace
        # The session.
        self._text = ""
        self._languages: list[str] = []
        self._segments: list[Segment] = []
        self._aligner: Qwen3ForcedAligner | None = None
        # The open utterance's reusable work: finished encoder windows and the prompt prefix's keys and values
        # (emptied at each commit, whenever the audio's start moves, and at the end).
        self.pass_cache = PassCache() if model.encoder_reuse else None
        self.model_passes = 0
        self.skipped_seconds = 0.0

    # --- input ----------------------------------------------------------------------------------------
    def feed(self, pcm: np.ndarray) -> None:
        """Take one audio message (mono, the config's rate)."""
        self._messages += 1
        pcm = np.asarray(pcm, np.float32)
        if not np.isfinite(pcm).all():
            raise InvalidRequest(
                f"audio message {self._messages} has non-finite samples (NaN or infinity); "
                "send mono PCM floats in [-1, 1]"
            )
        self._fed += len(pcm)
        audio = self._resampler.resample_chunk(pcm) if self._resampler is not None else pcm
        if len(audio):
            self._incoming.append(audio)
            self._new += len(audio)

    @property
    def due(self) -> bool:
        """Whether `chunk_seconds` of new audio have arrived since the last step."""
        return self._new >= self._chunk_samples

    @property
    def held_seconds(self) -> float:
        """Seconds of audio the session holds: the open utterance (and silence before it) plus audio not yet
        taken in."""
        return (len(self._buffer) + self._new) / SAMPLE_RATE

    # --- steps ----------------------------------------------------------------------------------------
    def step(self) -> list[LiveUpdate]:
        """Take in the new audio: commit utterances that ended, then one pass over the open one."""
        self._absorb()
        return self._settle(final=False)

    def finish(self) -> list[LiveUpdate]:
        """The client stopped sending: commit everything that holds speech."""
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            if len(tail):
                self._incoming.append(tail)
        self._absorb()
        return self._settle(final=True)

    def _settle(self, *, final: bool) -> list[LiveUpdate]:
        """Commit each utterance that ended (a pause after it, the length cap, or the stream's end), then pass
        once over the open one (not at the end)."""
        updates: list[LiveUpdate] = []
        while regions := self._regions():
            first = regions[0]  # every region but the last is followed by a pause; the last may be too
            closed = first.speech_end + self._min_silence() <= len(self._probabilities) * vad.FRAME
            if len(self._buffer) >= self._max_samples and not (closed and first.end <= self._max_samples):
                updates += self._commit(self._quietest_cut(), first.speech_start, self._max_samples)
            elif closed:
                updates += self._commit(first.end, first.speech_start, first.speech_end)
            elif final:
                updates += self._commit(len(self._buffer), first.speech_start, first.speech_end, final=True)
            else:
                return updates + self._pass()
        return updates + self._no_speech()

    def result(self) -> Transcription:
        """The whole session: every delta joined, the language, the seconds of audio fed, one segment per
        utterance (with its words when they were asked for)."""
        language = to_iso(self.config.language) if self.config.language else detected_to_iso(",".join(self._languages))
        granularity = Granularity.WORD if self.settings.words else Granularity.NONE
        return Transcription(
            self._text, language, self._fed / self.config.sample_rate, tuple(self._segments), granularity
        )

    def close(self) -> None:
        """Release the aligner if this session used it, and drop the encoder windows."""
        if self.pass_cache is not None:
            self.pass_cache.clear()
        if self._aligner is not None:
            self._aligner = None
            self.model.release_aligner()

    # --- the utterance --------------------------------------------------------------------------------
    def _absorb(self) -> None:
        if not self._incoming:
            return
        audio = np.concatenate(self._incoming)
        self._incoming, self._new = [], 0
        scores = self._vad.feed(audio) if self._use_vad else None
        self._buffer = np.concatenate([self._buffer, audio])
        if scores is None:  # vad:off: every frame is speech
            scores = np.ones(len(self._buffer) // vad.FRAME - len(self._probabilities), np.float32)
        self._probabilities = np.concatenate([self._probabilities, scores])

    def _min_silence(self) -> int:
        return round(self._vad_settings.min_silence_seconds * SAMPLE_RATE)

    def _regions(self) -> list[vad.SpeechRegion]:
        """Speech regions of the buffer's scored frames; silence before the first is dropped first."""
        total = len(self._probabilities) * vad.FRAME
        if total == 0:
            return []
        regions = vad.regions_from_probabilities(self._probabilities, total, self._vad_settings)
        if regions and regions[0].start >= vad.FRAME:
            self._drop(regions[0].start // vad.FRAME * vad.FRAME)
            return self._regions()
        return regions

    def _no_speech(self) -> list[LiveUpdate]:
        """No speech in the buffer: no model call; keep only enough audio for a pad before speech to come."""
        keep = round((self._vad_settings.pad_seconds + vad.MIN_SPEECH_MS / 1000) * SAMPLE_RATE) + vad.FRAME
        excess = (len(self._probabilities) * vad.FRAME - keep) // vad.FRAME * vad.FRAME
        if excess > 0:
            self._drop(excess)
        return []

    def _quietest_cut(self) -> int:
        """Where to cut an utterance that reached `max_utterance_seconds`: the least speech-like frame of its
        last `_CUT_SEARCH_SECONDS`, so a word is rarely split."""
        last = min(self._max_samples, len(self._probabilities) * vad.FRAME) // vad.FRAME
        first = max(1, last - round(_CUT_SEARCH_SECONDS * SAMPLE_RATE / vad.FRAME))
        if last <= first:
            return last * vad.FRAME
        latest_quietest = int(np.argmin(self._probabilities[first:last][::-1]))  # ties: cut as late as possible
        return (last - latest_quietest) * vad.FRAME

    def _pass(self) -> list[LiveUpdate]:
        """Re-run the model over the open utterance; finalize all but its last `rollback_tokens` tokens."""
        heard = len(self._buffer)
        _, raw = self._decode(self._buffer)
        self._passes += 1
        if self._passes >= self.settings.unfixed_chunks:
            kept, total = self._rolled_back(raw)
            if len(kept) > len(self._raw) and kept.startswith(self._raw):  # never shorten what was finalized
                self._raw = kept
                self._raw_tokens = len(self.model.count_tokens(kept))
                self._final_until = self._start + heard * self._raw_tokens / max(1, total)
        delta = self._send(self._text_of(self._raw).rstrip())
        return [LiveUpdate(delta, final_until=self._final_until / SAMPLE_RATE)] if delta else []

    def _commit(self, cut: int, speech_start: int, speech_end: int, *, final: bool = False) -> list[LiveUpdate]:
        """Decode the buffer up to `cut` once more, finalize all of it, send its words, start a new utterance.

        Before the stream's end the cut is on a frame edge, so the frames left keep their probabilities; at the
        end the whole buffer goes."""
        if not final:
            cut = max(vad.FRAME, min(cut, len(self._probabilities) * vad.FRAME) // vad.FRAME * vad.FRAME)
        audio = self._buffer[:cut]
        language, raw = self._decode(audio)
        text = self._final_text(raw)
        delta = self._send(text)
        words: tuple[Word, ...] = ()
        start = self._start + speech_start
        end = max(start, self._start + min(speech_end, cut))
        if text and self.settings.words:
            words = self._align(audio, text, language, (start / SAMPLE_RATE, end / SAMPLE_RATE))
        if text:
            self._segments.append(Segment(text, start / SAMPLE_RATE, end / SAMPLE_RATE, words))
            if language:
                self._languages.append(language)
        self._raw, self._raw_tokens, self._passes, self._sent = "", 0, 0, ""
        self._drop(cut, skipped=False)
        self._final_until = self._start
        return [LiveUpdate(delta, words, self._final_until / SAMPLE_RATE)] if delta or words else []

    def _drop(self, samples: int, *, skipped: bool = True) -> None:
        """Forget the buffer's first `samples` (a whole number of frames, or all of it at the end); `skipped`
        when the model never heard them."""
        self._buffer = self._buffer[samples:].copy()
        self._probabilities = self._probabilities[samples // vad.FRAME :].copy()
        self._start += samples
        if self.pass_cache is not None:  # the windows start where the buffer does: all of them moved
            self.pass_cache.clear()
        if skipped:
            self.skipped_seconds += samples / SAMPLE_RATE

    # --- the model ------------------------------------------------------------------------------------
    def _decode(self, audio: np.ndarray) -> tuple[str, str]:
        """One model pass over `audio` with the finalized output as the answer's start: `(language, raw)`."""
        future = self.model.batcher.submit(
            pad_window(audio),
            "",
            self.config.language,
            prefix=self._raw,
            prefix_tokens=self._raw_tokens,
            raw=True,
            pass_cache=self.pass_cache,
        )
        self.model_passes += 1
        while True:
            try:
                return future.result(timeout=_POLL_S)
            except TimeoutError:
                if self.cancelled():
                    future.cancel()
                    raise Cancelled("the client cancelled the live session") from None

    def _rolled_back(self, raw: str) -> tuple[str, int]:
        """`raw` without its last `rollback_tokens` tokens (more if the cut splits a character), and how many
        tokens `raw` has."""
        ids = self.model.count_tokens(raw)
        keep = len(ids) - self.settings.rollback_tokens
        while keep > 0:
            text = self.model.detokenize(ids[:keep])
            if "\ufffd" not in text:
                return text, len(ids)
            keep -= 1
        return "", len(ids)

    def _text_of(self, raw: str) -> str:
        """The transcript part of raw output: all of it with a forced language, else what follows the tag."""
        if self.config.language:
            return raw.lstrip()
        return raw.split(ASR_TEXT_TAG, 1)[1].lstrip() if ASR_TEXT_TAG in raw else ""

    def _final_text(self, raw: str) -> str:
        """An utterance's whole text: qwen-asr's own parse (which also cuts repetition loops) when it agrees
        with what was already sent, else the plain transcript part."""
        from qwen_asr.inference.utils import parse_asr_output

        parsed = parse_asr_output(raw, user_language=self.config.language)[1].strip()
        return parsed if parsed.startswith(self._sent) else self._text_of(raw).rstrip()

    def _send(self, finalized: str) -> str:
        """The part of this utterance's finalized text not sent yet (with the separator from the previous
        utterance when it is the utterance's first)."""
        if len(finalized) <= len(self._sent):
            return ""
        piece = finalized[len(self._sent) :]
        if not self._sent:
            piece = joiner(self._text, piece) + piece
        self._sent = finalized
        self._text += piece
        return piece

    def _align(self, audio: np.ndarray, text: str, language: str, speech: tuple[float, float]) -> tuple[Word, ...]:
        """The utterance's words, repaired within its audio and its speech (`speech`: stream seconds)."""
        if self._aligner is None:
            self._aligner = self.model.acquire_aligner()
        with torch_state.forward_pass():
            (aligned,) = self._aligner.align(
                audio=[(pad_window(audio), SAMPLE_RATE)],
                text=[text],
                language=[self.config.language or language.split(",")[0]],
            )
        runtime.trim_heap()
        offset = self._start / SAMPLE_RATE
        return tuple(window_words(aligned.items, offset, offset + len(audio) / SAMPLE_RATE, speech))


_END = object()


class AudioInbox:
    """Audio messages handed from the thread that reads the client's stream to the session's thread.

    Reading on its own thread lets the session take everything that arrived during a model pass at once (one pass
    for all of it, so a slow pass does not queue up more passes), and notice a cancelled client while idle. The
    queue is bounded: a client that sends faster than the session works is held back by gRPC flow control.
    """

    def __init__(self, limit: int = 256) -> None:
        self._queue: queue.Queue[object] = queue.Queue(limit)
        self._stopped = threading.Event()

    def put(self, item: np.ndarray | BaseException) -> None:
        """Queue an audio message (or the error that ended the reading); gives up once the session stopped."""
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def end(self) -> None:
        """The client closed its send side."""
        self.put(_END)  # type: ignore[arg-type]

    def stop(self) -> None:
        """The session is over: the reader stops waiting to hand over more."""
        self._stopped.set()

    def take(self, cancelled: IsCancelled) -> tuple[list[np.ndarray], bool]:
        """Wait for at least one message, then take all that are waiting: `(audio messages, ended)`."""
        items: list[object] = []
        while not items:
            try:
                items.append(self._queue.get(timeout=_POLL_S))
            except queue.Empty:
                if cancelled():
                    raise Cancelled("the client cancelled the live session") from None
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        audio: list[np.ndarray] = []
        for item in items:
            if item is _END:
                return audio, True
            if isinstance(item, BaseException):
                raise item
            audio.append(item)  # type: ignore[arg-type]
        return audio, False


def drive(session: LiveSession, inbox: AudioInbox) -> Iterator[LiveUpdate | Transcription]:
    """Run a session over its inbox: updates as text is finalized, then the final `Transcription`."""
    started = time.perf_counter()
    ended = False
    while not ended:
        audio, ended = inbox.take(session.cancelled)
        for pcm in audio:
            session.feed(pcm)
        if session.due:
            yield from session.step()
    yield from session.finish()
    result = session.result()
    elapsed = time.perf_counter() - started
    log.info(
        "live session: %.1f s of audio in %d utterance%s, %d model pass%s, %.1f s skipped (no speech); "
        "%.2f s wall; language %s",
        result.duration,
        len(result.segments),
        "" if len(result.segments) == 1 else "s",
        session.model_passes,
        "" if session.model_passes == 1 else "es",
        session.skipped_seconds,
        elapsed,
        result.language or "-",
    )
    yield result
