"""What every benchmark scenario shares: cached checkpoints, generated audio, machine facts and memory probes.

Why this module: the scenarios run in separate processes (resident memory must start clean), so the things they
agree on (which checkpoint, which clip, how memory is read) live here, importable without loading a model.

Checkpoints are full-size random-weight Qwen3-ASR-0.6B and Qwen3-ForcedAligner-0.6B, stored in bfloat16 like
the published ones and cached under `.cache/bench/`. The ASR decoder is hand-wired (`AsrDims.deterministic`) so
that it says a known ~30-word English sentence: a plain random model emits ids outside the small tokenizer,
decodes to "" and the aligner would then be skipped (nothing to align). The wiring needs untied embeddings,
so our 0.6B carries a separate `lm_head` (151936 x 1024, +311 MB in bf16) that the published, tied checkpoint
does not; compute is the same (a tied model still multiplies by the embedding matrix).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
RESULTS = ROOT / "bench" / "results"
SAMPLE_RATE = 16000
RESULT_MARKER = "BENCH_RESULT "

# ~30 distinct words: a 10-s clip's worth of speech; every piece must be a distinct token (see the builder).
SENTENCE = (
    "Early this morning a quiet train carried seven curious students across the northern valley toward an old "
    "stone library where ancient maps revealed forgotten rivers and hidden mountain roads."
)
LANGUAGE = "English"
# Figure 15's checkpoint says this longer text (105 tokens, each word once): every live pass's budget (2.7 tokens
# per second of an utterance of up to 30 s) ends inside it, so each pass's answer is text that grows with the
# audio, as real speech's does. After `SENTENCE`'s 29 words a pass would decode `<|im_end|>` to its budget,
# text that is never finalized, which real speech (a model that stops at the end of what it heard) never costs.
LIVE_SENTENCE = (
    "Early this morning a quiet train carried seven curious students across the northern valley toward an old "
    "stone library where ancient maps revealed forgotten rivers and hidden mountain roads. Their teacher "
    "Margaret kept careful notes about every village they passed: orchards heavy with apples, bakeries "
    "smelling of cinnamon, fishermen mending nets beside harbors, children chasing dogs through muddy "
    "fields. Later that afternoon thunder rolled over distant hills; rain soaked wooden bridges while "
    "travelers huddled under canvas umbrellas, laughing, singing folk songs, trading tales concerning pirates, "
    "comets, dragons, lighthouses, volcanoes, glaciers, deserts, jungles, castles, markets plus festivals. By "
    "evening everyone reached home tired yet happy, dreaming until sunrise."
)

CHECKPOINTS = ("asr", "aligner", "asr_reduced", "asr_live")


def _dims(kind: str) -> Any:
    """The architecture of a cached checkpoint kind (imports the builder lazily: it pulls in torch)."""
    from qwen_asr_worker.testing import checkpoints as ck

    full = dataclasses.replace(ck.QWEN3_ASR_0_6B, deterministic=True, tie_word_embeddings=False)
    if kind in ("asr", "asr_live"):
        return full
    if kind == "asr_reduced":
        # Full widths (same per-layer activation memory), 4 encoder and 4 decoder layers (about 5x less compute).
        return dataclasses.replace(full, encoder_layers=4, layers=4)
    if kind == "aligner":
        return ck.QWEN3_FORCED_ALIGNER_0_6B
    raise ValueError(f"unknown checkpoint kind {kind!r}")


def checkpoint_path(kind: str) -> Path:
    """Where a checkpoint kind is cached."""
    return CACHE / "checkpoints" / kind


def build_checkpoint(kind: str) -> Path:
    """Build (or find cached) one checkpoint kind in bfloat16; idempotent."""
    import torch

    from qwen_asr_worker.testing.checkpoints import build_aligner_checkpoint, build_asr_checkpoint

    path = checkpoint_path(kind)
    if kind == "aligner":
        return build_aligner_checkpoint(path, dims=_dims(kind), dtype=torch.bfloat16)
    sentence = LIVE_SENTENCE if kind == "asr_live" else SENTENCE
    return build_asr_checkpoint(path, sentence=sentence, language=LANGUAGE, dims=_dims(kind), dtype=torch.bfloat16)


def checkpoint_bytes(path: Path) -> int:
    """Size of a checkpoint's safetensors files on disk."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


