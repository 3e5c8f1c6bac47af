"""The fault and soak test (benchmarks/soak.py), small: a real `medhallguard serve` under a mixed load.

`make soak` runs the full size (2,000 requests at concurrency 32); this runs a
short version of the same driver through its CLI, so every check it makes
(statuses per category, the server up and SERVING, no errors in its log, RSS
and threads after warm-up) is part of `make test`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
def test_small_soak_gets_only_allowed_statuses_and_leaves_the_server_healthy(nano_models, tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--model", str(nano_models["smolvlm"]),
         "--requests", "160", "--warmup", "64", "--concurrency", "32", "--settle-s", "2", "--out", str(out),
         # RSS moves by tens of MiB as the cyclic collector runs (see README, Soak and fuzz); the 10% bound
         # is for the full run (`make soak`), this short one only catches gross growth.
         "--max-rss-growth", "0.25"],
        capture_output=True, text=True, timeout=170,
    )
    summary = json.loads(out.read_text())
    assert proc.returncode == 0, (summary["failures"], proc.stderr[-3000:])
    assert summary["passed"] and summary["sent"] == 160
    assert set(summary["counts"]) == {"good", "bad_image", "cancelled", "deadline", "unauthenticated"}
    assert set(summary["counts"]["unauthenticated"]) <= {"UNAUTHENTICATED", "PERMISSION_DENIED"}
    assert summary["counts"]["good"] == {"OK": summary["counts"]["good"]["OK"]}
    assert summary["counts"]["bad_image"] == {"INVALID_ARGUMENT": summary["counts"]["bad_image"]["INVALID_ARGUMENT"]}
    assert summary["health_end"] == "SERVING" and summary["exit_on_sigterm"] == 0
    assert summary["server_log_errors"]["count"] == 0
    assert summary["threads"]["end"] <= summary["threads"]["after_warmup"]


def test_soak_refuses_the_unauthenticated_category_without_auth():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--no-auth",
                           "--mix", "good=1,unauthenticated=1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unauthenticated" in proc.stderr and "--no-auth" in proc.stderr


def test_soak_plan_splits_requests_by_weight_exactly():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from soak import plan
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    order = plan({"good": 40, "bad_image": 20, "cancelled": 15, "deadline": 15, "unauthenticated": 10}, 2000, seed=0)
    assert len(order) == 2000
    assert {c: order.count(c) for c in set(order)} == {"good": 800, "bad_image": 400, "cancelled": 300,
                                                        "deadline": 300, "unauthenticated": 200}
    assert order != sorted(order)  # shuffled
