"""ErrorInterceptor: the single place where errors become gRPC status codes.

Servicers raise the runtime's typed errors and never pick a status code;
`STATUS_FOR_ERROR` below is the whole mapping. Anything not in it is a bug:
the client gets INTERNAL with the request id (never the traceback), and the
traceback goes to the log.

Around every MedHallGuard call, in this order: give it a request id (also in
every log line, via server.logs), check its bearer token (server.security),
refuse it while draining, run the servicer, then write the audit entry
(fsync'd before the response leaves), count it in the metrics, log one line.
Health and reflection pass through, behind the token check when configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from guard import errors
from server import logs
from server.audit import AuditWriteError
from server.security import PermissionDeniedError, UnauthenticatedError, client_identity
from server.service import verdict_name

log = logging.getLogger(__name__)

STATUS_FOR_ERROR: dict[type[Exception], grpc.StatusCode] = {
    errors.InvalidImageError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.BackendUnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.CancelledError: grpc.StatusCode.CANCELLED,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ModelLoadError: grpc.StatusCode.UNAVAILABLE,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    AuditWriteError: grpc.StatusCode.UNAVAILABLE,
}

SERVICE_PREFIX = "/medhallguard.v1.MedHallGuard/"
DRAINING = "server is draining: it is shutting down and takes no new requests; retry on another replica"


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


@dataclass
class _Call:
    """What the interceptor knows about one RPC while it runs."""

    rpc: str
    request: Any
    request_id: str
    client: str
    peer: str
    t0: float
    refused: Exception | None = None
    """The auth error to raise for a missing or invalid token (or a failing token check), else None."""
    malformed: errors.InvalidRequestError | None = None
    """The parse error to raise for a request that is not valid protobuf, else None."""
    recorded: bool = False
    """True once the call's outcome is audited and counted."""


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every MedHallGuard method: request id, auth, drain, error -> status, audit, metrics, log line.

    `auth` (server.security.Auth), `audit` (server.audit.AuditLog) and `metrics`
    (server.metrics.Metrics) are each optional; `model_checksum` names the model
    in audit entries of calls that failed before the model answered.
    """

    def __init__(self, auth=None, audit=None, metrics=None, model_checksum: str = ""):
        self.auth, self.audit, self.metrics, self.model_checksum = auth, audit, metrics, model_checksum
        self.draining = False
        """Set on shutdown: new MedHallGuard calls get UNAVAILABLE, in-flight ones finish."""
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return None
        if not method.startswith(SERVICE_PREFIX):  # health and reflection
            if self.auth is not None and self.auth.required_for(method):
                try:
                    self.auth.client_for(handler_call_details.invocation_metadata)
                except (UnauthenticatedError, PermissionDeniedError) as exc:
                    return _refusal(handler, status_for(exc), str(exc))
            return handler
        name = method[len(SERVICE_PREFIX) :]
        # Requests arrive as bytes and are parsed in the wrapper, so that a malformed message is
        # INVALID_ARGUMENT (audited, counted) rather than grpc's own UNKNOWN.
        parse = handler.request_deserializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(name, handler.unary_unary, parse),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(name, handler.unary_stream, parse),
                response_serializer=handler.response_serializer,
            )
        raise AssertionError(f"{method}: only unary and server-streaming methods are wrapped")

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no MedHallGuard call is in flight, at most timeout_s; -> whether that happened."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    def _wrap_unary(self, name: str, behavior: Callable[[Any, Any], Awaitable[Any]], parse: Callable[[bytes], Any]):
        async def unary(raw, context):
            async with self._serving(name, raw, parse, context) as call:
                response = await behavior(call.request, context)
                await self._record(call, grpc.StatusCode.OK, response)  # audit is on disk before we return
                return response

        return unary

    def _wrap_stream(self, name: str, behavior: Callable[[Any, Any], AsyncIterator[Any]],
                     parse: Callable[[bytes], Any]):
        async def unary_stream(raw, context):
            async with self._serving(name, raw, parse, context) as call:
                async for message in behavior(call.request, context):
                    if message.WhichOneof("event") == "final":
                        await self._record(call, grpc.StatusCode.OK, message.final)  # before the verdict is sent
                    yield message

        return unary_stream

    @contextlib.asynccontextmanager
    async def _serving(self, name: str, raw: bytes, parse: Callable[[bytes], Any], context):
        """One call, unary or streaming: begin and admit it, turn any error into its recorded status, count it out."""
        call = self._begin(name, raw, parse, context)
        try:
            self._admit(call)
            yield call
        except BaseException as exc:  # also a stream's GeneratorExit and a cancellation: _fail records them
            await self._fail(exc, call, context)
            raise
        finally:
            self._end()

    def _begin(self, name: str, raw: bytes, parse: Callable[[bytes], Any], context) -> _Call:
        """Parse the request, identify the caller, give the request an id and count it in flight."""
        request, malformed = _parse(parse, raw)
        request_id = _assign_request_id(request)
        logs.request_id.set(request_id)  # this RPC's task (and the worker it starts) logs with it
        self.in_flight += 1
        self._idle.clear()
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        client, refused = self._identify(context)
        return _Call(name, request, request_id, client, context.peer(), time.perf_counter(), refused, malformed)

    def _identify(self, context) -> tuple[str, Exception | None]:
        """-> (who called, the auth error if the token is refused); a refused caller is named by cert or peer."""
        token_client = None
        refused = None
        if self.auth is not None:
            try:
                token_client = self.auth.client_for(context.invocation_metadata())
            except Exception as exc:  # UnauthenticatedError, PermissionDeniedError; _admit raises it in the bracket
                refused = exc
        return client_identity(context, token_client), refused

    def _admit(self, call: _Call) -> None:
        """Raise for a bad token (the auth errors), then while draining, then for a malformed request."""
        if call.refused is not None:
            raise call.refused
        if self.draining:
            raise errors.BackendUnavailableError(DRAINING)
        if call.malformed is not None:
            raise call.malformed

    def _end(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()
        if self.metrics is not None:
            self.metrics.in_flight.dec()

    async def _record(self, call: _Call, code: grpc.StatusCode, response, error: str = "") -> None:
        """Audit (fsync'd; raises AuditWriteError), count and log one finished call."""
        if self.audit is not None:  # the entry hashes the image: built in the worker too, off the event loop
            await asyncio.to_thread(self._audit, call, code, response, error)
        call.recorded = True
        if self.metrics is not None:
            self.metrics.observe_call(call.rpc, code, response, time.perf_counter() - call.t0)
        _log_request(call, code, (verdict_name(response) if response is not None else None) or "-", error)

    def _audit(self, call: _Call, code: grpc.StatusCode, response, error: str) -> None:
        self.audit.write(self.audit.entry(call.rpc, call.request_id, call.client, call.peer, call.request, response,
                                          code, error, self.model_checksum))

    async def _fail(self, exc: BaseException, call: _Call, context) -> None:
        """Record the failure and abort the RPC with the mapped status; returns only for non-errors."""
        if isinstance(exc, grpc.aio.AbortError):
            return  # someone already chose the status (and recorded it)
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            # The client went away or grpc's own deadline fired; grpc has sent the status.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            if not call.recorded:  # a stream whose final message was recorded, then not delivered, stays OK
                await self._record_failure(call, code, "deadline exceeded" if expired else "the client cancelled")
            return
        if not isinstance(exc, Exception):
            return  # KeyboardInterrupt, SystemExit: not ours to translate
        code = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("rpc=%s request_id=%s failed unexpectedly", call.rpc, call.request_id, exc_info=exc)
        detail = str(exc) if code is not grpc.StatusCode.INTERNAL else "internal error; the server log has the details"
        await self._record_failure(call, code, detail)
        remaining = context.time_remaining()
        if context.cancelled() or (remaining is not None and remaining <= 0):
            # The client left, or its deadline passed as our own timer fired: grpc ends the call itself,
            # and a status sent now races it (grpc logs an ExecuteBatchError with a traceback). Send none.
            raise asyncio.CancelledError(f"rpc {call.rpc} ended before its status {code.name} could be sent")
        await context.abort(code, details_for(exc, call.request_id))

    async def _record_failure(self, call: _Call, code: grpc.StatusCode, detail: str) -> None:
        try:
            await self._record(call, code, None, detail)
        except (AuditWriteError, asyncio.CancelledError) as e:  # the status still goes out; the log says why
            log.error("rpc=%s request_id=%s: no audit entry for this failure: %s", call.rpc, call.request_id, e)


def _parse(deserialize: Callable[[bytes], Any], raw: bytes) -> tuple[Any, errors.InvalidRequestError | None]:
    """-> (the request, None), or (an empty request for the records, the error to raise) for a malformed one."""
    try:
        return deserialize(raw), None
    except Exception as e:  # protobuf's DecodeError
        return deserialize(b""), errors.InvalidRequestError(
            f"the request is not a valid protobuf message for this method ({e}); "
            "build it from proto/medhallguard/v1/guard.proto"
        )


def _refusal(handler, code: grpc.StatusCode, details: str):
    """A handler of the same kind as `handler` that aborts every call with (code, details)."""

    async def refuse(request_or_iterator, context):
        await context.abort(code, details)

    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        if getattr(handler, kind) is not None:
            return getattr(grpc, f"{kind}_rpc_method_handler")(
                refuse,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise AssertionError("a handler with no behavior")


def _assign_request_id(request) -> str:
    """Give the request an id if the client sent none, so logs, audit entries and errors can name it."""
    if "request_id" not in type(request).DESCRIPTOR.fields_by_name:
        return uuid.uuid4().hex  # e.g. GetModelInfo: the id lives in the server's records only
    if not request.request_id:
        request.request_id = uuid.uuid4().hex
    return request.request_id


def _log_request(call: _Call, code: grpc.StatusCode, verdict: str, detail: str = "") -> None:
    total_ms = (time.perf_counter() - call.t0) * 1e3
    log.info(
        "rpc=%s request_id=%s client=%s status=%s verdict=%s total_ms=%.1f%s",
        call.rpc,
        call.request_id or "-",
        call.client,
        code.name,
        verdict,
        total_ms,
        f" detail={detail!r}" if detail else "",
        extra={"rpc": call.rpc, "client": call.client, "status": code.name, "verdict": verdict,
               "total_ms": round(total_ms, 1)},
    )
