"""Error paths through a real gRPC server on a loopback port, with FakeGuard (no model files).

Every bad request gets a precise status and a message that says what was
wrong, and the server keeps serving: a good request right after succeeds.
"""

from __future__ import annotations

import re
import struct
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard import errors
from server.config import ServerConfig
from server.pb.medhallguard.v1 import guard_pb2 as pb
from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc
from tests.fakes import FakeGuard, png_bytes, serve_in_thread

LONG_ANSWER = " ".join(["finding"] * 60)


def _png_claiming(width: int, height: int) -> bytes:
    """A small, valid-looking PNG whose header declares width x height (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 1024)  # a sliver of the rows it claims
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _truncated_dicom() -> bytes:
    from pydicom.data import get_testdata_file

    with open(get_testdata_file("MR_truncated.dcm"), "rb") as f:
        return f.read()


def _ask(**overrides) -> pb.AskRequest:
    fields = dict(image=png_bytes(), media_type="image/png", question="Is there a pleural effusion?")
    fields.update(overrides)
    return pb.AskRequest(**fields)


def _code_of(call) -> grpc.StatusCode:
    try:
        call.result()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def stub():
    with serve_in_thread(FakeGuard()) as running:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield pb_grpc.MedHallGuardStub(channel)


BAD_REQUESTS = {
    "random_bytes_as_png": (lambda: _ask(image=bytes(range(256)) * 8), r"png"),
    "truncated_png": (lambda: _ask(image=png_bytes((64, 64))[:60]), r"truncat|corrupt|decode"),
    "png_header_claims_30000x30000": (lambda: _ask(image=_png_claiming(30000, 30000)), r"pixel"),
    "empty_image": (lambda: _ask(image=b""), r"image.*empty|empty.*image"),
    "empty_question": (lambda: _ask(question="   \n"), r"question.*empty"),
    "one_megabyte_question": (lambda: _ask(question="why " * 250_000), r"question.*limit"),
    "gif_media_type": (lambda: _ask(media_type="image/gif"), r"image/gif.*not supported"),
    "truncated_dicom": (lambda: _ask(image=_truncated_dicom(), media_type="application/dicom"), r"dicom"),
    "max_new_tokens_zero": (lambda: _ask(generation=pb.GenerationSettings(max_new_tokens=0)), r"max_new_tokens"),
    "temperature_too_high": (lambda: _ask(generation=pb.GenerationSettings(temperature=50.0)), r"temperature"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_invalid_argument_and_server_keeps_serving(stub, case):
    make_request, message_pattern = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.Ask(make_request(), timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message_pattern, info.value.details(), re.IGNORECASE | re.DOTALL), (
        info.value.details()
    )
    assert len(info.value.details()) < 1000  # the 1 MB question is not echoed back
    assert stub.Ask(_ask(), timeout=10).verdict == pb.VERDICT_ANSWER


@pytest.mark.timeout(30)
def test_score_with_empty_answer_is_invalid_argument(stub):
    request = pb.ScoreRequest(image=png_bytes(), media_type="image/png", question="Any fracture?", answer=" ")
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request, timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "answer" in info.value.details()


@pytest.mark.timeout(30)
def test_error_details_name_the_request_id(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Ask(_ask(question="", request_id="req-42"), timeout=10)
    assert "req-42" in info.value.details()


@pytest.mark.timeout(30)
def test_client_deadline_exceeded_stops_decoding():
    guard = FakeGuard(answer_text=LONG_ANSWER, token_delay_s=0.05)
    with serve_in_thread(guard) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.MedHallGuardStub(channel).Ask(_ask(), timeout=0.4)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 2.0
        assert guard.stopped.wait(5), "decoding went on after the deadline"


@pytest.mark.timeout(30)
def test_server_default_deadline_applies_when_client_sends_none():
    guard = FakeGuard(answer_text=LONG_ANSWER, token_delay_s=0.05)
    config = ServerConfig(address="127.0.0.1:0", default_deadline_s=0.3)
    with serve_in_thread(guard, config) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.MedHallGuardStub(channel).Ask(_ask())
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline" in info.value.details()
        assert guard.stopped.is_set()
        assert isinstance(guard.stop_errors[-1], errors.DeadlineExceededError)


@pytest.mark.timeout(30)
def test_deadline_passing_while_queued_is_deadline_exceeded():
    guard = FakeGuard(answer_text=LONG_ANSWER, token_delay_s=0.05)
    config = ServerConfig(address="127.0.0.1:0", max_concurrency=1, max_queue=4)
    with serve_in_thread(guard, config) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.MedHallGuardStub(channel)
        first = stub.Ask.future(_ask(), timeout=10)
        assert guard.started.wait(5)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Ask(_ask(), timeout=0.3)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 2.0
        assert first.result().verdict == pb.VERDICT_ANSWER
        assert len(guard.requests) == 1, "the queued request must never reach the guard"


@pytest.mark.timeout(30)
def test_requests_past_concurrency_and_queue_bounds_are_resource_exhausted():
    guard = FakeGuard(answer_text=" ".join(["word"] * 10), token_delay_s=0.05)
    config = ServerConfig(address="127.0.0.1:0", max_concurrency=1, max_queue=0)
    with serve_in_thread(guard, config) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.MedHallGuardStub(channel)
        calls = [stub.Ask.future(_ask(), timeout=10) for _ in range(3)]
        codes = Counter(_code_of(call) for call in calls)
        assert codes == {grpc.StatusCode.OK: 1, grpc.StatusCode.RESOURCE_EXHAUSTED: 2}
        busy = next(c for c in calls if _code_of(c) is grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "server busy" in busy.exception().details()
        assert "retry" in busy.exception().details()
        assert stub.Ask(_ask(), timeout=10).verdict == pb.VERDICT_ANSWER  # the slot was released


@pytest.mark.timeout(30)
def test_cancelling_a_unary_call_stops_decoding():
    guard = FakeGuard(answer_text=LONG_ANSWER, token_delay_s=0.05)
    with serve_in_thread(guard) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = pb_grpc.MedHallGuardStub(channel).Ask.future(_ask(), timeout=20)
        assert guard.started.wait(5)
        call.cancel()
        assert guard.stopped.wait(5), "decoding went on after the client cancelled"
        assert isinstance(guard.stop_errors[-1], errors.CancelledError)


@pytest.mark.timeout(30)
def test_cancelling_a_stream_stops_decoding():
    guard = FakeGuard(answer_text=LONG_ANSWER, token_delay_s=0.05)
    with serve_in_thread(guard) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stream = pb_grpc.MedHallGuardStub(channel).AskStream(_ask(), timeout=20)
        first = next(stream)
        assert first.WhichOneof("event") == "delta"
        stream.cancel()
        assert guard.stopped.wait(5), "decoding went on after the client cancelled the stream"
        assert isinstance(guard.stop_errors[-1], errors.CancelledError)


@pytest.mark.timeout(30)
def test_unexpected_exception_is_internal_without_leaking_internals():
    guard = FakeGuard(error=RuntimeError("secret detail: /opt/weights/key=hunter2"))
    with serve_in_thread(guard) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.MedHallGuardStub(channel)
        for call in (stub.Ask, lambda r, timeout: list(stub.AskStream(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as info:
                call(_ask(request_id="req-internal"), timeout=10)
            assert info.value.code() is grpc.StatusCode.INTERNAL
            details = info.value.details()
            assert "hunter2" not in details and "Traceback" not in details and "RuntimeError" not in details
            assert "req-internal" in details


@pytest.mark.timeout(30)
def test_typed_runtime_error_maps_through_the_table():
    guard = FakeGuard(error=errors.BackendUnavailableError("the GPU fell off the bus; retry on another replica"))
    with serve_in_thread(guard) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.MedHallGuardStub(channel).Ask(_ask(), timeout=10)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "GPU fell off the bus" in info.value.details()


@pytest.mark.timeout(30)
def test_health_is_not_serving_before_warmup_and_serving_after():
    gate = threading.Event()
    guard = FakeGuard(warmup_gate=gate)
    with serve_in_thread(guard, wait_ready=False) as running:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.MedHallGuardStub(channel)
            for service in ("", "medhallguard.v1.MedHallGuard"):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                stub.Ask(_ask(), timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "warming up" in info.value.details()

            gate.set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.02)
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert stub.Ask(_ask(), timeout=5).verdict == pb.VERDICT_ANSWER


@pytest.mark.timeout(30)
def test_concurrent_requests_within_bounds_all_succeed():
    guard = FakeGuard(answer_text="a b c d", token_delay_s=0.02)
    config = ServerConfig(address="127.0.0.1:0", max_concurrency=2, max_queue=8)
    with serve_in_thread(guard, config) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.MedHallGuardStub(channel)
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda i: stub.Ask(_ask(request_id=f"r{i}"), timeout=10), range(8)))
        assert [r.request_id for r in responses] == [f"r{i}" for i in range(8)]
        assert all(r.answer == "a b c d" for r in responses)


@pytest.mark.timeout(30)
def test_graceful_stop_lets_in_flight_requests_finish_and_refuses_new_ones():
    guard = FakeGuard(answer_text=" ".join(["word"] * 10), token_delay_s=0.05)
    with serve_in_thread(guard) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.MedHallGuardStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        in_flight = stub.Ask.future(_ask(), timeout=10)
        assert guard.started.wait(5)
        server.run(server.running.health.enter_graceful_shutdown())
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        server.run(server.running.stop(5))
        assert in_flight.result().answer == guard.answer_text
        assert not guard.stopped.is_set()
        with pytest.raises(grpc.RpcError) as info:
            stub.Ask(_ask(), timeout=2)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.timeout(30)
def test_stream_past_its_deadline_is_deadline_exceeded_and_stops_decoding():
    guard = FakeGuard(answer_text=LONG_ANSWER, token_delay_s=0.05)
    with serve_in_thread(guard) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = pb_grpc.MedHallGuardStub(channel).AskStream(_ask(), timeout=0.4)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert guard.stopped.wait(5)


@pytest.mark.timeout(30)
def test_failed_warmup_keeps_health_not_serving_and_serve_exits_1():
    import asyncio

    from server.main import _serve

    guard = FakeGuard(warmup_error=RuntimeError("weights are corrupt"))
    with (
        serve_in_thread(guard, wait_ready=False) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        deadline = time.monotonic() + 5
        while not server.running.warmed.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(server.running.warmed.exception(), RuntimeError)
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.MedHallGuardStub(channel).Ask(_ask(), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "warm-up" in info.value.details()

    lines: list[str] = []
    rc = asyncio.run(_serve(guard, ServerConfig(address="127.0.0.1:0", grace_s=0.1), lines.append))
    assert rc == 1
    assert lines and lines[0].startswith("serving on 127.0.0.1:")


@pytest.mark.timeout(30)
def test_stream_without_deltas_sends_only_the_guarded_final_message():
    from server.config import ServerConfig

    config = ServerConfig(address="127.0.0.1:0", stream_deltas=False)
    with serve_in_thread(FakeGuard(answer_text=LONG_ANSWER), config) as running, grpc.insecure_channel(
        f"127.0.0.1:{running.port}"
    ) as channel:
        events = list(pb_grpc.MedHallGuardStub(channel).AskStream(_ask(), timeout=20))
    assert [e.WhichOneof("event") for e in events] == ["final"]
    assert events[0].final.answer
