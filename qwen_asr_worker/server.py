"""Build the gRPC server around the servicer: thread pool, message limits, and (optionally) bearer-token auth."""

from __future__ import annotations

import logging
import os
from concurrent import futures

import grpc

import backend_pb2_grpc

from .auth import BearerTokenInterceptor, token_from_env
from .engine import Engine
from .servicer import BackendServicer

log = logging.getLogger(__name__)

DEFAULT_MAX_WORKERS = 16
# Requests carry a file path, not audio, so they stay small; results of hour-long files with words do not.
MAX_RECEIVE_BYTES = 16 * 1024 * 1024
MAX_SEND_BYTES = 256 * 1024 * 1024


def max_workers_from_env() -> int:
    """`PYTHON_GRPC_MAX_WORKERS` when set (LocalAI's knob), else a pool large enough for batching."""
    raw = os.environ.get("PYTHON_GRPC_MAX_WORKERS", "").strip()
    if not raw:
        return DEFAULT_MAX_WORKERS
    try:
        value = int(raw)
    except ValueError:
        log.warning("PYTHON_GRPC_MAX_WORKERS=%r is not an integer; using %d", raw, DEFAULT_MAX_WORKERS)
        return DEFAULT_MAX_WORKERS
    return max(1, value)


def create_server(
    address: str, engine: Engine | None = None, *, max_workers: int | None = None, token: str | None = None
) -> tuple[grpc.Server, int, BackendServicer]:
    """Create and start a server on `address` (port 0 picks a free one).

    `token` (default: `LOCALAI_GRPC_AUTH_TOKEN`) turns on bearer-token auth for every rpc.
    Returns the server, the bound port and the servicer (whose `engine` tests can inspect).
    """
    workers = max_workers or max_workers_from_env()
    token = token_from_env() if token is None else token
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
        ],
        maximum_concurrent_rpcs=workers * 4,
        interceptors=[BearerTokenInterceptor(token)] if token else [],
    )
    servicer = BackendServicer(engine or Engine())
    backend_pb2_grpc.add_BackendServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    server.start()
    log.info("serving on %s (port %d, %d worker threads, auth %s)", address, port, workers, "on" if token else "off")
    return server, port, servicer
