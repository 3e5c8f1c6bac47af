"""Serving: a bounded load generator over gRPC on loopback, at several concurrency levels.

It starts `medhallguard serve` as a child process on a free loopback port
(server/launch.py `served_process`), with the server configuration you give it
(`--config FILE.toml`, passed through as it is; only `[decode] ignore_eos`
is added so every answer has exactly `--max-new-tokens` tokens, unless
`--respect-eos`). Then, for each concurrency level C, C clients on one
asyncio channel send `Ask` requests back to back until `--requests` have been
sent (after C warm-up requests that are not counted), and it reports:

- throughput: completed requests per second and new tokens per second;
- latency p50/p95/p99 of the successful requests, as the client saw them;
- errors by gRPC status code (e.g. RESOURCE_EXHAUSTED when the queue is full);
- the server's CPU seconds (Linux /proc), and requests per server CPU-second:
  the steadier figure on a machine that other jobs share;
- the server's own stage timings (preprocess, vision, prefill, decode, guard),
  from each response's `timings`;
- each level's throughput over the serial (concurrency 1) rate, next to the
  Amdahl ceiling for batching measured in the same run: batching shares the
  decoder steps, but each request still pays its own vision encoder and
  prefill, so the gain over serial is at most serial time per request /
  (vision + prefill) from the concurrency-1 level's timings;
- the gRPC overhead at concurrency 1: the same request alternately over gRPC
  and through an in-process `Guard.answer` (same model and configuration,
  loaded in this process), p50 against p50; and, per request, client latency
  minus the server's own `total_ms` (transport and serialization);
- the median MedHallTune dev-split reference (GPT-4o) answer length in the
  served model's tokens, when ../shared/data/medhalltune is there: what a
  realistic --max-new-tokens is.

`--repeat N` runs the levels N times, in turn, so a change in machine load hits
every level. `--compare-unbatched` also starts the same server with `[batching]
enabled = false` and runs each level on it right after the configured one.
Whatever the server does with concurrent requests (worker threads, dynamic
batching, queue bounds) comes from its configuration; this script only measures it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

from benchmarks.common import (
    RESULTS_DIR,
    done,
    emit,
    header,
    load_average,
    machine_lines,
    md_table,
    plot_available,
    say,
    stats,
    write_json,
)

QUESTION = "Is there a nodule in the right lung? Describe its size and location."
PRECISIONS = ("torch", "fp32", "int8", "int4")
DEFAULT_CONFIG = Path(__file__).with_name("serving.toml")
STAGES = ("preprocess", "vision", "prefill", "decode", "guard", "total")
CONFIGURED, UNBATCHED = "configured", "batching off"
REFERENCE_FILES = {"positive": "val_positive_qa-filtered.jsonl", "negative": "val_negative_qa-filtered.jsonl"}


# --- configuration ----------------------------------------------------------------------


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {type(v).__name__} values to TOML")


def to_toml(tables: dict, prefix: str = "") -> str:
    """Tables of scalars (and nested tables) -> TOML text; what tomllib reads back is `tables`."""
    lines = []
    for name, table in tables.items():
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        lines.append(f"[{prefix}{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
        lines.append("")
        nested = {k: v for k, v in table.items() if isinstance(v, dict)}
        if nested:
            lines.append(to_toml(nested, f"{prefix}{name}."))
    return "\n".join(lines)


def server_tables(config: Path | None, ignore_eos: bool) -> dict:
    """The TOML tables the server gets: the given file, plus [decode] ignore_eos for fixed-length answers."""
    tables = {}
    if config is not None:
        with open(config, "rb") as f:
            tables = tomllib.load(f)
    if ignore_eos:
        tables.setdefault("decode", {})["ignore_eos"] = True
    return tables


def unbatched_tables(tables: dict) -> dict:
    """The same tables with `[batching] enabled = false` (the rest, max_concurrency included, as given)."""
    return {**tables, "batching": {**tables.get("batching", {}), "enabled": False}}


# --- the load generator -------------------------------------------------------------------


def _ask_request(image: bytes, max_new_tokens: int, i: int):
    from server.pb.medhallguard.v1 import guard_pb2 as pb

    return pb.AskRequest(image=image, media_type="image/png", question=QUESTION, request_id=f"bench-{i}",
                         generation=pb.GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0))


async def _level(address: str, image: bytes, concurrency: int, requests: int, max_new_tokens: int,
                 deadline_s: float, server_pid: int | None = None) -> dict:
    """C clients back to back until `requests` are sent; C warm-up requests first (not counted)."""
    import grpc

    from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.MedHallGuardStub(channel)
        await asyncio.gather(*(stub.Ask(_ask_request(image, max_new_tokens, -1 - i), timeout=deadline_s)
                               for i in range(concurrency)), return_exceptions=True)
        sent = 0
        records: list[dict] = []

        async def client() -> None:
            nonlocal sent
            while sent < requests:
                i = sent
                sent += 1
                t = time.perf_counter()
                try:
                    r = await stub.Ask(_ask_request(image, max_new_tokens, i), timeout=deadline_s)
                    records.append({"code": "OK", "latency_ms": (time.perf_counter() - t) * 1e3,
                                    "server_total_ms": r.timings.total_ms, "tokens": r.num_tokens,
                                    **{f"{s}_ms": getattr(r.timings, f"{s}_ms") for s in STAGES}})
                except grpc.aio.AioRpcError as e:
                    records.append({"code": e.code().name, "latency_ms": (time.perf_counter() - t) * 1e3})

        cpu0, t0 = server_cpu_s(server_pid), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall, cpu1 = time.perf_counter() - t0, server_cpu_s(server_pid)
    ok = [r for r in records if r["code"] == "OK"]
    codes: dict[str, int] = {}
    for r in records:
        codes[r["code"]] = codes.get(r["code"], 0) + 1
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "ok": len(ok),
        "errors_by_code": {k: v for k, v in codes.items() if k != "OK"},
        "wall_s": wall,
        "throughput_rps": len(ok) / wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "latency_ms": stats([r["latency_ms"] for r in ok]),
        "server_total_ms": stats([r["server_total_ms"] for r in ok]),
        # At concurrency > 1 a batch's vision/prefill round is shared, so these are per-request waits, not costs.
        "stage_ms": {s: stats([r[f"{s}_ms"] for r in ok]) for s in STAGES},
        "server_cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
        "requests_per_server_cpu_s": len(ok) / (cpu1 - cpu0) if cpu0 is not None and cpu1 and cpu1 > cpu0 else None,
        "load_average": load_average(),
    }


def server_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used (Linux /proc); None where that cannot be read."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serial(levels: list[dict]) -> dict | None:
    """The series' successful concurrency-1 level, after setting each level's `vs_serial` against it."""
    serial = next((lv for lv in levels if lv["concurrency"] == 1 and lv["ok"]), None)
    for lv in levels if serial else ():
        lv["vs_serial"] = lv["throughput_rps"] / serial["throughput_rps"]
    return serial


def batching_ceiling(levels: list[dict], unbatched: list[dict] = ()) -> dict:
    """The Amdahl ceiling for batching from the concurrency-1 level of `levels`, next to each level's gain.

    Batching shares decode steps; the vision encoder and the prefill run per request (compute-bound on
    a CPU), so throughput over serial is at most serial time per request / (vision + prefill). An upper
    bound: it counts decoding, preprocessing, the guard heads and transport as free once batched.
    `unbatched`: the same levels with batching off, whose serial rate is the other baseline.
    `amdahl_ceiling` is None when there is no successful concurrency-1 level.
    """
    serial, plain = _serial(levels), _serial(list(unbatched))
    out = {"vs_unbatched_serial": {lv["concurrency"]: lv["throughput_rps"] / plain["throughput_rps"]
                                   for lv in levels}} if plain else {}
    if serial is None:
        return {"amdahl_ceiling": None, **out}
    stage = {s: serial["stage_ms"][s]["mean"] for s in STAGES}
    serial_ms = serial["wall_s"] * 1e3 / serial["ok"]
    unbatchable = stage["vision"] + stage["prefill"]
    return {"serial_ms_per_request": serial_ms, "stage_mean_ms": stage, "vision_plus_prefill_ms": unbatchable,
            "amdahl_ceiling": serial_ms / unbatchable if unbatchable > 0 else None,
            "vs_serial": {lv["concurrency"]: lv["vs_serial"] for lv in levels}, **out}


def reference_answer_tokens(prompter, data_dir: Path) -> dict | None:
    """Median (and p90) MedHallTune reference-answer length in the served model's tokens, per polarity."""
    import json

    out = {}
    for polarity, name in REFERENCE_FILES.items():
        path = data_dir / name
        if not path.is_file():
            return None
        answers = [json.loads(line)["gpt4_answer"] for line in path.read_text().splitlines() if line.strip()]
        lengths = [len(prompter.encode_answer(a)) for a in answers]
        out[polarity] = {"n": len(lengths), "p50": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90))}
    return {"data": str(data_dir), **out}


