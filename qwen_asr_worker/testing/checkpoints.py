r"""Random-weight Qwen3-ASR and Qwen3-ForcedAligner checkpoints, built offline.

Why this exists: the worker's tests and its benchmark must run the real qwen-asr code
(`Qwen3ASRModel.from_pretrained`, `Qwen3ForcedAligner.from_pretrained`, the processor, `generate`) on machines
that cannot reach Hugging Face. This module writes complete checkpoint directories from nothing but a seed:
config.json, safetensors weights, a byte-level BPE tokenizer trained on a generated corpus, a Whisper feature
extractor and the chat template.

Tiny checkpoints (`TINY_ASR`, `TINY_ALIGNER`) are wired by hand so that their output is known in advance:

* The ASR decoder is a bigram machine. Every decoder layer adds zero to the residual stream (`o_proj` and
  `down_proj` are zero), so the last position's final hidden state is its own one-hot token embedding, and the
  untied `lm_head` maps each token of a fixed chain to the next one::

      "\n" (end of "<|im_start|>assistant\n") -> "language" -> " English" -> "<asr_text>" -> sentence tokens
      -> "<|im_end|>" -> "<|im_end|>" ...

  Audio, context, padding, batching and dtype cannot change the last position, so `transcribe()` returns the
  sentence for any input. A forced language ends the prompt with "<asr_text>", which also maps to the sentence.
* The aligner's first decoder layer attends uniformly over the sequence (its queries are zero) and reads two
  indicators: the first token (`<|audio_start|>`) and `<timestamp>`. The ratio of the two means is the number
  of `<timestamp>` tokens so far, and the head turns that count n into class n. Word i therefore spans
  [(2i+1)*80 ms, (2i+2)*80 ms]: deterministic and monotone.

Full-size dims (`QWEN3_ASR_0_6B`, ...) get plain random weights (normal, std 0.02) stored in bfloat16 like the
published checkpoints: the real shapes and compute cost, garbage text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from qwen_asr.core.transformers_backend import (
    Qwen3ASRConfig,
    Qwen3ASRForConditionalGeneration,
    Qwen3ASRProcessor,
)
from qwen_asr.inference.utils import SUPPORTED_LANGUAGES
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import Qwen2TokenizerFast, WhisperFeatureExtractor

__all__ = [
    "QWEN3_ASR_0_6B",
    "QWEN3_ASR_1_7B",
    "QWEN3_FORCED_ALIGNER_0_6B",
    "TINY_ALIGNER",
    "TINY_ASR",
    "AsrDims",
    "build_aligner_checkpoint",
    "build_asr_checkpoint",
]


@dataclass(frozen=True)
class AsrDims:
    """Every architecture number of a Qwen3-ASR or Qwen3-ForcedAligner checkpoint.

    The audio encoder's output width is always the decoder's `hidden_size` (see `output_dim`): the model
    silently truncates a wider one and crashes on a narrower one.
    """

    # Audio encoder: three stride-2 convolutions, then a transformer.
    encoder_layers: int
    encoder_d_model: int
    encoder_heads: int
    encoder_ffn: int
    downsample_hidden_size: int
    # Text decoder (Qwen3).
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int | None = None  # None: exactly the tokenizer's size
    tie_word_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)  # sums to head_dim / 2
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 65536
    num_mel_bins: int = 128
    n_window: int = 50
    n_window_infer: int = 800  # the config class default (400 with n_window 100) crashes with n_window 50
    max_source_positions: int = 1500
    # Forced aligner only: width of the timestamp head and milliseconds per class.
    classify_num: int = 5000
    timestamp_segment_time: int = 80
    # Hand-wire the decoder so that outputs are known in advance (tiny test checkpoints; needs untied embeddings).
    deterministic: bool = False

    @property
    def output_dim(self) -> int:
        """Width of the audio encoder's output: the decoder's hidden size."""
        return self.hidden_size


TINY_ASR = AsrDims(
    encoder_layers=1,
    encoder_d_model=32,
    encoder_heads=2,
    encoder_ffn=64,
    downsample_hidden_size=8,
    hidden_size=64,
    layers=2,
    heads=2,
    kv_heads=1,
    head_dim=32,
    intermediate_size=64,
    mrope_section=(6, 5, 5),
    deterministic=True,
)
TINY_ALIGNER = replace(TINY_ASR, classify_num=256)

QWEN3_ASR_0_6B = AsrDims(
    encoder_layers=18,
    encoder_d_model=896,
    encoder_heads=14,
    encoder_ffn=3584,
    downsample_hidden_size=480,
    hidden_size=1024,
    layers=28,
    heads=16,
    kv_heads=8,
    head_dim=128,
    intermediate_size=3072,
    vocab_size=151936,
    tie_word_embeddings=True,
)
QWEN3_FORCED_ALIGNER_0_6B = replace(
    QWEN3_ASR_0_6B,
    encoder_layers=24,
    encoder_d_model=1024,
    encoder_heads=16,
    encoder_ffn=4096,
    vocab_size=152064,
    tie_word_embeddings=False,
)
# Unverified against the published config.
QWEN3_ASR_1_7B = replace(
    QWEN3_ASR_0_6B,
    encoder_layers=24,
    encoder_d_model=1024,
    encoder_heads=16,
    encoder_ffn=4096,
    hidden_size=2048,
    intermediate_size=6144,
)

DEFAULT_SENTENCE = "Hello world. This is a test."

_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>")
# Not special: skip_special_tokens=True decoding must keep "<asr_text>", or language and text no longer split.
_TAG_TOKENS = ("<non_speech>", "<asr_text>", "<timestamp>")
# Qwen2's pre-tokenizer split (GPT-4 style, one digit per token).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BPE_VOCAB = 640
_BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())
# Scripts written without spaces: one character per sentence piece.
_UNSPACED = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_PIECE = re.compile(rf"\s*(?:[{_UNSPACED}]|[^\s{_UNSPACED}]+)|\s+")

_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'audio' -%}"
    "{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_MARKER = "testing_checkpoint.json"
_BUILDER_VERSION = 1
_WEIGHTS = "model.safetensors"
# Logit of the intended next token in the bigram decoder; every other logit is 0. Exact in bfloat16.
_BIGRAM_LOGIT_WEIGHT = 10.0


def build_asr_checkpoint(
    path: str | Path,
    *,
    sentence: str = DEFAULT_SENTENCE,
    language: str = "English",
    dims: AsrDims = TINY_ASR,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    """Write a random-weight Qwen3-ASR checkpoint into `path` (created) and return it.

    With deterministic dims (`TINY_ASR`), `Qwen3ASRModel.transcribe` on any audio returns `language` and
    `sentence` (with a forced language: that language and `sentence`); `sentence=""` transcribes as silence,
    ("", ""). `generate()` stops only on the ids 151643/151645, which a tiny vocabulary lacks, so generation
    always runs to `max_new_tokens`: the tail is `<|im_end|>`, which decoding drops, and a budget shorter than
    the chain ("language", " X", "<asr_text>", the sentence's tokens) cuts the sentence. Full-size dims give
    garbage text (mostly ids beyond the small tokenizer, which decode to nothing).

    Idempotent: a complete checkpoint built with the same arguments is returned as it is.

    Raises:
        ValueError: `language` is not a supported language name, `sentence` has surrounding whitespace, its
            tokens repeat one another or the chain's fixed tokens, or it is too long for the hidden size.
    """
    if language not in SUPPORTED_LANGUAGES:
        raise ValueError(f"language {language!r} is not one of qwen-asr's supported languages")
    if sentence != sentence.strip():
        raise ValueError("sentence has leading or trailing whitespace; transcripts come back stripped")
    _check_dims(dims)
    path = Path(path)
    params = _params("asr", dims, dtype, seed, sentence=sentence, language=language)
    if _is_built(path, params):
        return path
    _begin(path)

    tokenizer = _build_tokenizer(corpus=[sentence])
    # "language X" as BPE tokens, taken before the sentence's pieces are added: a piece such as "a" would
    # otherwise match inside "language" (added tokens match anywhere) and break the chain.
    meta = f"language {language if sentence else 'None'}"
    meta_ids = tokenizer.encode(meta)
    _add_tokens(tokenizer, _sentence_pieces(sentence))
    config = _write_config_and_processor(path, dims, dtype, tokenizer, aligner=False)
    tensors = _random_weights(config, dims, seed, dtype)
    if dims.deterministic:
        # Token ids come from the processor exactly as qwen-asr loads it.
        processor = Qwen3ASRProcessor.from_pretrained(str(path), fix_mistral_regex=True)
        chain = _asr_chain(processor, meta, meta_ids, sentence)
        _wire_bigram_decoder(tensors, chain, dims)
    _save_weights(path, tensors, dtype)
    _finish(path, params)
    return path


def build_aligner_checkpoint(
    path: str | Path,
    *,
    dims: AsrDims = TINY_ALIGNER,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    """Write a random-weight Qwen3-ForcedAligner checkpoint into `path` (created) and return it.

    `Qwen3ForcedAligner.align` returns one item per word of any transcript. With deterministic dims
    (`TINY_ALIGNER`) the n-th `<timestamp>` gets class n, so word i spans [(2i+1), (2i+2)] x 80 ms (capped at
    `classify_num - 1` classes). That is exact in float32; in bfloat16 the logits' rounding makes it exact for
    about the first 8 words only, later classes drift by one or two (qwen-asr's repair keeps them monotone).
    Full-size dims give arbitrary timestamps.

    Idempotent: a complete checkpoint built with the same arguments is returned as it is.
    """
    _check_dims(dims)
    path = Path(path)
    params = _params("aligner", dims, dtype, seed)
    if _is_built(path, params):
        return path
    _begin(path)

    tokenizer = _build_tokenizer(corpus=[DEFAULT_SENTENCE])
    config = _write_config_and_processor(path, dims, dtype, tokenizer, aligner=True)
    thinker = config.thinker_config
    if thinker.model_type != "qwen3_forced_aligner":
        raise RuntimeError("the saved config lost the forced-aligner model type")
    tensors = _random_weights(config, dims, seed, dtype)
    if tensors["thinker.lm_head.weight"].shape[0] != dims.classify_num:
        raise RuntimeError("the model built from the saved config has no timestamp head")
    if dims.deterministic:
        _wire_counting_aligner(tensors, thinker.audio_start_token_id, config.timestamp_token_id, dims)
    _save_weights(path, tensors, dtype)
    _finish(path, params)
    return path


def _check_dims(dims: AsrDims) -> None:
    problems = []
    if sum(dims.mrope_section) != dims.head_dim // 2:
        problems.append(f"mrope_section {dims.mrope_section} must sum to head_dim/2 = {dims.head_dim // 2}")
    if dims.encoder_d_model % dims.encoder_heads:
        problems.append("encoder_d_model must be a multiple of encoder_heads")
    if dims.heads % dims.kv_heads:
        problems.append("heads must be a multiple of kv_heads")
    if dims.n_window_infer % (2 * dims.n_window):
        problems.append("n_window_infer must be a multiple of 2 * n_window")
    if dims.deterministic and dims.tie_word_embeddings:
        problems.append("a deterministic decoder needs untied embeddings")
    if dims.deterministic and dims.hidden_size < 8:
        problems.append("a deterministic decoder needs hidden_size >= 8")
    if problems:
        raise ValueError("invalid dims: " + "; ".join(problems))


def _params(kind: str, dims: AsrDims, dtype: torch.dtype, seed: int, **extra: str) -> dict[str, Any]:
    """Everything the files depend on, as it reads back from JSON."""
    params = {"builder_version": _BUILDER_VERSION, "kind": kind, "dims": asdict(dims), "dtype": str(dtype)}
    params.update(seed=seed, **extra)
    return json.loads(json.dumps(params))


def _is_built(path: Path, params: dict[str, Any]) -> bool:
    try:
        return json.loads((path / _MARKER).read_text(encoding="utf-8")) == params
    except (OSError, ValueError):
        return False


def _begin(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    # The marker is written last, so a build that dies half-way is never mistaken for a complete one.
    (path / _MARKER).unlink(missing_ok=True)


def _finish(path: Path, params: dict[str, Any]) -> None:
    (path / _MARKER).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _sentence_pieces(sentence: str) -> list[str]:
    """Split a sentence into distinct pieces that each become one token.

    A piece is a word with its leading whitespace and trailing punctuation, or one character of a script
    written without spaces. A piece that repeats an earlier one is glued to its predecessor, so that every
    token of the decoder's chain is distinct. A piece made only of characters of the byte-level alphabet
    that are not ASCII (e.g. "café" at the start) would decode as mojibake when it is an added token, so it
    is glued to a neighbour as well.
    """
    pieces: list[str] = []
    for piece in _PIECE.findall(sentence):
        if pieces and (piece in pieces or not _decodes_verbatim(piece) or not _decodes_verbatim(pieces[-1])):
            pieces[-1] += piece
        else:
            pieces.append(piece)
    # A single piece that would decode as mojibake is left to the BPE, which learns it from the corpus.
    return [piece for piece in pieces if _decodes_verbatim(piece)]


def _decodes_verbatim(piece: str) -> bool:
    """Whether an added token with this content decodes to itself through the byte-level decoder."""
    return piece.isascii() or any(char not in _BYTE_ALPHABET for char in piece)


def _corpus(extra: Iterable[str]) -> list[str]:
    lines = [f"language {name}" for name in (*SUPPORTED_LANGUAGES, "None")]
    lines += ["system", "user", "assistant", "0 1 2 3 4 5 6 7 8 9 10 100", ". , ! ? ; : ' \" ( ) - 。 ， ！ ？", *extra]
    # Repeated so that BPE learns every corpus word as one token.
    return lines * 4


def _build_tokenizer(*, corpus: Iterable[str]) -> Qwen2TokenizerFast:
    """A byte-level BPE tokenizer shaped like Qwen2's: covers every byte, so any text encodes."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB,
        min_frequency=2,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(corpus), trainer)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        # The processor reads these three names.
        extra_special_tokens={
            "audio_token": "<|audio_pad|>",
            "audio_bos_token": "<|audio_start|>",
            "audio_eos_token": "<|audio_end|>",
        },
    )
    _add_tokens(tokenizer, _TAG_TOKENS)
    return tokenizer


