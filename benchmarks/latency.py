"""Latency of one request: time to first token, time per token, end-to-end p50/p95/p99, per decoder.

Decoders, all on the same image and question, with the same fixed number of new
tokens (end-of-sequence ignored), measured in the same run:

- `hf-generate`: transformers `generate` in eager PyTorch (`min_new_tokens` =
  `max_new_tokens`), fed the runtime's own preprocessed pixels and prompt ids; no guard;
- `torch`: MedHallGuard's `Guard.answer` on the PyTorch backend (same weights, same process);
- `ort-fp32`, `ort-int8`, `ort-int4`: `Guard.answer` on onnxruntime export bundles (the default
  export: the decoder written with onnxruntime's fused operators, export/decoder_graph.py);
- `ort-fp32-traced`: the same at fp32 with the traced decoder (`medhallguard export --decoder traced`),
  which shows what the fused decoder buys;
- `tensorrt`: reported as not available unless TensorRT and a GPU are present.

Each decoder runs in a process of its own (its thread pool never spins while
another decoder runs), with the same thread count. After warm-ups, the
repetitions go round-robin over the decoders, starting one further along each
time, so slow drift of the machine (other jobs) falls on all of them alike.

Times: TTFT is from the call until the first new token exists (preprocessing,
vision, prefill and its sampling); time per token (TPOT) is the mean gap between
new tokens after the first; end-to-end is the whole call (for the guard: with
heads and policy). For the guard decoders the token times come from a wrapper
around the backend that stamps each one-token embedding call, which the decode
loop makes right after it emits a token; for `generate`, from a streamer.

The bandwidth floor of a decoder is the bytes of decoder weights (LM head
included, at that precision) that one decoding step reads, over the memory
bandwidth measured in the same run (`common.BandwidthMeter`): one sample after
each round of decoders, so the bandwidth p50 is taken under the same
conditions as the decoders' p50 (on a busy machine both are lower).
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import sys
import time
from pathlib import Path

from benchmarks.common import (
    RESULTS_DIR,
    done,
    emit,
    header,
    load_average,
    machine_lines,
    md_table,
    BandwidthMeter,
    plot_available,
    say,
    stats,
    subset,
    write_json,
)

DECODERS = ("hf-generate", "torch", "ort-fp32", "ort-fp32-traced", "ort-int8", "ort-int4", "tensorrt")
QUESTION = "Is there a nodule in the right lung? Describe its size and location."
TARGETS = (
    ("ort-int8 per-token time at least 4x faster than transformers eager generate", "speedup", "ort-int8", 4.0),
    ("ort-fp32 per-token time within 1.3x of its bandwidth floor", "floor_ratio", "ort-fp32", 1.3),
    ("the guard takes at most 2% of end-to-end time", "guard_share", None, 0.02),
)


# --- one decoder process --------------------------------------------------------------------


class _Clock:
    """The backend, stamping each one-token embedding call: the decode loop makes one right after it emits a token."""

    def __init__(self, backend):
        self.backend, self.spec, self.name, self.checksum = backend, backend.spec, backend.name, backend.checksum
        self.stamps: list[float] = []
        self.cpu: list[float] = []  # process CPU time (all threads) at the same moments

    def encode_image(self, pixels):
        return self.backend.encode_image(pixels)

    def embed(self, ids):
        if ids.shape == (1, 1):
            self.stamps.append(time.perf_counter())
            self.cpu.append(time.process_time())
        return self.backend.embed(ids)

    def new_cache(self, batch):
        return self.backend.new_cache(batch)

    def forward(self, embeds, attention_mask, position_ids, cache):
        return self.backend.forward(embeds, attention_mask, position_ids, cache)


def _load(kind: str, path: str, threads: int):
    from guard.batching import BatchingConfig
    from guard.policy import PolicyConfig
    from guard.runtime import BackendConfig, Guard, GuardConfig, load_guard

    # One request at a time: the unbatched path (batching would only add its max_wait_ms here;
    # benchmarks/serving.py measures concurrent load). Random heads: still run the whole policy.
    config = GuardConfig(backend=BackendConfig(kind=kind, threads=threads), batching=BatchingConfig(enabled=False),
                         policy=PolicyConfig(allow_untrained_heads=True))
    guard = load_guard(path, config)
    clock = _Clock(guard.backend)
    return Guard(clock, guard.prompter, guard.heads, config), clock


def _run_guard(guard, clock: _Clock, image: bytes, max_new_tokens: int) -> dict:
    from guard.types import DecodeConfig, VqaRequest

    req = VqaRequest(image, "image/png", QUESTION, DecodeConfig(max_new_tokens=max_new_tokens, ignore_eos=True))
    clock.stamps.clear()
    clock.cpu.clear()
    t0 = time.perf_counter()
    result = guard.answer(req)
    e2e = time.perf_counter() - t0
    assert result.num_tokens == max_new_tokens, "ignore_eos gives exactly max_new_tokens"
    s = clock.stamps  # tokens 0 .. n-2 (the last token is never fed back)
    t = result.timings
    return {
        "ttft_ms": (s[0] - t0) * 1e3,
        "tpot_ms": (s[-1] - s[0]) / (len(s) - 1) * 1e3,
        "cpu_per_wall": (clock.cpu[-1] - clock.cpu[0]) / (s[-1] - s[0]),
        "e2e_ms": e2e * 1e3,
        "tokens": result.num_tokens,
        "stages_ms": {k: getattr(t, k) for k in ("preprocess_ms", "vision_ms", "prefill_ms", "decode_ms", "guard_ms")},
    }


def _run_generate(guard, image: bytes, max_new_tokens: int) -> dict:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from guard.families import family_for
    from guard.preprocess import preprocess

    class Stamps(BaseStreamer):
        def __init__(self):
            self.calls: list[float] = []
            self.cpu: list[float] = []

        def put(self, value):  # called once with the prompt, then once per new token
            self.calls.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def end(self):
            pass

    model = guard.backend.backend.model
    stamps = Stamps()
    t0 = time.perf_counter()
    pixels = torch.from_numpy(preprocess(image, "image/png", guard.spec.preprocess)[None])
    ids = torch.from_numpy(guard.prompter.encode_prompt(QUESTION))[None]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, streamer=stamps,
                             **family_for(model.config.model_type).pixel_kwargs(pixels))
    e2e = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    assert n == max_new_tokens, f"generate made {n} tokens, not {max_new_tokens}"
    s, cpu = stamps.calls[1:], stamps.cpu[1:]
    return {"ttft_ms": (s[0] - t0) * 1e3, "tpot_ms": (s[-1] - s[0]) / (len(s) - 1) * 1e3,
            "cpu_per_wall": (cpu[-1] - cpu[0]) / (s[-1] - s[0]), "e2e_ms": e2e * 1e3, "tokens": n}


def _weight_bytes_torch(guard) -> int:
    """Decoder weights one step reads: the text model without its embedding table, plus the LM head."""
    from guard.families import family_for

    model = guard.backend.backend.model
    text = family_for(model.config.model_type).text_model(model)
    seen = {id(p) for p in text.get_input_embeddings().parameters()}
    params = [p for p in text.parameters() if id(p) not in seen] + list(model.lm_head.parameters())
    return sum(p.numel() * p.element_size() for p in params)


_QUANTIZED_MATMULS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "QLinearMatMul")


def _onnx_decoder_info(bundle: Path) -> dict:
    """Weight bytes one step reads (the decoder graph's initializers, at the bundle's precision: int8/int4 weights,
    scales, zero points), and which MatMuls with a constant weight are quantized (the LM head included?)."""
    import onnx

    from guard.manifest import load_manifest

    model = onnx.load(str(bundle / load_manifest(bundle).graphs["decoder"].file), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    # Rotary tables [max_positions, head_dim/2]: a step reads one row of each, not the table.
    tables = {name for n in model.graph.node if n.op_type == "RotaryEmbedding" for name in n.input[2:4]}
    weighted = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", *_QUANTIZED_MATMULS)
                and any(i in inits for i in n.input[1:2])]
    producer = {o: n for n in model.graph.node for o in n.output}
    head = producer.get("logits")
    while head is not None and head.op_type not in ("MatMul", "Gemm", *_QUANTIZED_MATMULS):  # through Cast/Mul
        head = producer.get(head.input[0])
    return {"weight_bytes_per_token": _initializer_bytes(model, skip=tables),
            "matmuls_with_weights": len(weighted),
            "quantized_matmuls": sum(n.op_type in _QUANTIZED_MATMULS for n in weighted),
            "lm_head_op": head.op_type if head is not None else "unknown"}


def _initializer_bytes(model, skip: set[str] = frozenset()) -> int:
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    total = 0
    for t in model.graph.initializer:
        if t.name in skip:
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(ExternalDataInfo(t).length)
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            total += onnx.numpy_helper.to_array(t).nbytes
    return total


def _worker(conn, kind: str, path: str, threads: int) -> None:
    """Serve ("info",), ("run", decoder, image, max_new_tokens) and ("stop",) requests over `conn`."""
    import logging

    logging.getLogger("guard").setLevel(logging.ERROR)  # "untrained heads" / "unverified bundle": said in the report
    try:
        if kind == "torch":
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        guard, clock = _load(kind, path, threads)
        if kind == "torch":
            import torch

            model = guard.backend.backend.model
            info = {"backend": guard.backend.name, "weight_bytes_per_token": _weight_bytes_torch(guard),
                    "threads": torch.get_num_threads(), "attention": model.config._attn_implementation}
        else:
            info = {"backend": guard.backend.name, **_onnx_decoder_info(Path(path)), "threads": threads}
        conn.send(("ok", info))
    except Exception as e:  # the parent reports it; never hang it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        _, decoder, image, max_new_tokens = msg
        try:
            if decoder == "hf-generate":
                conn.send(("ok", _run_generate(guard, image, max_new_tokens)))
            else:
                conn.send(("ok", _run_guard(guard, clock, image, max_new_tokens)))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Process:
    """One worker process and the decoders it serves."""

    def __init__(self, ctx, kind: str, path: Path, threads: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, kind, str(path), threads), daemon=True)
        self.proc.start()
        self.kind, self.path, self.info = kind, path, None

    def ready(self) -> None:
        """Wait until the model is loaded (processes load in parallel)."""
        status, self.info = self.conn.recv()
        if status != "ok":
            self.proc.join()
            raise RuntimeError(f"loading {self.path} with {self.kind} failed: {self.info}")

    def run(self, decoder: str, image: bytes, max_new_tokens: int) -> dict:
        self.conn.send(("run", decoder, image, max_new_tokens))
        status, out = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{decoder} failed: {out}")
        return out

    def stop(self) -> None:
        self.conn.send(("stop",))
        self.proc.join(timeout=30)


# --- one model: every decoder, round-robin ------------------------------------------------


def tensorrt_status() -> str | None:
    """None if TensorRT can run here, else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return "not available: the tensorrt package is not installed (it needs NVIDIA's index and a GPU host)"
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "not available: no CUDA provider (no GPU here)"
    except ImportError:
        pass
    return "not available: the TensorRT latency path has not been written into this benchmark yet"


