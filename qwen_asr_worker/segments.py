"""Turn forced-aligner word times into sentence segments whose text is an exact slice of the transcript.

Qwen3-ForcedAligner returns one `(text, start, end)` per word (per character for CJK) with the punctuation and
spacing stripped, and its times are sometimes broken (all zeros, zero-length words, runs of words sharing one
start, out-of-order times; QwenLM/Qwen3-ASR issues 55 and 197). Subtitles need sentences that read like the
transcript, with punctuation and casing, and times that never go backwards. So this module:

1. repairs the word times (`repair_times`), within the span of audio they were aligned on,
2. maps every aligned word back onto the transcript, skipping the characters the aligner drops,
3. cuts the transcript into segments at sentence ends, long pauses and a length cap (`build_segments`).

Everything here is pure and deterministic: no I/O, no model, no global state.
"""

from __future__ import annotations

import bisect
import math
import statistics
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import pairwise

# Characters that can end a sentence. "." and its look-alikes get extra checks (decimals, abbreviations).
_SENTENCE_END = frozenset(".?!。？！…‼⁇⁈⁉۔؟।॥።፧။։｡．")
_PERIODS = frozenset(".．｡")
_CONTINUABLE = _PERIODS | {"…"}  # followed by a lowercase word, these do not end a sentence ("e.g. this").
_OPENING = frozenset("¿¡")  # plus Unicode categories Ps and Pi: they belong to the text that follows.
# Titles written with a period that precede a name; a period after them does not end the sentence.
_ABBREVIATIONS = frozenset({"Mr", "Mrs", "Ms", "Mx", "Dr", "Prof", "Messrs", "Mme", "Mlle", "Sra", "Srta", "vs"})
# How far (in transcript characters) to look ahead for a word that is not where it was expected.
_LOOKAHEAD = 64
_EPS = 1e-9


@dataclass(frozen=True)
class Word:
    """One aligned unit: a word, or a single character for CJK, as the aligner gave it; times in seconds."""

    text: str
    start: float
    end: float


@dataclass(frozen=True)
class Segment:
    """A sentence-like span: an exact, whitespace-stripped slice of the transcript and the words inside it."""

    text: str
    start: float
    end: float
    words: tuple[Word, ...]
    speaker: str = ""  # a diarization label ("SPEAKER_00"), or "" when nobody asked who spoke


# --- time repair ------------------------------------------------------------------------------------------------


def repair_times(
    words: Sequence[Word], duration: float, *, start: float = 0.0, speech: tuple[float, float] | None = None
) -> list[Word]:
    """Return `words` with times that are clamped, ordered and non-degenerate; texts and order are unchanged.

    The words lie in the span `[start, duration]`: the whole file by default, or one window, so that repaired
    words never leave the audio they were aligned on (a window after a skipped silence must not spread its words
    back into that silence). Every time is first clamped to the span. A word is *bad* when any of these holds:

    - its start or end is NaN or infinite;
    - after clamping, `end <= start` (zero-length or reversed, including a time past `duration` that collapses);
    - it is part of a run of two or more consecutive words with the same start (the upstream bug of issue 55);
    - it is out of order: it is not on the longest chain of remaining words with strictly increasing starts;
    - it lies entirely inside the previous good word (see overlaps below).

    Overlaps: a good word that starts before the previous good word ended has its start moved to that end; if
    that leaves it with `end <= start` it is bad instead. Other good words keep their (clamped) times.

    Each maximal run of bad words is spread evenly, in order, over the gap between its good neighbours: from the
    previous good word's end to the next good word's start. A run with no good word before it starts at `start`,
    one with none after it ends at `duration`; or, given `speech` (where speech begins and ends inside the span,
    as voice activity detection found it, the span holding padding around it), at the speech's first and last
    instant, unless a good neighbour lies beyond that edge. A bad word is zero-length only when its gap is zero.

    The result satisfies `start <= word.start <= word.end <= duration` for every word and
    `word[i + 1].start >= word[i].end`.

    Raises:
        ValueError: `duration` or `start` is negative, NaN or infinite, `start > duration`, or `speech` does not
            lie in the span in order.
    """
    if not math.isfinite(duration) or duration < 0:
        raise ValueError(f"duration must be a finite number >= 0, got {duration!r}")
    if not math.isfinite(start) or not 0 <= start <= duration:
        raise ValueError(f"start must be a finite number in [0, duration={duration!r}], got {start!r}")
    first, last = speech if speech is not None else (start, duration)
    if not start <= first <= last <= duration:  # False for NaN too
        raise ValueError(f"speech must lie in order inside [{start!r}, {duration!r}], got {speech!r}")
    times = [_clamp(w, start, duration) for w in words]
    good = _good_mask(times)
    times = _trim_overlaps(times, good)
    times = _spread_bad_runs(times, good, first, last)
    return [replace(w, start=s, end=e) for w, (s, e) in zip(words, times, strict=True)]


