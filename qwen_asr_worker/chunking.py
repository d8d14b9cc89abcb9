"""One window policy for long audio, with and without timestamps.

qwen-asr cuts audio into 1200-s windows without timestamps and 180-s windows with them (the aligner's limit), so
turning timestamps on would change the transcript, and quality drops on very long windows. We cut every file the
same way: windows of at most `max_seconds` (never above the aligner's 180 s), each cut placed in the quietest
stretch of the last `search_seconds` before the limit, so that words are not split when a pause exists nearby.

Quietness is the short-time energy of `frame_ms` frames, averaged over 100 ms of neighbouring frames so that a
real pause beats a single quiet frame inside a word (a stop consonant's closure). Among equally quiet frames (digital
silence) the longest run wins, and the cut goes to its middle, away from the speech on either side.

The last window keeps whatever remains, but never less than `_MIN_LAST_SECONDS` when the search range allows:
a sliver of a few milliseconds after the final cut would be transcribed (and aligned) on its own for nothing.

With voice activity detection on, `plan_speech_windows` tiles each speech region (see `vad`) the same way instead
of the whole file: the long silences between regions are never sent to the model, and every window still has its
place on the file's timeline, so times reported inside it need only its offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .audio import SAMPLE_RATE
from .spool import Samples

if TYPE_CHECKING:
    from .vad import SpeechRegion  # vad imports torch; planning windows needs only numpy

_SMOOTH_MS = 100.0  # frame energies are averaged over 100 ms: shorter dips are not pauses
_MIN_LAST_SECONDS = 1.0
_TIE_TOLERANCE = 1e-3  # energies within 0.1 % of the minimum count as equally quiet
_ENERGY_BLOCK = 1 << 20  # samples read at a time for frame energies: 4 MB, whatever the file's length


@dataclass(frozen=True)
class Window:
    """A slice `[start, end)` of the 16 kHz samples; where voice activity detection ran, speech lies in
    `[speech_start, speech_end)` (else the whole window counts)."""

    start: int
    end: int
    speech_start: int | None = None
    speech_end: int | None = None

    @property
    def speech_seconds(self) -> tuple[float, float]:
        """Where the speech in this window starts and ends in the file, in seconds."""
        start = self.start if self.speech_start is None else self.speech_start
        end = self.end if self.speech_end is None else self.speech_end
        return start / SAMPLE_RATE, end / SAMPLE_RATE

    @property
    def offset_seconds(self) -> float:
        """Where the window starts in the file, in seconds."""
        return self.start / SAMPLE_RATE

    @property
    def duration_seconds(self) -> float:
        """The window's length in seconds."""
        return (self.end - self.start) / SAMPLE_RATE


def plan_windows(
    samples: Samples,
    *,
    max_seconds: float = 180.0,
    search_seconds: float = 5.0,
    sample_rate: int = SAMPLE_RATE,
    frame_ms: float = 25.0,
) -> list[Window]:
    """Tile the audio with windows of at most `max_seconds`, each cut at the quietest point near its limit.

    The windows cover every sample exactly once, in order: the first starts at 0, the last ends at
    `len(samples)`, each ends where the next starts. Audio of at most `max_seconds` is one window (empty audio
    gives the single empty window `Window(0, 0)`). Each cut lies within `[limit - search_seconds, limit]`, where
    `limit` is where the window would reach `max_seconds`. The audio is read in blocks, never whole.

    Raises:
        ValueError: unless `max_seconds > search_seconds > 0`, `frame_ms > 0` and `sample_rate > 0`.
    """
    return _tile(samples, 0, len(samples), max_seconds, search_seconds, sample_rate, frame_ms)


