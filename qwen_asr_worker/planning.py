"""The windows a request sends to the model, planned while its file decodes.

A request's windows depend on the audio and the options alone: the same with and without timestamps, streamed or
not. With voice activity detection (the default) they are the speech regions, each tiled into windows of at most
`chunk_seconds`; without it the whole file is tiled.

Planned from a file still decoding (`audio.DecodingAudio`), each window comes out as soon as nothing later in the
file can change it, so the model starts on the first speech while the rest is read, and a stream's first delta
does not wait for the end of an hours-long file. They are the same windows, to the sample, as the whole file gets:
the VAD's rows (`vad.probability_groups`), the region finder (`vad.RegionFinder`) and the cuts (`chunking.Tiler`)
do not depend on how much of the file is there. What is held meanwhile is the VAD's read-ahead and one cut's
search range of audio, whatever the file's length.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import numpy as np

from . import runtime, vad
from .chunking import Tiler, Window, with_speech
from .options import WorkerOptions
from .spool import Samples


class WindowPlan:
    """The windows of one request's audio, in order, as they become final (iterate once).

    `available(n)` reads the audio on to at least `n` samples and returns how many there are to read (fewer than
    `n` once the file has ended: its length); `check` runs between steps and may raise to stop (a cancel). With
    `keep_probabilities`, the VAD's frame probabilities are kept for `probabilities` (the diarizer's speech).
    """

    def __init__(
        self,
        samples: Samples,
        available: Callable[[int], int],
        opts: WorkerOptions,
        *,
        keep_probabilities: bool = False,
        check: Callable[[], None] = lambda: None,
    ) -> None:
        self.samples = samples
        self.available = available
        self.opts = opts
        self.windows: list[Window] = []  # those given so far
        self._keep = keep_probabilities
        self._groups: list[np.ndarray] = []
        self._check = check

    @property
    def probabilities(self) -> np.ndarray | None:
        """The VAD's frame probabilities of the whole file, once planned with VAD and `keep_probabilities`."""
        if not (self._keep and self.opts.vad):
            return None
        return np.concatenate(self._groups) if self._groups else np.zeros(0, np.float32)

    def __iter__(self) -> Iterator[Window]:
        for window in self._speech() if self.opts.vad else self._whole():
            self.windows.append(window)
            yield window
        runtime.trim_heap()  # planning a long file freed its frame probabilities and the region finder's floats

    def _tiler(self, begin: int) -> Tiler:
        return Tiler(self.samples, begin, max_seconds=self.opts.chunk_seconds)

    def _whole(self) -> Iterator[Window]:
        """The whole file tiled, each window given once the file is known to reach past its cut's limit."""
        tiler = self._tiler(0)
        while True:
            self._check()
            needed = tiler.needed()
            total = self.available(needed)
            if total < needed:
                break
            yield from tiler.advance(total)
        yield from tiler.finish(total)

    def _speech(self) -> Iterator[Window]:
        """The speech regions tiled. A region still open (speech longer than a group of VAD rows, with no pause
        of `vad_min_silence_seconds` yet) gives its first windows as soon as their cuts are final."""
        finder = vad.RegionFinder(self.opts.vad_settings)
        open_tiler: Tiler | None = None  # the windows of the run still open, or closed but not given yet

        def finished(regions: list[vad.SpeechRegion]) -> Iterator[Window]:
            nonlocal open_tiler
            for region in regions:
                tiler = open_tiler if open_tiler is not None and open_tiler.begin == region.start else None
                if tiler is not None:
                    open_tiler = None
                for piece in (tiler or self._tiler(region.start)).finish(region.end):
                    yield with_speech(piece, region.speech_start, region.speech_end)

        for probabilities in vad.probability_groups(self.samples, self.available):
            self._check()
            if self._keep:
                self._groups.append(probabilities)
            yield from finished(finder.feed(probabilities))
            run = finder.open_run()
            if run is not None:
                begin, speech_start, end_at_least = run
                if open_tiler is None or open_tiler.begin != begin:
                    open_tiler = self._tiler(begin)
                for piece in open_tiler.advance(end_at_least):  # its speech goes on past the piece
                    yield with_speech(piece, speech_start, piece.end)
        yield from finished(finder.finish(self.available(sys.maxsize)))


def plan_request(samples: Samples, opts: WorkerOptions) -> list[Window]:
    """`WindowPlan`'s windows for audio that is all there (an array, a finished `SpooledAudio`)."""
    return list(WindowPlan(samples, lambda needed: len(samples), opts))