def is_repaired(words: Sequence[Word], duration: float) -> bool:
    """Whether `words` already hold what `repair_times` guarantees over `[0, duration]`: finite, ordered,
    non-overlapping times inside it (zero-length words allowed)."""
    previous_end = 0.0
    for word in words:
        if not (previous_end <= word.start <= word.end <= duration):  # False for NaN too
            return False
        previous_end = word.end
    return True


def _clamp(word: Word, low: float, high: float) -> tuple[float, float]:
    start, end = float(word.start), float(word.end)
    if not (math.isfinite(start) and math.isfinite(end)):
        return math.nan, math.nan
    return min(max(start, low), high), min(max(end, low), high)


def _good_mask(times: list[tuple[float, float]]) -> list[bool]:
    """Words with a usable span that are not in a same-start run and lie on the longest increasing chain."""
    n = len(times)
    usable = [not math.isnan(s) and e > s for s, e in times]
    for i in range(n - 1):
        if times[i][0] == times[i + 1][0]:  # NaN never compares equal, so NaNs never form a run
            usable[i] = usable[i + 1] = False
    candidates = [i for i in range(n) if usable[i]]
    good = [False] * n
    for i in _longest_increasing(candidates, [times[i][0] for i in candidates]):
        good[i] = True
    return good


def _longest_increasing(items: list[int], keys: list[float]) -> list[int]:
    """The longest subsequence of `items` whose `keys` strictly increase (patience sorting, O(n log n))."""
    tails: list[float] = []  # smallest key ending a chain of each length
    tail_at: list[int] = []  # position (in items) of that chain's last element
    parent = [-1] * len(items)
    for pos, key in enumerate(keys):
        length = bisect.bisect_left(tails, key)
        if length == len(tails):
            tails.append(key)
            tail_at.append(pos)
        else:
            tails[length] = key
            tail_at[length] = pos
        parent[pos] = tail_at[length - 1] if length else -1
    chain: list[int] = []
    pos = tail_at[-1] if tail_at else -1
    while pos != -1:
        chain.append(items[pos])
        pos = parent[pos]
    return chain[::-1]


def _trim_overlaps(times: list[tuple[float, float]], good: list[bool]) -> list[tuple[float, float]]:
    """Move each good word's start up to the previous good word's end; words swallowed whole are marked bad
    (`good` is updated in place)."""
    out = list(times)
    previous_end: float | None = None
    for i, (start, end) in enumerate(times):
        if not good[i]:
            continue
        if previous_end is not None and start < previous_end:
            start = previous_end
            if end <= start:
                good[i] = False
                continue
        out[i] = (start, end)
        previous_end = end
    return out


def _spread_bad_runs(
    times: list[tuple[float, float]], good: list[bool], first: float, last: float
) -> list[tuple[float, float]]:
    """Give each run of bad words equal shares of the time between its good neighbours, or between `first` (a run
    with none before) and `last` (a run with none after), moved so that they never pass a good neighbour."""
    out = list(times)
    n = len(times)
    i = 0
    while i < n:
        if good[i]:
            i += 1
            continue
        j = i
        while j < n and not good[j]:
            j += 1
        high = out[j][0] if j < n else None
        low = out[i - 1][1] if i > 0 else min(first, last if high is None else high)
        if high is None:
            high = max(last, low)
        out[i:j] = _even_split(low, max(low, high), j - i)
        i = j
    return out


def _even_split(low: float, high: float, count: int) -> list[tuple[float, float]]:
    edges = [min(low + (high - low) * k / count, high) for k in range(count)] + [high]
    return [(edges[k], edges[k + 1]) for k in range(count)]


# --- mapping words onto the transcript --------------------------------------------------------------------------


def _is_kept(ch: str) -> bool:
    """The aligner's own rule: it keeps letters, digits and the ASCII apostrophe, and drops everything else."""
    return ch == "'" or unicodedata.category(ch)[0] in "LN"


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return 0x3400 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF or 0x20000 <= code <= 0x2FA1F


