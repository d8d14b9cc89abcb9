"""Render a `TranscriptResult` the way LocalAI shows it to a user: verbose JSON (seconds), SRT, VTT, text.

LocalAI builds subtitles from segment start/end (nanoseconds on the wire); this mirrors that so the client and
the tests can check what a user would see. Diarized segments carry a speaker: JSON has it as `speaker` (as
LocalAI's verbose_json does), SRT cues start with `[SPEAKER_00]`, VTT cues use WebVTT's voice span
(`<v SPEAKER_00>`), and text becomes one `SPEAKER_00: ...` line per change of speaker.
"""

from __future__ import annotations

import json
from typing import Any

NS = 1_000_000_000


def _clock(ns: int, separator: str) -> str:
    ms_total = max(0, round(ns / 1_000_000))
    hours, rest = divmod(ms_total, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, ms = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{separator}{ms:03d}"


def _speaker(segment: Any) -> str:
    return getattr(segment, "speaker", "")


def to_srt(result: Any) -> str:
    """SubRip: numbered cues from segments, each led by its `[speaker]` when diarized."""
    cues = [
        f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{f'[{_speaker(s)}] ' if _speaker(s) else ''}{s.text}\n"
        for i, s in enumerate(result.segments, start=1)
    ]
    return "\n".join(cues)


def to_vtt(result: Any) -> str:
    """WebVTT: a header, then one cue per segment, in a `<v speaker>` voice span when diarized."""
    cues = [
        f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{f'<v {_speaker(s)}>' if _speaker(s) else ''}{s.text}\n"
        for s in result.segments
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_text(result: Any) -> str:
    """The transcript; when diarized, one `SPEAKER: text` line each time the speaker changes."""
    if not any(_speaker(s) for s in result.segments):
        return result.text + "\n"
    lines: list[tuple[str, list[str]]] = []
    for segment in result.segments:
        if lines and lines[-1][0] == _speaker(segment):
            lines[-1][1].append(segment.text)
        else:
            lines.append((_speaker(segment), [segment.text]))
    return "".join(f"{speaker}: {' '.join(texts)}\n" for speaker, texts in lines)


def to_verbose_json(result: Any) -> dict[str, Any]:
    """OpenAI-style verbose JSON in seconds: text, language, duration, segments and the flattened words."""
    segments = [
        {
            "id": s.id,
            "start": s.start / NS,
            "end": s.end / NS,
            "text": s.text,
            **({"speaker": _speaker(s)} if _speaker(s) else {}),
            **(
                {"words": [{"word": w.text, "start": w.start / NS, "end": w.end / NS} for w in s.words]}
                if s.words
                else {}
            ),
        }
        for s in result.segments
    ]
    words = [w for s in segments for w in s.get("words", [])]
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": result.language,
        "duration": round(result.duration, 3),
        "text": result.text,
        "segments": segments,
    }
    if words:
        body["words"] = words
    return body


def render(result: Any, fmt: str) -> str:
    """Render in one of: json, srt, vtt, text."""
    if fmt == "srt":
        return to_srt(result)
    if fmt == "vtt":
        return to_vtt(result)
    if fmt == "text":
        return to_text(result)
    return json.dumps(to_verbose_json(result), ensure_ascii=False, indent=2) + "\n"
