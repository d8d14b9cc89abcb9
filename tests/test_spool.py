"""SpooledAudio and open_audio: the same samples whether they stay in memory or go to a temporary file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_asr_worker import spool
from qwen_asr_worker.audio import AudioError, load_audio, open_audio
from qwen_asr_worker.errors import Overloaded
from qwen_asr_worker.spool import SpooledAudio
from tests.audio_fixtures import speech_like, tone, write_audio


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=0, max_size=12),
    spill=st.sampled_from([None, 0, 4, 400, 10_000]),
    cut=st.tuples(st.integers(-50, 3700), st.integers(-50, 3700)),
)
def test_slices_equal_the_concatenated_blocks(sizes: list[int], spill: int | None, cut: tuple[int, int]) -> None:
    """Any block sizes, spilled at any point or never: every slice equals numpy's slice of the whole."""
    rng = np.random.default_rng(len(sizes))
    blocks = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    whole = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    with SpooledAudio(spill_bytes=spill) as audio:
        for block in blocks:
            audio.append(block)
        audio.finish()
        assert len(audio) == len(whole)
        assert audio.on_disk == (spill is not None and whole.nbytes > spill)
        np.testing.assert_array_equal(audio[cut[0] : cut[1]], whole[cut[0] : cut[1]])
        np.testing.assert_array_equal(audio[:], whole)
        pieces = [audio[a : a + 97] for a in range(0, len(audio), 97)]
        np.testing.assert_array_equal(np.concatenate(pieces) if pieces else np.zeros(0, np.float32), whole)


@pytest.mark.parametrize("spill", [None, 16])
def test_truncate_keeps_the_first_samples(spill: int | None) -> None:
    audio = SpooledAudio(spill_bytes=spill)
    audio.append(np.arange(10, dtype=np.float32))
    audio.append(np.arange(10, 20, dtype=np.float32))
    audio.finish()
    assert audio.on_disk == (spill is not None)
    audio.truncate(15)
    assert len(audio) == 15
    np.testing.assert_array_equal(audio[:], np.arange(15, dtype=np.float32))
    np.testing.assert_array_equal(audio[3:6], [3, 4, 5])
    assert audio.finite
    audio.close()


def test_non_finite_samples_are_noted_and_reads_need_slices() -> None:
    audio = SpooledAudio(spill_bytes=0)
    audio.append(np.array([0.0, np.nan], np.float32))
    audio.finish()
    assert not audio.finite and audio.on_disk
    with pytest.raises(TypeError, match="contiguous slices"):
        audio[::2]
    audio.close()


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3", "m4a"])
def test_open_audio_spilled_equals_load_audio(tmp_path: Path, fmt: str) -> None:
    """A file decoded into a temporary file block by block holds exactly what the in-memory decode holds."""
    path = write_audio(tmp_path / f"s.{fmt}", speech_like(7.0, 44100), 44100, fmt)
    expected = load_audio(str(path))
    with open_audio(str(path), spill_bytes=1000) as audio:
        assert audio.on_disk
        np.testing.assert_array_equal(audio[:], expected)


def test_a_file_shorter_than_the_spill_stays_in_memory(tmp_path: Path) -> None:
    path = write_audio(tmp_path / "short.wav", tone(0.5), 16000, "wav")
    with open_audio(str(path)) as audio:
        assert not audio.on_disk and len(audio) == 8000


def test_truncated_file_mid_stream_gives_its_first_part(tmp_path: Path) -> None:
    path = write_audio(tmp_path / "t.wav", speech_like(6.0, 16000), 16000, "wav")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with open_audio(str(path), spill_bytes=1000) as audio:
        assert audio.on_disk and 2.9 < len(audio) / 16000 < 3.1


def test_nan_file_is_refused_when_spilled(tmp_path: Path) -> None:
    samples = tone(2.0)
    samples[20000] = np.nan
    path = write_audio(tmp_path / "nan.wav", samples, 16000, "wav", subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or infinite"):
        open_audio(str(path), spill_bytes=1000)


def test_a_temporary_folder_that_cannot_take_it_is_overloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No room for the decoded audio is RESOURCE_EXHAUSTED's error, naming TMPDIR."""
    path = write_audio(tmp_path / "a.wav", tone(2.0), 16000, "wav")
    monkeypatch.setattr(spool.tempfile, "tempdir", str(tmp_path / "missing"))
    with pytest.raises(Overloaded, match="TMPDIR"):
        open_audio(str(path), spill_bytes=1000)