def _fold(text: str) -> str:
    """A lenient comparison key: compatibility-decomposed, accents removed, case-folded."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn").casefold()


def _match(transcript: str, pos: int, target: str, fold: bool) -> int | None:
    """End index if `target` matches the transcript from `pos` (skipping dropped characters), else None."""
    u, i = 0, pos
    while u < len(target):
        if i >= len(transcript):
            return None
        ch = transcript[i]
        piece = _fold(ch) if fold else ch
        if piece and target.startswith(piece, u):
            u += len(piece)
        elif piece and _is_kept(ch):
            return None
        i += 1
    return i


def _find_unit(transcript: str, unit: str, cursor: int) -> tuple[int, int] | None:
    """Where the aligned `unit` sits, at or after `cursor`: right there, else a little further on."""
    exact = "".join(ch for ch in unit if _is_kept(ch))
    folded = "".join(_fold(ch) for ch in exact)
    anchor = next((p for p in range(cursor, len(transcript)) if _is_kept(transcript[p])), None)
    if not exact or not folded or anchor is None:
        return None
    targets = ((exact, False), (folded, True))
    found = _match_first(transcript, [anchor], targets)
    if found is None:
        # Not where expected (the aligner saw different text): try a later word start, then anywhere, since
        # Japanese and Korean units can start inside a run of letters.
        later = [p for p in range(anchor + 1, min(len(transcript), anchor + _LOOKAHEAD)) if _is_kept(transcript[p])]
        starts = [p for p in later if _starts_unit(transcript, p)]
        found = _match_first(transcript, starts, targets) or _match_first(transcript, later, targets)
    return found


def _match_first(
    transcript: str, positions: list[int], targets: tuple[tuple[str, bool], ...]
) -> tuple[int, int] | None:
    for pos in positions:
        for target, fold in targets:
            end = _match(transcript, pos, target, fold)
            if end is not None:
                return pos, end
    return None


def _starts_unit(transcript: str, pos: int) -> bool:
    before = transcript[pos - 1]
    return not _is_kept(before) or _is_cjk(before) or _is_cjk(transcript[pos])


def _locate(transcript: str, words: Sequence[Word]) -> list[tuple[int, int]]:
    """Each word's `[start, end)` in the transcript, in order; a word that cannot be found gets an empty span
    at the current position, so it stays with its neighbours."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for word in words:
        span = _find_unit(transcript, word.text, cursor) or (cursor, cursor)
        spans.append(span)
        cursor = span[1]
    return spans


# --- sentence ends and cut points -------------------------------------------------------------------------------


def _sentence_end(transcript: str, low: int, high: int) -> int | None:
    """Index of the last character in `transcript[low:high]` (the text between two words) ending a sentence."""
    for i in range(high - 1, low - 1, -1):
        if _ends_sentence(transcript, i):
            return i
    return None


def _ends_sentence(transcript: str, i: int) -> bool:
    ch = transcript[i]
    if ch not in _SENTENCE_END:
        return False
    if ch in _PERIODS and (_is_decimal_point(transcript, i) or _word_before(transcript, i) in _ABBREVIATIONS):
        return False
    return not (ch in _CONTINUABLE and _next_word_is_lowercase(transcript, i))


def _is_decimal_point(transcript: str, i: int) -> bool:
    return 0 < i < len(transcript) - 1 and transcript[i - 1].isdigit() and transcript[i + 1].isdigit()


def _word_before(transcript: str, i: int) -> str:
    j = i
    while j > 0 and _is_kept(transcript[j - 1]):
        j -= 1
    return transcript[j:i]


def _next_word_is_lowercase(transcript: str, i: int) -> bool:
    for ch in transcript[i + 1 :]:
        if _is_kept(ch):
            return ch.islower()
    return False


def _cut(transcript: str, low: int, high: int, sentence_end: int | None) -> int:
    """Where, between two words, one segment's text stops and the next one's starts.

    The first segment keeps the sentence-ending punctuation (if any) and whatever trails it without a space
    (commas, closing quotes and brackets); opening punctuation such as "¿", "(" or "“" goes with the next one.
    """
    i = low if sentence_end is None else sentence_end + 1
    while i < high and _trails(transcript[i]):
        i += 1
    return i


def _trails(ch: str) -> bool:
    return not (ch.isspace() or _is_kept(ch) or ch in _OPENING or unicodedata.category(ch) in ("Ps", "Pi"))


# --- segments ---------------------------------------------------------------------------------------------------


