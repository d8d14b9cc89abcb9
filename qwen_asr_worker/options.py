"""Parse LocalAI's `ModelOptions.Options` (`key:value` strings from the model YAML) once, at LoadModel.

The result is a frozen dataclass with typed values, so the rest of the worker never re-parses strings. An
unknown key or a bad value fails the load with a message that names the valid keys or values: a typo in a YAML
file should be caught when the model loads, not silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .vad import VadSettings  # vad imports torch; parsing options must not

DEFAULT_ALIGNER = "Qwen/Qwen3-ForcedAligner-0.6B"
MAX_CHUNK_SECONDS = 180.0  # Qwen3-ForcedAligner's input limit; windows never exceed it.
DTYPES = ("auto", "fp32", "bf16", "fp16")
_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
QUANTIZATIONS = ("none", "int8")
ENCODER_ATTENTION = ("windowed", "full")  # the audio encoder's attention: within its 8-s windows, or all of it
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class OptionsError(ValueError):
    """A `key:value` option is malformed, unknown or has a bad value."""


PROMPT_TOKENS = 16  # `max_tokens_per_second` allows this many more, for the "language X<asr_text>" prefix


@dataclass(frozen=True)
class WorkerOptions:
    """Typed configuration from the model YAML's `options:` list; defaults are what users get with none."""

    torch_dtype: str = "auto"
    max_new_tokens: int = 1024
    max_tokens_per_second: float = 0.0
    fast_decode: bool = True
    quantization: str = "none"
    max_inference_batch_size: int = 8
    attn_implementation: str = "sdpa"
    device: str = "auto"
    forced_aligner: str | None = DEFAULT_ALIGNER
    aligner_dtype: str | None = None
    preload_aligner: bool = False
    aligner_idle_unload: float = 0.0
    max_segment_seconds: float = 30.0
    chunk_seconds: float = MAX_CHUNK_SECONDS
    max_batch_size: int = 8
    max_batch_seconds: float = 2 * MAX_CHUNK_SECONDS  # two full windows of a long file decode together
    batch_window_ms: float = 10.0
    vad: bool = True
    vad_min_silence_seconds: float = 2.0
    vad_pad_seconds: float = 0.4
    vad_threshold: float = 0.5
    live: bool = True
    diarization: str | None = None  # None: off; "on": the embedded pipeline; else a pyannote pipeline folder
    encoder_attention: str = "windowed"
    audio_memory_mb: int | None = None  # None: a quarter of the worker's usable memory (admission.py)
    max_waiting_requests: int = 32  # requests that may wait for audio memory before more are refused

    @property
    def vad_settings(self) -> VadSettings:
        """The voice activity detection settings."""
        from .vad import VadSettings

        return VadSettings(self.vad_threshold, self.vad_min_silence_seconds, self.vad_pad_seconds)

    @property
    def timestamps_enabled(self) -> bool:
        """False when the user set `forced_aligner:none`."""
        return self.forced_aligner is not None


def _parse_int(low: int, high: int | None = None) -> Callable[[str], int]:
    expected = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(expected) from None
        if value < low or (high is not None and value > high):
            raise ValueError(expected)
        return value

    return parse


