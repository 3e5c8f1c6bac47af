"""Prometheus metrics for one server, on their own HTTP port (`metrics_address`).

Owns the metric definitions and the /metrics endpoint. Each server has its own
CollectorRegistry, so several servers in one process (tests) never collide.
server/interceptors.py calls `observe_call` once per RPC; the stage timings
come from the response's `timings`, which the runtime measured. Tokens per
second is `rate(medhallguard_generated_tokens_total[1m])`.
"""

from __future__ import annotations

import logging
from typing import Callable

import grpc

from server.service import verdict_name
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

STAGES = ("preprocess", "vision", "prefill", "decode", "guard", "total")
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_GENERATING_RPCS = ("Ask", "AskStream")


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("medhallguard_requests", "RPCs finished, by method and status code",
                                ["rpc", "status"], registry=r)
        self.verdicts = Counter("medhallguard_verdicts", "Guarded responses sent, by method and verdict",
                                ["rpc", "verdict"], registry=r)
        self.request_seconds = Histogram("medhallguard_request_duration_seconds",
                                         "Time from receiving an RPC to its status, every outcome",
                                         ["rpc"], buckets=_SECONDS, registry=r)
        self.stage_seconds = Histogram("medhallguard_stage_duration_seconds",
                                       "Per-stage time of successful guarded requests (from the runtime's timings)",
                                       ["stage"], buckets=_SECONDS, registry=r)
        self.tokens = Counter("medhallguard_generated_tokens", "Answer tokens generated; rate() gives tokens/s",
                              registry=r)
        self.decode_rate = Histogram("medhallguard_decode_tokens_per_second", "Decode speed of each Ask request",
                                     buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000), registry=r)
        self.in_flight = Gauge("medhallguard_in_flight_requests", "RPCs being served (queued or computing)",
                               registry=r)
        self.queue_depth = Gauge("medhallguard_queue_depth", "Requests waiting for a compute slot", registry=r)
        self.batch_size = Gauge("medhallguard_batch_size",
                                "Sequences in the running decoder batch (with batching on; else stays 0)", registry=r)
        self.ready = Gauge("medhallguard_ready", "1 while health is SERVING, else 0", registry=r)
        self.model = Gauge("medhallguard_model_info", "The served model (always 1)",
                           ["model_id", "checksum", "backend"], registry=r)
        self._httpd = None

    def watch_queue(self, depth: Callable[[], float]) -> None:
        """Read the queue depth from `depth()` at every scrape."""
        self.queue_depth.set_function(depth)

    def watch_batch(self, size: Callable[[], float]) -> None:
        """Read the running batch size from `size()` at every scrape."""
        self.batch_size.set_function(size)

    def observe_call(self, rpc: str, code: grpc.StatusCode, response, seconds: float) -> None:
        """Count one finished RPC; `response` (an AskResponse, or None) adds verdict, stages and tokens."""
        self.requests.labels(rpc, code.name).inc()
        self.request_seconds.labels(rpc).observe(seconds)
        verdict = verdict_name(response) if response is not None else None
        if verdict is None:
            return
        self.verdicts.labels(rpc, verdict).inc()
        for stage in STAGES:
            self.stage_seconds.labels(stage).observe(getattr(response.timings, f"{stage}_ms") / 1e3)
        if rpc in _GENERATING_RPCS:
            self.tokens.inc(response.num_tokens)
            if response.num_tokens > 1 and response.timings.decode_ms > 0:
                self.decode_rate.observe(response.num_tokens / (response.timings.decode_ms / 1e3))

    def serve(self, address: str) -> int:
        """Start the /metrics HTTP endpoint on HOST:PORT in a daemon thread; -> the bound port."""
        host, _, port = address.rpartition(":")
        try:
            self._httpd, _ = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        except OSError as e:
            raise OSError(f"could not serve metrics on {address}: {e.strerror}; is the port in use?") from None
        bound = self._httpd.server_port
        log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
