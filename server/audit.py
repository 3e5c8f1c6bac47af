"""The PHI-safe audit log: one JSON line per RPC, fsync'd before the response leaves.

Each entry says when, which request, who called, which image (its sha256,
never its bytes), what the guard decided (verdict and scores), with which model
(checksum), and how the call ended (status, and for failures our own error
message, never a traceback or an exception's text from elsewhere). The question goes
in only when `audit_question` is on; the answer text never does. The file
rotates by size: audit.jsonl -> audit.jsonl.1 -> ... -> .N, oldest deleted.
server/interceptors.py decides when to write; this module owns what and how.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import threading
from pathlib import Path

import grpc

from server.service import verdict_name

_MAX_ERROR_CHARS = 300


class AuditWriteError(Exception):
    """The audit log could not be written, so the response must not be sent."""


class AuditLog:
    """Append-only JSONL file; `write` returns only once the line is on disk (os.fsync)."""

    def __init__(self, path: str | Path, max_bytes: int, backups: int, include_question: bool = False):
        self.path, self.max_bytes, self.backups = Path(path), max_bytes, backups
        self.include_question = include_question
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = self._open()
        except OSError as e:
            raise ValueError(f"cannot open the audit log {self.path}: {e.strerror}") from None

    def write(self, entry: dict) -> None:
        """Append one entry and fsync it; thread-safe; raises AuditWriteError if the disk refuses."""
        data = (json.dumps(entry, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        with self._lock:
            try:
                size = os.fstat(self._fd).st_size
                if size and size + len(data) > self.max_bytes:
                    self._rotate()
                self._append(data)
            except OSError as e:
                raise AuditWriteError(
                    f"the audit log {self.path} could not be written ({e.strerror}), so the response was withheld; "
                    "retry on another replica"
                ) from None

    def entry(self, rpc: str, request_id: str, client: str, peer: str, request, response, code: grpc.StatusCode,
              error: str = "", model_checksum: str = "") -> dict:
        """The entry for one RPC from its wire messages; `response` is None when the call failed."""
        out = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "rpc": rpc,
            "client": client,
            "peer": peer,
            "status": code.name,
        }
        image = getattr(request, "image", None)
        if image is not None:
            out.update(image_sha256=hashlib.sha256(image).hexdigest(), image_bytes=len(image),
                       media_type=request.media_type)
        if self.include_question and getattr(request, "question", None) is not None:
            out["question"] = request.question
        verdict = verdict_name(response) if response is not None else None
        if verdict is not None:
            out.update(_verdict_fields(response, verdict))
        out["model_checksum"] = getattr(response, "model_checksum", "") or getattr(response, "checksum", "") or model_checksum
        if error:
            out["error"] = error[:_MAX_ERROR_CHARS]
        return out

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _rotate(self) -> None:
        os.close(self._fd)
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._fd = self._open()
        _fsync_dir(self.path.parent)  # the renames and the new file survive a crash too


def _verdict_fields(r, verdict: str) -> dict:
    out = {"verdict": verdict, "model_id": r.model_id, "backend": r.backend,
           "num_tokens": r.num_tokens, "total_ms": round(r.timings.total_ms, 1)}
    if r.HasField("p_hallucination"):
        out.update(p_hallucination=r.p_hallucination, premise_risk=r.premise_risk, heads_trained=r.heads_trained)
    if r.HasField("scores"):
        s = r.scores
        out["scores"] = {"clinical_accuracy": s.clinical_accuracy, "clinical_relevance": s.clinical_relevance,
                         "detail_level": s.detail_level, "risk_level": s.risk_level}
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
