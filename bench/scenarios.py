"""One benchmark scenario per process: `python -m bench.scenarios NAME 'JSON PARAMS'` prints one JSON result.

Why a process per scenario: resident memory can only be compared between processes that start equal. Weights
loaded as bfloat16 are memory-mapped from the safetensors file and become resident only as pages are touched,
and `ru_maxrss` is a lifetime high-water mark, so every figure is taken in a fresh process after a warm-up
request, with an RSS sampler thread (every 20 ms) around the phase whose peak matters.

"ours" is the worker as LocalAI runs it: `Engine` behind `create_server` (an in-process gRPC server on port 0)
and a gRPC client. The alternatives are emulated with the same library calls the worker makes:

* base:   `Qwen3ASRModel.from_pretrained(asr)`, no aligner (the floor for a plain request);
* eager:  `Qwen3ASRModel.from_pretrained(asr, forced_aligner=aligner)` at load;
* reload: base at load; on the first timestamp request, a second full `from_pretrained(asr, forced_aligner=...)`,
  then the first is dropped.

Timings also record how much CPU other processes used meanwhile (`other_cpu_s`): the machine may be shared.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import fixtures
from bench.fixtures import PeakSampler, Stopwatch, rss_bytes, rss_detail

Params = dict[str, Any]
Result = dict[str, Any]


# --- process-wide setup -------------------------------------------------------------------------------------
def _setup(params: Params) -> None:
    import torch

    torch.set_num_threads(int(params["threads"]))
    if _cuda(params) and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available in the scenario process")


def _cuda(params: Params) -> bool:
    return str(params.get("device", "cpu")).startswith("cuda")


def _torch_dtype(name: str, device: str) -> Any:
    from qwen_asr_worker import runtime

    dtype, _ = runtime.pick_dtype(name, "cuda:0" if device.startswith("cuda") else device)
    return dtype


def _gpu_reset(params: Params) -> None:
    if _cuda(params):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _gpu_figures(params: Params) -> dict[str, int]:
    if not _cuda(params):
        return {}
    import torch

    torch.cuda.synchronize()
    return {"gpu_allocated": torch.cuda.memory_allocated(), "gpu_peak": torch.cuda.max_memory_allocated()}


# --- CPU accounting (the machine may be shared) --------------------------------------------------------------
def _system_busy_s() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


class CpuWatch:
    """CPU seconds this process and all other processes used during a phase."""

    def __enter__(self) -> CpuWatch:
        self._sys, self._own = _system_busy_s(), _own_cpu_s()
        self.own_s = self.other_s = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.own_s = _own_cpu_s() - self._own
        self.other_s = max(0.0, (_system_busy_s() - self._sys) - self.own_s)


@contextmanager
def timed_phase(into: Result, key: str) -> Iterator[None]:
    """Record `{key}_s` (wall) and `{key}_other_cpu_s` (CPU used by other processes meanwhile) into `into`."""
    with CpuWatch() as cpu, Stopwatch() as watch:
        yield
    into[f"{key}_s"] = watch.seconds
    into[f"{key}_other_cpu_s"] = round(cpu.other_s, 2)


# --- the worker over gRPC -----------------------------------------------------------------------------------
class Worker:
    """The worker in-process: `create_server` on port 0, and a gRPC stub talking to it."""

    def __init__(self) -> None:
        import grpc

        import backend_pb2_grpc
        from qwen_asr_worker.server import create_server

        self.server, port, self.servicer = create_server("127.0.0.1:0", max_workers=32, token="")
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)]
        )
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.stub = backend_pb2_grpc.BackendStub(self.channel)

    @property
    def engine(self) -> Any:
        """The worker's `Engine`."""
        return self.servicer.engine

    def load(self, params: Params, *extra: str, dtype: str | None = None, asr: str | None = None) -> str:
        """LoadModel with the bench's options; returns the worker's message. Raises on failure."""
        import backend_pb2

        options = [
            f"forced_aligner:{params['aligner']}",
            f"max_new_tokens:{params['max_new_tokens']}",
            f"torch_dtype:{dtype or params['dtype']}",
            f"device:{params.get('device', 'cpu')}",
            *params.get("worker_options", []),
            *extra,
        ]
        if not any(o.startswith("vad:") for o in options):
            # Figures 1-8 compare the worker with library calls that hear every second, on speech-like noise
            # that is not speech: voice activity detection would skip it all. Figure 9 measures it.
            options.append("vad:off")
        reply = self.stub.LoadModel(
            backend_pb2.ModelOptions(
                Model=asr or params["asr"], Options=options, Threads=int(params["threads"]), CUDA=_cuda(params)
            ),
            timeout=1800,
        )
        if not reply.success:
            raise RuntimeError(f"LoadModel failed: {reply.message}")
        return reply.message

    def transcribe(self, path: str, *, words: bool = False, diarize: bool = False) -> Any:
        """AudioTranscription of one file (word timestamps when `words`, speaker labels when `diarize`)."""
        import backend_pb2

        request = backend_pb2.TranscriptRequest(
            dst=path, timestamp_granularities=["word"] if words else [], diarize=diarize
        )
        return self.stub.AudioTranscription(request, timeout=3600)

    def status(self) -> Any:
        """The Status rpc."""
        import backend_pb2

        return self.stub.Status(backend_pb2.HealthMessage(), timeout=30)

    def free(self) -> None:
        """The Free rpc."""
        import backend_pb2

        self.stub.Free(backend_pb2.HealthMessage(), timeout=600)

    def close(self) -> None:
        """Stop the server (models are dropped with the process)."""
        self.channel.close()
        self.server.stop(0)


