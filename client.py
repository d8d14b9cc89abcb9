#!/usr/bin/env python3
"""A small command-line client for the worker, showing what LocalAI would show a user.

python client.py load /models/Qwen3-ASR-0.6B --option forced_aligner:Qwen/Qwen3-ForcedAligner-0.6B
python client.py transcribe talk.m4a --timestamps word --format srt
python client.py transcribe talk.m4a --stream
python client.py transcribe meeting.m4a --diarize --timestamps word --format srt   # needs diarization:on
python client.py diarize meeting.m4a --num-speakers 3 --include-text
python client.py live talk.m4a --param words=true    # streams the file at real-time pace, as a microphone would
python client.py status
python client.py free
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

import backend_pb2
import backend_pb2_grpc
from qwen_asr_worker.audio import SAMPLE_RATE, load_audio
from qwen_asr_worker.formats import render


def _metadata() -> list[tuple[str, str]]:
    token = os.environ.get("LOCALAI_GRPC_AUTH_TOKEN", "")
    return [("authorization", f"Bearer {token}")] if token else []


def _stub(addr: str) -> backend_pb2_grpc.BackendStub:
    channel = grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)])
    return backend_pb2_grpc.BackendStub(channel)


def cmd_load(args: argparse.Namespace) -> int:
    """LoadModel with optional `--option key:value` items."""
    reply = _stub(args.addr).LoadModel(
        backend_pb2.ModelOptions(Model=args.model, ModelPath=args.model_path, Options=args.option or []),
        metadata=_metadata(),
    )
    print(reply.message)
    return 0 if reply.success else 1


def cmd_transcribe(args: argparse.Namespace) -> int:
    """AudioTranscription (or the stream) for one file; prints the chosen format."""
    request = backend_pb2.TranscriptRequest(
        dst=os.path.abspath(args.file),
        language=args.language,
        prompt=args.prompt,
        timestamp_granularities=[args.timestamps] if args.timestamps else [],
        stream=args.stream,
        diarize=args.diarize,
    )
    stub = _stub(args.addr)
    if not args.stream:
        result = stub.AudioTranscription(request, metadata=_metadata(), timeout=args.timeout)
        sys.stdout.write(render(result, args.format))
        return 0
    return _print_deltas(stub.AudioTranscriptionStream(request, metadata=_metadata(), timeout=args.timeout), args)


def cmd_diarize(args: argparse.Namespace) -> int:
    """Diarize: who spoke when, as JSON (seconds), with each turn's text when `--include-text`."""
    request = backend_pb2.DiarizeRequest(
        dst=os.path.abspath(args.file),
        language=args.language,
        num_speakers=args.num_speakers,
        min_speakers=args.min_speakers,
        max_speakers=args.max_speakers,
        clustering_threshold=args.clustering_threshold,
        min_duration_on=args.min_duration_on,
        min_duration_off=args.min_duration_off,
        include_text=args.include_text,
    )
    reply = _stub(args.addr).Diarize(request, metadata=_metadata(), timeout=args.timeout)
    body = {
        "num_speakers": reply.num_speakers,
        "duration": round(reply.duration, 3),
        "language": reply.language,
        "segments": [
            {"id": s.id, "start": round(s.start, 3), "end": round(s.end, 3), "speaker": s.speaker}
            | ({"text": s.text} if s.text else {})
            for s in reply.segments
        ],
    }
    print(json.dumps(body, ensure_ascii=False, indent=2))
    return 0


def _print_deltas(messages: Iterable[Any], args: argparse.Namespace) -> int:
    """Print each delta as it comes, a newline, then the final result in `--format` (unless text)."""
    final = None
    for message in messages:
        if message.HasField("final_result"):
            final = message.final_result
        elif message.delta:
            sys.stdout.write(message.delta)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if final is not None and args.format != "text":
        sys.stdout.write(render(final, args.format))
    return 0