def _overhead(address: str, guard, image: bytes, n: int, max_new_tokens: int) -> dict:
    """Concurrency 1: the same request alternately over gRPC and in-process; -> p50s and their difference."""
    import dataclasses

    import grpc

    from guard.types import VqaRequest
    from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc

    decode = dataclasses.replace(guard.config.decode, max_new_tokens=max_new_tokens, temperature=0.0)
    grpc_ms, server_ms, local_ms = [], [], []
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.MedHallGuardStub(channel)
        for i in range(n + 1):  # the first pair warms both paths
            t = time.perf_counter()
            r = stub.Ask(_ask_request(image, max_new_tokens, 10_000 + i), timeout=600)
            g = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            guard.answer(VqaRequest(image, "image/png", QUESTION, decode))
            local = (time.perf_counter() - t) * 1e3
            if i:
                grpc_ms.append(g)
                server_ms.append(r.timings.total_ms)
                local_ms.append(local)
    remote, in_process = stats(grpc_ms), stats(local_ms)
    g50, l50 = remote["p50"], in_process["p50"]
    transport = stats([a - b for a, b in zip(grpc_ms, server_ms)])
    return {"pairs": n, "grpc_ms": remote, "in_process_ms": in_process, "server_total_ms": stats(server_ms),
            "overhead_p50_ms": g50 - l50, "overhead_p50_share": (g50 - l50) / g50,
            "client_minus_server_ms": transport}


