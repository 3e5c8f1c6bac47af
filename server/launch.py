"""Start `medhallguard serve` as a child process on a loopback port, for scripts (demo, eval, benchmarks).

The child prints `serving on HOST:PORT` first; `served()` waits for health to
turn SERVING, yields the address, then sends SIGTERM and checks that the
server drained and exited 0. For a server with TLS or auth, pass the client's
side: `ca_cert` (and `client_cert`/`client_key` for mutual TLS), `token`, and
`env` for the child (e.g. MEDHALLGUARD_AUTH_TOKENS).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path


def cli_path() -> Path:
    return Path(sys.executable).with_name("medhallguard")


@contextlib.contextmanager
def served(model_dir: str | Path, config: str | Path | None = None, **options):
    """-> "127.0.0.1:PORT" of a SERVING server; raises RuntimeError if it does not come up.

    `options` are served_process()'s: ready_timeout_s, log, ca_cert, client_cert, client_key, token, env.
    """
    with served_process(model_dir, config, **options) as (address, _):
        yield address


@contextlib.contextmanager
def served_process(
    model_dir: str | Path,
    config: str | Path | None = None,
    ready_timeout_s: float = 120.0,
    log=None,
    ca_cert: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    token: str | None = None,
    env: dict | None = None,
    stderr=None,
):
    """Like served(), but yields (address, the server's subprocess.Popen) for callers that watch the process.

    `stderr`: where the server's log goes (a file object; default: this process's stderr).
    """
    import os

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from server.security import auth_metadata, client_channel

    cmd = [str(cli_path()), "serve", "--model", str(model_dir), "--address", "127.0.0.1:0"]
    if config:
        cmd += ["--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**os.environ, **(env or {})})
    try:
        line = proc.stdout.readline().strip()
        if not line.startswith("serving on "):
            raise RuntimeError(f"`{' '.join(cmd)}` did not start (first line {line!r}); see its log above")
        address = line.removeprefix("serving on ")
        with client_channel(address, ca_cert, client_cert, client_key) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            grpc.channel_ready_future(channel).result(timeout=ready_timeout_s)
            _wait_serving(health, health_pb2, ready_timeout_s, auth_metadata(token))
        if log:
            log(f"server for {model_dir} is SERVING on {address}")
        yield address, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        if code != 0:
            raise RuntimeError(f"the server for {model_dir} exited {code} after SIGTERM (expected 0)")


def _wait_serving(health, health_pb2, timeout_s: float, metadata=()) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5, metadata=metadata).status
        if status == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the server did not turn SERVING within {timeout_s} s")
