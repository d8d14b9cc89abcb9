# The two commands a newcomer needs: `make run` (serve) and `make test` (pass the tests).
# A bare `make` installs (LocalAI's backend build runs a bare `make`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Where torch comes from. The default is PyTorch's CPU-only index; for a CUDA build, e.g.
#   make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# or TORCH_INDEX_URL= (empty) to take whatever PyPI serves for your platform.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TORCH_PIN := $(shell grep -E '^torch==' requirements.txt)
STAMP := $(VENV)/.installed
STUBS := backend_pb2.py backend_pb2_grpc.py
ADDR ?= 127.0.0.1:50051
BENCH_ARGS ?=

.PHONY: all install protogen run test lint bench bench-quick clean

all: install

install: $(STAMP) $(STUBS)

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch alone from its index (no deps: those come from PyPI with the rest, without asking that index again)
	$(PY) -m pip install --quiet --no-deps "$(TORCH_PIN)" $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

protogen: $(STUBS)

$(STUBS) &: backend.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. backend.proto

run: install
	./run.sh --addr $(ADDR)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(PY) -m pytest tests test.py

bench-quick: install
	$(PY) -m bench.run --quick $(BENCH_ARGS)

bench: install
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(STUBS) backend_pb2.pyi .pytest_cache .ruff_cache
