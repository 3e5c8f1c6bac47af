"""Export: nano models -> bundles that pass the parity gate, served by onnxruntime without torch;
and the bundles that must never be written (failed gate, failed export) or loaded (tampered)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="export needs the [export] extra (torch, transformers, onnx)")
pytest.importorskip("onnx", reason="export needs the [export] extra (torch, transformers, onnx)")

from export import parity  # noqa: E402
from guard.backends import load_backend  # noqa: E402
from guard.errors import ModelLoadError  # noqa: E402
from guard.head import GuardHeads  # noqa: E402
from guard.manifest import MANIFEST_FILE, load_manifest  # noqa: E402
from guard.policy import PolicyConfig  # noqa: E402
from guard.runtime import BackendConfig, GuardConfig, load_guard  # noqa: E402
from guard.spec import HEADS_FILE, dir_checksum  # noqa: E402
from guard.types import DecodeConfig, VqaRequest  # noqa: E402
from tests.bundles import FAST_PARITY, export, export_nano  # noqa: E402
from tests.conftest import FAMILIES, png_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SERVE_ALL = GuardConfig(policy=PolicyConfig(allow_untrained_heads=True, withhold_answer_on_abstain=False))


def _needs_onnxscript() -> None:
    pytest.importorskip("onnxscript", reason="int4 and the dynamo exporter need onnxscript (the [export] extra)")


def _request(question="Is there a nodule in the right lung?", max_new_tokens=8) -> VqaRequest:
    return VqaRequest(png_bytes(), "image/png", question, DecodeConfig(max_new_tokens=max_new_tokens))


# --- fp32: the gate passes, and the bundle answers like the model ------------


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_export_passes_the_gate_for_both_families(tmp_path_factory, nano_models, family):
    bundle = export_nano(tmp_path_factory, nano_models[family])
    m = load_manifest(bundle)
    assert m.verified and m.precision == "fp32" and m.opset == 18 and m.exporter == "legacy"
    p = m.parity
    assert p["passed"] and p["greedy_identical"] == p["prompts"] == 4
    assert p["logits_rel_diff"] <= 1e-3 and p["guard_max_abs_diff"] <= 1e-4
    assert {"vision.onnx", "embed.onnx", "decoder.onnx", "head.onnx", HEADS_FILE, "tokenizer.json",
            "preprocessor_config.json"} <= set(m.files)
    assert m.source_checksum == dir_checksum(nano_models[family])
    assert m.versions["torch"] and m.versions["onnxruntime"]
    decoder = m.graphs["decoder"]
    assert [t.name for t in decoder.inputs[:4]] == ["inputs_embeds", "attention_mask", "position_ids",
                                                     "past_key_values.0.key"]
    assert decoder.input("past_key_values.0.key").shape[2] == "past_sequence"
    assert [t.name for t in decoder.outputs[:4]] == ["logits", "hidden_mid", "hidden_last", "present.0.key"]
    assert m.graphs["vision"].outputs[0].shape[1] == m.model_spec.num_image_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bundle_answers_like_the_model_it_came_from(tmp_path_factory, nano_models, family):
    reference = load_guard(nano_models[family], SERVE_ALL)
    served = load_guard(export_nano(tmp_path_factory, nano_models[family]), SERVE_ALL)
    a, b = reference.answer(_request()), served.answer(_request())
    assert b.backend == "onnxruntime:CPUExecutionProvider" and b.model_checksum.startswith("sha256:")
    assert a.answer == b.answer and a.num_tokens == b.num_tokens and a.verdict.kind == b.verdict.kind
    assert abs(a.scores.p_hallucination - b.scores.p_hallucination) <= 1e-4
    scored = [g.score(VqaRequest(png_bytes(), "image/png", "Any effusion?", answer="No effusion.")) for g in
              (reference, served)]
    assert abs(scored[0].scores.premise_risk - scored[1].scores.premise_risk) <= 1e-4


def test_the_dynamo_exporter_also_passes_fp32_parity(tmp_path_factory, nano_models):
    _needs_onnxscript()
    m = load_manifest(export_nano(tmp_path_factory, nano_models["smolvlm"], exporter="dynamo", decoder="traced"))
    assert m.exporter == "dynamo" and m.verified and m.parity["greedy_identical"] == m.parity["prompts"]
    assert "decoder.onnx.data" in m.files  # dynamo keeps weights in side files; they are hashed too
    assert m.graphs["decoder"].input("past_key_values.0.key").shape[2] == "past_sequence"


@pytest.mark.slow
def test_the_dynamo_exporter_passes_fp32_parity_for_llava(tmp_path_factory, nano_models):
    _needs_onnxscript()
    m = load_manifest(export_nano(tmp_path_factory, nano_models["llava"], exporter="dynamo", decoder="traced"))
    assert m.verified and m.parity["greedy_identical"] == m.parity["prompts"]


def test_the_head_graph_reads_question_ngrams_when_the_premise_head_does():
    import onnxruntime as ort

    from export.head_graph import heads_to_onnx
    from tests.test_head import D, QUESTIONS, _gen, _ngram_heads

    heads = _ngram_heads()
    session = ort.InferenceSession(heads_to_onnx(heads).SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["answer_features", "prompt_features", "question_ngrams"]
    gens = [_gen(question=q, seed=i) for i, q in enumerate(QUESTIONS)]
    from guard.head import answer_features, prompt_features

    _, _, _, risk, _ = session.run(None, {
        "answer_features": np.stack([answer_features(g) for g in gens]),
        "prompt_features": np.stack([prompt_features(g) for g in gens]),
        "question_ngrams": np.stack([heads.premise_ngrams(g.question_ids) for g in gens])})
    np.testing.assert_allclose(risk, [heads.score(g).premise_risk for g in gens], atol=1e-6)
    assert heads.feature_sizes()[1] == 2 * D


def test_the_head_graph_computes_what_the_numpy_heads_compute(tmp_path_factory, nano_models):
    import onnxruntime as ort

    bundle = export_nano(tmp_path_factory, nano_models["smolvlm"])
    heads = GuardHeads.load(bundle / HEADS_FILE)
    rng = np.random.default_rng(0)
    answer_dim, prompt_dim = heads.feature_sizes()
    answer = rng.standard_normal((3, answer_dim)).astype(np.float32)
    prompt = rng.standard_normal((3, prompt_dim)).astype(np.float32)
    session = ort.InferenceSession(str(bundle / "head.onnx"), providers=["CPUExecutionProvider"])
    a, p, p_hall, risk, scores = session.run(None, {"answer_features": answer, "prompt_features": prompt})
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    logits = np.concatenate([heads.hallucination(answer), heads.scores(answer)], axis=1)
    np.testing.assert_allclose(a, logits, atol=1e-5)
    np.testing.assert_allclose(p, heads.premise(prompt), atol=1e-5)
    np.testing.assert_allclose(p_hall, sigmoid(logits[:, 0] / heads.answer_temperature), atol=1e-6)
    np.testing.assert_allclose(risk, sigmoid(heads.premise(prompt)[:, 0] / heads.premise_temperature), atol=1e-6)
    np.testing.assert_allclose(scores, 1 + 9 * sigmoid(logits[:, 1:5]), atol=1e-5)


# --- the onnxruntime backend ---------------------------------------------------


def test_the_vision_graph_takes_a_batch_of_images(tmp_path_factory, nano_models):
    bundle = export_nano(tmp_path_factory, nano_models["smolvlm"])
    ort_backend, torch_backend = load_backend("onnxruntime", bundle), load_backend("torch", nano_models["smolvlm"])
    pixels = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(ort_backend.encode_image(pixels), torch_backend.encode_image(pixels), atol=1e-4)


def test_io_binding_keeps_the_cache_in_onnxruntime_and_changes_no_result(tmp_path_factory, nano_models):
    bundle = export_nano(tmp_path_factory, nano_models["llava"])
    bound, plain = (load_backend("onnxruntime", bundle, io_binding=flag) for flag in (True, False))
    embeds = np.random.default_rng(2).standard_normal((1, 5, bound.spec.hidden_size)).astype(np.float32)
    caches = [b.new_cache(1) for b in (bound, plain)]
    for step in range(3):  # prefill, then two decode steps
        n = caches[0].length
        x = embeds if step == 0 else embeds[:, :1]
        mask, pos = np.ones((1, n + x.shape[1]), np.int64), np.arange(n, n + x.shape[1])[None]
        (out_b, caches[0]), (out_p, caches[1]) = (b.forward(x, mask, pos, c) for b, c in zip((bound, plain), caches))
        np.testing.assert_array_equal(out_b.logits, out_p.logits)
        np.testing.assert_array_equal(out_b.hidden_mid, out_p.hidden_mid)
    assert type(caches[0].values[0]).__name__ == "OrtValue" and isinstance(caches[1].values[0], np.ndarray)
    assert caches[0].length == 7
    assert load_backend("onnxruntime", bundle).io_binding is False  # CPU: plain run is already zero-copy


def test_an_unavailable_gpu_provider_falls_back_to_cpu_and_says_so(tmp_path_factory, nano_models, caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this host has the CUDA provider; the fallback is tested where it is missing")
    bundle = export_nano(tmp_path_factory, nano_models["smolvlm"])
    with caplog.at_level(logging.WARNING, logger="guard.backends.ort_backend"):
        backend = load_backend("onnxruntime", bundle, device="cuda:0")
    assert backend.name == "onnxruntime:CPUExecutionProvider"
    assert any("CUDAExecutionProvider was requested" in r.message for r in caplog.records)


def test_the_backend_kind_must_fit_the_path(tmp_path_factory, nano_models):
    bundle = export_nano(tmp_path_factory, nano_models["smolvlm"])
    with pytest.raises(ModelLoadError, match="export bundle"):
        load_guard(bundle, GuardConfig(backend=BackendConfig(kind="torch")))
    with pytest.raises(ModelLoadError, match="medhallguard export"):
        load_guard(nano_models["smolvlm"], GuardConfig(backend=BackendConfig(kind="onnxruntime")))
    with pytest.raises(ValueError, match="backend.kind"):
        BackendConfig(kind="tflite")


def test_serving_a_bundle_imports_neither_torch_nor_transformers(tmp_path_factory, nano_models, tmp_path):
    bundle = export_nano(tmp_path_factory, nano_models["smolvlm"])
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes())
    code = f"""
