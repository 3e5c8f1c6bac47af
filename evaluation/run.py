"""Run Ask or Score requests through the guard: in-process (default) or against a server over gRPC.

Both paths take and return the wire messages (`AskRequest`/`ScoreRequest` ->
`AskResponse`), and the in-process path goes through the same edge checks and
translations as the servicer (`server.service`), so a report reads the same
whichever way its numbers were made.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Protocol


class Runner(Protocol):
    """Requests -> responses, with a progress bar. `describe()` says what answered them."""

    def run(self, rpc: str, requests: list, desc: str) -> list: ...

    def describe(self) -> dict: ...


class InProcessRunner:
    """The guard loaded here (model directory: torch; bundle: onnxruntime).

    Answers are kept even when the guard abstains: the evaluation judges the
    model's raw answers and reports the verdicts beside them.
    """

    def __init__(self, path: str | Path, config_file: str | Path | None = None, bundle: bool = False):
        from server.config import split_config

        self.server_config, self._tables = split_config(config_file)
        self.path, self.bundle = Path(path), bundle

    @functools.cached_property
    def guard(self):
        """Loaded on first use, so bad data files are reported before a model takes seconds to load."""
        from guard.runtime import GuardConfig, load_guard

        config = GuardConfig.from_dict(self._tables)
        config = dataclasses.replace(config, policy=dataclasses.replace(config.policy, withhold_answer_on_abstain=False))
        return load_guard(self.path, config, bundle=self.bundle)

    def run(self, rpc: str, requests: list, desc: str) -> list:
        from tqdm.auto import tqdm

        return [self._one(rpc, r) for r in tqdm(requests, desc=desc, unit="q")]

    def _one(self, rpc: str, request):
        from server import service

        t0 = time.perf_counter()
        req = service.request_from_pb(request, self.guard.config.decode, self.server_config)
        result = self.guard.score(req) if rpc == "Score" else self.guard.answer(req)
        return service.response_to_pb(result, (time.perf_counter() - t0) * 1e3)

    def describe(self) -> dict:
        info = self.guard.info()
        return {"runs": "in-process", "path": str(self.path), "model_id": info.model_id,
                "checksum": info.checksum, "backend": info.backend, "heads_trained": info.heads_trained}


class RemoteRunner:
    """A running `medhallguard serve` over gRPC, `concurrency` requests at once."""

    def __init__(self, address: str, concurrency: int = 2, timeout_s: float = 300.0):
        self.address, self.concurrency, self.timeout_s = address, concurrency, timeout_s
        self._info = None

    def run(self, rpc: str, requests: list, desc: str) -> list:
        from training.evaluate import call_all

        return call_all(self.address, requests, rpc, self.concurrency, desc, timeout_s=self.timeout_s)

    def describe(self) -> dict:
        import grpc

        from server.pb.medhallguard.v1 import guard_pb2 as pb
        from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc

        with grpc.insecure_channel(self.address) as channel:
            m = pb_grpc.MedHallGuardStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        return {"runs": f"gRPC server {self.address}", "model_id": m.model_id, "checksum": m.checksum,
                "backend": m.backend, "heads_trained": m.heads_trained}
