"""One window policy for long audio, with and without timestamps.

qwen-asr cuts audio into 1200-s windows without timestamps and 180-s windows with them (the aligner's limit), so
turning timestamps on would change the transcript, and quality drops on very long windows. We cut every file the
same way: windows of at most `max_seconds` (never above the aligner's 180 s), each cut placed in the quietest
stretch of the last `search_seconds` before the limit, so that words are not split when a pause exists nearby.

Quietness is the short-time energy of `frame_ms` frames, averaged over 100 ms of neighbouring frames so that a
real pause beats a single quiet frame inside a word (a stop consonant's closure). Only each cut's search range
is read, so planning costs the same whatever the file's length, and a file still decoding can be cut as it
arrives (`Tiler`). Among equally quiet frames (digital
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
    return Tiler(samples, begin, max_seconds, search_seconds, sample_rate, frame_ms).finish(end)


class Tiler:
    """`plan_windows` over a stretch that starts at `begin` and whose end may not be known yet (a file still
    decoding, a speech region still open): `advance` gives the windows that no later end can change, `finish`
    the rest. Only a window's last cut depends on where the stretch ends (the last window keeps at least
    `_MIN_LAST_SECONDS`), and a cut's quietness only on frames a few past its search range, so a cut is final once
    the stretch is known to reach a second past its limit. Each cut reads only its search range's audio.
    """

    def __init__(
        self,
        samples: Samples,
        begin: int,
        max_seconds: float = 180.0,
        search_seconds: float = 5.0,
        sample_rate: int = SAMPLE_RATE,
        frame_ms: float = 25.0,
    ) -> None:
        if not 0 < search_seconds < max_seconds:
            raise ValueError(f"need 0 < search_seconds < max_seconds, got {search_seconds} and {max_seconds}")
        if not (frame_ms > 0 and sample_rate > 0):
            raise ValueError(f"need frame_ms > 0 and sample_rate > 0, got {frame_ms} and {sample_rate}")
        self.samples = samples
        self.begin = begin
        self._max_len = max(1, int(max_seconds * sample_rate))
        self._search = int(search_seconds * sample_rate)
        self._min_last = int(_MIN_LAST_SECONDS * sample_rate)
        self._frame = max(1, round(frame_ms * sample_rate / 1000))
        self._width = max(1, round(_SMOOTH_MS / frame_ms))
        self._start = 0  # where the next window starts, from `begin`

    def needed(self) -> int:
        """Where the stretch must be known to reach (in the file) for `advance` to give the next window."""
        margin = max(self._min_last, self._width * self._frame) + self._width * self._frame
        return self.begin + self._start + self._max_len + margin

    def advance(self, end_at_least: int) -> list[Window]:
        """The next windows, given that the stretch reaches at least `end_at_least`."""
        windows: list[Window] = []
        while end_at_least >= self.needed():
            # Enough audio lies past this cut that the last-window rule cannot apply and every frame its
            # quietness uses is whole: the count of frames passed is only a lower bound, never reached.
            windows.append(self._next(self._start + self._max_len, (end_at_least - self.begin) // self._frame))
        return windows

    def finish(self, end: int) -> list[Window]:
        """The remaining windows of the stretch `[begin, end)`."""
        total = end - self.begin
        windows: list[Window] = []
        while total - self._start > self._max_len:
            limit = self._start + self._max_len
            low = limit - self._search
            # Leave the last window at least min_last samples when the search range reaches that far back.
            high = min(limit, total - self._min_last) if total - self._min_last > low else limit
            windows.append(self._next(high, total // self._frame))
        windows.append(Window(self.begin + self._start, end))
        self._start = total
        return windows

    def _next(self, high: int, frames: int) -> Window:
        """The window from the current start, cut at the quietest point in `[limit - search, high]`; `frames` is
        the number of whole frames in the stretch."""
        limit = self._start + self._max_len
        cut = self._quietest(limit - self._search, high, frames)
        window = Window(self.begin + self._start, self.begin + (cut if cut > self._start else limit))
        self._start = window.end - self.begin
        return window

    def _quietest(self, low: int, high: int, frames: int) -> int:
        """`_quietest_point` over the smoothed energies of frames `[ceil(low / frame), high // frame)`, computed
        from those frames and their smoothing neighbours only (zero past the stretch's `frames`)."""
        frame, width = self._frame, self._width
        first = max(0, -(-low // frame))
        last = min(frames, high // frame)  # exclusive
        if last <= first:
            return high
        start = self.begin + first * frame
        if frames < width:  # too short to smooth: the energies as they are
            return _quietest_point(
                _frame_energy(self.samples, frame, start, start + (last - first) * frame), first, frame
            )
        # A moving average centred as `np.convolve(mode="same")` centres it: `before` frames back, `after` on.
        before, after = width // 2, (width - 1) // 2
        lo, hi = max(0, first - before), min(frames, last + after)
        padded = np.zeros(last - first + before + after, np.float64)
        padded[lo - first + before : hi - first + before] = _frame_energy(
            self.samples, frame, self.begin + lo * frame, self.begin + hi * frame
        )
        summed = np.zeros(last - first, np.float64)
        for k in range(width):  # added in one order, element by element: the same sums wherever the range lies
            summed += padded[k : k + last - first]
        return _quietest_point(summed / width, first, frame)


def plan_speech_windows(
    samples: Samples, regions: list[SpeechRegion], *, max_seconds: float = 180.0, search_seconds: float = 5.0
) -> list[Window]:
    """Windows over the speech regions only: each region is one window, or, when longer than `max_seconds`,
    is tiled as `plan_windows` tiles a file (cuts at the quietest points, frames counted from the region's
    start). Nothing outside the regions is covered; no regions give no windows. Each window records the span
    of speech it holds."""
    windows: list[Window] = []
    for region in regions:
        tiler = Tiler(samples, region.start, max_seconds, search_seconds)
        windows.extend(with_speech(piece, region.speech_start, region.speech_end) for piece in tiler.finish(region.end))
    return windows


def with_speech(piece: Window, speech_start: int, speech_end: int) -> Window:
    """A window cut from a speech region, recording the part of the region's speech `[speech_start, speech_end)`
    that lies in it (empty at its start when none does)."""
    start = min(max(piece.start, speech_start), piece.end)
    return Window(piece.start, piece.end, start, max(start, min(piece.end, speech_end)))


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


def _quietest_point(quietness: np.ndarray, first: int, frame: int) -> int:
    """A sample index in the middle of the quietest run of frames, `quietness` holding frames `first` on (at
    least one). Among equally quiet runs the longest wins, the latest among equals."""
    floor = float(quietness.min())
    quiet = quietness <= floor + max(abs(floor) * _TIE_TOLERANCE, 1e-12)
    # Runs of quiet frames: starts where quiet begins, ends (exclusive) where it stops.
    edges = np.diff(np.concatenate(([0], quiet.view(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    lengths = ends - starts
    best = len(lengths) - 1 - int(np.argmax(lengths[::-1]))
    return int((first + starts[best]) * frame + (ends[best] - starts[best]) * frame // 2)