def bench_model(model, decoders: list[str], args, meter: BandwidthMeter) -> tuple:
    """-> (plan, runs, skipped, bandwidth samples): the decoders' processes, their measured runs, the decoders
    that could not run, and one bandwidth sample per measured round."""
    from benchmarks.models import bundle
    from export.parity import phantom_png

    image = phantom_png(1, size=256)
    ctx = mp.get_context("spawn")
    procs, plan, skipped = {}, {}, {}
    for d in decoders:
        if d == "tensorrt":
            skipped[d] = tensorrt_status()
            emit({"bench": "latency", "event": "skipped", "model": model.label, "decoder": d, "reason": skipped[d]})
            say(f"tensorrt: {skipped[d]}")
            continue
        if d in ("hf-generate", "torch"):
            key, kind, path = "torch", "torch", model.path
        else:
            precision, _, graph = d.removeprefix("ort-").partition("-")
            key, kind = d, "onnxruntime"
            path = bundle(model, precision, args.threads, args.bundles, decoder=graph or "fused")
        if key not in procs:
            say(f"{model.label}: loading {kind} from {path}")
            procs[key] = _Process(ctx, kind, path, args.threads)
        plan[d] = procs[key]
    for p in procs.values():
        p.ready()
    runs: dict[str, list[dict]] = {d: [] for d in plan}
    samples: list[dict] = []
    order = list(plan)
    try:
        total = args.warmup + args.reps
        for rep in range(total):
            k = rep % len(order)
            for d in order[k:] + order[:k]:
                time.sleep(args.pause_s)  # let the last decoder's threads go idle
                out = plan[d].run(d, image, args.max_new_tokens)
                if rep >= args.warmup:
                    runs[d].append(out)
            if rep >= args.warmup:
                time.sleep(args.pause_s)
                samples.append(meter.sample())
            say(f"{model.label}: {'warm-up' if rep < args.warmup else 'repetition'} {rep + 1}/{total} done "
                f"(load {load_average()[0]})")
    finally:
        for p in procs.values():
            p.stop()
    return plan, runs, skipped, samples


