"""Find and load the two checkpoints: the Qwen3-ASR base model and the Qwen3-ForcedAligner.

A model reference from LocalAI is a path (absolute, or relative to `ModelPath`, where LocalAI keeps companion
artifacts) or a Hugging Face id. Local directories are checked before the heavy import runs, so a wrong path or
a checkpoint of another kind fails with a message that says which, instead of a transformers traceback.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import encoder_cache, runtime, torch_state
from . import fast_decode as fast_decode_path
from .errors import InvalidRequest, shown

if TYPE_CHECKING:
    from qwen_asr import Qwen3ASRModel, Qwen3ForcedAligner

log = logging.getLogger(__name__)

_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_reference(reference: str, model_path: str, *, what: str) -> str:
    """Turn a model reference into a local path or a Hugging Face id.

    Order: an absolute path; a path relative to `model_path`; a path relative to the working directory; a
    Hugging Face id (`org/name`). Raises `InvalidRequest` naming what was tried otherwise.
    """
    ref = reference.strip()
    if not ref:
        raise InvalidRequest(f"no {what} given: set it to a local directory or a Hugging Face id")
    try:
        found = _find_local(ref, model_path, what)
    except InvalidRequest:
        raise
    except (OSError, RuntimeError, ValueError) as exc:  # '~nosuchuser', an embedded NUL, a name too long
        raise InvalidRequest(
            f"{what} '{shown(ref)}' is not a usable path ({exc}); "
            "give an absolute path, a path relative to the models directory, or a Hugging Face id"
        ) from None
    if found is not None:
        return found
    if _HF_ID.match(ref):
        return ref
    where = f" under ModelPath {shown(model_path)}" if model_path else ""
    raise InvalidRequest(
        f"{what} '{shown(ref)}' was not found{where} and is not a Hugging Face id (org/name); "
        "give an absolute path, a path relative to the models directory, or an id like Qwen/Qwen3-ASR-0.6B"
    )


def _find_local(ref: str, model_path: str, what: str) -> str | None:
    """The local path `ref` names (absolute, under `model_path`, or under the working directory), else None."""
    candidate = Path(ref).expanduser()
    if candidate.is_absolute():
        if not candidate.exists():
            raise InvalidRequest(f"{what} path {shown(ref)} does not exist; check the path or use a Hugging Face id")
        return str(candidate)
    if model_path and (Path(model_path) / candidate).exists():
        return str(Path(model_path) / candidate)
    if candidate.exists():
        return str(candidate.resolve())
    return None


def _local_config(path: str, what: str) -> dict[str, Any] | None:
    """The checkpoint's config.json when `path` is local; None for a Hugging Face id."""
    directory = Path(path)
    if not directory.exists():
        return None
    if not directory.is_dir():
        raise InvalidRequest(f"{what} {path} is a file; give the checkpoint directory that holds config.json")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise InvalidRequest(f"{what} directory {path} has no config.json: it is not a Hugging Face checkpoint")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"{what} {path}: config.json is unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidRequest(f"{what} {path}: config.json is not a JSON object")
    return config


def _is_aligner(config: dict[str, Any]) -> bool:
    thinker = config.get("thinker_config")
    return isinstance(thinker, dict) and "forced_aligner" in str(thinker.get("model_type", ""))


def check_asr_checkpoint(path: str) -> None:
    """Reject a local checkpoint that is not a Qwen3-ASR model (before importing anything heavy)."""
    config = _local_config(path, "model")
    if config is None:
        return
    kind = config.get("model_type")
    if kind != "qwen3_asr":
        raise InvalidRequest(f"model {path} is a {kind or 'unknown'} checkpoint, not Qwen3-ASR (model_type qwen3_asr)")
    if _is_aligner(config):
        raise InvalidRequest(
            f"model {path} is a Qwen3-ForcedAligner, not a Qwen3-ASR model; "
            "load a Qwen3-ASR model and give the aligner as the forced_aligner option"
        )


def check_aligner_checkpoint(path: str) -> None:
    """Reject a local checkpoint that is not a Qwen3-ForcedAligner."""
    config = _local_config(path, "forced_aligner")
    if config is None:
        return
    if config.get("model_type") != "qwen3_asr" or not _is_aligner(config):
        raise InvalidRequest(
            f"forced_aligner {path} is not a Qwen3-ForcedAligner checkpoint; "
            "point the option at one (e.g. Qwen/Qwen3-ForcedAligner-0.6B) or set forced_aligner:none"
        )


def _placement(device: str, dtype: torch.dtype) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device != "cpu":
        kwargs["device_map"] = device
    return kwargs


def pick_precision(requested: str, device: str, accelerated: bool) -> tuple[torch.dtype, bool, str]:
    """The compute dtype for `torch_dtype`, whether the weights stay bf16 under it, and why (for the log line).

    `auto` on a CPU where oneDNN packs no bf16 but our bf16 kernel runs (`fast_decode.bf16_weights_pay()`), with
    the fast path (or int8) on, computes in float32 on bf16 weights; everything else is `runtime.pick_dtype`."""
    if requested == "auto" and device == "cpu" and accelerated and fast_decode_path.bf16_weights_pay():
        why = "auto: float32 compute on bf16 weights (oneDNN packs no bf16 on this CPU; our kernel multiplies them)"
        return torch.float32, True, why
    dtype, why = runtime.pick_dtype(requested, device)
    return dtype, False, why


