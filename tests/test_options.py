"""Options parsing: typed values, defaults, and errors that name the valid keys or values."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_asr_worker.options import DEFAULT_ALIGNER, OptionsError, WorkerOptions, parse_options, valid_keys


def test_defaults() -> None:
    opts = parse_options([])
    assert opts == WorkerOptions()
    assert opts.torch_dtype == "auto"
    assert opts.forced_aligner == DEFAULT_ALIGNER
    assert opts.timestamps_enabled
    assert opts.chunk_seconds == 180.0
    assert opts.vad is True
    assert (opts.vad_min_silence_seconds, opts.vad_pad_seconds, opts.vad_threshold) == (2.0, 0.4, 0.5)


@pytest.mark.parametrize(
    ("item", "field", "expected"),
    [
        ("torch_dtype:bf16", "torch_dtype", "bf16"),
        ("torch_dtype:BFLOAT16", "torch_dtype", "bf16"),
        ("dtype:float32", "torch_dtype", "fp32"),
        ("torch_dtype:half", "torch_dtype", "fp16"),
        ("max_new_tokens:256", "max_new_tokens", 256),
        ("max_inference_batch_size:4", "max_inference_batch_size", 4),
        ("attn_implementation:eager", "attn_implementation", "eager"),
        ("forced_aligner:none", "forced_aligner", None),
        ("forced_aligner:Qwen/Other-Aligner", "forced_aligner", "Qwen/Other-Aligner"),
        ("forced_aligner:/abs/path:with:colons", "forced_aligner", "/abs/path:with:colons"),
        ("aligner:snapshots/aligner", "forced_aligner", "snapshots/aligner"),
        ("preload_aligner:true", "preload_aligner", True),
        ("preload_aligner:No", "preload_aligner", False),
        ("aligner_idle_unload:300", "aligner_idle_unload", 300.0),
        ("max_segment_seconds:12.5", "max_segment_seconds", 12.5),
        ("chunk_seconds:60", "chunk_seconds", 60.0),
        ("device:cuda:1", "device", "cuda:1"),
        ("max_batch_size:16", "max_batch_size", 16),
        ("batch_window_ms:0", "batch_window_ms", 0.0),
        (" max_new_tokens : 77 ", "max_new_tokens", 77),
        ("vad:off", "vad", False),
        ("vad:ON", "vad", True),
        ("vad_min_silence_seconds:0.5", "vad_min_silence_seconds", 0.5),
        ("vad_pad_seconds:0", "vad_pad_seconds", 0.0),
        ("vad_threshold:0.3", "vad_threshold", 0.3),
        ("fast_decode:off", "fast_decode", False),
        ("quantization:INT8", "quantization", "int8"),
        ("max_tokens_per_second:2.7", "max_tokens_per_second", 2.7),
    ],
)
def test_values_are_typed(item: str, field: str, expected: object) -> None:
    value = getattr(parse_options([item]), field)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("bogus:1", "unknown option 'bogus'; valid keys: aligner_dtype"),
        ("torch_dtype:int8", "expected one of auto, fp32, bf16, fp16"),
        ("max_new_tokens:12.5", "expected an integer in [1, 32768]"),
        ("max_new_tokens:0", "expected an integer in [1, 32768]"),
        ("chunk_seconds:600", "expected a number >= 10 and <= 180"),
        ("chunk_seconds:nan", "expected a number >= 10 and <= 180"),
        ("max_segment_seconds:0", "expected a number > 0"),
        ("preload_aligner:maybe", "expected true or false"),
        ("attn_implementation:magic", "one of sdpa, eager, flash_attention_2"),
        ("device:tpu", "auto, cpu, cuda, cuda:N or mps"),
        ("vad:sometimes", "expected on or off"),
        ("quantization:int4", "expected one of none, int8"),
        ("fast_decode:maybe", "expected on or off"),
        ("max_tokens_per_second:-1", "expected a number >= 0 and <= 1000"),
        ("vad_threshold:1", "expected a number > 0 and < 1"),
        ("vad_threshold:0", "expected a number > 0 and < 1"),
        ("vad_min_silence_seconds:0", "expected a number > 0 and <= 600"),
        ("vad_pad_seconds:-1", "expected a number >= 0 and <= 10"),
        ("no_colon", "is not of the form key:value"),
        (":", "has no key"),
        (":value", "has no key"),
        ("key:", "has no value"),
    ],
)
def test_bad_options_name_the_fix(item: str, fragment: str) -> None:
    with pytest.raises(OptionsError) as info:
        parse_options([item])
    assert fragment in str(info.value)


def test_duplicate_key_rejected() -> None:
    with pytest.raises(OptionsError, match="given twice"):
        parse_options(["torch_dtype:bf16", "dtype:fp32"])


def test_options_are_frozen() -> None:
    opts = parse_options(["max_new_tokens:5"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.max_new_tokens = 6  # type: ignore[misc]


def test_every_field_has_a_parser() -> None:
    assert valid_keys() == sorted(f.name for f in dataclasses.fields(WorkerOptions))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(), max_size=4))
def test_random_strings_give_options_or_options_error(items: list[str]) -> None:
    try:
        opts = parse_options(items)
    except OptionsError as exc:
        assert str(exc)
    else:
        assert isinstance(opts, WorkerOptions)