# --- report -------------------------------------------------------------------------------


def report(head: dict, run: dict, out: Path, plots: list[str]) -> None:
    lines = ["# Serving", "", *machine_lines(head, run["load_average_end"])]
    lines += [f"Model `{run['model']}` ({run['path']}), served as `{run['backend']}`"
              + (f"; {run['note']}" if run["note"] else "") + ".",
              f"{run['max_new_tokens']} new tokens per request"
              + (" (end-of-sequence ignored)" if run["ignore_eos"] else " (stops at end-of-sequence)")
              + f"; {run['requests']} requests per level after as many warm-up requests as clients; the client is "
                "one asyncio gRPC channel in this process, on the same machine as the server.", "",
              "Server configuration (TOML as given to `medhallguard serve`):", "", "```toml",
              run["config_toml"].strip() or "# (defaults)", "```", ""]
    if any(lv["series"] == UNBATCHED for lv in run["levels"]):
        lines += [f"The `{UNBATCHED}` server is the same with `[batching] enabled = false`; each level ran on it right "
                  "after the configured one.", ""]
    rows = []
    for lv in run["levels"]:
        lat = lv["latency_ms"]
        errors = ", ".join(f"{k} {v}" for k, v in lv["errors_by_code"].items()) or "none"
        per_cpu = lv.get("requests_per_server_cpu_s")
        rows.append([lv["series"], lv["repeat"], lv["concurrency"], f"{lv['ok']}/{lv['requests']}",
                     f"{lv['throughput_rps']:.2f}", f"{lv['tokens_per_s']:.1f}",
                     f"{lv['vs_serial']:.2f}×" if "vs_serial" in lv else "-",
                     f"{per_cpu:.3f}" if per_cpu else "-",
                     *(f"{lat.get(k, float('nan')):.0f}" for k in ("p50", "p95", "p99")), errors,
                     lv["load_average"][0]])
    lines += [md_table(["server", "repeat", "concurrency", "ok/sent", "requests/s", "tokens/s", "× serial",
                        "requests per server CPU-s", "p50 ms", "p95 ms", "p99 ms", "errors by status",
                        "load (1 min)"], rows), ""]
    lines += _ceiling_lines(run["batching"])
    ref = run.get("reference_answer_tokens")
    if ref:
        lines += [f"MedHallTune dev-split reference (GPT-4o) answers are {ref['positive']['p50']:.0f} tokens long at "
                  f"the median for positive questions (p90 {ref['positive']['p90']:.0f}, n={ref['positive']['n']}) "
                  f"and {ref['negative']['p50']:.0f} for negative ones (p90 {ref['negative']['p90']:.0f}, "
                  f"n={ref['negative']['n']}), in this model's tokenizer: a realistic `--max-new-tokens`.", ""]
    o = run["overhead"]
    lines += ["gRPC overhead at concurrency 1 (the same request alternately over gRPC and in-process, "
              f"{o['pairs']} pairs): gRPC p50 {o['grpc_ms']['p50']:.1f} ms, in-process `Guard.answer` p50 "
              f"{o['in_process_ms']['p50']:.1f} ms, difference {o['overhead_p50_ms']:.1f} ms "
              f"({o['overhead_p50_share']:.1%} of the gRPC time); client latency minus the server's own total_ms: "
              f"p50 {o['client_minus_server_ms']['p50']:.2f} ms, p99 {o['client_minus_server_ms']['p99']:.2f} ms.", ""]
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    (out / "serving.md").write_text("\n".join(lines))


