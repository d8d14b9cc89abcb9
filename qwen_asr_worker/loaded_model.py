"""One loaded base model: its request batcher and its lazily attached forced aligner.

The base Qwen3-ASR model loads eagerly at LoadModel. The Qwen3-ForcedAligner costs about as much memory again,
so it loads on the first request that asks for timestamps, under a lock, exactly once, and is attached to the
loaded model in place (`Qwen3ASRModel.forced_aligner` is a plain attribute): the base model is never
reloaded, copied or dropped for it. Requests that want no timestamps never touch that lock.

This module sits below everything that runs requests: the engine (`engine.py`) swaps `LoadedModel`s, and a
request's pass (`pipeline.py`) or a live session (`live.py`) uses the one it was given.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import diarization, encoder_cache, models, prefill_cache, runtime, torch_state
from .audio import SAMPLE_RATE
from .batcher import AsrBatcher, AsrJob
from .errors import NotReady
from .options import PROMPT_TOKENS, WorkerOptions

if TYPE_CHECKING:
    from qwen_asr import Qwen3ASRModel, Qwen3ForcedAligner

    from .diarization import Diarizer

log = logging.getLogger("qwen_asr_worker.engine")  # the load and aligner lines stay where operators filter for them


@dataclass(frozen=True)
class LoadSpec:
    """Everything LoadModel decided: what to load, where, how."""

    name: str
    reference: str
    model_path: str
    options: WorkerOptions
    cuda: bool = False
    threads: int = 0


class LoadedModel:
    """One loaded base model with its batcher and its aligner slot."""

    def __init__(self, spec: LoadSpec, asr: Qwen3ASRModel, device: str, dtype: torch.dtype) -> None:
        self.spec = spec
        self.asr: Qwen3ASRModel | None = asr
        self.device = device
        self.dtype = dtype
        self.aligner_loads = 0
        self.windows_transcribed = 0
        self.users = 0
        self.retired = False
        self._aligner_lock = threading.Lock()
        self._aligner_users = 0
        self._aligner_last_used = time.monotonic()
        self._closed = threading.Event()
        self._notes_lock = threading.Lock()
        self._noted: set[str] = set()
        self._diarizer: Diarizer | None = None
        self._diarizer_lock = threading.Lock()
        self._diarizer_users = 0
        self._diarizer_last_used = time.monotonic()
        self.diarizer_loads = 0
        opts = spec.options
        self.batcher = AsrBatcher(
            self._run_batch,
            max_batch_size=opts.max_batch_size,
            window_s=opts.batch_window_ms / 1000.0,
            name=f"asr-batcher-{spec.name or 'model'}",
            max_batch_samples=int(opts.max_batch_seconds * SAMPLE_RATE),
        )
        self.encoder_reuse = opts.live and encoder_cache.install(asr)  # live passes reuse finished encoder windows
        if opts.aligner_idle_unload > 0:  # the aligner's and the diarizer's
            threading.Thread(target=self._idle_watch, name="aligner-idle", daemon=True).start()

    # --- the base model -------------------------------------------------------------------------------
    def _run_batch(self, jobs: Sequence[AsrJob]) -> list[tuple[str, str]]:
        asr = self.asr
        if asr is None:
            raise NotReady("the model was unloaded while this request waited; call LoadModel again")
        self.windows_transcribed += len(jobs)
        # one batcher thread: the budget is set for this call only
        asr.max_new_tokens = max(self.token_budget(len(job.samples), job.prefix_tokens) for job in jobs)
        if not any(job.raw for job in jobs):
            with torch_state.forward_pass():
                results = asr.transcribe(
                    audio=[(job.samples, SAMPLE_RATE) for job in jobs],
                    context=[job.context for job in jobs],
                    language=[job.language for job in jobs],
                    return_time_stamps=False,
                )
            runtime.trim_heap()
            return [(r.language, r.text) for r in results]
        from qwen_asr.inference.utils import parse_asr_output  # loaded with the model, never at import

        with torch_state.forward_pass():
            outputs = _generate_after_prefix(asr, jobs)
        runtime.trim_heap()
        results = []
        for job, (language, raw) in zip(jobs, outputs, strict=True):
            detected, text = parse_asr_output(raw, user_language=language)
            results.append((detected, raw if job.raw else text))
        return results

    def token_budget(self, samples: int, prefix_tokens: int = 0) -> int:
        """How many tokens a window of `samples` may generate after `prefix_tokens` already written:
        `max_new_tokens`, or less with `max_tokens_per_second` (a window cannot hold more speech than its length
        allows, and the prefix has used part of it)."""
        opts = self.spec.options
        if opts.max_tokens_per_second <= 0:
            return opts.max_new_tokens
        per_audio = math.ceil(opts.max_tokens_per_second * samples / SAMPLE_RATE)
        return max(1, min(opts.max_new_tokens, PROMPT_TOKENS + per_audio - prefix_tokens))

    def count_tokens(self, text: str) -> list[int]:
        """The token ids of `text` (a live session's rollback counts in tokens)."""
        asr = self.asr
        if asr is None:
            raise NotReady("the model was unloaded; call LoadModel again")
        return list(asr.processor.tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of token ids, as the model's output is decoded."""
        asr = self.asr
        if asr is None:
            raise NotReady("the model was unloaded; call LoadModel again")
        return str(asr.processor.tokenizer.decode(list(ids), skip_special_tokens=True))

    def note_once(self, key: str, message: str, *args: object) -> None:
        """Log `message` at INFO the first time `key` is noted on this model, and never again for it: for a
        request default that LocalAI sends every time and the worker serves its own way (one line, not one per
        request)."""
        with self._notes_lock:
            if key in self._noted:
                return
            self._noted.add(key)
        log.info(message, *args)

    # --- the aligner ----------------------------------------------------------------------------------
    @property
    def aligner_attached(self) -> bool:
        """Whether the forced aligner is loaded and attached right now."""
        return self.asr is not None and self.asr.forced_aligner is not None

    def acquire_aligner(self) -> Qwen3ForcedAligner:
        """Return the attached aligner, loading and attaching it first if needed (once, under a lock).

        Callers must pair this with `release_aligner()`; while any caller holds it the idle unloader waits.
        """
        opts = self.spec.options
        if not opts.timestamps_enabled:
            raise NotReady(
                "timestamps are disabled for this model (forced_aligner:none); "
                "set the forced_aligner option to an aligner to get word or segment timestamps"
            )
        with self._aligner_lock:
            asr = self.asr
            if asr is None:
                raise NotReady("the model was unloaded; call LoadModel again")
            if asr.forced_aligner is None:
                asr.forced_aligner = self._load_aligner()
                self.aligner_loads += 1
            self._aligner_users += 1
            self._aligner_last_used = time.monotonic()
            return asr.forced_aligner

    def release_aligner(self) -> None:
        """Mark the end of one use of the aligner (starts the idle clock)."""
        with self._aligner_lock:
            self._aligner_users -= 1
            self._aligner_last_used = time.monotonic()

    def _load_aligner(self) -> Qwen3ForcedAligner:
        opts = self.spec.options
        assert opts.forced_aligner is not None
        try:
            path = models.resolve_reference(opts.forced_aligner, self.spec.model_path, what="forced_aligner")
            dtype = self.dtype
            if opts.aligner_dtype is not None:
                dtype, _ = runtime.pick_dtype(opts.aligner_dtype, self.device)
            return models.load_aligner(
                path, device=self.device, dtype=dtype, attn_implementation=opts.attn_implementation
            )
        except NotReady:
            raise
        except Exception as exc:
            log.warning("forced aligner %s failed to load: %s", opts.forced_aligner, exc)
            raise NotReady(
                f"the forced aligner {opts.forced_aligner!r} could not be loaded: {exc}{models.offline_hint()}; "
                "fix the forced_aligner option (a Hugging Face id, an absolute path, or a path under the "
                "models directory); plain transcription still works"
            ) from exc

    def detach_aligner(self) -> bool:
        """Drop the aligner and give its memory back. Returns whether one was attached."""
        with self._aligner_lock:
            if self.asr is None or self.asr.forced_aligner is None:
                return False
            self.asr.forced_aligner = None
        runtime.release_memory()
        log.info("forced aligner detached and freed")
        return True

    def _idle_watch(self) -> None:
        idle = self.spec.options.aligner_idle_unload
        while not self._closed.wait(min(1.0, idle / 4)):
            with self._aligner_lock:
                due = (
                    self._aligner_users == 0
                    and self.aligner_attached
                    and time.monotonic() - self._aligner_last_used >= idle
                )
            if due:
                log.info("no timestamp request for %.1f s", idle)
                self.detach_aligner()
            with self._diarizer_lock:
                due = (
                    self._diarizer_users == 0
                    and self._diarizer is not None
                    and time.monotonic() - self._diarizer_last_used >= idle
                )
            if due:
                log.info("no diarization request for %.1f s", idle)
                self.detach_diarizer()

    # --- the diarizer ---------------------------------------------------------------------------------
    @property
    def diarizer_attached(self) -> bool:
        """Whether the diarization model is loaded right now."""
        return self._diarizer is not None

    def acquire_diarizer(self) -> Diarizer:
        """Return the diarizer, loading it first if needed (once, under a lock, like the aligner).

        Callers must pair this with `release_diarizer()`; while any caller holds it the idle unloader waits.

        Raises:
            NotReady: diarization is off for this model, or its pipeline could not be loaded.
        """
        choice = self.spec.options.diarization
        if choice is None:
            raise NotReady(
                "speaker diarization is off for this model; set the model option diarization:on (the embedded "
                "pipeline) or diarization:PATH (a pyannote pipeline folder) and load it again"
            )
        with self._diarizer_lock:
            if self._closed.is_set():
                raise NotReady("the model was unloaded; call LoadModel again")
            if self._diarizer is None:
                self._diarizer = diarization.load_diarizer(choice, self.spec.model_path)
                self.diarizer_loads += 1
            self._diarizer_users += 1
            self._diarizer_last_used = time.monotonic()
            return self._diarizer

    def release_diarizer(self) -> None:
        """Mark the end of one use of the diarizer (starts the idle clock)."""
        with self._diarizer_lock:
            self._diarizer_users -= 1
            self._diarizer_last_used = time.monotonic()

    def detach_diarizer(self) -> bool:
        """Drop the diarization model and give its memory back. Returns whether one was loaded."""
        with self._diarizer_lock:
            if self._diarizer is None:
                return False
            self._diarizer = None
        runtime.release_memory()
        log.info("diarization model freed")
        return True

    # --- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the batcher and watcher and drop both models."""
        self._closed.set()
        self.batcher.close()
        with self._aligner_lock:
            self.asr = None
        with self._diarizer_lock:
            self._diarizer = None
        runtime.release_memory()

    def weight_bytes(self) -> tuple[int, int]:
        """Bytes of base-model weights and of aligner weights (0 when not attached)."""
        asr = self.asr
        if asr is None:
            return 0, 0
        aligner = asr.forced_aligner
        return runtime.module_bytes(asr.model), runtime.module_bytes(aligner.model if aligner else None)

    def diarizer_bytes(self) -> int:
        """Bytes of the diarization model's weights (0 when not loaded)."""
        diarizer = self._diarizer
        return diarizer.weight_bytes() if diarizer is not None else 0


def _generate_after_prefix(asr: Qwen3ASRModel, jobs: Sequence[AsrJob]) -> list[tuple[str | None, str]]:
    """One batched `generate` where each job's prompt ends with its `prefix` (the answer so far): qwen-asr's
    transformers path, as `transcribe()` runs it, with the prefix added. Returns `(forced language, prefix + new
    output)` per job; windows are at most `chunk_seconds` long, so none needs qwen-asr's own splitting."""
    from qwen_asr.inference.utils import normalize_language_name, validate_language

    languages: list[str | None] = []
    for job in jobs:
        language = normalize_language_name(job.language) if job.language else None
        if language:
            validate_language(language)
        languages.append(language)
    prompts = [
        asr._build_text_prompt(context=job.context, force_language=language) + job.prefix
        for job, language in zip(jobs, languages, strict=True)
    ]
    inputs = asr.processor(text=prompts, audio=[job.samples for job in jobs], return_tensors="pt", padding=True)
    inputs = inputs.to(asr.model.device).to(asr.model.dtype)
    cached = jobs[0].pass_cache if len(jobs) == 1 else None
    if cached is not None:  # a live pass alone: its prompt's unchanged prefix is not prefilled again
        out = prefill_cache.generate(asr, inputs, cached, asr.max_new_tokens)
    else:  # batched (the keys and values kept are one sequence's): live passes still reuse encoder windows
        caches = [job.pass_cache.encoder if job.pass_cache is not None else None for job in jobs]
        with encoder_cache.use(asr, caches):
            out = asr.model.generate(**inputs, max_new_tokens=asr.max_new_tokens)
    decoded = asr.processor.batch_decode(
        out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    return [(language, job.prefix + text) for job, language, text in zip(jobs, languages, decoded, strict=True)]
