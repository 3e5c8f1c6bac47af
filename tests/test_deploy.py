"""Deployment files: the Triton repository generator against a real exported nano bundle, the container
configs and the Docker health check.

Nothing here runs Docker, Kubernetes or Triton (none runs on these machines):
`make lint-deploy` lints the Dockerfiles and validates the manifests. These
tests check what can be checked without them: each generated config.pbtxt
parses as Triton's own ModelConfig message, names exactly the inputs and
outputs of its ONNX graph with their types and shapes, and onnxruntime runs
the copied graph with tensors shaped as the config says.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="exporting a bundle needs the [export] extra")

import grpc  # noqa: E402

from tests.bundles import export_nano  # noqa: E402
from tests.fakes import FakeGuard, serve_in_thread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAKE_REPO = ROOT / "deploy" / "triton" / "make_repo.py"
ONNX_TYPES = {"TYPE_FP32": 1, "TYPE_INT64": 7, "TYPE_FP16": 10}  # onnx.TensorProto element types


@pytest.fixture(scope="module")
def triton_repo(nano_models, tmp_path_factory) -> tuple[Path, Path]:
    bundle = export_nano(tmp_path_factory, nano_models["smolvlm"])
    repo = tmp_path_factory.mktemp("triton") / "repo"
    # -S: no site-packages, so the generator provably needs nothing but the standard library.
    proc = subprocess.run([sys.executable, "-S", str(MAKE_REPO), str(bundle), str(repo)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return bundle, repo


def _config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("role", ["vision", "embed", "decoder", "head"])
def test_triton_config_parses_as_model_config_and_matches_its_onnx_graph(triton_repo, role):
    import onnx

    _, repo = triton_repo
    model_dir = repo / f"medhallguard_{role}"
    config = _config(model_dir / "config.pbtxt")
    assert config.name == model_dir.name and config.backend == "onnxruntime"
    graph = onnx.load(str(model_dir / "1" / config.default_model_filename), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    onnx_io = {"input": [v for v in graph.input if v.name not in initializers], "output": list(graph.output)}
    batched = config.max_batch_size > 0
    for kind in ("input", "output"):
        tensors = getattr(config, kind)
        assert [t.name for t in tensors] == [v.name for v in onnx_io[kind]]
        for t, v in zip(tensors, onnx_io[kind]):
            assert ONNX_TYPES[model_config_name(t.data_type)] == v.type.tensor_type.elem_type, t.name
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            expected = dims[1:] if batched else dims
            got = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
            assert got == expected, t.name
    assert batched == (role in ("vision", "head")), "only graphs with one shared batch dim are batched"


def model_config_name(data_type: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(data_type)


def _feeds(config, batch: int, dynamic: int) -> dict[str, np.ndarray]:
    """Zeros shaped as the config says: the batch dim (if batched) and each -1 filled in."""
    dtypes = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_FP16": np.float16}
    feeds = {}
    for t in config.input:
        dims = [dynamic if d == -1 else d for d in t.dims]
        if config.max_batch_size > 0:
            dims = [batch, *dims]
        feeds[t.name] = np.zeros(dims, dtypes[model_config_name(t.data_type)])
    return feeds


@pytest.mark.parametrize("role", ["vision", "embed", "head"])
def test_onnxruntime_runs_each_copied_graph_with_tensors_shaped_by_its_config(triton_repo, role):
    import onnxruntime as ort

    _, repo = triton_repo
    config = _config(repo / f"medhallguard_{role}" / "config.pbtxt")
    session = ort.InferenceSession(str(repo / config.name / "1" / config.default_model_filename),
                                   providers=["CPUExecutionProvider"])
    outputs = session.run(None, _feeds(config, batch=2, dynamic=3))
    leading = 2 if config.max_batch_size > 0 else 3  # Triton's batch dim, or the graph's own dynamic one
    assert [o.shape[0] for o in outputs] == [leading] * len(outputs)


def test_decoder_from_the_repository_takes_an_empty_past_then_its_own_present(triton_repo):
    """The client's loop: prefill with a past of length 0, then feed `present.*` back as `past_key_values.*`."""
    import onnxruntime as ort

    _, repo = triton_repo
    config = _config(repo / "medhallguard_decoder" / "config.pbtxt")
    session = ort.InferenceSession(str(repo / config.name / "1" / config.default_model_filename),
                                   providers=["CPUExecutionProvider"])
    dims = {t.name: list(t.dims) for t in config.input}
    hidden, seq = dims["inputs_embeds"][2], 4
    past = {n: np.zeros([1, d[1], 0, d[3]], np.float32) for n, d in dims.items() if n.startswith("past_key_values.")}
    feeds = {"inputs_embeds": np.zeros((1, seq, hidden), np.float32), "attention_mask": np.ones((1, seq), np.int64),
             "position_ids": np.arange(seq, dtype=np.int64)[None], **past}
    names = [t.name for t in config.output]
    out = dict(zip(names, session.run(names, feeds)))
    feeds = {"inputs_embeds": np.zeros((1, 1, hidden), np.float32), "attention_mask": np.ones((1, seq + 1), np.int64),
             "position_ids": np.array([[seq]], np.int64),
             **{n: out[n.replace("past_key_values.", "present.")] for n in past}}
    step = dict(zip(names, session.run(names, feeds)))
    assert step["logits"].shape[:2] == (1, 1)
    assert all(step[n].shape[2] == seq + 1 for n in names if n.startswith("present."))