def _status_memory(worker: Worker) -> dict[str, int]:
    status = worker.status()
    return {key: int(value) for key, value in status.memory.breakdown.items()}


# --- the library alone --------------------------------------------------------------------------------------
def load_library(params: Params, *, with_aligner: bool, dtype: str | None = None) -> Any:
    """`Qwen3ASRModel.from_pretrained` exactly as the alternatives would call it."""
    from qwen_asr import Qwen3ASRModel

    device = params.get("device", "cpu")
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype or params["dtype"], device), "attn_implementation": "sdpa"}
    if device != "cpu":
        kwargs["device_map"] = "cuda:0" if device == "cuda" else device
    return Qwen3ASRModel.from_pretrained(
        params["asr"],
        forced_aligner=params["aligner"] if with_aligner else None,
        forced_aligner_kwargs=dict(kwargs) if with_aligner else None,
        max_inference_batch_size=8,
        max_new_tokens=int(params["max_new_tokens"]),
        **kwargs,
    )


def _library_transcribe(model: Any, audio: Any, *, timestamps: bool = False) -> Any:
    return model.transcribe(audio=audio, return_time_stamps=timestamps)


def _check_text(text: str, result: Result) -> None:
    result["text_ok"] = text.strip() == fixtures.SENTENCE
    result.setdefault("text_sample", text[:80])


# --- scenarios ----------------------------------------------------------------------------------------------
def plain(params: Params) -> Result:
    """Figures 1 and 8: load one side, run a warm-up plain request, read RSS; then time a few more requests."""
    side = params["side"]
    clip = params["clip"]
    out: Result = {"side": side, "dtype": params["dtype"]}
    worker = model = None
    with timed_phase(out, "load"):
        if side == "ours":
            worker = Worker()
            out["load_message"] = worker.load(params)
        else:
            model = load_library(params, with_aligner=side == "eager")
    out["rss_after_load"] = rss_detail()

    def request() -> str:
        if worker is not None:
            return worker.transcribe(clip).text
        audio = (fixtures.read_clip(Path(clip)), fixtures.SAMPLE_RATE)
        return _library_transcribe(model, audio)[0].text

    with timed_phase(out, "warmup"):
        text = request()
    _check_text(text, out)
    gc.collect()
    out["rss_after_warmup"] = rss_detail()
    out.update(_gpu_figures(params))
    if worker is not None:
        out["status_memory"] = _status_memory(worker)
        current = worker.engine.current
        out["aligner_attached"] = current.aligner_attached
        out["torch_dtype"] = str(current.dtype).removeprefix("torch.")
    latencies, others = [], []
    with PeakSampler() as sampler:
        for _ in range(int(params.get("timed", 0))):
            phase: Result = {}
            with timed_phase(phase, "request"):
                request()
            latencies.append(phase["request_s"])
            others.append(phase["request_other_cpu_s"])
    out["latencies_s"] = latencies
    out["latencies_other_cpu_s"] = others
    if latencies:
        out["peak_rss_timed"] = sampler.peak
    out["rss_end"] = rss_bytes()
    if worker is not None:
        worker.close()
    return out


def first_timestamps(params: Params) -> Result:
    """Figures 2 and 3: after a warm-up plain request, the first timestamp request's peak RSS and latency."""
    side = params["side"]
    clip = params["clip"]
    out: Result = {"side": side, "dtype": params["dtype"]}
    samples = fixtures.read_clip(Path(clip))
    worker: Worker | None = None
    holder: dict[str, Any] = {}
    if side == "ours":
        worker = Worker()
        worker.load(params)
        _check_text(worker.transcribe(clip).text, out)
    else:
        holder["model"] = load_library(params, with_aligner=False)
        _check_text(_library_transcribe(holder["model"], (samples, fixtures.SAMPLE_RATE))[0].text, out)
    gc.collect()
    out["rss_before"] = rss_detail()
    phases = _PhaseLog(worker.engine.current) if worker is not None else None
    _gpu_reset(params)
    with PeakSampler() as sampler, timed_phase(out, "first_ts"):
        if worker is not None:
            result = worker.transcribe(clip, words=True)
            n_words = sum(len(seg.words) for seg in result.segments)
            text = result.text
        else:
            # The reload alternative: a second full model with the aligner, then drop the first.
            with timed_phase(out, "reload_load"):
                fresh = load_library(params, with_aligner=True)
                holder["model"] = fresh
                del fresh
                gc.collect()
            with timed_phase(out, "reload_transcribe"):
                stamped = _library_transcribe(holder["model"], (samples, fixtures.SAMPLE_RATE), timestamps=True)[0]
            n_words = len(stamped.time_stamps.items) if stamped.time_stamps else 0
            text = stamped.text
    out["peak_rss"] = sampler.peak
    out["rss_after"] = rss_detail()
    out["words"] = n_words
    out["text_ok_ts"] = text.strip() == fixtures.SENTENCE
    out.update(_gpu_figures(params))
    if phases is not None:
        out["phases"] = phases.spans
    if worker is not None:
        out["aligner_loads"] = worker.engine.current.aligner_loads
        out["status_memory"] = _status_memory(worker)
        worker.close()
    return out


