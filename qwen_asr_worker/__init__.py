"""A LocalAI gRPC worker for Qwen3-ASR: transcription, lazily attached forced-aligner timestamps, streaming."""

import os

# oneDNN keeps every primitive it builds for a new input shape, up to 1024 of them, each holding megabytes; windows
# of many lengths (voice activity detection cuts them so) made a long file's resident memory creep by ~1.5 MiB per
# batch (figure 18). 32 kept it flat there at the same speed. Read when oneDNN starts, so set before torch loads;
# an operator's own value wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
