"""Speaker turns as pure data: naming speakers, tidying turns, giving words and segments their speaker, and
scoring a diarization against a reference.

Diarization (`diarization.py`) says who spoke when as `Turn`s; a transcript says what was said as words and
segments. This module joins the two and holds everything about it that needs no model, so it can be tested with
tables and properties: no I/O, no torch, no global state.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

LABEL_FORMAT = "SPEAKER_{:02d}"


@dataclass(frozen=True)
class Turn:
    """One speaker talking over `[start, end)`, in seconds."""

    start: float
    end: float
    speaker: str

    @property
    def duration(self) -> float:
        """Its length in seconds."""
        return self.end - self.start


def name_in_order(clusters: Sequence[int]) -> list[str]:
    """Labels `SPEAKER_00`, `SPEAKER_01`… for cluster ids, numbered in order of first appearance."""
    names: dict[int, str] = {}
    for cluster in clusters:
        if cluster not in names:
            names[cluster] = LABEL_FORMAT.format(len(names))
    return [names[c] for c in clusters]


def renumber(turns: Sequence[Turn]) -> list[Turn]:
    """The same turns, in time order, with speakers renamed `SPEAKER_NN` in order of first appearance."""
    ordered = sorted(turns, key=lambda t: (t.start, t.end))
    ids: dict[str, int] = {}
    for turn in ordered:
        ids.setdefault(turn.speaker, len(ids))
    labels = name_in_order([ids[t.speaker] for t in ordered])
    return [Turn(t.start, t.end, label) for t, label in zip(ordered, labels, strict=True)]


def tidy_turns(turns: Sequence[Turn], *, min_duration_on: float = 0.0, min_duration_off: float = 0.0) -> list[Turn]:
    """Sorted, non-overlapping turns with the pyannote-style duration rules applied.

    Adjacent turns of one speaker separated by less than `min_duration_off` seconds merge into one (so do
    touching ones). Turns shorter than `min_duration_on` are dropped. Speakers are then renumbered in order of
    first appearance, so a dropped speaker leaves no gap in the numbering.
    """
    merged: list[Turn] = []
    for turn in sorted(turns, key=lambda t: (t.start, t.end)):
        if turn.end <= turn.start:
            continue
        if merged and turn.start < merged[-1].end and merged[-1].speaker != turn.speaker:
            last = merged[-1]  # another speaker starts before this one ends: cut there
            merged[-1] = Turn(last.start, turn.start, last.speaker)
            if merged[-1].duration <= 0:  # cut away whole: the turn before it may be this speaker's
                merged.pop()
        if merged and merged[-1].speaker == turn.speaker and turn.start - merged[-1].end <= min_duration_off:
            last = merged[-1]
            merged[-1] = Turn(last.start, max(last.end, turn.end), last.speaker)
            continue
        merged.append(turn)
    kept = [t for t in merged if t.duration >= min_duration_on]
    return renumber(kept)


def _overlap(a_start: float, a_end: float, b_start: float, b_end: float) -> float:
    return max(0.0, min(a_end, b_end) - max(a_start, b_start))


def speaker_at(start: float, end: float, turns: Sequence[Turn]) -> str:
    """The speaker whose turns overlap `[start, end)` the most; with no overlap (a word in a gap between turns),
    the speaker of the nearest turn; "" when there are no turns. `turns` must be sorted by start."""
    if not turns:
        return ""
    starts = [t.start for t in turns]
    low = max(0, bisect.bisect_right(starts, start) - 1)
    totals: dict[str, float] = {}
    i = low
    while i < len(turns) and turns[i].start < max(end, start + 1e-9):
        share = _overlap(start, max(end, start + 1e-9), turns[i].start, turns[i].end)
        if share > 0:
            totals[turns[i].speaker] = totals.get(turns[i].speaker, 0.0) + share
        i += 1
    if totals:
        return max(totals, key=lambda s: (totals[s], -_first_index(turns, s)))
    middle = (start + end) / 2
    nearest = min(turns, key=lambda t: max(t.start - middle, middle - t.end, 0.0))
    return nearest.speaker


def _first_index(turns: Sequence[Turn], speaker: str) -> int:
    return next(i for i, t in enumerate(turns) if t.speaker == speaker)


def word_speakers(times: Sequence[tuple[float, float]], turns: Sequence[Turn]) -> list[str]:
    """Each word's speaker (`speaker_at` of its `(start, end)`)."""
    ordered = sorted(turns, key=lambda t: t.start)
    return [speaker_at(start, end, ordered) for start, end in times]