def _parse_float(
    low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False
) -> Callable[[str], float]:
    bound = f"> {low:g}" if open_low else f">= {low:g}"
    expected = f"a number {bound}" + (f" and {'<' if open_high else '<='} {high:g}" if high is not None else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(expected) from None
        too_low = value <= low if open_low else value < low
        too_high = high is not None and (value >= high if open_high else value > high)
        if value != value or too_low or too_high:  # NaN fails too
            raise ValueError(expected)
        return value

    return parse


def _parse_choice(choices: Iterable[str], aliases: dict[str, str] | None = None) -> Callable[[str], str]:
    allowed = tuple(choices)

    def parse(text: str) -> str:
        value = text.lower()
        value = (aliases or {}).get(value, value)
        if value not in allowed:
            raise ValueError("one of " + ", ".join(allowed))
        return value

    return parse


def _parse_bool(text: str) -> bool:
    value = text.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("true or false")


def _parse_on_off(text: str) -> bool:
    try:
        return _parse_bool(text)
    except ValueError:
        raise ValueError("on or off") from None


def _parse_aligner(text: str) -> str | None:
    return None if text.lower() in ("none", "off", "false", "disabled") else text


def _parse_diarization(text: str) -> str | None:
    value = text.lower()
    if value in _FALSE or value == "none":
        return None
    if value in _TRUE:
        return "on"
    return text  # a pyannote pipeline folder: checked when it loads


def _parse_optional_dtype(text: str) -> str | None:
    return _parse_choice(DTYPES, _DTYPE_ALIASES)(text)


def _parse_device(text: str) -> str:
    value = text.lower()
    if value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError("auto, cpu, cuda, cuda:N or mps")


_PARSERS: dict[str, Callable[[str], Any]] = {
    "torch_dtype": _parse_choice(DTYPES, _DTYPE_ALIASES),
    "max_new_tokens": _parse_int(1, 32768),
    "max_tokens_per_second": _parse_float(0.0, 1000.0),
    "fast_decode": _parse_on_off,
    "quantization": _parse_choice(QUANTIZATIONS),
    "max_inference_batch_size": _parse_int(1, 256),
    "attn_implementation": _parse_choice(ATTN_IMPLEMENTATIONS),
    "device": _parse_device,
    "forced_aligner": _parse_aligner,
    "aligner_dtype": _parse_optional_dtype,
    "preload_aligner": _parse_bool,
    "aligner_idle_unload": _parse_float(0.0),
    "max_segment_seconds": _parse_float(0.0, open_low=True),
    "chunk_seconds": _parse_float(10.0, MAX_CHUNK_SECONDS),
    "max_batch_size": _parse_int(1, 256),
    "max_batch_seconds": _parse_float(10.0),
    "batch_window_ms": _parse_float(0.0, 10_000.0),
    "vad": _parse_on_off,
    "vad_min_silence_seconds": _parse_float(0.0, 600.0, open_low=True),
    "vad_pad_seconds": _parse_float(0.0, 10.0),
    "vad_threshold": _parse_float(0.0, 1.0, open_low=True, open_high=True),
    "live": _parse_on_off,
    "diarization": _parse_diarization,
    "encoder_attention": _parse_choice(ENCODER_ATTENTION),
    "audio_memory_mb": _parse_int(64),
    "max_waiting_requests": _parse_int(0, 100_000),
}
_ALIASES = {"dtype": "torch_dtype", "aligner": "forced_aligner"}
assert set(_PARSERS) == {f.name for f in fields(WorkerOptions)}


def valid_keys() -> list[str]:
    """The option keys this worker accepts, sorted."""
    return sorted(_PARSERS)


def split_option(item: str) -> tuple[str, str]:
    """Split one `key:value` string at its first colon; both sides must be non-empty."""
    if not isinstance(item, str) or ":" not in item:
        raise OptionsError(f"option {item!r} is not of the form key:value; valid keys: {', '.join(valid_keys())}")
    key, value = item.split(":", 1)
    key, value = key.strip(), value.strip()
    if not key:
        raise OptionsError(f"option {item!r} has no key; write key:value with one of: {', '.join(valid_keys())}")
    if not value:
        raise OptionsError(f"option {item!r} has no value; write {key}:VALUE")
    return key, value


def parse_options(items: Iterable[str]) -> WorkerOptions:
    """Parse `key:value` strings into `WorkerOptions`, rejecting unknown keys and bad values.

    Raises:
        OptionsError: with a message naming the offending option and the valid keys or values.
    """
    values = _parse_pairs((split_option(item) for item in items), _PARSERS, _ALIASES, "option", "keys")
    return dataclasses.replace(WorkerOptions(), **values)


def _parse_pairs(
    pairs: Iterable[tuple[str, str]],
    parsers: dict[str, Callable[[str], Any]],
    aliases: dict[str, str],
    what: str,
    plural: str,
) -> dict[str, Any]:
    """Typed values of `(key, raw value)` pairs: keys case-insensitive, each at most once, all known."""
    values: dict[str, Any] = {}
    for key, raw in pairs:
        name = key.strip().lower()
        name = aliases.get(name, name)
        parser = parsers.get(name)
        if parser is None:
            raise OptionsError(f"unknown {what} {key!r}; valid {plural}: {', '.join(sorted(parsers))}")
        if name in values:
            raise OptionsError(f"{what} {key!r} is given twice; keep one")
        try:
            values[name] = parser(raw.strip())
        except ValueError as exc:
            raise OptionsError(f"bad value {raw!r} for {what} {key!r}: expected {exc}") from None
    return values


@dataclass(frozen=True)
class LiveSettings:
    """A live session's `TranscriptLiveConfig.params`; defaults are what LocalAI's realtime API gets (it sends
    none)."""

    chunk_seconds: float = 2.0  # the model re-runs on the utterance after this much new audio
    rollback_tokens: int = 5  # the last tokens of each pass stay open: the next pass may still change them
    unfixed_chunks: int = 2  # an utterance's first passes finalize nothing
    words: bool = False  # send each utterance's words (forced aligner) when it is committed
    max_utterance_seconds: float = 30.0  # an utterance with no pause is committed at this length


_LIVE_PARSERS: dict[str, Callable[[str], Any]] = {
    "chunk_seconds": _parse_float(0.2, 30.0),
    "rollback_tokens": _parse_int(0, 100),
    "unfixed_chunks": _parse_int(0, 100),
    "words": _parse_bool,
    "max_utterance_seconds": _parse_float(2.0, MAX_CHUNK_SECONDS),
}
assert set(_LIVE_PARSERS) == {f.name for f in fields(LiveSettings)}


def parse_live_params(params: Mapping[str, str]) -> LiveSettings:
    """Parse a live session's params (exact keys, no aliases), rejecting unknown keys and bad values.

    Raises:
        OptionsError: naming the offending param and the valid keys or values.
    """
    values = _parse_pairs(params.items(), _LIVE_PARSERS, {}, "live transcription param", "params")
    settings = dataclasses.replace(LiveSettings(), **values)
    if settings.chunk_seconds > settings.max_utterance_seconds:
        raise OptionsError(
            f"live transcription param chunk_seconds ({settings.chunk_seconds:g}) is longer than "
            f"max_utterance_seconds ({settings.max_utterance_seconds:g}); lower chunk_seconds"
        )
    return settings
