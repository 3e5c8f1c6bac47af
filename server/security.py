"""Transport security and bearer-token auth, for the server and its clients.

Owns: TLS / mutual-TLS credentials from PEM files, the bearer-token table
(`Auth`), who a caller is (`client_identity`), and the rule that tokens never
travel in clear text unless the operator says so. It raises typed errors and
never chooses a status code: server/interceptors.py maps them and calls
`Auth.client_for` on every request. Tokens come from a file or the
environment (server/main.py reads it), never from flags or the config file.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_COMMENT = re.compile(r"(^|\s)#.*$")
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_REFLECTION_PREFIX = "/grpc.reflection."
_NEW_TOKEN_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class UnauthenticatedError(Exception):
    """The call carried no usable credentials (no or malformed `authorization` metadata)."""


class PermissionDeniedError(Exception):
    """The call carried a bearer token that is not one of the server's."""


# --- bearer tokens ----------------------------------------------------------


@dataclass(frozen=True)
class Auth:
    """The server's bearer tokens (as sha256 digests) and which services they guard."""

    digests: tuple[tuple[bytes, str], ...]
    """(sha256(token), client name) pairs."""
    health: bool = False
    """The health service needs a token too."""
    reflection: bool = True
    """The reflection service needs a token too."""

    def required_for(self, method: str) -> bool:
        """Whether a call to `method` (e.g. "/grpc.health.v1.Health/Check") must carry a token."""
        if method.startswith(_HEALTH_PREFIX):
            return self.health
        if method.startswith(_REFLECTION_PREFIX):
            return self.reflection
        return True

    def client_for(self, metadata) -> str:
        """The client name of the call's bearer token; raises UnauthenticatedError or PermissionDeniedError."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            raise UnauthenticatedError("missing credentials: send the metadata `authorization: Bearer <token>`")
        scheme, _, token = str(values[0]).strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise UnauthenticatedError("malformed `authorization` metadata: it must be `Bearer <token>`")
        digest = hashlib.sha256(token.encode()).digest()
        client = None
        for known, name in self.digests:  # every digest is compared: the time does not depend on which matched
            if hmac.compare_digest(digest, known):
                client = name
        if client is None:
            raise PermissionDeniedError("the bearer token is not valid for this server")
        return client


def load_auth(tokens_file: str, env_tokens: str | None, health: bool, reflection: bool) -> Auth | None:
    """Tokens from `tokens_file` and the MEDHALLGUARD_AUTH_TOKENS value -> Auth, or None when there are none.

    Both hold entries `CLIENT_NAME:TOKEN` or bare `TOKEN` (named token-1, token-2, ...): one per line in
    the file (`#` starts a comment), separated by commas or whitespace in the variable.
    """
    entries: list[tuple[str, str, str]] = []  # (where, name or "", token)
    if tokens_file:
        path = Path(tokens_file)
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"cannot read `auth_tokens_file` {tokens_file}: {e.strerror}") from None
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("the tokens file %s is readable by other users; chmod 600 it", tokens_file)
        for number, line in enumerate(text.splitlines(), 1):
            line = _COMMENT.sub("", line).strip()  # "# note" lines and " # note" tails; a '#' inside a token stays
            if line:
                entries.append((f"{tokens_file} line {number}", *_split_entry(line)))
    for number, entry in enumerate((env_tokens or "").replace(",", " ").split(), 1):
        entries.append((f"MEDHALLGUARD_AUTH_TOKENS entry {number}", *_split_entry(entry)))
    if not entries:
        return None
    digests, names = [], set()
    for index, (where, name, token) in enumerate(entries, 1):
        name = name or f"token-{index}"
        _check_entry(where, name, token)
        digest = hashlib.sha256(token.encode()).digest()
        if any(hmac.compare_digest(digest, d) for d, _ in digests):
            raise ValueError(f"{where}: the same token appears twice; give each client its own token")
        if name in names:
            raise ValueError(f"{where}: client name {name!r} appears twice; names identify clients in the audit log")
        digests.append((digest, name))
        names.add(name)
    return Auth(tuple(digests), health=health, reflection=reflection)


def _split_entry(entry: str) -> tuple[str, str]:
    name, sep, token = entry.partition(":")
    return (name.strip(), token.strip()) if sep else ("", entry.strip())


def _check_entry(where: str, name: str, token: str) -> None:
    # Messages name the place, never the token.
    if not _NAME.fullmatch(name):
        raise ValueError(f"{where}: the client name must be 1-64 of A-Z a-z 0-9 . _ @ -")
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ValueError(f"{where}: a token must be at least {MIN_TOKEN_CHARS} characters, no spaces; {_NEW_TOKEN_HINT}")


def check_transport(config, auth: Auth | None) -> None:
    """Refuse bearer tokens over plaintext unless `allow_insecure_auth` says so."""
    if auth is None or config.tls_cert:
        return
    if config.allow_insecure_auth:
        log.warning("bearer-token auth WITHOUT TLS (allow_insecure_auth): tokens cross the network in clear text")
        return
    raise ValueError(
        f"bearer-token auth is on ({len(auth.digests)} token(s)) but TLS is off, so tokens would cross the network "
        "in clear text. Set `tls_cert` and `tls_key` in [server] (or --tls-cert/--tls-key); for a loopback test "
        "only, pass --insecure-auth (allow_insecure_auth = true)"
    )


# --- TLS --------------------------------------------------------------------


def server_credentials(config) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's PEM files (mutual TLS when `tls_client_ca` is set), or None."""
    if not config.tls_cert:
        return None
    try:  # a mismatched or unreadable pair fails here, with a message, not at the first handshake
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(
            f"cannot use `tls_cert` {config.tls_cert} with `tls_key` {config.tls_key}: {e}; "
            "they must be PEM files and the key must belong to the certificate"
        ) from None
    client_ca = _read_pem("tls_client_ca", config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(_read_pem("tls_key", config.tls_key), _read_pem("tls_cert", config.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def client_channel(
    target: str,
    ca_cert: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    tls: bool = False,
    options=(),
) -> grpc.Channel:
    """A channel to `target`: plaintext unless `tls` or a certificate is given (then TLS; mutual with a client pair)."""
    if bool(client_cert) != bool(client_key):
        raise ValueError("--client-cert and --client-key go together: pass both for mutual TLS, or neither")
    if not (tls or ca_cert or client_cert):
        return grpc.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_pem("--ca-cert", ca_cert) if ca_cert else None,  # None: the system's roots
        private_key=_read_pem("--client-key", client_key) if client_key else None,
        certificate_chain=_read_pem("--client-cert", client_cert) if client_cert else None,
    )
    return grpc.secure_channel(target, credentials, options=options)


def read_token(path: str) -> str:
    """A client's bearer token: the first non-empty line of `path`."""
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise ValueError(f"cannot read the token file {path}: {e.strerror}") from None
    if not lines:
        raise ValueError(f"the token file {path} is empty; put the bearer token on its first line")
    return lines[0]


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries `token` (empty without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def client_identity(context, token_client: str | None) -> str:
    """Who called: `token:NAME`, else `cert:COMMON_NAME` (mutual TLS), else `peer:ADDRESS`."""
    if token_client:
        return f"token:{token_client}"
    common_names = (context.auth_context() or {}).get("x509_common_name")
    if common_names:
        return f"cert:{common_names[0].decode(errors='replace')}"
    return f"peer:{context.peer()}"


def _read_pem(what: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what} {path} is not a PEM file (no -----BEGIN line)")
    return data
