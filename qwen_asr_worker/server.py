"""Build the gRPC server around the servicer: thread pool, message limits, and (optionally) bearer-token auth."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

import backend_pb2
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


class _Malformed:
    """Stands in for a request whose bytes do not parse as its message (only a hand-built client sends one)."""

    def __init__(self, error: str) -> None:
        self.error = error


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    """Answers a request that does not parse (e.g. a string field that is not UTF-8) with the parser's reason
    instead of gRPC's bare INTERNAL "Exception deserializing request!": LoadModel with `success: false`, as it
    reports every failure, the other rpcs with INVALID_ARGUMENT."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, details.method

        def lenient(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as exc:
                return _Malformed(f"the {method} request does not parse: {exc}")

        if handler.unary_stream:
            stream = handler.unary_stream

            def checked_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                if isinstance(request, _Malformed):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
                yield from stream(request, context)

            return grpc.unary_stream_rpc_method_handler(checked_stream, lenient, handler.response_serializer)
        unary = handler.unary_unary

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                log.warning("%s", request.error)
                if method.endswith("/LoadModel"):
                    return backend_pb2.Result(success=False, message=request.error)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
            return unary(request, context)

        return grpc.unary_unary_rpc_method_handler(checked, lenient, handler.response_serializer)


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
        # Auth first: a denied call is answered before anything parses its payload.
        interceptors=[*([BearerTokenInterceptor(token)] if token else []), MalformedRequestInterceptor()],
    )
    servicer = BackendServicer(engine or Engine())
    backend_pb2_grpc.add_BackendServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    server.start()
    log.info("serving on %s (port %d, %d worker threads, auth %s)", address, port, workers, "on" if token else "off")
    return server, port, servicer
