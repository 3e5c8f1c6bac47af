"""TensorRT: optimization profiles (anywhere), and engines built, gated and served (only where TensorRT runs).

The engine tests have never run in this project: TensorRT cannot be installed on
its CPU machines (FINDINGS). They skip, saying so, wherever `import tensorrt` fails.
"""

from __future__ import annotations

import importlib.util

import pytest

from export.trt_build import EngineConfig, profile_shapes
from guard.errors import ModelLoadError
from guard.manifest import GraphInfo, TensorInfo

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed (the [gpu] extra, GPU hosts)")

DECODER = GraphInfo(
    file="decoder.onnx",
    inputs=(TensorInfo("inputs_embeds", "float32", ("batch", "sequence", 576)),
            TensorInfo("attention_mask", "int64", ("batch", "total_sequence")),
            TensorInfo("position_ids", "int64", ("batch", "sequence")),
            TensorInfo("past_key_values.0.key", "float32", ("batch", 3, "past_sequence", 64))),
    outputs=(),
)


def test_profiles_span_prefill_and_decode_from_the_symbolic_dims():
    shapes = profile_shapes(DECODER, EngineConfig(max_batch=2, max_sequence=1024, opt_sequence=128))
    assert shapes["inputs_embeds"] == ((1, 1, 576), (1, 128, 576), (2, 1024, 576))
    assert shapes["attention_mask"] == ((1, 1), (1, 128), (2, 1024))
    assert shapes["past_key_values.0.key"] == ((1, 3, 0, 64), (1, 3, 128, 64), (2, 3, 1023, 64))  # prefill: empty past


def test_engine_config_checks_its_lengths():
    with pytest.raises(ValueError, match="opt_sequence"):
        EngineConfig(max_sequence=64, opt_sequence=128)


def test_the_tensorrt_backend_says_what_it_needs(tmp_path):
    from guard.backends import load_backend

    with pytest.raises(ModelLoadError, match="GPU"):
        load_backend("tensorrt", tmp_path, device="cpu")
    if not HAS_TENSORRT:
        with pytest.raises(ModelLoadError, match=r"\[gpu\] extra"):
            load_backend("tensorrt", tmp_path, device="cuda:0")


@needs_tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engines_pass_the_gate_and_serve(tmp_path, nano_models, precision):
    from guard.manifest import load_manifest
    from guard.policy import PolicyConfig
    from guard.runtime import BackendConfig, GuardConfig, load_guard
    from guard.types import DecodeConfig, VqaRequest
    from tests.bundles import export
    from tests.conftest import png_bytes

    bundle = export(nano_models["smolvlm"], tmp_path / "bundle", precision=precision, engine="tensorrt")
    m = load_manifest(bundle)
    assert m.verified and m.parity["tensorrt"]["passed"] and set(m.engines) == {"vision", "embed", "decoder"}
    config = GuardConfig(backend=BackendConfig(kind="tensorrt", device="cuda:0"),
                         policy=PolicyConfig(allow_untrained_heads=True))
    result = load_guard(bundle, config).answer(VqaRequest(png_bytes(), "image/png", "Any nodule?",
                                                          DecodeConfig(max_new_tokens=4)))
    assert result.backend == "tensorrt:cuda:0" and result.num_tokens >= 1