def _tile(
    samples: Samples,
    begin: int,
    end: int,
    max_seconds: float,
    search_seconds: float,
    sample_rate: int = SAMPLE_RATE,
    frame_ms: float = 25.0,
) -> list[Window]:
    """`plan_windows` over the stretch `[begin, end)` of `samples`, in the file's own sample positions."""
    if not 0 < search_seconds < max_seconds:
        raise ValueError(f"need 0 < search_seconds < max_seconds, got {search_seconds} and {max_seconds}")
    if not (frame_ms > 0 and sample_rate > 0):
        raise ValueError(f"need frame_ms > 0 and sample_rate > 0, got {frame_ms} and {sample_rate}")
    total = end - begin
    max_len = max(1, int(max_seconds * sample_rate))
    if total <= max_len:
        return [Window(begin, end)]
    frame = max(1, round(frame_ms * sample_rate / 1000))
    quietness = _smooth(_frame_energy(samples, frame, begin, end), max(1, round(_SMOOTH_MS / frame_ms)))
    search = int(search_seconds * sample_rate)
    min_last = int(_MIN_LAST_SECONDS * sample_rate)
    windows: list[Window] = []
    start = 0
    while total - start > max_len:
        limit = start + max_len
        low = limit - search
        # Leave the last window at least min_last samples when the search range reaches that far back.
        high = min(limit, total - min_last) if total - min_last > low else limit
        cut = _quietest_point(quietness, frame, low, high)
        windows.append(Window(begin + start, begin + (cut if cut > start else limit)))
        start = windows[-1].end - begin
    windows.append(Window(begin + start, end))
    return windows


def plan_speech_windows(
    samples: Samples, regions: list[SpeechRegion], *, max_seconds: float = 180.0, search_seconds: float = 5.0
) -> list[Window]:
    """Windows over the speech regions only: each region is one window, or, when longer than `max_seconds`,
    is tiled as `plan_windows` tiles a file (cuts at the quietest points, frames counted from the region's
    start). Nothing outside the regions is covered; no regions give no windows. Each window records the span
    of speech it holds."""
    windows: list[Window] = []
    for region in regions:
        for piece in _tile(samples, region.start, region.end, max_seconds, search_seconds):
            speech_start = min(max(piece.start, region.speech_start), piece.end)
            windows.append(
                Window(piece.start, piece.end, speech_start, max(speech_start, min(piece.end, region.speech_end)))
            )
    return windows


def _frame_energy(samples: Samples, frame: int, begin: int, end: int) -> np.ndarray:
    """Mean square per frame of `[begin, end)`, frames counted from `begin`, read `_ENERGY_BLOCK` samples at a
    time (the tail shorter than a frame is never a cut candidate). Each frame's sum is the same whatever the
    block. NaN counts as infinitely loud, so it is never chosen and never breaks the search."""
    count = max(0, end - begin) // frame
    energy = np.empty(count, np.float64)
    step = max(1, _ENERGY_BLOCK // frame)
    for first in range(0, count, step):
        last = min(count, first + step)
        block = np.asarray(samples[begin + first * frame : begin + last * frame], dtype=np.float32)
        rows = block.reshape(last - first, frame)
        energy[first:last] = np.einsum("ij,ij->i", rows, rows)
    energy /= frame
    return np.nan_to_num(energy, nan=np.inf, posinf=np.inf)


def _smooth(energy: np.ndarray, width: int) -> np.ndarray:
    """Moving average over `width` frames. A convolution, not a cumulative sum: digital silence stays exactly 0."""
    if width <= 1 or len(energy) < width:
        return energy
    return np.convolve(energy, np.full(width, 1.0 / width), mode="same")


def _quietest_point(quietness: np.ndarray, frame: int, low: int, high: int) -> int:
    """A sample index in `[low, high]` in the middle of the quietest run of frames lying wholly inside it, or
    `high` when no frame fits."""
    first = max(0, -(-low // frame))
    last = min(len(quietness), high // frame)  # exclusive
    if last <= first:
        return high
    candidates = quietness[first:last]
    floor = float(candidates.min())
    quiet = candidates <= floor + max(abs(floor) * _TIE_TOLERANCE, 1e-12)
    # Runs of quiet frames: starts where quiet begins, ends (exclusive) where it stops.
    edges = np.diff(np.concatenate(([0], quiet.view(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    lengths = ends - starts
    best = len(lengths) - 1 - int(np.argmax(lengths[::-1]))  # the longest run; the latest among equals
    return int((first + starts[best]) * frame + (ends[best] - starts[best]) * frame // 2)