def _ceiling_lines(batching: list[dict]) -> list[str]:
    """The Amdahl paragraph of each series and repeat that has a concurrency-1 level."""
    lines = []
    for b in batching:
        if b["amdahl_ceiling"] is None:
            lines += [f"No Amdahl ceiling for repeat {b['repeat']}: run concurrency 1 too (`--concurrency 1,...`).", ""]
            continue
        st = b["stage_mean_ms"]
        measured = ", ".join(f"{r:.2f}× at {c}" for c, r in b["vs_serial"].items() if c != 1) or "no other level"
        if "vs_unbatched_serial" in b:
            measured += "; over the serial rate with batching off: " + ", ".join(
                f"{r:.2f}× at {c}" for c, r in b["vs_unbatched_serial"].items())
        lines += [f"**Batching ceiling (repeat {b['repeat']}).** At concurrency 1 a request "
                  f"took {b['serial_ms_per_request']:.0f} ms (wall time / requests); the server measured (means) "
                  f"vision {st['vision']:.0f} ms, prefill {st['prefill']:.0f} ms, decode {st['decode']:.0f} ms, "
                  f"preprocess {st['preprocess']:.0f} ms, guard {st['guard']:.0f} ms. Batching shares the decode "
                  "steps, but each request still pays its own vision encoder and prefill, so even with free "
                  "decoding the throughput over serial is at most serial time / (vision + prefill) = "
                  f"{b['serial_ms_per_request']:.0f} / {b['vision_plus_prefill_ms']:.0f} = "
                  f"**{b['amdahl_ceiling']:.2f}×** (Amdahl ceiling for batching). Measured: {measured}.", ""]
    return lines


