"""The edge where gRPC's errors enter Gossamer's error tree, and where ours leave as statuses."""

from __future__ import annotations

import grpc

from gossamer.core.errors import (
    AuthenticationError,
    ConfigError,
    DeadlineExceededError,
    GossamerError,
    NotInRoundError,
    PeerLostError,
    PeerUnavailableError,
    ProtocolError,
    RetryableError,
)

__all__ = ["HANDLER_ANSWERED", "answered_by_handler", "error_of_rpc_error", "status_of_error"]

HANDLER_ANSWERED = (("gossamer-answered", "1"),)
"""Trailing metadata a handler's own refusal carries: the peer answered, its connection works
(an UNAVAILABLE from gRPC itself means the connection broke)."""

_ERROR_OF_CODE: dict[grpc.StatusCode, type[GossamerError]] = {
    grpc.StatusCode.UNAVAILABLE: PeerUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.INVALID_ARGUMENT: ProtocolError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ProtocolError,
    grpc.StatusCode.OUT_OF_RANGE: ProtocolError,
    grpc.StatusCode.UNIMPLEMENTED: ProtocolError,
    grpc.StatusCode.FAILED_PRECONDITION: NotInRoundError,  # (only ours say it)
    grpc.StatusCode.NOT_FOUND: ProtocolError,
    grpc.StatusCode.ALREADY_EXISTS: ProtocolError,
    # The connection broke mid-call, or the peer's handler died: the peer may come back.
    grpc.StatusCode.CANCELLED: PeerLostError,
    grpc.StatusCode.ABORTED: PeerLostError,
    grpc.StatusCode.UNKNOWN: PeerLostError,
    grpc.StatusCode.INTERNAL: PeerLostError,
    grpc.StatusCode.DATA_LOSS: PeerLostError,
}


def error_of_rpc_error(exc: grpc.RpcError, peer: str, method: str) -> GossamerError:
    """The Gossamer error for a failed call; raise it ``from exc``.

    Args:
        exc: what gRPC raised.
        peer: the remote peer (id or address), named in the message.
        method: the RPC, named in the message.
    """
    code = exc.code() if isinstance(exc, grpc.aio.AioRpcError | grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.aio.AioRpcError | grpc.Call) else str(exc)
    kind = _ERROR_OF_CODE.get(code, PeerLostError) if code is not None else PeerLostError
    name = code.name if code is not None else "error"
    return kind(f"{method} to {peer} failed: {name}: {details}")


def answered_by_handler(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the peer's handler itself ended the call with this error (see
    :data:`HANDLER_ANSWERED`)."""
    return any((key, value) == HANDLER_ANSWERED[0] for key, value in exc.trailing_metadata() or ())


def status_of_error(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a handler aborts with for one of our errors (or an unexpected one)."""
    if isinstance(exc, AuthenticationError):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, NotInRoundError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, ProtocolError | ConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, RetryableError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
