"""TLS, mutual TLS and bearer-token auth through a real gRPC server, with FakeGuard (no model files).

Certificates are made per test session by tests/certs.py; tokens come from a
tokens file (the server's) and a token file (the client's), as in production.
"""

from __future__ import annotations

import dataclasses
import hmac
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server import security
from server.cli import main as cli_main
from server.config import ServerConfig
from server.pb.medhallguard.v1 import guard_pb2 as pb
from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc
from tests.certs import CLIENT_CN, make_pki
from tests.fakes import FakeGuard, png_bytes, serve_in_thread

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-fedcba9876543210xyz"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# client tokens\nalice:{ALICE}\nbob:{BOB}  # the batch job\n")
    path.chmod(0o600)
    return str(path)


def _tls(pki, **overrides) -> ServerConfig:
    return ServerConfig(address="127.0.0.1:0", tls_cert=pki.server_cert, tls_key=pki.server_key, **overrides)


def _channel(port: int, pki=None, mutual: bool = False, rogue: bool = False) -> grpc.Channel:
    if pki is None:
        return grpc.insecure_channel(f"127.0.0.1:{port}")
    cert, key = (pki.rogue_cert, pki.rogue_key) if rogue else (pki.client_cert, pki.client_key)
    return security.client_channel(f"127.0.0.1:{port}", pki.ca_cert, cert if mutual else None,
                                   key if mutual else None)


def _ask() -> pb.AskRequest:
    return pb.AskRequest(image=png_bytes(), media_type="image/png", question="Is there a pleural effusion?")


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


# --- TLS and mutual TLS -----------------------------------------------------


@pytest.mark.timeout(30)
def test_tls_server_answers_a_client_that_trusts_its_ca(pki):
    with serve_in_thread(FakeGuard(), _tls(pki)) as server, _channel(server.port, pki) as channel:
        assert pb_grpc.MedHallGuardStub(channel).Ask(_ask(), timeout=10).verdict == pb.VERDICT_ANSWER


@pytest.mark.timeout(30)
def test_plaintext_client_cannot_talk_to_a_tls_server(pki):
    with serve_in_thread(FakeGuard(), _tls(pki)) as server, _channel(server.port) as channel:
        code = _code(lambda: pb_grpc.MedHallGuardStub(channel).Ask(_ask(), timeout=3))
    assert code is grpc.StatusCode.UNAVAILABLE


@pytest.mark.timeout(30)
def test_mutual_tls_accepts_a_certificate_signed_by_the_client_ca(pki, tmp_path):
    config = _tls(pki, tls_client_ca=pki.ca_cert, audit_log=str(tmp_path / "audit.jsonl"))
    with serve_in_thread(FakeGuard(), config) as server, _channel(server.port, pki, mutual=True) as channel:
        assert pb_grpc.MedHallGuardStub(channel).Ask(_ask(), timeout=10).verdict == pb.VERDICT_ANSWER
    entry = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert entry["client"] == f"cert:{CLIENT_CN}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("client", ["no_certificate", "certificate_from_another_ca"])
def test_mutual_tls_refuses_a_client_without_a_trusted_certificate(pki, client):
    with serve_in_thread(FakeGuard(), _tls(pki, tls_client_ca=pki.ca_cert)) as server:
        mutual = client != "no_certificate"
        with _channel(server.port, pki, mutual=mutual, rogue=mutual) as channel:
            code = _code(lambda: pb_grpc.MedHallGuardStub(channel).Ask(_ask(), timeout=3))
    assert code is grpc.StatusCode.UNAVAILABLE  # the handshake fails; no RPC reaches the server


def test_mismatched_certificate_and_key_are_refused_at_start(pki):
    config = ServerConfig(tls_cert=pki.server_cert, tls_key=pki.client_key)
    with pytest.raises(ValueError, match="key must belong to the certificate"):
        security.server_credentials(config)


def test_tls_key_without_certificate_is_a_config_error():
    with pytest.raises(ValueError, match="tls_cert.*tls_key"):
        ServerConfig(tls_key="server.key")


# --- bearer tokens ----------------------------------------------------------


