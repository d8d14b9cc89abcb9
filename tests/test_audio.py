"""Audio decoding: every container, rate, depth and channel count users send; clear errors for the rest."""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_asr_worker import audio
from qwen_asr_worker.audio import SAMPLE_RATE, AudioError, duration_seconds, load_audio, resample
from tests.audio_fixtures import FORMATS, speech_like, tone, write_audio

RMS_OF_HALF_SINE = 0.5 / np.sqrt(2)
WAV_SUBTYPES = ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def _check(samples: np.ndarray, seconds: float) -> None:
    """1-D float32, finite, the expected duration (±50 ms or ±1 %), and the 0.5 sine's RMS (±5 %)."""
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert np.isfinite(samples).all()
    assert duration_seconds(samples) == pytest.approx(seconds, abs=max(0.05, 0.01 * seconds))
    assert _rms(samples[SAMPLE_RATE // 4 : -SAMPLE_RATE // 4]) == pytest.approx(RMS_OF_HALF_SINE, rel=0.05)


# --- what must decode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("rate", "channels"), [(16000, 1), (8000, 1), (44100, 2), (48000, 2)])
def test_formats_rates_channels(tmp_path: Path, fmt: str, rate: int, channels: int) -> None:
    path = write_audio(tmp_path / f"a.{fmt}", tone(2.0, rate, channels), rate, fmt)
    _check(load_audio(str(path)), 2.0)


@pytest.mark.parametrize("subtype", WAV_SUBTYPES)
def test_wav_sample_formats(tmp_path: Path, subtype: str) -> None:
    path = write_audio(tmp_path / "a.wav", tone(1.0, 22050), 22050, "wav", subtype=subtype)
    samples = load_audio(str(path))
    assert len(samples) == SAMPLE_RATE
    _check(samples, 1.0)


@pytest.mark.parametrize("dtype", ["int16", "int32"])
def test_integer_pcm_is_scaled_to_unit_range(tmp_path: Path, dtype: str) -> None:
    info = np.iinfo(dtype)
    square = np.tile(np.array([info.max, info.min], dtype=dtype).repeat(8), 1000)
    sf.write(str(tmp_path / "a.wav"), square, SAMPLE_RATE, subtype="PCM_16" if dtype == "int16" else "PCM_32")
    samples = load_audio(str(tmp_path / "a.wav"))
    assert samples.min() == -1.0 and samples.max() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("channels", range(1, 9))
def test_channel_counts_are_averaged(tmp_path: Path, channels: int) -> None:
    path = write_audio(tmp_path / "a.wav", tone(1.0, 16000, channels), 16000, "wav")
    assert _rms(load_audio(str(path))) == pytest.approx(RMS_OF_HALF_SINE, rel=0.01)


@pytest.mark.parametrize("fmt", ["wav", "flac", "m4a", "webm"])
def test_mixdown_averages_rather_than_sums(tmp_path: Path, fmt: str) -> None:
    """Sound in the left channel only comes out at half amplitude."""
    left = tone(2.0, 48000, 2)
    left[:, 1] = 0.0
    samples = load_audio(str(write_audio(tmp_path / f"l.{fmt}", left, 48000, fmt)))
    assert _rms(samples[4000:-4000]) == pytest.approx(RMS_OF_HALF_SINE / 2, rel=0.05)


def test_opposite_phases_cancel(tmp_path: Path) -> None:
    opposite = tone(1.0, 16000, 2)
    opposite[:, 1] *= -1
    path = write_audio(tmp_path / "o.wav", opposite, 16000, "wav", subtype="FLOAT")
    assert _rms(load_audio(str(path))) < 1e-7


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 32000, 44100, 48000, 88200, 96000, 176400, 192000])
def test_sample_rates(tmp_path: Path, rate: int) -> None:
    path = write_audio(tmp_path / "a.wav", tone(1.5, rate, freq=300.0), rate, "wav")
    samples = load_audio(str(path))
    assert len(samples) == pytest.approx(1.5 * SAMPLE_RATE, abs=2)
    _check(samples, 1.5)