def load_asr(
    path: str,
    *,
    device: str,
    dtype: torch.dtype,
    attn_implementation: str,
    max_inference_batch_size: int,
    max_new_tokens: int,
    fast_decode: bool = True,
    quantization: str = "none",
    bf16_weights: bool = False,
    encoder_attention: str = "windowed",
) -> Qwen3ASRModel:
    """Load the base Qwen3-ASR model only (no aligner), logging how long it took.

    With `encoder_attention="windowed"` (the default) the audio encoder attends within its 8-s windows as its
    FlashAttention-2 path and qwen-asr's vLLM backend do (`encoder_cache.windowed_attention`); `"full"` keeps
    qwen-asr's transformers sdpa/eager behaviour, where every frame attends to the whole input.

    With `fast_decode` (or `quantization:int8`), the decoder is switched to the fast CPU path (`fast_decode`),
    which on other devices only trims the prefill logits; without, qwen-asr's stock path runs as is. With
    `bf16_weights` (a CPU where `fast_decode.bf16_weights_pay()`), the checkpoint loads in bf16 and the fast path
    keeps the linear weights so while computing in `dtype` (float32).
    """
    if quantization != "none" and device != "cpu":
        raise InvalidRequest(
            f"quantization:{quantization} is for decoding on a CPU, but the model loads on {device}; "
            "remove the option, or set device:cpu"
        )
    check_asr_checkpoint(path)
    from qwen_asr import Qwen3ASRModel

    weights = torch.bfloat16 if bf16_weights else dtype

    with torch_state.loading():
        started = time.perf_counter()
        model = Qwen3ASRModel.from_pretrained(
            path,
            forced_aligner=None,
            max_inference_batch_size=max_inference_batch_size,
            max_new_tokens=max_new_tokens,
            attn_implementation=attn_implementation,
            **_placement(device, weights),
        )
    model.model.eval()
    _set_pad_token(model.model)
    if encoder_attention == "windowed":
        encoder_cache.windowed_attention(model)
    decode = "stock decode (fast_decode:off)"
    if fast_decode or quantization != "none" or bf16_weights:
        decode = fast_decode_path.accelerate_decoder(
            model.model, device=device, dtype=weights, quantization=quantization, compute=dtype
        )
    log.info(
        "loaded Qwen3-ASR %s on %s as %s in %.2f s (%.2f GiB of weights, process RSS %.2f GiB); %s; encoder attention "
        "%s",
        path,
        device,
        str(dtype).removeprefix("torch.") + (" on bf16 weights" if bf16_weights else ""),
        time.perf_counter() - started,
        runtime.module_bytes(model.model) / 2**30,
        runtime.rss_bytes() / 2**30,
        decode,
        "in 8-s windows" if encoder_cache.is_windowed(model) else "over the whole input",
    )
    return model


def _set_pad_token(model: torch.nn.Module) -> None:
    """Give the decoder's generation config the pad token transformers would otherwise pick on every call.

    qwen-asr's `generate` passes its end-of-sequence ids explicitly; with no pad token configured, transformers
    warns "Setting pad_token_id to eos_token_id" on every request. Setting the same id once at load silences
    that warning without hiding any other."""
    thinker = getattr(model, "thinker", model)
    config = getattr(thinker, "generation_config", None)
    if config is None or config.pad_token_id is not None:
        return
    eos = config.eos_token_id
    if eos is None:
        parameter = inspect.signature(type(model).generate).parameters.get("eos_token_id")
        eos = parameter.default if parameter is not None else None
    if isinstance(eos, list | tuple):
        eos = eos[0] if eos else None
    if isinstance(eos, int):
        config.pad_token_id = eos


def load_aligner(path: str, *, device: str, dtype: torch.dtype, attn_implementation: str) -> Qwen3ForcedAligner:
    """Load just the Qwen3-ForcedAligner, logging how long it took."""
    check_aligner_checkpoint(path)
    from qwen_asr import Qwen3ForcedAligner

    with torch_state.loading():
        started = time.perf_counter()
        aligner = Qwen3ForcedAligner.from_pretrained(
            path, attn_implementation=attn_implementation, **_placement(device, dtype)
        )
    aligner.model.eval()
    log.info(
        "attached Qwen3-ForcedAligner %s on %s as %s in %.2f s (%.2f GiB of weights, process RSS %.2f GiB)",
        path,
        device,
        str(dtype).removeprefix("torch."),
        time.perf_counter() - started,
        runtime.module_bytes(aligner.model) / 2**30,
        runtime.rss_bytes() / 2**30,
    )
    return aligner


def offline_hint() -> str:
    """A hint for load errors when the Hugging Face hub is unreachable or offline mode is on."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return " (HF_HUB_OFFLINE=1: only local directories and already-cached ids load)"
    return ""