def summarize(model, plan, runs, skipped, samples, args) -> dict:
    bandwidth = {"gbps": stats([x["gbps"] for x in samples]), "copy_gbps": stats([x["copy_gbps"] for x in samples]),
                 "read_gbps": stats([x["read_gbps"] for x in samples])}
    gbps, best_gbps = bandwidth["gbps"]["p50"], bandwidth["gbps"]["max"]
    rows = {}
    for d, proc in plan.items():
        r = runs[d]
        weights = proc.info["weight_bytes_per_token"]
        row = {
            "decoder": d,
            "backend": proc.info["backend"] if d != "hf-generate" else "transformers generate (eager PyTorch)",
            "ttft_ms": stats([x["ttft_ms"] for x in r]),
            "tpot_ms": stats([x["tpot_ms"] for x in r]),
            "cpu_per_wall": stats([x["cpu_per_wall"] for x in r]),
            "e2e_ms": stats([x["e2e_ms"] for x in r]),
            "weight_bytes_per_token": weights,
            "floor_ms": weights / (gbps * 1e9) * 1e3,
            "lowest_floor_ms": weights / (best_gbps * 1e9) * 1e3,
            "info": proc.info,
        }
        row["floor_ratio"] = row["tpot_ms"]["p50"] / row["floor_ms"]
        row["best_floor_ratio"] = row["tpot_ms"]["min"] / row["lowest_floor_ms"]
        if d != "hf-generate":
            shares = [x["stages_ms"]["guard_ms"] / x["e2e_ms"] for x in r]
            row["guard_ms"] = stats([x["stages_ms"]["guard_ms"] for x in r])
            row["guard_share"] = stats(shares)
            row["stages_ms_p50"] = {k: stats([x["stages_ms"][k] for x in r])["p50"] for k in r[0]["stages_ms"]}
        rows[d] = row
    if "hf-generate" in rows:
        base = rows["hf-generate"]["tpot_ms"]["p50"]
        for row in rows.values():
            row["speedup"] = base / row["tpot_ms"]["p50"]
    for row in rows.values():
        emit({"bench": "latency", "event": "decoder", "model": model.label, **{k: v for k, v in row.items()
                                                                              if k != "info"}})
    return {"model": model.label, "path": str(model.path), "note": model.note, "rows": rows, "skipped": skipped,
            "bandwidth": bandwidth, "bandwidth_samples": samples,
            "runs": runs, "max_new_tokens": args.max_new_tokens, "reps": args.reps, "warmup": args.warmup}


