"""Audio decoding: every container, rate, depth and channel count users send; clear errors for the rest."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from qwen_asr_worker.audio import SAMPLE_RATE, AudioError, duration_seconds, load_audio
from tests.audio_fixtures import tone, write_audio

RMS_OF_HALF_SINE = 0.5 / np.sqrt(2)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3", "m4a", "webm", "mp4"])
@pytest.mark.parametrize(("rate", "channels"), [(16000, 1), (8000, 1), (44100, 2), (48000, 2)])
def test_formats_rates_channels(tmp_path: Path, fmt: str, rate: int, channels: int) -> None:
    path = write_audio(tmp_path / f"a.{fmt}", tone(2.0, rate, channels), rate, fmt)
    samples = load_audio(str(path))
    assert samples.dtype == np.float32 and samples.ndim == 1
    # lossy codecs add up to one codec frame (1024 samples for AAC) of priming/padding
    assert duration_seconds(samples) == pytest.approx(2.0, abs=max(0.07, 1100 / rate))
    assert _rms(samples[SAMPLE_RATE // 4 : -SAMPLE_RATE // 4]) == pytest.approx(RMS_OF_HALF_SINE, rel=0.06)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_wav_sample_formats(tmp_path: Path, subtype: str) -> None:
    path = write_audio(tmp_path / "a.wav", tone(1.0, 22050), 22050, "wav", subtype=subtype)
    samples = load_audio(str(path))
    assert len(samples) == SAMPLE_RATE
    assert _rms(samples[1000:-1000]) == pytest.approx(RMS_OF_HALF_SINE, rel=0.03)


@pytest.mark.parametrize("channels", range(1, 9))
def test_channel_counts_are_averaged(tmp_path: Path, channels: int) -> None:
    path = write_audio(tmp_path / "a.wav", tone(1.0, 16000, channels), 16000, "wav")
    assert _rms(load_audio(str(path))) == pytest.approx(RMS_OF_HALF_SINE, rel=0.01)


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 32000, 44100, 48000, 88200, 96000, 192000])
def test_sample_rates(tmp_path: Path, rate: int) -> None:
    path = write_audio(tmp_path / "a.wav", tone(1.5, rate, freq=300.0), rate, "wav")
    samples = load_audio(str(path))
    assert len(samples) == pytest.approx(1.5 * SAMPLE_RATE, abs=2)


def test_single_sample_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "one.wav"
    sf.write(str(path), np.array([0.25], np.float32), 8000)
    assert len(load_audio(str(path))) >= 1


def _bad(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    if name == "empty.wav":
        path.write_bytes(b"")
    elif name == "zero-samples.wav":
        sf.write(str(path), np.zeros(0, np.float32), 16000)
    elif name == "header-only.wav":
        write_audio(path, tone(1.0), 16000, "wav")
        path.write_bytes(path.read_bytes()[:44])
    elif name == "random.mp3":
        path.write_bytes(np.random.default_rng(3).bytes(20000))
    elif name == "notes.txt":
        path.write_text("this is not audio\n" * 100)
    elif name == "nan.wav":
        data = tone(1.0)[:, 0].copy()
        data[100] = np.nan
        sf.write(str(path), data, 16000, subtype="FLOAT")
    elif name == "inf.wav":
        data = tone(1.0)[:, 0].copy()
        data[5] = np.inf
        sf.write(str(path), data, 16000, subtype="DOUBLE")
    return str(path)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("empty.wav", "is empty (0 bytes)"),
        ("zero-samples.wav", "contains no audio samples"),
        ("header-only.wav", "contains no audio samples"),
        ("random.mp3", "could not decode"),
        ("notes.txt", "has no audio stream"),
        ("nan.wav", "NaN or infinite"),
        ("inf.wav", "NaN or infinite"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, fragment: str) -> None:
    with pytest.raises(AudioError, match=re.escape(fragment)):
        load_audio(_bad(tmp_path, name))


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/no/such/file.wav", "not found"),
        ("/", "is a directory"),
        ("http://example.com/a.wav", "not a URL"),
        ("data:audio/wav;base64,UklGRg==", "not a URL"),
    ],
)
def test_bad_paths(path: str, fragment: str) -> None:
    with pytest.raises(AudioError, match=fragment):
        load_audio(path)


def test_truncated_file_keeps_what_decodes(tmp_path: Path) -> None:
    path = write_audio(tmp_path / "a.wav", tone(2.0), 16000, "wav")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert duration_seconds(load_audio(str(path))) == pytest.approx(1.0, abs=0.01)
