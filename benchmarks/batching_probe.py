"""Serial vs concurrent throughput of a real `medhallguard serve` on loopback, with and without batching.

For each run it starts the server as a child process (server/launch.py) with a
generated config, warms it up, then keeps CONCURRENCY clients busy with Ask
calls (closed loop: each client sends its next request when the last one
returns) until REQUESTS have completed. It prints one JSON line per run
(requests/s, tokens/s, latency p50/p90/p99, the server's CPU seconds, mean
timings) and a last line with the ratio of the batched throughput to the
serial rate, by wall clock and per server CPU second (the second is the
fairer one on a machine that other jobs share: there, more threads get more
of the CPU). The serial
run has batching off: one request at a time on the unbatched path.
Answers are fixed length (`ignore_eos`), so every request does the same work.

    python benchmarks/batching_probe.py BUNDLE_OR_MODEL_DIR [--concurrency 8] [--requests 48]
    python benchmarks/batching_probe.py /tmp/m256-int8 --max-new-tokens 64 --repeat 2 --unbatched-requests 0
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

QUESTIONS = (
    "Is there a nodule in the right lung?",
    "What is the size of the mass in the left upper zone?",
    "Describe the findings.",
    "Is there a pleural effusion at the left lung base, and if so, how large is it compared with the right side?",
    "Are there any rib fractures?",
    "What abnormality is shown in this image and where is it located?",
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    images = [_png(seed, args.image_px) for seed in range(16)]
    ratios, cpu_ratios = [], []
    for r in range(args.repeat):  # serial and concurrent runs alternate, so a change in machine load hits both
        serial = _run(args, "serial", False, 1, args.serial_requests, images)
        print(json.dumps({**serial, "repeat": r}), flush=True)
        batched = _run(args, f"batched-c{args.concurrency}", True, args.concurrency, args.requests, images)
        print(json.dumps({**batched, "repeat": r}), flush=True)
        ratios.append(batched["requests_per_s"] / serial["requests_per_s"])
        cpu_ratios.append(batched["requests_per_server_cpu_s"] / serial["requests_per_server_cpu_s"])
    summary = {"throughput_vs_serial": [round(x, 2) for x in ratios], "median": round(statistics.median(ratios), 2),
               "per_cpu_s_vs_serial": [round(x, 2) for x in cpu_ratios]}
    if args.unbatched_requests:
        unbatched = _run(args, f"unbatched-c{args.concurrency}", False, args.concurrency, args.unbatched_requests,
                         images)
        print(json.dumps(unbatched), flush=True)
        summary["unbatched_vs_serial"] = round(unbatched["requests_per_s"] / serial["requests_per_s"], 2)
    print(json.dumps(summary), flush=True)
    return 0


def _run(args, name: str, batching: bool, concurrency: int, requests: int, images: list[bytes]) -> dict:
    import grpc

    from server.launch import served_process
    from server.pb.medhallguard.v1 import guard_pb2 as pb
    from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "probe.toml"
        config.write_text(_config(args, batching, concurrency))
        with served_process(args.model, config, ready_timeout_s=600) as (address, server), \
                grpc.insecure_channel(address) as channel:
            stub = pb_grpc.MedHallGuardStub(channel)

            def ask(i: int) -> tuple[float, pb.AskResponse]:
                req = pb.AskRequest(image=images[i % len(images)], media_type="image/png",
                                    question=QUESTIONS[i % len(QUESTIONS)],
                                    generation=pb.GenerationSettings(max_new_tokens=args.max_new_tokens))
                t = time.perf_counter()
                reply = stub.Ask(req, timeout=600)
                return time.perf_counter() - t, reply

            for i in range(2):  # the server warmed itself; these warm the client path and the ORT arenas
                ask(i)
            latencies, replies, lock, counter = [], [], threading.Lock(), iter(range(requests))

            def client() -> None:
                while True:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    latency, reply = ask(i)
                    with lock:
                        latencies.append(latency)
                        replies.append(reply)

            cpu0, t0 = _cpu_s(server.pid), time.perf_counter()
            clients = [threading.Thread(target=client) for _ in range(concurrency)]
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            wall, cpu = time.perf_counter() - t0, _cpu_s(server.pid) - cpu0
    tokens = sum(r.num_tokens for r in replies)
    ms = lambda q: round(float(np.percentile(latencies, q)) * 1e3, 1)  # noqa: E731
    mean = lambda field: round(statistics.fmean(getattr(r.timings, field) for r in replies), 1)  # noqa: E731
    return {
        "run": name, "batching": batching, "concurrency": concurrency, "requests": requests,
        "max_new_tokens": args.max_new_tokens, "wall_s": round(wall, 2),
        "requests_per_s": round(requests / wall, 3), "tokens_per_s": round(tokens / wall, 1),
        "server_cpu_s": round(cpu, 1), "requests_per_server_cpu_s": round(requests / cpu, 4),
        "latency_ms": {"p50": ms(50), "p90": ms(90), "p99": ms(99), "max": ms(100)},
        "mean_timings_ms": {f: mean(f) for f in ("vision_ms", "prefill_ms", "decode_ms", "total_ms")},
        "backend": replies[0].backend, "model_id": replies[0].model_id,
    }


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used (Linux /proc)."""
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _config(args, batching: bool, concurrency: int) -> str:
    return f"""
[server]
max_concurrency = {concurrency}
max_queue = {concurrency * 2}
default_deadline_s = 600.0

[batching]
enabled = {str(batching).lower()}
max_batch_size = {max(concurrency, 1)}
max_wait_ms = {args.max_wait_ms}

[backend]
threads = {args.threads}

[decode]
ignore_eos = true

[policy]
allow_untrained_heads = true
withhold_answer_on_abstain = false
"""


def _png(seed: int, px: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (px, px), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="export bundle or model directory to serve")
    p.add_argument("--concurrency", type=int, default=8, help="clients in the concurrent runs (default 8)")
    p.add_argument("--requests", type=int, default=48, help="requests per concurrent run (default 48)")
    p.add_argument("--serial-requests", type=int, default=12, help="requests in the serial run (default 12)")
    p.add_argument("--unbatched-requests", type=int, default=16,
                   help="requests in a concurrent run with batching off, for reference; 0 skips it (default 16)")
    p.add_argument("--repeat", type=int, default=1, help="serial + concurrent pairs to run, alternating (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer, EOS ignored (default 64)")
    p.add_argument("--threads", type=int, default=2, help="backend intra-op threads (default 2)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="[batching] max_wait_ms (default 5)")
    p.add_argument("--image-px", type=int, default=512, help="side of the random test images (default 512)")
    return p


if __name__ == "__main__":
    sys.exit(main())