def check_targets(result: dict) -> list[dict]:
    rows = result["rows"]
    out = []
    for text, key, decoder, limit in TARGETS:
        if decoder is None:  # the guard: worst share over the guard decoders
            have = [(r["guard_share"]["p50"], d) for d, r in rows.items() if "guard_share" in r]
            value, where = max(have) if have else (None, None)
            ok = value is not None and value <= limit
        else:
            where = decoder
            value = rows.get(decoder, {}).get(key)
            ok = value is not None and (value >= limit if key == "speedup" else value <= limit)
        out.append({"target": text, "decoder": where, "value": value, "limit": limit,
                    "met": ok if value is not None else None})
    return out


# --- report -------------------------------------------------------------------------------


def _f(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}"


def report(head: dict, bandwidth: list[dict], method: str, results: list[dict], load_end: list[float], out: Path,
           plots: list[str]) -> str:
    lines = ["# Latency", "", *machine_lines(head, load_end)]
    lines += [f"Memory bandwidth ({method}): best of 5 at the start {bandwidth[0]['gbps']} GB/s "
              f"(copy {bandwidth[0]['copy_gbps']}, read {bandwidth[0]['read_gbps']}), at the end "
              f"{bandwidth[1]['gbps']} GB/s (copy {bandwidth[1]['copy_gbps']}, read {bandwidth[1]['read_gbps']}); "
              "one more sample after each round of decoders, whose p50 sets each model's floor.", ""]
    for res in results:
        a = res
        lines += [f"## Model `{a['model']}`", ""]
        if a["note"]:
            lines += [f"Model: {a['note']}.", ""]
        bw = a["bandwidth"]["gbps"]
        lines += [f"{a['max_new_tokens']} new tokens (end-of-sequence ignored), {a['warmup']} warm-ups, then "
                  f"{a['reps']} repetitions round-robin over the decoders; times in ms, p50 unless named. "
                  f"Bandwidth during these rounds: p50 {bw['p50']:.1f} GB/s (min {bw['min']:.1f}, max {bw['max']:.1f}); "
                  "floor = weights per token ÷ the p50 bandwidth; the last column compares the fastest token time "
                  "with the floor at the most bandwidth seen.", ""]
        cols = ["decoder", "TTFT", "per token", "e2e p50", "e2e p95", "e2e p99", "weights/token (MB)",
                "floor/token", "per token ÷ floor", "speed-up per token vs generate", "guard share", "fastest ÷ lowest floor",
                "CPU busy while decoding"]
        rows = []
        for d, r in a["rows"].items():
            rows.append([f"`{d}`", _f(r["ttft_ms"]["p50"]), _f(r["tpot_ms"]["p50"], 2), _f(r["e2e_ms"]["p50"]),
                         _f(r["e2e_ms"]["p95"]), _f(r["e2e_ms"]["p99"]), _f(r["weight_bytes_per_token"] / 1e6),
                         _f(r["floor_ms"], 2), _f(r["floor_ratio"], 2) + "×",
                         (_f(r["speedup"], 2) + "×") if "speedup" in r else "",
                         f"{r['guard_share']['p50']:.3%} ({_f(r['guard_ms']['p50'], 2)} ms)" if "guard_share" in r
                         else "no guard", _f(r["best_floor_ratio"], 2) + "×",
                         f"{r['cpu_per_wall']['p50']:.2f} of {r['info']['threads']}"])
        for d, why in a["skipped"].items():
            rows.append([f"`{d}`", why, *[""] * (len(cols) - 2)])
        lines += [md_table(cols, rows), ""]
        stage_rows = [[f"`{d}`", *(_f(r["stages_ms_p50"][k], 2) for k in r["stages_ms_p50"])]
                      for d, r in a["rows"].items() if "stages_ms_p50" in r]
        if stage_rows:
            lines += ["Where the guard decoders' time goes (Timings, p50 ms):", "",
                      md_table(["decoder", "preprocess", "vision", "prefill", "decode", "guard (heads + policy)"],
                               stage_rows), ""]
        quant = [f"`{d}` {r['info']['quantized_matmuls']}/{r['info']['matmuls_with_weights']} (LM head: "
                 f"{r['info']['lm_head_op']})" for d, r in a["rows"].items() if "quantized_matmuls" in r["info"]]
        if quant:
            lines += ["Quantized MatMuls with a constant weight, of all of them, in each decoder graph: "
                      + "; ".join(quant) + ".", ""]
        targets = check_targets(a)
        lines += ["Targets:", ""]
        for t in targets:
            mark = {True: "**met**", False: "**not met**", None: "not measured"}[t["met"]]
            value = "—" if t["value"] is None else (f"{t['value']:.2%}" if "guard" in t["target"]
                                                   else f"{t['value']:.2f}×")
            lines.append(f"- {t['target']}: {value} ({t['decoder']}) — {mark}")
        lines.append("")
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    lines += ["CPU busy while decoding: the decoder process's CPU seconds per wall-clock second between its "
              "first and last new token; with 2 threads it is near 2 when nothing else competes for the cores. "
              "Well below that, the decoder waited for a core: its times measure the machine's other load, and the "
              "ratio to the bandwidth floor (which assumes the cores are free) is inflated.", ""]
    lines += ["How to read this: TTFT includes preprocessing, the vision encoder and prefill. `hf-generate` is "
              "transformers `generate` with `min_new_tokens` = `max_new_tokens`, fed the same pixels and prompt ids, "
              "without a guard. The floor is weights read per token ÷ measured bandwidth: a decoder cannot beat it "
              "without reading fewer bytes. Each decoder ran in its own process with the same thread count.", ""]
    text = "\n".join(lines)
    (out / "latency.md").write_text(text)
    return text


