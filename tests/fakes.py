"""FakeGuard (the runtime's interface with scripted output) and a server-in-a-thread helper.

FakeGuard decodes a scripted answer one word at a time, sleeping `token_delay_s`
per word and checking the StopSignal between words, so deadline, cancellation
and concurrency tests run in well under a second with no model files. Images
go through the real `guard.preprocess.load_image`, so bad images fail exactly
as they do in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import threading
import time
from dataclasses import dataclass, field

from guard.batching import BatchingConfig
from guard.errors import GuardError
from guard.preprocess import ImageLimits, load_image
from guard.types import (
    DecodeConfig,
    GuardResult,
    GuardScores,
    ModelInfo,
    StopSignal,
    Timings,
    Verdict,
    VerdictKind,
    VqaRequest,
)


@dataclass(frozen=True)
class FakeConfig:
    """The parts of GuardConfig the server reads."""

    decode: DecodeConfig = field(default_factory=lambda: DecodeConfig(max_new_tokens=32))
    limits: ImageLimits = field(default_factory=lambda: ImageLimits(max_bytes=8 * 1024 * 1024, max_pixels=4096 * 4096))
    batching: BatchingConfig = field(default_factory=lambda: BatchingConfig(enabled=False))


class FakeGuard:
    def __init__(
        self,
        answer_text: str = "No acute cardiopulmonary abnormality is seen.",
        token_delay_s: float = 0.0,
        warmup_gate: threading.Event | None = None,
        error: Exception | None = None,
        warmup_error: Exception | None = None,
        verdict: VerdictKind = VerdictKind.ANSWER,
    ):
        self.config = FakeConfig()
        self.answer_text = answer_text
        self.token_delay_s = token_delay_s
        self.warmup_gate = warmup_gate
        self.error = error
        self.warmup_error = warmup_error
        self.verdict = verdict
        self.started = threading.Event()
        """Set when a call starts decoding."""
        self.stopped = threading.Event()
        """Set when a StopSignal (deadline or cancellation) ended a call early."""
        self.stop_errors: list[GuardError] = []
        self.requests: list[VqaRequest] = []

    def warmup(self) -> None:
        if self.warmup_gate is not None:
            self.warmup_gate.wait(30)
        if self.warmup_error is not None:
            raise self.warmup_error

    def answer(self, req: VqaRequest, stop: StopSignal | None = None, on_text=None) -> GuardResult:
        self.requests.append(req)
        t = time.perf_counter()
        load_image(req.image, req.media_type, self.config.limits)
        preprocess_ms = (time.perf_counter() - t) * 1e3
        if self.error is not None:
            raise self.error
        if req.answer is not None:
            return self._result(req, req.answer, 0, "", preprocess_ms)
        pieces = re.findall(r"\s*\S+", self.answer_text)[: req.decode.max_new_tokens]
        self.started.set()
        for piece in pieces:
            self._check(stop)
            time.sleep(self.token_delay_s)
            if on_text is not None:
                on_text(piece)
        self._check(stop)
        stop_reason = "length" if len(pieces) == req.decode.max_new_tokens else "eos"
        return self._result(req, "".join(pieces), len(pieces), stop_reason, preprocess_ms)

    def score(self, req: VqaRequest, stop: StopSignal | None = None) -> GuardResult:
        assert req.answer is not None
        return self.answer(req, stop)

    def info(self) -> ModelInfo:
        return ModelInfo(
            model_id="fake-model",
            family="smolvlm",
            checksum="f" * 64,
            backend="fake:cpu",
            image_size=32,
            num_image_tokens=4,
            heads_trained=False,
            thresholds={"warn_p_hallucination": 0.3, "abstain_p_hallucination": 0.6},
        )

    def _check(self, stop: StopSignal | None) -> None:
        if stop is None:
            return
        try:
            stop.check()
        except GuardError as e:
            self.stop_errors.append(e)
            self.stopped.set()
            raise

    def _result(self, req: VqaRequest, text: str, num_tokens: int, stop_reason: str, preprocess_ms: float):
        return GuardResult(
            request_id=req.request_id,
            answer=text,
            verdict=Verdict(self.verdict, () if self.verdict is VerdictKind.ANSWER else ("fake reason",)),
            scores=GuardScores(0.12, 0.05, 7.0, 8.0, 5.0, 2.0, heads_trained=False),
            timings=Timings(preprocess_ms=preprocess_ms, decode_ms=num_tokens * self.token_delay_s * 1e3),
            model_id="fake-model",
            model_checksum="f" * 64,
            backend="fake:cpu",
            num_tokens=num_tokens,
            stop_reason=stop_reason,
        )


def png_bytes(size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (90, 120, 150)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class ServerThread:
    """A started server whose event loop runs in a background thread."""

    running: object  # server.main.Running
    loop: asyncio.AbstractEventLoop

    @property
    def port(self) -> int:
        return self.running.port

    def run(self, coro, timeout_s: float = 30):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)


async def _wait_warm(running) -> None:
    await asyncio.wait_for(asyncio.shield(running.warmed), 60)


@contextlib.contextmanager
def serve_in_thread(guard, config=None, wait_ready: bool = True):
    """Run a real grpc.aio server for `guard` on a free loopback port; yields a ServerThread.

    Tests use plain synchronous grpc channels to `127.0.0.1:{server.port}`.
    """
    from server.config import ServerConfig
    from server.main import start

    config = config or ServerConfig(address="127.0.0.1:0")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="test-server")
    thread.start()
    try:
        running = asyncio.run_coroutine_threadsafe(start("127.0.0.1:0", guard, config), loop).result(10)
        server = ServerThread(running, loop)
        if wait_ready:
            server.run(_wait_warm(server.running), 70)
        try:
            yield server
        finally:
            server.run(server.running.stop(0.5))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