def _ended(steps: Generator[object, None, object]) -> object:
    """A decoder's steps run to the end: its finished audio."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


@pytest.mark.parametrize("subtype", WAV_SUBTYPES)
@pytest.mark.parametrize("channels", [1, 2, 6])
def test_ffmpeg_path_matches_libsndfile(tmp_path: Path, subtype: str, channels: int) -> None:
    """FFmpeg hands WAV over as packed integers or floats of each width: scaled and mixed like libsndfile does."""
    data = tone(0.5, 16000, channels) * np.linspace(0.2, 1.0, channels, dtype=np.float32)
    path = write_audio(tmp_path / "a.wav", data, 16000, "wav", subtype=subtype)
    with open(path, "rb") as handle:
        expected = _ended(audio._read_soundfile(handle))
        handle.seek(0)
        decoded = _ended(audio._read_pyav(str(path), handle))
    assert expected is not None and decoded is not None
    np.testing.assert_allclose(decoded[:], expected[:], atol=1e-2 if subtype == "PCM_U8" else 1e-6)


def test_ffmpeg_follows_a_sample_rate_change(tmp_path: Path) -> None:
    """Two MP3s glued together, 44.1 kHz then 22.05 kHz: each part is resampled from its own rate."""
    first = write_audio(tmp_path / "a.mp3", tone(2.0, 44100), 44100, "mp3").read_bytes()
    second = write_audio(tmp_path / "b.mp3", tone(2.0, 22050), 22050, "mp3").read_bytes()
    path = tmp_path / "joined.mp3"
    path.write_bytes(first + second)
    with open(path, "rb") as handle:
        decoded = _ended(audio._read_pyav(str(path), handle))
    assert decoded is not None
    # The second file's encoder delay and header frame add about 0.09 s; at the first file's rate it would be 3 s.
    assert duration_seconds(decoded) == pytest.approx(4.0, abs=0.15)
    assert _rms(decoded[4000:-4000]) == pytest.approx(RMS_OF_HALF_SINE, rel=0.05)


@pytest.mark.parametrize(("rate", "expected"), [(8000, 2), (16000, 1), (48000, 1), (192000, 1)])
def test_a_single_sample_is_valid(tmp_path: Path, rate: int, expected: int) -> None:
    path = tmp_path / "one.wav"
    sf.write(str(path), np.array([0.25], np.float32), rate, subtype="FLOAT")
    samples = load_audio(str(path))
    assert len(samples) == expected and np.isfinite(samples).all()


def test_header_without_data_length_is_read_to_the_end(tmp_path: Path) -> None:
    """Recorders that stream a WAV write 0 as the data length; FFmpeg still reads the samples."""
    path = write_audio(tmp_path / "a.wav", tone(2.0), 16000, "wav")
    data = bytearray(path.read_bytes())
    data[4:8] = data[40:44] = bytes(4)
    path.write_bytes(bytes(data))
    _check(load_audio(str(path)), 2.0)


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3", "webm"])
def test_truncated_file_keeps_what_decodes(tmp_path: Path, fmt: str) -> None:
    # Noise, not a tone: a compressed tone is so small that half the file may be one Ogg page, decodable or not.
    path = write_audio(tmp_path / f"a.{fmt}", speech_like(4.0), 16000, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    samples = load_audio(str(path))
    assert np.isfinite(samples).all()
    assert 0.5 < duration_seconds(samples) < 3.0


def test_resample() -> None:
    one_second = speech_like(1.0, 48000)
    assert len(resample(one_second, 48000)) == SAMPLE_RATE
    assert resample(one_second[:1], 48000).shape == (1,)
    same = resample(one_second, SAMPLE_RATE)
    assert same.dtype == np.float32 and len(same) == len(one_second)
    with pytest.raises(AudioError, match="sample rate"):
        resample(one_second, 0)


# --- what must be refused, and how ----------------------------------------------------------------------------


def _write_bad(path: Path) -> None:
    name = path.name
    if name == "empty.wav":
        path.write_bytes(b"")
    elif name == "zero-samples.wav":
        sf.write(str(path), np.zeros(0, np.float32), 16000)
    elif name == "header-only.wav":
        write_audio(path, tone(1.0), 16000, "wav")
        path.write_bytes(path.read_bytes()[:44])
    elif name == "random.mp3":
        path.write_bytes(np.random.default_rng(3).bytes(20000))
    elif name in ("notes.txt", "notes.wav"):
        path.write_text("this is not audio\n" * 100)
    elif name == "truncated.m4a":  # the index (moov) comes last: cut off, nothing can be located
        write_audio(path, tone(2.0), 16000, "m4a")
        path.write_bytes(path.read_bytes()[:2000])
    elif name in ("nan.wav", "inf.wav"):
        data = tone(1.0)[:, 0].copy()
        data[100] = np.nan if name == "nan.wav" else -np.inf
        sf.write(str(path), data, 16000, subtype="FLOAT")
    elif name == "inf-44k.wav":  # goes through the resampler, which spreads it
        data = tone(1.0, 44100)[:, 0].astype(np.float64)
        data[5] = np.inf
        sf.write(str(path), data, 44100, subtype="DOUBLE")
    elif name == "silent-video.mp4":
        with av.open(str(path), "w") as box:
            stream = box.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            for packet in (*stream.encode(frame), *stream.encode(None)):
                box.mux(packet)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("empty.wav", "is empty (0 bytes)"),
        ("zero-samples.wav", "contains no audio samples"),
        ("header-only.wav", "contains no audio samples"),
        ("random.mp3", "could not decode"),
        ("notes.wav", "not a supported audio format (tried libsndfile and FFmpeg)"),
        ("notes.txt", "has no audio stream"),  # FFmpeg opens .txt as a teletype video
        ("truncated.m4a", "could not decode"),
        ("silent-video.mp4", "has no audio stream"),
        ("nan.wav", "contains NaN or infinite samples"),
        ("inf.wav", "contains NaN or infinite samples"),
        ("inf-44k.wav", "contains NaN or infinite samples"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, fragment: str) -> None:
    path = tmp_path / name
    _write_bad(path)
    with pytest.raises(AudioError, match=re.escape(fragment)) as info:
        load_audio(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/no/such/file.wav", "audio file not found: /no/such/file.wav; check the path LocalAI passed in dst"),
        ("/", "is a directory"),
        ("", "dst is empty"),
        ("/tmp/a\x00.wav", "invalid audio path"),
        ("/tmp/" + "x" * 5000 + ".wav", "invalid audio path"),
        ("/dev/null", "not a regular file"),
        ("http://example.com/a.wav", "not a URL"),
        ("HTTPS://example.com/a.wav", "not a URL"),
        ("file:///tmp/a.wav", "not a URL"),
        ("s3://bucket/a.wav", "not a URL"),
        ("data:audio/wav;base64,UklGRg==", "not a URL"),
    ],
)
def test_bad_paths(path: str, fragment: str) -> None:
    with pytest.raises(AudioError, match=re.escape(fragment)):
        load_audio(path)


@pytest.mark.parametrize("path", ["/nonexistent/" + "a" * 100_000 + "/end.wav", "/" + "d/" * 50_000 + "x.wav"])
def test_huge_paths_get_a_short_message(path: str) -> None:
    """gRPC clients drop a status message over ~8 KiB: the path is shortened in the middle."""
    with pytest.raises(AudioError) as info:
        load_audio(path)
    message = str(info.value)
    assert len(message) < 400
    assert message.count("…") == 1 and path[-20:] in message and path[:20] in message


def test_control_characters_in_paths_are_escaped(tmp_path: Path) -> None:
    path = tmp_path / "a\nb\x1b[31m\udc80.wav"
    with pytest.raises(AudioError, match="not found") as info:
        load_audio(str(path))
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message and "\\n" in message
    message.encode("utf-8")  # surrogates escaped too: the message is a gRPC status detail


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.wav")
    with pytest.raises(AudioError, match="not a regular file"):
        load_audio(str(tmp_path / "pipe.wav"))


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_audio(tmp_path / "a.wav", tone(0.5), 16000, "wav")

    def denied(file: str, mode: str = "r") -> None:
        raise PermissionError(13, "Permission denied", file)

    monkeypatch.setattr(audio, "open", denied, raising=False)  # root reads anything; pretend we are not root
    with pytest.raises(AudioError, match=r"not readable by the worker \(permission denied\)"):
        load_audio(str(path))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file_for_real(tmp_path: Path) -> None:
    path = write_audio(tmp_path / "a.wav", tone(0.5), 16000, "wav")
    path.chmod(0)
    with pytest.raises(AudioError, match="permission denied"):
        load_audio(str(path))


@pytest.fixture
def listener() -> Iterator[tuple[int, Callable[[], int]]]:
    """A local TCP port and a function counting the connections made to it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    hits = 0
    stop = threading.Event()

    def accept() -> None:
        nonlocal hits
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            hits += 1
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], lambda: hits
    stop.set()
    thread.join()
    server.close()