def test_make_repo_refuses_a_bundle_whose_graph_does_not_match_its_sha256(triton_repo, tmp_path):
    import shutil

    bundle, _ = triton_repo
    damaged = tmp_path / "bundle"
    shutil.copytree(bundle, damaged)
    with open(damaged / "decoder.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = subprocess.run([sys.executable, str(MAKE_REPO), str(damaged), str(tmp_path / "repo")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "decoder.onnx" in proc.stderr and "sha256" in proc.stderr


def test_make_repo_names_a_directory_that_is_not_a_bundle(tmp_path):
    proc = subprocess.run([sys.executable, str(MAKE_REPO), str(tmp_path), str(tmp_path / "repo")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "manifest.json is missing" in proc.stderr


def _traversal_bundle(tmp_path: Path, graph_file: str) -> Path:
    """A bundle whose manifest points its decoder at a file outside it, with that file's true sha256,
    so only the containment check can stop the copy."""
    import hashlib
    import json

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    secret = tmp_path / "secret.onnx"
    secret.write_bytes(b"not yours")
    files = {f"{r}.onnx": hashlib.sha256(r.encode()).hexdigest() for r in ("vision", "embed", "head")}
    for r in ("vision", "embed", "head"):
        (bundle / f"{r}.onnx").write_bytes(r.encode())
    files[graph_file] = hashlib.sha256(b"not yours").hexdigest()
    graphs = {r: {"file": f"{r}.onnx", "inputs": [], "outputs": []} for r in ("vision", "embed", "head")}
    graphs["decoder"] = {"file": graph_file, "inputs": [], "outputs": []}
    (bundle / "manifest.json").write_text(json.dumps({"format": "medhallguard-bundle-v1", "graphs": graphs,
                                                      "files": files}))
    return bundle


@pytest.mark.parametrize("graph_file", ["../secret.onnx", "ABSOLUTE"])
def test_make_repo_refuses_a_manifest_file_outside_the_bundle_and_writes_nothing(tmp_path, graph_file):
    if graph_file == "ABSOLUTE":
        graph_file = str(tmp_path / "secret.onnx")
    bundle = _traversal_bundle(tmp_path, graph_file)
    repo = tmp_path / "repo"
    proc = subprocess.run([sys.executable, "-S", str(MAKE_REPO), str(bundle), str(repo)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "outside the bundle" in proc.stderr and graph_file in proc.stderr
    assert not repo.exists(), "nothing may be written before the manifest is checked"


def test_make_repo_refuses_a_prefix_that_is_a_path(tmp_path):
    bundle = _traversal_bundle(tmp_path, "decoder.onnx")
    proc = subprocess.run([sys.executable, "-S", str(MAKE_REPO), str(bundle), str(tmp_path / "repo"),
                           "--prefix", "../escaped"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--prefix" in proc.stderr
    assert not (tmp_path / "escaped_vision").exists()


def test_make_repo_keeps_the_manifest_constants_of_guard_manifest():
    """make_repo.py is standard-library only, so it copies these instead of importing guard.manifest."""
    import importlib.util

    from guard import manifest

    spec = importlib.util.spec_from_file_location("make_repo", MAKE_REPO)
    make_repo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_repo)
    assert make_repo.FORMAT == manifest.FORMAT and make_repo.ROLES == manifest.GRAPHS


# --- container configs and the Docker health check ---------------------------------------------


@pytest.mark.parametrize("path", ["deploy/docker/medhallguard.toml", "deploy/docker/medhallguard-cuda.toml"])
def test_container_configs_are_valid_deployment_configs(path):
    from guard.runtime import GuardConfig
    from server.config import split_config

    server, tables = split_config(ROOT / path)
    GuardConfig.from_dict(tables)
    assert server.grace_s < 30 - 5, "grace must fit in terminationGracePeriodSeconds minus the preStop sleep"


def test_configmap_toml_is_a_valid_deployment_config(tmp_path):
    import yaml

    from guard.runtime import GuardConfig
    from server.config import split_config

    configmap = yaml.safe_load((ROOT / "deploy/k8s/configmap.yaml").read_text())
    (tmp_path / "c.toml").write_text(configmap["data"]["medhallguard.toml"])
    server, tables = split_config(tmp_path / "c.toml")
    GuardConfig.from_dict(tables)
    assert server.grace_s < 30 - 5


def test_healthcheck_exits_0_when_serving_and_1_when_nothing_listens():
    script = ROOT / "deploy" / "docker" / "healthcheck.py"
    with serve_in_thread(FakeGuard()) as running:
        ok = subprocess.run([sys.executable, str(script), f"127.0.0.1:{running.port}"],
                            capture_output=True, text=True, timeout=30)
        port = running.port
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    down = subprocess.run([sys.executable, str(script), f"127.0.0.1:{port}"], capture_output=True, text=True,
                          timeout=30)
    assert down.returncode == 1 and grpc.StatusCode.UNAVAILABLE.name in down.stderr


def test_healthcheck_asks_about_the_named_service():
    script = ROOT / "deploy" / "docker" / "healthcheck.py"
    with serve_in_thread(FakeGuard()) as running:
        known = subprocess.run([sys.executable, str(script), f"127.0.0.1:{running.port}",
                                "--service", "medhallguard.v1.MedHallGuard"], capture_output=True, text=True, timeout=30)
        unknown = subprocess.run([sys.executable, str(script), f"127.0.0.1:{running.port}", "--service", "nope"],
                                 capture_output=True, text=True, timeout=30)
    assert known.returncode == 0
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
