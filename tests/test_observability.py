"""Prometheus metrics scraped over HTTP, and JSON logs that carry request ids, with FakeGuard."""

from __future__ import annotations

import io
import json
import logging
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from guard.types import VerdictKind
from server import logs
from server.config import ServerConfig
from server.metrics import STAGES
from server.pb.medhallguard.v1 import guard_pb2 as pb
from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc
from tests.fakes import FakeGuard, png_bytes, serve_in_thread

ANSWER = "Small left pleural effusion is present."  # 6 words: FakeGuard decodes 6 tokens


def _ask(**overrides) -> pb.AskRequest:
    fields = dict(image=png_bytes(), media_type="image/png", question="Is there a pleural effusion?")
    return pb.AskRequest(**{**fields, **overrides})


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from GET /metrics, parsed by prometheus_client's parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _metrics_config(**overrides) -> ServerConfig:
    return ServerConfig(address="127.0.0.1:0", metrics_address="127.0.0.1:0", **overrides)


@pytest.mark.timeout(30)
def test_metrics_count_requests_by_status_and_verdict_and_time_each_stage():
    guard = FakeGuard(answer_text=ANSWER, verdict=VerdictKind.ANSWER_WITH_WARNING)
    with serve_in_thread(guard, _metrics_config()) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.MedHallGuardStub(ch)
        for _ in range(2):
            stub.Ask(_ask(), timeout=10)
        list(stub.AskStream(_ask(), timeout=10))
        stub.Score(pb.ScoreRequest(image=png_bytes(), media_type="image/png", question="Effusion?",
                                   answer="Yes."), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.Ask(_ask(question=""), timeout=10)
        # grpc sends an error status from inside context.abort, so the client can see it a moment before the
        # interceptor counts the call out of in_flight: wait for that, briefly.
        deadline = time.monotonic() + 5
        while (m := _scrape(server.running.metrics_port))[("medhallguard_in_flight_requests", ())] and \
                time.monotonic() < deadline:
            time.sleep(0.01)

    assert m[("medhallguard_requests_total", (("rpc", "Ask"), ("status", "OK")))] == 2
    assert m[("medhallguard_requests_total", (("rpc", "Ask"), ("status", "INVALID_ARGUMENT")))] == 1
    assert m[("medhallguard_requests_total", (("rpc", "AskStream"), ("status", "OK")))] == 1
    assert m[("medhallguard_requests_total", (("rpc", "Score"), ("status", "OK")))] == 1
    assert m[("medhallguard_verdicts_total", (("rpc", "Ask"), ("verdict", "ANSWER_WITH_WARNING")))] == 2
    assert m[("medhallguard_verdicts_total", (("rpc", "AskStream"), ("verdict", "ANSWER_WITH_WARNING")))] == 1
    assert ("medhallguard_verdicts_total", (("rpc", "Ask"), ("verdict", "ANSWER"))) not in m
    for stage in STAGES:  # 2 Ask + 1 AskStream + 1 Score answered; the invalid one has no timings
        assert m[("medhallguard_stage_duration_seconds_count", (("stage", stage),))] == 4, stage
    assert m[("medhallguard_request_duration_seconds_count", (("rpc", "Ask"),))] == 3
    assert m[("medhallguard_generated_tokens_total", ())] == 3 * 6  # Score generates nothing
    assert m[("medhallguard_in_flight_requests", ())] == 0
    assert m[("medhallguard_ready", ())] == 1
    assert m[("medhallguard_model_info", (("backend", "fake:cpu"), ("checksum", "f" * 64),
                                          ("model_id", "fake-model")))] == 1


@pytest.mark.timeout(30)
def test_metrics_show_queue_depth_and_in_flight_requests_while_busy():
    guard = FakeGuard(answer_text=" ".join(["word"] * 20), token_delay_s=0.05)
    config = _metrics_config(max_concurrency=1, max_queue=4)
    with serve_in_thread(guard, config) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.MedHallGuardStub(ch)
        calls = [stub.Ask.future(_ask(), timeout=20) for _ in range(3)]
        deadline, m = time.monotonic() + 10, {}
        while time.monotonic() < deadline:
            m = _scrape(server.running.metrics_port)
            if m[("medhallguard_queue_depth", ())] == 2:
                break
            time.sleep(0.02)
        assert m[("medhallguard_queue_depth", ())] == 2
        assert m[("medhallguard_in_flight_requests", ())] == 3
        assert all(c.result().answer for c in calls)
        m = _scrape(server.running.metrics_port)
        assert m[("medhallguard_queue_depth", ())] == 0 and m[("medhallguard_in_flight_requests", ())] == 0


@pytest.mark.timeout(30)
def test_metrics_endpoint_is_off_by_default():
    with serve_in_thread(FakeGuard()) as server:
        assert server.running.metrics is None and server.running.metrics_port is None


@pytest.fixture
def json_log():
    """The root logger in JSON format, into a buffer; the previous set-up is restored after."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    buf = io.StringIO()
    logs.configure("INFO", "json", stream=buf)
    yield buf
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


class _LoggingGuard(FakeGuard):
    """Logs from the worker thread, as the runtime does."""

    def answer(self, req, stop=None, on_text=None):
        logging.getLogger("guard.runtime").info("decoding the answer")
        return super().answer(req, stop, on_text)


@pytest.mark.timeout(30)
def test_json_logs_name_the_request_in_every_line_including_the_worker_threads(json_log):
    with serve_in_thread(_LoggingGuard()) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.MedHallGuardStub(ch)
        stub.Ask(_ask(request_id="req-log-1"), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.Ask(_ask(request_id="req-log-2", question=""), timeout=10)
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]  # every line is JSON
    first = [line for line in lines if line.get("request_id") == "req-log-1"]
    assert {line["message"] for line in first} >= {"decoding the answer"}
    done = next(line for line in first if line["logger"] == "server.interceptors")
    assert (done["rpc"], done["status"], done["verdict"], done["level"]) == ("Ask", "OK", "ANSWER", "INFO")
    assert done["client"].startswith("peer:") and done["total_ms"] >= 0 and done["time"].endswith("+00:00")
    failed = next(line for line in lines if line.get("request_id") == "req-log-2")
    assert failed["status"] == "INVALID_ARGUMENT"
    unrelated = [line for line in lines if line["message"].startswith("ready")]
    assert unrelated and "request_id" not in unrelated[0]


def test_text_log_lines_get_the_request_id_appended():
    buf = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logs.configure("INFO", "text", stream=buf)
        token = logs.request_id.set("req-text-1")
        logging.getLogger("guard.runtime").info("guard heads failed")
        logs.request_id.reset(token)
        logging.getLogger("guard.runtime").info("no request here")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = buf.getvalue().splitlines()
    assert first.endswith("guard heads failed request_id=req-text-1")
    assert second.endswith("no request here")


def test_unknown_log_format_is_refused():
    with pytest.raises(ValueError, match="log format"):
        logs.configure("INFO", "yaml")


class _Batcher:
    """What server/main.py reads from a batching scheduler (guard.batcher)."""

    def queued(self) -> int:
        return 3

    def running(self) -> int:
        return 5


@pytest.mark.timeout(30)
def test_queue_depth_and_batch_size_come_from_the_batching_scheduler_when_there_is_one():
    guard = FakeGuard()
    guard.batcher = _Batcher()
    with serve_in_thread(guard, _metrics_config()) as server:
        m = _scrape(server.running.metrics_port)
    assert m[("medhallguard_queue_depth", ())] == 3  # nothing waits for a slot; 3 wait to join the batch
    assert m[("medhallguard_batch_size", ())] == 5


@pytest.mark.timeout(30)
def test_a_busy_metrics_port_is_a_clear_error():
    import socket

    from tests.fakes import serve_in_thread as serve

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = ServerConfig(address="127.0.0.1:0", metrics_address=f"127.0.0.1:{busy.getsockname()[1]}")
        with pytest.raises(OSError, match="could not serve metrics on 127.0.0.1:.*in use"):
            with serve(FakeGuard(), config):
                pass
