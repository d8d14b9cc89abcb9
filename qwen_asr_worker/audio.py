"""Decode an uploaded audio file to what Qwen3-ASR wants: mono float32 samples at 16 kHz.

LocalAI hands us the upload as-is (`TranscriptRequest.dst`, a path on the local disk): whatever a browser, a phone
or a voice assistant recorded. libsndfile (soundfile) reads WAV/FLAC/OGG/MP3 quickly and exactly; what it cannot
open (M4A/AAC, WebM/Opus, MP4...) goes through FFmpeg via PyAV. Resampling uses soxr, which is fast and
band-limited. Every failure is an `AudioError` whose message names the file, the problem and the fix; the servicer
answers it with INVALID_ARGUMENT.

Three things are deliberate:

* Only the local file system is read. URLs and data URIs are refused outright, and both decoders read through a
  file handle we opened ourselves, so FFmpeg never interprets the path as a protocol (`concat:`, `http:`) and
  cannot open anything else: a playlist (HLS, ffconcat) inside the upload would make it fetch other URLs.
* Memory stays near one copy of the 16 kHz result: each block (or decoded frame) is mixed down to mono and
  resampled as it arrives, soxr carrying its filter state across blocks (the output equals resampling the whole
  at once), and the 16 kHz pieces are concatenated once (`open_audio` can instead move them to a temporary file
  past `spill_bytes`: `spool.py`). A 48 kHz stereo hour never exists at 48 kHz.
* A damaged file gives what can be decoded. A truncated WAV yields its first part; FFmpeg skips packets it cannot
  decode. Only a file from which nothing decodes is an error.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Generator, Iterator
from fractions import Fraction
from typing import IO, Any

import numpy as np
import soundfile as sf
import soxr

from .errors import Overloaded, shown
from .spool import SPILL_BYTES, SpooledAudio, SpoolFull

SAMPLE_RATE = 16000

# soxr "HQ" is 20-bit precision with a steep linear-phase filter: transparent for speech recognition (the model's
# features stop at 8 kHz) and about twice as fast as "VHQ", whose extra precision the model cannot hear.
RESAMPLE_QUALITY = "HQ"

_BLOCK_FRAMES = 1 << 20  # frames per libsndfile read: 32 MB at most (8 channels), then mixed down to mono
_MAX_PADDING_SECONDS = 0.5  # decoded audio past the container's stated duration that we trim as codec padding
_NOT_A_PATH = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|data:)", re.IGNORECASE)
# No protocol matches this name, so FFmpeg refuses every nested open (HLS segments, ffconcat entries).
_NO_PROTOCOLS = {"protocol_whitelist": "none"}


class AudioError(ValueError):
    """The file cannot be used as audio; the message says why and what to do."""


def load_audio(path: str) -> np.ndarray:
    """Decode a local audio file to 1-D float32 mono samples at 16 kHz, all finite, held in memory.

    Channels are averaged; integer PCM is scaled to [-1, 1]. Any file with at least one decodable sample is valid
    and gives at least one sample (shorter than one 16 kHz sample period, it becomes its mean).

    Raises:
        AudioError: the path is a URL, missing, not a regular file, empty or unreadable; nothing in it decodes as
            audio; or it holds NaN or infinite samples.
    """
    with open_audio(path, spill_bytes=None) as audio:
        return audio[:]


def open_audio(path: str, spill_bytes: int | None = SPILL_BYTES) -> SpooledAudio:
    """`load_audio`'s samples as a `SpooledAudio`: past `spill_bytes` of decoded audio (None: never) they go to a
    temporary file as they are decoded, so a long recording never sits in memory whole. The caller closes it.

    Raises:
        AudioError: as `load_audio`.
        Overloaded: the temporary folder cannot take the audio.
    """
    with decode_audio(path, spill_bytes) as decoding:
        return decoding.finish()


def decode_audio(path: str, spill_bytes: int | None = SPILL_BYTES) -> DecodingAudio:
    """`open_audio`'s samples as they decode: the file is read as far as a reader asks (`DecodingAudio.available`),
    so the start of a long recording can be worked on before its end is read. The caller closes it.

    Raises:
        AudioError: the path is a URL, missing, not a regular file, empty or unreadable (the rest of
            `load_audio`'s errors come from `available` and `finish`, once the decoder meets them).
    """
    name = shown(path)
    _check_path(path, name)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by DecodingAudio, after both decoders are done with it
    except PermissionError:
        raise AudioError(
            f"audio file {name} is not readable by the worker (permission denied); "
            "make it readable by the user that runs the backend"
        ) from None
    except OSError as exc:
        raise AudioError(f"cannot open audio file {name}: {exc.strerror or exc}") from None
    return DecodingAudio(name, handle, spill_bytes)


class DecodingAudio:
    """A file's 16-kHz samples while it decodes, read as far as asked: `available(n)` decodes until `n` samples
    are final (or the file ends), and slices up to that are the file's own samples. Final means no later step
    can change them: a container's stated duration (`_trimmed_length`) may still cut the decoded tail as codec
    padding, so samples past it count only once the file has ended.

    Every failure `open_audio` reports comes from `available` or `finish`, at the point the decoder meets it (a
    NaN as soon as its block decodes).
    """

    def __init__(self, name: str, handle: IO[bytes], spill_bytes: int | None) -> None:
        self._name = name
        self._handle = handle
        self._steps = _decode_steps(name, handle, spill_bytes)
        self._audio = SpooledAudio(spill_bytes=None)  # replaced by the decoder's own at its first step
        self._final = 0
        self._done = False
        self._closed = False
        self._owned = True  # the samples are closed with this, until `finish` hands them over

    def available(self, needed: int) -> int:
        """Decode until at least `needed` samples are final, or to the end; return how many are final. Fewer than
        `needed` means the file has ended: that is its length.

        Raises:
            RuntimeError: decoding was stopped (`close`, or an error raised before) short of the end.
        """
        if self._closed and not self._done and self._final < needed:
            raise RuntimeError(f"{self._name}: read past {self._final} samples after its decoding was stopped")
        while not self._done and self._final < needed:
            self._step()
        return self._final

    @property
    def on_disk(self) -> bool:
        """Whether the samples went to a temporary file (`SpooledAudio.on_disk`)."""
        return self._audio.on_disk

    @property
    def complete(self) -> bool:
        """Whether the file has been decoded to its end."""
        return self._done

    def finish(self) -> SpooledAudio:
        """Decode the rest and hand over all the samples: the caller closes them, `close` no longer does."""
        self.available(sys.maxsize)
        self._handle.close()
        self._owned = False
        return self._audio

    def __len__(self) -> int:
        return self._final

    def __getitem__(self, key: slice) -> np.ndarray:
        return self._audio[key]

    def close(self) -> None:
        """Stop decoding and free what was decoded (unless `finish` handed it over)."""
        self._closed = True
        self._steps.close()
        self._handle.close()
        if self._owned:
            self._audio.close()

    def __enter__(self) -> DecodingAudio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _step(self) -> None:
        try:
            self._audio, self._final = next(self._steps)
        except StopIteration as stop:
            self._audio, self._done = stop.value, True
            self._final = len(self._audio)
        except SpoolFull as exc:
            self.close()
            raise Overloaded(f"{self._name}: {exc}") from None
        except AudioError:
            self.close()
            raise
        if not self._audio.finite:  # after resampling, which spreads a NaN and can overflow huge samples to infinity
            self.close()
            raise AudioError(f"{self._name} contains NaN or infinite samples; re-export it (integer PCM is safest)")


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """Resample 1-D samples from `rate` to 16 kHz with soxr, returning float32.

    Non-empty input always gives at least one sample: when it spans less than one 16 kHz sample period (soxr
    returns nothing), its mean stands for it.
    """
    if rate <= 0:
        raise AudioError(f"invalid sample rate {rate} Hz")
    collector = _To16k(SpooledAudio(spill_bytes=None))
    collector.add(samples, rate)
    with collector.result() as out:
        return out[:]


def duration_seconds(samples: np.ndarray) -> float:
    """Seconds of 16 kHz audio."""
    return len(samples) / SAMPLE_RATE


class _To16k:
    """Mono chunks at any rate in, 16 kHz float32 samples out into a `SpooledAudio`; each chunk is resampled as
    it arrives."""

    _HEAD = 64  # input samples kept to stand for audio too short to give a 16 kHz sample

    def __init__(self, out: SpooledAudio) -> None:
        self.out = out
        self._rate = SAMPLE_RATE
        self._stream: soxr.ResampleStream | None = None
        self._head = np.zeros(0, np.float32)

    def add(self, chunk: np.ndarray, rate: int) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if rate != self._rate:  # a new rate (or the first): finish the previous run, start a resampler
            self._finish_run()
            self._rate = rate
            if rate != SAMPLE_RATE:
                self._stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY)
        if len(self._head) < self._HEAD:
            self._head = np.concatenate([self._head, chunk[: self._HEAD]])
        self.out.append(chunk if self._stream is None else self._stream.resample_chunk(chunk))

    def result(self) -> SpooledAudio:
        """The samples so far, finished (at least one when any input came)."""
        self._finish_run()
        if len(self.out) == 0 and self._head.size:
            self.out.append(np.array([self._head.mean(dtype=np.float64)], np.float32))
        return self.out.finish()

    def _finish_run(self) -> None:
        if self._stream is not None:
            self.out.append(self._stream.resample_chunk(np.zeros(0, np.float32), last=True))
            self._stream = None


def _check_path(path: str, name: str) -> None:
    """Refuse anything but an existing, non-empty regular file, each with the reason and the fix."""
    if _NOT_A_PATH.match(path):
        raise AudioError(
            f"dst must be a local file path, not a URL or data URI: {shown(path, 80)!r}; "
            "LocalAI downloads the upload and passes its path"
        )
    if not path:
        raise AudioError("no audio file given: dst is empty")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise AudioError(f"audio file not found: {name}; check the path LocalAI passed in dst") from None
    except PermissionError:
        raise AudioError(
            f"audio file {name} cannot be reached by the worker (permission denied on a parent folder)"
        ) from None
    except (OSError, ValueError) as exc:  # ValueError: an embedded NUL byte or an unencodable name
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AudioError(f"invalid audio path {name}: {reason}") from None
    if stat.S_ISDIR(info.st_mode):
        raise AudioError(f"audio path {name} is a directory, not a file; pass the audio file itself")
    if not stat.S_ISREG(info.st_mode):  # a FIFO or device could block or never end
        raise AudioError(f"audio path {name} is not a regular file (a device, FIFO or socket); pass a file")
    if info.st_size == 0:
        raise AudioError(f"audio file {name} is empty (0 bytes); the upload may have failed, send it again")


Steps = Generator[tuple[SpooledAudio, int], None, SpooledAudio]


def _decode_steps(name: str, handle: IO[bytes], spill_bytes: int | None) -> Steps:
    """Mono float32 samples at 16 kHz, from libsndfile or else FFmpeg; `name` is the path for messages. Yields
    the audio so far and how many of its samples are final after each decoded block; returns it finished. The
    fallback to FFmpeg happens only when libsndfile gave no sample, so nothing yielded as final is taken back."""
    first = yield from _read_soundfile(handle, spill_bytes)
    if first is not None and len(first):
        return first
    handle.seek(0)
    try:
        second = yield from _read_pyav(name, handle, spill_bytes)
    except AudioError:
        if first is not None:  # libsndfile knew the format; its "no samples" is the better answer
            second = None
        else:
            raise
    if second is not None and len(second):
        return second
    if first is None and second is None:
        raise AudioError(
            f"could not decode {name}: not a supported audio format (tried libsndfile and FFmpeg); "
            "send WAV, FLAC, OGG, MP3, M4A, WebM or another common audio file"
        )
    raise AudioError(f"{name} contains no audio samples (only a header, or the recording is empty)")


def _read_soundfile(
    handle: IO[bytes], spill_bytes: int | None = None
) -> Generator[tuple[SpooledAudio, int], None, SpooledAudio | None]:
    """Decode with libsndfile to 16 kHz mono, or None when it does not know the format; yields after each block."""
    try:
        sound = sf.SoundFile(handle)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError):
        return None
    collector = _To16k(SpooledAudio(spill_bytes))
    read_any = False
    with sound:
        rate, channels = int(sound.samplerate), int(sound.channels)
        if rate <= 0 or channels <= 0:
            return None
        # A matrix-vector product mixes down ~20x faster than mean(axis=1) over the short, contiguous axis.
        weights = np.full(channels, 1.0 / channels, dtype=np.float32)
        try:
            # Fixed-size reads, never `read()` of the whole file: that allocates what the header claims,
            # which a damaged FLAC can put at terabytes.
            while True:
                block = sound.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
                if not len(block):
                    break
                with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf input is refused after decoding
                    mono = block @ weights if channels > 1 else block[:, 0]
                del block
                collector.add(mono, rate)
                read_any = True
                yield collector.out, len(collector.out)
        except (sf.LibsndfileError, RuntimeError, ValueError, OSError):
            if not read_any:
                collector.out.close()
                return None
    return collector.result()


def _read_pyav(
    name: str, handle: IO[bytes], spill_bytes: int | None = None
) -> Generator[tuple[SpooledAudio, int], None, SpooledAudio | None]:
    """Decode the first audio stream with FFmpeg to 16 kHz mono, or None when FFmpeg cannot open the file; yields
    after each frame, holding back what the stated duration may trim."""
    import av  # imported on first use: most uploads never need FFmpeg

    try:
        container = av.open(handle, container_options=_NO_PROTOCOLS, metadata_errors="replace")
    except (av.FFmpegError, OSError, ValueError, EOFError):
        return None
    with container:
        if not container.streams.audio:
            raise AudioError(
                f"{name} has no audio stream (FFmpeg read it as {container.format.long_name}); "
                "send an audio file, or a video with a sound track"
            )
        stream = container.streams.audio[0]
        declared = stream.duration * stream.time_base if stream.duration and stream.time_base else None
        kept = round(declared * SAMPLE_RATE) if declared is not None else sys.maxsize  # never trimmed
        collector = _To16k(SpooledAudio(spill_bytes))
        decoded = False
        for _ in _decode_stream(container, stream, collector):
            decoded = True
            yield collector.out, min(len(collector.out), kept)
        if not decoded:
            collector.out.close()
            return None
    audio = collector.result()
    audio.truncate(_trimmed_length(len(audio), declared))
    return audio


def _decode_stream(container: Any, stream: Any, collector: _To16k) -> Iterator[None]:
    """Feed every decodable frame to `collector`, mixed down to mono at its own rate (which may change midway),
    yielding after each. Undecodable packets are skipped; a demuxer error ends the stream with what was decoded
    so far."""
    import av

    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except (av.FFmpegError, ValueError):
                continue
            for frame in frames:
                rate = int(frame.sample_rate or 0)
                if rate > 0 and frame.samples:
                    collector.add(_frame_to_mono(frame), rate)
                    yield
    except (av.FFmpegError, OSError, ValueError, EOFError):
        pass


def _frame_to_mono(frame: Any) -> np.ndarray:
    """One decoded frame, whatever its sample format and layout, as mono float32 in [-1, 1]."""
    data = frame.to_ndarray()
    channels = max(1, frame.layout.nb_channels)
    if not frame.format.is_planar:  # packed: one row of interleaved samples
        data = data.reshape(-1, channels).T
    if data.dtype == np.uint8:
        return (data.mean(axis=0, dtype=np.float32) - 128.0) / 128.0
    if data.dtype.kind == "i":
        return data.mean(axis=0, dtype=np.float32) / float(2 ** (8 * data.dtype.itemsize - 1))
    return data.mean(axis=0, dtype=np.float32)


def _trimmed_length(length: int, declared: Fraction | None) -> int:
    """The decoded length without codec padding beyond the duration (seconds) the container states. A larger
    excess means the header is wrong, and then the decoded audio wins."""
    if declared is None:
        return length
    expected = round(declared * SAMPLE_RATE)
    excess = length - expected
    if expected > 0 and 0 < excess <= _MAX_PADDING_SECONDS * SAMPLE_RATE:
        return expected
    return length
