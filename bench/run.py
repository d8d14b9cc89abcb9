"""Run the worker's benchmark and write the table: `python -m bench.run [--quick] [--device cuda] [--only N,...]`.

Why: the worker's design (aligner attached in place on first use, request batching, windowed long audio, idle
unload) is justified by memory and speed claims; this turns each claim into a measured ratio against the
alternative it replaced, on full-size random-weight checkpoints built locally (see `bench.fixtures`). Every
number in the table comes from a scenario process run by this invocation (`bench.scenarios`); nothing is
estimated. Results: `bench/results/latest.md` (the table) and `bench/results/latest.json` (raw results).

Every scenario decodes like real speech (issue 11): the scripted checkpoint never stops on its own, so a 10-s clip
generates `CLIP_TOKENS` and longer audio `max_tokens_per_second` (2.7) per second of window.

Quick mode (`--quick`, `make bench-quick`) takes fewer repetitions, bf16 only for
figures 2, 3 and 6, and for the long-audio and voice-activity figures a reduced-depth model (full widths, 4+4
layers) on 20 min vs 6 min and on 6 and 3 min files; full mode runs the real thing (full model, 60 min vs 6 min,
both dtypes; 20 and 10 min files for voice activity).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import fixtures
from qwen_asr_worker.options import PROMPT_TOKENS

GIB = 2**30
DEFAULT_MAX_BATCH_SECONDS = 360  # the worker's default (options.py), marked in figure 14
VAD_TOKENS_PER_SECOND = 2.7  # what real speech decodes to (issue 11); figure 9's windows generate that many
# What `max_tokens_per_second:2.7` lets a 10-s clip generate: figures 1-6 and 8 (10-s clips, where the library
# alternatives take only a token count) generate exactly this many, so every figure decodes at one density.
CLIP_TOKENS = PROMPT_TOKENS + math.ceil(VAD_TOKENS_PER_SECOND * 10)


@dataclass(frozen=True)
class Config:
    """What one run measures and how hard it tries."""

    quick: bool
    device: str
    threads: int
    max_new_tokens: int
    timed_requests: int
    overhead_reps: int
    throughput_reps: int
    batch_warmup: bool
    ts_dtypes: tuple[str, ...]
    idle_dtypes: tuple[str, ...]
    long_model: str
    long_minutes: float
    short_minutes: float
    quiet_wait_s: float
    omp_wait_policy: str
    worker_options: tuple[str, ...]
    vad_model: str = "asr"
    vad_minutes: float = 20.0
    vad_quiet_minutes: float = 10.0
    # Figure 18: (hours, mostly speech?) of the recordings measured. Mostly quiet is 10 s of speech a minute, so
    # that every length fills the batcher's batches alike and only the length differs.
    recordings: tuple[tuple[float, bool], ...] = (
        (1 / 6, False),
        (2.0, False),
        (10.0, False),
        (1 / 6, True),
        (2.0, True),
    )
    only: frozenset[int] = field(default_factory=frozenset)

    def wants(self, figure: int) -> bool:
        """Whether this run measures `figure` (all unless `--only`)."""
        return not self.only or figure in self.only


def make_config(args: argparse.Namespace) -> Config:
    """Quick or full settings from the command line."""
    threads = args.threads or fixtures.cores()
    only = frozenset(int(x) for x in args.only.split(",")) if args.only else frozenset()
    if not only <= set(range(1, 19)):
        raise SystemExit(f"--only takes figure numbers 1-18, got {args.only!r}")
    omp = "" if args.omp_wait_policy.lower() == "default" else args.omp_wait_policy.upper()
    # What differs between the modes; everything else comes from the command line.
    mode: dict[str, Any] = (
        dict(
            max_new_tokens=CLIP_TOKENS,
            timed_requests=1,
            overhead_reps=2,
            throughput_reps=1,
            batch_warmup=False,
            ts_dtypes=("bf16",),
            idle_dtypes=("bf16",),
            long_model="asr_reduced",
            long_minutes=20.0,
            vad_model="asr_reduced",
            vad_minutes=6.0,
            vad_quiet_minutes=3.0,
        )
        if args.quick
        else dict(
            max_new_tokens=CLIP_TOKENS,
            timed_requests=3,
            overhead_reps=6,
            throughput_reps=2,
            batch_warmup=True,
            ts_dtypes=("bf16", "fp32"),
            idle_dtypes=("bf16", "fp32"),
            long_model="asr",
            long_minutes=60.0,
            recordings=((1 / 6, False), (2.0, False), (10.0, False), (1 / 6, True), (2.0, True), (10.0, True)),
        )
    )
    mode["max_new_tokens"] = args.max_new_tokens or mode["max_new_tokens"]
    return Config(
        quick=args.quick,
        device=args.device,
        threads=threads,
        short_minutes=6.0,  # its windows fill one batch of the default max_batch_seconds 360, as the long file's do
        quiet_wait_s=args.quiet_wait,
        omp_wait_policy=omp,
        worker_options=tuple(args.worker_option),
        only=only,
        **mode,
    )


# --- running scenarios --------------------------------------------------------------------------------------
def other_load(seconds: float = 1.0) -> float:
    """How many cores other processes kept busy over `seconds` (this process sleeps meanwhile)."""

    def busy() -> float:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
        return sum(values[:8]) - values[3] - values[4]

    import os

    start = busy()
    time.sleep(seconds)
    return (busy() - start) / os.sysconf("SC_CLK_TCK") / seconds


class Runner:
    """Runs scenarios one at a time (never two models' processes at once) and keeps their results."""

    def __init__(self, config: Config, logs: Path) -> None:
        self.config = config
        self.logs = logs
        self.results: dict[str, Any] = {}
        self.count = 0

    def run(self, key: str, scenario: str, params: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
        """Run one scenario in a fresh process, remember its result under `key` and return it."""
        self.count += 1
        load = self.quiet()
        base = {
            "threads": self.config.threads,
            "device": self.config.device,
            "worker_options": list(self.config.worker_options),
        }
        started = time.perf_counter()
        print(f"[{self.count:2d}] {key} ...", end="", flush=True, file=sys.stderr)
        result = fixtures.run_scenario(
            scenario,
            {**base, **params},
            log_path=self.logs / f"{key}.log",
            timeout=timeout,
            omp_wait_policy=self.config.omp_wait_policy,
        )
        result["other_load_before"] = load
        elapsed = time.perf_counter() - started
        print(f" {elapsed:.0f} s", file=sys.stderr, flush=True)
        self.results[key] = result
        return result

    def quiet(self) -> float:
        """Wait (up to `quiet_wait_s`) for other processes to leave the CPU mostly idle; returns their load."""
        deadline = time.monotonic() + self.config.quiet_wait_s
        load = other_load(0.5)
        while load > 0.25 and time.monotonic() < deadline:
            load = other_load(1.0)
        return round(load, 2)


# --- the table ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the table."""

    figure: str
    ours: str
    alternative: str
    ratio: float | None
    goal: str
    met: bool | None
    notes: str = ""


def gib(value: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{value / GIB:.2f} GiB"


def secs(value: float) -> str:
    """Seconds, three significant figures."""
    return f"{value:.3g} s"


def median(values: Iterable[float]) -> float:
    """The median of a non-empty sequence."""
    return statistics.median(list(values))


def _join(*parts: str) -> str:
    return "; ".join(part for part in parts if part)


def _span_total(spans: dict[str, list[list[float]]], key: str) -> float:
    return sum(end - start for start, end in spans.get(key, []))


def _span_overlap(spans: dict[str, list[list[float]]], a: str, b: str) -> float:
    """Seconds during which a span of `a` and a span of `b` both ran."""
    return sum(
        max(0.0, min(end_a, end_b) - max(start_a, start_b))
        for start_a, end_a in spans.get(a, [])
        for start_b, end_b in spans.get(b, [])
    )


def _met(ratio: float, limit: float, *, at_most: bool = True) -> bool:
    return ratio <= limit if at_most else ratio >= limit


def _contention(*loads: float) -> str:
    busy = [x for x in loads if x >= 0.05]
    return f"other processes ~{max(busy):.2f} cores" if busy else ""


def _cpu_share(other_cpu_s: float, wall_s: float) -> float:
    return other_cpu_s / wall_s if wall_s > 0 else 0.0


def rows_for(results: dict[str, Any], config: Config) -> list[Row]:
    """Turn the scenario results into table rows (only for figures that ran)."""
    rows: list[Row] = []
    for builder in (
        _fig1,
        _fig2_3,
        _fig4,
        _fig5,
        _fig6,
        _fig7,
        _fig8,
        _fig9,
        _fig10_11,
        _fig12,
        _fig13,
        _fig14,
        _fig15,
        _fig16,
        _fig17,
        _fig18,
    ):
        try:
            rows.extend(builder(results, config))
        except (KeyError, TypeError, ValueError, ZeroDivisionError, statistics.StatisticsError) as exc:
            name = builder.__name__.removeprefix("_")
            rows.append(Row(f"{name}: could not tabulate", "-", "-", None, "-", None, f"{type(exc).__name__}: {exc}"))
    return rows


def _fig1(r: dict[str, Any], c: Config) -> list[Row]:
    rows = []
    for dtype in ("bf16", "fp32"):
        ours, eager, base = (r.get(f"plain_{side}_{dtype}") for side in ("ours", "eager", "base"))
        if not (ours and eager and base):
            continue
        o, e, b = (x["rss_after_warmup"]["rss"] for x in (ours, eager, base))
        ok = all(x.get("text_ok") for x in (ours, eager, base))
        note = "" if ok else "transcript mismatch!"
        rows.append(Row(f"1. RSS after warm-up plain request, {dtype}: vs eager", gib(o), gib(e), o / e, "-", None))
        rows.append(
            Row(
                f"1. RSS after warm-up plain request, {dtype}: vs base alone",
                gib(o),
                gib(b),
                o / b,
                "≤ 1.05",
                _met(o / b, 1.05),
                note or f"eager/base = {e / b:.2f}",
            )
        )
        if c.device.startswith("cuda") and "gpu_allocated" in ours:
            go, ge, gb = (x["gpu_allocated"] for x in (ours, eager, base))
            label = f"1. GPU allocated after warm-up, {dtype}: vs base alone"
            rows.append(Row(label, gib(go), gib(gb), go / gb, "≤ 1.05", _met(go / gb, 1.05), f"eager {gib(ge)}"))
    return rows


def _fig2_3(r: dict[str, Any], c: Config) -> list[Row]:
    rows = []
    for dtype in ("bf16", "fp32"):
        ours, reload = r.get(f"first_ts_ours_{dtype}"), r.get(f"first_ts_reload_{dtype}")
        if not (ours and reload):
            continue
        po, pr = ours["peak_rss"], reload["peak_rss"]
        rows.append(
            Row(
                f"2. Peak RSS across first timestamp request, {dtype}: attach vs reload",
                gib(po),
                gib(pr),
                po / pr,
                "≤ 0.75",
                _met(po / pr, 0.75),
                f"before: ours {gib(ours['rss_before']['rss'])}, reload {gib(reload['rss_before']['rss'])}",
            )
        )
        lo, lr = ours["first_ts_s"], reload["first_ts_s"]
        load = _contention(_cpu_share(ours["first_ts_other_cpu_s"], lo), _cpu_share(reload["first_ts_other_cpu_s"], lr))
        words = f"words: ours {ours['words']}, reload {reload['words']}"
        spans = ours.get("phases", {})
        if spans.get("asr") and spans.get("align"):
            asr, attach, align = (_span_total(spans, key) for key in ("asr", "aligner_load", "align"))
            overlap = _span_overlap(spans, "asr", "aligner_load")
            words += (
                f"; ours: ASR {asr:.2f} s, aligner load {attach:.2f} s ({overlap:.2f} s of it during the ASR), "
                f"align {align:.2f} s; reload: load {reload['reload_load_s']:.2f} s + transcribe "
                f"{reload['reload_transcribe_s']:.2f} s"
            )
        rows.append(
            Row(
                f"3. Latency of first timestamp request, {dtype}: attach vs reload",
                secs(lo),
                secs(lr),
                lo / lr,
                "≤ 0.75",
                _met(lo / lr, 0.75),
                _join(words, load),
            )
        )
        if c.device.startswith("cuda") and "gpu_peak" in ours:
            go, gr = ours["gpu_peak"], reload["gpu_peak"]
            label = f"2. GPU peak across first timestamp request, {dtype}"
            rows.append(Row(label, gib(go), gib(gr), go / gr, "≤ 0.75", _met(go / gr, 0.75)))
    return rows


def _fig4(r: dict[str, Any], c: Config) -> list[Row]:
    s = r.get("serving")
    if not s:
        return []
    o = s["overhead"]
    mo, ml = median(o["ours_s"]), median(o["library_s"])
    ratio = mo / ml
    model = median(o["ours_model_call_s"]) if o["ours_model_call_s"] else float("nan")
    walls = sum(o["ours_s"]) + sum(o["library_s"])
    note = f"n={len(o['ours_s'])} each, ABBA; worker's model call {secs(model)} of {secs(mo)}"
    load = _contention(_cpu_share(sum(o["other_cpu_s"]), walls))
    return [
        Row(
            "4. Per-request time: worker (gRPC) vs `transcribe` direct, 10-s clip",
            secs(mo),
            secs(ml),
            ratio,
            "≤ 1.03 (overhead ≤ 3 %)",
            _met(ratio, 1.03),
            _join(f"overhead {100 * (ratio - 1):+.1f} %", note, load),
        )
    ]


def _fig5(r: dict[str, Any], c: Config) -> list[Row]:
    s = r.get("serving")
    if not s:
        return []
    runs = s["throughput"]
    audio = s["throughput_audio_s"]
    conc = median(x["wall_s"] for x in runs["concurrent"])
    lib = median(x["wall_s"] for x in runs["library_batch"])
    ser = median(x["wall_s"] for x in runs["serial"])
    batches = [[size for size, _ in x["batches"]] for x in runs["concurrent"]]
    times = [[round(sec, 1) for _, sec in x["batches"]] for x in runs["concurrent"]]
    load = _contention(
        *(_cpu_share(x["wall_other_cpu_s"], x["wall_s"]) for key in runs for x in runs[key]),
    )
    spread = [round(x.get("arrival_spread_ms", 0.0)) for x in runs["concurrent"]]
    note = f"batches formed {batches} taking {times} s; the 8 windows reached the batcher within {spread} ms"
    return [
        Row(
            "5a. Throughput, 8 concurrent gRPC clients vs one batched `transcribe` of the 8 clips",
            f"{audio / conc:.2f}× realtime",
            f"{audio / lib:.2f}× realtime",
            lib / conc,
            "≥ 0.9",
            _met(lib / conc, 0.9, at_most=False),
            _join(note, load),
        ),
        Row(
            "5b. Throughput, 8 concurrent clients vs the same 8 clips serially through the worker",
            f"{audio / conc:.2f}× realtime",
            f"{audio / ser:.2f}× realtime",
            ser / conc,
            "≥ 1.5",
            _met(ser / conc, 1.5, at_most=False),
            f"serial batches {[[size for size, _ in x['batches']] for x in runs['serial']]}",
        ),
    ]


def _fig6(r: dict[str, Any], c: Config) -> list[Row]:
    rows = []
    for dtype in ("bf16", "fp32"):
        s = r.get(f"idle_{dtype}")
        if not s:
            continue
        idle, base = s["rss_after_idle"], s["rss_base_warm"]
        rows.append(
            Row(
                f"6a. RSS after `aligner_idle_unload:{s['idle_s']:g}` fired, {dtype}: vs base only (warm)",
                gib(idle),
                gib(base),
                idle / base,
                "≤ 1.1",
                _met(idle / base, 1.1) and s["unloaded"],
                f"with aligner {gib(s['rss_with_aligner'])}; unloaded after {s['unloaded_after_s']:.1f} s; "
                f"after another plain request {gib(s['rss_after_idle_plain'])}",
            )
        )
        free, before = s["rss_after_free"], s["rss_before_load"]
        rows.append(
            Row(
                f"6b. RSS after `Free`, {dtype}: vs before LoadModel",
                gib(free),
                gib(before),
                free / before,
                "≤ 1.1",
                _met(free / before, 1.1),
                _join(
                    f"before = server up, qwen_asr imported (before that import: {gib(s['rss_before_imports'])})",
                    f"after a 2nd load/request/Free cycle: {gib(s['rss_after_free_2'])}"
                    if "rss_after_free_2" in s
                    else "",
                ),
            )
        )
        if "rss_before_load_detail" in s:
            anon_free, anon_before = s["rss_after_free_detail"]["rssanon"], s["rss_before_load_detail"]["rssanon"]
            rows.append(
                Row(
                    f"6c. Anonymous RSS after `Free`, {dtype}: vs before LoadModel",
                    gib(anon_free),
                    gib(anon_before),
                    anon_free / anon_before,
                    "≤ 1.1",
                    _met(anon_free / anon_before, 1.1),
                    "the memory the process holds itself; the rest of 6b is file-backed: library code pages "
                    f"the first requests touched ({gib(s['rss_before_load_detail']['rssfile'])} before, "
                    f"{gib(s['rss_after_free_detail']['rssfile'])} after), shared with the page cache",
                )
            )
    return rows


def _fig7(r: dict[str, Any], c: Config) -> list[Row]:
    long, short = r.get("long_long"), r.get("long_short")
    if not (long and short):
        return []
    pl, ps = long["peak_rss"], short["peak_rss"]
    model = "full 0.6B" if c.long_model == "asr" else "reduced-depth 0.6B (full widths, 4+4 layers)"
    rows = [
        Row(
            f"7. Peak RSS, {c.long_minutes:g}-min file vs {c.short_minutes:g}-min file ({model})",
            gib(pl),
            gib(ps),
            pl / ps,
            "≤ 1.2",
            _met(pl / ps, 1.2),
            f"windows {long['windows']} vs {short['windows']}; took {secs(long['request_s'])} vs "
            f"{secs(short['request_s'])}; RSS before {gib(long['rss_before'])} vs {gib(short['rss_before'])}",
        )
    ]
    if c.device.startswith("cuda") and "gpu_peak" in long:
        gl, gs = long["gpu_peak"], short["gpu_peak"]
        rows.append(Row("7. GPU peak, long vs short file", gib(gl), gib(gs), gl / gs, "≤ 1.2", _met(gl / gs, 1.2)))
    return rows


def _fig8(r: dict[str, Any], c: Config) -> list[Row]:
    bf, fp = r.get("plain_ours_bf16"), r.get("plain_ours_fp32")
    if not (bf and fp and bf["latencies_s"] and fp["latencies_s"]):
        return []
    lb, lf = median(bf["latencies_s"]), median(fp["latencies_s"])
    faster = "bf16" if lb < lf else "fp32"
    serving = r.get("serving")
    auto = serving["auto_dtype"] if serving else None
    if auto is None:
        from qwen_asr_worker import runtime

        auto = str(runtime.pick_dtype("auto", "cpu")[0]).removeprefix("torch.")
        how = "runtime.pick_dtype"
    else:
        how = "a worker loaded with torch_dtype:auto"
    auto_short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(auto, auto)
    load = _contention(
        *(_cpu_share(o, w) for x in (bf, fp) for o, w in zip(x["latencies_other_cpu_s"], x["latencies_s"], strict=True))
    )
    rb, rf = bf["rss_after_warmup"]["rss"], fp["rss_after_warmup"]["rss"]
    return [
        Row(
            "8. 10-s request latency, bf16 vs fp32 (worker)",
            secs(lb),
            secs(lf),
            lb / lf,
            "auto picks the faster",
            auto_short == faster,
            _join(f"auto picked {auto_short} ({how}); faster here: {faster}; n={len(bf['latencies_s'])}", load),
        ),
        Row("8. RSS after warm-up, bf16 vs fp32 (worker)", gib(rb), gib(rf), rb / rf, "-", None),
    ]


def _fig9(r: dict[str, Any], c: Config) -> list[Row]:
    rows = []
    model = "full 0.6B" if c.vad_model == "asr" else "reduced-depth 0.6B (full widths, 4+4 layers)"
    tokens = f"{VAD_TOKENS_PER_SECOND} tokens per second of window"
    on, off = r.get("vad_half_on"), r.get("vad_half_off")
    if on and off:
        wo, wf = on["request_s"], off["request_s"]
        note = (
            f"{c.vad_minutes:g} min, 60 s of talk then 60 s of quiet, repeated; windows {on['windows']} vs "
            f"{off['windows']}; VAD {secs(on['vad_s'])}; {model}; decode {tokens}"
        )
        rows.append(
            Row(
                "9a. Wall time, half-speech file: VAD on vs off",
                secs(wo),
                secs(wf),
                wo / wf,
                "≤ 0.6",
                _met(wo / wf, 0.6),
                note,
            )
        )
        po, pf = on["peak_rss"], off["peak_rss"]
        rows.append(
            Row(
                "9e. Peak RSS, half-speech file: VAD on vs off",
                gib(po),
                gib(pf),
                po / pf,
                "≤ 1.05",
                _met(po / pf, 1.05),
                f"RSS before {gib(on['rss_before'])} vs {gib(off['rss_before'])}",
            )
        )
    for kind, label in (("silence", "silence (-80 dBFS room noise)"), ("noise", "steady pink noise (-34 dBFS)")):
        on, off = r.get(f"vad_{kind}_on"), r.get(f"vad_{kind}_off")
        if on and off:
            wo, wf = on["request_s"], off["request_s"]
            letter = "b" if kind == "silence" else "c"
            rows.append(
                Row(
                    f"9{letter}. Wall time, {c.vad_quiet_minutes:g} min of {label}: VAD on vs off",
                    secs(wo),
                    secs(wf),
                    wo / wf,
                    "≤ 0.05",
                    _met(wo / wf, 0.05),
                    f"windows {on['windows']} vs {off['windows']}; text {on['text_chars']} vs {off['text_chars']} "
                    f"characters; VAD {secs(on['vad_s'])}",
                )
            )
    speech = r.get("vad_speech_on")
    if speech:
        share = speech["vad_s"] / speech["request_s"]
        rows.append(
            Row(
                f"9d. VAD's own time on {c.vad_minutes:g} min of speech, share of its transcription",
                secs(speech["vad_s"]),
                secs(speech["request_s"]),
                share,
                "≤ 0.02",
                _met(share, 0.02),
                f"windows {speech['windows']}; {model}; decode {tokens}",
            )
        )
    return rows


def _fig10_11(r: dict[str, Any], c: Config) -> list[Row]:
    bw = r.get("bandwidth")
    modes = {m: r.get(f"decode_{m}") for m in ("stock", "fast", "int8")}
    rows: list[Row] = []
    if bw and modes["stock"]:
        gbps = bw["gb_per_s"]
        for mode, label, goal in (("fast", "bf16", 1.6), ("int8", "int8", 1.6), ("stock", "bf16, stock path", None)):
            d = modes[mode]
            if not d:
                continue
            # The bandwidth read around this path's own decode timing (older results lack it: the run's reading).
            around = d.get("gb_per_s_around_decode")
            used = around or gbps
            floor = d["decoder_bytes"] / (used * 1e9) * 1000
            ratio = d["ms_per_token"] / floor
            where = "GPU memory, " if bw.get("cuda") else ""
            when = f", read around this decode in its process; {gbps:.1f} GB/s at the run's start" if around else ""
            size = f"{d['decoder_bytes'] / 1e9:.2f} GB"
            note = f"decoder {size} / {used:.1f} GB/s (torch.sum, {where}2 GiB, best of 5{when})"
            if mode != "stock":
                note += f"; {modes['stock']['ms_per_token'] / d['ms_per_token']:.2f}x faster than stock"
            rows.append(
                Row(
                    f"10. Decode ms/token at batch 1, {label}: vs the bandwidth floor",
                    f"{d['ms_per_token']:.1f} ms",
                    f"{floor:.1f} ms",
                    ratio,
                    f"≤ {goal}" if goal else "-",
                    _met(ratio, goal) if goal else None,
                    _join(note, "" if d.get("text_ok") else "transcript mismatch!"),
                )
            )
    stock = modes["stock"]
    for mode in ("fast", "int8"):
        d = modes[mode]
        if not (d and stock):
            continue
        label = f"11. Encoder + prefill, {{seconds}}-s clip, {mode} vs stock"
        rows += _prefill_rows(label, d, stock, 0.85 if mode == "fast" else None)
        ro, ra = d["rss_after_warmup"], stock["rss_after_warmup"]
        rows.append(
            Row(f"11. RSS after warm-up, {mode} vs stock", gib(ro), gib(ra), ro / ra, "≤ 1.1", _met(ro / ra, 1.1))
        )
    return rows


def _prefill_rows(label: str, ours: dict[str, Any], theirs: dict[str, Any], goal: float | None) -> list[Row]:
    """Encoder + prefill of the 10-s and 30-s clips (first token only), ours against theirs; `label` holds
    `{seconds}` for the clip's length."""
    rows = []
    for clip in ("clip10", "clip30"):
        o, a = ours[f"prefill_{clip}_s"], theirs[f"prefill_{clip}_s"]
        rows.append(
            Row(
                label.format(seconds=clip.removeprefix("clip")),
                secs(o),
                secs(a),
                o / a,
                f"≤ {goal}" if goal else "-",
                _met(o / a, goal) if goal else None,
                "first token only (max_new_tokens 1), best of the reps",
            )
        )
    return rows


def _fig12(r: dict[str, Any], c: Config) -> list[Row]:
    f = r.get("int8_fidelity")
    if not f:
        return []
    rows = []
    layer = f.get("layer_rel_error")
    if layer:
        rows.append(
            Row(
                "12. int8 per-layer output error on the checkpoint's random (Gaussian) decoder weights",
                f"{100 * layer['mean']:.2f} % mean",
                f"{100 * f['bf16_layer_rel_error']:.2f} % (bf16 rounding)",
                layer["mean"],
                "-",
                None,
                f"relative L2 error vs an fp32 product, {layer['layers']} layers, max {100 * layer['max']:.2f} %; "
                "real weights have outliers that per-channel scales absorb less well",
            )
        )
    for mode, label in (("fast", "packed bf16"), ("int8", "int8")):
        m = f[mode]
        rows.append(
            Row(
                f"12. Greedy agreement with stock bf16, {label} (scripted checkpoint)",
                f"{100 * m['agreement']:.1f} %",
                f"{m['tokens']} tokens",
                m["agreement"],
                "= 1 (same math)" if mode == "fast" else "-",
                m["agreement"] == 1.0 if mode == "fast" else None,
                f"logit relative error mean {m['logit_rel_error_mean']:.2e}, max {m['logit_rel_error_max']:.2e} "
                f"(over the first {max(1, m['first_difference'])} steps); the scripted wiring zeroes most of the "
                "decoder, so this is exact by construction and says nothing of accuracy",
            )
        )
    return rows


def _fig13(r: dict[str, Any], c: Config) -> list[Row]:
    fast, stock = r.get("clients_fast"), r.get("clients_stock")
    if not (fast and stock):
        return []
    wf, ws = median(fast["walls_s"]), median(stock["walls_s"])
    return [
        Row(
            "13. Throughput, 8 concurrent 10-s clients: fast decode vs stock",
            f"{fast['audio_s'] / wf:.2f}× realtime",
            f"{stock['audio_s'] / ws:.2f}× realtime",
            ws / wf,
            "≥ 1.4",
            _met(ws / wf, 1.4, at_most=False),
            f"walls {[round(w, 1) for w in fast['walls_s']]} vs {[round(w, 1) for w in stock['walls_s']]} s; "
            f"decode {VAD_TOKENS_PER_SECOND} tokens per second of audio",
        )
    ]


LONG_BATCHES = (180, 360, 720)  # max_batch_seconds values figure 14 tries (with fast decode) against today: stock, 180


def _fig14(r: dict[str, Any], c: Config) -> list[Row]:
    today = r.get("long14_today")
    if not today:
        return []
    rows = []
    model = "full 0.6B" if c.long_model == "asr" else "reduced-depth 0.6B (full widths, 4+4 layers)"
    for seconds in LONG_BATCHES:
        new = r.get(f"long14_{seconds}")
        if not new:
            continue
        wn, wt = new["request_s"], today["request_s"]
        pn, pt = new["peak_rss"], today["peak_rss"]
        chosen = seconds == DEFAULT_MAX_BATCH_SECONDS
        note = (
            f"{c.long_minutes:g} min, {model}, {VAD_TOKENS_PER_SECOND} tokens/s; batches "
            f"{[size for size, _ in new['batches']]} vs {[size for size, _ in today['batches']]}"
        )
        rows.append(
            Row(
                f"14a. {c.long_minutes:g}-min file wall time: fast decode + max_batch_seconds {seconds} vs today "
                "(stock, 180)" + (" [default]" if chosen else ""),
                secs(wn),
                secs(wt),
                wn / wt,
                "≤ 0.4" if chosen else "-",
                _met(wn / wt, 0.4) if chosen else None,
                note,
            )
        )
        rows.append(
            Row(
                f"14b. Peak RSS, same file: max_batch_seconds {seconds} vs today" + (" [default]" if chosen else ""),
                gib(pn),
                gib(pt),
                pn / pt,
                "≤ today + 1.5 GiB" if chosen else "-",
                (pn - pt) <= 1.5 * GIB if chosen else None,
                f"{(pn - pt) / GIB:+.2f} GiB",
            )
        )
    return rows


LIVE_SESSIONS = (1, 4)  # figure 15: concurrent live sessions at real-time pace
LIVE_CHUNK_SECONDS = 2.0  # the live default (options.LiveSettings); the lag goal is twice this


def _fig15(r: dict[str, Any], c: Config) -> list[Row]:
    rows = []
    for sessions in LIVE_SESSIONS:
        run = r.get(f"live_{sessions}")
        if not run or not run["lags_s"]:
            continue
        lags = sorted(run["lags_s"])
        p50, p90 = statistics.median(lags), lags[min(len(lags) - 1, int(0.9 * len(lags)))]
        goal = 2 * LIVE_CHUNK_SECONDS
        alone = sessions == 1
        rows.append(
            Row(
                f"15a. Live: finalized text behind the audio fed, {sessions} session{'s' if sessions > 1 else ''} "
                "at real-time pace, median (p90) vs 2 × chunk_seconds",
                f"{p50:.2f} s ({p90:.2f} s)",
                f"{goal:g} s",
                p50 / goal,
                "≤ 0.5" if alone else "≤ 1",
                _met(p50 / goal, 0.5 if alone else 1.0),
                f"{run['audio_s']:g} s of speech with pauses, full 0.6B, {VAD_TOKENS_PER_SECOND} tokens/s; "
                f"deltas per session {run['deltas']}",
            )
        )
        if run.get("tails_s"):
            tail = max(run["tails_s"])
            rows.append(
                Row(
                    f"15c. Live: last text after the audio's end, {sessions} session{'s' if sessions > 1 else ''} "
                    "(slowest session) vs 2 × chunk_seconds",
                    f"{tail:.2f} s",
                    f"{goal:g} s",
                    tail / goal,
                    "≤ 1",
                    _met(tail / goal, 1.0),
                    f"per session {run['tails_s']}",
                )
            )
        per_audio = run["live_cpu_s"] / (run["audio_s"] * sessions)
        file_per_audio = run["file_cpu_s"] / run["audio_s"]
        rows.append(
            Row(
                f"15b. Live: CPU seconds per second of audio, {sessions} session{'s' if sessions > 1 else ''} vs the "
                "file path (the price of streaming)",
                f"{per_audio:.2f}",
                f"{file_per_audio:.2f}",
                per_audio / file_per_audio,
                "≤ 2.5" if alone else "-",
                _met(per_audio / file_per_audio, 2.5) if alone else None,
                f"live wall {secs(run['live_s'])} for {run['audio_s']:g} s of audio"
                + (
                    f"; encoder windows reused {run['encoder_hits']} of "
                    f"{run['encoder_hits'] + run['encoder_misses']}, prompt tokens reused {run['reused_tokens']} of "
                    f"{run['reused_tokens'] + run['prefilled_tokens']}"
                    if "encoder_hits" in run
                    else ""
                )
                + (
                    f"; draft tokens kept {run['accepted_tokens']} of {run['drafted_tokens']}"
                    if "drafted_tokens" in run
                    else ""
                ),
            )
        )
    return rows


def _fig16(r: dict[str, Any], c: Config) -> list[Row]:
    """Every CPU at full speed: on a CPU where oneDNN packs no bf16, the default (float32 compute on bf16 weights)
    and int8 on bf16 weights against their floors and against today's default there (float32)."""
    auto, int8, fp32 = r.get("decode_auto"), r.get("decode_auto_int8"), r.get("decode_fp32")
    info = r.get("machine", {})
    if not c.wants(16):
        return []
    if not info.get("auto_bf16_weights"):
        note = f"CPU class {info.get('cpu_class', '?')}: oneDNN packs bf16 here, so auto keeps today's path"
        return [Row("16. Default on a CPU without native bf16: not this CPU", "-", "-", None, "-", None, note)]
    rows: list[Row] = []
    for label, d, goal in (("default (fp32 compute on bf16 weights)", auto, 1.3), ("int8 on bf16 weights", int8, 1.4)):
        if not d:
            continue
        gbps = d["gb_per_s_around_decode"]
        floor = d["decoder_bytes"] / (gbps * 1e9) * 1000
        ratio = d["ms_per_token"] / floor
        note = f"decoder {d['decoder_bytes'] / 1e9:.2f} GB / {gbps:.1f} GB/s (torch.sum, read around this decode)"
        if fp32:
            note += f"; {fp32['ms_per_token'] / d['ms_per_token']:.2f}x faster than today's default (fp32)"
        rows.append(
            Row(
                f"16. Decode ms/token at batch 1, {label}: vs the bandwidth floor",
                f"{d['ms_per_token']:.1f} ms",
                f"{floor:.1f} ms",
                ratio,
                f"≤ {goal}",
                _met(ratio, goal),
                _join(note, "" if d.get("text_ok") else "transcript mismatch!"),
            )
        )
    if auto and fp32:
        ro, ra = auto["rss_after_warmup"], fp32["rss_after_warmup"]
        rows.append(
            Row("16. RSS after warm-up, default vs today's default (fp32)", gib(ro), gib(ra), ro / ra, "≤ 0.6",
                _met(ro / ra, 0.6))
        )  # fmt: skip
        rows += _prefill_rows(
            "16. Encoder + prefill, {seconds}-s clip, default vs today's default (fp32)", auto, fp32, 1.0
        )
    return rows


def _fig17(r: dict[str, Any], c: Config) -> list[Row]:
    """Speaker diarization: its error rate on the meeting fixture, its cost, and its share of a transcription."""
    run = r.get("diarization")
    if not run:
        return []
    rows = []
    for collar, letter in ((0, "a"), (250, "b")):
        f = run[f"fixture_{collar}"]
        rows.append(
            Row(
                f"17{letter}. Diarization error rate, meeting fixture (4 espeak-ng voices), collar {collar / 1000:g} s",
                f"{100 * f['der']:.1f} %",
                "-",
                f["der"],
                "≤ 0.10" if collar == 0 else "-",
                _met(f["der"], 0.10) if collar == 0 else None,
                f"missed {f['missed']:.2f} s, false alarm {f['false_alarm']:.2f} s, confusion {f['confusion']:.2f} s "
                f"of {f['total']:.1f} s; {run['fixture_speakers']} speakers found (4 true)",
            )
        )
    hour = 3600 * run["diarize_long_s"] / run["long_audio_s"]
    rows.append(
        Row(
            f"17c. Diarization over {run['long_audio_s'] / 60:g} min (the fixture repeated): seconds per audio hour",
            secs(hour),
            "-",
            None,
            "-",
            None,
            f"DER {100 * run['long']['der']:.1f} % with one label per voice across the file "
            f"({run['long_speakers']} speakers); peak RSS +{gib(run['peak_rss'] - run['rss_before'])} over "
            f"{gib(run['rss_before'])}",
        )
    )
    share = run["diarize_share_s"] / run["transcribe_share_s"]
    rows.append(
        Row(
            f"17d. Diarization's share of a transcription with word timestamps, {run['share_audio_s'] / 60:g} min",
            secs(run["diarize_share_s"]),
            secs(run["transcribe_share_s"]),
            share,
            "≤ 0.25",
            _met(share, 0.25),
            f"full 0.6B, {VAD_TOKENS_PER_SECOND} tokens/s, VAD on, aligner attached",
        )
    )
    return rows


def _recording(hours: float, speech: bool) -> str:
    """Figure 18's name for a recording."""
    length = f"{hours * 60:g}min" if hours < 1 else f"{hours:g}h"
    return f"recording_{length}_{'speech' if speech else 'sparse'}"


def _fig18(r: dict[str, Any], c: Config) -> list[Row]:
    rows = []
    grown: dict[str, float] = {}
    for hours, speech in c.recordings:
        name = _recording(hours, speech)
        run = r.get(f"rec_{name}")
        if not run:
            continue
        over = run["peak_rss"] - run["rss_before"]
        grown[name] = over
        kind = "mostly speech" if speech else "mostly quiet (10 s of speech a minute)"
        length = f"{hours * 60:g}-min" if hours < 1 else f"{hours:g}-h"
        rows.append(
            Row(
                f"18a. Peak RSS over idle, {length} 44.1-kHz stereo FLAC, {kind}, VAD on",
                gib(run["peak_rss"]),
                gib(run["rss_before"]),
                run["peak_rss"] / run["rss_before"],
                "≤ +0.35 GiB",
                over <= 0.35 * GIB,
                f"{over / GIB:+.2f} GiB; {secs(run['request_s'])} wall, {run['windows']} windows, "
                f"{run['duration_s'] / 3600:.2f} h, reduced-depth 0.6B",
            )
        )
    for speech in (False, True):
        short, longest = _recording(1 / 6, speech), _recording(max(h for h, _ in c.recordings), speech)
        if short in grown and longest in grown and longest != short:
            ratio = max(grown[longest], 1.0) / max(grown[short], 1.0)
            rows.append(
                Row(
                    f"18b. Growth over idle, longest vs 10-min file, {'mostly speech' if speech else 'mostly quiet'}",
                    gib(grown[longest]),
                    gib(grown[short]),
                    ratio,
                    "≤ 1.1",
                    ratio <= 1.1,
                    "peak minus idle RSS, each",
                )
            )
    spooled, held = r.get(f"rec_{_recording(2.0, False)}"), r.get("rec_in_memory")
    if spooled and held:
        rows.append(
            Row(
                "18c. 2-h file wall time: audio spooled to a temporary file vs held in memory",
                secs(spooled["request_s"]),
                secs(held["request_s"]),
                spooled["request_s"] / held["request_s"],
                "≤ 1.05",
                _met(spooled["request_s"] / held["request_s"], 1.05),
                f"peak over idle {(spooled['peak_rss'] - spooled['rss_before']) / GIB:+.2f} vs "
                f"{(held['peak_rss'] - held['rss_before']) / GIB:+.2f} GiB",
            )
        )
    adm = r.get("rec_admission")
    if adm:
        codes = adm["codes"]
        handled = all(code in ("OK", "RESOURCE_EXHAUSTED") for code in codes)
        over = adm["peak_rss"] - adm["rss_before"]
        rows.append(
            Row(
                "18d. 8 concurrent 2-h requests, budget for 3 and 2 waiting: served / refused",
                f"{codes.count('OK')} / {codes.count('RESOURCE_EXHAUSTED')}",
                "-",
                None,
                "each served or refused, worker alive",
                handled and adm["alive"] and adm["held_after"] == 0,
                f"codes {codes}; alive after: {adm['alive']}; peak over idle {over / GIB:+.2f} GiB against an "
                f"audio budget of {adm['budget_bytes'] / GIB:.2f} GiB "
                f"({adm['request_bytes'] / 2**20:.0f} MiB a request)",
            )
        )
    stream = r.get("rec_stream")
    if stream and stream.get("first_delta_s") is not None:
        first, decode = stream["first_delta_s"], stream["decode_s"]
        rows.append(
            Row(
                f"18e. Stream of a {stream['duration_s'] / 3600:.3g}-h file, mostly quiet: first delta vs decoding "
                "the file alone",
                secs(first),
                secs(decode),
                first / decode,
                "< 1 (deltas before the file is read to its end)",
                first < decode,
                f"final result after {secs(stream['final_s'])}; {stream['deltas']} deltas",
            )
        )
    return rows


def header(info: dict[str, Any], config: Config, auto_dtype: str | None) -> str:
    """The machine line above the table."""
    device = config.device
    if device.startswith("cuda"):
        device += f" ({info.get('gpu', '?')})"
    dtype = f"auto → {auto_dtype}" if auto_dtype else "auto"
    return (
        f"**Machine:** {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, torch {info['torch']}, "
        f"transformers {info.get('transformers', '?')}, qwen-asr {info.get('qwen_asr', '?')}; device {device}; "
        f"dtype {dtype} (fig. 1, 2, 3, 6 also per dtype as labelled); CPU class {info.get('cpu_class', '?')}; "
        f"CPU flags {', '.join(info['bf16_flags'])}; "
        f"torch threads {config.threads}; OMP_WAIT_POLICY {config.omp_wait_policy or 'unset'}"
        + (f"; extra worker options {', '.join(config.worker_options)}" if config.worker_options else "")
        + "."
    )


def render(rows: list[Row], info: dict[str, Any], config: Config, wall_s: float, auto: str | None) -> str:
    """The markdown report: header, settings, table."""
    mode = "quick" if config.quick else "full"
    lines = [
        f"# Qwen3-ASR worker benchmark ({mode} mode)",
        "",
        header(info, config, auto),
        "",
        f"Checkpoints: random-weight Qwen3-ASR-0.6B dims (untied lm_head, hand-wired to say a 29-word sentence; "
        f"for figure 15 a 107-word text, so that live passes decode text, not `<|im_end|>`) and "
        f"Qwen3-ForcedAligner-0.6B dims, stored bf16. Generation always runs to its budget: "
        f"max_new_tokens {config.max_new_tokens} for the 10-s clips of figures 1-6 and 8, and for figures 7, 9 and "
        f"13-15 {VAD_TOKENS_PER_SECOND} per second of window (`max_tokens_per_second`, which gives a 10-s clip "
        f"{CLIP_TOKENS}). Clips: generated 10-s speech-like noise, 16 kHz WAV, heard whole (`vad:off`); "
        f"figures 9 and 15: real speech built from the committed espeak-ng fixtures, quiet room, pink noise. "
        f"Each scenario ran in a fresh process; RSS read after a warm-up request. Run took {wall_s / 60:.1f} min.",
        "",
        "| figure | ours | alternative | ratio | goal | met? | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = "-" if row.ratio is None else f"{row.ratio:.3f}"
        met = "-" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(f"| {row.figure} | {row.ours} | {row.alternative} | {ratio} | {row.goal} | {met} | {row.notes} |")
    return "\n".join(lines) + "\n"


# --- the plan -----------------------------------------------------------------------------------------------
def prepare(runner: Runner, config: Config) -> dict[str, str]:
    """Build checkpoints and clips; returns their paths."""
    kinds = ["asr", "aligner"]
    if (config.wants(7) or config.wants(14)) and config.long_model != "asr":
        kinds.append(config.long_model)
    if config.wants(15):
        kinds.append("asr_live")
    runner.run("build", "build", {"kinds": kinds}, timeout=3600)
    paths = {kind: str(fixtures.checkpoint_path(kind)) for kind in kinds}
    for i in range(8):
        paths[f"clip{i}"] = str(fixtures.make_clip(f"clip{i}", 10.0, seed=i))
    if config.wants(7) or config.wants(14):
        for name, minutes in (("long", config.long_minutes), ("short", config.short_minutes)):
            paths[name] = str(fixtures.make_clip(f"speech_{minutes:g}min", minutes * 60.0, seed=100))
    if config.wants(10) or config.wants(11) or config.wants(12) or config.wants(16):
        paths["clip30"] = str(fixtures.make_clip("clip30", 30.0, seed=30))
    if config.wants(15):
        seconds = 60.0 if config.quick else 180.0
        paths["live"] = str(
            fixtures.make_audio(
                f"live_{seconds:g}s", lambda: fixtures.real_speech(seconds, seed=7, talk=15.0, pause=4.0)
            )
        )
        paths["live_warmup"] = str(fixtures.make_audio("live_warmup_10s", lambda: fixtures.real_speech(10.0, seed=1)))
    if config.wants(17):
        for name, minutes in (
            ("diar_long", 10.0 if config.quick else 60.0),
            ("diar_share", 3.0 if config.quick else 10.0),
        ):
            samples, turns = fixtures.meeting(minutes * 60.0)
            paths[name] = str(fixtures.make_audio(f"meeting_{minutes:g}min", lambda s=samples: s))
            paths[f"{name}_turns"] = json.dumps(turns)
        paths["diar_fixture"] = str(fixtures.SPEECH_FIXTURES / "meeting.opus")
    if config.wants(18):
        if "asr_reduced" not in kinds:
            runner.run("build_reduced", "build", {"kinds": ["asr_reduced"]}, timeout=3600)
            paths["asr_reduced"] = str(fixtures.checkpoint_path("asr_reduced"))
        paths["rec_warmup"] = str(fixtures.make_audio("live_warmup_10s", lambda: fixtures.real_speech(10.0, seed=1)))
        for hours, speech in config.recordings:
            name = _recording(hours, speech)
            talk, pause = (0.0, 0.0) if speech else (10.0, 50.0)
            paths[name] = str(fixtures.make_recording(name, hours * 3600.0, talk, pause, seed=int(hours * 60)))
    if config.wants(9):
        if config.vad_model != "asr" and config.vad_model not in kinds:
            runner.run("build_vad", "build", {"kinds": [config.vad_model]}, timeout=3600)
            paths[config.vad_model] = str(fixtures.checkpoint_path(config.vad_model))
        talk, quiet = config.vad_minutes * 60.0, config.vad_quiet_minutes * 60.0
        clips = {
            "vad_warmup": lambda: fixtures.real_speech(10.0, seed=1),
            "vad_half": lambda: fixtures.real_speech(talk, seed=2, talk=60.0, pause=60.0),
            "vad_speech": lambda: fixtures.real_speech(talk, seed=3),
            "vad_silence": lambda: fixtures.quiet_room(quiet, seed=4),
            "vad_noise": lambda: fixtures.pink_noise(quiet, seed=5),
        }
        for name, make in clips.items():
            minutes = {"vad_warmup": 10 / 60, "vad_silence": quiet / 60, "vad_noise": quiet / 60}.get(name, talk / 60)
            paths[name] = str(fixtures.make_audio(f"{name}_{minutes:g}min", make))
    return paths


def plan(
    config: Config, paths: dict[str, str], *, auto_bf16_weights: bool = False
) -> list[tuple[str, str, dict[str, Any]]]:
    """The scenarios to run, in order: (key, scenario, params)."""
    common = {
        "asr": paths["asr"],
        "aligner": paths["aligner"],
        "max_new_tokens": config.max_new_tokens,
        "clip": paths["clip0"],
    }
    steps: list[tuple[str, str, dict[str, Any]]] = []
    if config.wants(1) or config.wants(8):
        for dtype in ("bf16", "fp32"):
            for side in ("ours", "eager", "base"):
                if not config.wants(1) and side != "ours":
                    continue
                timed = config.timed_requests if side == "ours" else 0
                steps.append(
                    (f"plain_{side}_{dtype}", "plain", {**common, "side": side, "dtype": dtype, "timed": timed})
                )
    if config.wants(2) or config.wants(3):
        for dtype in config.ts_dtypes:
            for side in ("ours", "reload"):
                steps.append((f"first_ts_{side}_{dtype}", "first_timestamps", {**common, "side": side, "dtype": dtype}))
    if config.wants(4) or config.wants(5) or config.wants(8):
        steps.append(
            (
                "serving",
                "serving",
                {
                    **common,
                    "dtype": "auto",
                    "clips": [paths[f"clip{i}"] for i in range(8)],
                    "reps": config.overhead_reps,
                    "throughput_reps": config.throughput_reps,
                    "batch_warmup": config.batch_warmup,
                },
            )
        )
    if config.wants(6):
        for dtype in config.idle_dtypes:
            steps.append((f"idle_{dtype}", "idle_and_free", {**common, "dtype": dtype, "idle_s": 2.0}))
    if config.wants(7):
        for name in ("short", "long"):
            params = {
                **common,
                "asr": paths[config.long_model],
                "dtype": "auto",
                "max_new_tokens": 1024,
                "clip": paths[name],
                "warmup_clip": paths["clip0"],
                "extra_options": [f"max_tokens_per_second:{VAD_TOKENS_PER_SECOND}"],
            }
            steps.append((f"long_{name}", "long_audio", params))
    if config.wants(9):
        vad_common = {
            **common,
            "asr": paths[config.vad_model],
            "dtype": "auto",
            "max_new_tokens": 1024,
            "extra_options": [f"max_tokens_per_second:{VAD_TOKENS_PER_SECOND}"],
            "warmup_clip": paths["vad_warmup"],
        }
        for clip, sides in (
            ("half", ("on", "off")),
            ("silence", ("on", "off")),
            ("noise", ("on", "off")),
            ("speech", ("on",)),
        ):
            for side in sides:
                params = {**vad_common, "clip": paths[f"vad_{clip}"], "vad": side}
                steps.append((f"vad_{clip}_{side}", "voice_activity", params))
    if config.wants(14):
        variants = [("today", ["fast_decode:off", "max_batch_seconds:180"])]
        variants += [(str(sec), ["fast_decode:on", f"max_batch_seconds:{sec}"]) for sec in LONG_BATCHES]
        for name, options in variants:
            params = {
                **common,
                "asr": paths[config.long_model],
                "dtype": "auto",
                "max_new_tokens": 1024,
                "clip": paths["long"],
                "warmup_clip": paths["clip0"],
                "extra_options": [*options, f"max_tokens_per_second:{VAD_TOKENS_PER_SECOND}"],
            }
            steps.append((f"long14_{name}", "long_audio", params))
    decode_common = {**common, "dtype": "bf16", "clip10": paths["clip0"], "clip30": paths.get("clip30", "")}
    cuda = config.device.startswith("cuda")
    if config.wants(10) or config.wants(11):
        steps.append(("bandwidth", "bandwidth", {}))
        # int8 is a CPU decode path: the loader refuses it on a GPU.
        for mode in ("stock", "fast") if cuda else ("stock", "fast", "int8"):
            reps = 2 if config.quick else 3
            steps.append((f"decode_{mode}", "decode", {**decode_common, "mode": mode, "reps": reps}))
    if config.wants(16) and not cuda and auto_bf16_weights:
        reps = 2 if config.quick else 3
        for key, mode, dtype in (("decode_auto", "fast", "auto"), ("decode_auto_int8", "int8", "auto")):
            steps.append((key, "decode", {**decode_common, "mode": mode, "dtype": dtype, "reps": reps}))
        steps.append(("decode_fp32", "decode", {**decode_common, "mode": "fast", "dtype": "fp32", "reps": reps}))
    if config.wants(12) and not cuda:
        steps.append(("int8_fidelity", "int8_fidelity", decode_common))
    if config.wants(15):
        for sessions in LIVE_SESSIONS:
            params = {
                **common,
                "asr": paths["asr_live"],
                "dtype": "auto",
                "max_new_tokens": 1024,
                "clip": paths["live"],
                "warmup_clip": paths["live_warmup"],
                "sessions": sessions,
                "extra_options": [f"max_tokens_per_second:{VAD_TOKENS_PER_SECOND}"],
            }
            steps.append((f"live_{sessions}", "live_lag", params))
    if config.wants(17):
        layout = json.loads((fixtures.SPEECH_FIXTURES / "layout.json").read_text(encoding="utf-8"))
        params = {
            **common,
            "dtype": "auto",
            "max_new_tokens": 1024,
            "fixture": paths["diar_fixture"],
            "fixture_turns": layout["meeting.opus"]["turns"],
            "long_clip": paths["diar_long"],
            "long_turns": json.loads(paths["diar_long_turns"]),
            "share_clip": paths["diar_share"],
            "extra_options": [f"max_tokens_per_second:{VAD_TOKENS_PER_SECOND}"],
        }
        steps.append(("diarization", "diarization", params))
    if config.wants(18):
        rec = {
            **common,
            "asr": paths["asr_reduced"],
            "dtype": "auto",
            "max_new_tokens": 1024,
            "warmup_clip": paths["rec_warmup"],
            "extra_options": ["vad:on", f"max_tokens_per_second:{VAD_TOKENS_PER_SECOND}"],
        }
        for hours, speech in config.recordings:
            name = _recording(hours, speech)
            steps.append((f"rec_{name}", "long_audio", {**rec, "clip": paths[name]}))
        quiet2h = paths[_recording(2.0, False)]
        steps.append(("rec_in_memory", "long_audio", {**rec, "clip": quiet2h, "in_memory": True}))
        steps.append(("rec_admission", "admission", {**rec, "clip": quiet2h, "clients": 8, "fits": 3, "waiting": 2}))
        longest = paths[_recording(max(h for h, _ in config.recordings), False)]
        steps.append(("rec_stream", "stream_start", {**rec, "clip": longest}))
    if config.wants(13):
        for side, option in (("stock", "fast_decode:off"), ("fast", "fast_decode:on")):
            params = {
                **common,
                "dtype": "auto",
                "max_new_tokens": 1024,
                "clips": [paths[f"clip{i}"] for i in range(8)],
                "extra_options": [option, f"max_tokens_per_second:{VAD_TOKENS_PER_SECOND}"],
                "reps": 1 if config.quick else 2,
            }
            steps.append((f"clients_{side}", "concurrent_clients", params))
    return steps


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the plan, print the table last, write `bench/results/latest.{md,json}`."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, reduced long-audio figure")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: records GPU memory too")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (default: all cores)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=0, help=f"override the 10-s clips' budget (default {CLIP_TOKENS})"
    )
    parser.add_argument("--only", default="", help="comma-separated figure numbers to run (default: all)")
    parser.add_argument(
        "--quiet-wait", type=float, default=0.0, help="seconds to wait per scenario for other processes to go idle"
    )
    parser.add_argument(
        "--omp-wait-policy",
        default="default",
        help="OMP_WAIT_POLICY for every scenario process: 'default' leaves it unset, as LocalAI runs the worker "
        "(until 2026-11-27 this flag defaulted to PASSIVE but never reached the scenario processes: every figure so "
        "far ran unset); PASSIVE makes libgomp's threads sleep between parallel regions, which costs small ops dearly",
    )
    parser.add_argument(
        "--worker-option",
        action="append",
        default=[],
        metavar="KEY:VALUE",
        help="extra LoadModel option for the worker in every scenario (repeatable), e.g. batch_window_ms:50",
    )
    parser.add_argument(
        "--emulate-avx2",
        action="store_true",
        help="measure as on a CPU without AVX-512: oneDNN and ATen capped at AVX2, our kernels built for Haswell "
        "(the hardware's bandwidth and cores stay its own; the header says so)",
    )
    parser.add_argument("--out", default=str(fixtures.RESULTS), help="results directory")
    parser.add_argument(
        "--render", metavar="JSON", help="only re-render the table from a saved latest.json (runs nothing)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.render:
        return rerender(Path(args.render), out)

    notes: list[str] = []
    if args.emulate_avx2:
        import os

        os.environ.update(fixtures.EMULATED_AVX2)  # every scenario process inherits it
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            message = "--device cuda: CUDA is not available here; skipping GPU figures and measuring on the CPU"
            print(message, file=sys.stderr)
            notes.append(message)
            args.device = "cpu"
    config = make_config(args)
    runner = Runner(config, out / "logs")
    started = time.perf_counter()
    info = runner.run("machine", "machine", {})
    paths = prepare(runner, config)
    failures: list[str] = []
    for key, scenario, params in plan(config, paths, auto_bf16_weights=bool(info.get("auto_bf16_weights"))):
        try:
            runner.run(key, scenario, params)
        except RuntimeError as exc:
            print(f"\n{exc}", file=sys.stderr)
            failures.append(f"{key}: {str(exc).splitlines()[0]}")
    raw = {
        "config": {k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in vars(config).items()},
        "machine": info,
        "wall_s": time.perf_counter() - started,
        "results": runner.results,
        "notes": notes,
        "failures": failures,
    }
    out.mkdir(parents=True, exist_ok=True)
    # The raw results go to disk before any tabulating, so a bug in the table never loses a run.
    (out / "latest.json").write_text(json.dumps(raw, indent=2, default=str) + "\n", encoding="utf-8")
    write_report(raw, config, out)
    return 1 if failures else 0


def write_report(raw: dict[str, Any], config: Config, out: Path) -> str:
    """Tabulate `raw`, add the rows to `latest.json`, write `latest.md`, print the report and return it."""
    results = raw["results"]
    auto = results.get("serving", {}).get("auto_dtype")
    rows = rows_for(results, config)
    report = render(rows, raw["machine"], config, raw["wall_s"], auto)
    extra = [*raw["notes"], *(f"FAILED {f}" for f in raw["failures"])]
    if extra:
        report += "\n" + "\n".join(f"- {line}" for line in extra) + "\n"
    raw["rows"] = [vars(row) for row in rows]
    (out / "latest.json").write_text(json.dumps(raw, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "latest.md").write_text(report, encoding="utf-8")
    print(report)
    return report


def rerender(path: Path, out: Path) -> int:
    """Re-tabulate a saved `latest.json` (e.g. after changing the table code) into `out`."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    fields = dict(raw["config"])
    fields["only"] = frozenset(fields.get("only", ()))
    fields["worker_options"] = tuple(fields.get("worker_options", ()))
    fields["ts_dtypes"] = tuple(fields["ts_dtypes"])
    fields["idle_dtypes"] = tuple(fields["idle_dtypes"])
    out.mkdir(parents=True, exist_ok=True)
    write_report(raw, Config(**fields), out)
    return 1 if raw.get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