def test_a_playlist_cannot_make_ffmpeg_fetch_urls(tmp_path: Path, listener: tuple[int, Callable[[], int]]) -> None:
    port, hits = listener
    playlist = tmp_path / "upload.m3u8"
    playlist.write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:{port}/segment.ts\n#EXT-X-ENDLIST\n"
    )
    with pytest.raises(AudioError, match="could not decode"):
        load_audio(str(playlist))
    assert hits() == 0


# --- fuzzing: damaged files give audio or AudioError, nothing else ----------------------------------------------

_SEED_FORMATS = ["wav", "flac", "mp3", "ogg", "m4a", "webm"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    base = tmp_path_factory.mktemp("seeds")
    return {
        fmt: write_audio(base / f"seed.{fmt}", tone(0.3, 16000, 2), 16000, fmt).read_bytes() for fmt in _SEED_FORMATS
    }


def _load_or_audio_error(path: Path) -> None:
    try:
        samples = load_audio(str(path))
    except AudioError:
        return
    assert samples.dtype == np.float32 and samples.ndim == 1 and len(samples) >= 1
    assert np.isfinite(samples).all()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(_SEED_FORMATS),
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), max_size=8),
    cut=st.none() | st.integers(0, 1 << 20),
)
def test_mutated_files(
    tmp_path: Path, seeds: dict[str, bytes], fmt: str, flips: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(seeds[fmt])
    for position, xor in flips:
        data[position % len(data)] ^= xor
    path = tmp_path / f"fuzz.{fmt}"
    path.write_bytes(bytes(data[:cut]) if cut is not None else bytes(data))
    _load_or_audio_error(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=4096), ext=st.sampled_from(["wav", "mp3", "m4a", "webm", "ogg", "bin"]))
def test_random_bytes(tmp_path: Path, data: bytes, ext: str) -> None:
    path = tmp_path / f"random.{ext}"
    path.write_bytes(data)
    _load_or_audio_error(path)
