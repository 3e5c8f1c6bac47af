"""MedHallGuardServicer: wire messages <-> guard types, and the admission queue.

Each RPC is three steps: `request_from_pb`, the guard call in a worker thread,
`response_to_pb`. Servicers never catch exceptions or choose status codes:
they raise the typed errors of guard/errors.py and server/interceptors.py maps
them. `Admission` bounds how many requests compute and wait at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import threading
import time
import uuid
from typing import Callable, TypeVar

from guard.errors import (
    BackendUnavailableError,
    DeadlineExceededError,
    InvalidImageError,
    InvalidRequestError,
    ResourceExhaustedError,
)
from guard.preprocess import MEDIA_TYPES
from guard.types import DecodeConfig, GuardResult, ModelInfo, StopSignal, VerdictKind, VqaRequest
from server.config import ServerConfig
from server.pb.medhallguard.v1 import guard_pb2 as pb
from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MedHallGuard"].full_name

_VERDICT_TO_PB = {
    VerdictKind.ANSWER: pb.VERDICT_ANSWER,
    VerdictKind.ANSWER_WITH_WARNING: pb.VERDICT_ANSWER_WITH_WARNING,
    VerdictKind.ABSTAIN: pb.VERDICT_ABSTAIN,
}
_GENERATION_FIELDS = ("max_new_tokens", "temperature", "seed")

T = TypeVar("T")


# --- translation ------------------------------------------------------------


def request_from_pb(
    msg: pb.AskRequest | pb.ScoreRequest, defaults: DecodeConfig, config: ServerConfig
) -> VqaRequest:
    """Check a request at the edge and turn it into a VqaRequest; raises the typed errors."""
    if not msg.image:
        raise InvalidImageError("`image` is empty; send the PNG, JPEG or DICOM file's bytes")
    media_type = msg.media_type.split(";")[0].strip().lower()  # "image/PNG; x=y" -> "image/png"
    if media_type not in MEDIA_TYPES:
        raise InvalidImageError(f"`media_type` {msg.media_type!r} is not supported; use one of {list(MEDIA_TYPES)}")
    _check_text("question", msg.question, config.max_question_chars)
    answer, decode = None, defaults
    if isinstance(msg, pb.ScoreRequest):
        answer = _check_text("answer", msg.answer, config.max_answer_chars)
    elif msg.HasField("generation"):
        decode = decode_from_pb(msg.generation, defaults)
    return VqaRequest(
        image=bytes(msg.image),
        media_type=media_type,
        question=msg.question,
        decode=decode,
        request_id=msg.request_id or uuid.uuid4().hex,
        answer=answer,
    )


def decode_from_pb(msg: pb.GenerationSettings, defaults: DecodeConfig) -> DecodeConfig:
    """Fields the client set override the defaults; out-of-range values are the client's error."""
    overrides = {name: getattr(msg, name) for name in _GENERATION_FIELDS if msg.HasField(name)}
    try:
        return dataclasses.replace(defaults, **overrides)
    except ValueError as e:  # DecodeConfig.__post_init__ names the field
        raise InvalidRequestError(f"invalid `generation` settings: {e}") from None


def decode_to_pb(config: DecodeConfig) -> pb.GenerationSettings:
    msg = pb.GenerationSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature)
    if config.seed is not None:
        msg.seed = config.seed
    return msg


def response_to_pb(result: GuardResult, total_ms: float) -> pb.AskResponse:
    t = result.timings
    msg = pb.AskResponse(
        answer=result.answer,
        verdict=_VERDICT_TO_PB[result.verdict.kind],
        reasons=list(result.verdict.reasons),
        model_id=result.model_id,
        model_checksum=result.model_checksum,
        backend=result.backend,
        timings=pb.Timings(
            preprocess_ms=float(t.preprocess_ms),
            vision_ms=float(t.vision_ms),
            prefill_ms=float(t.prefill_ms),
            decode_ms=float(t.decode_ms),
            guard_ms=float(t.guard_ms),
            total_ms=float(total_ms),
        ),
        request_id=result.request_id,
        num_tokens=int(result.num_tokens),
        stop_reason=result.stop_reason,
    )
    s = result.scores
    if s is not None:  # unset fields tell the client the guard could not score
        msg.p_hallucination = float(s.p_hallucination)
        msg.premise_risk = float(s.premise_risk)
        msg.heads_trained = bool(s.heads_trained)
        msg.scores.CopyFrom(
            pb.Scores(
                clinical_accuracy=float(s.clinical_accuracy),
                clinical_relevance=float(s.clinical_relevance),
                detail_level=float(s.detail_level),
                risk_level=float(s.risk_level),
            )
        )
    return msg


def verdict_name(response) -> str | None:
    """The verdict of a response message as audit, metrics and logs name it (`ANSWER`, `ABSTAIN`, ...);
    None for a message with no verdict field (GetModelInfo's)."""
    if "verdict" not in type(response).DESCRIPTOR.fields_by_name:
        return None
    return pb.Verdict.Name(response.verdict).removeprefix("VERDICT_")


def model_info_to_pb(info: ModelInfo, guard_config, config: ServerConfig) -> pb.ModelInfo:
    """`guard_config` is the runtime's GuardConfig: its limits and default decode settings."""
    return pb.ModelInfo(
        model_id=info.model_id,
        family=info.family,
        checksum=info.checksum,
        backend=info.backend,
        image_size=int(info.image_size),
        num_image_tokens=int(info.num_image_tokens),
        heads_trained=bool(info.heads_trained),
        verified=bool(info.verified),
        thresholds={k: float(v) for k, v in info.thresholds.items()},
        server_version=server_version(),
        max_message_bytes=config.max_message_bytes,
        max_pixels=int(guard_config.limits.max_pixels),
        max_image_bytes=int(guard_config.limits.max_bytes),
        max_question_chars=config.max_question_chars,
        max_answer_chars=config.max_answer_chars,
        default_generation=decode_to_pb(guard_config.decode),
    )


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medhallguard")
    except PackageNotFoundError:
        return "0+unknown"


