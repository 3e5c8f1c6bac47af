"""`make demo`: serve a model on loopback, ask one question about a sample image, shut down.

Steps: build the demo model if it is not cached yet, start `medhallguard serve`
on an ephemeral loopback port, ask about a real CT slice (a DICOM file that
pydicom ships), print the answer with its verdict and scores, then SIGTERM the
server and check that it drained and exited 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Is there a nodule in the left lung on this CT slice?"


def cache_dir() -> Path:
    base = os.environ.get("MEDHALLGUARD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medhallguard"
    return Path(base)


def demo_model() -> Path:
    """The random-init nano SmolVLM; its answers mean nothing until it is trained."""
    from training.init_model import init_model

    model = cache_dir() / "models" / "smolvlm-nano-init"
    if not (model / "guard_heads.safetensors").is_file():
        print(f"[demo] building the demo model in {model} (random init: its answers mean nothing) ...", flush=True)
        init_model("smolvlm", "nano", model)
    return model


def sample_image() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm", download=False))


def main() -> int:
    cli = Path(sys.executable).with_name("medhallguard")
    model, image = demo_model(), sample_image()
    server = subprocess.Popen(
        [str(cli), "serve", "--model", str(model), "--config", str(ROOT / "examples/demo.toml"), "--address", "127.0.0.1:0"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = server.stdout.readline().strip()  # "serving on HOST:PORT"
        if not line.startswith("serving on "):
            print(f"[demo] the server did not start (first line: {line!r}); see its log above", file=sys.stderr)
            return 1
        address = line.removeprefix("serving on ")
        print(f"[demo] server is up on {address}; asking about {image.name} (a CT slice, DICOM)", flush=True)
        t = time.perf_counter()
        ask = subprocess.run(
            [str(cli), "ask", "--server", address, "--wait-ready", "60", "--image", str(image), QUESTION]
        )
        print(f"[demo] ask finished in {time.perf_counter() - t:.1f} s with exit code {ask.returncode}", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    print(f"[demo] server shut down after SIGTERM with exit code {code}")
    return ask.returncode or code


if __name__ == "__main__":
    sys.exit(main())