def _add_tokens(tokenizer: Qwen2TokenizerFast, tokens: Iterable[str]) -> None:
    """Add non-special tokens, matched verbatim in the raw text before pre-tokenisation."""
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in tokens])


def _write_config_and_processor(
    path: Path, dims: AsrDims, dtype: torch.dtype, tokenizer: Qwen2TokenizerFast, *, aligner: bool
) -> Qwen3ASRConfig:
    """Write config.json and the processor files; return the config as transformers reads it back."""
    vocab_size = len(tokenizer) if dims.vocab_size is None else dims.vocab_size
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")

    def token_id(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    thinker: dict[str, Any] = {
        "audio_config": {
            "num_mel_bins": dims.num_mel_bins,
            "encoder_layers": dims.encoder_layers,
            "encoder_attention_heads": dims.encoder_heads,
            "encoder_ffn_dim": dims.encoder_ffn,
            "d_model": dims.encoder_d_model,
            "output_dim": dims.output_dim,
            "n_window": dims.n_window,
            "n_window_infer": dims.n_window_infer,
            "downsample_hidden_size": dims.downsample_hidden_size,
            "max_source_positions": dims.max_source_positions,
            "activation_function": "gelu",
            "scale_embedding": False,
        },
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": dims.hidden_size,
            "intermediate_size": dims.intermediate_size,
            "num_hidden_layers": dims.layers,
            "num_attention_heads": dims.heads,
            "num_key_value_heads": dims.kv_heads,
            "head_dim": dims.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": dims.max_position_embeddings,
            "rms_norm_eps": dims.rms_norm_eps,
            "tie_word_embeddings": dims.tie_word_embeddings,
            "rope_theta": dims.rope_theta,
            # The rotary embedding reads rope_type and mrope_section, and always interleaves.
            "rope_scaling": {
                "rope_type": "default",
                "mrope_section": list(dims.mrope_section),
                "interleaved": True,
                "mrope_interleaved": True,
            },
            "attention_bias": False,
        },
        "audio_token_id": token_id("<|audio_pad|>"),
        "audio_start_token_id": token_id("<|audio_start|>"),
        "audio_end_token_id": token_id("<|audio_end|>"),
        "initializer_range": 0.02,
    }
    top: dict[str, Any] = {}
    if aligner:
        # The modeling code sizes lm_head to classify_num when "forced_aligner" is in this model_type.
        thinker.update(model_type="qwen3_forced_aligner", classify_num=dims.classify_num)
        top.update(timestamp_token_id=token_id("<timestamp>"), timestamp_segment_time=dims.timestamp_segment_time)
    config = Qwen3ASRConfig(
        thinker_config=thinker,
        support_languages=list(SUPPORTED_LANGUAGES),
        architectures=["Qwen3ASRForConditionalGeneration"],
        dtype=str(dtype).removeprefix("torch."),
        **top,
    )
    data = config.to_dict()
    if aligner:
        # to_dict() writes the class attribute ("qwen3_asr_thinker"), not the instance's model_type.
        data["thinker_config"]["model_type"] = "qwen3_forced_aligner"
    (path / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    feature_extractor = WhisperFeatureExtractor(
        feature_size=dims.num_mel_bins,
        sampling_rate=16000,
        hop_length=160,
        chunk_length=30,
        n_fft=400,
        padding_value=0.0,
        return_attention_mask=True,
    )
    processor = Qwen3ASRProcessor(
        feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=_CHAT_TEMPLATE
    )
    processor.save_pretrained(str(path))
    return Qwen3ASRConfig.from_pretrained(str(path))


def _random_weights(config: Qwen3ASRConfig, dims: AsrDims, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter of the model `config` describes: norms 1, biases 0, the rest normal(0, 0.02).

    Deterministic dims keep float32 for wiring; others are cast to `dtype` at once, to bound peak memory.
    """
    with torch.device("meta"):
        model = Qwen3ASRForConditionalGeneration(config)
    norms = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
    }
    generator = torch.Generator().manual_seed(seed)
    keep = torch.float32 if dims.deterministic else dtype
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if name == "thinker.lm_head.weight" and dims.tie_word_embeddings:
            continue  # loaded as the embedding, like published tied checkpoints
        if name in norms:
            tensor = torch.ones(param.shape)
        elif name.endswith(".bias"):
            tensor = torch.zeros(param.shape)
        else:
            tensor = torch.empty(param.shape).normal_(0.0, 0.02, generator=generator)
        tensors[name] = tensor.to(keep)
    return tensors


def _asr_chain(processor: Qwen3ASRProcessor, meta: str, meta_ids: Sequence[int], sentence: str) -> list[int]:
    """Token ids the bigram decoder walks: last prompt token, "language X<asr_text>", sentence, <|im_end|>."""
    tokenizer = processor.tokenizer
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": [{"type": "audio", "audio": ""}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    start = tokenizer.encode(prompt)[-1]
    body = tokenizer.encode(sentence) if sentence else []
    asr_text = tokenizer.convert_tokens_to_ids("<asr_text>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    chain = [start, *meta_ids, asr_text, *body, end]

    expected = f"{meta}<asr_text>{sentence}"
    decoded = tokenizer.decode(chain[1:], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if decoded != expected:
        raise ValueError(f"the tokenizer does not round-trip the transcript: {decoded!r} != {expected!r}")
    repeated = sorted({tokenizer.decode([t]) for t in chain if chain.count(t) > 1})
    if repeated:
        raise ValueError(f"the deterministic decoder needs distinct tokens, but {repeated} repeat in {expected!r}")
    return chain


def _wire_bigram_decoder(tensors: dict[str, torch.Tensor], chain: Sequence[int], dims: AsrDims) -> None:
    """Make the decoder map each token of `chain` to the next one and every other token to the last one."""
    hidden = dims.hidden_size
    if len(chain) > hidden:
        raise ValueError(f"the sentence needs {len(chain)} chain tokens, more than hidden_size {hidden}: shorten it")
    _silence_decoder_layers(tensors, dims)
    embed = tensors["thinker.model.embed_tokens.weight"]
    head = tensors["thinker.lm_head.weight"]
    # Dimension 0 is shared by every token outside the chain; chain token k owns dimension k + 1.
    embed.zero_()
    embed[:, 0] = 1.0
    head.zero_()
    head[chain[-1], 0] = _BIGRAM_LOGIT_WEIGHT
    for slot, (token, successor) in enumerate(pairwise(chain), start=1):
        embed[token].zero_()
        embed[token, slot] = 1.0
        head[successor, slot] = _BIGRAM_LOGIT_WEIGHT
    tensors["thinker.model.norm.weight"].fill_(1.0)


def _wire_counting_aligner(
    tensors: dict[str, torch.Tensor], first_token: int, timestamp_token: int, dims: AsrDims
) -> None:
    """Make the aligner give class n at the n-th `<timestamp>` token.

    Layer 0's queries are zero, so each position averages the values of itself and all earlier positions.
    Value 0 marks the first token (`<|audio_start|>`), value 1 marks `<timestamp>`: at position p the means are
    c/(p+1) and c*n/(p+1). The head scores class k as 2k*mean1 - k^2*mean0 = c/(p+1) * (n^2 - (n-k)^2),
    largest at k = n whatever the final norm's positive scale.
    """
    default, first_dim, stamp_dim, first_mean, stamp_mean = range(5)
    _silence_decoder_layers(tensors, dims)
    embed = tensors["thinker.model.embed_tokens.weight"]
    embed.zero_()
    embed[:, default] = 1.0
    embed[first_token].zero_()
    embed[first_token, first_dim] = 1.0
    embed[timestamp_token].zero_()
    embed[timestamp_token, stamp_dim] = 1.0
    # Audio features replace the audio placeholders' embeddings: keep them out of the counting dimensions.
    tensors["thinker.audio_tower.proj2.weight"][first_dim : stamp_mean + 1] = 0.0
    tensors["thinker.audio_tower.proj2.bias"][first_dim : stamp_mean + 1] = 0.0

    layer = "thinker.model.layers.0"
    tensors[f"{layer}.self_attn.q_proj.weight"].zero_()
    value = tensors[f"{layer}.self_attn.v_proj.weight"]
    value.zero_()
    value[0, first_dim] = 1.0
    value[1, stamp_dim] = 1.0
    out = tensors[f"{layer}.self_attn.o_proj.weight"]  # already zero: only head 0's first two channels pass
    out[first_mean, 0] = 1.0
    out[stamp_mean, 1] = 1.0
    tensors["thinker.model.norm.weight"].fill_(1.0)

    classes = torch.arange(dims.classify_num, dtype=torch.float32)
    head = tensors["thinker.lm_head.weight"]
    head.zero_()
    head[:, first_mean] = -(classes**2)
    head[:, stamp_mean] = 2.0 * classes


def _silence_decoder_layers(tensors: dict[str, torch.Tensor], dims: AsrDims) -> None:
    """Zero every decoder layer's contribution to the residual stream."""
    for index in range(dims.layers):
        tensors[f"thinker.model.layers.{index}.self_attn.o_proj.weight"].zero_()
        tensors[f"thinker.model.layers.{index}.mlp.down_proj.weight"].zero_()


def _save_weights(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    stored = {name: tensor.to(dtype).contiguous() for name, tensor in tensors.items()}
    tensors.clear()  # drop the float32 originals before serialising
    save_file(stored, str(path / _WEIGHTS), metadata={"format": "pt"})
