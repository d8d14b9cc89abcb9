"""Voice activity detection: which stretches of a file hold speech, so silence and noise never reach the model.

An LLM-style recognizer given silence or noise still writes something (a repetition loop, an earlier sentence),
and every second it hears costs decode time. Silero VAD (the `silero-vad` wheel ships its 2 MB TorchScript model,
so it works offline and needs only torch) gives a speech probability for every 32-ms frame (512 samples at
16 kHz). It is loaded once per process, on the first request that needs it.

Speed. Fed one frame at a time the model costs about 0.2 ms a frame: 8 s for 20 minutes of audio, and far more
where OpenMP threads sleep between the tiny calls (OMP_WAIT_POLICY=PASSIVE). So the file is cut into rows of 5 s
(`_ROW_FRAMES`), each starting `_WARMUP_SECONDS` early so that its recurrent state has settled when its own frames
begin, and up to `_MAX_ROWS` rows (21 minutes) run side by side as one batch, one frame step at a time: 20 minutes
take well under a second, with region edges within a frame of the one-row run. A step copies one frame per row
into the batch from a read-ahead of a few frames per row (16 MB in all), so the file is never read or copied
whole and may lie in a temporary file (`spool.py`). The rows do not depend on the file's length, so a file that
is still decoding is scored a group of rows at a time as it arrives (`probability_groups`), each frame getting
the probability it gets in the whole file.

Regions. Frame probabilities become speech runs as silero-vad's `get_speech_timestamps_from_probs` finds them
(threshold with hysteresis, runs under 250 ms dropped, runs closer than `min_silence_seconds` merged), here in
`RegionFinder`, which takes the probabilities in pieces and gives each region once it is final. Each run is
then padded by `pad_seconds` on both sides (a gap shorter than two pads is split in the middle), so a window
starts and ends in non-speech and the model hears the first and last syllable whole.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import torch_state
from .audio import SAMPLE_RATE
from .spool import Samples

log = logging.getLogger(__name__)

FRAME = 512  # samples per Silero frame at 16 kHz
_ROW_FRAMES = 156  # 5 s of frames per row
_WARMUP_SECONDS = 1.0
_MAX_ROWS = 256  # rows side by side: a group of 21.3 minutes
READ_BYTES = 16 << 20  # audio read ahead for all rows together: a few frames each, whatever the file's length
MIN_SPEECH_MS = 250  # silero-vad's default: shorter bursts (a click, a cough) are not speech

_model: Any = None
_model_lock = threading.Lock()  # loading, and running: the TorchScript module keeps its state between calls


@dataclass(frozen=True)
class VadSettings:
    """How speech is told from non-speech (the `vad_*` options)."""

    threshold: float = 0.5
    min_silence_seconds: float = 2.0
    pad_seconds: float = 0.4


@dataclass(frozen=True)
class SpeechRegion:
    """A stretch to transcribe, `[start, end)` in samples, padded; speech itself lies in `[speech_start,
    speech_end)`."""

    start: int
    end: int
    speech_start: int
    speech_end: int


def detect_speech(samples: np.ndarray, settings: VadSettings) -> list[SpeechRegion]:
    """The padded speech regions of 16 kHz mono samples, in order and disjoint; empty when nothing is speech."""
    if len(samples) == 0:
        return []
    probabilities = frame_probabilities(samples)
    return regions_from_probabilities(probabilities, len(samples), settings)


def regions_from_probabilities(
    probabilities: np.ndarray, total: int, settings: VadSettings, sample_rate: int = SAMPLE_RATE
) -> list[SpeechRegion]:
    """Turn per-frame speech probabilities of `total` samples into padded, disjoint speech regions.

    Runs of speech closer than `settings.min_silence_seconds` merge into one region; runs shorter than
    `MIN_SPEECH_MS` are dropped. Each region is widened by `settings.pad_seconds` on both sides, clamped to the
    file; where two padded regions would overlap, the gap between them is split in the middle.
    """
    finder = RegionFinder(settings, sample_rate)
    return finder.feed(probabilities) + finder.finish(total)


class RegionFinder:
    """`regions_from_probabilities` over probabilities that arrive in order (a file as it decodes): `feed` gives
    each region as soon as nothing later can change it, `finish` the rest once the length is known.

    The runs are silero-vad's `get_speech_timestamps_from_probs` with no padding and no length limit (the
    defaults the worker used it with; a test holds the two equal): speech starts at a frame at or above the
    threshold and ends where a stretch below `threshold - 0.15` lasts `min_silence_seconds`. A closed run's
    padded region is final once the next run has started, or once the frames seen reach two pads past its end,
    so no next run can come close enough to split the gap.
    """

    def __init__(self, settings: VadSettings, sample_rate: int = SAMPLE_RATE) -> None:
        self._window = FRAME if sample_rate == SAMPLE_RATE else FRAME // 2
        self._threshold = settings.threshold
        self._negative = max(settings.threshold - 0.15, 0.01)
        self._min_silence = sample_rate * round(settings.min_silence_seconds * 1000) / 1000
        self._min_speech = sample_rate * MIN_SPEECH_MS / 1000
        self._pad = round(settings.pad_seconds * sample_rate)
        self._frames = 0
        self._triggered = False
        self._start = 0
        self._temp_end = 0  # where the current stretch of silence inside a run began (0: none)
        self._closed: list[tuple[int, int]] = []  # closed runs whose regions are not given yet
        self._last_end: int | None = None  # the end of the run before the first of `_closed`

    def feed(self, probabilities: np.ndarray) -> list[SpeechRegion]:
        """Take the next frames' probabilities; return the regions that are now final."""
        window, threshold, negative = self._window, self._threshold, self._negative
        triggered, start, temp_end = self._triggered, self._start, self._temp_end
        for i, p in enumerate(np.asarray(probabilities, np.float64).tolist(), start=self._frames):
            cur = window * i
            if p >= threshold and temp_end:
                temp_end = 0
            if p >= threshold and not triggered:
                triggered, start = True, cur
                continue
            if p < negative and triggered:
                if not temp_end:
                    temp_end = cur
                if cur - temp_end < self._min_silence:
                    continue
                if temp_end - start > self._min_speech:
                    self._closed.append((start, temp_end))
                triggered, temp_end = False, 0
        self._frames += len(probabilities)
        self._triggered, self._start, self._temp_end = triggered, start, temp_end
        # Every later run starts at a frame not seen yet; `seen` is also within the file (its last frame may
        # be partial), so the clamp to the file's length cannot matter for what is given here.
        seen = max(0, (self._frames - 1) * window + 1)
        ready = len(self._closed)
        if self._closed:
            # The last closed run's region is final once the next run that will be kept is known, or once no
            # such run can start close enough to split the gap (an open run shorter than the minimum is dropped).
            earliest = start if triggered else seen
            if earliest - self._closed[-1][1] < 2 * self._pad and not (triggered and self._open_run_kept()):
                ready -= 1
        return self._give(ready, next_start=start if triggered else None, total=None)

    def open_run(self) -> tuple[int, int, int] | None:
        """The run still open, if it will be kept: `(region_start, speech_start, end_at_least)`, where its padded
        region will start and a bound its region's end will reach (all final)."""
        if not self._triggered or self._closed or not self._open_run_kept():
            return None
        return self._low(self._start, self._last_end), self._start, self._open_run_end()

    def _open_run_end(self) -> int:
        """A bound the open run's end will reach: where its current silence began, or else past the frames seen
        (the file holds more than `(frames - 1) * window` samples)."""
        return self._temp_end or max(0, (self._frames - 1) * self._window + 1)

    def _open_run_kept(self) -> bool:
        """Whether the open run is already long enough that it will be kept, however it ends."""
        return self._open_run_end() - self._start > self._min_speech

    def finish(self, total: int) -> list[SpeechRegion]:
        """The regions not given yet, now that the audio is known to hold `total` samples."""
        if self._triggered and total - self._start > self._min_speech:
            self._closed.append((self._start, total))
        self._triggered = False
        self._closed = [(min(s, total), min(e, total)) for s, e in self._closed]
        self._closed = [(s, e) for s, e in self._closed if e > s]
        return self._give(len(self._closed), next_start=None, total=total)

    def _low(self, start: int, previous_end: int | None) -> int:
        if previous_end is not None and start - previous_end < 2 * self._pad:
            return previous_end + (start - previous_end) // 2
        return max(0, start - self._pad)

    def _give(self, count: int, next_start: int | None, total: int | None) -> list[SpeechRegion]:
        """Pad and give the first `count` closed runs; `next_start` is where the run after them starts, if known."""
        regions: list[SpeechRegion] = []
        for k in range(count):
            start, end = self._closed[k]
            following = self._closed[k + 1][0] if k + 1 < len(self._closed) else next_start
            high = end + self._pad if total is None else min(total, end + self._pad)
            if following is not None and following - end < 2 * self._pad:
                high = end + (following - end) // 2
            regions.append(SpeechRegion(self._low(start, self._last_end), high, start, end))
            self._last_end = end
        del self._closed[:count]
        return regions


