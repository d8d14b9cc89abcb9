"""Word-error-rate evaluation of the worker: `make eval DATA=DIR` or `python -m qwen_asr_worker.eval --data DIR`.

Before a default changes (int8, VAD off, another dtype), the change should be measured on real speech with
references. This package runs the real worker as LocalAI does, once per configuration, over a folder of audio
and transcripts, and reports one table: error rates, edit counts, realtime factor and peak memory.

Split by concern: `data` (layouts → items, pure), `scoring` (normalization + jiwer, pure), `runner` (worker
processes and gRPC), `report` (table, Markdown, JSON lines), `cli` (the command line).
"""
