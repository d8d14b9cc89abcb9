"""Sentence segments from aligned words: exact transcript slices, word children, repaired and monotonic times."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_asr_worker.segments import Segment, Word, build_segments, is_repaired, repair_times

NAN = math.nan


def _even(texts: list[str], step: float = 0.5, start: float = 0.0) -> list[Word]:
    """Words one after the other, `step` seconds apart, each lasting 80% of the step."""
    return [Word(t, start + i * step, start + i * step + 0.8 * step) for i, t in enumerate(texts)]


def _timed(*items: tuple[str, float, float]) -> list[Word]:
    return [Word(*item) for item in items]


def _texts(segments: list[Segment]) -> list[str]:
    return [s.text for s in segments]


def _word_texts(segments: list[Segment]) -> list[list[str]]:
    return [[w.text for w in s.words] for s in segments]


# --- table tests: segment texts and the words in each -------------------------------------------------------------

TABLE = [
    pytest.param(
        "Hello world. This is a test. Goodbye now!",
        _even(["Hello", "world", "This", "is", "a", "test", "Goodbye", "now"]),
        ["Hello world.", "This is a test.", "Goodbye now!"],
        [["Hello", "world"], ["This", "is", "a", "test"], ["Goodbye", "now"]],
        id="english-punctuation",
    ),
    pytest.param(
        "hello world this is a test",
        _even(["hello", "world"]) + _even(["this", "is", "a", "test"], start=3.0),
        ["hello world", "this is a test"],
        [["hello", "world"], ["this", "is", "a", "test"]],
        id="no-punctuation-long-pause",
    ),
    pytest.param(
        "Well, I think so",
        _even(["Well"]) + _even(["I", "think", "so"], start=2.0),
        ["Well,", "I think so"],
        [["Well"], ["I", "think", "so"]],
        id="pause-keeps-comma-with-previous",
    ),
    pytest.param(
        "你好世界。这是一个测试。",
        _even(list("你好世界这是一个测试")),
        ["你好世界。", "这是一个测试。"],
        [list("你好世界"), list("这是一个测试")],
        id="cjk",
    ),
    pytest.param(
        "我们用Python写代码。然后测试它。",
        _even(["我", "们", "用", "Python", "写", "代", "码", "然", "后", "测", "试", "它"]),
        ["我们用Python写代码。", "然后测试它。"],
        [["我", "们", "用", "Python", "写", "代", "码"], ["然", "后", "测", "试", "它"]],
        id="mixed-chinese-english",
    ),
    pytest.param(
        "「你好。」他说。",
        _even(["你", "好", "他", "说"]),
        ["「你好。」", "他说。"],
        [["你", "好"], ["他", "说"]],
        id="cjk-closing-bracket-stays",
    ),
    pytest.param("Hello.", _even(["Hello"]), ["Hello."], [["Hello"]], id="single-word"),
    pytest.param(
        "It's 3.5 degrees. Don't go.",
        _even(["It's", "35", "degrees", "Don't", "go"]),
        ["It's 3.5 degrees.", "Don't go."],
        [["It's", "35", "degrees"], ["Don't", "go"]],
        id="apostrophes-and-decimal",
    ),
    pytest.param(
        "気温は3.5度です。はい。",
        _even(["気温", "は", "3", "5", "度", "です", "はい"]),
        ["気温は3.5度です。", "はい。"],
        [["気温", "は", "3", "5", "度", "です"], ["はい"]],
        id="decimal-split-into-units",
    ),
    pytest.param(
        "¿Cómo estás? ¡Muy bien, gracias!",
        _even(["Cómo", "estás", "Muy", "bien", "gracias"]),
        ["¿Cómo estás?", "¡Muy bien, gracias!"],
        [["Cómo", "estás"], ["Muy", "bien", "gracias"]],
        id="spanish-inverted-marks",
    ),
    pytest.param(
        "Mr. Smith arrived. He sat down.",
        _even(["Mr", "Smith", "arrived", "He", "sat", "down"]),
        ["Mr. Smith arrived.", "He sat down."],
        [["Mr", "Smith", "arrived"], ["He", "sat", "down"]],
        id="title-abbreviation",
    ),
    pytest.param(
        "Use tools, e.g. hammers. Then stop.",
        _even(["Use", "tools", "eg", "hammers", "Then", "stop"]),
        ["Use tools, e.g. hammers.", "Then stop."],
        [["Use", "tools", "eg", "hammers"], ["Then", "stop"]],
        id="period-before-lowercase",
    ),
    pytest.param(
        'He said "stop." Then (quietly) he left...',
        _even(["He", "said", "stop", "Then", "quietly", "he", "left"]),
        ['He said "stop."', "Then (quietly) he left..."],
        [["He", "said", "stop"], ["Then", "quietly", "he", "left"]],
        id="quotes-and-brackets",
    ),
    pytest.param(
        '  "Hello," she said.  ',
        _even(["Hello", "she", "said"]),
        ['"Hello," she said.'],
        [["Hello", "she", "said"]],
        id="leading-quote-and-whitespace",
    ),
    pytest.param(
        "Hello world. Bye.",
        _even(["Hello", "xyzzy", "world", "Bye"]),
        ["Hello world.", "Bye."],
        [["Hello", "xyzzy", "world"], ["Bye"]],
        id="unit-not-in-transcript",
    ),
    pytest.param(
        "Hello wörld. Bye.",
        _even(["hello", "WORLD", "Bye"]),
        ["Hello wörld.", "Bye."],
        [["hello", "WORLD"], ["Bye"]],
        id="case-and-accent-fallback",
    ),
    pytest.param(
        "One two three. Four.",
        _even(["One", "three", "Four"]),
        ["One two three.", "Four."],
        [["One", "three"], ["Four"]],
        id="word-missing-from-aligner",
    ),
    pytest.param(
        "Hi. Bye.",
        [*_even(["Hi"]), Word("zzz", 5.0, 5.5), *_even(["Bye"], start=10.0)],
        ["Hi.", "Bye."],
        [["Hi", "zzz"], ["Bye"]],
        id="unfound-word-alone-merges-into-neighbour",
    ),
]


@pytest.mark.parametrize(("transcript", "words", "texts", "children"), TABLE)
def test_segments(transcript: str, words: list[Word], texts: list[str], children: list[list[str]]) -> None:
    segments = build_segments(transcript, words, duration=60.0)
    assert _texts(segments) == texts
    assert _word_texts(segments) == children
    _check_segments(transcript, words, segments, 60.0, 30.0)


def test_cap_splits_a_long_run() -> None:
    words = [Word(f"w{i}", float(i), i + 1.0) for i in range(70)]
    transcript = " ".join(w.text for w in words)
    segments = build_segments(transcript, words, duration=70.0)
    assert [(s.start, s.end) for s in segments] == [(0.0, 30.0), (30.0, 60.0), (60.0, 70.0)]
    assert all(s.end - s.start <= 30.0 for s in segments)
    assert " ".join(_texts(segments)) == transcript


def test_word_longer_than_cap_gets_its_own_segment() -> None:
    words = _timed(("a", 0.0, 1.0), ("long", 1.0, 45.0), ("b", 45.0, 46.0))
    segments = build_segments("a long b", words, duration=50.0, max_segment_seconds=30.0)
    assert _word_texts(segments) == [["a"], ["long"], ["b"]]


def test_segment_times_are_first_start_and_last_end() -> None:
    words = _timed(("Hi", 0.2, 0.6), ("there", 0.7, 1.1), ("Bye", 1.3, 1.9))
    segments = build_segments("Hi there. Bye.", words, duration=2.0)
    assert [(s.start, s.end) for s in segments] == [(0.2, 1.1), (1.3, 1.9)]


@pytest.mark.parametrize(
    ("transcript", "words"),
    [
        pytest.param("Hello world.", [], id="no-words"),
        pytest.param("", _even(["Hello"]), id="empty-transcript"),
        pytest.param("  \n", _even(["Hello"]), id="blank-transcript"),
    ],
)
def test_empty_inputs(transcript: str, words: list[Word]) -> None:
    assert build_segments(transcript, words, duration=5.0) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"duration": -1.0}, id="negative-duration"),
        pytest.param({"duration": NAN}, id="nan-duration"),
        pytest.param({"duration": 5.0, "max_segment_seconds": 0.0}, id="zero-cap"),
        pytest.param({"duration": 5.0, "min_pause": -0.1}, id="negative-pause"),
    ],
)
def test_bad_settings_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        build_segments("Hello.", _even(["Hello"]), **kwargs)


# --- table tests: time repair -------------------------------------------------------------------------------------

REPAIRS = [
    pytest.param(
        [(0, 0), (0, 0), (0, 0), (0, 0)], 4.0, [(0, 1), (1, 2), (2, 3), (3, 4)], id="all-zero-spread-over-duration"
    ),
    pytest.param([(0, 1), (1.5, 1.5), (2, 3)], 3.0, [(0, 1), (1, 2), (2, 3)], id="zero-length-word"),
    pytest.param([(0, 1), (1.8, 1.2), (2, 3)], 3.0, [(0, 1), (1, 2), (2, 3)], id="reversed-word"),
    pytest.param(
        [(0, 0.5), (1, 1.2), (1, 1.2), (1, 1.8), (2, 2.5)],
        3.0,
        [(0, 0.5), (0.5, 1), (1, 1.5), (1.5, 2), (2, 2.5)],
        id="run-of-identical-starts-issue-55",
    ),
    pytest.param([(0, 1), (5, 6), (2, 3), (3, 4)], 10.0, [(0, 1), (1, 2), (2, 3), (3, 4)], id="out-of-order"),
    pytest.param([(0, 1.2), (1.0, 2.0)], 3.0, [(0, 1.2), (1.2, 2.0)], id="overlap-trimmed"),
    pytest.param([(0, 3), (1, 2), (3, 4)], 5.0, [(0, 3), (3, 3), (3, 4)], id="word-inside-previous"),
    pytest.param([(0, 1), (1, 2), (12, 13)], 5.0, [(0, 1), (1, 2), (2, 5)], id="beyond-duration"),
    pytest.param([(0, 1), (4, 7)], 5.0, [(0, 1), (4, 5)], id="end-clamped"),
    pytest.param([(-1, 0.5), (0.5, 1)], 5.0, [(0, 0.5), (0.5, 1)], id="negative-start-clamped"),
    pytest.param([(0, 1), (NAN, NAN), (2, math.inf)], 3.0, [(0, 1), (1, 2), (2, 3)], id="nan-and-inf"),
    pytest.param([(0, 0), (0, 0), (2, 3)], 3.0, [(0, 1), (1, 2), (2, 3)], id="bad-run-at-start"),
    pytest.param([(1, 2), (2, 2), (2, 3)], 3.0, [(1, 2), (2, 2.5), (2.5, 3)], id="zero-length-shares-next-start"),
    pytest.param([(0, 2), (1.5, 1.5), (2, 3)], 3.0, [(0, 2), (2, 2), (2, 3)], id="no-room-stays-zero-length"),
    pytest.param([(0, 0), (0, 0)], 0.0, [(0, 0), (0, 0)], id="zero-duration"),
    pytest.param(
        [(0.1, 0.4), (0.4, 0.9), (1.5, 2.0)], 2.0, [(0.1, 0.4), (0.4, 0.9), (1.5, 2.0)], id="good-times-unchanged"
    ),
]


@pytest.mark.parametrize(("times", "duration", "expected"), REPAIRS)
def test_repair_times(times: list[tuple[float, float]], duration: float, expected: list[tuple[float, float]]) -> None:
    words = [Word(f"w{i}", s, e) for i, (s, e) in enumerate(times)]
    repaired = repair_times(words, duration)
    assert [w.text for w in repaired] == [w.text for w in words]
    assert [(w.start, w.end) for w in repaired] == [pytest.approx(pair) for pair in expected]
    _check_times(repaired, duration)


def test_repaired_times_reach_the_segments() -> None:
    words = _timed(("你", 0, 0), ("好", 0, 0), ("世", 0, 0), ("界", 0, 0))
    (segment,) = build_segments("你好世界。", words, duration=2.0)
    assert (segment.start, segment.end) == (0.0, 2.0)
    assert [(w.start, w.end) for w in segment.words] == [(0.0, 0.5), (0.5, 1.0), (1.0, 1.5), (1.5, 2.0)]


# --- properties ---------------------------------------------------------------------------------------------------

UNITS = ["a", "Hi", "cat", "don't", "X9", "42", "é", "Über", "你", "好", "世", "界", "ｶﾅ", "日本", "'"]
SEPARATORS = ["", " ", "  ", ", ", ". ", "? ", "! ", "。", "，", "…", " ¿", " (", ") ", '" ', "-", "\n"]
TIMES = st.one_of(
    st.floats(min_value=-2.0, max_value=40.0, allow_subnormal=False),
    st.sampled_from([0.0, 1.0, 2.5, NAN, math.inf, -math.inf]),
)


@st.composite
def aligned(draw: st.DrawFn) -> tuple[str, list[Word], float, float]:
    """A transcript made of random units and separators, the units as words with messy times, duration, cap."""
    texts = draw(st.lists(st.sampled_from(UNITS), min_size=1, max_size=30))
    seps = draw(st.lists(st.sampled_from(SEPARATORS), min_size=len(texts) + 1, max_size=len(texts) + 1))
    transcript = seps[0] + "".join(t + s for t, s in zip(texts, seps[1:], strict=True))
    words = [Word(t, draw(TIMES), draw(TIMES)) for t in texts]
    duration = draw(st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=35.0, allow_subnormal=False)))
    cap = draw(st.floats(min_value=0.5, max_value=30.0, allow_subnormal=False))
    return transcript, words, duration, cap


def _check_times(words: list[Word], duration: float) -> None:
    previous_end = 0.0
    for w in words:
        assert 0.0 <= w.start <= w.end <= duration
        assert w.start >= previous_end
        previous_end = w.end


def _check_segments(transcript: str, words: list[Word], segments: list[Segment], duration: float, cap: float) -> None:
    flat = [w for s in segments for w in s.words]
    assert [w.text for w in flat] == [w.text for w in words]
    _check_times(flat, duration)
    offset = 0
    for s in segments:
        assert s.words and s.text and s.text == s.text.strip()
        assert (s.start, s.end) == (s.words[0].start, s.words[-1].end)
        assert s.end - s.start <= cap or len(s.words) == 1
        found = transcript.find(s.text, offset)
        assert found >= offset
        offset = found + len(s.text)
    assert "".join("".join(_texts(segments)).split()) == "".join(transcript.split())


@settings(max_examples=200, deadline=None)
@given(aligned())
def test_segments_property(case: tuple[str, list[Word], float, float]) -> None:
    transcript, words, duration, cap = case
    segments = build_segments(transcript, words, duration, max_segment_seconds=cap)
    _check_segments(transcript, words, segments, duration, cap)


@settings(max_examples=200, deadline=None)
@given(aligned(), st.lists(st.sampled_from(["zz", "Qq", "东"]), max_size=4), st.randoms(use_true_random=False))
def test_segments_property_with_foreign_units(
    case: tuple[str, list[Word], float, float], extra: list[str], rng: random.Random
) -> None:
    """Units the transcript does not contain are kept, in place, without breaking any other property."""
    transcript, words, duration, cap = case
    for text in extra:
        words.insert(rng.randint(0, len(words)), Word(text, rng.randint(0, 3000) / 100, rng.randint(0, 3000) / 100))
    segments = build_segments(transcript, words, duration, max_segment_seconds=cap)
    flat = [w for s in segments for w in s.words]
    assert [w.text for w in flat] == [w.text for w in words]
    _check_times(flat, duration)
    assert "".join("".join(_texts(segments)).split()) == "".join(transcript.split())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 2.0, allow_subnormal=False), st.floats(0.01, 2.0, allow_subnormal=False)),
        min_size=1,
        max_size=40,
    )
)
def test_well_formed_times_are_kept(steps: list[tuple[float, float]]) -> None:
    """Words that are already ordered, non-overlapping and of positive length come back unchanged."""
    words, t = [], 0.0
    for i, (gap, length) in enumerate(steps):
        start = t + gap
        t = start + length
        words.append(Word(f"w{i}", start, t))
    assert repair_times(words, duration=t + 1.0) == words


# --- repair inside a window ---------------------------------------------------------------------------------------

# A window from 59.6 to 63.5 s whose speech runs from 60.0 to 63.1 s (voice activity detection pads it by 0.4 s).
WINDOW, SPEECH = (59.6, 63.5), (60.0, 63.1)
WINDOW_REPAIRS = [
    pytest.param(
        [(0, 0)] * 4, [(60.0, 60.775), (60.775, 61.55), (61.55, 62.325), (62.325, 63.1)], id="all-zero-over-the-speech"
    ),
    pytest.param([(1.0, 1.0)] * 2, [(60.0, 61.55), (61.55, 63.1)], id="one-start-for-all-before-the-window"),
    pytest.param(
        [(60.1, 60.5), (0, 0), (0, 0)], [(60.1, 60.5), (60.5, 61.8), (61.8, 63.1)], id="bad-tail-ends-at-the-speech"
    ),
    pytest.param([(59.7, 60.2), (0, 0)], [(59.7, 60.2), (60.2, 63.1)], id="good-word-in-the-padding-kept"),
    pytest.param([(0, 0), (59.8, 60.3)], [(59.8, 59.8), (59.8, 60.3)], id="bad-head-never-passes-a-good-word"),
    pytest.param([(62.0, 63.4), (0, 0)], [(62.0, 63.4), (63.4, 63.4)], id="bad-tail-after-a-good-word-past-speech"),
    pytest.param([(70.0, 80.0), (61, 62)], [(60.0, 61.0), (61.0, 62.0)], id="past-the-window-is-bad-then-spread"),
]


@pytest.mark.parametrize(("times", "expected"), WINDOW_REPAIRS)
def test_repair_inside_a_window(times: list[tuple[float, float]], expected: list[tuple[float, float]]) -> None:
    words = [Word(f"w{i}", s, e) for i, (s, e) in enumerate(times)]
    repaired = repair_times(words, WINDOW[1], start=WINDOW[0], speech=SPEECH)
    assert [(w.start, w.end) for w in repaired] == [pytest.approx(pair) for pair in expected]
    assert all(WINDOW[0] <= w.start <= w.end <= WINDOW[1] for w in repaired)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"duration": 5.0, "start": 6.0},
        {"duration": 5.0, "start": NAN},
        {"duration": 5.0, "start": -1.0},
        {"duration": 5.0, "start": 1.0, "speech": (0.5, 2.0)},
        {"duration": 5.0, "speech": (3.0, 2.0)},
        {"duration": 5.0, "speech": (1.0, 6.0)},
        {"duration": 5.0, "speech": (NAN, 2.0)},
    ],
)
def test_repair_refuses_a_bad_span(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"^(start|speech) must"):
        repair_times([Word("a", 0, 1)], **kwargs)


def test_times_repaired_are_checked_not_trusted() -> None:
    with pytest.raises(ValueError, match="not ordered"):
        build_segments("a b", [Word("a", 2, 3), Word("b", 1, 2)], 5.0, times_repaired=True)
    with pytest.raises(ValueError, match="not ordered"):
        build_segments("a", [Word("a", 4, 6)], 5.0, times_repaired=True)


@st.composite
def windowed(draw: st.DrawFn) -> tuple[str, list[list[Word]], list[tuple[float, float, float, float]], float]:
    """A transcript over 1-4 windows with gaps between them, each window's words with messy times (often all
    degenerate, as in issue 55), each window's bounds and speech, and the file's duration."""
    transcript, words, _, _ = draw(aligned())
    cuts = sorted(draw(st.lists(st.integers(0, len(words)), max_size=3)))
    groups = [words[a:b] for a, b in zip([0, *cuts], [*cuts, len(words)], strict=True)]
    spans, t = [], 0.0
    for group in groups:
        start = t + draw(st.floats(0.0, 60.0, allow_subnormal=False))
        end = start + draw(st.floats(0.0, 30.0, allow_subnormal=False))
        pad = draw(st.floats(0.0, 0.4, allow_subnormal=False))
        first, last = min(start + pad, end), max(min(start + pad, end), end - pad)
        spans.append((start, end, first, last))
        if draw(st.booleans()):
            group[:] = [Word(w.text, 0.0, 0.0) for w in group]  # the aligner's all-zero answer
        t = end
    return transcript, groups, spans, t + draw(st.floats(0.0, 5.0, allow_subnormal=False))


@settings(max_examples=200, deadline=None)
@given(windowed())
def test_words_repaired_per_window_stay_in_it(case: tuple[str, list[list[Word]], list, float]) -> None:
    """Each window's words stay inside that window (and runs with no good neighbour inside its speech), and the
    concatenation is what build_segments accepts as repaired, with every segment property kept."""
    transcript, groups, spans, duration = case
    repaired: list[Word] = []
    for group, (start, end, first, last) in zip(groups, spans, strict=True):
        fixed = repair_times(group, end, start=start, speech=(first, last))
        assert [w.text for w in fixed] == [w.text for w in group]
        assert all(start <= w.start <= w.end <= end for w in fixed)
        if group and all(w.start == w.end == 0.0 for w in group) and start > 0:
            assert all(first <= w.start <= w.end <= last for w in fixed)  # all degenerate: spread over the speech
        repaired += fixed
    _check_times(repaired, duration)
    segments = build_segments(transcript, repaired, duration, max_segment_seconds=30.0, times_repaired=True)
    flat = [w for s in segments for w in s.words]
    assert flat == repaired or not segments  # times pass through unchanged
    if segments:
        _check_segments(transcript, repaired, segments, duration, 30.0)


@settings(max_examples=200, deadline=None)
@given(aligned())
def test_repair_output_counts_as_repaired(case: tuple[str, list[Word], float, float]) -> None:
    _, words, duration, _ = case
    assert is_repaired(repair_times(words, duration), duration)