class _BatchLog:
    """Wraps the batcher's model call to record each batch's size and duration (instrumentation only)."""

    def __init__(self, batcher: Any) -> None:
        self.entries: list[tuple[int, float]] = []
        self.rss_after: list[int] = []  # RSS right after each batch
        self.submitted: list[float] = []  # perf_counter() of each window's arrival at the batcher
        self._inner: Callable[[Sequence[Any]], list[tuple[str, str]]] = batcher._run_batch
        batcher._run_batch = self._call
        submit = batcher.submit

        def timed_submit(*args: Any, **kwargs: Any) -> Any:
            self.submitted.append(time.perf_counter())
            return submit(*args, **kwargs)

        batcher.submit = timed_submit

    def _call(self, jobs: Sequence[Any]) -> list[tuple[str, str]]:
        start = time.perf_counter()
        try:
            return self._inner(jobs)
        finally:
            self.entries.append((len(jobs), time.perf_counter() - start))
            self.rss_after.append(rss_bytes())

    def arrival_spread_ms(self) -> float:
        """Milliseconds between the first and the last window submitted since the last `take`."""
        return 1000 * (max(self.submitted) - min(self.submitted)) if self.submitted else 0.0

    def take(self) -> list[tuple[int, float]]:
        """The batches since the last call, as (size, seconds); also clears `rss_after` and `submitted`."""
        self.rss_after = []
        self.submitted = []
        entries, self.entries = self.entries, []
        return entries


class _PhaseLog:
    """Times the worker's phases of a timestamp request: ASR batches, the aligner's load, and alignment.

    Instrumentation only: wraps the loaded model's batcher call and aligner loader, recording (start, end)
    offsets in seconds from construction.
    """

    def __init__(self, model: Any) -> None:
        self.spans: dict[str, list[tuple[float, float]]] = {"asr": [], "aligner_load": [], "align": []}
        self._t0 = time.perf_counter()
        self._wrap(model.batcher, "_run_batch", "asr")
        load = model._load_aligner

        def timed_load() -> Any:
            aligner = self._timed("aligner_load", load)
            self._wrap(aligner, "align", "align")
            return aligner

        model._load_aligner = timed_load

    def _timed(self, key: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter() - self._t0
        try:
            return fn(*args, **kwargs)
        finally:
            self.spans[key].append((round(start, 3), round(time.perf_counter() - self._t0, 3)))

    def _wrap(self, owner: Any, name: str, key: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return self._timed(key, inner, *args, **kwargs)

        setattr(owner, name, wrapper)


def serving(params: Params) -> Result:
    """Figures 4, 5 and 8 (auto): per-request overhead and 8-client throughput, worker vs the library call.

    The library side calls `transcribe` on the worker's own loaded `Qwen3ASRModel` (same weights, same process),
    so the difference is exactly what the worker adds: gRPC, file decoding, window planning, the batcher, segments.
    """
    from qwen_asr_worker import runtime

    clips: list[str] = params["clips"]
    reps = int(params["reps"])
    out: Result = {"dtype_requested": params["dtype"]}
    worker = Worker()
    worker.load(params)
    current = worker.engine.current
    out["auto_dtype"] = str(current.dtype).removeprefix("torch.")
    out["auto_reason"] = runtime.pick_dtype(params["dtype"], current.device)[1]
    library = current.asr
    batch_log = _BatchLog(current.batcher)
    arrays = [(fixtures.read_clip(Path(c)), fixtures.SAMPLE_RATE) for c in clips]

    # Warm-up both paths once.
    _check_text(worker.transcribe(clips[0]).text, out)
    _library_transcribe(library, arrays[0])
    batch_log.take()

    # Figure 4: alternate the two sides (ABBA) so that drift and neighbours' load hit both alike.
    ours_s: list[float] = []
    lib_s: list[float] = []
    model_s: list[float] = []
    other: list[float] = []
    for rep in range(reps):
        order = ("ours", "lib") if rep % 2 == 0 else ("lib", "ours")
        for side in order:
            phase: Result = {}
            with timed_phase(phase, "t"):
                if side == "ours":
                    worker.transcribe(clips[0])
                else:
                    _library_transcribe(library, arrays[0])
            (ours_s if side == "ours" else lib_s).append(phase["t_s"])
            other.append(phase["t_other_cpu_s"])
            if side == "ours":
                model_s.extend(seconds for _, seconds in batch_log.take())
    out["overhead"] = {"ours_s": ours_s, "library_s": lib_s, "ours_model_call_s": model_s, "other_cpu_s": other}

    # Figure 5: 8 clients at once vs one batched library call vs the worker serially.
    if params.get("batch_warmup", True):
        with timed_phase(out, "batch_warmup"):
            _library_transcribe(library, arrays)
    audio_s = sum(len(a) for a, _ in arrays) / fixtures.SAMPLE_RATE
    out["throughput_audio_s"] = audio_s

    def concurrent() -> Result:
        barrier = threading.Barrier(len(clips))
        texts: list[str] = [""] * len(clips)

        def client(i: int) -> None:
            barrier.wait()
            texts[i] = worker.transcribe(clips[i]).text

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(clips))]
        phase: Result = {}
        with timed_phase(phase, "wall"):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        phase["all_text_ok"] = all(t.strip() == fixtures.SENTENCE for t in texts)
        phase["arrival_spread_ms"] = batch_log.arrival_spread_ms()
        phase["batches"] = batch_log.take()
        return phase

    def library_batch() -> Result:
        phase: Result = {}
        with timed_phase(phase, "wall"):
            results = _library_transcribe(library, arrays)
        phase["all_text_ok"] = all(r.text.strip() == fixtures.SENTENCE for r in results)
        return phase

    def serial() -> Result:
        phase: Result = {}
        with timed_phase(phase, "wall"):
            for clip in clips:
                worker.transcribe(clip)
        phase["batches"] = batch_log.take()
        return phase

    runs: dict[str, list[Result]] = {"concurrent": [], "library_batch": [], "serial": []}
    for _ in range(int(params.get("throughput_reps", 1))):
        runs["concurrent"].append(concurrent())
        runs["library_batch"].append(library_batch())
        runs["serial"].append(serial())
    out["throughput"] = runs
    out["batch_sizes_total"] = dict(Counter(current.batcher.batch_sizes))
    worker.close()
    return out


