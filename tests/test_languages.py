"""Language parsing: every form a client sends, ISO codes back, clear errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_asr_worker.errors import shown
from qwen_asr_worker.languages import SUPPORTED, LanguageError, detected_to_iso, resolve_language, to_iso

ISO = {
    "Chinese": "zh",
    "English": "en",
    "Cantonese": "yue",
    "Arabic": "ar",
    "German": "de",
    "French": "fr",
    "Spanish": "es",
    "Portuguese": "pt",
    "Indonesian": "id",
    "Italian": "it",
    "Korean": "ko",
    "Russian": "ru",
    "Thai": "th",
    "Vietnamese": "vi",
    "Japanese": "ja",
    "Turkish": "tr",
    "Hindi": "hi",
    "Malay": "ms",
    "Dutch": "nl",
    "Swedish": "sv",
    "Danish": "da",
    "Finnish": "fi",
    "Polish": "pl",
    "Czech": "cs",
    "Filipino": "fil",
    "Persian": "fa",
    "Greek": "el",
    "Romanian": "ro",
    "Hungarian": "hu",
    "Macedonian": "mk",
}


@pytest.mark.parametrize(
    ("value", "name"),
    [
        # auto-detect
        ("", None),
        ("  \t\n", None),
        ("auto", None),
        ("AUTO", None),
        ("auto-detect", None),
        ("und", None),
        # ISO 639-1, any case, blanks around
        ("de", "German"),
        ("DE", "German"),
        (" de ", "German"),
        ("tl", "Filipino"),
        # ISO 639-2/T, 639-2/B, 639-3
        ("deu", "German"),
        ("ger", "German"),
        ("zho", "Chinese"),
        ("chi", "Chinese"),
        ("cmn", "Chinese"),
        ("yue", "Cantonese"),
        ("fil", "Filipino"),
        ("tgl", "Filipino"),
        ("fas", "Persian"),
        ("per", "Persian"),
        ("msa", "Malay"),
        ("may", "Malay"),
        ("zsm", "Malay"),
        ("ell", "Greek"),
        ("gre", "Greek"),
        ("ron", "Romanian"),
        ("rum", "Romanian"),
        ("mkd", "Macedonian"),
        ("mac", "Macedonian"),
        ("nld", "Dutch"),
        ("dut", "Dutch"),
        ("ces", "Czech"),
        ("cze", "Czech"),
        ("ara", "Arabic"),
        ("arb", "Arabic"),
        # region and script forms
        ("de-DE", "German"),
        ("de_AT", "German"),
        ("en-us", "English"),
        ("EN-GB", "English"),
        ("pt-BR", "Portuguese"),
        ("zh_CN", "Chinese"),
        ("zh-Hans", "Chinese"),
        ("zh-Hant-TW", "Chinese"),
        ("zh-cmn-Hans-CN", "Chinese"),
        ("zh-HK", "Cantonese"),
        ("zh-Hant-HK", "Cantonese"),
        ("zh-MO", "Cantonese"),
        ("zh-yue", "Cantonese"),
        ("yue-Hant-HK", "Cantonese"),
        ("fa-IR", "Persian"),
        ("nl-BE", "Dutch"),
        ("ja-JP", "Japanese"),
        ("es-419", "Spanish"),
        # English names
        ("german", "German"),
        (" GERMAN ", "German"),
        ("Mandarin", "Chinese"),
        ("cantonese", "Cantonese"),
        ("Farsi", "Persian"),
        ("Tagalog", "Filipino"),
        ("bahasa  indonesia", "Indonesian"),
    ],
)
def test_resolve(value: str, name: str | None) -> None:
    assert resolve_language(value) == name


@pytest.mark.parametrize(
    "value",
    ["xx", "klingon", "-", "de-", "de--DE", "zz-ZZ", "sr-Latn", "english please", "\x00", "\ud800", "x" * 1_000_000],
)
def test_unknown_languages_are_rejected_with_the_list(value: str) -> None:
    with pytest.raises(LanguageError) as info:
        resolve_language(value)
    message = str(info.value)
    assert message.startswith("unsupported language ")
    assert f"'{shown(value, 40)}'" in message  # quoted, escaped, shortened in the middle
    assert "de (German)" in message and "yue (Cantonese)" in message and "fil (Filipino)" in message
    assert "leave it empty to auto-detect" in message
    assert len(message) < 1000
    message.encode("utf-8")  # a gRPC status detail: the value's repr escapes surrogates and controls


@pytest.mark.parametrize("value", ["-" * 1_000_000, "de-" * 300_000, "a" + "-a" * 500_000, " " * 1_000_000 + "x"])
def test_huge_inputs_are_linear(value: str) -> None:
    """Separator-heavy megabyte strings are answered at once (an early version was quadratic in them)."""
    with pytest.raises(LanguageError):
        resolve_language(value)


def test_table_is_qwens_thirty() -> None:
    assert list(SUPPORTED) == list(ISO)


@pytest.mark.parametrize(("name", "code"), ISO.items())
def test_every_language_round_trips(name: str, code: str) -> None:
    assert to_iso(name) == code
    assert resolve_language(code) == name
    assert resolve_language(name.upper()) == name
    assert resolve_language(f"{code}-XX") == name


@pytest.mark.parametrize(
    ("name", "code"), [("german", "de"), (" Filipino ", "fil"), ("", ""), ("None", ""), ("Xx", "")]
)
def test_to_iso_edge_cases(name: str, code: str) -> None:
    assert to_iso(name) == code


@pytest.mark.parametrize(
    ("merged", "codes"),
    [
        ("Chinese,English", "zh,en"),
        ("English", "en"),
        ("Cantonese", "yue"),
        ("", ""),
        ("English,English", "en"),
        ("Chinese,English,Chinese", "zh,en"),
        ("Unknown,French", "fr"),
        (" German , Filipino ", "de,fil"),
        (",,", ""),
    ],
)
def test_detected_to_iso(merged: str, codes: str) -> None:
    assert detected_to_iso(merged) == codes


def test_table_matches_qwen() -> None:
    from qwen_asr.inference.utils import SUPPORTED_LANGUAGES

    assert list(SUPPORTED) == list(SUPPORTED_LANGUAGES)


def _check_any(value: str) -> None:
    try:
        result = resolve_language(value)
    except LanguageError as exc:
        assert "leave it empty to auto-detect" in str(exc)
        str(exc).encode("utf-8")
    else:
        assert result is None or result in SUPPORTED


@settings(max_examples=400, deadline=None)
@given(st.text(st.characters(exclude_categories=())))  # surrogates and control characters included
def test_any_string_gives_a_name_none_or_language_error(value: str) -> None:
    _check_any(value)


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"[a-zA-Z]{1,12}([-_][a-zA-Z0-9]{0,9}){0,4}", fullmatch=True))
def test_any_tag_gives_a_name_none_or_language_error(value: str) -> None:
    _check_any(value)
