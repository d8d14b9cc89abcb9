"""Languages: what a request may say, what Qwen3-ASR understands, and the ISO code we answer with.

Clients send ISO codes (Home Assistant and the OpenAI API send `de`), BCP 47 tags (`de-DE`, `zh_CN`, `zh-Hant-TW`),
three-letter codes or English names; Qwen3-ASR wants its own capitalised English names ("German") and reports those
back. We accept all common forms, reject anything it does not support with the list of what it does, and answer
with ISO 639-1 where one exists, else ISO 639-3 (`yue` for Cantonese, `fil` for Filipino).

Chinese tags for Hong Kong and Macau (`zh-HK`, `zh-Hant-HK`, `zh-MO`) mean Cantonese, as they do in Apple's and
Home Assistant's speech settings: that is what people there speak. Other Chinese tags mean Mandarin ("Chinese").
"""

from __future__ import annotations

import re

from .errors import shown

# Qwen3-ASR name -> (ISO code we answer with, other codes and names we accept, all lower case). The order is
# qwen_asr.inference.utils.SUPPORTED_LANGUAGES's; a test keeps the two equal.
_TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "Chinese": ("zh", ("zho", "chi", "cmn", "mandarin", "mandarin chinese", "standard chinese")),
    "English": ("en", ("eng",)),
    "Cantonese": ("yue", ("zh-yue", "yue chinese")),
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
    "Malay": ("ms", ("msa", "may", "zsm", "bahasa melayu")),
    "Dutch": ("nl", ("nld", "dut", "flemish")),
    "Swedish": ("sv", ("swe",)),
    "Danish": ("da", ("dan",)),
    "Finnish": ("fi", ("fin",)),
    "Polish": ("pl", ("pol",)),
    "Czech": ("cs", ("ces", "cze")),
    "Filipino": ("fil", ("tl", "tgl", "tagalog")),
    "Persian": ("fa", ("fas", "per", "pes", "farsi")),
    "Greek": ("el", ("ell", "gre")),
    "Romanian": ("ro", ("ron", "rum", "mo", "mol", "moldavian", "moldovan")),
    "Hungarian": ("hu", ("hun",)),
    "Macedonian": ("mk", ("mkd", "mac")),
}
SUPPORTED: tuple[str, ...] = tuple(_TABLE)

_LOOKUP: dict[str, str] = {}
for _name, (_iso, _others) in _TABLE.items():
    for _key in (_name.lower(), _iso, *_others):
        _LOOKUP[_key] = _name

# Empty means auto-detect; so do these spellings of it, and BCP 47's "und" (undetermined).
_AUTO = frozenset({"", "auto", "automatic", "detect", "auto-detect", "autodetect", "und"})
_CANTONESE_REGIONS = frozenset({"hk", "mo", "yue"})
# A BCP 47-like tag: a primary subtag (a code or a name) and alphanumeric subtags of up to 8 characters,
# separated by '-' or '_'. Each repetition starts at a separator, so matching is linear in the input.
_TAG = re.compile(r"([a-z]+)((?:[-_][a-z0-9]{1,8})*)")


class LanguageError(ValueError):
    """The requested language is not one Qwen3-ASR supports."""


def resolve_language(value: str) -> str | None:
    """Map a request's language to Qwen3-ASR's name, or None to auto-detect.

    Accepts, in any case and with surrounding blanks: ISO 639-1/-2/-3 codes (`de`, `deu`, `ger`), BCP 47 tags
    with region or script (`de-DE`, `zh_CN`, `zh-Hant-TW`; `zh-HK` means Cantonese) and English names (`German`,
    `Mandarin`, `Farsi`, `Tagalog`). Empty, `auto` and `und` mean auto-detect.

    Raises:
        LanguageError: Qwen3-ASR does not support the language; the message lists the ones it does.
    """
    text = " ".join(value.lower().split())
    if text in _AUTO:
        return None
    name = _LOOKUP.get(text)
    if name is None:
        tag = _TAG.fullmatch(text)
        if tag is not None:
            name = _LOOKUP.get(tag.group(1))
            subtags = set(re.split(r"[-_]", tag.group(2))[1:])
            if name == "Chinese" and subtags & _CANTONESE_REGIONS:
                name = "Cantonese"
    if name is None:
        raise LanguageError(
            f"unsupported language '{shown(value, 40)}': Qwen3-ASR supports {_supported_list()}; "
            "leave it empty to auto-detect"
        )
    return name


def to_iso(name: str) -> str:
    """Qwen3-ASR's language name → the ISO code we answer with ("German" → "de", "Cantonese" → "yue").

    Unknown or empty names give "". Other spellings Qwen might print ("mandarin") map like the request forms.
    """
    canonical = _LOOKUP.get(" ".join(name.lower().split()))
    return _TABLE[canonical][0] if canonical else ""


def detected_to_iso(merged: str) -> str:
    """Qwen's merged detection ("Chinese,English") → ISO codes joined by commas ("zh,en").

    Unknown names are dropped and repeats removed, keeping first-seen order.
    """
    codes: list[str] = []
    for part in merged.split(","):
        code = to_iso(part)
        if code and code not in codes:
            codes.append(code)
    return ",".join(codes)


def _supported_list() -> str:
    return ", ".join(f"{iso} ({name})" for name, (iso, _) in _TABLE.items())