import sys
import server.main, server.service
from guard.policy import PolicyConfig
from guard.runtime import GuardConfig, load_guard
from guard.types import DecodeConfig, VqaRequest
guard = load_guard({str(bundle)!r}, GuardConfig(policy=PolicyConfig(allow_untrained_heads=True)))
image = open({str(image)!r}, "rb").read()
r = guard.answer(VqaRequest(image, "image/png", "Any nodule?", DecodeConfig(max_new_tokens=4)))
assert r.backend.startswith("onnxruntime:") and r.num_tokens >= 1, r
bad = [m for m in ("torch", "transformers") if m in sys.modules]
assert not bad, f"serving imported {{bad}}"
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_ask_and_info_run_in_process_on_a_bundle(tmp_path_factory, nano_models, tmp_path, capsys):
    from server import cli

    bundle = export_nano(tmp_path_factory, nano_models["llava"])
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes())
    assert cli.main(["info", "--bundle", str(bundle), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "onnxruntime:CPUExecutionProvider" and info["verified"] is True
    assert cli.main(["ask", "--bundle", str(bundle), "--image", str(image), "--json", "--max-new-tokens", "3",
                     "Is there a nodule?"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["backend"] == info["backend"] and answer["model_checksum"] == info["checksum"]


# --- quantized bundles ---------------------------------------------------------


@pytest.mark.parametrize("precision, quantized_op",
                         [("int8", "MatMulInteger"), ("int4", "MatMulNBits"), ("fp16", None)])
def test_quantized_exports_write_quantized_graphs_that_serve(tmp_path_factory, nano_models, precision, quantized_op):
    """Random weights: quantized answers may diverge (FINDINGS), so the gate is tested on trained weights (slow)
    and on its own (test_parity.py). Here: the graphs are quantized, they serve, and they roughly agree."""
    import onnx

    if precision == "int4":
        _needs_onnxscript()
    model_dir = nano_models["smolvlm"]
    bundle = export_nano(tmp_path_factory, model_dir, precision=precision, force=True)
    fp32 = export_nano(tmp_path_factory, model_dir)
    decoder = onnx.load(str(bundle / "decoder.onnx"))
    if quantized_op:
        assert quantized_op in {n.op_type for n in decoder.graph.node}
        assert (bundle / "decoder.onnx").stat().st_size < 0.5 * (fp32 / "decoder.onnx").stat().st_size
    else:
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in decoder.graph.initializer)
    m = load_manifest(bundle)
    assert m.precision == precision and m.graphs["decoder"].input("inputs_embeds").dtype == "float32"
    reference, candidate = load_backend("torch", model_dir, threads=1), load_backend("onnxruntime", bundle)
    report = parity.compare(reference, candidate, load_guard(bundle, SERVE_ALL).prompter,
                            GuardHeads.load(bundle / HEADS_FILE), parity.parity_prompts(FAST_PARITY), 8)
    assert report["token_agreement"] >= 0.5 and report["logits_rel_diff"] < 0.5


def test_weight_only_int8_writes_8_bit_blocks_computed_in_fp32_that_agree_with_the_model_closer_than_dynamic_int8(
        tmp_path_factory, nano_models):
    import onnx

    from export.quantize import QuantizeConfig

    _needs_onnxscript()
    model_dir = nano_models["smolvlm"]
    out = tmp_path_factory.mktemp("int8-schemes")
    weight_only = export(model_dir, out / "weight-only", precision="int8", force=True,
                         quantize=QuantizeConfig(int8_scheme="weight-only"))
    dynamic = export_nano(tmp_path_factory, model_dir, precision="int8", force=True)
    nodes = [n for n in onnx.load(str(weight_only / "decoder.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert nodes and all({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["bits"] == 8 for n in nodes)
    assert load_manifest(weight_only).quantization == {"int8_scheme": "weight-only"}
    assert load_manifest(dynamic).quantization == {"int8_scheme": "dynamic"}

    reference = load_backend("torch", model_dir, threads=1)
    heads, prompts = GuardHeads.load(weight_only / HEADS_FILE), parity.parity_prompts(FAST_PARITY)
    reports = {name: parity.compare(reference, load_backend("onnxruntime", bundle), load_guard(bundle, SERVE_ALL).prompter,
                                    heads, prompts, 8)
               for name, bundle in (("weight-only", weight_only), ("dynamic", dynamic))}
    assert reports["weight-only"]["logits_max_abs_diff"] < reports["dynamic"]["logits_max_abs_diff"]
    assert reports["weight-only"]["guard_max_abs_diff"] < reports["dynamic"]["guard_max_abs_diff"]


def test_quantize_config_rejects_an_unknown_int8_scheme():
    from export.quantize import QuantizeConfig

    with pytest.raises(ValueError, match="int8_scheme"):
        QuantizeConfig(int8_scheme="static")


# --- what must not be written --------------------------------------------------


def test_a_failed_export_leaves_nothing_behind(tmp_path, nano_models, monkeypatch):
    import export.onnx_export as onnx_export

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(onnx_export, "_write_head_graph", disk_full)
    with pytest.raises(OSError, match="No space"):
        export(nano_models["smolvlm"], tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []  # neither OUT_DIR nor the temporary directory


def test_export_refuses_an_out_dir_that_is_not_empty(tmp_path, nano_models):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export(nano_models["smolvlm"], tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_the_gate_blocks_a_bundle_that_does_not_answer_like_the_model(tmp_path, nano_models, monkeypatch, capsys):
    import torch

    from export.wrappers import DecoderWrapper
    from server import cli

    original = DecoderWrapper.forward

    def off_by_five_percent(self, *args):
        logits, *rest = original(self, *args)
        return (logits * 1.05, *rest)

    monkeypatch.setattr(DecoderWrapper, "forward", off_by_five_percent)
    out = tmp_path / "bundle"
    threads = torch.get_num_threads()
    try:
        code = cli.main(["export", str(nano_models["smolvlm"]), str(out), "--parity-prompts", "1",
                         "--parity-tokens", "4", "--threads", "1", "--decoder", "traced"])
    finally:
        torch.set_num_threads(threads)
    assert code == 1
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert "parity gate failed" in err and "logits" in err and "nothing was written" in err


def test_force_marks_the_bundle_unverified_and_serving_it_warns(tmp_path_factory, nano_models, caplog):
    from server.config import ServerConfig
    from server.service import model_info_to_pb

    bundle = export_nano(tmp_path_factory, nano_models["smolvlm"], force=True)
    m = load_manifest(bundle)
    assert m.verified is False and m.parity == {"skipped": "exported with --force"}
    with caplog.at_level(logging.WARNING, logger="guard.runtime"):
        guard = load_guard(bundle, SERVE_ALL)
    assert any("UNVERIFIED" in r.message for r in caplog.records)
    assert guard.info().verified is False
    assert model_info_to_pb(guard.info(), guard.config, ServerConfig()).verified is False


def test_serve_bundle_warns_about_an_unverified_bundle_and_info_says_so(tmp_path_factory, nano_models, tmp_path):
    import os
    import signal

    bundle = export_nano(tmp_path_factory, nano_models["smolvlm"], force=True)
    env = {**os.environ, "MEDHALLGUARD_LOG_LEVEL": "WARNING"}
    serve = [sys.executable, "-m", "server.cli", "serve", "--bundle", str(bundle), "--address", "127.0.0.1:0"]
    proc = subprocess.Popen(serve, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("serving on 127.0.0.1:"), (line, proc.stderr.read() if proc.poll() is not None else "")
        info = [sys.executable, "-m", "server.cli", "info", "--server", line.removeprefix("serving on "),
                "--wait-ready", "60", "--json"]
        reply = subprocess.run(info, cwd=ROOT, capture_output=True, text=True, timeout=90)
        assert reply.returncode == 0, reply.stderr
        assert json.loads(reply.stdout)["verified"] is False
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "UNVERIFIED" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- what must not be loaded ---------------------------------------------------


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "a byte flipped in decoder.onnx": ("decoder.onnx", _flip_a_byte, "decoder.onnx does not match its sha256"),
    "tokenizer.json deleted": ("tokenizer.json", Path.unlink, "tokenizer.json is missing"),
    "guard heads deleted": (HEADS_FILE, Path.unlink, f"{HEADS_FILE} is missing"),
    "manifest.json truncated": (MANIFEST_FILE, lambda p: p.write_text(p.read_text()[:200]), "manifest.json is corrupt"),
    "manifest.json deleted": (MANIFEST_FILE, Path.unlink, "manifest.json is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_tampered_bundle_refuses_to_load_and_names_the_file(tmp_path_factory, nano_models, tmp_path, damage):
    bundle = shutil.copytree(export_nano(tmp_path_factory, nano_models["smolvlm"]), tmp_path / "bundle")
    name, apply, message = DAMAGE[damage]
    apply(bundle / name)
    with pytest.raises(ModelLoadError, match=message):
        load_guard(bundle, SERVE_ALL)


def test_a_bundle_path_without_a_manifest_is_reported_as_half_written(tmp_path):
    (tmp_path / "decoder.onnx").write_bytes(b"partial")
    with pytest.raises(ModelLoadError, match="manifest.json is missing: this is a half-written"):
        load_guard(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="manifest.json is missing"):  # --bundle: no guessing from the contents
        load_guard(empty, bundle=True)


# --- the Done-when models --------------------------------------------------------


def _default_model() -> Path:
    from training.build_default import default_model_dir

    from training.build_default import heads_are_current

    model = default_model_dir()
    if not (model / HEADS_FILE).is_file():
        pytest.skip(f"the default model is not built at {model}; run `make build-default` (about 12 minutes)")
    if not heads_are_current(model):
        pytest.skip(f"the default model's guard heads at {model} are an older format; "
                    "refit them with `medhallguard build-default --heads-only` (about a minute)")
    return model


@pytest.mark.timeout(180)
def test_the_default_model_exports_at_fp32_and_passes_the_gate(tmp_path):
    m = load_manifest(export(_default_model(), tmp_path / "fp32", precision="fp32", parity=parity.ParityConfig()))
    assert m.verified and m.parity["passed"], m.parity["failures"]
    assert m.parity["greedy_identical"] == m.parity["prompts"]


@pytest.mark.timeout(180)
def test_the_default_model_exports_at_int8_or_the_gate_blocks_it_and_writes_nothing(tmp_path):
    out = tmp_path / "int8"
    try:
        m = load_manifest(export(_default_model(), out, precision="int8", parity=parity.ParityConfig()))
    except parity.ParityError as e:
        # measured on the 1,200-step default model: one of the 8 gate prompts got a different verdict at int8
        # (its answer diverged by a token), so the gate blocked the bundle, as it should; later models pass
        assert not out.exists() and "same verdict" in str(e)
        pytest.xfail(f"{e} ({parity.summary(e.report)})")
    assert m.verified and m.parity["passed"]


@pytest.mark.timeout(180)
def test_the_default_model_exports_at_int4(tmp_path):
    _needs_onnxscript()
    model = _default_model()
    try:
        m = load_manifest(export(model, tmp_path / "int4", precision="int4", parity=parity.ParityConfig()))
    except parity.ParityError as e:  # measured on the 1,300-step default model: a verdict flipped at 4 bits
        pytest.xfail(f"{e} ({parity.summary(e.report)})")
    assert m.verified and m.parity["passed"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_256m_shape_exports_at_fp32_and_int8_and_passes_the_gate(tmp_path):
    from training.init_model import init_model

    model = init_model("smolvlm", "256m", tmp_path / "model", seed=0)
    for precision in ("fp32", "int8"):
        out = tmp_path / f"bundle-{precision}"
        m = load_manifest(export(model, out, precision=precision, parity=parity.ParityConfig()))
        assert m.verified and m.parity["passed"], (precision, m.parity["failures"])
        shutil.rmtree(out)


def _trained_model(tmp_path: Path) -> Path:
    """The default model when it is built; else a nano model trained briefly on PhantomVQA (a few minutes)."""
    from training.build_default import default_model_dir
    from training.init_model import init_model
    from training.phantom import write_dataset
    from training.train import DataSource, TrainConfig, train

    from training.build_default import heads_are_current

    if heads_are_current(default_model_dir()):
        return default_model_dir()
    data = tmp_path / "phantom"
    write_dataset(data, n_images=200, seed=0)
    init = init_model("smolvlm", "nano", tmp_path / "init", seed=0, corpus_files=[data / "train.json"])
    source = DataSource(str(data / "train.json"))
    return train(TrainConfig(model=str(init), out=str(tmp_path / "trained"), data=(source,), mode="full", steps=300,
                             batch_size=16, lr=2e-3, warmup_steps=30, checkpoint_every=0, show_progress=False))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_trained_weights_pass_the_int8_and_int4_gates(tmp_path):
    _needs_onnxscript()
    model = _trained_model(tmp_path)
    for precision in ("int8", "int4"):
        m = load_manifest(export(model, tmp_path / precision, precision=precision, parity=parity.ParityConfig()))
        assert m.verified and m.parity["passed"], (precision, m.parity["failures"])
        assert 0 <= m.parity["max_abs_dp_hallucination"] <= 1
