"""The command line of `python -m qwen_asr_worker.eval` (and `make eval`).

stdout gets only the final table, so it can be piped or pasted; progress and diagnostics go to stderr through
logging. Exit status: 0 when every file of every configuration was transcribed, 1 when any file or load failed
(the table and files are still written), 2 when the data or the configurations are unusable (nothing runs).
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path

from .data import DataError, load_items
from .report import markdown_table, write_outputs
from .runner import ConfigError, ConfigResult, parse_configs, run_config

log = logging.getLogger("qwen_asr_worker.eval")

DEFAULT_MODEL = "Qwen/Qwen3-ASR-0.6B"
DEFAULT_OUT = "eval-results"
DEFAULT_TIMEOUT_S = 3600.0

EPILOG = """\
configurations: LoadModel options, ',' within a configuration and ';' between them; an empty one is the
worker's defaults. Each configuration runs in a fresh worker process, so its peak RSS is its own.
  --configs 'torch_dtype:bf16; torch_dtype:bf16,quantization:int8; vad:off'

outputs (in OUT/YYYYmmdd-HHMMSS/): results.md (the table), N-CONFIG.jsonl (every file's reference and
hypothesis, worst first), worker-N.log (each worker's log).

exit status: 0 all transcribed, 1 some file or load failed, 2 bad data or configurations.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m qwen_asr_worker.eval",
        description="Word (and character) error rate of the worker over a folder of audio with references.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="a folder of x.wav|flac|mp3|m4a + x.txt pairs, LibriSpeech folders (*.trans.txt), or a JSONL "
        "manifest (the file, or a folder holding exactly one *.jsonl)",
    )
    parser.add_argument(
        "--configs",
        default="",
        help="LoadModel option sets, e.g. 'vad:on; vad:off' (default: one run with the worker's defaults)",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="the model reference LoadModel gets: a Hugging Face id or a checkpoint folder (default %(default)s)",
    )
    parser.add_argument(
        "--out", default=Path(DEFAULT_OUT), type=Path, help="where each run's folder is made (default %(default)s)"
    )
    parser.add_argument(
        "--timeout",
        default=DEFAULT_TIMEOUT_S,
        type=float,
        help="seconds one file may take before it counts as failed (default %(default).0f)",
    )
    return parser


def _run_dir(out: Path, when: datetime) -> Path:
    """A new folder under `out` named after the start time (suffixed if that exists), so runs never mix."""
    stem = when.strftime("%Y%m%d-%H%M%S")
    candidate, n = out / stem, 1
    while candidate.exists():
        n += 1
        candidate = out / f"{stem}-{n}"
    candidate.mkdir(parents=True)
    return candidate


def main(argv: list[str] | None = None) -> int:
    """Run every configuration over the data, print the table, write the report; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        items = load_items(args.data)
        configs = parse_configs(args.configs)
    except (DataError, ConfigError) as exc:
        log.error("error: %s", exc)
        return 2
    if args.timeout <= 0:
        log.error("error: --timeout must be positive, got %s", args.timeout)
        return 2
    when = datetime.now().astimezone()
    run_dir = _run_dir(args.out, when)
    log.info("%d files, %d configuration(s), model %s; writing to %s", len(items), len(configs), args.model, run_dir)
    results: list[ConfigResult] = []
    interrupted = False
    try:
        for index, config in enumerate(configs, start=1):
            label = f"{index}/{len(configs)} {config.label}"
            results.append(run_config(config, args.model, items, run_dir / f"worker-{index}.log", label, args.timeout))
    except KeyboardInterrupt:
        interrupted = True
        log.error("interrupted: only the %d finished configuration(s) are reported", len(results))
    report = write_outputs(run_dir, results, args.model, args.data.resolve(), when)
    sys.stdout.write(markdown_table(results))
    sys.stdout.flush()
    log.info("table: %s; per-file results (worst first): %s/*.jsonl", report, run_dir)
    failed = sum(r.failed for r in results)
    if failed:
        log.error("%d file transcription(s) failed; see the 'error' field in the JSONL files", failed)
    if interrupted:
        return 130
    return 1 if failed else 0
