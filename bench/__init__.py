"""The worker's benchmark: `python -m bench.run [--quick]` (or `make bench` / `make bench-quick`).

It exists to back the worker's design claims with numbers measured on the machine at hand: lazy aligner
attach-in-place against loading both models eagerly or reloading, the cost of the gRPC layer, what request
batching buys, and that memory comes back. Every scenario runs in a fresh subprocess (`bench.scenarios`), so
resident-memory figures are not polluted by an earlier scenario, and prints one JSON object; `bench.run`
compares them side by side and writes `bench/results/latest.{md,json}`.
"""