# --- audio --------------------------------------------------------------------------------------------------
def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Speech-like noise: syllable bursts (80-300 ms) grouped into words and phrases, with pauses between phrases.

    Band-limited noise with a 4-8 Hz syllabic envelope and 0.2-1.0 s pauses every few seconds, so that the
    window planner finds quiet cut points in long files, as it would in real speech.
    """
    rng = np.random.default_rng(seed)
    total = int(seconds * SAMPLE_RATE)
    envelope = np.zeros(total, dtype=np.float32)
    pos = int(rng.uniform(0.05, 0.3) * SAMPLE_RATE)
    phrase_left = rng.uniform(1.5, 4.0)
    while pos < total:
        length = int(rng.uniform(0.08, 0.3) * SAMPLE_RATE)
        end = min(total, pos + length)
        ramp = np.sin(np.linspace(0.0, np.pi, end - pos, dtype=np.float32))
        envelope[pos:end] = ramp * rng.uniform(0.3, 1.0)
        pos = end + int(rng.uniform(0.01, 0.08) * SAMPLE_RATE)
        phrase_left -= length / SAMPLE_RATE
        if phrase_left <= 0:
            pos += int(rng.uniform(0.2, 1.0) * SAMPLE_RATE)
            phrase_left = rng.uniform(1.5, 4.0)
    noise = rng.standard_normal(total).astype(np.float32)
    # A cheap low-pass (moving average over 4 samples) to take the hiss off.
    noise = np.convolve(noise, np.full(4, 0.25, dtype=np.float32), mode="same")
    out = 0.3 * envelope * noise + 1e-4 * rng.standard_normal(total).astype(np.float32)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


SPEECH_FIXTURES = ROOT / "tests" / "fixtures" / "speech"


def utterances() -> list[np.ndarray]:
    """The clean espeak-ng utterances of the committed speech fixtures (tests/fixtures/speech, cut at the places
    its layout.json names), each levelled to -20 dBFS RMS."""
    from qwen_asr_worker.audio import load_audio

    layout = json.loads((SPEECH_FIXTURES / "layout.json").read_text(encoding="utf-8"))
    pieces = []
    for name in ("gap.opus", "late.opus", "quiet.opus"):
        samples = load_audio(str(SPEECH_FIXTURES / name))
        for start, end in layout[name]["speech"]:
            piece = samples[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)]
            pieces.append((piece / np.sqrt(np.mean(piece**2)) * 0.1).astype(np.float32))
    return pieces


def real_speech(seconds: float, seed: int, *, talk: float = 0.0, pause: float = 0.0) -> np.ndarray:
    """Real speech: the fixture utterances in random order with 0.2-1.2 s between them (a talker's pauses).

    With `talk` and `pause`, `talk` seconds of that alternate with `pause` seconds of near-silence (-80 dBFS
    noise, a quiet room), starting with talk. A 1e-4 noise floor lies under everything."""
    rng = np.random.default_rng(seed)
    pieces = utterances()
    total = int(seconds * SAMPLE_RATE)
    out = (1e-4 * rng.standard_normal(total)).astype(np.float32)
    pos, block_end = 0, int(talk * SAMPLE_RATE) if talk else total
    while pos < total:
        piece = pieces[int(rng.integers(len(pieces)))]
        if pos + len(piece) > block_end:  # this talk block is full: skip the pause, start the next block
            if block_end >= total:
                break
            pos = block_end + int(pause * SAMPLE_RATE)
            block_end = pos + int(talk * SAMPLE_RATE)
            continue
        end = min(total, pos + len(piece))
        out[pos:end] += piece[: end - pos]
        pos = end + int(rng.uniform(0.2, 1.2) * SAMPLE_RATE)
    return out


def meeting(seconds: float) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """The committed four-voice meeting fixture (tests/fixtures/speech/meeting.opus) repeated to `seconds` (whole
    copies, the last one cut), over a -80 dBFS noise floor, with its reference turns `(start, end, speaker)`."""
    from qwen_asr_worker.audio import load_audio

    layout = json.loads((SPEECH_FIXTURES / "layout.json").read_text(encoding="utf-8"))["meeting.opus"]
    one = load_audio(str(SPEECH_FIXTURES / "meeting.opus"))
    total = int(seconds * SAMPLE_RATE)
    copies = -(-total // len(one))
    out = np.tile(one, copies)[:total] + (1e-4 * np.random.default_rng(0).standard_normal(total)).astype(np.float32)
    length = len(one) / SAMPLE_RATE
    turns = [
        (start + k * length, min(end + k * length, seconds), speaker)
        for k in range(copies)
        for start, end, speaker in layout["turns"]
        if start + k * length < seconds
    ]
    return out.astype(np.float32), turns


def quiet_room(seconds: float, seed: int) -> np.ndarray:
    """No speech: a -80 dBFS noise floor, as a quiet room records."""
    return (1e-4 * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def pink_noise(seconds: float, seed: int, rms: float = 0.02) -> np.ndarray:
    """Steady pink noise (a fan, a busy room) at the given RMS."""
    n = int(seconds * SAMPLE_RATE)
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))
    spectrum[0] = 0
    noise = np.fft.irfft(spectrum, n)
    return (noise / np.sqrt(np.mean(noise**2)) * rms).astype(np.float32)


def make_audio(name: str, samples_fn: Any) -> Path:
    """Write (once) the 16 kHz 16-bit mono WAV `samples_fn()` returns, cached by `name`."""
    import soundfile as sf

    path = clip_path(name)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.wav")
    sf.write(str(tmp), np.clip(samples_fn(), -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
    tmp.replace(path)
    return path


def make_recording(name: str, seconds: float, talk: float, pause: float, seed: int) -> Path:
    """Write (once) a long 44.1-kHz stereo FLAC, as a recorder makes, ten minutes at a time (memory stays
    bounded): real speech in `talk`-second stretches between `pause` seconds of a quiet room (`pause` 0: all
    speech). Cached by `name`."""
    import soundfile as sf
    import soxr

    path = CACHE / "audio" / f"{name}.flac"
    if path.exists() and sf.info(str(path)).duration >= seconds - 1.0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.flac")
    block = 600.0
    rate = 44100
    resampler = soxr.ResampleStream(SAMPLE_RATE, rate, 1, dtype="float32")
    with sf.SoundFile(str(tmp), "w", samplerate=rate, channels=2, subtype="PCM_16", format="FLAC") as out:
        done, part = 0.0, 0
        while done < seconds:
            n = min(block, seconds - done)
            mono = real_speech(n, seed * 1000 + part, talk=talk, pause=pause) if pause else real_speech(n, seed + part)
            wide = resampler.resample_chunk(np.clip(mono, -1.0, 1.0), last=done + n >= seconds)
            out.write(np.stack([wide, wide * 0.9], axis=1))
            done += n
            part += 1
    tmp.replace(path)
    return path


def clip_path(name: str) -> Path:
    """Where a generated clip is cached."""
    return CACHE / "audio" / f"{name}.wav"


def make_clip(name: str, seconds: float, seed: int) -> Path:
    """Write (once) a 16 kHz 16-bit mono WAV of `seconds` of speech-like noise and return its path."""
    import soundfile as sf

    path = clip_path(name)
    if path.exists() and sf.info(str(path)).frames == int(seconds * SAMPLE_RATE):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.wav")
    block = 600.0  # generate long files ten minutes at a time to bound memory
    with sf.SoundFile(str(tmp), "w", samplerate=SAMPLE_RATE, channels=1, subtype="PCM_16") as out:
        done = 0.0
        part = 0
        while done < seconds:
            n = min(block, seconds - done)
            out.write(speech_like(n, seed * 1000 + part))
            done += n
            part += 1
    tmp.replace(path)
    return path


def read_clip(path: Path) -> np.ndarray:
    """A clip as float32 samples (the bench's own reader, independent of the worker's)."""
    import soundfile as sf

    samples, rate = sf.read(str(path), dtype="float32")
    assert rate == SAMPLE_RATE
    return samples


# --- machine ------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def total_ram_bytes() -> int:
    """Physical memory of the machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


EMULATED_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "QWEN_ASR_KERNEL_MARCH": "haswell"}


