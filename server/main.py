"""Build and run the gRPC server: config -> Guard -> create_server() -> warm-up -> serve -> drain.

This is the only module that reads environment variables (MEDHALLGUARD_*).
`create_server` is what tests call: it binds, starts serving with health
NOT_SERVING, and flips health to SERVING once `guard.warmup()` has finished.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.config import ServerConfig, split_config
from server.interceptors import ErrorInterceptor
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

    async def stop(self, grace_s: float) -> None:
        """Health -> NOT_SERVING, refuse new RPCs, give in-flight ones grace_s to finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        self.servicer.admission.shutdown()


async def create_server(address: str, guard, config: ServerConfig) -> tuple[grpc.aio.Server, int]:
    """Bind `address` ("127.0.0.1:0" picks a free port), start serving, warm up in the background."""
    running = await start(address, guard, config)
    return running.server, running.port


async def start(address: str, guard, config: ServerConfig) -> Running:
    """Like create_server, but returns the health servicer and warm-up task as well."""
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor()],
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
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"could not listen on {address}: {e}; is the port in use?") from None
    await server.start()
    warmed = asyncio.ensure_future(_warm_up(guard, servicer, health_servicer))
    _background.add(warmed)
    warmed.add_done_callback(_forget)
    return Running(server, port, health_servicer, servicer, warmed)


def _forget(task: asyncio.Task) -> None:
    _background.discard(task)
    if not task.cancelled():
        task.exception()  # already logged by _warm_up; mark it retrieved


async def _warm_up(guard, servicer: MedHallGuardServicer, health_servicer) -> None:
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
    log.info("ready: health is SERVING")


def serve(
    model: str | None,
    config_path: str | None,
    overrides: dict,
    port: int | None = None,
    log_level: str | None = None,
    on_bound=lambda line: print(line, flush=True),
    bundle: str | None = None,
) -> int:
    """Load the guard, serve until SIGTERM/SIGINT, drain; returns the exit code.

    `model` is a model directory or an export bundle (detected by its manifest);
    `bundle` names a path that must be a bundle (served by onnxruntime, no torch).
    `overrides` are ServerConfig fields from CLI flags (None values are ignored);
    precedence is flag > MEDHALLGUARD_* environment variable > TOML file > default.
    `port`, when given, replaces the port of the resulting address.
    """
    logging.basicConfig(
        level=(log_level or os.environ.get("MEDHALLGUARD_LOG_LEVEL") or "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    model = bundle or model or os.environ.get("MEDHALLGUARD_MODEL")
    if not model:
        raise ValueError("no model: pass --model DIR or --bundle DIR, or set MEDHALLGUARD_MODEL")
    server_config, guard_tables = resolve_config(config_path, overrides, port)

    from guard.runtime import GuardConfig, load_guard  # load_guard imports the backend it needs

    guard_config = GuardConfig.from_dict(guard_tables)
    log.info("loading %s", model)
    guard = load_guard(model, guard_config, bundle=bundle is not None)
    log.info("serving %s with backend %s", guard.spec.model_id, guard.backend.name)
    return asyncio.run(_serve(guard, server_config, on_bound))


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


async def _serve(guard, config: ServerConfig, on_bound) -> int:
    running = await start(config.address, guard, config)
    host = config.address.rpartition(":")[0]
    on_bound(f"serving on {host}:{running.port}")  # scripts read the real port from this line
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
