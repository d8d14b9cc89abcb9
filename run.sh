#!/usr/bin/env bash
# Start the worker from the project's virtualenv. LocalAI calls: run.sh --addr 127.0.0.1:PORT
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ ! -x "$here/.venv/bin/python" ] || [ ! -f "$here/backend_pb2.py" ]; then
  echo "run.sh: no virtualenv or stubs in $here; run 'make install' first" >&2
  exit 1
fi
cd "$here"
exec "$here/.venv/bin/python" "$here/backend.py" "$@"
