"""Languages: what a request may say, what Qwen3-ASR understands, and the ISO code we answer with.

Clients send ISO codes (Home Assistant sends `de`), region forms (`de-DE`, `zh_CN`) or names; Qwen3-ASR wants its
own capitalised English names ("German") and reports those back. We accept all common forms, reject anything it
does not support with the list of what it does, and answer with ISO 639-1 where one exists (else 639-3).
"""

from __future__ import annotations

import re

# Qwen3-ASR name -> (ISO code we answer with, other codes and names we accept).
_TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "Chinese": ("zh", ("zho", "chi", "cmn", "mandarin", "zh-cn", "zh-hans", "zh-sg", "zh-tw", "zh-hant")),
    "English": ("en", ("eng",)),
    "Cantonese": ("yue", ("zh-hk", "zh-yue", "yue-hk", "zh-mo")),
    "Arabic": ("ar", ("ara", "arb")),
    "German": ("de", ("deu", "ger")),
    "French": ("fr", ("fra", "fre")),
    "Spanish": ("es", ("spa", "castilian")),
    "Portuguese": ("pt", ("por",)),
    "Indonesian": ("id", ("ind", "in", "bahasa indonesia")),
    "Italian": ("it", ("ita",)),
    "Korean": ("ko", ("kor",)),
    "Russian": ("ru", ("rus",)),
    "Thai": ("th", ("tha",)),
    "Vietnamese": ("vi", ("vie",)),
    "Japanese": ("ja", ("jpn",)),
    "Turkish": ("tr", ("tur",)),
    "Hindi": ("hi", ("hin",)),
    "Malay": ("ms", ("msa", "may", "zsm")),
    "Dutch": ("nl", ("nld", "dut", "flemish")),
    "Swedish": ("sv", ("swe",)),
    "Danish": ("da", ("dan",)),
    "Finnish": ("fi", ("fin",)),
    "Polish": ("pl", ("pol",)),
    "Czech": ("cs", ("ces", "cze")),
    "Filipino": ("fil", ("tl", "tgl", "tagalog")),
    "Persian": ("fa", ("fas", "per", "farsi")),
    "Greek": ("el", ("ell", "gre")),
    "Romanian": ("ro", ("ron", "rum", "mo", "moldavian")),
    "Hungarian": ("hu", ("hun",)),
    "Macedonian": ("mk", ("mkd", "mac")),
}
SUPPORTED = tuple(_TABLE)
_LOOKUP: dict[str, str] = {}
for _name, (_iso, _others) in _TABLE.items():
    for _key in (_name.lower(), _iso, *_others):
        _LOOKUP[_key] = _name
_AUTO = ("", "auto", "detect", "auto-detect")
_SEPARATORS = re.compile(r"[-_]")


class LanguageError(ValueError):
    """The requested language is not one Qwen3-ASR supports."""


def _supported_list() -> str:
    return ", ".join(f"{iso} ({name})" for name, (iso, _) in _TABLE.items())


def resolve_language(value: str) -> str | None:
    """Map a request's language to Qwen3-ASR's name, or None to auto-detect.

    Accepts ISO 639-1/-2/-3 codes, region or script forms (`de-DE`, `zh_CN`, `zh-Hant-TW`) and English names,
    in any case. Raises `LanguageError` listing the supported languages otherwise.
    """
    text = value.strip().lower()
    if text in _AUTO:
        return None
    if text in _LOOKUP:
        return _LOOKUP[text]
    parts = _SEPARATORS.split(text)
    for end in range(len(parts) - 1, 0, -1):  # zh-hk-x → zh-hk → zh
        key = "-".join(parts[:end])
        if key in _LOOKUP:
            return _LOOKUP[key]
    shown = value if len(value) <= 40 else value[:40] + "…"
    raise LanguageError(
        f"unsupported language {shown!r}: Qwen3-ASR supports {_supported_list()}; leave it empty to auto-detect"
    )


def to_iso(name: str) -> str:
    """Qwen3-ASR name → ISO code ("German" → "de", "Cantonese" → "yue"); unknown or empty → ""."""
    entry = _TABLE.get(name.strip().capitalize())
    return entry[0] if entry else ""


def detected_to_iso(merged: str) -> str:
    """Qwen's merged detection ("Chinese,English") → ISO codes joined by commas ("zh,en"), duplicates removed."""
    codes: list[str] = []
    for part in merged.split(","):
        code = to_iso(part)
        if code and code not in codes:
            codes.append(code)
    return ",".join(codes)
