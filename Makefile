# The two commands a newcomer needs: `make run` (serve) and `make test` (pass the tests).
# A bare `make` installs (LocalAI's backend build runs a bare `make`, with the hardware in the environment).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Which torch build gets installed: tools/torch_build.py reads it from the table tools/torch-builds.txt, chosen by
# BUILD_TYPE (empty or cpu, cublas, hipblas, intel, l4t, mps), CUDA_MAJOR_VERSION (12 or 13, for cublas and l4t)
# and BUILD_PROFILE, as LocalAI sets them; e.g.
#   BUILD_TYPE=cublas CUDA_MAJOR_VERSION=12 make
# TORCH_INDEX_URL=URL overrides the index (TORCH_INDEX_URL= for PyPI's default). An unknown BUILD_TYPE fails with
# the list of known ones. The choice is recorded in $(TORCH_BUILD), rewritten only when it changes, so switching
# builds reruns the install (which then reinstalls torch).
TORCH_BUILD := $(VENV)/.torch-build
STAMP := $(VENV)/.installed
STUBS := backend_pb2.py backend_pb2_grpc.py
ADDR ?= 127.0.0.1:50051
# make install DIARIZATION=pyannote adds pyannote.audio, for a `diarization:FOLDER` pyannote pipeline (the embedded
# `diarization:on` needs nothing more than the default install).
DIARIZATION ?=
PYANNOTE := pyannote.audio==4.0.7
BENCH_ARGS ?=
# make eval DATA=DIR [CONFIGS='vad:on; vad:off'] [MODEL=Qwen/Qwen3-ASR-0.6B] [OUT=eval-results]
DATA ?=
CONFIGS ?=
MODEL ?=
OUT ?= eval-results

.PHONY: all install install-steps protogen run test lint bench bench-quick eval clean FORCE

all: install

install: $(STAMP) $(STUBS)
	@if [ "$(DIARIZATION)" = pyannote ]; then \
	  echo "installing $(PYANNOTE) for diarization:FOLDER pipelines"; \
	  $(PY) -m pip install --quiet "$(PYANNOTE)" -c $(VENV)/requirements-build.txt; \
	elif [ -n "$(DIARIZATION)" ]; then echo "make: DIARIZATION=$(DIARIZATION) is unknown; use pyannote" >&2; exit 1; fi

$(TORCH_BUILD): FORCE
	@$(PYTHON) tools/torch_build.py record $@

FORCE:

# If any step fails, the half-made venv goes, so the next make starts again from nothing (never from a venv that
# only looks done).
$(STAMP): requirements.txt requirements-nodeps.txt $(TORCH_BUILD)
	@$(MAKE) --no-print-directory install-steps || \
	  { echo "make: install failed; removed $(VENV), so the next make starts again" >&2; rm -rf $(VENV); exit 1; }
	touch $@

# The install's steps, for $(STAMP) to run. torch first, from the build's index: tools/torch_build.py prints the
# build it chose and why, and if pip fails, the index, the build and the fix. Then the rest from PyPI, with torch
# pinned to the build's version.
install-steps:
	$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PYTHON) tools/torch_build.py install --python $(PY) --record $(VENV)/.torch-installed
	$(PYTHON) tools/torch_build.py requirements > $(VENV)/requirements-build.txt
	$(PY) -m pip install --quiet -r $(VENV)/requirements-build.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt

protogen: $(STUBS)

$(STUBS) &: backend.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. backend.proto

run: install
	./run.sh --addr $(ADDR)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The fast-decode tests and the diarization pipeline's first as on a CPU without AVX-512 (oneDNN and ATen capped at
# AVX2, so oneDNN refuses to pack bf16; our kernels built for Haswell), so a machine with AVX-512 checks that path
# too; then the whole suite on the CPU as it is.
test: install lint
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 QWEN_ASR_KERNEL_MARCH=haswell \
	  $(PY) -m pytest -q -p no:cacheprovider tests/test_fast_decode.py tests/test_diarization.py -k "not rpc"
	$(PY) -m pytest tests test.py

bench-quick: install
	$(PY) -m bench.run --quick $(BENCH_ARGS)

bench: install
	$(PY) -m bench.run $(BENCH_ARGS)

# Word error rate of the worker over DATA, one fresh worker per configuration (README: Evaluating a change).
eval: install
	@test -n "$(DATA)" || { echo "make eval: set DATA to a folder of audio with references (pairs, LibriSpeech or a JSONL manifest), e.g. make eval DATA=LibriSpeech/test-clean" >&2; exit 2; }
	$(PY) -m qwen_asr_worker.eval --data "$(DATA)" --configs "$(CONFIGS)" --out "$(OUT)" $(if $(MODEL),--model "$(MODEL)")

clean:
	rm -rf $(VENV) $(STUBS) backend_pb2.pyi .pytest_cache .ruff_cache
