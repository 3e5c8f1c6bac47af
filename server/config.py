"""ServerConfig: the `[server]` table of a deployment's TOML file.

The other tables ([backend], [decode], [policy], [limits]) belong to
`guard.runtime.GuardConfig`; `split_config` hands them over untouched.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    address: str = "127.0.0.1:50051"
    """HOST:PORT to listen on; port 0 picks a free port (the bound one is printed)."""
    max_message_bytes: int = 32 * MiB
    """Largest gRPC message received or sent, in bytes; bounds the image size on the wire."""
    max_concurrency: int = 2
    """Requests computing at once; each one occupies a worker thread. With [batching] on, at least
    `batching.max_batch_size`, so that a full batch can be admitted."""
    max_queue: int = 8
    """Requests allowed to wait for a slot; one more gets RESOURCE_EXHAUSTED."""
    default_deadline_s: float = 120.0
    """Deadline applied to a request whose client sent none."""
    max_question_chars: int = 4000
    """Longest question accepted, in characters; longer ones get INVALID_ARGUMENT."""
    max_answer_chars: int = 16000
    """Longest answer accepted by Score, in characters."""
    grace_s: float = 10.0
    """On SIGTERM/SIGINT, how long in-flight requests get to finish before they are cancelled."""
    stream_deltas: bool = True
    """AskStream sends text deltas before the verdict. They are provisional: an ABSTAIN
    withholds the final answer, but deltas already sent cannot be recalled. Set false to
    fail closed strictly: AskStream then sends only the final, guarded message."""
    # --- security (server/security.py) ---
    tls_cert: str = ""
    """PEM certificate chain the server presents; with `tls_key` it turns TLS on."""
    tls_key: str = ""
    """PEM private key of `tls_cert`."""
    tls_client_ca: str = ""
    """PEM CA bundle; when set, every client must present a certificate it signed (mutual TLS)."""
    auth_tokens_file: str = ""
    """File of bearer tokens, one `CLIENT_NAME:TOKEN` per line; $MEDHALLGUARD_AUTH_TOKENS adds more.
    Any token turns auth on. Tokens are never read from the command line or this config file."""
    auth_health: bool = False
    """With auth on, the health service needs a token too (off: load balancers probe without one)."""
    auth_reflection: bool = True
    """With auth on, the reflection service needs a token too."""
    allow_insecure_auth: bool = False
    """Allow bearer tokens without TLS (they cross the network in clear text): loopback tests only."""
    # --- observability and audit (server/metrics.py, server/audit.py) ---
    metrics_address: str = ""
    """HOST:PORT of the Prometheus /metrics HTTP endpoint; empty turns it off; port 0 picks a free one."""
    audit_log: str = ""
    """Path of the JSONL audit log (one fsync'd line per request); empty turns auditing off."""
    audit_question: bool = False
    """Also write each question's text into the audit log; questions can hold PHI."""
    audit_max_bytes: int = 64 * MiB
    """Rotate the audit log when it would grow past this many bytes."""
    audit_backups: int = 10
    """Rotated audit files kept (audit.jsonl.1 .. .N); the oldest is deleted."""

    def __post_init__(self) -> None:
        _check_address("address", self.address)
        if self.max_message_bytes < 1024:
            raise ValueError("`server.max_message_bytes` must be at least 1024")
        if self.max_concurrency < 1:
            raise ValueError("`server.max_concurrency` must be at least 1")
        if self.max_queue < 0:
            raise ValueError("`server.max_queue` must be >= 0")
        if self.default_deadline_s <= 0:
            raise ValueError("`server.default_deadline_s` must be > 0")
        if self.max_question_chars < 1:
            raise ValueError("`server.max_question_chars` must be at least 1")
        if self.max_answer_chars < 1:
            raise ValueError("`server.max_answer_chars` must be at least 1")
        if self.grace_s < 0:
            raise ValueError("`server.grace_s` must be >= 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("`server.tls_cert` and `server.tls_key` go together: set both for TLS, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("`server.tls_client_ca` (mutual TLS) needs TLS: set `tls_cert` and `tls_key` too")
        if self.metrics_address:
            _check_address("metrics_address", self.metrics_address)
        if self.audit_max_bytes < 4096:
            raise ValueError("`server.audit_max_bytes` must be at least 4096")
        if self.audit_backups < 1:
            raise ValueError("`server.audit_backups` must be at least 1")

    @classmethod
    def from_dict(cls, d: dict) -> "ServerConfig":
        """Build from the parsed `[server]` table; an unknown key is an error that names it."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} in [server]; known keys: {sorted(known)}")
        return cls(**d)


def _check_address(name: str, address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"`server.{name}` must be HOST:PORT (e.g. 127.0.0.1:50051), got {address!r}")


def split_config(path: str | Path | None) -> tuple[ServerConfig, dict]:
    """Read a TOML file -> (the [server] table as ServerConfig, every other table for GuardConfig.from_dict)."""
    if path is None:
        return ServerConfig(), {}
    with open(path, "rb") as f:
        tables = tomllib.load(f)
    server = tables.pop("server", {})
    if not isinstance(server, dict):
        raise ValueError("`server` in the config file must be a table: [server]")
    return ServerConfig.from_dict(server), tables
