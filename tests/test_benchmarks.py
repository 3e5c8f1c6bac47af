"""The benchmark scripts in smoke mode on the nano model: well-formed JSON lines and reports (never a time)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the benchmarks compare against PyTorch (the [export] extra)")
pytest.importorskip("onnx", reason="the benchmarks export bundles (the [export] extra)")

from tests.bundles import export_nano  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nano(tmp_path_factory, nano_models):
    """The nano smolvlm model and its fp32/int8/int4 bundles (shared with the export tests)."""
    model = nano_models["smolvlm"]
    bundles = [f"nano:{p}={export_nano(tmp_path_factory, model, precision=p)}" for p in ("fp32", "int8", "int4")]
    return model, [arg for b in bundles for arg in ("--bundle", b)]


def _run(module: str, args: list[str], tmp_path: Path) -> list[dict]:
    """Run `python -m benchmarks.<module>` with its own cache; -> its stdout as JSON objects (every line one)."""
    env = {**os.environ, "MEDHALLGUARD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--smoke", "--out", str(tmp_path / "out"),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert all(r["bench"] == module for r in lines)
    assert lines[0]["event"] == "header" and lines[-1]["event"] == "done"
    assert lines[0]["cpu_count"] >= 1 and len(lines[0]["load_average"]) == 3
    return lines


def _number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_latency_smoke_reports_every_decoder_and_skips_tensorrt_with_a_reason(nano, tmp_path):
    model, bundles = nano
    lines = _run("latency", ["--models", f"nano={model}", "--threads", "1", *bundles], tmp_path)
    rows = {r["decoder"]: r for r in lines if r["event"] == "decoder"}
    assert set(rows) == {"hf-generate", "torch", "ort-fp32", "ort-fp32-traced", "ort-int8", "ort-int4"}
    for r in rows.values():
        assert all(_number(r[k][q]) for k in ("ttft_ms", "tpot_ms", "e2e_ms") for q in ("p50", "p95", "p99"))
        assert r["weight_bytes_per_token"] > 0 and _number(r["floor_ms"]) and _number(r["speedup"])
    assert all(0 <= rows[d]["guard_share"]["p50"] <= 1 for d in rows if d != "hf-generate")
    assert "guard_share" not in rows["hf-generate"]  # generate has no guard
    # int8 and int4 decoders read fewer weight bytes per token than fp32
    assert rows["ort-int4"]["weight_bytes_per_token"] < rows["ort-int8"]["weight_bytes_per_token"] \
        < rows["ort-fp32"]["weight_bytes_per_token"]
    # the fused and the traced fp32 decoders read the same weights (rotary tables are not counted)
    fused, traced = rows["ort-fp32"]["weight_bytes_per_token"], rows["ort-fp32-traced"]["weight_bytes_per_token"]
    assert abs(fused - traced) <= 0.01 * traced
    skipped = [r for r in lines if r["event"] == "skipped"]
    assert [r["decoder"] for r in skipped] == ["tensorrt"] and "not available" in skipped[0]["reason"]
    assert {r["event"] for r in lines} >= {"bandwidth", "target"}
    report = (tmp_path / "out" / "latency.md").read_text()
    assert "## Model `nano`" in report and "Targets:" in report and "`ort-int8`" in report
    assert json.loads((tmp_path / "out" / "latency.json").read_text())["results"][0]["model"] == "nano"


def test_parity_smoke_reports_each_precision_against_the_gate(nano, tmp_path):
    model, bundles = nano
    lines = _run("parity", ["--models", f"nano={model}", "--threads", "1", *bundles], tmp_path)
    rows = {r["precision"]: r for r in lines if r["event"] == "precision"}
    assert set(rows) == {"fp32", "int8", "int4"}
    for r in rows.values():
        assert 0 <= r["token_agreement"] <= 1 and _number(r["logits_max_abs_diff"])
        assert isinstance(r["gate_passes"], bool) and isinstance(r["gate_failures"], list)
    assert "| fp32 |" in (tmp_path / "out" / "parity.md").read_text()


def test_serving_smoke_reports_each_level_the_grpc_overhead_and_the_batching_ceiling(nano, tmp_path):
    _, bundles = nano  # a bundle: the server starts without importing torch
    lines = _run("serving", ["--model", "nano=" + bundles[1].partition("=")[2], "--config", "none",
                             "--compare-unbatched"], tmp_path)
    levels = [r for r in lines if r["event"] == "level"]
    # each level on the configured server, then on the same server with batching off
    assert [(lv["concurrency"], lv["series"]) for lv in levels] == [
        (1, "configured"), (1, "batching off"), (2, "configured"), (2, "batching off")]
    for lv in levels:
        assert lv["requests"] == 4 and lv["ok"] + sum(lv["errors_by_code"].values()) == lv["requests"]
        assert _number(lv["throughput_rps"]) and _number(lv["latency_ms"]["p99"])
        assert set(lv["stage_ms"]) == {"preprocess", "vision", "prefill", "decode", "guard", "total"}
    overhead = next(r for r in lines if r["event"] == "overhead")
    assert _number(overhead["overhead_p50_ms"]) and _number(overhead["client_minus_server_ms"]["p50"])

    (c,) = [r for r in lines if r["event"] == "ceiling"]
    serial = levels[0]
    stage = c["stage_mean_ms"]
    assert c["vision_plus_prefill_ms"] == stage["vision"] + stage["prefill"] > 0
    # measured in the same run: the serial level's wall time per request over its own vision + prefill
    assert math.isclose(c["serial_ms_per_request"], serial["wall_s"] * 1e3 / serial["ok"])
    assert math.isclose(c["amdahl_ceiling"], c["serial_ms_per_request"] / c["vision_plus_prefill_ms"])
    assert c["amdahl_ceiling"] >= 1
    assert c["vs_serial"]["1"] == 1.0 and math.isclose(c["vs_serial"]["2"],
                                                       levels[2]["throughput_rps"] / serial["throughput_rps"])
    assert math.isclose(c["vs_unbatched_serial"]["2"], levels[2]["throughput_rps"] / levels[1]["throughput_rps"])
    report = (tmp_path / "out" / "serving.md").read_text()
    assert "| server | repeat | concurrency |" in report and "× serial" in report
    assert "Amdahl ceiling for batching" in report and f"**{c['amdahl_ceiling']:.2f}×**" in report
    saved = json.loads((tmp_path / "out" / "serving.json").read_text())
    assert [b["amdahl_ceiling"] for b in saved["batching"]] == [c["amdahl_ceiling"]]
    for ref in (r for r in lines if r["event"] == "reference_answer_tokens"):  # where ../shared/data is
        assert ref["positive"]["n"] > 0 and ref["positive"]["p50"] > 0 and ref["negative"]["p50"] > 0


def test_train_step_smoke_reports_padding_and_each_variant(nano_models, tmp_path):
    import shutil

    from training.phantom import write_dataset

    root = tmp_path / "build"
    write_dataset(root / "data" / "phantom", n_images=12, seed=0)
    (root / "data" / "medhalltune").mkdir(parents=True)
    shutil.copy(root / "data" / "phantom" / "train.json", root / "data" / "medhalltune" / "train.json")
    shutil.copytree(nano_models["smolvlm"], root / "init")
    lines = _run("train_step", ["--build-root", str(root)], tmp_path)
    runs = [r for r in lines if r["event"] == "run"]
    assert [r["variant"] for r in runs] == ["plain", "grouped", "grouped + tower cache"]
    assert all(_number(r["ms_per_step"]) for r in runs)
    assert runs[0]["tower_cache"] is None and runs[2]["tower_cache"]["misses"] > 0
    data = json.loads((tmp_path / "out" / "train_step.json").read_text())
    pad = data["padded_tokens"]
    assert pad["real"] <= pad["grouped"] <= pad["plain"]
    assert "speed-up vs plain" in (tmp_path / "out" / "train_step.md").read_text()
