"""Shutdown: health NOT_SERVING, new calls get UNAVAILABLE "server is draining", in-flight ones finish.

In-process with FakeGuard for the exact sequence, and once with a real
`medhallguard serve` process, the nano model and SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.launch import cli_path
from server.pb.medhallguard.v1 import guard_pb2 as pb
from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc
from tests.fakes import FakeGuard, png_bytes, serve_in_thread

LONG_ANSWER = " ".join(["finding"] * 30)


def _ask(**overrides) -> pb.AskRequest:
    return pb.AskRequest(**{**dict(image=png_bytes(), media_type="image/png", question="Any effusion?"), **overrides})


def _wait_for(predicate, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(30)
def test_new_calls_during_the_drain_get_unavailable_while_in_flight_ones_finish():
    guard = FakeGuard(answer_text=LONG_ANSWER, token_delay_s=0.05)  # 1.5 s
    with serve_in_thread(guard) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.MedHallGuardStub(channel)
        in_flight = stub.Ask.future(_ask(), timeout=20)
        assert guard.started.wait(5)
        stopping = asyncio.run_coroutine_threadsafe(server.running.stop(20), server.loop)
        _wait_for(lambda: server.running.interceptor.draining, what="the drain to start")
        for call in (stub.Ask, stub.GetModelInfo):
            request = _ask() if call is stub.Ask else pb.GetModelInfoRequest()
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "server is draining" in info.value.details()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not stopping.done()  # still waiting for the in-flight call
        assert in_flight.result().answer == LONG_ANSWER
        stopping.result(10)
        assert not guard.stopped.is_set()


@pytest.mark.timeout(30)
def test_calls_still_running_after_the_grace_period_are_cancelled():
    guard = FakeGuard(answer_text=" ".join(["finding"] * 400), token_delay_s=0.05)  # 20 s
    with serve_in_thread(guard) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        in_flight = pb_grpc.MedHallGuardStub(channel).Ask.future(_ask(), timeout=25)
        assert guard.started.wait(5)
        t0 = time.monotonic()
        server.run(server.running.stop(0.3))
        assert time.monotonic() - t0 < 10
        assert guard.stopped.wait(5), "decoding went on after the grace period"
        with pytest.raises(grpc.RpcError):
            in_flight.result()


@pytest.fixture
def slow_config(tmp_path):
    """Nano model decoding 1024 tokens regardless of EOS: a few seconds per request on a CPU."""
    path = tmp_path / "drain.toml"
    path.write_text(
        "[server]\n"
        "grace_s = 120.0\n"
        'metrics_address = "127.0.0.1:0"\n'
        f'audit_log = "{tmp_path / "audit.jsonl"}"\n'
        "[decode]\nmax_new_tokens = 1024\nignore_eos = true\n"
        "[policy]\nallow_untrained_heads = true\n"
    )
    return path


@pytest.mark.timeout(240)
def test_sigterm_drains_a_real_server_and_it_exits_0(nano_models, slow_config, tmp_path):
    cmd = [str(cli_path()), "serve", "--model", str(nano_models["smolvlm"]), "--address", "127.0.0.1:0",
           "--config", str(slow_config), "--log-format", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().strip().removeprefix("serving on ")
        metrics_url = proc.stdout.readline().strip().removeprefix("metrics on ")
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status  # noqa: E731
            _wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 120, "health SERVING")
            stub = pb_grpc.MedHallGuardStub(channel)
            slow = stub.Ask.future(_ask(request_id="slow-1"), timeout=180)
            _wait_for(lambda: _gauge(metrics_url, "medhallguard_in_flight_requests") == 1, 30, "the request in flight")

            proc.send_signal(signal.SIGTERM)
            _wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 30, "health NOT_SERVING")
            with pytest.raises(grpc.RpcError) as info:
                stub.Ask(_ask(request_id="late-1"), timeout=10)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "server is draining" in info.value.details()
            assert not slow.done(), "the slow request finished before the drain was checked; make it longer"

            response = slow.result()
            assert response.num_tokens == 1024 and response.verdict != pb.VERDICT_UNSPECIFIED
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    entries = {e["request_id"]: e for e in map(json.loads, (tmp_path / "audit.jsonl").read_text().splitlines())}
    assert entries["slow-1"]["status"] == "OK"
    assert entries["late-1"]["status"] == "UNAVAILABLE" and "draining" in entries["late-1"]["error"]


def _gauge(metrics_url: str, name: str) -> float | None:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None