def build_segments(
    transcript: str,
    words: Sequence[Word],
    duration: float,
    *,
    max_segment_seconds: float = 30.0,
    pause_factor: float = 4.0,
    min_pause: float = 0.3,
    times_repaired: bool = False,
    speakers: Sequence[str] | None = None,
) -> list[Segment]:
    """Group aligned `words` into sentence segments of `transcript`.

    Times are repaired first over the whole file (`repair_times`), unless `times_repaired` says the caller has
    repaired them already, each window's words within its own speech (then they are only checked).

    A new segment starts after a word when, between it and the next word, the transcript has sentence-ending
    punctuation (not a decimal point as in "3.5", not after a title such as "Mr.", not a "." or "…" followed by a
    lowercase word); when the pause before the next word is longer than `max(pause_factor * median pause,
    min_pause)`; when the next word would make the segment last longer than `max_segment_seconds` (a single
    longer word still gets a segment of its own); or, given `speakers` (one label per word), when the next word's
    speaker is another (a sentence two people share becomes two segments, each with its `speaker`).

    Each segment's text is the transcript from its first word to the next segment's first word, with the
    trailing punctuation, without surrounding whitespace; text before the first word joins the first segment.
    So the segment texts, in order, cover the whole transcript. Words are never dropped or reordered: one the
    transcript does not contain stays next to its neighbours. A segment whose text would be empty (only such
    words) is merged into its neighbour, the one case where a segment may exceed the cap.

    Returns [] for an empty transcript or no words.

    Raises:
        ValueError: a non-finite or negative `duration`, `max_segment_seconds <= 0`, a negative pause setting,
            `times_repaired` with times that are not (`is_repaired`), or `speakers` not one per word.
    """
    if not max_segment_seconds > 0 or not pause_factor >= 0 or not min_pause >= 0:
        raise ValueError("max_segment_seconds must be > 0 and pause_factor, min_pause >= 0")
    if speakers is not None and len(speakers) != len(words):
        raise ValueError(f"{len(speakers)} speakers given for {len(words)} words; give one per word")
    if times_repaired:
        if not is_repaired(words, duration):
            raise ValueError("times_repaired was given, but the word times are not ordered inside the file")
        timed = list(words)
    else:
        timed = repair_times(words, duration)
    if not transcript.strip() or not timed:
        return []
    spans = _locate(transcript, timed)
    gaps = [b.start - a.end for a, b in pairwise(timed)]
    pause = max(pause_factor * statistics.median(gaps), min_pause) if gaps else math.inf
    labels = list(speakers) if speakers is not None else [""] * len(timed)
    ranges = _split(transcript, timed, spans, gaps, pause, max_segment_seconds, labels)
    return [
        Segment(
            transcript[lo:hi].strip(),
            timed[first].start,
            timed[last - 1].end,
            tuple(timed[first:last]),
            _main_speaker(timed[first:last], labels[first:last]),
        )
        for first, last, lo, hi in _merge_empty(transcript, ranges)
    ]


def _main_speaker(words: Sequence[Word], labels: Sequence[str]) -> str:
    """The speaker of most of a segment's time (only a segment merged for having no text of its own can hold
    two); ties go to the one who spoke first."""
    held: dict[str, float] = {}
    for word, label in zip(words, labels, strict=True):
        held[label] = held.get(label, 0.0) + max(word.end - word.start, _EPS)
    return max(held, key=lambda label: held[label]) if held else ""


def _split(
    transcript: str,
    words: list[Word],
    spans: list[tuple[int, int]],
    gaps: list[float],
    pause: float,
    cap: float,
    speakers: Sequence[str],
) -> list[tuple[int, int, int, int]]:
    """Segments as `(first word, end word, text start, text end)`, covering all words and all the text."""
    ranges: list[tuple[int, int, int, int]] = []
    first, text_start = 0, 0
    for i, gap in enumerate(gaps):
        low, high = spans[i][1], spans[i + 1][0]
        end = _sentence_end(transcript, low, high)
        too_long = words[i + 1].end - words[first].start > cap
        if end is not None or gap > pause or too_long or speakers[i] != speakers[i + 1]:
            cut = _cut(transcript, low, high, end)
            ranges.append((first, i + 1, text_start, cut))
            first, text_start = i + 1, cut
    ranges.append((first, len(words), text_start, len(transcript)))
    return ranges


def _merge_empty(transcript: str, ranges: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Fold segments with no text (words the transcript lacks) into the previous segment, or the next one."""
    out: list[tuple[int, int, int, int]] = []
    pending: tuple[int, int] | None = None  # (first word, text start) of empty leading segments
    for first, last, lo, hi in ranges:
        if pending is not None:
            first, lo = pending
            pending = None
        if transcript[lo:hi].strip():
            out.append((first, last, lo, hi))
        elif out:
            prev_first, _, prev_lo, _ = out[-1]
            out[-1] = (prev_first, last, prev_lo, hi)
        else:
            pending = (first, lo)
    return out