def plot(run: dict, out: Path) -> list[str]:
    if not plot_available():
        say("matplotlib is not installed: no plots")
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv for lv in run["levels"] if lv["ok"] and lv["series"] == CONFIGURED and lv["repeat"] == 0]
    if not levels:
        return []
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    c = [lv["concurrency"] for lv in levels]
    ax.plot(c, [lv["throughput_rps"] for lv in levels], "o-", color="#4c72b0", label="requests/s")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("requests/s", color="#4c72b0")
    ax.set_xscale("log", base=2)
    ax2 = ax.twinx()
    ax2.plot(c, [lv["latency_ms"]["p50"] for lv in levels], "s--", color="#c44e52", label="p50")
    ax2.plot(c, [lv["latency_ms"]["p99"] for lv in levels], "^:", color="#8c2d2d", label="p99")
    ax2.set_ylabel("latency ms (p50, p99)", color="#c44e52")
    ax.set_title(f"Serving {run['model']} ({run['backend']}) over gRPC")
    fig.tight_layout()
    name = f"serving_{run['model']}.png"
    fig.savefig(out / name)
    plt.close(fig)
    return [name]


# --- CLI --------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m benchmarks.serving                                  # default model, int8 bundle, 1/4/16\n"
               "  python -m benchmarks.serving --concurrency 1,4,8,16 --requests 64\n"
               "  python -m benchmarks.serving --model 256m --precision fp32 --config my-server.toml\n"
               "  python -m benchmarks.serving --model m256=/tmp/m256-int8 --concurrency 1,8 --requests 24 \\\n"
               "      --max-new-tokens 64 --repeat 2 --compare-unbatched    # batching on vs off, alternating\n"
               "  python -m benchmarks.serving --smoke                          # seconds: nano, torch, 1/2",
    )
    p.add_argument("--model", default="default", help="default, nano, 256m or NAME=MODEL_DIR (default: default)")
    p.add_argument("--precision", choices=PRECISIONS, default="int8",
                   help="torch: serve the model directory; fp32/int8/int4: serve its export bundle (default int8)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="server TOML passed to `medhallguard serve` (default benchmarks/serving.toml); "
                        "`none` for the server's defaults")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    p.add_argument("--requests", type=int, default=32, help="requests sent per level, after the warm-up (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="new tokens per request (default 16)")
    p.add_argument("--respect-eos", action="store_true", help="stop at end-of-sequence (answers of varying length)")
    p.add_argument("--overhead-pairs", type=int, default=10,
                   help="gRPC / in-process pairs for the overhead figure (default 10)")
    p.add_argument("--deadline-s", type=float, default=600.0, help="per-request gRPC deadline (default 600)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the concurrency levels this many times, in turn (default 1)")
    p.add_argument("--compare-unbatched", action="store_true",
                   help="also serve with [batching] enabled = false and run each level on it after the configured "
                        "server (both servers stay up; set [server] max_concurrency in --config for its parallelism)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="seconds: nano model, torch, concurrency 1,2, 4 requests")
    args = p.parse_args(argv)
    if args.smoke:
        if args.model == "default":
            args.model = "nano"
        args.precision = "torch" if "--precision" not in argv else args.precision
        args.concurrency = "1,2" if "--concurrency" not in argv else args.concurrency
        args.requests, args.max_new_tokens, args.overhead_pairs = 4, 4, 2
    try:
        args.levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency takes comma-separated integers, got {args.concurrency!r}")
    if min(args.levels) < 1 or args.requests < 1 or args.overhead_pairs < 1 or args.repeat < 1:
        p.error("--concurrency levels, --requests, --overhead-pairs and --repeat must be >= 1")
    if str(args.config).lower() == "none":
        args.config = None
    elif not args.config.is_file():
        p.error(f"--config {args.config} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from benchmarks.models import bundle, resolve
    from export.parity import phantom_png
    from guard.runtime import GuardConfig, load_guard
    from server.launch import served_process
    from training.data import DEFAULT_MEDHALLTUNE_DIR

    head = header("serving", argv)
    emit(head)
    model = resolve(args.model)
    from guard.manifest import is_bundle

    path = model.path if args.precision == "torch" or is_bundle(model.path) else bundle(model, args.precision)
    tables = server_tables(args.config, ignore_eos=not args.respect_eos)
    config_toml = to_toml(tables)
    series = {CONFIGURED: config_toml}
    if args.compare_unbatched:
        series[UNBATCHED] = to_toml(unbatched_tables(tables))
    image = phantom_png(1, size=256)
    os.environ.setdefault("MEDHALLGUARD_LOG_LEVEL", "WARNING")  # the child logs no line per request
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        processes = {}
        for name, text in series.items():
            config_path = Path(tmp) / f"server-{len(processes)}.toml"
            config_path.write_text(text)
            say(f"starting `medhallguard serve` on {path} ({name}) with {args.config or 'the default configuration'}")
            processes[name] = servers.enter_context(served_process(path, config_path, ready_timeout_s=600, log=say))
        address = processes[CONFIGURED][0]
        guard = load_guard(path, GuardConfig.from_dict({k: v for k, v in tables.items() if k != "server"}))
        say(f"gRPC overhead: {args.overhead_pairs} pairs of gRPC and in-process requests")
        overhead = _overhead(address, guard, image, args.overhead_pairs, args.max_new_tokens)
        emit({"bench": "serving", "event": "overhead", **overhead})
        backend = guard.backend.name
        reference = reference_answer_tokens(guard.prompter, DEFAULT_MEDHALLTUNE_DIR)
        if reference:
            emit({"bench": "serving", "event": "reference_answer_tokens", **reference})
        del guard
        levels = []
        for r in range(args.repeat):  # levels (and servers) in turn, so a change in machine load hits them all
            for c in args.levels:
                for name, (addr, proc) in processes.items():
                    say(f"{name} server, concurrency {c}: {args.requests} requests (load {load_average()[0]})")
                    lv = asyncio.run(_level(addr, image, c, args.requests, args.max_new_tokens, args.deadline_s,
                                            proc.pid))
                    levels.append({"series": name, "repeat": r, **lv})
                    emit({"bench": "serving", "event": "level", "model": model.label, **levels[-1]})
    batching = []
    for r in range(args.repeat):
        group = {name: [lv for lv in levels if lv["series"] == name and lv["repeat"] == r] for name in series}
        batching.append({"repeat": r, **batching_ceiling(group[CONFIGURED], group.get(UNBATCHED, []))})
    for b in batching:
        emit({"bench": "serving", "event": "ceiling", **b})
        if b["amdahl_ceiling"] is not None:
            say(f"repeat {b['repeat']}: Amdahl ceiling for batching "
                f"{b['amdahl_ceiling']:.2f}x (serial {b['serial_ms_per_request']:.0f} ms / vision + prefill "
                f"{b['vision_plus_prefill_ms']:.0f} ms); measured "
                + ", ".join(f"{ratio:.2f}x at {c}" for c, ratio in b["vs_serial"].items()))
    run = {"model": model.label, "path": str(path), "note": model.note, "backend": backend,
           "precision": args.precision, "config_toml": config_toml, "ignore_eos": not args.respect_eos,
           "max_new_tokens": args.max_new_tokens, "requests": args.requests, "repeat": args.repeat,
           "levels": levels, "batching": batching, "overhead": overhead, "reference_answer_tokens": reference,
           "load_average_end": load_average()}
    args.out.mkdir(parents=True, exist_ok=True)
    plots = plot(run, args.out)
    write_json(args.out / "serving.json", {"header": head, **run})
    report(head, run, args.out, plots)
    done("serving", args.out, plots=plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
