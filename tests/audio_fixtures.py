"""Test audio written on the fly in every container the worker must read (nothing is downloaded).

libsndfile writes WAV, FLAC, OGG (Vorbis and Opus) and MP3; FFmpeg (PyAV) writes what libsndfile cannot: AAC in
M4A and MP4, and Opus in WebM.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

# fmt -> (libsndfile container, default subtype, sample rates the encoder accepts or None for any)
_SOUNDFILE: dict[str, tuple[str, str | None, tuple[int, ...] | None]] = {
    "wav": ("WAV", "PCM_16", None),
    "flac": ("FLAC", "PCM_16", None),
    "ogg": ("OGG", "VORBIS", None),
    "opus": ("OGG", "OPUS", (8000, 12000, 16000, 24000, 48000)),
    "mp3": ("MP3", None, (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)),
}
# fmt -> (FFmpeg muxer, encoder, sample rates the encoder accepts or None for any)
_PYAV: dict[str, tuple[str, str, tuple[int, ...] | None]] = {
    "m4a": ("ipod", "aac", None),
    "mp4": ("mp4", "aac", None),
    "webm": ("webm", "libopus", (48000,)),
}
FORMATS = (*_SOUNDFILE, *_PYAV)
_BLOCK = 1 << 16


def tone(seconds: float = 2.0, rate: int = 16000, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    """A 0.5-amplitude sine (RMS 0.354), float32, shape (samples, channels)."""
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)


def speech_like(
    seconds: float, rate: int = 16000, gaps: list[tuple[float, float]] | None = None, seed: int = 1
) -> np.ndarray:
    """Loud noise (RMS 0.3) with digital silence at the given (start, end) seconds, mono float32."""
    rng = np.random.default_rng(seed)
    samples = rng.standard_normal(int(seconds * rate), dtype=np.float32)
    samples *= 0.3
    for start, end in gaps or []:
        samples[int(start * rate) : int(end * rate)] = 0.0
    return samples


def write_audio(path: Path, samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> Path:
    """Write float `samples`, shape (n,) or (n, channels), to `path` as `fmt` (one of `FORMATS`).

    wav, flac, ogg (Vorbis), opus (Ogg Opus) and mp3 go through libsndfile; `subtype` picks its sample format
    (PCM_U8, PCM_16, PCM_24, PCM_32, FLOAT, DOUBLE for WAV). m4a, mp4 (AAC) and webm (Opus) go through FFmpeg, in
    mono or stereo. Audio at a rate the encoder refuses is resampled to the nearest it takes (Opus: 48 kHz).
    """
    data = samples if samples.ndim == 2 else samples[:, None]
    if fmt in _SOUNDFILE:
        container, default, rates = _SOUNDFILE[fmt]
        data, rate = _fit_rate(data, rate, rates)
        # Block-wise: libsndfile 1.2.2's Vorbis encoder crashes on one large write.
        with sf.SoundFile(str(path), "w", rate, data.shape[1], subtype or default, format=container) as out:
            for start in range(0, len(data), _BLOCK):
                out.write(data[start : start + _BLOCK])
        return path
    muxer, codec, rates = _PYAV[fmt]
    data, rate = _fit_rate(data, rate, rates)
    layout = {1: "mono", 2: "stereo"}[data.shape[1]]
    import av  # only the container formats need FFmpeg

    with av.open(str(path), "w", format=muxer) as box:
        stream = box.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data.T, dtype=np.float32), format="fltp", layout=layout)
        frame.sample_rate = rate
        # With a timestamp the encoder's priming gets an edit list, and decoders drop it: the length stays exact.
        frame.pts, frame.time_base = 0, Fraction(1, rate)
        for packet in (*stream.encode(frame), *stream.encode(None)):
            box.mux(packet)
    return path


def _fit_rate(data: np.ndarray, rate: int, allowed: tuple[int, ...] | None) -> tuple[np.ndarray, int]:
    if allowed is None or rate in allowed:
        return data, rate
    target = min(allowed, key=lambda r: (abs(r - rate), -r))
    return soxr.resample(data, rate, target).astype(np.float32), target
