"""The evaluation harness (`make eval`): data layouts, normalization and scoring, the report, and real runs.

The tiny checkpoints always say their scripted sentence, so references that differ from it by known edits must
give exactly those substitution/deletion/insertion counts. The runs start the real worker through run.sh, as
`make eval` does; one of them is `python -m qwen_asr_worker.eval` as a subprocess. No timing is asserted.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen_asr_worker.audio import load_audio
from qwen_asr_worker.eval import cli, report, runner
from qwen_asr_worker.eval.data import DataError, Item, load_items
from qwen_asr_worker.eval.runner import Config, ConfigError, ConfigResult, FileResult, parse_configs
from qwen_asr_worker.eval.scoring import Score, Unit, normalize, pooled, score, tokens, unit_for
from tests.audio_fixtures import write_audio
from tests.conftest import CJK_SENTENCE, SENTENCE, SPEECH_DIR

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"

# References against the English model's "Hello world. This is a test." and the edits they must score.
ONE_SUBSTITUTION = "hello world this is the test"
ONE_DELETION = "Hello big world, this is a test!"  # "big" is in the reference, not in the hypothesis
ONE_INSERTION = "hello world this is test"  # "a" is in the hypothesis, not in the reference


# --- normalization and scoring (pure) ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello world. This is a test.", "hello world this is a test"),
        ("Don’t STOP, it's fine", "don't stop it's fine"),
        ("'quoted' words' end", "quoted words end"),
        ("3.5 and 1,000 at 10:30.", "3.5 and 1,000 at 10:30"),
        ("twenty 20", "twenty 20"),
        ("你好世界。这是一个测试。", "你好世界 这是一个测试"),
        ("「東京」、ＡＢＣ１２３！", "東京 abc123"),
        ("well-known  \t spaced\n out", "well known spaced out"),
        ("¿Qué tal? — bien…", "qué tal bien"),
        ("$5 + 5% ♪", "$5 + 5 ♪"),
        ("", ""),
        (" ... ", ""),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


@pytest.mark.parametrize(
    ("reference", "hypothesis", "unit", "edits"),
    [
        (ONE_SUBSTITUTION, SENTENCE, Unit.WORD, (1, 0, 0)),
        (ONE_DELETION, SENTENCE, Unit.WORD, (0, 1, 0)),
        (ONE_INSERTION, SENTENCE, Unit.WORD, (0, 0, 1)),
        ("HELLO WORLD THIS IS A TEST", SENTENCE, Unit.WORD, (0, 0, 0)),
        ("goodbye", SENTENCE, Unit.WORD, (1, 0, 5)),
        ("你好世界。这是一个测验。", CJK_SENTENCE, Unit.CHAR, (1, 0, 0)),
        ("你好大世界。这是一个测试。", CJK_SENTENCE, Unit.CHAR, (0, 1, 0)),
        ("你好世界。这是个测试。", CJK_SENTENCE, Unit.CHAR, (0, 0, 1)),
        ("你好 世界 这是 一个 测试", CJK_SENTENCE, Unit.CHAR, (0, 0, 0)),
        ("a b", "", Unit.WORD, (0, 2, 0)),
        ("", "a b", Unit.WORD, (0, 0, 2)),
    ],
)
def test_score(reference: str, hypothesis: str, unit: Unit, edits: tuple[int, int, int]) -> None:
    result = score(reference, hypothesis, unit)
    assert (result.substitutions, result.deletions, result.insertions) == edits
    assert result.reference_units == len(tokens(reference, unit))


def test_rates() -> None:
    assert score(ONE_SUBSTITUTION, SENTENCE, Unit.WORD).rate == pytest.approx(1 / 6)
    assert score("a b", "", Unit.WORD).rate == 1.0
    assert score("", "a b", Unit.WORD).rate is None  # no reference words: no rate, but the insertions count
    # Pooled: total edits over total reference words (1 of 6 + 0 of 4 = 10%), not the mean of 1/6 and 0.
    files = [score(ONE_SUBSTITUTION, SENTENCE, Unit.WORD), score("a b c d", "a b c d", Unit.WORD)]
    assert pooled([*files, score("你好", "你好", Unit.CHAR)], Unit.WORD).rate == pytest.approx(0.1)
    assert pooled(files, Unit.CHAR) == Score(Unit.CHAR)
    with pytest.raises(ValueError, match="cannot add"):
        _ = files[0] + Score(Unit.CHAR)


@pytest.mark.parametrize(
    ("reference", "language", "unit"),
    [
        ("hello world", None, Unit.WORD),
        ("你好世界", None, Unit.CHAR),
        ("こんにちは", None, Unit.CHAR),
        ("カタカナ", None, Unit.CHAR),
        ("안녕하세요 세계", None, Unit.CHAR),
        ("Grüße aus Köln", None, Unit.WORD),
        ("hello", "zh", Unit.CHAR),
        ("hello", "zh-HK", Unit.CHAR),  # Cantonese
        ("hello", "Japanese", Unit.CHAR),
        ("hello", "ko", Unit.CHAR),
        ("你好", "en", Unit.WORD),  # the manifest's language decides over the script
        ("你好", "auto", Unit.CHAR),  # auto-detect: the script decides
    ],
)
def test_unit_for(reference: str, language: str | None, unit: Unit) -> None:
    assert unit_for(reference, language) is unit


@given(st.text(max_size=60), st.sampled_from(list(Unit)))
def test_identical_texts_score_no_edits(text: str, unit: Unit) -> None:
    result = score(text, text, unit)
    assert result.errors == 0
    assert result.hits == len(tokens(text, unit))


@given(st.text(max_size=40), st.text(max_size=40), st.sampled_from(list(Unit)))
def test_scores_account_for_every_unit(reference: str, hypothesis: str, unit: Unit) -> None:
    result = score(reference, hypothesis, unit)
    assert result.reference_units == len(tokens(reference, unit))
    assert result.hits + result.substitutions + result.insertions == len(tokens(hypothesis, unit))
    assert normalize(normalize(reference)) == normalize(reference)


# --- data layouts (pure: nothing is decoded) -------------------------------------------------------------------
def _touch(path: Path, text: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if text is None:
        path.write_bytes(b"audio")
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_pairs_layout(tmp_path: Path) -> None:
    for name in ("a.wav", "deep/b.mp3", "c.M4A", "deep/er/d.flac"):
        _touch(tmp_path / name)
        _touch((tmp_path / name).with_suffix(".txt"), f"  reference {Path(name).stem}\n")
    _touch(tmp_path / "notes.md", "not audio")
    items = load_items(tmp_path)
    assert [(i.audio.relative_to(tmp_path).as_posix(), i.reference, i.language) for i in items] == [
        ("a.wav", "reference a", None),
        ("c.M4A", "reference c", None),
        ("deep/b.mp3", "reference b", None),
        ("deep/er/d.flac", "reference d", None),
    ]
    assert all(i.audio.is_absolute() for i in items)


def test_librispeech_layout(tmp_path: Path) -> None:
    chapter = tmp_path / "test-clean" / "19" / "198"
    _touch(chapter / "19-198.trans.txt", "19-198-0001 HELLO WORLD\n\n19-198-0000 IT'S A TEST\n")
    _touch(chapter / "19-198-0000.flac")
    _touch(chapter / "19-198-0001.flac")
    items = load_items(tmp_path)
    assert [(i.audio.name, i.reference) for i in items] == [
        ("19-198-0000.flac", "IT'S A TEST"),
        ("19-198-0001.flac", "HELLO WORLD"),
    ]


def test_manifest_layout(tmp_path: Path) -> None:
    _touch(tmp_path / "audio" / "a.wav")
    _touch(tmp_path / "b.flac")
    lines = [
        {"audio": "audio/a.wav", "text": "你好", "language": "zh"},
        {"audio": str(tmp_path / "b.flac"), "text": "hello", "language": "auto"},
    ]
    manifest = _touch(tmp_path / "set.jsonl", "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n")
    expected = [Item((tmp_path / "audio" / "a.wav").resolve(), "你好", "zh"), Item((tmp_path / "b.flac"), "hello")]
    assert load_items(manifest) == expected
    assert load_items(tmp_path) == expected  # the folder holding the one manifest


@pytest.mark.parametrize(
    ("files", "data", "message"),
    [
        ({}, ".", "no audio files with references found"),
        ({"x.wav": None, "y.wav": None, "y.txt": "ref"}, ".", r"(?s)1 audio file\(s\) have no reference.*/x\.wav"),
        ({"x.ogg": None, "x.txt": "ref"}, ".", "no audio files with references found"),
        (
            {"x.wav": None, "m.jsonl": '{"audio": "x.wav", "text": "a"}\n{"audio": '},
            ".",
            r"m\.jsonl, line 2: not valid",
        ),
        ({"m.jsonl": '{"audio": "x.wav"}'}, ".", r"line 1: 'text' is missing"),
        ({"m.jsonl": '["x.wav", "a"]'}, ".", "line 1: expected a JSON object"),
        ({"m.jsonl": '{"audio": "gone.wav", "text": "a"}'}, ".", r"line 1: audio file .*gone\.wav not found"),
        ({"x.wav": None, "m.jsonl": '{"audio": "x.wav", "text": "a", "language": "xx"}'}, ".", "unsupported lang"),
        ({"m.jsonl": ""}, ".", "has no entries"),
        ({"a.jsonl": "", "b.jsonl": ""}, ".", r"holds 2 manifests \(a\.jsonl, b\.jsonl\)"),
        ({"c/c.trans.txt": "c-0001 HI\n"}, ".", r"c\.trans\.txt, line 1: audio file .*c-0001\.flac not found"),
        ({"c/c.trans.txt": "c-0001\n", "c/c-0001.flac": None}, ".", "line 1: expected 'UTTID TEXT'"),
        ({"x.txt": "ref"}, "x.txt", "is a file but not a .jsonl manifest"),
        ({}, "missing", "does not exist"),
    ],
)
def test_bad_layouts(tmp_path: Path, files: dict[str, str | None], data: str, message: str) -> None:
    for name, text in files.items():
        _touch(tmp_path / name, text)
    with pytest.raises(DataError, match=message) as info:
        load_items(tmp_path / data)
    assert "supported layouts" in str(info.value)


def test_bad_layout_from_the_command_line(tmp_path: Path) -> None:
    _touch(tmp_path / "x.wav")
    done = subprocess.run(
        [str(PYTHON), "-m", "qwen_asr_worker.eval", "--data", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "have no reference transcript" in done.stderr and "supported layouts" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "out").exists()


# --- configurations, report, progress (pure) --------------------------------------------------------------------
def test_parse_configs() -> None:
    assert parse_configs("") == [Config()]
    assert parse_configs(" torch_dtype:bf16 ; torch_dtype:bf16, quantization:int8;") == [
        Config(("torch_dtype:bf16",)),
        Config(("torch_dtype:bf16", "quantization:int8")),
        Config(),
    ]
    assert [c.label for c in parse_configs("vad:off;")] == ["vad:off", "defaults"]
    with pytest.raises(ConfigError, match="configuration 'vad:maybe': bad value 'maybe'"):
        parse_configs("vad:off; vad:maybe")
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        parse_configs("colour:blue")
    with pytest.raises(ConfigError, match="given twice"):
        parse_configs("vad:off; vad:off")


def _file(name: str, reference: str, hypothesis: str, **fields: object) -> FileResult:
    unit = unit_for(reference)
    return FileResult(
        Item(Path(f"/data/{name}"), reference),
        hypothesis=hypothesis,
        score=score(reference, hypothesis, unit),
        **fields,  # type: ignore[arg-type]
    )


def test_table_and_jsonl_mix_wer_cer_and_failures() -> None:
    mixed = ConfigResult(
        Config(("vad:off",)),
        files=[
            _file("exact.wav", SENTENCE, SENTENCE, duration=1800.0, wall_seconds=90.0),
            _file("sub.wav", ONE_SUBSTITUTION, SENTENCE, duration=1800.0, wall_seconds=90.0),
            _file("zh.wav", "你好世界。这是一个测验。", CJK_SENTENCE, duration=3600.0, wall_seconds=180.0),
            FileResult(Item(Path("/data/bad.wav"), "x"), error="INVALID_ARGUMENT: audio file is empty"),
        ],
        peak_rss_bytes=3 * 1024**3 // 2,
    )
    failed_load = ConfigResult(
        Config(), files=[FileResult(Item(Path("/data/a.wav"), "a"), error="LoadModel failed: no")], load_error="no"
    )
    assert report.row(mixed) == (
        "vad:off", "4", "1", "2.0000", "8.33%", "1/0/0", "10.00%", "1/0/0", "0.050", "1.50 GiB"
    )  # fmt: skip
    assert report.row(failed_load) == ("defaults", "1", "1", "0.0000", "-", "-", "-", "-", "-", "-")
    table = report.markdown_table([mixed, failed_load]).splitlines()
    assert [c.strip() for c in table[0].split("|")[1:-1]] == list(report.HEADERS)
    assert len({len(line) for line in table}) == 1  # aligned columns
    records = [json.loads(line) for line in report.jsonl(mixed).splitlines()]
    assert [Path(r["file"]).name for r in records] == ["bad.wav", "sub.wav", "zh.wav", "exact.wav"]
    assert records[0]["error"] == "INVALID_ARGUMENT: audio file is empty" and records[0]["error_rate"] is None
    assert (
        records[1].items()
        >= {
            "metric": "wer",
            "substitutions": 1,
            "deletions": 0,
            "insertions": 0,
            "reference_units": 6,
            "hypothesis_normalized": "hello world this is a test",
        }.items()
    )
    assert records[2]["metric"] == "cer" and records[2]["error_rate"] == pytest.approx(0.1)
    assert report.jsonl_name(2, mixed) == "2-vad-off.jsonl"


def test_progress_estimates_time_left(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    progress = runner.Progress("1/1 defaults", 4, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="qwen_asr_worker.eval.runner"):
        now[0] = 110.0
        progress.update(1, 0)
        now[0] = 111.0
        progress.update(2, 1)  # within the interval: not logged
        now[0] = 140.0
        progress.update(4, 1)  # the last file is always logged
    assert [r.getMessage() for r in caplog.records] == [
        "[1/1 defaults] 1/4 files, 0:00:10 elapsed, ~0:00:30 left",
        "[1/1 defaults] 4/4 files, 1 failed, 0:00:40 elapsed, ~0:00:00 left",
    ]


# --- real runs: the worker started through run.sh ---------------------------------------------------------------
@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """Two seconds of real (espeak-ng) speech at normal loudness, 16 kHz mono."""
    return load_audio(str(SPEECH_DIR / "quiet.opus"))[: 2 * 16000] * 30


def _write(path: Path, samples: np.ndarray, reference: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_audio(path, samples, 16000, path.suffix.lstrip(".").lower())
    if reference is not None:
        path.with_suffix(".txt").write_text(reference + "\n", encoding="utf-8")
    return path


def _records(run_dir: Path, name: str) -> dict[str, dict]:
    lines = (run_dir / name).read_text(encoding="utf-8").splitlines()
    return {Path(r["file"]).name: r for r in map(json.loads, lines)}


def _edits(record: dict) -> tuple[int, int, int]:
    return record["substitutions"], record["deletions"], record["insertions"]


def test_make_eval_end_to_end(tmp_path: Path, checkpoints: dict[str, Path], speech: np.ndarray) -> None:
    """`python -m qwen_asr_worker.eval` as a user runs it: two configurations over pairs in four containers, one
    file undecodable; the table, the Markdown and the JSONL all say the same."""
    data = tmp_path / "data"
    _write(data / "exact.wav", speech, "Hello world, this is a test.")
    _write(data / "sub" / "substituted.mp3", speech, ONE_SUBSTITUTION)
    _write(data / "deleted.m4a", speech, ONE_DELETION)
    _write(data / "sub" / "inserted.flac", speech, ONE_INSERTION)
    (data / "broken.wav").write_bytes(b"RIFF not really a wave file")
    (data / "broken.txt").write_text("hello\n", encoding="utf-8")
    out = tmp_path / "out"
    done = subprocess.run(
        [
            str(PYTHON), "-m", "qwen_asr_worker.eval",
            "--data", str(data),
            "--model", str(checkpoints["asr"]),
            "--configs", "; vad:off,max_new_tokens:32",
            "--out", str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # one file failed: reported, and the exit status says so
    assert "Traceback" not in done.stderr
    assert "[1/2 defaults] 5/5 files, 1 failed" in done.stderr
    assert "[2/2 vad:off,max_new_tokens:32] 5/5 files, 1 failed" in done.stderr

    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines()]
    assert rows[0] == list(report.HEADERS)
    # 24 reference words, 1 substitution, 1 deletion, 1 insertion: 12.5 %; no CER files; the broken one failed.
    assert [r[:8] for r in rows[2:]] == [
        ["defaults", "5", "1", rows[2][3], "12.50%", "1/1/1", "-", "-"],
        ["vad:off,max_new_tokens:32", "5", "1", rows[3][3], "12.50%", "1/1/1", "-", "-"],
    ]
    for r in rows[2:]:
        assert float(r[3]) == pytest.approx(4 * 2.0 / 3600, abs=1e-4)  # four 2 s files
        assert float(r[8]) > 0 and r[9].endswith(" GiB") and float(r[9].split()[0]) > 0

    (run_dir,) = out.iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "1-defaults.jsonl",
        "2-vad-off_max_new_tokens-32.jsonl",
        "results.md",
        "worker-1.log",
        "worker-2.log",
    ]
    assert done.stdout in (run_dir / "results.md").read_text(encoding="utf-8")
    for name in ("1-defaults.jsonl", "2-vad-off_max_new_tokens-32.jsonl"):
        first = json.loads((run_dir / name).read_text(encoding="utf-8").splitlines()[0])
        assert Path(first["file"]).name == "broken.wav" and first["error"].startswith("INVALID_ARGUMENT: ")
        records = _records(run_dir, name)
        assert {n: _edits(r) for n, r in records.items() if n != "broken.wav"} == {
            "exact.wav": (0, 0, 0),
            "substituted.mp3": (1, 0, 0),
            "deleted.m4a": (0, 1, 0),
            "inserted.flac": (0, 0, 1),
        }
        assert records["substituted.mp3"]["hypothesis"] == SENTENCE
        assert records["substituted.mp3"]["reference"] == ONE_SUBSTITUTION
        assert records["inserted.flac"]["error_rate"] == pytest.approx(1 / 5)
        assert records["exact.wav"]["detected_language"] == "en"


def test_librispeech_run(
    tmp_path: Path, checkpoints: dict[str, Path], speech: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    chapter = tmp_path / "LibriSpeech" / "test-clean" / "1089" / "134686"
    (chapter / "1089-134686.trans.txt").parent.mkdir(parents=True)
    (chapter / "1089-134686.trans.txt").write_text(
        "1089-134686-0000 HELLO WORLD THIS IS A TEST\n1089-134686-0001 HELLO WORLD THIS IS THE TEST\n"
    )
    _write(chapter / "1089-134686-0000.flac", speech)
    _write(chapter / "1089-134686-0001.flac", speech)
    out = tmp_path / "out"
    args = ["--data", str(tmp_path / "LibriSpeech"), "--model", str(checkpoints["asr"]), "--out", str(out)]
    assert cli.main(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in table[2].split("|")[1:-1]][:8] == [
        "defaults", "2", "0", table[2].split("|")[4].strip(), "8.33%", "1/0/0", "-", "-"
    ]  # fmt: skip
    (run_dir,) = out.iterdir()
    records = list(map(json.loads, (run_dir / "1-defaults.jsonl").read_text().splitlines()))
    assert [(Path(r["file"]).name, _edits(r)) for r in records] == [  # worst first
        ("1089-134686-0001.flac", (1, 0, 0)),
        ("1089-134686-0000.flac", (0, 0, 0)),
    ]


def test_manifest_run_scores_chinese_by_characters(
    tmp_path: Path, checkpoints: dict[str, Path], speech: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "zh"
    _write(data / "clips" / "a.wav", speech)
    _write(data / "b.flac", speech)
    lines = [
        {"audio": "clips/a.wav", "text": "你好世界。这是一个测验。", "language": "zh"},  # 测验 for 测试: 1 substitution
        {"audio": "b.flac", "text": "你好 世界 这是 一个 测试"},  # no language: the script says CER; spaces dropped
    ]
    (data / "set.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), "utf-8")
    out = tmp_path / "out"
    args = ["--data", str(data / "set.jsonl"), "--model", str(checkpoints["cjk"]), "--configs", "vad:off"]
    assert cli.main([*args, "--out", str(out)]) == 0
    row = [c.strip() for c in capsys.readouterr().out.splitlines()[2].split("|")[1:-1]]
    assert row[:3] == ["vad:off", "2", "0"]
    assert row[4:8] == ["-", "-", "5.00%", "1/0/0"]  # 1 edit in 20 characters
    (run_dir,) = out.iterdir()
    records = _records(run_dir, "1-vad-off.jsonl")
    assert (
        records["a.wav"].items()
        >= {
            "metric": "cer",
            "substitutions": 1,
            "reference_units": 10,
            "language": "zh",
            "hypothesis": CJK_SENTENCE,
        }.items()
    )
    assert records["b.flac"]["metric"] == "cer" and records["b.flac"]["error_rate"] == 0.0


def test_failed_load_is_reported(tmp_path: Path, speech: np.ndarray, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "data" / "a.wav", speech, "hello")
    out = tmp_path / "out"
    args = ["--data", str(tmp_path / "data"), "--model", str(tmp_path / "no-such-model"), "--out", str(out)]
    assert cli.main(args) == 1
    row = [c.strip() for c in capsys.readouterr().out.splitlines()[2].split("|")[1:-1]]
    assert row[:3] == ["defaults", "1", "1"] and row[4:] == ["-"] * 6
    (run_dir,) = out.iterdir()
    (record,) = _records(run_dir, "1-defaults.jsonl").values()
    assert record["error"].startswith("LoadModel failed: ") and "does not exist" in record["error"]
    assert "Configurations that did not run" in (run_dir / "results.md").read_text()
