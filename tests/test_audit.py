"""The audit log: one fsync'd JSON line per call, written before the response leaves, with no PHI by default."""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os

import grpc
import pytest

from server import audit as audit_module
from server.audit import AuditLog
from server.config import ServerConfig
from server.pb.medhallguard.v1 import guard_pb2 as pb
from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc
from tests.fakes import FakeGuard, png_bytes, serve_in_thread

QUESTION = "Does patient Jane Q. Doe, MRN 00123456, have a pleural effusion?"
IMAGE = png_bytes((40, 36), color=(10, 200, 30))


def _ask(**overrides) -> pb.AskRequest:
    return pb.AskRequest(**{**dict(image=IMAGE, media_type="image/png", question=QUESTION), **overrides})


def _entries(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _config(tmp_path, **overrides) -> ServerConfig:
    return ServerConfig(address="127.0.0.1:0", audit_log=str(tmp_path / "audit.jsonl"), **overrides)


@contextlib.contextmanager
def _stub(tmp_path, guard=None, **overrides):
    """A stub for a server (FakeGuard by default) that audits to tmp_path/audit.jsonl; both are closed on exit."""
    guard = FakeGuard() if guard is None else guard
    with serve_in_thread(guard, _config(tmp_path, **overrides)) as server, grpc.insecure_channel(
        f"127.0.0.1:{server.port}"
    ) as channel:
        yield pb_grpc.MedHallGuardStub(channel)


@pytest.mark.timeout(30)
def test_each_call_gets_an_entry_with_image_hash_verdict_scores_and_model(tmp_path):
    path = tmp_path / "audit.jsonl"
    with _stub(tmp_path) as stub:
        stub.Ask(_ask(request_id="a-1"), timeout=10)
        stub.Score(pb.ScoreRequest(image=IMAGE, media_type="image/png", question=QUESTION, answer="Yes, a small one.",
                                   request_id="s-1"), timeout=10)
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    ask, score, info = _entries(path)
    assert ask["request_id"] == "a-1" and ask["rpc"] == "Ask" and ask["status"] == "OK"
    assert ask["image_sha256"] == hashlib.sha256(IMAGE).hexdigest() and ask["image_bytes"] == len(IMAGE)
    assert ask["verdict"] == "ANSWER" and ask["model_checksum"] == "f" * 64 and ask["model_id"] == "fake-model"
    assert ask["p_hallucination"] == pytest.approx(0.12) and ask["premise_risk"] == pytest.approx(0.05)
    assert ask["scores"] == {"clinical_accuracy": 7.0, "clinical_relevance": 8.0, "detail_level": 5.0,
                             "risk_level": 2.0}
    assert ask["client"].startswith("peer:ipv4:127.0.0.1:") and ask["peer"].startswith("ipv4:127.0.0.1:")
    assert ask["time"].endswith("+00:00")
    assert score["rpc"] == "Score" and score["request_id"] == "s-1" and score["verdict"] == "ANSWER"
    assert info["rpc"] == "GetModelInfo" and info["model_checksum"] == "f" * 64 and "image_sha256" not in info
    assert len(info["request_id"]) == 32  # the server names calls whose message has no request_id


@pytest.mark.timeout(30)
def test_the_log_never_holds_the_image_question_or_answer_by_default(tmp_path):
    with _stub(tmp_path) as stub:
        response = stub.Ask(_ask(), timeout=10)
    text = (tmp_path / "audit.jsonl").read_text()
    assert "question" not in _entries(tmp_path / "audit.jsonl")[0]
    for secret in (QUESTION, "Jane", "00123456", response.answer, base64.b64encode(IMAGE).decode(), IMAGE.hex()):
        assert secret not in text
    assert os.stat(tmp_path / "audit.jsonl").st_mode & 0o077 == 0  # owner-only


@pytest.mark.timeout(30)
def test_the_question_is_logged_only_when_the_config_allows_it(tmp_path):
    with _stub(tmp_path, audit_question=True) as stub:
        stub.Ask(_ask(), timeout=10)
    assert _entries(tmp_path / "audit.jsonl")[0]["question"] == QUESTION


@pytest.mark.timeout(30)
def test_entry_is_fsynced_before_the_response_arrives(tmp_path, monkeypatch):
    events: list[str] = []
    real_append = AuditLog._append

    def append(self, data):
        real_append(self, data)  # os.write, then os.fsync
        events.append("fsync")

    monkeypatch.setattr(AuditLog, "_append", append)
    path = tmp_path / "audit.jsonl"
    with _stub(tmp_path) as stub:
        stub.Ask(_ask(request_id="unary-1"), timeout=10)
        events.append("response")
        assert _entries(path)[-1]["request_id"] == "unary-1"  # on disk the moment the response is here
        for message in stub.AskStream(_ask(request_id="stream-1"), timeout=10):
            if message.WhichOneof("event") == "final":
                events.append("final")
                assert _entries(path)[-1]["request_id"] == "stream-1"
    assert events == ["fsync", "response", "fsync", "final"]


@pytest.mark.timeout(30)
def test_failed_calls_get_an_entry_with_status_and_error_but_no_internals(tmp_path):
    guard = FakeGuard(error=RuntimeError("secret detail: /opt/weights/key=hunter2"))
    with _stub(tmp_path, guard) as stub:
        with pytest.raises(grpc.RpcError):
            stub.Ask(_ask(request_id="bad-1", question=" "), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.Ask(_ask(request_id="boom-1"), timeout=10)
    invalid, internal = _entries(tmp_path / "audit.jsonl")
    assert invalid["status"] == "INVALID_ARGUMENT" and "question" in invalid["error"] and "verdict" not in invalid
    assert invalid["image_sha256"] == hashlib.sha256(IMAGE).hexdigest()
    assert invalid["model_checksum"] == "f" * 64  # the served model, from the server's own record
    assert internal["status"] == "INTERNAL" and "hunter2" not in json.dumps(internal)


@pytest.mark.timeout(30)
def test_response_is_withheld_when_the_audit_log_cannot_be_written(tmp_path, monkeypatch):
    def disk_full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with _stub(tmp_path) as stub:
        monkeypatch.setattr(AuditLog, "_append", disk_full)
        with pytest.raises(grpc.RpcError) as info:
            stub.Ask(_ask(), timeout=10)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "audit log" in info.value.details() and "withheld" in info.value.details()


def test_log_rotates_by_size_keeping_the_configured_backups(tmp_path, monkeypatch):
    fsyncs = []
    monkeypatch.setattr(audit_module.os, "fsync", lambda fd: fsyncs.append(fd))
    path = tmp_path / "logs" / "audit.jsonl"
    log = AuditLog(path, max_bytes=4096, backups=2)
    for i in range(40):  # ~300 bytes each: about 12 per file
        log.write({"request_id": f"r{i:03d}", "pad": "x" * 270})
    log.close()
    files = [path, path.with_name("audit.jsonl.1"), path.with_name("audit.jsonl.2")]
    assert all(f.exists() for f in files) and not path.with_name("audit.jsonl.3").exists()
    assert all(f.stat().st_size <= 4096 for f in files)
    kept = [e["request_id"] for f in reversed(files) for e in _entries(f)]
    assert kept == [f"r{i:03d}" for i in range(40 - len(kept), 40)]  # newest kept, in order, none torn
    assert len(fsyncs) >= 40  # every write, plus the directory after each rotation


def test_a_log_that_cannot_be_opened_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot open the audit log"):
        AuditLog(tmp_path / "file" / "audit.jsonl", max_bytes=4096, backups=1)
