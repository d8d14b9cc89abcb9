"""Run in a separate process (its stubs share package `backend` with the worker's): generate a client from the
LocalAI-view proto and call every rpc the worker serves. Prints one JSON object with what came back."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main(addr: str, model: str, aligner: str, audio: str) -> None:
    """Generate stubs into a temp dir, import them, call each rpc, print the results as JSON."""
    here = Path(__file__).resolve().parent
    out = Path(tempfile.mkdtemp())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{here}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "localai_backend.proto",
        ],
        check=True,
    )
    sys.path.insert(0, str(out))
    import grpc
    import localai_backend_pb2 as pb
    import localai_backend_pb2_grpc as rpc

    stub = rpc.BackendStub(grpc.insecure_channel(addr))
    health = stub.Health(pb.HealthMessage(), timeout=30)
    loaded = stub.LoadModel(
        pb.ModelOptions(
            Model=model,
            ContextSize=4096,
            Seed=7,
            F16Memory=True,
            Options=[f"forced_aligner:{aligner}", "max_new_tokens:48"],
        ),
        timeout=120,
    )
    # As LocalAI's HTTP handler fills them for a plain upload: diarize unless the form says false, the model
    # config's threads, the model's identity (core/http/endpoints/openai/transcription.go, core/backend/transcript.go).
    defaults = {"diarize": True, "threads": 4, "temperature": 0.0, "ModelIdentity": model}
    result = stub.AudioTranscription(
        pb.TranscriptRequest(dst=audio, timestamp_granularities=["word"], **defaults), timeout=60
    )
    stream = list(stub.AudioTranscriptionStream(pb.TranscriptRequest(dst=audio, stream=True, **defaults), timeout=60))
    import soundfile

    samples, rate = soundfile.read(audio, dtype="float32")
    live_requests = [pb.TranscriptLiveRequest(config=pb.TranscriptLiveConfig(language="en", sample_rate=rate))]
    live_requests += [
        pb.TranscriptLiveRequest(audio=pb.TranscriptLiveAudio(pcm=samples[i : i + rate // 10].tolist()))
        for i in range(0, len(samples), rate // 10)
    ]
    live = list(stub.AudioTranscriptionLive(iter(live_requests), timeout=60))
    status = stub.Status(pb.HealthMessage(), timeout=30)
    freed = stub.Free(pb.HealthMessage(), timeout=30)
    print(
        json.dumps(
            {
                "health": health.message.decode(),
                "loaded": loaded.success,
                "text": result.text,
                "language": result.language,
                "words": [w.text for s in result.segments for w in s.words],
                "stream_text": "".join(m.delta for m in stream[:-1]),
                "stream_final": stream[-1].final_result.text,
                "live_ready": live[0].ready,
                "live_text": "".join(m.delta for m in live[1:-1]),
                "live_final": live[-1].final_result.text,
                "status": pb.StatusResponse.State.Name(status.state),
                "aligner_bytes": status.memory.breakdown["aligner_weights"],
                "freed": freed.success,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
