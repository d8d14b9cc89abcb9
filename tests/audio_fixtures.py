"""Test audio written on the fly in every container the worker must read (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import soundfile as sf

_SOUNDFILE = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"), "mp3": ("MP3", None)}
_PYAV = {"m4a": ("ipod", "aac"), "webm": ("webm", "libopus"), "mp4": ("mp4", "aac")}


def tone(seconds: float = 2.0, rate: int = 16000, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    """A 0.5-amplitude sine, float32, shape (samples, channels)."""
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)


def speech_like(seconds: float, rate: int = 16000, gaps: list[tuple[float, float]] | None = None) -> np.ndarray:
    """Loud noise bursts with silent gaps at the given (start, end) seconds, mono float32."""
    rng = np.random.default_rng(1)
    samples = (0.3 * rng.standard_normal(int(seconds * rate))).astype(np.float32)
    for start, end in gaps or []:
        samples[int(start * rate) : int(end * rate)] = 0.0
    return samples


def write_audio(path: Path, samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> Path:
    """Write `samples` ((n,) or (n, channels) float) as `fmt`: wav, flac, ogg, mp3 via libsndfile; m4a, webm,
    mp4 via FFmpeg. `subtype` picks a libsndfile PCM subtype (PCM_U8, PCM_24, PCM_32, FLOAT, DOUBLE)."""
    data = samples if samples.ndim == 2 else samples[:, None]
    if fmt in _SOUNDFILE:
        container, default = _SOUNDFILE[fmt]
        sf.write(str(path), data, rate, format=container, subtype=subtype or default)
        return path
    container, codec = _PYAV[fmt]
    out_rate = 48000 if codec == "libopus" else rate
    if out_rate != rate:
        import soxr

        data = soxr.resample(data, rate, out_rate)
    layout = "mono" if data.shape[1] == 1 else "stereo"
    with av.open(str(path), "w", format=container) as box:
        stream = box.add_stream(codec, rate=out_rate, layout=layout)
        planar = np.ascontiguousarray(data.T.astype(np.float32))
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        frame.sample_rate = out_rate
        for packet in stream.encode(frame):
            box.mux(packet)
        for packet in stream.encode(None):
            box.mux(packet)
    return path
