"""One window policy for long audio, with and without timestamps.

qwen-asr cuts audio into 1200-s windows without timestamps and 180-s windows with them (the aligner's limit),
so turning timestamps on changes the transcript, and quality drops on very long windows. We cut every file the
same way: windows of at most `max_seconds` (never above the aligner's 180 s), each cut placed at the quietest
moment in the last `search_seconds` before the limit, so words are not split when a pause exists nearby.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import SAMPLE_RATE


@dataclass(frozen=True)
class Window:
    """A slice `[start, end)` of the 16 kHz samples."""

    start: int
    end: int

    @property
    def offset_seconds(self) -> float:
        """Where the window starts in the file, in seconds."""
        return self.start / SAMPLE_RATE

    @property
    def duration_seconds(self) -> float:
        """The window's length in seconds."""
        return (self.end - self.start) / SAMPLE_RATE


def _frame_energy(samples: np.ndarray, frame: int) -> np.ndarray:
    """Mean square per frame (the tail shorter than a frame is dropped: it is never a cut candidate)."""
    usable = len(samples) // frame * frame
    frames = samples[:usable].reshape(-1, frame)
    return np.einsum("ij,ij->i", frames, frames) / frame


def plan_windows(
    samples: np.ndarray,
    *,
    max_seconds: float = 180.0,
    search_seconds: float = 5.0,
    sample_rate: int = SAMPLE_RATE,
    frame_ms: float = 25.0,
) -> list[Window]:
    """Tile the audio with windows of at most `max_seconds`, cut at the quietest frame near each limit.

    The windows cover every sample exactly once, in order. Each cut lies in the middle of the lowest-energy frame
    within `[limit - search_seconds, limit]`, where `limit` is where the window would reach `max_seconds`;
    among equally quiet frames the latest wins, so windows stay long.
    """
    if not 0 < search_seconds < max_seconds:
        raise ValueError(f"need 0 < search_seconds < max_seconds, got {search_seconds} and {max_seconds}")
    total = len(samples)
    max_len = int(max_seconds * sample_rate)
    if total <= max_len:
        return [Window(0, total)]
    frame = max(1, int(frame_ms * sample_rate / 1000))
    energy = _frame_energy(np.asarray(samples, dtype=np.float32), frame)
    search = int(search_seconds * sample_rate)
    windows: list[Window] = []
    start = 0
    while total - start > max_len:
        limit = start + max_len
        first = -(-(limit - search) // frame)  # frames lying wholly inside [limit - search, limit]
        last = limit // frame - 1
        if last >= first:
            candidates = energy[first : last + 1]
            quietest = first + len(candidates) - 1 - int(np.argmin(candidates[::-1]))
            cut = quietest * frame + frame // 2
        else:
            cut = limit
        windows.append(Window(start, cut))
        start = cut
    windows.append(Window(start, total))
    return windows
