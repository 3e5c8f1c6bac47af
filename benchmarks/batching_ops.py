"""What batching can gain on this machine: the CPU time of each backend call, alone and in a batch.

Runs an export bundle's vision encoder (1 image, then a batch), one prefill,
and one decode step for 1 sequence and for a batch, in this process, and
prints one JSON line per call with its process CPU time (all threads; the
best of a few runs). CPU time, unlike wall time, stays meaningful on a
machine that other jobs share.

    python benchmarks/batching_ops.py BUNDLE [--batch 8] [--threads 2] [--prompt-tokens 170]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="export bundle directory")
    p.add_argument("--batch", type=int, default=8, help="batch size to compare with 1 (default 8)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--prompt-tokens", type=int, default=170, help="prompt length, image tokens included (default 170)")
    args = p.parse_args(argv)

    from guard.backends import load_backend

    b = load_backend("onnxruntime", args.bundle, threads=args.threads)
    px, d, s = b.spec.preprocess.image_size, b.spec.hidden_size, args.prompt_tokens
    rng = np.random.default_rng(0)
    for n in (1, args.batch):
        pixels = rng.random((n, 3, px, px), dtype=np.float32)
        _report("vision", n, _cpu_ms(lambda: b.encode_image(pixels), repeats=2 if n == 1 else 1) / n, "per image")
    embeds = rng.standard_normal((1, s, d), dtype=np.float32) * 0.02
    prefill = lambda: b.forward(embeds, np.ones((1, s), np.int64), np.arange(s)[None], b.new_cache(1))  # noqa: E731
    _report("prefill", 1, _cpu_ms(prefill), f"{s} tokens")
    _, cache1 = prefill()
    for n in (1, args.batch):
        cache, step = b.merge_caches([cache1] * n), rng.standard_normal((n, 1, d), dtype=np.float32) * 0.02
        mask, pos = np.ones((n, s + 1), np.int64), np.full((n, 1), s)
        _report("decode_step", n, _cpu_ms(lambda: b.forward(step, mask, pos, cache), repeats=5), "per step")
    return 0


def _cpu_ms(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times) * 1e3


def _report(call: str, batch: int, cpu_ms: float, unit: str) -> None:
    print(json.dumps({"call": call, "batch": batch, "cpu_ms": round(cpu_ms, 1), "unit": unit}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
