"""A LocalAI gRPC worker for Qwen3-ASR: transcription, lazily attached forced-aligner timestamps, streaming."""
