"""What the three benchmarks share: JSON lines, the run's header, statistics, memory bandwidth, reports.

Every benchmark prints one JSON object per line on stdout (what a script reads)
and progress in plain words on stderr (what a person reads), and writes
`<name>.json` (every figure) and `<name>.md` (the tables) under the results
directory. Nothing here imports torch or onnxruntime.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def emit(record: dict) -> None:
    """One JSON line on stdout."""
    print(json.dumps(record, default=_jsonable), flush=True)


def say(message: str) -> None:
    """Progress for a person, on stderr."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def header(bench: str, argv: list[str]) -> dict:
    """Where and when the run happened, and how busy the machine was when it started."""
    return {
        "bench": bench,
        "event": "header",
        "command": " ".join(["python -m benchmarks." + bench, *argv]),
        "utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "git_commit": _git_commit(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "versions": _versions(),
    }


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: above the core count, timings are inflated and noisy."""
    return [round(x, 2) for x in os.getloadavg()]


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("numpy", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "grpcio", "tensorrt"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def stats(values: list[float]) -> dict:
    """p50/p95/p99 (linear interpolation), mean, min, max and n. With n < 100, p99 is close to the max."""
    a = np.asarray(values, np.float64)
    if a.size == 0:
        return {"n": 0}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"n": int(a.size), "p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max())}


class BandwidthMeter:
    """Memory bandwidth in GB/s (1e9 bytes), with `threads` threads each on its own slice of one array.

    - copy: `np.copyto` of a float32 array; bytes read plus bytes written;
    - read: `np.add.reduce` (a sum) of the same array; bytes read.
    The arrays are far larger than any cache and are allocated and touched once,
    so no sample pays for page faults. numpy releases the GIL in both loops, so
    the threads run in parallel. A sample's `gbps` is the larger of the two.
    """

    def __init__(self, threads: int, megabytes: int = 256):
        n = megabytes * 1024 * 1024 // 4
        self.threads, self.megabytes = threads, megabytes
        self.src = np.ones(n, np.float32)
        self.dst = np.zeros(n, np.float32)
        self.slices = [slice(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
        self.method = (f"numpy, {threads} threads on disjoint slices of a {megabytes} MiB float32 array: "
                       "copy = np.copyto (bytes read + written), read = np.add.reduce (bytes read); "
                       "a sample is the larger of the two")

    def _timed(self, work, repeats: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            workers = [threading.Thread(target=work, args=(s,)) for s in self.slices]
            t = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = min(best, time.perf_counter() - t)
        return best

    def sample(self, repeats: int = 1) -> dict:
        """Best of `repeats` for each kind -> {copy_gbps, read_gbps, gbps}."""
        copy_s = self._timed(lambda s: np.copyto(self.dst[s], self.src[s]), repeats)
        read_s = self._timed(lambda s: np.add.reduce(self.src[s]), repeats)
        copy, read = 2 * self.src.nbytes / copy_s / 1e9, self.src.nbytes / read_s / 1e9
        return {"copy_gbps": round(copy, 2), "read_gbps": round(read, 2), "gbps": round(max(copy, read), 2)}


def subset(parser, text: str, choices: tuple[str, ...], noun: str) -> list[str]:
    """Comma-separated `text` -> the names it gives, in `choices` order; an unknown name is a usage error."""
    names = text.split(",")
    unknown = set(names) - set(choices)
    if unknown:
        parser.error(f"unknown {noun}(s) {sorted(unknown)}; choose from {','.join(choices)}")
    return [c for c in choices if c in names]


def done(bench: str, out: Path, **extra) -> None:
    """The run's last JSON line (where the report and the figures went), and the same in words."""
    emit({"bench": bench, "event": "done", "report": str(out / f"{bench}.md"), "json": str(out / f"{bench}.json"),
          **extra})
    say(f"wrote {out / f'{bench}.md'}")


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def md_table(columns: list[str], rows: list[list]) -> str:
    """A Markdown table; floats are written by the caller."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_lines(head: dict, load_end: list[float] | None = None) -> list[str]:
    """The report's opening lines: command, machine, load."""
    load = f"load average (1/5/15 min) {head['load_average']} at the start"
    if load_end is not None:
        load += f", {load_end} at the end"
    # Before the run, any load is other jobs'; at the end, the benchmark's own threads count too.
    cores = head["cpu_count"] or 1
    busy = head["load_average"][0] > 0.5 * cores or (load_end is not None and load_end[0] > 1.25 * cores)
    lines = [
        f"Command: `{head['command']}`",
        "",
        f"Run {head['utc']} UTC at commit {head['git_commit']} on {head['cpu_count']} × {head['cpu']}; {load}.",
    ]
    if busy:
        lines.append("**The machine was busy during this run** (other jobs): absolute times are inflated and noisy; "
                     "the ratios measured side by side in the same run are the figures to compare.")
    versions = ", ".join(f"{k} {v}" for k, v in head["versions"].items())
    lines += [f"Versions: Python {head['python']}, {versions}.", ""]
    return lines


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
