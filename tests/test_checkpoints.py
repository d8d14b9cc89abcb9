"""The offline checkpoints load through the real qwen-asr entry points and behave as documented."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from qwen_asr import Qwen3ASRModel, Qwen3ForcedAligner
from safetensors.torch import load_file

from qwen_asr_worker.testing.checkpoints import TINY_ALIGNER, build_aligner_checkpoint, build_asr_checkpoint

SENTENCE = "Hello world. This is a test."
WORDS = ["Hello", "world", "This", "is", "a", "test"]
CJK_SENTENCE = "你好世界。这是一个测试。"
MIXED_SENTENCE = "我们用Python写代码。"
SR = 16000


def _noise(seconds: float, seed: int) -> tuple[np.ndarray, int]:
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)).astype(np.float32) * 0.1, SR)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("checkpoints")
    return {
        "asr": build_asr_checkpoint(base / "asr", sentence=SENTENCE, language="English"),
        "asr_bf16": build_asr_checkpoint(base / "asr_bf16", sentence=SENTENCE, dtype=torch.bfloat16),
        "cjk": build_asr_checkpoint(base / "cjk", sentence=CJK_SENTENCE, language="Chinese"),
        "mixed": build_asr_checkpoint(base / "mixed", sentence=MIXED_SENTENCE, language="Chinese"),
        "silent": build_asr_checkpoint(base / "silent", sentence=""),
        "aligner": build_aligner_checkpoint(base / "aligner"),
    }


@pytest.fixture(scope="module")
def load_asr(paths: dict[str, Path]) -> Callable[[str, torch.dtype], Qwen3ASRModel]:
    cache: dict[tuple[str, torch.dtype], Qwen3ASRModel] = {}

    def load(name: str, dtype: torch.dtype = torch.float32) -> Qwen3ASRModel:
        if (name, dtype) not in cache:
            cache[name, dtype] = Qwen3ASRModel.from_pretrained(str(paths[name]), dtype=dtype, max_new_tokens=64)
        return cache[name, dtype]

    return load


@pytest.fixture(scope="module")
def load_aligner(paths: dict[str, Path]) -> Callable[[torch.dtype], Qwen3ForcedAligner]:
    cache: dict[torch.dtype, Qwen3ForcedAligner] = {}

    def load(dtype: torch.dtype = torch.float32) -> Qwen3ForcedAligner:
        if dtype not in cache:
            cache[dtype] = Qwen3ForcedAligner.from_pretrained(str(paths["aligner"]), dtype=dtype)
        return cache[dtype]

    return load


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_language_gives_the_language_and_the_sentence(load_asr: Callable, dtype: torch.dtype) -> None:
    (result,) = load_asr("asr", dtype).transcribe(audio=(np.zeros(2 * SR, np.float32), SR))
    assert (result.language, result.text) == ("English", SENTENCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_language_still_gives_the_sentence(load_asr: Callable, dtype: torch.dtype) -> None:
    (result,) = load_asr("asr", dtype).transcribe(audio=(np.zeros(2 * SR, np.float32), SR), language="German")
    assert (result.language, result.text) == ("German", SENTENCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_left_padded_batch_with_contexts_gives_the_sentence_for_each(load_asr: Callable, dtype: torch.dtype) -> None:
    audios = [_noise(seconds, seed) for seed, seconds in enumerate([0.5, 3.0, 7.5, 1.2])]
    contexts = ["", "a long context about speech recognition, names and places", "上下文", "x"]
    results = load_asr("asr", dtype).transcribe(audio=audios, context=contexts)
    assert [(r.language, r.text) for r in results] == [("English", SENTENCE)] * 4
    forced = load_asr("asr", dtype).transcribe(
        audio=audios, context=contexts, language=["French", None, "German", None]
    )
    assert [(r.language, r.text) for r in forced] == [
        ("French", SENTENCE),
        ("English", SENTENCE),
        ("German", SENTENCE),
        ("English", SENTENCE),
    ]


def test_a_checkpoint_stored_in_bfloat16(paths: dict[str, Path], load_asr: Callable) -> None:
    weights = load_file(str(paths["asr_bf16"] / "model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    (result,) = load_asr("asr_bf16", torch.bfloat16).transcribe(audio=_noise(1.0, 7))
    assert (result.language, result.text) == ("English", SENTENCE)


def test_an_empty_sentence_transcribes_as_silence(load_asr: Callable) -> None:
    model = load_asr("silent")
    (auto,) = model.transcribe(audio=_noise(2.0, 1))
    assert (auto.language, auto.text) == ("", "")
    (forced,) = model.transcribe(audio=_noise(2.0, 1), language="English")
    assert forced.text == ""


@pytest.mark.parametrize(("name", "sentence"), [("cjk", CJK_SENTENCE), ("mixed", MIXED_SENTENCE)])
def test_chinese_sentences(load_asr: Callable, name: str, sentence: str) -> None:
    model = load_asr(name)
    (auto,) = model.transcribe(audio=_noise(2.0, 2))
    assert (auto.language, auto.text) == ("Chinese", sentence)
    (forced,) = model.transcribe(audio=_noise(2.0, 2), language="Chinese")
    assert (forced.language, forced.text) == ("Chinese", sentence)


def test_generation_runs_to_max_new_tokens_and_the_tail_decodes_to_nothing(paths: dict[str, Path]) -> None:
    short = Qwen3ASRModel.from_pretrained(str(paths["asr"]), dtype=torch.float32, max_new_tokens=4)
    (result,) = short.transcribe(audio=_noise(1.0, 3))
    # "language", " English", "<asr_text>", then the first word: the budget cuts the sentence.
    assert (result.language, result.text) == ("English", "Hello")


def test_tiny_checkpoints_are_under_a_megabyte(paths: dict[str, Path]) -> None:
    for name, path in paths.items():
        size = sum(file.stat().st_size for file in path.iterdir())
        assert size < 1_000_000, f"{name} is {size} bytes"


def test_building_again_with_the_same_arguments_reuses_the_checkpoint(tmp_path: Path) -> None:
    path = build_asr_checkpoint(tmp_path / "asr")
    weights = path / "model.safetensors"
    weights.write_bytes(b"sentinel")  # a rebuild would overwrite it
    assert build_asr_checkpoint(tmp_path / "asr") == path
    assert weights.read_bytes() == b"sentinel"
    build_asr_checkpoint(tmp_path / "asr", seed=1)
    assert weights.read_bytes() != b"sentinel"


def test_sentences_the_decoder_cannot_chain_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distinct"):
        build_asr_checkpoint(tmp_path / "repeat", sentence="language English")
    with pytest.raises(ValueError, match="hidden_size"):
        build_asr_checkpoint(tmp_path / "long", sentence=" ".join(f"w{i}" for i in range(80)))
    with pytest.raises(ValueError, match="language"):
        build_asr_checkpoint(tmp_path / "lang", language="english")
    with pytest.raises(ValueError, match="whitespace"):
        build_asr_checkpoint(tmp_path / "space", sentence=" padded ")


def test_repeated_words_and_accents_still_chain(tmp_path: Path) -> None:
    sentence = "Über den Fluss, über den Berg, café!"
    path = build_asr_checkpoint(tmp_path / "de", sentence=sentence, language="German")
    (result,) = Qwen3ASRModel.from_pretrained(str(path), max_new_tokens=64).transcribe(audio=_noise(1.0, 4))
    assert (result.language, result.text) == ("German", sentence)


def test_the_aligner_config_survives_a_save_load_round_trip(paths: dict[str, Path], load_aligner: Callable) -> None:
    config = json.loads((paths["aligner"] / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "qwen3_asr"
    assert config["thinker_config"]["model_type"] == "qwen3_forced_aligner"
    aligner = load_aligner()
    assert aligner.model.thinker.lm_head.out_features == TINY_ALIGNER.classify_num
    assert aligner.timestamp_segment_time == 80.0
    assert aligner.processor.tokenizer.convert_ids_to_tokens(aligner.timestamp_token_id) == "<timestamp>"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_aligner_gives_one_monotone_item_per_word(load_aligner: Callable, dtype: torch.dtype) -> None:
    (result,) = load_aligner(dtype).align(audio=[_noise(2.0, 5)], text=[SENTENCE], language=["English"])
    assert [item.text for item in result.items] == WORDS
    # The n-th <timestamp> gets class n: word i spans [(2i+1), (2i+2)] x 80 ms.
    assert [(item.start_time, item.end_time) for item in result.items] == [
        (round(0.08 * (2 * i + 1), 3), round(0.08 * (2 * i + 2), 3)) for i in range(len(WORDS))
    ]


def test_the_aligner_handles_a_padded_batch_and_any_text(load_aligner: Callable) -> None:
    texts = [SENTENCE, "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich; 12 ½ ✓"]
    results = load_aligner().align(audio=[_noise(1.0, 6), _noise(4.5, 8)], text=texts, language=["English", "German"])
    assert [item.text for item in results[0].items] == WORDS
    german = ["Zwölf", "Boxkämpfer", "jagen", "Viktor", "quer", "über", "den", "großen", "Sylter", "Deich", "12", "½"]
    assert [item.text for item in results[1].items] == german
    assert [item.start_time for item in results[1].items] == [round(0.08 * (2 * i + 1), 3) for i in range(12)]
    (chinese,) = load_aligner().align(audio=[_noise(2.0, 9)], text=[CJK_SENTENCE], language=["Chinese"])
    assert [item.text for item in chinese.items] == list("你好世界这是一个测试")
