"""Evaluation data: find audio files and their reference transcripts in one of three layouts.

Pure file-system reading, no audio decoding: the worker decodes, as it does for LocalAI. Every problem found here
is a `DataError` whose message names the specific problem (file, line number) and the supported layouts, so a
wrong `DATA=` fails in a second with a readable message instead of an hour into a run.

Layouts:

* pairs: `x.wav|flac|mp3|m4a` next to `x.txt` (same stem), in any subfolder;
* LibriSpeech: folders with `*.trans.txt` whose lines read `UTTID TEXT`, audio `UTTID.flac` in the same folder;
* a JSONL manifest: one `{"audio": path, "text": reference, "language": "en"}` per line (language optional),
  audio paths relative to the manifest's folder. DATA is the manifest itself or a folder with exactly one
  `*.jsonl` at its top level.

Pairs and LibriSpeech folders may be mixed under one DATA folder; a manifest is read on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..languages import LanguageError, resolve_language

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".m4a")
LIBRISPEECH_SUFFIX = ".trans.txt"
_SHOWN_PROBLEMS = 5

LAYOUTS = """supported layouts:
  pairs       x.wav|x.flac|x.mp3|x.m4a with the reference in x.txt (same stem, any subfolder)
  LibriSpeech folders with *.trans.txt ("UTTID TEXT" per line) and UTTID.flac next to it
  JSONL       a manifest file (or a folder holding exactly one *.jsonl) with one
              {"audio": "path", "text": "reference", "language": "en"} per line (language optional,
              audio paths relative to the manifest's folder)"""


class DataError(ValueError):
    """DATA is not in a supported layout, or an entry in it is broken; the message says which and where, then
    lists the supported layouts."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}\n{LAYOUTS}")


@dataclass(frozen=True)
class Item:
    """One audio file to transcribe and what it should say.

    `audio` is absolute (the worker runs in its own directory). `language` is the manifest's language as
    written (sent to the worker, which resolves it) or None to let the model detect it.
    """

    audio: Path
    reference: str
    language: str | None = None


def load_items(data: Path) -> list[Item]:
    """Read DATA (a folder, or a JSONL manifest) into items sorted by audio path.

    Raises:
        DataError: DATA is missing, empty, in no supported layout, or has a broken entry.
    """
    if not data.exists():
        raise DataError(f"{data} does not exist")
    if data.is_file():
        if data.suffix.lower() != ".jsonl":
            raise DataError(f"{data} is a file but not a .jsonl manifest")
        return read_manifest(data)
    manifests = sorted(p for p in data.glob("*.jsonl") if p.is_file())
    if len(manifests) > 1:
        names = ", ".join(p.name for p in manifests)
        raise DataError(f"{data} holds {len(manifests)} manifests ({names}); pass the one to use as DATA")
    if manifests:
        return read_manifest(manifests[0])
    return _read_folder(data)


def read_manifest(manifest: Path) -> list[Item]:
    """Read a JSONL manifest; blank lines are skipped.

    Raises:
        DataError: a line is not a JSON object with string `audio` and `text`, its language is not one the
            model supports, or its audio file does not exist (the message gives the line number).
    """
    items: list[Item] = []
    base = manifest.resolve().parent
    lines = manifest.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{manifest}, line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        for key in ("audio", "text"):
            if not isinstance(entry.get(key), str):
                raise DataError(f"{where}: {key!r} is missing or not a string")
        language = entry.get("language")
        if language is not None and not isinstance(language, str):
            raise DataError(f"{where}: 'language' must be a string such as \"en\"")
        try:
            if language is not None and resolve_language(language) is None:
                language = None  # "auto" or "": let the model detect it
        except LanguageError as exc:
            raise DataError(f"{where}: {exc}") from None
        audio = (base / entry["audio"]).resolve()
        if not audio.is_file():
            raise DataError(f"{where}: audio file {audio} not found")
        items.append(Item(audio, entry["text"], language))
    if not items:
        raise DataError(f"{manifest} has no entries")
    return sorted(items, key=lambda item: str(item.audio))


def _read_folder(data: Path) -> list[Item]:
    """Pairs and LibriSpeech folders under `data`, recursively."""
    librispeech = _read_librispeech(data)
    covered = {item.audio for item in librispeech}
    items = list(librispeech)
    missing: list[Path] = []
    for audio in sorted(p for p in data.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()):
        audio = audio.resolve()
        if audio in covered:
            continue
        reference = audio.with_suffix(".txt")
        if reference.is_file():
            items.append(Item(audio, reference.read_text(encoding="utf-8").strip()))
        else:
            missing.append(audio)
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:_SHOWN_PROBLEMS])
        more = f"\n  ... and {len(missing) - _SHOWN_PROBLEMS} more" if len(missing) > _SHOWN_PROBLEMS else ""
        raise DataError(f"{len(missing)} audio file(s) have no reference transcript:\n  {shown}{more}")
    if not items:
        raise DataError(f"no audio files with references found in {data}")
    return sorted(items, key=lambda item: str(item.audio))


def _read_librispeech(data: Path) -> list[Item]:
    items: list[Item] = []
    for transcript in sorted(data.rglob(f"*{LIBRISPEECH_SUFFIX}")):
        folder = transcript.resolve().parent
        for number, line in enumerate(transcript.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            utterance, _, text = line.strip().partition(" ")
            where = f"{transcript}, line {number}"
            if not text.strip():
                raise DataError(f"{where}: expected 'UTTID TEXT', got {line.strip()!r}")
            audio = folder / f"{utterance}.flac"
            if not audio.is_file():
                raise DataError(f"{where}: audio file {audio} not found")
            items.append(Item(audio, text.strip()))
    return items