def _live_requests(args: argparse.Namespace) -> Iterator[backend_pb2.TranscriptLiveRequest]:
    """The config, then the file's audio in `--message-seconds` pieces, at real-time pace unless `--fast`."""
    params = dict(item.split("=", 1) for item in args.param or [])
    yield backend_pb2.TranscriptLiveRequest(
        config=backend_pb2.TranscriptLiveConfig(language=args.language, sample_rate=SAMPLE_RATE, params=params)
    )
    samples = load_audio(os.path.abspath(args.file))
    step = max(1, round(args.message_seconds * SAMPLE_RATE))
    started = time.monotonic()
    for i in range(0, len(samples), step):
        if not args.fast:
            time.sleep(max(0.0, started + i / SAMPLE_RATE - time.monotonic()))
        yield backend_pb2.TranscriptLiveRequest(audio=backend_pb2.TranscriptLiveAudio(pcm=samples[i : i + step]))


def cmd_live(args: argparse.Namespace) -> int:
    """AudioTranscriptionLive: stream a file as a microphone would and print text as it is finalized."""
    for item in args.param or []:
        if "=" not in item:
            raise SystemExit(f"--param {item!r}: write KEY=VALUE, e.g. --param chunk_seconds=1.5")
    return _print_deltas(_stub(args.addr).AudioTranscriptionLive(_live_requests(args), metadata=_metadata()), args)


def cmd_status(args: argparse.Namespace) -> int:
    """Status: state and memory breakdown as JSON."""
    reply = _stub(args.addr).Status(backend_pb2.HealthMessage(), metadata=_metadata())
    state = backend_pb2.StatusResponse.State.Name(reply.state)
    print(json.dumps({"state": state, "total": reply.memory.total, **dict(reply.memory.breakdown)}, indent=2))
    return 0


def cmd_free(args: argparse.Namespace) -> int:
    """Free: unload every model."""
    print(_stub(args.addr).Free(backend_pb2.HealthMessage(), metadata=_metadata()).message)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--addr", default="127.0.0.1:50051")
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="load a model")
    load.add_argument("model")
    load.add_argument("--model-path", default="")
    load.add_argument("--option", action="append", metavar="KEY:VALUE")
    load.set_defaults(func=cmd_load)
    tr = sub.add_parser("transcribe", help="transcribe a file")
    tr.add_argument("file")
    tr.add_argument("--language", default="")
    tr.add_argument("--prompt", default="")
    tr.add_argument("--timestamps", choices=["word", "segment"])
    tr.add_argument("--format", choices=["json", "srt", "vtt", "text"], default="json")
    tr.add_argument("--stream", action="store_true", help="print text deltas as windows finish")
    tr.add_argument("--diarize", action="store_true", help="label speakers (the model needs diarization:on)")
    tr.add_argument("--timeout", type=float, default=None)
    tr.set_defaults(func=cmd_transcribe)
    dz = sub.add_parser("diarize", help="who spoke when in a file (the model needs diarization:on)")
    dz.add_argument("file")
    dz.add_argument("--language", default="")
    dz.add_argument("--num-speakers", type=int, default=0)
    dz.add_argument("--min-speakers", type=int, default=0)
    dz.add_argument("--max-speakers", type=int, default=0)
    dz.add_argument("--clustering-threshold", type=float, default=0.0)
    dz.add_argument("--min-duration-on", type=float, default=0.0)
    dz.add_argument("--min-duration-off", type=float, default=0.0)
    dz.add_argument("--include-text", action="store_true", help="add each turn's transcript")
    dz.add_argument("--timeout", type=float, default=None)
    dz.set_defaults(func=cmd_diarize)
    live = sub.add_parser("live", help="stream a file as live audio (LocalAI's realtime API)")
    live.add_argument("file")
    live.add_argument("--language", default="")
    live.add_argument("--param", action="append", metavar="KEY=VALUE", help="chunk_seconds, words, ... (repeat)")
    live.add_argument("--fast", action="store_true", help="send as fast as possible instead of in real time")
    live.add_argument("--message-seconds", type=float, default=0.1, help="audio per message (default 0.1)")
    live.add_argument("--format", choices=["json", "srt", "vtt", "text"], default="text")
    live.set_defaults(func=cmd_live)
    sub.add_parser("status", help="state and memory").set_defaults(func=cmd_status)
    sub.add_parser("free", help="unload models").set_defaults(func=cmd_free)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; gRPC errors print their status and message."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
