"""Build and run the gRPC server: config -> Guard -> create_server() -> warm-up -> serve -> drain.

This is the only module that reads environment variables (MEDHALLGUARD_*).
`create_server` is what tests call: it binds, starts serving with health
NOT_SERVING, and flips health to SERVING once `guard.warmup()` has finished.
On shutdown (`Running.stop`) new calls get UNAVAILABLE "server is draining"
while in-flight ones get the grace period to finish.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from dataclasses import dataclass
from typing import NamedTuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import logs, security
from server.audit import AuditLog
from server.config import ServerConfig, split_config
from server.interceptors import ErrorInterceptor
from server.metrics import Metrics
from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc
from server.service import SERVICE_NAME, MedHallGuardServicer

log = logging.getLogger(__name__)

_background: set[asyncio.Task] = set()  # asyncio keeps only weak references to tasks


@dataclass
class Running:
    """A started server and the handles needed to wait for it and to drain it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    servicer: MedHallGuardServicer
    warmed: asyncio.Task
    """Done when warm-up has finished (health SERVING), or failed (its exception)."""
    interceptor: ErrorInterceptor
    metrics: Metrics | None = None
    metrics_port: int | None = None
    """The bound port of the /metrics endpoint, when metrics are on."""
    audit: AuditLog | None = None

    async def stop(self, grace_s: float) -> None:
        """Health -> NOT_SERVING, new calls get UNAVAILABLE (draining), in-flight ones get grace_s to finish."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        self.interceptor.draining = True
        if self.metrics is not None:
            self.metrics.ready.set(0)
        await self.health.enter_graceful_shutdown()
        if not await self.interceptor.wait_idle(grace_s):
            log.warning("%d request(s) still running after the %.1f s grace; cancelling them",
                        self.interceptor.in_flight, grace_s)
        await self.server.stop(max(0.0, deadline - loop.time()))
        self.servicer.admission.shutdown()
        if self.metrics is not None:
            self.metrics.close()
        if self.audit is not None:
            self.audit.close()


async def create_server(address: str, guard, config: ServerConfig) -> tuple[grpc.aio.Server, int]:
    """Bind `address` ("127.0.0.1:0" picks a free port), start serving, warm up in the background."""
    running = await start(address, guard, config)
    return running.server, running.port


async def start(address: str, guard, config: ServerConfig, env_tokens: str | None = None,
                secured: Secured | None = None) -> Running:
    """Like create_server, but returns the health servicer, warm-up task, metrics and audit log as well.

    `secured` is what load_security() read (serve() reads it before the model load); without it the
    token and PEM files are read here, with `env_tokens` as the value of $MEDHALLGUARD_AUTH_TOKENS.
    Raises ValueError for bad tokens, auth without TLS (unless allowed) or unusable PEM files.
    """
    auth, credentials = secured or load_security(config, env_tokens)
    info = guard.info()
    metrics = Metrics() if config.metrics_address else None
    audit = (AuditLog(config.audit_log, config.audit_max_bytes, config.audit_backups, config.audit_question)
             if config.audit_log else None)
    interceptor = ErrorInterceptor(auth, audit, metrics, model_checksum=info.checksum)
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
        ],
    )
    servicer = MedHallGuardServicer(guard, config)
    pb_grpc.add_MedHallGuardServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (health.OVERALL_HEALTH, SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        try:
            port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"could not listen on {address}: {e}; is the port in use?") from None
        metrics_port = _serve_metrics(metrics, config.metrics_address, servicer, guard, info)
    except OSError:
        if audit is not None:
            audit.close()
        raise
    await server.start()
    log.info("listening on %s with %s; auth %s; audit log %s", address,
             ("mutual TLS" if config.tls_client_ca else "TLS") if credentials else "no TLS (plaintext)",
             f"on ({len(auth.digests)} token(s))" if auth else "off", config.audit_log or "off")
    warmed = asyncio.ensure_future(_warm_up(guard, servicer, health_servicer, metrics))
    _background.add(warmed)
    warmed.add_done_callback(_forget)
    return Running(server, port, health_servicer, servicer, warmed, interceptor, metrics, metrics_port, audit)


def _serve_metrics(metrics: Metrics | None, address: str, servicer: MedHallGuardServicer, guard, info) -> int | None:
    """Wire the gauges read at scrape time, then start the /metrics endpoint; -> its port."""
    if metrics is None:
        return None
    batcher = getattr(guard, "batcher", None)  # guard.batching.BatchScheduler when batching is on
    if batcher is None:
        metrics.watch_queue(lambda: servicer.admission.waiting)
    else:
        metrics.watch_queue(lambda: servicer.admission.waiting + batcher.queued())
        metrics.watch_batch(batcher.running)
    metrics.model.labels(info.model_id, info.checksum, info.backend).set(1)
    return metrics.serve(address)


def _forget(task: asyncio.Task) -> None:
    _background.discard(task)
    if not task.cancelled():
        task.exception()  # already logged by _warm_up; mark it retrieved


async def _warm_up(guard, servicer: MedHallGuardServicer, health_servicer, metrics: Metrics | None) -> None:
    log.info("warming up the model")
    try:
        await asyncio.to_thread(guard.warmup)
    except Exception:
        log.exception("warm-up failed; health stays NOT_SERVING")
        servicer.unready_reason = "the model failed its warm-up (see the server log); this replica will not serve"
        raise
    servicer.unready_reason = None
    for name in (health.OVERALL_HEALTH, SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if metrics is not None:
        metrics.ready.set(1)
    log.info("ready: health is SERVING")


def serve(
    model: str | None,
    config_path: str | None,
    overrides: dict,
    port: int | None = None,
    log_level: str | None = None,
    on_bound=lambda line: print(line, flush=True),
    bundle: str | None = None,
    log_format: str | None = None,
) -> int:
    """Load the guard, serve until SIGTERM/SIGINT, drain; returns the exit code.

    `model` is a model directory or an export bundle (detected by its manifest);
    `bundle` names a path that must be a bundle (served by onnxruntime, no torch).
    `overrides` are ServerConfig fields from CLI flags (None values are ignored);
    precedence is flag > MEDHALLGUARD_* environment variable > TOML file > default.
    `port`, when given, replaces the port of the resulting address.
    Bearer tokens come from `auth_tokens_file` and $MEDHALLGUARD_AUTH_TOKENS, never from flags.
    """
    logs.configure(
        level=log_level or os.environ.get("MEDHALLGUARD_LOG_LEVEL") or "INFO",
        fmt=log_format or os.environ.get("MEDHALLGUARD_LOG_FORMAT") or "text",
    )
    model = bundle or model or os.environ.get("MEDHALLGUARD_MODEL")
    if not model:
        raise ValueError("no model: pass --model DIR or --bundle DIR, or set MEDHALLGUARD_MODEL")
    server_config, guard_tables = resolve_config(config_path, overrides, port)
    secured = load_security(server_config, os.environ.get("MEDHALLGUARD_AUTH_TOKENS"))  # before the slow model load

    from guard.runtime import GuardConfig, load_guard  # load_guard imports the backend it needs

    guard_config = GuardConfig.from_dict(guard_tables)
    log.info("loading %s", model)
    guard = load_guard(model, guard_config, bundle=bundle is not None)
    log.info("serving %s with backend %s", guard.spec.model_id, guard.backend.name)
    return asyncio.run(_serve(guard, server_config, on_bound, secured))


class Secured(NamedTuple):
    """The server's auth and TLS, read once from the token and PEM files."""

    auth: security.Auth | None
    credentials: grpc.ServerCredentials | None


