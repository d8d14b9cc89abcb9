"""Language parsing: every form a client sends, ISO codes back, clear errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_asr_worker.languages import SUPPORTED, LanguageError, detected_to_iso, resolve_language, to_iso


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("", None),
        ("  ", None),
        ("auto", None),
        ("de", "German"),
        ("DE", "German"),
        ("de-DE", "German"),
        ("de_AT", "German"),
        ("deu", "German"),
        ("ger", "German"),
        ("german", "German"),
        (" GERMAN ", "German"),
        ("zh", "Chinese"),
        ("zh_CN", "Chinese"),
        ("zh-Hant-TW", "Chinese"),
        ("cmn", "Chinese"),
        ("Mandarin", "Chinese"),
        ("zh-HK", "Cantonese"),
        ("yue", "Cantonese"),
        ("en-us", "English"),
        ("pt-BR", "Portuguese"),
        ("tl", "Filipino"),
        ("Tagalog", "Filipino"),
        ("fil", "Filipino"),
        ("farsi", "Persian"),
        ("fa-IR", "Persian"),
        ("msa", "Malay"),
        ("gre", "Greek"),
        ("rum", "Romanian"),
        ("mkd", "Macedonian"),
        ("nl-BE", "Dutch"),
        ("ja-JP", "Japanese"),
    ],
)
def test_resolve(value: str, name: str | None) -> None:
    assert resolve_language(value) == name


@pytest.mark.parametrize("value", ["xx", "klingon", "-", "zz-ZZ", "english please", "\x00", "x" * 1_000_000])
def test_unknown_languages_are_rejected_with_the_list(value: str) -> None:
    with pytest.raises(LanguageError) as info:
        resolve_language(value)
    message = str(info.value)
    assert "unsupported language" in message
    assert "de (German)" in message and "leave it empty to auto-detect" in message
    assert len(message) < 2000


def test_every_supported_language_round_trips() -> None:
    assert len(SUPPORTED) == 30
    for name in SUPPORTED:
        code = to_iso(name)
        assert code and resolve_language(code) == name and resolve_language(name.upper()) == name


@pytest.mark.parametrize(
    ("name", "code"), [("German", "de"), ("Cantonese", "yue"), ("Filipino", "fil"), ("Chinese", "zh"), ("", "")]
)
def test_to_iso(name: str, code: str) -> None:
    assert to_iso(name) == code


@pytest.mark.parametrize(
    ("merged", "codes"),
    [("Chinese,English", "zh,en"), ("English", "en"), ("", ""), ("English,English", "en"), ("Unknown,French", "fr")],
)
def test_detected_to_iso(merged: str, codes: str) -> None:
    assert detected_to_iso(merged) == codes


def test_table_matches_qwen() -> None:
    from qwen_asr.inference.utils import SUPPORTED_LANGUAGES

    assert list(SUPPORTED) == list(SUPPORTED_LANGUAGES)


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_any_string_gives_a_name_none_or_language_error(value: str) -> None:
    try:
        result = resolve_language(value)
    except LanguageError as exc:
        assert "leave it empty to auto-detect" in str(exc)
    else:
        assert result is None or result in SUPPORTED
