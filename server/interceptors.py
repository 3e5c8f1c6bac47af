"""ErrorInterceptor: the single place where errors become gRPC status codes.

Servicers raise the runtime's typed errors and never pick a status code;
`STATUS_FOR_ERROR` below is the whole mapping. Anything not in it is a bug:
the client gets INTERNAL with the request id (never the traceback), and the
traceback goes to the log. The interceptor also gives every request an id
before the servicer sees it, and writes one log line per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from guard import errors

log = logging.getLogger(__name__)

STATUS_FOR_ERROR: dict[type[Exception], grpc.StatusCode] = {
    errors.InvalidImageError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.BackendUnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.CancelledError: grpc.StatusCode.CANCELLED,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ModelLoadError: grpc.StatusCode.UNAVAILABLE,
}

SERVICE_PREFIX = "/medhallguard.v1.MedHallGuard/"


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for an error: the nearest type in STATUS_FOR_ERROR, else INTERNAL."""
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR_ERROR:
            return STATUS_FOR_ERROR[cls]
    return grpc.StatusCode.INTERNAL


def details_for(exc: BaseException, request_id: str) -> str:
    """What the client reads: our own message for typed errors, nothing internal otherwise."""
    if status_for(exc) is grpc.StatusCode.INTERNAL:
        return f"internal error (request_id={request_id}); the server log has the details"
    return f"{exc} (request_id={request_id})" if request_id else str(exc)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every MedHallGuard method: request id, error -> status, one log line."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler  # health and reflection pass through untouched
        name = method[len(SERVICE_PREFIX) :]
        # Requests arrive as bytes and are parsed inside the wrapper, so that a malformed message
        # is INVALID_ARGUMENT from the table below, not grpc's own UNKNOWN.
        parse = _parser(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(name, handler.unary_unary, parse),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(name, handler.unary_stream, parse),
                response_serializer=handler.response_serializer,
            )
        raise AssertionError(f"{method}: only unary and server-streaming methods are wrapped")


def _parser(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes):
        try:
            return deserialize(raw)
        except Exception as e:  # protobuf's DecodeError (or a serializer's own error)
            raise errors.InvalidRequestError(
                f"the request is not a valid protobuf message for this method ({e}); "
                f"build it from proto/medhallguard/v1/guard.proto"
            ) from None

    return parse


def _wrap_unary(name: str, behavior: Callable[[Any, Any], Awaitable[Any]], parse: Callable[[bytes], Any]):
    async def unary(raw, context):
        request_id, t0 = "", time.perf_counter()
        try:
            request = parse(raw)
            request_id = _assign_request_id(request)
            response = await behavior(request, context)
        except BaseException as exc:
            await _fail(exc, name, request_id, t0, context)
            raise
        _log_request(name, request_id, grpc.StatusCode.OK, _verdict_name(response), t0)
        return response

    return unary


def _wrap_stream(name: str, behavior: Callable[[Any, Any], AsyncIterator[Any]], parse: Callable[[bytes], Any]):
    async def unary_stream(raw, context):
        request_id, t0, verdict = "", time.perf_counter(), "-"
        try:
            request = parse(raw)
            request_id = _assign_request_id(request)
            async for message in behavior(request, context):
                if message.WhichOneof("event") == "final":
                    verdict = _verdict_name(message.final)
                yield message
        except BaseException as exc:
            await _fail(exc, name, request_id, t0, context)
            raise
        _log_request(name, request_id, grpc.StatusCode.OK, verdict, t0)

    return unary_stream


async def _fail(exc: BaseException, name: str, request_id: str, t0: float, context) -> None:
    """Log the failure and abort the RPC with the mapped status; returns only for non-errors."""
    if isinstance(exc, grpc.aio.AbortError):
        return  # someone already chose the status
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        # The client went away or grpc's own deadline fired; grpc has sent the status.
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        _log_request(name, request_id, code, "-", t0)
        return
    if not isinstance(exc, Exception):
        return  # KeyboardInterrupt, SystemExit: not ours to translate
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("rpc=%s request_id=%s failed unexpectedly", name, request_id, exc_info=exc)
    _log_request(name, request_id, code, "-", t0, detail=str(exc) if code is not grpc.StatusCode.INTERNAL else "")
    await context.abort(code, details_for(exc, request_id))


def _assign_request_id(request) -> str:
    """Give the request an id if the client sent none, so logs and errors can name it."""
    if "request_id" not in type(request).DESCRIPTOR.fields_by_name:
        return ""
    if not request.request_id:
        request.request_id = uuid.uuid4().hex
    return request.request_id


def _verdict_name(response) -> str:
    if "verdict" not in type(response).DESCRIPTOR.fields_by_name:
        return "-"
    return type(response).DESCRIPTOR.fields_by_name["verdict"].enum_type.values_by_number[response.verdict].name


def _log_request(name: str, request_id: str, code: grpc.StatusCode, verdict: str, t0: float, detail: str = "") -> None:
    total_ms = (time.perf_counter() - t0) * 1e3
    log.info(
        "rpc=%s request_id=%s status=%s verdict=%s total_ms=%.1f%s",
        name,
        request_id or "-",
        code.name,
        verdict,
        total_ms,
        f" detail={detail!r}" if detail else "",
    )
