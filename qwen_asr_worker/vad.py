"""Voice activity detection: which stretches of a file hold speech, so silence and noise never reach the model.

An LLM-style recognizer given silence or noise still writes something (a repetition loop, an earlier sentence),
and every second it hears costs decode time. Silero VAD (the `silero-vad` wheel ships its 2 MB TorchScript model,
so it works offline and needs only torch) gives a speech probability for every 32-ms frame (512 samples at
16 kHz). It is loaded once per process, on the first request that needs it.

Speed. Fed one frame at a time the model costs about 0.2 ms a frame: 8 s for 20 minutes of audio, and far more
where OpenMP threads sleep between the tiny calls (OMP_WAIT_POLICY=PASSIVE). So the file is cut into up to
`_MAX_ROWS` equal rows of at least `_MIN_ROW_SECONDS`, each starting `_WARMUP_SECONDS` early so that its recurrent
state has settled when its own frames begin, and the rows run side by side as one batch, one frame step at a time:
20 minutes take well under a second, with region edges within a frame of the one-row run. A step copies one frame
per row into the batch from a read-ahead of a few frames per row (16 MB in all), so the file is never read or
copied whole and may lie in a temporary file (`spool.py`).

Regions. Frame probabilities become speech runs through silero-vad's own `get_speech_timestamps_from_probs`
(threshold with hysteresis, runs under 250 ms dropped, runs closer than `min_silence_seconds` merged). Each run is
then padded by `pad_seconds` on both sides (a gap shorter than two pads is split in the middle), so a window
starts and ends in non-speech and the model hears the first and last syllable whole.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import torch_state
from .audio import SAMPLE_RATE
from .spool import Samples

log = logging.getLogger(__name__)

FRAME = 512  # samples per Silero frame at 16 kHz
_MIN_ROW_SECONDS = 5.0
_WARMUP_SECONDS = 1.0
_MAX_ROWS = 256
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
    from silero_vad import get_speech_timestamps_from_probs

    runs = get_speech_timestamps_from_probs(
        [float(p) for p in probabilities],
        sampling_rate=sample_rate,
        threshold=settings.threshold,
        min_speech_duration_ms=MIN_SPEECH_MS,
        min_silence_duration_ms=round(settings.min_silence_seconds * 1000),
        speech_pad_ms=0,
        audio_length_samples=total,
    )
    speech = [(min(int(r["start"]), total), min(int(r["end"]), total)) for r in runs]
    speech = [(s, e) for s, e in speech if e > s]
    return pad_regions(speech, round(settings.pad_seconds * sample_rate), total)


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
    frames = -(-len(samples) // FRAME)
    rows = max(1, min(_MAX_ROWS, frames // round(_MIN_ROW_SECONDS * SAMPLE_RATE / FRAME)))
    row = -(-frames // rows)  # equal rows: as many as there is audio for, each at least _MIN_ROW_SECONDS
    warmup = round(_WARMUP_SECONDS * SAMPLE_RATE / FRAME)
    out = np.zeros(frames, np.float32)
    model = _load()
    with _model_lock, torch_state.forward_pass(), torch.inference_mode():
        _run_rows(model, samples, np.arange(rows) * row, row, warmup, frames, out)
    return out


def _run_rows(
    model: Any, samples: Samples, starts: np.ndarray, row: int, warmup: int, frames: int, out: np.ndarray
) -> None:
    """Run rows of frames side by side; row k covers frames `[starts[k], starts[k] + row)`, after `warmup` frames
    before it (which only settle the state: their probabilities are dropped). The rows advance together, so
    each row's next few frames are read at once, `READ_BYTES` for all rows (past the file's end, zeros)."""
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
        out[index[keep]] = probabilities[keep]


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
