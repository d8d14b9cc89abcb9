"""Decoded audio that need not sit in memory whole: long recordings go to a temporary file as they are decoded.

An hour of 16-kHz float32 mono is 230 MB, ten hours 2.3 GB; holding a request's whole file made the worker's
memory grow with the file's length. `SpooledAudio` collects the decoder's 16-kHz blocks in memory until they pass
`spill_bytes`, then moves them to an unnamed temporary file (`tempfile.TemporaryFile` in `TMPDIR`: the system
removes it when it is closed or the process dies) and appends there. A request then reads what it works on:
`audio[a:b]` is a new float32 array of those samples, read with `os.preadv` (thread-safe, no shared file offset).
Nothing maps the file, so the worker's resident memory is what its readers hold, not the file; the operating
system's page cache keeps recently read parts fast and gives them back under pressure.

Results do not depend on where the samples are: a slice holds the same float32 values either way. Samples can be
read while more are appended (a request plans and transcribes the start of a file while the rest decodes): reads
see what was appended before them.
"""

from __future__ import annotations

import bisect
import os
import tempfile
from typing import IO, Protocol

import numpy as np

SPILL_BYTES = 32 << 20  # about 8.7 minutes of 16-kHz audio stays in memory; longer files go to disk
_ITEM = np.dtype(np.float32).itemsize


class Samples(Protocol):
    """What the request pipeline reads audio through: a length and contiguous slices (a NumPy array, or a
    `SpooledAudio`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: slice) -> np.ndarray: ...


class SpoolFull(Exception):
    """The temporary folder could not take the decoded audio (disk full, not writable). Not an OSError, so the
    decoders' handling of damaged files never mistakes it for one."""


class SpooledAudio:
    """1-D float32 samples, appended in blocks, then read as slices; in memory or in a temporary file."""

    def __init__(self, spill_bytes: int | None = SPILL_BYTES, directory: str | None = None) -> None:
        self._spill = spill_bytes  # None: never spill
        self._directory = directory
        self._chunks: list[np.ndarray] = []
        self._starts: list[int] = []  # where each in-memory chunk begins, for reads before `finish`
        self._array: np.ndarray | None = None
        self._file: IO[bytes] | None = None
        self._unflushed = False  # bytes in Python's write buffer, which reads (preadv on the descriptor) cannot see
        self._length = 0
        self._finished = False
        self.finite = True  # every sample appended so far is finite

    # --- writing ------------------------------------------------------------------------------------------
    def append(self, block: np.ndarray) -> None:
        """Add samples at the end (before `finish`)."""
        if self._finished:
            raise RuntimeError("SpooledAudio.append after finish")
        block = np.ascontiguousarray(block, dtype=np.float32)
        if block.size == 0:
            return
        if self.finite and not np.isfinite(block).all():
            self.finite = False
        if self._file is not None:
            self._write(block)
        else:
            self._starts.append(self._length)
            self._chunks.append(block)
            if self._spill is not None and (self._length + block.size) * _ITEM > self._spill:
                self._move_to_disk()
        self._length += block.size

    def truncate(self, length: int) -> None:
        """Keep only the first `length` samples (codec padding past a container's stated duration), once finished."""
        if not self._finished:
            raise RuntimeError("SpooledAudio.truncate before finish")
        length = max(0, min(length, self._length))
        if self._file is not None:
            self._file.truncate(length * _ITEM)
        elif self._array is not None:
            self._array = self._array[:length]
        self._length = length

    def finish(self) -> SpooledAudio:
        """No more samples: in memory, the blocks become one array (returns self)."""
        if not self._finished:
            self._finished = True
            if self._file is None:
                self._array = _join(self._chunks)
                self._chunks, self._starts = [], []
        return self

    # --- reading ------------------------------------------------------------------------------------------
    @property
    def on_disk(self) -> bool:
        """Whether the samples went to the temporary file."""
        return self._file is not None

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, key: slice) -> np.ndarray:
        """The samples of a contiguous slice (step 1) as a float32 array."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("SpooledAudio reads contiguous slices only, e.g. audio[start:end]")
        start, stop, _ = key.indices(self._length)
        return self.read(start, stop)

    @property
    def finished(self) -> bool:
        """Whether `finish` was called: no more samples come."""
        return self._finished

    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples `[start, stop)` (clipped to what was appended) as a new float32 array, or a view of the array in
        memory."""
        start, stop = max(0, start), min(self._length, stop)
        if stop <= start:
            return np.zeros(0, np.float32)
        if self._file is None:
            if self._array is not None:
                return self._array[start:stop]
            return self._read_chunks(start, stop)
        if self._unflushed:
            self._unflushed = False
            self._file.flush()
        out = np.empty(stop - start, np.float32)
        view = memoryview(out).cast("B")
        done, offset = 0, start * _ITEM
        while done < len(view):  # preadv may return less than asked
            got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if got <= 0:
                raise SpoolFull(f"the decoded audio's temporary file ended early (read {done} of {len(view)} bytes)")
            done += got
        return out

    def _read_chunks(self, start: int, stop: int) -> np.ndarray:
        """`read` before `finish`, in memory: the pieces of the chunks that `[start, stop)` spans."""
        first = bisect.bisect_right(self._starts, start) - 1
        pieces = []
        for k in range(first, len(self._chunks)):
            begin = self._starts[k]
            if begin >= stop:
                break
            pieces.append(self._chunks[k][max(0, start - begin) : stop - begin])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def close(self) -> None:
        """Free the memory or the temporary file."""
        self._chunks, self._starts, self._array = [], [], None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SpooledAudio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the temporary file ------------------------------------------------------------------------------
    def _move_to_disk(self) -> None:
        try:
            self._file = tempfile.TemporaryFile(dir=self._directory)  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise SpoolFull(_spool_message(self._directory, exc)) from None
        chunks, self._chunks, self._starts = self._chunks, [], []
        for chunk in chunks:
            self._write(chunk)

    def _write(self, block: np.ndarray) -> None:
        assert self._file is not None
        try:
            self._file.write(memoryview(block).cast("B"))
            self._unflushed = True
        except OSError as exc:
            raise SpoolFull(_spool_message(self._directory, exc)) from None


def _spool_message(directory: str | None, exc: OSError) -> str:
    where = directory or tempfile.gettempdir()
    return (
        f"cannot keep the decoded audio in the temporary folder {where}: {exc.strerror or exc}; free disk space "
        "there or point TMPDIR at a folder with room (a 16-kHz hour takes 230 MB)"
    )


def _join(chunks: list[np.ndarray]) -> np.ndarray:
    if not chunks:
        return np.zeros(0, np.float32)
    if len(chunks) == 1:
        return chunks[0]
    return np.concatenate(chunks)