def load_security(config: ServerConfig, env_tokens: str | None) -> Secured:
    """Read the token and PEM files; raise ValueError for bad tokens, auth without TLS, unusable PEM files."""
    auth = security.load_auth(config.auth_tokens_file, env_tokens, config.auth_health, config.auth_reflection)
    security.check_transport(config, auth)
    return Secured(auth, security.server_credentials(config))


def resolve_config(config_path: str | None, overrides: dict, port: int | None = None) -> tuple[ServerConfig, dict]:
    """TOML file < MEDHALLGUARD_* environment < flags -> (ServerConfig, the tables for GuardConfig)."""
    server_config, guard_tables = split_config(config_path or os.environ.get("MEDHALLGUARD_CONFIG"))
    env = {"address": os.environ["MEDHALLGUARD_ADDRESS"]} if os.environ.get("MEDHALLGUARD_ADDRESS") else {}
    flags = {k: v for k, v in overrides.items() if v is not None}
    server_config = dataclasses.replace(server_config, **{**env, **flags})
    if port is not None:
        host = server_config.address.rpartition(":")[0]
        server_config = dataclasses.replace(server_config, address=f"{host}:{port}")
    return server_config, guard_tables


async def _serve(guard, config: ServerConfig, on_bound, secured: Secured | None = None) -> int:
    running = await start(config.address, guard, config, secured=secured)
    host = config.address.rpartition(":")[0]
    on_bound(f"serving on {host}:{running.port}")  # scripts read the real port from this line
    if running.metrics_port is not None:
        on_bound(f"metrics on http://{config.metrics_address.rpartition(':')[0]}:{running.metrics_port}/metrics")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    stop_wait = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({running.warmed, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    failed = running.warmed.done() and running.warmed.exception() is not None
    if not failed:
        await stop_wait
    log.info("shutting down: health NOT_SERVING, %.0f s grace for in-flight requests", config.grace_s)
    await running.stop(config.grace_s)
    stop_wait.cancel()
    log.info("stopped")
    return 1 if failed else 0
