"""Scoring: one text normalization, then word or character edit counts from jiwer.

Error rates are only comparable if every configuration is scored the same way, so there is exactly one
normalization (`normalize`), applied to references and hypotheses alike:

1. Unicode NFKC (full-width Ａ１ become A1, ligatures split), then lower case.
2. Curly apostrophes (’ ‘ ʼ) become `'`. An apostrophe between two letters is kept (`don't` stays one word,
   as LibriSpeech writes it); punctuation between two digits is kept (`3.5`, `1,000`, `10:30` stay one token).
3. Every other punctuation character (Unicode category P*, which includes CJK 。，、「」, full-width ！？, and
   also `% & # @ * /`) becomes a space. Symbols (S*: `$ + = ♪`) are kept.
4. Whitespace runs become one space; leading and trailing space goes.

Numbers are left as written: "twenty" and "20" differ, as they would to a reader of the transcript.

Chinese, Japanese, Korean and Cantonese are scored by characters (CER), everything else by words (WER). The
manifest's language decides when given; otherwise a reference with any Han, Hiragana, Katakana or Hangul
character is scored by characters. For CER all spaces are dropped first, so spacing never counts as an error.
(Korean does separate words with spaces; it is scored by characters all the same, as is usual for Korean ASR.)

Pooled rates are total edits over total reference units, never a mean of per-file rates.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

import jiwer

from ..languages import resolve_language, to_iso

CER_LANGUAGES = frozenset({"zh", "ja", "ko", "yue"})
_APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "ʼ": "'"})
# Han (with extensions and compatibility ideographs), Hiragana, Katakana (+ phonetic extensions, half-width),
# Hangul syllables and jamo.
_CJK = re.compile(
    "[\u2e80-\u2fdf\u3005\u3007\u3021-\u3029\u3038-\u303b\u3040-\u30ff\u3100-\u312f\u3131-\u318e\u31a0-\u31bf"
    "\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\uff66-\uffdc"
    "\U00020000-\U0003134f\u1100-\u11ff]"
)


class Unit(Enum):
    """What is counted: words (WER) or characters (CER)."""

    WORD = "wer"
    CHAR = "cer"


@dataclass(frozen=True)
class Score:
    """Edit counts of one hypothesis against its reference (or, summed, of many)."""

    unit: Unit
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    hits: int = 0

    @property
    def reference_units(self) -> int:
        """Words (or characters) in the reference: hits + substitutions + deletions."""
        return self.hits + self.substitutions + self.deletions

    @property
    def errors(self) -> int:
        """Substitutions + deletions + insertions."""
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float | None:
        """Errors per reference unit; None when the reference is empty (any output is then all insertions)."""
        return self.errors / self.reference_units if self.reference_units else None

    def __add__(self, other: Score) -> Score:
        if other.unit is not self.unit:
            raise ValueError(f"cannot add a {other.unit.value} score to a {self.unit.value} score")
        return Score(
            self.unit,
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.hits + other.hits,
        )


def normalize(text: str) -> str:
    """The one normalization applied to every reference and hypothesis (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_APOSTROPHES)
    out: list[str] = []
    last = len(text) - 1
    for i, char in enumerate(text):
        if unicodedata.category(char).startswith("P"):
            before = text[i - 1] if i > 0 else ""
            after = text[i + 1] if i < last else ""
            inside_word = char == "'" and before.isalpha() and after.isalpha()
            inside_number = before.isdigit() and after.isdigit()
            out.append(char if inside_word or inside_number else " ")
        else:
            out.append(char)
    return " ".join("".join(out).split())


def has_cjk(text: str) -> bool:
    """Whether `text` has a Han, Hiragana, Katakana or Hangul character."""
    return _CJK.search(text) is not None


def unit_for(reference: str, language: str | None = None) -> Unit:
    """Characters for zh/ja/ko/yue (by `language` when given, else by the reference's script), else words.

    `language` is anything `languages.resolve_language` accepts ("zh", "zh-HK", "Japanese"); empty or None
    means unknown.
    """
    if language:
        name = resolve_language(language)
        if name is not None:
            return Unit.CHAR if to_iso(name) in CER_LANGUAGES else Unit.WORD
    return Unit.CHAR if has_cjk(reference) else Unit.WORD


def tokens(text: str, unit: Unit) -> list[str]:
    """Normalized `text` as the units scored: words, or characters with spaces dropped."""
    normalized = normalize(text)
    return list(normalized.replace(" ", "")) if unit is Unit.CHAR else normalized.split()


def score(reference: str, hypothesis: str, unit: Unit) -> Score:
    """Edit counts of `hypothesis` against `reference`, both normalized, counted in `unit`s."""
    ref, hyp = tokens(reference, unit), tokens(hypothesis, unit)
    if not ref:
        return Score(unit, insertions=len(hyp))
    if not hyp:
        return Score(unit, deletions=len(ref))
    if unit is Unit.CHAR:
        out = jiwer.process_characters("".join(ref), "".join(hyp))
    else:
        out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return Score(unit, out.substitutions, out.deletions, out.insertions, out.hits)


def pooled(scores: Iterable[Score], unit: Unit) -> Score:
    """The sum of the `unit` scores among `scores` (others are skipped): its rate is total edits over total
    reference units."""
    total = Score(unit)
    for item in scores:
        if item.unit is unit:
            total += item
    return total
