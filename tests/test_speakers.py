"""The pure speaker functions: naming, tidying, word and segment assignment, speaker-change cuts, and scoring."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from qwen_asr_worker.segments import Word, build_segments
from qwen_asr_worker.speakers import (
    Turn,
    name_in_order,
    score,
    speaker_at,
    speaker_runs,
    texts_for_turns,
    tidy_turns,
    word_speakers,
)

A, B, C = "SPEAKER_00", "SPEAKER_01", "SPEAKER_02"


@pytest.mark.parametrize(
    ("clusters", "names"),
    [
        ([], []),
        ([5], [A]),
        ([3, 3, 1, 3, 0, 1], [A, A, B, A, C, B]),
        ([2, 0, 1], [A, B, C]),
    ],
)
def test_names_follow_first_appearance(clusters: list[int], names: list[str]) -> None:
    assert name_in_order(clusters) == names


@pytest.mark.parametrize(
    ("turns", "on", "off", "expected"),
    [
        # one speaker's turns closer than min_duration_off merge; a longer gap stays
        ([(0, 1, "x"), (1.3, 2, "x"), (3, 4, "x")], 0, 0.5, [(0, 2, A), (3, 4, A)]),
        # another speaker in between stops the merge
        ([(0, 1, "x"), (1.1, 1.2, "y"), (1.3, 2, "x")], 0, 0.5, [(0, 1, A), (1.1, 1.2, B), (1.3, 2, A)]),
        # a turn shorter than min_duration_on goes, and the numbering closes the gap
        ([(0, 1, "x"), (1.1, 1.2, "y"), (1.5, 3, "z")], 0.2, 0, [(0, 1, A), (1.5, 3, B)]),
        # overlapping turns of two speakers: the earlier one ends where the later one starts
        ([(0, 2, "x"), (1.5, 3, "y")], 0, 0, [(0, 1.5, A), (1.5, 3, B)]),
        # unsorted input, empty turns dropped, labels renumbered by first appearance
        ([(5, 6, "q"), (0, 1, "r"), (2, 2, "s")], 0, 0, [(0, 1, A), (5, 6, B)]),
    ],
)
def test_tidy_turns(turns: list, on: float, off: float, expected: list) -> None:
    got = tidy_turns([Turn(*t) for t in turns], min_duration_on=on, min_duration_off=off)
    assert [(t.start, t.end, t.speaker) for t in got] == [(*tuple(map(float, e[:2])), e[2]) for e in expected]


TURNS = [Turn(0.0, 2.0, A), Turn(2.0, 3.0, B), Turn(5.0, 6.0, A)]


@pytest.mark.parametrize(
    ("start", "end", "speaker"),
    [
        (0.5, 1.0, A),  # inside a turn
        (1.8, 2.5, B),  # 0.2 s of A, 0.5 s of B: the larger overlap wins
        (1.5, 2.5, A),  # a tie goes to the speaker who spoke first
        (3.5, 3.8, B),  # in a gap: the nearest turn (B ends 0.5 s before)
        (4.5, 4.9, A),  # nearer to A's next turn
        (7.0, 7.5, A),  # after the last turn
        (2.5, 2.5, B),  # a zero-length word still lands in its turn
    ],
)
def test_speaker_at(start: float, end: float, speaker: str) -> None:
    assert speaker_at(start, end, TURNS) == speaker


def test_speaker_at_without_turns_is_empty() -> None:
    assert speaker_at(0.0, 1.0, []) == ""
    assert word_speakers([(0.0, 1.0)], []) == [""]


def test_words_split_a_shared_sentence_into_two_segments() -> None:
    text = "Are you coming tonight yes I am."
    words = [
        Word("Are", 0.0, 0.3),
        Word("you", 0.3, 0.5),
        Word("coming", 0.5, 0.9),
        Word("tonight", 0.9, 1.4),
        Word("yes", 1.5, 1.7),
        Word("I", 1.7, 1.8),
        Word("am", 1.8, 2.0),
    ]
    turns = [Turn(0.0, 1.45, A), Turn(1.45, 2.1, B)]
    speakers = word_speakers([(w.start, w.end) for w in words], turns)
    segments = build_segments(text, words, 2.1, speakers=speakers)
    assert [(s.text, s.speaker) for s in segments] == [("Are you coming tonight", A), ("yes I am.", B)]
    assert segments[0].end <= segments[1].start


def test_without_speakers_segments_are_unchanged() -> None:
    text = "Hello world. This is a test."
    words = [Word(w, i * 0.5, i * 0.5 + 0.4) for i, w in enumerate(["Hello", "world", "This", "is", "a", "test"])]
    plain = build_segments(text, words, 3.0)
    labelled = build_segments(text, words, 3.0, speakers=[A] * 6)
    assert [s.text for s in plain] == [s.text for s in labelled] == ["Hello world.", "This is a test."]
    assert {s.speaker for s in plain} == {""}
    assert {s.speaker for s in labelled} == {A}


def test_speakers_must_be_one_per_word() -> None:
    with pytest.raises(ValueError, match="one per word"):
        build_segments("a b", [Word("a", 0, 1), Word("b", 1, 2)], 2.0, speakers=[A])


@given(st.lists(st.sampled_from([A, B, C]), max_size=30))
def test_speaker_runs_cover_every_index_once(labels: list[str]) -> None:
    runs = speaker_runs(labels)
    assert [i for first, end in runs for i in range(first, end)] == list(range(len(labels)))
    for first, end in runs:
        assert len(set(labels[first:end])) == 1
    for (_, end), (first, _) in itertools.pairwise(runs):
        assert labels[end - 1] != labels[first]


words_and_turns = st.lists(
    st.tuples(
        st.floats(0, 50, allow_subnormal=False),
        st.floats(0.01, 2.0, allow_subnormal=False),
        st.sampled_from(["x", "y", "z"]),
    ),
    min_size=1,
    max_size=12,
)


@given(words_and_turns, st.lists(st.floats(0, 5, allow_subnormal=False), min_size=1, max_size=20))
def test_cut_segments_each_hold_one_speaker(raw_turns: list, gaps: list[float]) -> None:
    turns = tidy_turns([Turn(s, s + d, name) for s, d, name in raw_turns])
    words, t = [], 0.0
    for i, gap in enumerate(gaps):
        t += gap
        words.append(Word(f"w{i}", t, t + 0.2))
        t += 0.2
    text = " ".join(w.text for w in words)
    speakers = word_speakers([(w.start, w.end) for w in words], turns)
    segments = build_segments(text, words, t + 1.0, speakers=speakers)
    assert [w for s in segments for w in s.words] == words  # nothing dropped or reordered
    for segment in segments:
        assert {speakers[words.index(w)] for w in segment.words} == {segment.speaker}
    assert {s.speaker for s in segments} <= {turn.speaker for turn in turns}


@given(words_and_turns)
@example([(0.0, 1.0, "x"), (1.0, 1.0, "y"), (1.0, 1.0, "x")])  # y cut away whole: the two x turns merge
def test_tidy_turns_are_ordered_disjoint_and_named_in_order(raw_turns: list) -> None:
    turns = tidy_turns([Turn(s, s + d, name) for s, d, name in raw_turns], min_duration_off=0.3)
    for a, b in itertools.pairwise(turns):
        assert a.end <= b.start
        assert not (a.speaker == b.speaker and b.start - a.end <= 0.3)
    seen: list[str] = []
    for turn in turns:
        if turn.speaker not in seen:
            seen.append(turn.speaker)
    assert seen == [f"SPEAKER_{i:02d}" for i in range(len(seen))]


def test_texts_go_to_the_turn_of_their_speaker() -> None:
    turns = [Turn(0.0, 2.0, A), Turn(2.0, 4.0, B), Turn(4.0, 6.0, A)]
    pieces = [(0.1, 1.0, A, "one"), (1.2, 2.4, A, "two"), (2.5, 3.5, B, "three"), (3.9, 5.0, A, "four")]
    assert texts_for_turns(turns, pieces) == [["one", "two"], ["three"], ["four"]]
    assert texts_for_turns([], pieces) == []


@pytest.mark.parametrize(
    ("reference", "hypothesis", "collar", "der"),
    [
        ([(0, 10, "a")], [(0, 10, "z")], 0.0, 0.0),  # labels are matched, not compared by name
        ([(0, 10, "a")], [], 0.0, 1.0),  # all missed
        ([(0, 5, "a"), (5, 10, "b")], [(0, 10, "z")], 0.0, 0.5),  # half confused
        ([(0, 10, "a")], [(0, 12, "z")], 0.0, 0.2),  # 2 s of false alarm over 10 s of speech
        ([(0, 10, "a"), (8, 10, "b")], [(0, 10, "z")], 0.0, 2 / 12),  # the overlap's second speaker is missed
        ([(0, 5, "a"), (5, 10, "b")], [(0, 5.2, "x"), (5.2, 10, "y")], 0.0, 0.02),
        ([(0, 5, "a"), (5, 10, "b")], [(0, 5.2, "x"), (5.2, 10, "y")], 0.25, 0.0),  # inside the collar
    ],
)
def test_score(reference: list, hypothesis: list, collar: float, der: float) -> None:
    result = score([Turn(*t) for t in reference], [Turn(*t) for t in hypothesis], collar=collar)
    assert result.der == pytest.approx(der, abs=1e-9)
