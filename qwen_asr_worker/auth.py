"""Bearer-token auth, as LocalAI does it: with `LOCALAI_GRPC_AUTH_TOKEN` set, every rpc must carry
`authorization: Bearer <token>` metadata; without it, no auth (LocalAI's default on loopback)."""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import Any

import grpc

TOKEN_ENV = "LOCALAI_GRPC_AUTH_TOKEN"
_DENIED = f"missing or wrong bearer token: send metadata 'authorization: Bearer <token>' matching {TOKEN_ENV}"


def token_from_env() -> str:
    """The configured token, or "" when auth is off."""
    return os.environ.get(TOKEN_ENV, "").strip()


def _unparsed(data: bytes) -> bytes:
    return data  # not None: gRPC takes a None request for a parse failure


def _deny(request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects every call whose `authorization` metadata is not `Bearer <token>` (constant-time compare)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an empty token would let everyone in; leave auth off instead")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        given = ""
        for key, value in details.invocation_metadata or ():
            if key.lower() == "authorization" and isinstance(value, str):
                given = value
        if hmac.compare_digest(given.encode(), self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        # The payload of a denied call is never parsed: no work for an unauthenticated client, and a malformed
        # body cannot turn UNAUTHENTICATED into a parse error.
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(_deny, _unparsed, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_deny, _unparsed, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(_deny, _unparsed, handler.response_serializer)
