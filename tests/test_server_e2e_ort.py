"""The end-to-end gRPC tests of test_server_e2e.py, run again against exported fp32 bundles served by onnxruntime.

The test functions are imported from test_server_e2e.py, so both backends answer
exactly the same checks; pytest resolves their `served` fixture here, where it
serves a bundle instead of a model directory.
"""

from __future__ import annotations

import grpc
import pytest

pytest.importorskip("torch", reason="exporting a bundle needs the [export] extra")
pytest.importorskip("onnx", reason="exporting a bundle needs the [export] extra")

from guard.manifest import load_manifest  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.pb.medhallguard.v1 import guard_pb2 as pb  # noqa: E402
from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc  # noqa: E402
from tests.bundles import export_nano  # noqa: E402
from tests.fakes import serve_in_thread  # noqa: E402
from tests.test_server_e2e import (  # noqa: E402, F401 (collected here, against the bundle-serving fixture below)
    FAMILIES,
    GUARD_TABLES,
    _ask,
    test_ask_honours_generation_settings,
    test_ask_returns_a_guarded_answer,
    test_ask_stream_deltas_concatenate_to_the_final_answer,
    test_corrupt_image_is_invalid_argument,
    test_get_model_info_describes_the_served_model,
    test_health_is_serving,
    test_reflection_lists_the_services_and_serves_the_proto,
    test_score_judges_a_given_answer,
)


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, nano_models, tmp_path_factory):
    """(family, running server, channel) for one family's nano model, exported and served by onnxruntime."""
    from guard.runtime import GuardConfig, load_guard

    bundle = export_nano(tmp_path_factory, nano_models[request.param])
    guard = load_guard(bundle, GuardConfig.from_dict(GUARD_TABLES))
    with serve_in_thread(guard, ServerConfig(address="127.0.0.1:0")) as running:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield request.param, running, channel


@pytest.mark.timeout(120)
def test_model_info_reports_the_provider_in_use_and_the_verified_bundle(served, nano_models, tmp_path_factory):
    family, _, channel = served
    stub = pb_grpc.MedHallGuardStub(channel)
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    answer = stub.Ask(_ask(), timeout=60)
    assert info.backend == answer.backend == "onnxruntime:CPUExecutionProvider"
    assert info.verified
    manifest = load_manifest(export_nano(tmp_path_factory, nano_models[family]))
    assert info.checksum == answer.model_checksum == manifest.checksum