def _check_text(name: str, text: str, max_chars: int) -> str:
    if not text.strip():
        raise InvalidRequestError(f"`{name}` is empty; send the {name} as text")
    if len(text) > max_chars:
        raise InvalidRequestError(f"`{name}` is {len(text)} characters long; the limit is {max_chars}")
    return text


# --- admission --------------------------------------------------------------


class Admission:
    """At most `max_concurrency` guard calls run at once, and at most `max_queue` wait.

    A slot is released when the worker thread finishes, not when the RPC ends,
    so a cancelled request keeps its slot until decoding has actually stopped.
    """

    def __init__(self, max_concurrency: int, max_queue: int):
        self._slots = asyncio.Semaphore(max_concurrency)
        self._max_concurrency, self._max_queue = max_concurrency, max_queue
        self._waiting = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(max_concurrency, thread_name_prefix="guard")

    async def run(self, fn: Callable[[StopSignal], T], stop: StopSignal) -> T:
        """Run fn(stop) in a worker thread once a slot is free; raise if the queue is full or time runs out."""
        if self._slots.locked():
            await self._wait_for_slot(stop)
        else:
            await self._slots.acquire()  # free slot: returns without suspending
        context = contextvars.copy_context()  # the worker logs with this request's id (server.logs)
        fut = asyncio.get_running_loop().run_in_executor(self._executor, context.run, fn, stop)
        fut.add_done_callback(lambda _: self._slots.release())
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            stop.cancelled.set()  # the worker stops at its next step, then frees the slot
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # its expected error: retrieved, not logged
            raise

    async def _wait_for_slot(self, stop: StopSignal) -> None:
        if self._waiting >= self._max_queue:
            raise ResourceExhaustedError(
                f"server busy: {self._max_concurrency} requests running and {self._waiting} queued "
                f"(max_queue={self._max_queue}); retry with backoff"
            )
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), max(0.0, stop.deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceededError(
                "the deadline passed while the request waited for a free slot; "
                "retry later or with a longer deadline"
            ) from None
        finally:
            self._waiting -= 1

    @property
    def waiting(self) -> int:
        """Requests queued for a slot now."""
        return self._waiting

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _slots(guard, config: ServerConfig) -> int:
    """Requests admitted at once. With batching on, a full batch: each request waits in its own worker thread."""
    batching = guard.config.batching
    return max(config.max_concurrency, batching.max_batch_size) if batching.enabled else config.max_concurrency


# --- the servicer -----------------------------------------------------------


class MedHallGuardServicer(pb_grpc.MedHallGuardServicer):
    def __init__(self, guard, config: ServerConfig):
        self.guard = guard
        self.config = config
        self.admission = Admission(_slots(guard, config), config.max_queue)
        self.unready_reason: str | None = "the model is still warming up; retry when health reports SERVING"
        """Why requests get UNAVAILABLE; None once guard.warmup() has finished."""

    async def Ask(self, request: pb.AskRequest, context) -> pb.AskResponse:
        req = request_from_pb(request, self.guard.config.decode, self.config)
        result, total_ms = await self._run(context, lambda stop: self.guard.answer(req, stop))
        return response_to_pb(result, total_ms)

    async def AskStream(self, request: pb.AskRequest, context):
        req = request_from_pb(request, self.guard.config.decode, self.config)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()
        on_text = lambda delta: loop.call_soon_threadsafe(deltas.put_nowait, delta)  # noqa: E731 (worker thread)
        on_text = on_text if self.config.stream_deltas else None  # strict fail-closed: only the guarded final
        work = asyncio.ensure_future(self._run(context, lambda stop: self.guard.answer(req, stop, on_text)))
        # Deltas reach the queue through the loop before the worker's result does, so None comes last.
        work.add_done_callback(lambda _: deltas.put_nowait(None))
        try:
            while (delta := await deltas.get()) is not None:
                yield pb.AskStreamResponse(delta=delta)
            result, total_ms = work.result()
        finally:
            work.cancel()  # no-op when done; otherwise the client left mid-stream
        yield pb.AskStreamResponse(final=response_to_pb(result, total_ms))

    async def Score(self, request: pb.ScoreRequest, context) -> pb.AskResponse:
        req = request_from_pb(request, self.guard.config.decode, self.config)
        result, total_ms = await self._run(context, lambda stop: self.guard.score(req, stop))
        return response_to_pb(result, total_ms)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        info = await asyncio.to_thread(self.guard.info)
        return model_info_to_pb(info, self.guard.config, self.config)

    async def _run(self, context, fn: Callable[[StopSignal], GuardResult]) -> tuple[GuardResult, float]:
        """Admit, run fn in a worker with the RPC's deadline and cancellation; -> (result, total_ms)."""
        t0 = time.perf_counter()
        if self.unready_reason is not None:
            raise BackendUnavailableError(self.unready_reason)
        remaining = context.time_remaining()
        timeout_s = self.config.default_deadline_s if remaining is None else remaining
        stop = StopSignal(deadline=time.monotonic() + timeout_s, cancelled=threading.Event())
        context.add_done_callback(lambda _: stop.cancelled.set())  # RPC over: stop decoding if still running
        result = await self.admission.run(fn, stop)
        return result, (time.perf_counter() - t0) * 1e3