def cpu_class(flags: set[str]) -> str:
    """The CPU's class as the decode path sees it, e.g. `AVX-512 BF16`, `AVX2+FMA`; an emulated AVX2 run (oneDNN
    and ATen capped at AVX2, our kernels built for Haswell: `--emulate-avx2`) says so and what the hardware is."""
    if {"avx512_bf16", "amx_bf16"} & flags:
        hardware = "AVX-512 BF16"
    elif {"avx512bw", "avx512vl", "avx512dq"} <= flags:
        hardware = "AVX-512"
    elif {"avx2", "fma"} <= flags:
        hardware = "AVX2+FMA"
    else:
        hardware = "no AVX2"
    if all(os.environ.get(key) == value for key, value in EMULATED_AVX2.items()):
        return f"AVX2+FMA, emulated on {hardware} hardware (oneDNN and ATen capped at AVX2, our kernels for Haswell)"
    return hardware


def machine_info() -> dict[str, Any]:
    """Facts for the report's header line (imports torch)."""
    import torch

    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": cores(),
        "ram_gib": round(total_ram_bytes() / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        "cpu_class": cpu_class(flags),
        "cuda_available": torch.cuda.is_available(),
    }
    from qwen_asr_worker import models

    info["auto_bf16_weights"] = models.pick_precision("auto", "cpu", True)[1]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
        info["qwen_asr"] = _dist_version("qwen-asr")
    except ImportError:
        pass
    return info


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