@pytest.fixture(scope="module")
def authed(pki, tokens_file):
    """A TLS server with bearer-token auth (health open, reflection closed), and a channel to it."""
    with serve_in_thread(FakeGuard(), _tls(pki, auth_tokens_file=tokens_file)) as server:
        with _channel(server.port, pki) as channel:
            yield channel


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "metadata, expected",
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Basic {ALICE}"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer "),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer not-one-of-the-servers-tokens"),), grpc.StatusCode.PERMISSION_DENIED),
        ((("authorization", f"Bearer {ALICE[:-1]}"),), grpc.StatusCode.PERMISSION_DENIED),
        ((("authorization", f"Bearer {ALICE}"),), grpc.StatusCode.OK),
        ((("authorization", f"bearer {BOB}"),), grpc.StatusCode.OK),
    ],
    ids=["missing", "basic_scheme", "empty_token", "wrong_token", "truncated_token", "alice", "bob_lowercase"],
)
def test_bearer_token_decides_the_status(authed, metadata, expected):
    stub = pb_grpc.MedHallGuardStub(authed)
    assert _code(lambda: stub.Ask(_ask(), timeout=10, metadata=metadata)) is expected
    assert _code(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=metadata)) is expected


@pytest.mark.timeout(30)
def test_auth_errors_say_what_to_send(authed):
    with pytest.raises(grpc.RpcError) as missing:
        pb_grpc.MedHallGuardStub(authed).Ask(_ask(), timeout=10)
    assert "authorization: Bearer <token>" in missing.value.details()
    with pytest.raises(grpc.RpcError) as wrong:
        pb_grpc.MedHallGuardStub(authed).Ask(_ask(), timeout=10, metadata=(("authorization", "Bearer nope-nope"),))
    assert "not valid" in wrong.value.details() and "nope" not in wrong.value.details()


@pytest.mark.timeout(30)
def test_streaming_call_needs_a_token_too(authed):
    stub = pb_grpc.MedHallGuardStub(authed)
    assert _code(lambda: list(stub.AskStream(_ask(), timeout=10))) is grpc.StatusCode.UNAUTHENTICATED
    events = list(stub.AskStream(_ask(), timeout=10, metadata=security.auth_metadata(BOB)))
    assert events[-1].WhichOneof("event") == "final"


def _health(channel, metadata=()):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5,
                                                     metadata=metadata)


def _reflect(channel, metadata=()):
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return list(stub.ServerReflectionInfo(iter([request]), timeout=5, metadata=metadata))


@pytest.mark.timeout(30)
def test_by_default_health_is_open_and_reflection_needs_a_token(authed):
    assert _health(authed).status == health_pb2.HealthCheckResponse.SERVING
    assert _code(lambda: _reflect(authed)) is grpc.StatusCode.UNAUTHENTICATED
    bad = (("authorization", "Bearer wrong-token-wrong-token"),)
    assert _code(lambda: _reflect(authed, bad)) is grpc.StatusCode.PERMISSION_DENIED
    services = _reflect(authed, security.auth_metadata(ALICE))[0].list_services_response.service
    assert "medhallguard.v1.MedHallGuard" in {s.name for s in services}


@pytest.mark.timeout(30)
def test_config_can_close_health_and_open_reflection(pki, tokens_file):
    config = _tls(pki, auth_tokens_file=tokens_file, auth_health=True, auth_reflection=False)
    with serve_in_thread(FakeGuard(), config) as server, _channel(server.port, pki) as channel:
        assert _code(lambda: _health(channel)) is grpc.StatusCode.UNAUTHENTICATED
        assert _health(channel, security.auth_metadata(ALICE)).status == health_pb2.HealthCheckResponse.SERVING
        assert _reflect(channel)[0].list_services_response.service


@pytest.mark.timeout(30)
def test_auth_without_tls_is_refused_with_what_to_do(tokens_file):
    config = ServerConfig(address="127.0.0.1:0", auth_tokens_file=tokens_file)
    with pytest.raises(ValueError) as info:
        with serve_in_thread(FakeGuard(), config):
            pass
    message = str(info.value)
    assert "TLS is off" in message and "tls_cert" in message and "--insecure-auth" in message


@pytest.mark.timeout(30)
def test_insecure_auth_allows_tokens_over_plaintext(tokens_file):
    config = ServerConfig(address="127.0.0.1:0", auth_tokens_file=tokens_file, allow_insecure_auth=True)
    with serve_in_thread(FakeGuard(), config) as server, _channel(server.port) as channel:
        stub = pb_grpc.MedHallGuardStub(channel)
        assert _code(lambda: stub.Ask(_ask(), timeout=10)) is grpc.StatusCode.UNAUTHENTICATED
        assert stub.Ask(_ask(), timeout=10, metadata=security.auth_metadata(ALICE)).answer


# --- the token table --------------------------------------------------------


