"""The report: one table over all configurations (stdout and Markdown) and per-file JSON lines, worst first.

The table has a WER and a CER column, each pooled over its own files (total edits / total reference units), with
its substitutions/deletions/insertions; "-" when a configuration has no file of that kind. Failed files count
in `files` and `failed` but in no rate, hour or realtime factor: they have no transcript to score.

Each configuration's JSONL puts failed files first, then the highest error rate, so `head` shows what to listen to.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .runner import ConfigResult, FileResult
from .scoring import Score, Unit, normalize, pooled

HEADERS = (
    "configuration",
    "files",
    "failed",
    "audio h",
    "WER",
    "S/D/I (words)",
    "CER",
    "S/D/I (chars)",
    "RTF",
    "peak RSS",
)
_RIGHT = frozenset({"files", "failed", "audio h", "WER", "S/D/I (words)", "CER", "S/D/I (chars)", "RTF", "peak RSS"})
GIB = 1024**3


def _rate(score: Score) -> str:
    rate = score.rate
    return "-" if rate is None else f"{100 * rate:.2f}%"


def _edits(score: Score) -> str:
    return f"{score.substitutions}/{score.deletions}/{score.insertions}" if score.reference_units else "-"


def row(result: ConfigResult) -> tuple[str, ...]:
    """One configuration's table row, as strings, in `HEADERS` order."""
    scores = [f.score for f in result.files if f.score is not None]
    words, chars = pooled(scores, Unit.WORD), pooled(scores, Unit.CHAR)
    audio = result.audio_seconds
    return (
        result.config.label,
        str(len(result.files)),
        str(result.failed),
        f"{audio / 3600:.4f}",
        _rate(words),
        _edits(words),
        _rate(chars),
        _edits(chars),
        f"{result.transcription_seconds / audio:.3f}" if audio else "-",
        f"{result.peak_rss_bytes / GIB:.2f} GiB" if result.peak_rss_bytes else "-",
    )


def markdown_table(results: Sequence[ConfigResult]) -> str:
    """The table as Markdown, columns padded so it also reads well in a terminal."""
    rows = [HEADERS, *(row(r) for r in results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if h in _RIGHT else c.ljust(w) for c, w, h in zip(cells, widths, HEADERS, strict=True))
        return "| " + " | ".join(padded) + " |"

    dashes = ("-" * (w + 1) + ":" if h in _RIGHT else "-" * (w + 2) for w, h in zip(widths, HEADERS, strict=True))
    rule = "|" + "|".join(dashes) + "|"
    return "\n".join([line(HEADERS), rule, *(line(r) for r in rows[1:])]) + "\n"


def file_record(result: FileResult, config_label: str) -> dict[str, Any]:
    """One file's JSON line: reference next to hypothesis (as given and normalized), its score or its error."""
    score = result.score
    return {
        "file": str(result.item.audio),
        "config": config_label,
        "reference": result.item.reference,
        "hypothesis": result.hypothesis,
        "reference_normalized": normalize(result.item.reference),
        "hypothesis_normalized": normalize(result.hypothesis),
        "metric": score.unit.value if score else None,
        "error_rate": score.rate if score else None,
        "substitutions": score.substitutions if score else None,
        "deletions": score.deletions if score else None,
        "insertions": score.insertions if score else None,
        "reference_units": score.reference_units if score else None,
        "duration": round(result.duration, 3),
        "wall_seconds": round(result.wall_seconds, 4),
        "language": result.item.language,
        "detected_language": result.detected_language,
        "error": result.error,
    }


def _worst_first(result: FileResult) -> tuple[bool, float, int, str]:
    score = result.score
    if score is None:
        return (False, 0.0, 0, str(result.item.audio))
    rate = score.rate if score.rate is not None else (math.inf if score.errors else 0.0)
    return (True, -rate, -score.errors, str(result.item.audio))


def jsonl(result: ConfigResult) -> str:
    """The configuration's files as JSON lines: failed first, then by error rate, highest first."""
    ordered = sorted(result.files, key=_worst_first)
    return "".join(json.dumps(file_record(f, result.config.label), ensure_ascii=False) + "\n" for f in ordered)


def jsonl_name(index: int, result: ConfigResult) -> str:
    """`2-vad-off_max_new_tokens-32.jsonl`: the configuration's position and options, safe as a file name."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", result.config.label.replace(":", "-"))[:80]
    return f"{index}-{slug}.jsonl"


def markdown_report(results: Sequence[ConfigResult], model: str, data: Path, when: datetime) -> str:
    """The Markdown file: what was run, the table, where the per-file results are, and any failed loads."""
    files = len(results[0].files) if results else 0
    lines = [
        "# ASR evaluation",
        "",
        f"- model: `{model}`",
        f"- data: `{data}` ({files} files)",
        f"- run: {when.isoformat(timespec='seconds')}",
        "- scoring: lower case, punctuation removed (apostrophes inside words and marks between digits kept), "
        "whitespace collapsed, numbers as written; CER for zh/ja/ko/yue, WER otherwise; rates pooled over files",
        "- RTF: wall time of the requests / audio duration; peak RSS: the worker process, load included",
        "",
        markdown_table(results),
        "Per-file results, worst first:",
        "",
    ]
    lines += [f"- `{jsonl_name(i, r)}`: {r.config.label}" for i, r in enumerate(results, start=1)]
    failed_loads = [r for r in results if r.load_error]
    if failed_loads:
        lines += ["", "Configurations that did not run:", ""]
        lines += [f"- {r.config.label}: {r.load_error}" for r in failed_loads]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, results: Sequence[ConfigResult], model: str, data: Path, when: datetime) -> Path:
    """Write `results.md` and one JSONL per configuration into `out` (created); returns the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    for index, result in enumerate(results, start=1):
        (out / jsonl_name(index, result)).write_text(jsonl(result), encoding="utf-8")
    report = out / "results.md"
    report.write_text(markdown_report(results, model, data, when), encoding="utf-8")
    return report