def plot(results: list[dict], out: Path) -> list[str]:
    if not plot_available():
        say("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for res in results:
        rows = res["rows"]
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
        labels = list(rows)
        tpot = [rows[d]["tpot_ms"]["p50"] for d in labels]
        floor = [rows[d]["floor_ms"] for d in labels]
        ax.bar(labels, tpot, color="#4c72b0", label="per token (p50)")
        ax.scatter(labels, floor, color="#c44e52", marker="_", s=900, linewidths=3, label="bandwidth floor", zorder=3)
        for i, v in enumerate(tpot):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("ms per token")
        ax.set_title(f"Time per token, model {res['model']} ({res['max_new_tokens']} tokens)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"latency_{res['model']}.png"
        fig.savefig(out / name)
        plt.close(fig)
        names.append(name)
    return names


# --- CLI --------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m benchmarks.latency                       # default and 256m models, every decoder\n"
               "  python -m benchmarks.latency --models 256m --reps 20\n"
               "  python -m benchmarks.latency --smoke               # seconds: nano model, 4 tokens, 2 repetitions\n"
               "  python -m benchmarks.latency --models mine=runs/tuned --decoders torch,ort-int8",
    )
    p.add_argument("--models", default="default,256m",
                   help="comma-separated: default, nano, 256m or NAME=MODEL_DIR (default: default,256m)")
    p.add_argument("--decoders", default=",".join(DECODERS), help=f"comma-separated subset of {','.join(DECODERS)}")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per request, EOS ignored (default 32)")
    p.add_argument("--reps", type=int, default=10, help="measured repetitions per decoder (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up repetitions per decoder, not measured (default 2)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every decoder (default 2)")
    p.add_argument("--pause-s", type=float, default=0.05, help="pause before each call (default 0.05 s)")
    p.add_argument("--bundle", action="append", default=[], metavar="MODEL:PRECISION=DIR",
                   help="use this export bundle instead of exporting one into the cache (repeatable)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds: nano model, 4 tokens, 1 warm-up, 2 repetitions (checks the plumbing only)")
    args = p.parse_args(argv)
    if args.smoke:
        if args.models == "default,256m":
            args.models = "nano"
        args.max_new_tokens, args.reps, args.warmup, args.pause_s = 4, 2, 1, 0.0
    if args.max_new_tokens < 3:
        p.error("--max-new-tokens must be at least 3 (time per token needs two gaps)")
    if args.reps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--reps and --threads must be >= 1, --warmup >= 0")
    args.decoders = subset(p, args.decoders, DECODERS, "decoder")
    from benchmarks.models import parse_bundles

    args.bundles = parse_bundles(args.bundle)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from benchmarks.models import resolve

    head = header("latency", argv)
    emit(head)
    models = [resolve(m) for m in args.models.split(",")]
    say("measuring memory bandwidth")
    meter = BandwidthMeter(args.threads, megabytes=32 if args.smoke else 256)
    bandwidth = [meter.sample(repeats=5)]
    emit({"bench": "latency", "event": "bandwidth", "when": "start", "method": meter.method, **bandwidth[0]})
    measured = [(m, bench_model(m, args.decoders, args, meter)) for m in models]
    bandwidth.append(meter.sample(repeats=5))
    emit({"bench": "latency", "event": "bandwidth", "when": "end", "method": meter.method, **bandwidth[1]})
    results = [summarize(m, *raw, args) for m, raw in measured]
    load_end = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    for res in results:
        for t in check_targets(res):
            emit({"bench": "latency", "event": "target", "model": res["model"], **t})
    plots = plot(results, args.out)
    write_json(args.out / "latency.json", {"header": head, "bandwidth": bandwidth, "bandwidth_method": meter.method,
                                           "load_average_end": load_end,
                                           "results": results, "targets": {r["model"]: check_targets(r)
                                                                            for r in results}})
    report(head, bandwidth, meter.method, results, load_end, args.out, plots)
    done("latency", args.out, plots=plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