# --- memory -------------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (cheap enough to sample every 20 ms)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_detail() -> dict[str, int]:
    """RSS split into anonymous and file-backed (memory-mapped weights) pages, in bytes."""
    out: dict[str, int] = {"rss": rss_bytes()}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                out[key.lower()] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def max_rss_bytes() -> int:
    """The process's lifetime high-water mark of RSS (`ru_maxrss`, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakSampler:
    """Samples this process's RSS every `interval` seconds in a background thread; `peak` is the maximum seen.

    Use as a context manager around one phase; `ru_maxrss` cannot give per-phase peaks within one process.
    The sampler also reads RSS on entry and exit, so phases shorter than the interval are still covered.
    """

    def __init__(self, interval: float = 0.02, timeline_step: float = 0.0) -> None:
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.timeline: list[tuple[float, int]] = []  # (seconds since entry, peak RSS in that step)
        self._step = timeline_step
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        bucket_end, bucket_peak = self._start + self._step, 0
        while not self._stop.is_set():
            rss = rss_bytes()
            self.peak = max(self.peak, rss)
            self.samples += 1
            if self._step:
                bucket_peak = max(bucket_peak, rss)
                now = time.perf_counter()
                if now >= bucket_end:
                    self.timeline.append((round(now - self._start, 2), bucket_peak))
                    bucket_end, bucket_peak = now + self._step, 0
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._start = time.perf_counter()
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class Stopwatch:
    """`with Stopwatch() as t: ...` then `t.seconds`."""

    def __enter__(self) -> Stopwatch:
        self.seconds = 0.0
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


# --- subprocess protocol ------------------------------------------------------------------------------------
def emit(result: dict[str, Any]) -> None:
    """Print a scenario's result as the one marked JSON line `bench.run` looks for."""
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_scenario(
    name: str, params: dict[str, Any], *, log_path: Path, timeout: float, omp_wait_policy: str = ""
) -> dict[str, Any]:
    """Run `python -m bench.scenarios NAME PARAMS` in a fresh process and return its JSON result.

    `omp_wait_policy` (e.g. PASSIVE) is exported as `OMP_WAIT_POLICY` to the child when given.
    The child's stderr (and stdout other than the result) goes to `log_path`. Raises `RuntimeError` with the
    log's tail when the child fails or prints no result.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bench.scenarios", name, json.dumps(params)]
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"scenario {name} timed out after {timeout:.0f} s (log: {log_path})") from exc
        result = None
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_MARKER):
                result = json.loads(line[len(RESULT_MARKER) :])
            else:
                log.write(line + "\n")
    if proc.returncode != 0 or result is None:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"scenario {name} failed (exit {proc.returncode}); log {log_path}:\n" + "\n".join(tail))
    return result