def speaker_runs(speakers: Sequence[str]) -> list[tuple[int, int]]:
    """`[first, end)` index ranges of consecutive equal speakers: where a speaker-change cut falls."""
    runs: list[tuple[int, int]] = []
    first = 0
    for i, (a, b) in enumerate(pairwise(speakers)):
        if a != b:
            runs.append((first, i + 1))
            first = i + 1
    if speakers:
        runs.append((first, len(speakers)))
    return runs


# --- scoring ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiarizationScore:
    """Diarization error rate and its parts, in seconds of scored reference speech."""

    total: float
    missed: float
    false_alarm: float
    confusion: float

    @property
    def der(self) -> float:
        """(missed + false alarm + confusion) / total reference speech; 0 when there is no speech to score."""
        return (self.missed + self.false_alarm + self.confusion) / self.total if self.total > 0 else 0.0


def score(reference: Sequence[Turn], hypothesis: Sequence[Turn], *, collar: float = 0.0) -> DiarizationScore:
    """The NIST-style diarization error rate of `hypothesis` against `reference`.

    Time is cut at every turn edge; in each piece, with `r` reference and `h` hypothesis speakers talking, missed
    speech is `max(0, r - h)`, false alarm `max(0, h - r)`, and confusion `min(r, h)` minus the speakers matched
    in it, where speakers are matched one to one over the whole file to maximise the time they share (the
    Hungarian method). A `collar` removes `collar` seconds each side of every reference turn edge from scoring.
    Overlapping reference speech counts once per speaker.
    """
    from scipy.optimize import linear_sum_assignment  # scoring only: the worker's import does not need scipy

    edges = sorted({t.start for t in (*reference, *hypothesis)} | {t.end for t in (*reference, *hypothesis)})
    excluded = sorted(
        (max(0.0, edge - collar), edge + collar) for t in reference for edge in (t.start, t.end) if collar > 0
    )
    for low, high in excluded:
        edges.extend((low, high))
    edges = sorted(set(edges))
    ref_names = sorted({t.speaker for t in reference})
    hyp_names = sorted({t.speaker for t in hypothesis})
    shared = [[0.0] * len(hyp_names) for _ in ref_names]
    pieces: list[tuple[float, set[str], set[str]]] = []
    for low, high in pairwise(edges):
        middle = (low + high) / 2
        if any(a <= middle < b for a, b in excluded):
            continue
        ref = {t.speaker for t in reference if t.start <= middle < t.end}
        hyp = {t.speaker for t in hypothesis if t.start <= middle < t.end}
        if not ref and not hyp:
            continue
        length = high - low
        pieces.append((length, ref, hyp))
        for r in ref:
            for h in hyp:
                shared[ref_names.index(r)][hyp_names.index(h)] += length
    mapping: dict[str, str] = {}
    if ref_names and hyp_names:
        rows, cols = linear_sum_assignment([[-x for x in row] for row in shared])
        mapping = {hyp_names[c]: ref_names[r] for r, c in zip(rows, cols, strict=True)}
    total = missed = false_alarm = confusion = 0.0
    for length, ref, hyp in pieces:
        total += length * len(ref)
        missed += length * max(0, len(ref) - len(hyp))
        false_alarm += length * max(0, len(hyp) - len(ref))
        matched = len({mapping[h] for h in hyp if h in mapping} & ref)
        confusion += length * (min(len(ref), len(hyp)) - matched)
    return DiarizationScore(total, missed, false_alarm, confusion)


def texts_for_turns(turns: Sequence[Turn], pieces: Sequence[tuple[float, float, str, str]]) -> list[list[str]]:
    """The transcript pieces `(start, end, speaker, text)` each turn holds, in order: a piece goes to the turn of
    its own speaker that overlaps it most (the nearest one of its speaker when none overlaps; any nearest turn
    when its speaker has none), so every piece of text lands in exactly one turn."""
    held: list[list[str]] = [[] for _ in turns]
    for start, end, speaker, text in pieces:
        if not text or not turns:
            continue
        own = [i for i, t in enumerate(turns) if t.speaker == speaker] or list(range(len(turns)))
        middle = (start + end) / 2
        best = max(
            own,
            key=lambda i: (
                _overlap(start, end, turns[i].start, turns[i].end),
                -max(turns[i].start - middle, middle - turns[i].end, 0.0),
            ),
        )
        held[best].append(text)
    return held
