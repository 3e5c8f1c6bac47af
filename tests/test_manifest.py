"""The bundle manifest on its own: a JSON round trip and the checks that refuse a damaged bundle. No torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guard.errors import ModelLoadError
from guard.manifest import MANIFEST_FILE, GraphInfo, Manifest, TensorInfo, hash_files, is_bundle, load_manifest
from guard.preprocess import PreprocessConfig
from guard.spec import ModelSpec

SPEC = ModelSpec(
    family="smolvlm", model_id="tiny", num_layers=2, hidden_size=8, vocab_size=16, mid_layer=1, image_token_id=3,
    num_image_tokens=2, image_text="<image><image>", eos_token_ids=(2,), bos_token_id=None,
    prompt_template="{image}{question}", answer_prefix=" ",
    preprocess=PreprocessConfig(image_size=32, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
)


def _graph(role: str) -> GraphInfo:
    x, y = TensorInfo("x", "float32", ("batch", 8)), TensorInfo("y", "float32", ("batch", 8))
    return GraphInfo(f"{role}.onnx", (x,), (y,))


def _bundle(root: Path) -> Path:
    root.mkdir()
    for role in ("vision", "embed", "decoder", "head"):
        (root / f"{role}.onnx").write_bytes(role.encode() * 100)
    (root / "tokenizer.json").write_text("{}")
    manifest = Manifest(graphs={r: _graph(r) for r in ("vision", "embed", "decoder", "head")}, opset=18,
                        precision="int8", spec=SPEC.to_dict(), source_checksum="sha256:abc", versions={"onnx": "1"},
                        files=hash_files(root), parity={"passed": True}, verified=True)
    manifest.save(root)
    return root


def test_a_manifest_round_trips_through_json(tmp_path):
    bundle = _bundle(tmp_path / "b")
    m = load_manifest(bundle)
    assert m.model_spec == SPEC and m.verified and m.precision == "int8"
    assert m.graphs["decoder"].input("x").shape == ("batch", 8)
    assert set(m.files) == {"vision.onnx", "embed.onnx", "decoder.onnx", "head.onnx", "tokenizer.json"}
    assert is_bundle(bundle) and not is_bundle(tmp_path)


def test_the_bundle_checksum_follows_the_files_not_the_report(tmp_path):
    m = load_manifest(_bundle(tmp_path / "b"))
    checksum = m.checksum
    m.parity, m.verified = {"passed": False}, False
    assert m.checksum == checksum
    m.files["decoder.onnx"] = "0" * 64
    assert m.checksum != checksum and m.checksum.startswith("sha256:")


def test_a_changed_file_is_named(tmp_path):
    bundle = _bundle(tmp_path / "b")
    (bundle / "embed.onnx").write_bytes(b"other weights")
    with pytest.raises(ModelLoadError, match=r"embed\.onnx does not match its sha256"):
        load_manifest(bundle)
    assert load_manifest(bundle, verify_files=False).precision == "int8"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="something-else"), "corrupt or truncated"),
    (lambda d: d.update(precision="int3"), "precision"),
    (lambda d: d["graphs"].pop("decoder"), "graphs"),
    (lambda d: d["files"].pop("decoder.onnx"), "no sha256"),
    (lambda d: d["files"].update({"../outside.txt": "0" * 64}), "outside the bundle"),
])
def test_a_manifest_that_does_not_describe_a_whole_bundle_is_refused(tmp_path, edit, message):
    bundle = _bundle(tmp_path / "b")
    raw = json.loads((bundle / MANIFEST_FILE).read_text())
    edit(raw)
    (bundle / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=message):
        load_manifest(bundle)
