"""Test and benchmark support: offline random-weight checkpoints loadable by the real qwen-asr code."""
