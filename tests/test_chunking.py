"""Window planning for long audio: tiling, the length cap, and cuts at the quietest point."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_asr_worker.chunking import Window, plan_windows
from tests.audio_fixtures import speech_like

RATE = 16000


def _check_tiling(windows: list[Window], total: int, max_len: int) -> None:
    assert windows[0].start == 0 and windows[-1].end == total
    for a, b in itertools.pairwise(windows):
        assert a.end == b.start
    assert all(0 < w.end - w.start <= max_len for w in windows) or total == 0


def test_short_audio_is_one_window() -> None:
    assert plan_windows(np.zeros(RATE * 30, np.float32)) == [Window(0, RATE * 30)]


def test_exactly_max_is_one_window() -> None:
    assert len(plan_windows(np.zeros(RATE * 180, np.float32))) == 1


def test_cuts_land_in_the_gaps() -> None:
    gaps = [(177.0, 178.0), (355.0, 356.0)]
    samples = speech_like(400.0, RATE, gaps)
    windows = plan_windows(samples, max_seconds=180.0, search_seconds=5.0)
    assert len(windows) == 3
    for window, (start, end) in zip(windows, gaps, strict=False):
        assert start <= window.end / RATE <= end
    _check_tiling(windows, len(samples), 180 * RATE)
    assert windows[1].offset_seconds == windows[0].duration_seconds


def test_no_gap_still_respects_the_cap() -> None:
    samples = speech_like(500.0, RATE)
    windows = plan_windows(samples, max_seconds=60.0)
    _check_tiling(windows, len(samples), 60 * RATE)
    assert len(windows) == 9


def test_one_hour_plans() -> None:
    samples = speech_like(3600.0, RATE)
    windows = plan_windows(samples)
    _check_tiling(windows, len(samples), 180 * RATE)
    assert len(windows) == 21


@pytest.mark.parametrize(("max_s", "search_s"), [(10.0, 10.0), (10.0, 0.0), (5.0, 20.0)])
def test_bad_parameters(max_s: float, search_s: float) -> None:
    with pytest.raises(ValueError, match="search_seconds"):
        plan_windows(np.zeros(10, np.float32), max_seconds=max_s, search_seconds=search_s)


@settings(max_examples=60, deadline=None)
@given(
    seconds=st.integers(min_value=0, max_value=200),
    max_s=st.integers(min_value=2, max_value=40),
    search_frac=st.sampled_from([0.1, 0.3, 0.5, 0.9]),
    seed=st.integers(0, 1000),
)
def test_tiling_property(seconds: int, max_s: int, search_frac: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    samples = (rng.standard_normal(seconds * RATE // 10) * rng.uniform(0, 1)).astype(np.float32)
    windows = plan_windows(samples, max_seconds=max_s / 10, search_seconds=max_s / 10 * search_frac)
    _check_tiling(windows, len(samples), int(max_s / 10 * RATE))