def test_tokens_come_from_the_file_and_the_environment_with_client_names(tokens_file):
    auth = security.load_auth(tokens_file, "carol:carol-token-000111222333, anonymous-token-99887766", False, True)
    assert auth.client_for([("authorization", f"Bearer {ALICE}")]) == "alice"
    assert auth.client_for([("authorization", f"Bearer {BOB}")]) == "bob"
    assert auth.client_for([("authorization", "Bearer carol-token-000111222333")]) == "carol"
    assert auth.client_for([("authorization", "Bearer anonymous-token-99887766")]) == "token-4"


def test_no_tokens_means_auth_is_off():
    assert security.load_auth("", None, False, True) is None
    assert security.load_auth("", " , ", False, True) is None


@pytest.mark.parametrize(
    "env, pattern",
    [
        ("alice:short", r"entry 1: a token must be at least 16 characters"),
        ("a lice:abcdefghijklmnopqrstuvwxyz", r"entry 1: a token"),  # splits into two entries; 'a' is short
        ("al!ce:abcdefghijklmnopqrstuvwxyz", r"entry 1: the client name"),
        ("x:abcdefghijklmnopqrstuvwxyz,y:abcdefghijklmnopqrstuvwxyz", r"entry 2: the same token"),
        ("x:abcdefghijklmnopqrstuvwxyz,x:zyxwvutsrqponmlkjihgfedcba", r"entry 2: client name 'x' appears twice"),
    ],
)
def test_bad_token_entries_are_refused_without_echoing_the_token(env, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        security.load_auth("", env, False, True)
    assert "abcdefghijklmnop" not in str(info.value) and "short" not in str(info.value).split(":")[-1]


def test_every_token_is_compared_even_after_a_match(tokens_file, monkeypatch):
    auth = security.load_auth(tokens_file, None, False, True)
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert auth.client_for([("authorization", f"Bearer {ALICE}")]) == "alice"  # alice is the first token
    assert len(calls) == len(auth.digests) == 2


# --- the command line -------------------------------------------------------


@pytest.mark.timeout(60)
def test_cli_client_connects_with_mutual_tls_and_a_token_file(pki, tokens_file, tmp_path, capsys):
    token_file = tmp_path / "my-token"
    token_file.write_text(f"{BOB}\n")
    config = _tls(pki, tls_client_ca=pki.ca_cert, auth_tokens_file=tokens_file)
    with serve_in_thread(FakeGuard(), config) as server:
        target = ["--server", f"127.0.0.1:{server.port}", "--ca-cert", pki.ca_cert,
                  "--client-cert", pki.client_cert, "--client-key", pki.client_key]
        assert cli_main(["info", *target, "--token-file", str(token_file), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["model_id"] == "fake-model"
        image = tmp_path / "x.png"
        image.write_bytes(png_bytes())
        assert cli_main(["ask", *target, "--token-file", str(token_file), "--image", str(image), "--wait-ready", "5",
                         "Any effusion?"]) == 0
        assert "verdict" in capsys.readouterr().out
        assert cli_main(["info", *target]) == 4
        assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_cli_serve_refuses_auth_without_tls_before_loading_the_model(tokens_file, tmp_path, capsys):
    code = cli_main(["serve", "--model", str(tmp_path / "no-model-here"), "--auth-tokens-file", tokens_file])
    assert code == 2
    err = capsys.readouterr().err
    assert "TLS is off" in err and "--insecure-auth" in err
    assert "no-model-here" not in err  # it stopped before trying to load the model


def test_server_config_fields_round_trip_from_toml_keys(pki, tokens_file):
    table = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": pki.ca_cert,
             "auth_tokens_file": tokens_file, "auth_health": True, "auth_reflection": False,
             "metrics_address": "127.0.0.1:0", "audit_log": "/tmp/a.jsonl", "audit_question": True}
    config = ServerConfig.from_dict(table)
    assert {k: getattr(config, k) for k in table} == table
    with pytest.raises(ValueError, match="metrics_address"):
        dataclasses.replace(config, metrics_address="9464")


@pytest.mark.timeout(30)
def test_audit_names_the_token_client_and_records_refused_calls(pki, tokens_file, tmp_path):
    config = _tls(pki, auth_tokens_file=tokens_file, audit_log=str(tmp_path / "audit.jsonl"))
    with serve_in_thread(FakeGuard(), config) as server, _channel(server.port, pki) as channel:
        stub = pb_grpc.MedHallGuardStub(channel)
        stub.Ask(pb.AskRequest(image=png_bytes(), media_type="image/png", question="Any effusion?",
                               request_id="ok-1"), timeout=10, metadata=security.auth_metadata(ALICE))
        for request_id, metadata in [("none-1", ()), ("wrong-1", (("authorization", "Bearer wrong-wrong-wrong"),))]:
            with pytest.raises(grpc.RpcError):
                stub.Ask(pb.AskRequest(image=png_bytes(), media_type="image/png", question="q",
                                       request_id=request_id), timeout=10, metadata=metadata)
    entries = {e["request_id"]: e for e in map(json.loads, (tmp_path / "audit.jsonl").read_text().splitlines())}
    assert entries["ok-1"]["client"] == "token:alice" and entries["ok-1"]["status"] == "OK"
    assert entries["none-1"]["status"] == "UNAUTHENTICATED" and entries["none-1"]["client"].startswith("peer:")
    assert entries["wrong-1"]["status"] == "PERMISSION_DENIED" and "verdict" not in entries["wrong-1"]
    assert "wrong-wrong" not in (tmp_path / "audit.jsonl").read_text()


@pytest.mark.timeout(240)
def test_launch_served_connects_to_a_tls_server_with_a_token_from_the_environment(nano_models, pki, tmp_path):
    from server.launch import served

    config = tmp_path / "tls.toml"
    config.write_text(f'[server]\ntls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n'
                      f'tls_client_ca = "{pki.ca_cert}"\nauth_health = true\n'
                      "[policy]\nallow_untrained_heads = true\n[decode]\nmax_new_tokens = 4\n")
    env = {"MEDHALLGUARD_AUTH_TOKENS": f"launcher:{ALICE}"}
    with served(nano_models["smolvlm"], config, ca_cert=pki.ca_cert, client_cert=pki.client_cert,
                client_key=pki.client_key, token=ALICE, env=env) as address:
        with security.client_channel(address, pki.ca_cert, pki.client_cert, pki.client_key) as channel:
            stub = pb_grpc.MedHallGuardStub(channel)
            response = stub.Ask(_ask(), timeout=60, metadata=security.auth_metadata(ALICE))
            assert response.verdict != pb.VERDICT_UNSPECIFIED and 1 <= response.num_tokens <= 4
            assert _code(lambda: stub.Ask(_ask(), timeout=60)) is grpc.StatusCode.UNAUTHENTICATED


def test_tokens_file_comments_do_not_cut_a_token_that_contains_a_hash(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# ops tokens\n  # indented comment\ndana:abc#def-0123456789xyz   # dana's laptop\n")
    auth = security.load_auth(str(path), None, False, True)
    assert auth.client_for([("authorization", "Bearer abc#def-0123456789xyz")]) == "dana"
    assert len(auth.digests) == 1


def test_serve_reads_the_token_and_pem_files_once_and_serves_what_it_checked(pki, tmp_path, monkeypatch):
    """serve() checks auth and TLS before the slow model load; the server then uses those, not a second read."""
    import types

    import guard.runtime
    from server import main

    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\n")
    tokens.chmod(0o600)
    reads = {"load_auth": 0, "server_credentials": 0}
    for name in reads:
        real = getattr(security, name)
        monkeypatch.setattr(security, name, lambda *a, _real=real, _name=name: reads.__setitem__(
            _name, reads[_name] + 1) or _real(*a))

    def load_guard(model, config, bundle=False):
        tokens.unlink()  # the file goes away while the model loads: nothing may read it again
        return types.SimpleNamespace(spec=types.SimpleNamespace(model_id="fake"),
                                     backend=types.SimpleNamespace(name="fake"))

    served = {}

    async def fake_serve(guard, config, on_bound, secured=None):
        served["secured"] = secured
        return 0

    monkeypatch.setattr(guard.runtime, "load_guard", load_guard)
    monkeypatch.setattr(main, "_serve", fake_serve)
    monkeypatch.delenv("MEDHALLGUARD_AUTH_TOKENS", raising=False)
    overrides = {"auth_tokens_file": str(tokens), "tls_cert": pki.server_cert, "tls_key": pki.server_key}
    assert main.serve(str(tmp_path / "model"), None, overrides, port=0) == 0
    assert reads == {"load_auth": 1, "server_credentials": 1}
    auth, credentials = served["secured"]
    assert auth.client_for([("authorization", f"Bearer {ALICE}")]) == "alice" and credentials is not None