def idle_and_free(params: Params) -> Result:
    """Figure 6: RSS before LoadModel, with the base model, with the aligner, after idle unload, after Free."""
    idle = float(params["idle_s"])
    clip = params["clip"]
    out: Result = {"dtype": params["dtype"], "idle_s": idle}
    worker = Worker()
    gc.collect()
    out["rss_before_imports"] = rss_bytes()
    import qwen_asr  # noqa: F401 - the worker imports it at the first LoadModel; count it before, not as a leak

    gc.collect()
    out["rss_before_load"] = rss_bytes()
    out["rss_before_load_detail"] = rss_detail()
    worker.load(params, f"aligner_idle_unload:{idle:g}")
    _check_text(worker.transcribe(clip).text, out)
    gc.collect()
    out["rss_base_warm"] = rss_bytes()
    worker.transcribe(clip, words=True)
    out["rss_with_aligner"] = rss_bytes()
    out["status_with_aligner"] = _status_memory(worker)
    started = time.monotonic()
    deadline = started + idle * 10 + 30
    while _status_memory(worker).get("aligner_weights", 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    out["unloaded_after_s"] = time.monotonic() - started
    out["unloaded"] = not worker.engine.current.aligner_attached
    time.sleep(0.5)
    out["rss_after_idle"] = rss_bytes()
    out["status_after_idle"] = _status_memory(worker)
    worker.transcribe(clip)
    out["rss_after_idle_plain"] = rss_bytes()
    worker.free()
    time.sleep(1.0)
    out["rss_after_free"] = rss_bytes()
    out["rss_after_free_detail"] = rss_detail()
    out["status_after_free"] = _status_memory(worker)
    if params.get("second_cycle", True):
        # Load, serve and free once more: a second cycle that ends higher than the first would be a leak;
        # one that ends level means the first cycle's excess is one-time (imports, caches, heap high-water).
        worker.load(params)
        worker.transcribe(clip, words=True)
        worker.free()
        time.sleep(1.0)
        out["rss_after_free_2"] = rss_bytes()
    worker.close()
    return out


def long_audio(params: Params) -> Result:
    """Figures 7, 14 and 18: peak RSS across one long file through the worker, after a warm-up 10-s request.
    With `in_memory`, the request keeps its decoded audio in memory whatever its length (figure 18's reference)."""
    from qwen_asr_worker import pipeline

    if params.get("in_memory"):
        pipeline.SPILL_BYTES = None
    out: Result = {"dtype": params["dtype"], "clip": params["clip"], "asr": params["asr"]}
    worker = Worker()
    worker.load(params, *params.get("extra_options", []))
    _check_text(worker.transcribe(params["warmup_clip"]).text, out)
    current = worker.engine.current
    before_windows = current.windows_transcribed
    batch_log = _BatchLog(current.batcher)
    gc.collect()
    out["rss_before"] = rss_bytes()
    _gpu_reset(params)
    with PeakSampler(timeline_step=1.0) as sampler, timed_phase(out, "request"):
        result = worker.transcribe(params["clip"], words=bool(params.get("words", False)))
    out["peak_rss"] = sampler.peak
    out["rss_timeline"] = sampler.timeline
    out["rss_after"] = rss_bytes()
    out["duration_s"] = result.duration
    out["segments"] = len(result.segments)
    out["text_chars"] = len(result.text)
    out["windows"] = current.windows_transcribed - before_windows
    out["rss_after_each_batch"] = batch_log.rss_after
    out["batches"] = batch_log.take()
    out.update(_gpu_figures(params))
    worker.close()
    return out


def voice_activity(params: Params) -> Result:
    """Figure 9: one file through the worker with voice activity detection on or off, after a warm-up request on
    10 s of real speech: wall time, peak RSS, windows sent to the model, and the time VAD itself took."""
    from qwen_asr_worker import vad

    out: Result = {"vad": params["vad"], "clip": params["clip"], "asr": params["asr"]}
    spent: list[float] = []
    detect = vad.detect_speech

    def timed_detect(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return detect(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    vad.detect_speech = timed_detect  # the engine looks it up on the module at every request
    worker = Worker()
    worker.load(params, f"vad:{params['vad']}", *params.get("extra_options", []))
    worker.transcribe(params["warmup_clip"])
    spent.clear()
    current = worker.engine.current
    before = current.windows_transcribed
    gc.collect()
    out["rss_before"] = rss_bytes()
    with PeakSampler() as sampler, timed_phase(out, "request"):
        result = worker.transcribe(params["clip"])
    out["peak_rss"] = sampler.peak
    out["windows"] = current.windows_transcribed - before
    out["vad_s"] = sum(spent)
    out["duration_s"] = result.duration
    out["text_chars"] = len(result.text)
    out["segments"] = len(result.segments)
    worker.close()
    return out


def _decoder_bytes(thinker: Any) -> int:
    """Bytes one decode step must read: the decoder's linear weights and the output projection, as stored."""
    from torch import nn

    from qwen_asr_worker import decode_linears

    total = 0
    for module in {id(m): m for m in [*thinker.model.modules(), thinker.lm_head]}.values():
        if isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, (decode_linears.PackedLinear, decode_linears.Bf16Linear, decode_linears.Int8Linear)):
            total += module.weight_bytes
    return total


def _load_asr(params: Params, mode: str, *, tokens: int, batch: int = 1) -> Any:
    """The ASR model through the worker's loader, with decode path `mode` (`stock`, `fast` or `int8`)."""
    from qwen_asr_worker import models

    device = params.get("device", "cpu")
    # As the worker decides it: `auto` on a CPU where oneDNN packs no bf16 computes in float32 on bf16 weights.
    dtype, bf16_weights, _ = models.pick_precision(
        params["dtype"], "cuda:0" if _cuda(params) else device, mode != "stock"
    )
    return models.load_asr(
        params["asr"],
        device=device,
        dtype=dtype,
        attn_implementation="sdpa",
        max_inference_batch_size=batch,
        max_new_tokens=tokens,
        fast_decode=mode != "stock",
        quantization="int8" if mode == "int8" else "none",
        bf16_weights=bf16_weights,
    )


def decode(params: Params) -> Result:
    """Figures 10 and 11: decode ms/token at batch 1 and encoder+prefill time, for one decode path
    (`stock`, `fast`, `int8`), through the worker's loader on the full-size checkpoint."""

    mode = params["mode"]
    out: Result = {"mode": mode}
    asr = _load_asr(params, mode, tokens=8, batch=8)
    out["decoder_bytes"] = _decoder_bytes(asr.model.thinker)
    clips = {name: fixtures.read_clip(Path(params[name])) for name in ("clip10", "clip30")}

    def timed(name: str, tokens: int) -> float:
        asr.max_new_tokens = tokens
        started = time.perf_counter()
        result = asr.transcribe(audio=[(clips[name], fixtures.SAMPLE_RATE)], language=[fixtures.LANGUAGE])
        elapsed = time.perf_counter() - started
        out.setdefault("texts", {})[f"{name}_{tokens}"] = result[0].text[:60]
        return elapsed

    timed("clip10", 8)
    timed("clip30", 1)
    gc.collect()
    out["rss_after_warmup"] = rss_bytes()
    reps = int(params.get("reps", 3))
    for name in clips:
        out[f"prefill_{name}_s"] = min(timed(name, 1) for _ in range(reps))
    short, extra = 8, int(params.get("extra_tokens", 40))
    # This machine's read bandwidth drifts by half within minutes, so the floor's bandwidth is also read here, in
    # this process, right before and after the decode timing (best of 3 + 2, as the run's own reading: best of 5).
    before = _read_bandwidth(_cuda(params), 3)
    t_short = min(timed("clip10", short) for _ in range(reps))
    t_long = min(timed("clip10", short + extra) for _ in range(reps))
    out["gb_per_s_around_decode"] = max(before, _read_bandwidth(_cuda(params), 2))
    out["ms_per_token"] = (t_long - t_short) / extra * 1000
    asr.max_new_tokens = 64
    _check_text(
        asr.transcribe(audio=[(clips["clip10"], fixtures.SAMPLE_RATE)], language=[fixtures.LANGUAGE])[0].text, out
    )
    return out


def bandwidth(params: Params) -> Result:
    """Read bandwidth: `torch.sum` over a 2 GiB tensor with the worker's thread count, best of 5; with
    `--device cuda`, over a tensor in GPU memory (synchronized), since that is what a GPU decode step reads."""
    cuda = _cuda(params)
    gb_per_s = _read_bandwidth(cuda, 5)
    return {"bytes": 2**31, "best_s": 2**31 / gb_per_s / 1e9, "gb_per_s": gb_per_s, "cuda": cuda}


def _read_bandwidth(cuda: bool, repeats: int) -> float:
    """GB/s of the fastest of `repeats` `torch.sum` passes over a fresh 2 GiB bf16 tensor (freed afterwards)."""
    import torch

    data = torch.ones(2**30, dtype=torch.bfloat16, device="cuda" if cuda else "cpu")
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        data.sum()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    del data
    return 2**31 / best / 1e9


def int8_fidelity(params: Params) -> Result:
    """Figure 12: greedy agreement and logit error of int8 (and of the packed bf16 path) against the stock bf16
    decode, on the scripted full-size checkpoint, teacher-free: each path generates on its own."""
    import torch

    from qwen_asr_worker import cpu_kernels, decode_linears

    out: Result = {}
    clip = fixtures.read_clip(Path(params["clip10"]))

    def run(mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        asr = _load_asr(params, mode, tokens=64)
        prompt = asr._build_text_prompt(context="", force_language=fixtures.LANGUAGE)
        inputs = asr.processor(text=[prompt], audio=[clip], return_tensors="pt", padding=True)
        inputs = inputs.to(asr.model.device).to(asr.model.dtype)
        with torch.inference_mode():
            result = asr.model.generate(**inputs, max_new_tokens=64, output_logits=True)
        generated = result.sequences[0, inputs["input_ids"].shape[1] :]
        return generated, torch.stack([step[0].float() for step in result.logits])

    ref_ids, ref_logits = run("stock")
    # The scripted wiring zeroes most of the decoder (the output projections, most of lm_head), so whole-model
    # agreement is exact by construction. The layers it leaves random say more: each one's output error.
    from torch import nn

    torch.manual_seed(0)
    errors = []
    stock = _load_asr(params, "stock", tokens=8)
    kernel, _ = cpu_kernels.load()  # the int8 kernel the worker uses (None: torch's)
    rounding = []
    for module in stock.model.thinker.model.modules():
        if isinstance(module, nn.Linear) and bool(module.weight.any()):
            x = torch.randn(16, module.in_features, dtype=torch.bfloat16)
            exact = torch.nn.functional.linear(x.float(), module.weight.float())
            for into, got in (
                (errors, decode_linears.Int8Linear(module, kernel)(x)),
                (rounding, torch.nn.functional.linear(x, module.weight)),  # what bf16 itself costs, for scale
            ):
                into.append(float((got.float() - exact).norm() / exact.norm()))
    out["layer_rel_error"] = {"layers": len(errors), "mean": sum(errors) / len(errors), "max": max(errors)}
    out["bf16_layer_rel_error"] = sum(rounding) / len(rounding)
    del stock
    for mode in ("fast", "int8"):
        ids, logits = run(mode)
        n = min(len(ids), len(ref_ids))
        same = (ids[:n] == ref_ids[:n]).float()
        first_diff = int(torch.nonzero(same == 0)[0]) if bool((same == 0).any()) else n
        k = max(1, first_diff)  # compare logits only while both saw the same prefix
        rel = (logits[:k] - ref_logits[:k]).norm(dim=-1) / ref_logits[:k].norm(dim=-1)
        out[mode] = {
            "tokens": n,
            "agreement": float(same.mean()),
            "first_difference": first_diff,
            "logit_rel_error_mean": float(rel.mean()),
            "logit_rel_error_max": float(rel.max()),
        }
    out["int8_modules"] = decode_linears.Int8Linear.__name__
    return out


def concurrent_clients(params: Params) -> Result:
    """Figure 13: 8 clients sending a 10-s clip each at once, worker with the given options; wall time."""
    clips: list[str] = params["clips"]
    out: Result = {"options": params.get("extra_options", [])}
    worker = Worker()
    worker.load(params, *params.get("extra_options", []))
    _check_text(worker.transcribe(clips[0]).text, out)
    audio_s = sum(len(fixtures.read_clip(Path(c))) for c in clips) / fixtures.SAMPLE_RATE
    walls = []
    for _ in range(int(params.get("reps", 1)) + 1):  # the first round warms up the batched shapes
        barrier = threading.Barrier(len(clips))

        def client(i: int, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            worker.transcribe(clips[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(clips))]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        walls.append(time.perf_counter() - started)
    out["walls_s"] = walls[1:]
    out["audio_s"] = audio_s
    worker.close()
    return out


def admission(params: Params) -> Result:
    """Figure 18c: `clients` requests for one long file at once, on a worker whose audio memory budget holds
    `fits` of them with `waiting` more in its queue: how many were served, refused (RESOURCE_EXHAUSTED) or failed
    otherwise, whether the worker still serves, and its peak RSS over idle against the budget."""
    import grpc

    from qwen_asr_worker.options import parse_options
    from qwen_asr_worker.pipeline import request_bytes

    need = request_bytes(parse_options(params.get("extra_options", [])))
    budget_mb = -(-need * int(params["fits"]) // 2**20)
    out: Result = {"budget_bytes": budget_mb * 2**20, "request_bytes": need}
    worker = Worker()
    worker.load(
        params,
        *params.get("extra_options", []),
        f"audio_memory_mb:{budget_mb}",
        f"max_waiting_requests:{params['waiting']}",
    )
    _check_text(worker.transcribe(params["warmup_clip"]).text, out)
    gc.collect()
    out["rss_before"] = rss_bytes()
    codes: list[str] = []
    barrier = threading.Barrier(int(params["clients"]))

    def client() -> None:
        barrier.wait()
        try:
            worker.transcribe(params["clip"])
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)

    threads = [threading.Thread(target=client) for _ in range(int(params["clients"]))]
    with PeakSampler() as sampler, timed_phase(out, "requests"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    out["peak_rss"] = sampler.peak
    out["codes"] = sorted(codes)
    out["alive"] = _check_alive(worker, params["warmup_clip"])
    out["held_after"] = worker.engine.budget.held_bytes
    worker.close()
    return out


def stream_start(params: Params) -> Result:
    """Figure 18e: one long file streamed (`AudioTranscriptionStream`): when its first delta arrives and when its
    final result does, against decoding the same file alone, in the same process, after a warm-up request."""
    import backend_pb2
    from qwen_asr_worker.audio import open_audio

    out: Result = {"clip": params["clip"]}
    worker = Worker()
    worker.load(params, *params.get("extra_options", []))
    _check_text(worker.transcribe(params["warmup_clip"]).text, out)
    started = time.perf_counter()
    first: float | None = None
    deltas = 0
    request = backend_pb2.TranscriptRequest(dst=params["clip"])
    for message in worker.stub.AudioTranscriptionStream(request, timeout=3600):
        if message.delta:
            deltas += 1
            if first is None:
                first = time.perf_counter() - started
        if message.HasField("final_result"):
            out["final_s"] = time.perf_counter() - started
            out["duration_s"] = message.final_result.duration
    out["first_delta_s"] = first
    out["deltas"] = deltas
    worker.close()
    started = time.perf_counter()
    with open_audio(params["clip"]) as samples:
        out["decode_s"] = time.perf_counter() - started
        out["decoded_s"] = len(samples) / 16000
    return out


def _check_alive(worker: Worker, clip: str) -> bool:
    try:
        return bool(worker.transcribe(clip).text)
    except Exception:  # any failure means the worker no longer serves
        return False


def live_lag(params: Params) -> Result:
    """Figure 15: `sessions` live sessions at once, each fed the clip at real-time pace in 0.1-s messages through
    the servicer's own path (inbox and session loop, without the gRPC transport). For every delta: how far the
    finalized text lags behind the audio fed so far. Then CPU seconds per second of audio, live vs the file path
    on the same clip."""
    from qwen_asr_worker.languages import resolve_language
    from qwen_asr_worker.live import AudioInbox, LiveConfig, LiveUpdate, drive
    from qwen_asr_worker.options import LiveSettings

    out: Result = {"sessions": params["sessions"], "clip": params["clip"], "asr": params["asr"]}
    worker = Worker()
    worker.load(params, "vad:on", *params.get("extra_options", []))
    worker.transcribe(params["warmup_clip"])
    samples = fixtures.read_clip(Path(params["clip"]))
    settings = LiveSettings()
    config = LiveConfig(resolve_language(params.get("language", "en")), fixtures.SAMPLE_RATE, settings)
    step = fixtures.SAMPLE_RATE // 10
    lags: list[list[float]] = [[] for _ in range(params["sessions"])]
    texts: list[str] = [""] * params["sessions"]
    counted = ("reused_tokens", "prefilled_tokens", "drafted_tokens", "accepted_tokens")  # PassCache's counters
    reuse = {"encoder_hits": 0, "encoder_misses": 0} | dict.fromkeys(counted, 0)
    tails: list[float] = [0.0] * params["sessions"]  # the final result's time after the last audio was fed

    def feed(inbox: AudioInbox, fed: list[float]) -> None:
        started = time.monotonic()
        for i in range(0, len(samples), step):
            time.sleep(max(0.0, started + i / fixtures.SAMPLE_RATE - time.monotonic()))
            inbox.put(samples[i : i + step])
            fed[0] = min(len(samples), i + step)
        fed[1] = time.monotonic()
        inbox.end()

    def session(k: int) -> None:
        inbox, fed = AudioInbox(), [0, 0.0]
        with worker.engine.live(config) as live:
            threading.Thread(target=feed, args=(inbox, fed), daemon=True).start()
            for event in drive(live, inbox):
                if isinstance(event, LiveUpdate):
                    lags[k].append(fed[0] / fixtures.SAMPLE_RATE - event.final_until)
                else:
                    texts[k] = event.text
                    tails[k] = time.monotonic() - fed[1]
            cached = live.pass_cache
            if cached is not None:  # what the passes did not compute again
                reuse["encoder_hits"] += cached.encoder.hits
                reuse["encoder_misses"] += cached.encoder.misses
                for key in counted:
                    reuse[key] += getattr(cached, key)

    threads = [threading.Thread(target=session, args=(k,)) for k in range(params["sessions"])]
    cpu = _own_cpu_s()
    with timed_phase(out, "live"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    out["live_cpu_s"] = _own_cpu_s() - cpu
    out["lags_s"] = [round(x, 3) for per in lags for x in per]
    out["deltas"] = [len(per) for per in lags]
    out["text_chars"] = [len(t) for t in texts]
    out["texts"] = texts
    out["tails_s"] = [round(x, 3) for x in tails]
    out |= reuse
    out["audio_s"] = len(samples) / fixtures.SAMPLE_RATE
    cpu = _own_cpu_s()
    with timed_phase(out, "file"):
        worker.transcribe(params["clip"])
    out["file_cpu_s"] = _own_cpu_s() - cpu
    worker.close()
    return out


def build(params: Params) -> Result:
    """Build (or find cached) the checkpoints the run needs."""
    out: Result = {}
    for kind in params["kinds"]:
        with timed_phase(out, kind):
            path = fixtures.build_checkpoint(kind)
        out[f"{kind}_bytes"] = fixtures.checkpoint_bytes(path)
    return out


def machine(params: Params) -> Result:
    """Facts for the header line."""
    return fixtures.machine_info()


def diarization(params: Params) -> Result:
    """Figure 17: diarization error rate of the embedded pipeline on the meeting fixture and on it repeated for
    `long_clip`; the diarizer's own time and peak RSS added over the long file; and its share of a transcription
    with word timestamps of `share_clip` (full model, real-speech token density), after a warm-up request."""
    import backend_pb2
    from qwen_asr_worker.audio import load_audio
    from qwen_asr_worker.diarization import DiarizeSettings
    from qwen_asr_worker.speakers import Turn, score

    out: Result = {"asr": params["asr"]}
    worker = Worker()
    worker.load(params, "vad:on", "diarization:on", *params.get("extra_options", []))
    worker.transcribe(params["fixture"], words=True, diarize=True)  # loads the aligner and the diarizer
    reference = [Turn(a, b, s) for a, b, s in params["fixture_turns"]]
    reply = worker.stub.Diarize(backend_pb2.DiarizeRequest(dst=params["fixture"]), timeout=600)
    found = [Turn(seg.start, seg.end, seg.speaker) for seg in reply.segments]
    for collar in (0.0, 0.25):
        result = score(reference, found, collar=collar)
        key = f"fixture_{int(collar * 1000)}"
        out[key] = {"der": result.der, "missed": result.missed, "false_alarm": result.false_alarm}
        out[key] |= {"confusion": result.confusion, "total": result.total}
    out["fixture_speakers"] = reply.num_speakers
    model = worker.engine.current
    diarizer = model.acquire_diarizer()
    try:
        samples = load_audio(params["long_clip"])
        gc.collect()
        out["rss_before"] = rss_bytes()
        with PeakSampler() as sampler, timed_phase(out, "diarize_long"):
            turns = diarizer(samples, DiarizeSettings())
        out["peak_rss"] = sampler.peak
        out["long_audio_s"] = len(samples) / 16000
        result = score([Turn(a, b, s) for a, b, s in params["long_turns"]], turns)
        out["long"] = {"der": result.der, "confusion": result.confusion, "total": result.total}
        out["long_speakers"] = len({t.speaker for t in turns})
        share = load_audio(params["share_clip"])
        with timed_phase(out, "diarize_share"):
            diarizer(share, DiarizeSettings())
    finally:
        model.release_diarizer()
    out["share_audio_s"] = len(share) / 16000
    with timed_phase(out, "transcribe_share"):
        worker.transcribe(params["share_clip"], words=True)
    worker.close()
    return out


SCENARIOS: dict[str, Callable[[Params], Result]] = {
    "diarization": diarization,
    "plain": plain,
    "first_timestamps": first_timestamps,
    "serving": serving,
    "idle_and_free": idle_and_free,
    "long_audio": long_audio,
    "stream_start": stream_start,
    "voice_activity": voice_activity,
    "decode": decode,
    "bandwidth": bandwidth,
    "int8_fidelity": int8_fidelity,
    "concurrent_clients": concurrent_clients,
    "live_lag": live_lag,
    "admission": admission,
    "build": build,
    "machine": machine,
}


def main(argv: list[str]) -> None:
    """Run one scenario and print its result; exits without tearing down (threads, mapped models)."""
    name, params = argv[1], json.loads(argv[2])
    if name not in ("build", "machine"):
        _setup(params)
    started = time.perf_counter()
    result = SCENARIOS[name](params)
    result["scenario_wall_s"] = time.perf_counter() - started
    result["ru_maxrss"] = fixtures.max_rss_bytes()
    fixtures.emit(result)
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
