"""End to end through a real gRPC server with the real runtime and tiny random-init models.

For each family, `init_model(size="nano")` writes a model directory, the
runtime loads it, and a grpc.aio server on a loopback port serves it. The
heads are untrained, so the policy is told to allow them and to keep the
answer text on ABSTAIN: that lets the tests compare streamed and final text.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.config import ServerConfig
from server.pb.medhallguard.v1 import guard_pb2 as pb
from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc
from tests.fakes import png_bytes, serve_in_thread

pytest.importorskip("torch", reason="the reference runtime needs the [torch] extra")

FAMILIES = ("smolvlm", "llava")
MAX_NEW_TOKENS = 8
GUARD_TABLES = {
    "policy": {"allow_untrained_heads": True, "withhold_answer_on_abstain": False},
    "decode": {"max_new_tokens": MAX_NEW_TOKENS},
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    from training.init_model import init_model

    root = tmp_path_factory.mktemp("nano-models")
    return {family: init_model(family=family, size="nano", out_dir=root / family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, model_dirs):
    """(family, running server, channel) for one family's nano model."""
    from guard.runtime import GuardConfig, load_guard

    guard = load_guard(model_dirs[request.param], GuardConfig.from_dict(GUARD_TABLES))
    with serve_in_thread(guard, ServerConfig(address="127.0.0.1:0")) as running:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield request.param, running, channel


def _ask(**overrides) -> pb.AskRequest:
    fields = dict(image=png_bytes((48, 40)), media_type="image/png", question="Is there a nodule in the right lung?")
    fields.update(overrides)
    return pb.AskRequest(**fields)


def _assert_guarded(r: pb.AskResponse) -> None:
    assert r.verdict != pb.VERDICT_UNSPECIFIED
    assert r.HasField("p_hallucination") and 0.0 <= r.p_hallucination <= 1.0
    assert r.HasField("premise_risk") and 0.0 <= r.premise_risk <= 1.0
    assert r.HasField("scores")
    for name in ("clinical_accuracy", "clinical_relevance", "detail_level", "risk_level"):
        assert 1.0 <= getattr(r.scores, name) <= 10.0, name
    assert not r.heads_trained
    assert r.model_checksum and r.model_id and r.backend
    assert r.timings.preprocess_ms > 0 and r.timings.vision_ms > 0 and r.timings.guard_ms > 0
    assert r.timings.total_ms >= r.timings.vision_ms
    assert r.reasons, "untrained heads always come with a warning"


@pytest.mark.timeout(120)
def test_ask_returns_a_guarded_answer(served):
    _, _, channel = served
    r = pb_grpc.MedHallGuardStub(channel).Ask(_ask(request_id="e2e-1"), timeout=60)
    _assert_guarded(r)
    assert r.request_id == "e2e-1"
    assert 1 <= r.num_tokens <= MAX_NEW_TOKENS
    assert r.stop_reason in ("eos", "length")
    assert r.timings.decode_ms > 0 or r.num_tokens == 1


@pytest.mark.timeout(120)
def test_ask_honours_generation_settings(served):
    _, _, channel = served
    request = _ask(generation=pb.GenerationSettings(max_new_tokens=2, temperature=0.7, seed=3))
    r = pb_grpc.MedHallGuardStub(channel).Ask(request, timeout=60)
    assert 1 <= r.num_tokens <= 2


@pytest.mark.timeout(120)
def test_ask_stream_deltas_concatenate_to_the_final_answer(served):
    _, _, channel = served
    messages = list(pb_grpc.MedHallGuardStub(channel).AskStream(_ask(), timeout=60))
    *deltas, final = messages
    assert all(m.WhichOneof("event") == "delta" for m in deltas)
    assert final.WhichOneof("event") == "final"
    _assert_guarded(final.final)
    assert "".join(m.delta for m in deltas) == final.final.answer
    unary = pb_grpc.MedHallGuardStub(channel).Ask(_ask(), timeout=60)
    assert final.final.answer == unary.answer  # greedy: same text either way


@pytest.mark.timeout(120)
def test_score_judges_a_given_answer(served):
    _, _, channel = served
    request = pb.ScoreRequest(
        image=png_bytes((48, 40)),
        media_type="image/png",
        question="Is there a nodule in the right lung?",
        answer="Yes, a small nodule in the right upper lobe.",
    )
    r = pb_grpc.MedHallGuardStub(channel).Score(request, timeout=60)
    _assert_guarded(r)
    assert r.answer == request.answer
    assert r.num_tokens >= 1
    assert r.timings.decode_ms == 0


@pytest.mark.timeout(120)
def test_get_model_info_describes_the_served_model(served):
    family, running, channel = served
    info = pb_grpc.MedHallGuardStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    ask = pb_grpc.MedHallGuardStub(channel).Ask(_ask(), timeout=60)
    assert info.family == family
    assert info.checksum == ask.model_checksum and info.model_id == ask.model_id
    assert info.image_size > 0 and info.num_image_tokens > 0
    assert not info.heads_trained
    assert info.max_message_bytes == ServerConfig().max_message_bytes
    assert info.max_pixels > 0 and info.max_image_bytes > 0
    assert info.default_generation.max_new_tokens == MAX_NEW_TOKENS
    assert "abstain_p_hallucination" in info.thresholds
    assert info.server_version


@pytest.mark.timeout(60)
def test_corrupt_image_is_invalid_argument(served):
    _, _, channel = served
    with pytest.raises(grpc.RpcError) as e:
        pb_grpc.MedHallGuardStub(channel).Ask(_ask(image=png_bytes()[:50]), timeout=30)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.timeout(60)
def test_health_is_serving(served):
    _, _, channel = served
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "medhallguard.v1.MedHallGuard"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.timeout(60)
def test_reflection_lists_the_services_and_serves_the_proto(served):
    _, _, channel = served
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="medhallguard.v1.MedHallGuard"),
    ]
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"medhallguard.v1.MedHallGuard", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto, "grpcurl needs the descriptor"
