"""Decode an uploaded audio file to what Qwen3-ASR wants: mono float32 samples at 16 kHz.

LocalAI hands us the upload as-is (`TranscriptRequest.dst`): whatever a browser, a phone or a voice assistant
recorded. libsndfile (soundfile) reads WAV/FLAC/OGG/MP3 quickly and exactly; what it cannot open (M4A/AAC,
WebM/Opus, MP4...) goes through FFmpeg via PyAV. Resampling uses soxr, which is fast and band-limited.
Every failure is an `AudioError` whose message names the file, the problem and the fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
_NOT_A_PATH = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|data:)", re.IGNORECASE)


class AudioError(ValueError):
    """The file cannot be used as audio; the message says why and what to do."""


def _check_path(path: str) -> Path:
    if _NOT_A_PATH.match(path):
        raise AudioError(f"dst must be a local file path, not a URL or data URI: {path[:80]!r}")
    file = Path(path)
    if not file.exists():
        raise AudioError(f"audio file not found: {path}; check the path passed in dst")
    if file.is_dir():
        raise AudioError(f"audio path {path} is a directory, not a file")
    if not os.access(file, os.R_OK):
        raise AudioError(f"audio file {path} is not readable by the worker (permissions)")
    if file.stat().st_size == 0:
        raise AudioError(f"audio file {path} is empty (0 bytes); the upload may have failed")
    return file


def _read_soundfile(file: Path) -> tuple[np.ndarray, int] | None:
    try:
        data, rate = sf.read(str(file), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError):
        return None
    return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0], int(rate)


def _read_pyav(file: Path) -> tuple[np.ndarray, int] | None:
    import av

    try:
        container = av.open(str(file))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError):
        return None
    with container:
        if not container.streams.audio:
            raise AudioError(f"{file} has no audio stream: it is not an audio file, or a video without sound")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        if not rate:
            return None
        # Planar float keeps the channels apart; we average them ourselves (FFmpeg's mono downmix sums them).
        resampler = av.AudioResampler(format="fltp", rate=rate)
        chunks: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().mean(axis=0, dtype=np.float32))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().mean(axis=0, dtype=np.float32))
        except (av.error.FFmpegError, ValueError):
            if not chunks:  # a truncated file: keep what decoded, fail only if nothing did
                return None
        declared = _declared_samples(stream, rate)
    samples = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if declared and len(samples) > declared:  # codec padding past the container's stated duration
        samples = samples[:declared]
    return samples, int(rate)


def _declared_samples(stream: object, rate: int) -> int:
    """The stream's duration in samples as the container states it, or 0 when unknown."""
    duration, time_base = getattr(stream, "duration", None), getattr(stream, "time_base", None)
    if not duration or not time_base:
        return 0
    return round(duration * time_base * rate)


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """Resample mono float32 samples from `rate` to 16 kHz with soxr (high quality)."""
    if rate == SAMPLE_RATE:
        return samples.astype(np.float32, copy=False)
    return soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)


def load_audio(path: str) -> np.ndarray:
    """Decode any supported file to 1-D float32 mono samples at 16 kHz.

    Raises:
        AudioError: the path is missing, not a file, empty, undecodable, silent of samples, or holds NaN/Inf.
    """
    file = _check_path(path)
    decoded = _read_soundfile(file) or _read_pyav(file)
    if decoded is None:
        raise AudioError(
            f"could not decode {path}: not a supported audio format (tried libsndfile and FFmpeg); "
            "send WAV, FLAC, OGG, MP3, M4A, WebM or another common audio file"
        )
    samples, rate = decoded
    if samples.size == 0:
        raise AudioError(f"{path} contains no audio samples")
    if not np.isfinite(samples).all():
        raise AudioError(f"{path} contains NaN or infinite samples; re-encode the file")
    out = resample(samples, rate)
    if out.size == 0:
        raise AudioError(f"{path} is too short to transcribe ({samples.size} samples at {rate} Hz)")
    return out


def duration_seconds(samples: np.ndarray) -> float:
    """Seconds of 16 kHz audio."""
    return len(samples) / SAMPLE_RATE