def pad_regions(speech: list[tuple[int, int]], pad: int, total: int) -> list[SpeechRegion]:
    """Widen sorted, disjoint speech runs by `pad` samples each side, within `[0, total]`, never overlapping."""
    regions: list[SpeechRegion] = []
    for i, (start, end) in enumerate(speech):
        low = max(0, start - pad)
        high = min(total, end + pad)
        if i > 0:
            previous_end = speech[i - 1][1]
            if start - previous_end < 2 * pad:
                low = previous_end + (start - previous_end) // 2
        if i + 1 < len(speech):
            next_start = speech[i + 1][0]
            if next_start - end < 2 * pad:
                high = end + (next_start - end) // 2
        regions.append(SpeechRegion(low, high, start, end))
    return regions


class StreamingVad:
    """Frame probabilities of audio that arrives in pieces (a live session): each call scores the whole frames
    completed since the last one, after `_WARMUP_SECONDS` of the audio before them, as a row of
    `frame_probabilities` would. Holds at most that much audio plus one partial frame."""

    def __init__(self) -> None:
        self._history = np.zeros(0, np.float32)  # whole frames already scored, for the next call's warm-up
        self._rest = np.zeros(0, np.float32)  # a partial frame waiting for its remaining samples

    def feed(self, samples: np.ndarray) -> np.ndarray:
        """The probabilities of the frames that `samples` completes (possibly none)."""
        data = np.concatenate([self._rest, np.asarray(samples, np.float32)])
        whole = len(data) // FRAME * FRAME
        self._rest = data[whole:].copy()
        if whole == 0:
            return np.zeros(0, np.float32)
        run = np.concatenate([self._history, data[:whole]])
        probabilities = frame_probabilities(run)[len(self._history) // FRAME :]
        self._history = run[-round(_WARMUP_SECONDS * SAMPLE_RATE / FRAME) * FRAME :].copy()
        return probabilities


def frame_probabilities(samples: Samples) -> np.ndarray:
    """Silero's speech probability for every 512-sample frame (the last frame zero-padded), float32. `samples`
    is an array or anything sliced like one (a `SpooledAudio`): it is read a few frames per row at a time."""
    groups = list(probability_groups(samples, lambda needed: len(samples)))
    return np.concatenate(groups) if groups else np.zeros(0, np.float32)


def probability_groups(samples: Samples, available: Callable[[int], int]) -> Iterator[np.ndarray]:
    """`frame_probabilities` a group of rows at a time, in order, as the audio arrives: `available(n)` returns
    how many samples are there to read, at least `n` unless the audio ends sooner (then its length; see
    `DecodingAudio.available`). The rows are the same whatever the audio's length, so each frame's probability
    is the same whether the file was whole or still decoding."""
    warmup = round(_WARMUP_SECONDS * SAMPLE_RATE / FRAME)
    group = _ROW_FRAMES * _MAX_ROWS
    done = 0
    model = None
    while True:
        wanted = (done + group) * FRAME
        total = available(wanted)
        frames = done + group if total >= wanted else -(-total // FRAME)
        if frames <= done:
            return
        model = model or _load()
        starts = np.arange(done, frames, _ROW_FRAMES)
        out = np.zeros(frames - done, np.float32)
        with _model_lock, torch_state.forward_pass(), torch.inference_mode():
            _run_rows(model, samples, starts, _ROW_FRAMES, warmup, frames, out, done)
        yield out
        done = frames
        if total < wanted:
            return


def _run_rows(
    model: Any,
    samples: Samples,
    starts: np.ndarray,
    row: int,
    warmup: int,
    frames: int,
    out: np.ndarray,
    first: int = 0,
) -> None:
    """Run rows of frames side by side; row k covers frames `[starts[k], starts[k] + row)` (up to `frames`),
    after `warmup` frames before it (which only settle the state: their probabilities are dropped); frame `i`'s
    probability goes to `out[i - first]`. The rows advance together, so each row's next few frames are read at
    once, `READ_BYTES` for all rows (past the file's end, zeros)."""
    model.reset_states()
    lead = np.minimum(starts, warmup)  # the first row of a file has no audio before it to warm up on
    begin = starts - lead
    steps = int(lead.max()) + row
    ahead = max(1, min(steps, READ_BYTES // (len(starts) * FRAME * 4)))
    block = np.zeros((len(starts), ahead, FRAME), np.float32)
    batch = np.zeros((len(starts), FRAME), np.float32)
    for step in range(steps):
        index = begin + step
        live = (index < starts + row) & (index < frames)
        if not live.any():
            break
        if step % ahead == 0:
            _read_ahead(samples, index, live, block)
        batch[:] = 0.0
        batch[live] = block[live, step % ahead]
        probabilities = model(torch.from_numpy(batch), SAMPLE_RATE)[:, 0].numpy()
        keep = live & (index >= starts)
        out[index[keep] - first] = probabilities[keep]


def _read_ahead(samples: Samples, index: np.ndarray, live: np.ndarray, block: np.ndarray) -> None:
    """Fill `block[k]` with the frames from `index[k]` on for each live row (zeros past the end of the file)."""
    block[:] = 0.0
    span = block.shape[1] * FRAME
    for k in np.flatnonzero(live):
        first = int(index[k]) * FRAME
        piece = samples[first : first + span]
        block[k].reshape(-1)[: len(piece)] = piece


def _load() -> Any:
    """The Silero model, loaded once per process. Importing silero_vad sets torch's thread count to 1 for the
    whole process; the worker's count is put back at once."""
    global _model
    with _model_lock:
        if _model is None:
            started = time.perf_counter()
            threads = torch.get_num_threads()
            try:
                import silero_vad
            finally:
                torch.set_num_threads(threads)
            _model = silero_vad.load_silero_vad()
            log.info("loaded Silero VAD in %.2f s", time.perf_counter() - started)
        return _model
