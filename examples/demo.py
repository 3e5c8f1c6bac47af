"""`make demo`: serve the default model on loopback, ask one question about a held-out image, shut down.

Steps: build the default model if it is not cached yet (`medhallguard build-default`,
about 12 minutes on 2 cores, once), start `medhallguard serve` on an ephemeral
loopback port, ask a hallucination-inducing question about a PhantomVQA image
the model never saw in training, print the answer with its verdict and scores
next to the exact reference answer, then SIGTERM the server and check that it
drained and exited 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.launch import cli_path, served  # noqa: E402
from training.build_default import cache_root, ensure_default  # noqa: E402


def sample_question() -> dict:
    """A held-out PhantomVQA question whose premise is false (the image shows no such thing)."""
    data = cache_root() / "default-build" / "data" / "phantom"
    rows = json.loads((data / "heldout.json").read_text())
    row = next(r for r in rows if r["kind"] == "absent_finding")
    return {"image": data / "images" / row["image"], "question": row["conversations"][0]["value"].replace("<image>", "").strip(),
            "reference": row["conversations"][1]["value"]}


def main() -> int:
    model = ensure_default()
    sample = sample_question()
    with served(model, ROOT / "examples" / "demo.toml") as address:
        print(f"[demo] server is up on {address}")
        print(f"[demo] image     {sample['image'].name} (held out: never seen in training)")
        print(f"[demo] question  {sample['question']}")
        print(f"[demo] reference {sample['reference']}\n", flush=True)
        t = time.perf_counter()
        ask = subprocess.run([str(cli_path()), "ask", "--server", address, "--image", str(sample["image"]), sample["question"]])
        print(f"\n[demo] ask finished in {time.perf_counter() - t:.1f} s with exit code {ask.returncode}", flush=True)
    print("[demo] server shut down after SIGTERM with exit code 0")
    return ask.returncode


if __name__ == "__main__":
    sys.exit(main())
