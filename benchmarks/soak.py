"""Fault and soak test: a real `medhallguard serve` process under a mixed load of good and bad requests.

    python benchmarks/soak.py                       # 2,000 requests at concurrency 32 on a fresh nano model
    python benchmarks/soak.py --requests 200 --model runs/nano --mix good=50,bad_image=30,cancelled=10,deadline=10

The server runs as a subprocess on a loopback port (server/launch.py). After a
warm-up of the same mix, the driver records the server's resident memory and
thread count (from /proc), sends `--requests` requests with `--concurrency` in
flight, lets them settle, and records both again. Each request belongs to one
category and must end with the status that category allows:

  good             Ask / AskStream / Score with a valid PNG, JPEG or DICOM       -> OK
  bad_image        corrupt PNG, truncated JPEG, garbage DICOM, wrong media type  -> INVALID_ARGUMENT
  cancelled        the client cancels mid-call (mid-stream, or while queued)     -> CANCELLED (OK if it finished first)
  deadline         a 1-5 ms deadline                                             -> DEADLINE_EXCEEDED (OK if it finished in time)
  unauthenticated  no token or a malformed `authorization` header                -> UNAUTHENTICATED
                   a token the server does not know                              -> PERMISSION_DENIED

The server runs with bearer-token auth (a fresh random token, passed through
$MEDHALLGUARD_AUTH_TOKENS; plaintext on loopback with `allow_insecure_auth`),
and every request outside `unauthenticated` carries the token. `--no-auth`
serves without auth; the mix may then not include `unauthenticated`.

The run passes when every status is allowed, the server process is still up
with health SERVING, a last good request succeeds, RSS grew by less than
`--max-rss-growth` (10%) from after warm-up to the end, the thread count did not
grow, and the server exits 0 on SIGTERM. It prints one JSON summary and exits 0
on a pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import secrets
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repo

CATEGORIES = ("good", "bad_image", "cancelled", "deadline", "unauthenticated")
DEFAULT_MIX = {"good": 40, "bad_image": 20, "cancelled": 15, "deadline": 15, "unauthenticated": 10}
"""Weights, not counts."""
ALLOWED = {
    "good": {"OK"},
    "bad_image": {"INVALID_ARGUMENT"},
    "cancelled": {"CANCELLED", "OK"},  # OK only when the call had finished before cancel() (recorded apart)
    "deadline": {"DEADLINE_EXCEEDED", "OK"},  # OK only if the server beat a 1-5 ms deadline
    "unauthenticated": {"UNAUTHENTICATED", "PERMISSION_DENIED"},  # narrowed per variant by ALLOWED_VARIANT
}
ALLOWED_VARIANT = {
    f"unauthenticated/{stream}{variant}": {code}
    for stream in ("", "stream_")
    for variant, code in (("no_token", "UNAUTHENTICATED"), ("malformed_header", "UNAUTHENTICATED"),
                          ("wrong_token", "PERMISSION_DENIED"))
}
SERVER_TOML = """\
# Written by benchmarks/soak.py: short answers, a queue deep enough for the client's concurrency.
[server]
max_concurrency = {max_concurrency}
max_queue = {max_queue}
default_deadline_s = 60.0
grace_s = 10.0
allow_insecure_auth = {auth}      # bearer tokens over plaintext: loopback only

[backend]
threads = {threads}

[decode]
max_new_tokens = {max_new_tokens}
"""


# --- request payloads ---------------------------------------------------------------------------


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@dataclass(frozen=True)
class Payloads:
    """Valid and broken images, made once per run from a seeded generator."""

    pngs: list[bytes]
    jpegs: list[bytes]
    dicom: bytes

    @classmethod
    def make(cls, seed: int) -> "Payloads":
        from pydicom.data import get_testdata_file  # files that ship inside pydicom's wheel

        rng = np.random.default_rng(seed)
        images = [rng.integers(0, 255, size=(int(h), int(w), 3), dtype=np.uint8)
                  for h, w in rng.integers(48, 160, size=(8, 2))]
        with open(get_testdata_file("CT_small.dcm"), "rb") as f:
            dicom = f.read()
        return cls([_encode(a, "PNG") for a in images], [_encode(a, "JPEG") for a in images], dicom)

    def bad(self, rng: random.Random) -> tuple[str, bytes, str]:
        """-> (variant, image bytes, media type) of an image the server must refuse with INVALID_ARGUMENT."""
        png, jpeg = rng.choice(self.pngs), rng.choice(self.jpegs)
        variant = rng.choice(("corrupt_png", "truncated_jpeg", "garbage_dicom", "wrong_media_type",
                              "mislabelled_png"))
        if variant == "corrupt_png":  # the signature and IHDR survive; the rest is noise
            return variant, png[:33] + rng.randbytes(len(png) - 33), "image/png"
        if variant == "truncated_jpeg":
            return variant, jpeg[: rng.randrange(2, len(jpeg) // 2)], "image/jpeg"
        if variant == "garbage_dicom":  # a DICOM preamble and marker, then noise
            return variant, bytes(128) + b"DICM" + rng.randbytes(rng.randrange(16, 4096)), "application/dicom"
        if variant == "wrong_media_type":
            return variant, png, rng.choice(("image/gif", "image/webp", "text/plain", ""))
        return variant, png, "image/jpeg"  # mislabelled: PNG bytes declared as JPEG


# --- one request per category -------------------------------------------------------------------


QUESTIONS = ("Is there a pleural effusion?", "Describe the findings.", "Is the heart size normal?",
             "Is there a nodule in the right upper zone?")


async def _status(coro) -> str:
    import grpc

    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e.code().name
    return "OK"


async def _good(stub, pb, payloads: Payloads, rng: random.Random, md) -> tuple[str, str]:
    question = rng.choice(QUESTIONS)
    variant = rng.choice(("ask_png", "ask_jpeg", "ask_dicom", "stream_png", "score_png"))
    if variant == "ask_dicom":
        image, media_type = payloads.dicom, "application/dicom"
    elif variant == "ask_jpeg":
        image, media_type = rng.choice(payloads.jpegs), "image/jpeg"
    else:
        image, media_type = rng.choice(payloads.pngs), "image/png"
    if variant == "score_png":
        request = pb.ScoreRequest(image=image, media_type=media_type, question=question, answer="No effusion.")
        return variant, await _status(stub.Score(request, timeout=60, metadata=md))
    request = pb.AskRequest(image=image, media_type=media_type, question=question)
    if variant == "stream_png":
        return variant, await _status(_drain(stub.AskStream(request, timeout=60, metadata=md)))
    return variant, await _status(stub.Ask(request, timeout=60, metadata=md))


async def _drain(call) -> int:
    return sum([1 async for _ in call])


async def _bad_image(stub, pb, payloads: Payloads, rng: random.Random, md) -> tuple[str, str]:
    variant, image, media_type = payloads.bad(rng)
    request = pb.AskRequest(image=image, media_type=media_type, question=rng.choice(QUESTIONS))
    return variant, await _status(stub.Ask(request, timeout=60, metadata=md))


async def _cancelled(stub, pb, payloads: Payloads, rng: random.Random, md) -> tuple[str, str]:
    """Mid-stream: cancel after the first message; unary: cancel 0-50 ms in (queued or decoding)."""
    request = pb.AskRequest(image=rng.choice(payloads.pngs), media_type="image/png", question=rng.choice(QUESTIONS))
    if rng.random() < 0.5:
        call, variant = stub.AskStream(request, timeout=60, metadata=md), "stream_after_first_message"
        async for _ in call:
            break
    else:
        call, variant = stub.Ask(request, timeout=60, metadata=md), "unary_after_delay"
        await asyncio.sleep(rng.uniform(0, 0.05))
    if not call.cancel():  # the call had already ended: report what it ended with
        return variant + "_finished_first", (await call.code()).name
    return variant, (await call.code()).name


async def _deadline(stub, pb, payloads: Payloads, rng: random.Random, md) -> tuple[str, str]:
    request = pb.AskRequest(image=rng.choice(payloads.pngs), media_type="image/png", question=rng.choice(QUESTIONS))
    return "ask_1_to_5_ms", await _status(stub.Ask(request, timeout=rng.uniform(0.001, 0.005), metadata=md))


async def _unauthenticated(stub, pb, payloads: Payloads, rng: random.Random, md) -> tuple[str, str]:
    """A good request with no token, a malformed `authorization` header, or a token the server does not know."""
    request = pb.AskRequest(image=rng.choice(payloads.pngs), media_type="image/png", question=rng.choice(QUESTIONS))
    variant = rng.choice(("no_token", "malformed_header", "wrong_token"))
    metadata = {"no_token": (), "malformed_header": (("authorization", "Basic dXNlcjpwYXNz"),),
                "wrong_token": (("authorization", f"Bearer {rng.randbytes(24).hex()}"),)}[variant]
    if rng.random() < 0.3:
        return "stream_" + variant, await _status(_drain(stub.AskStream(request, timeout=60, metadata=metadata)))
    return variant, await _status(stub.Ask(request, timeout=60, metadata=metadata))


SENDERS = {"good": _good, "bad_image": _bad_image, "cancelled": _cancelled, "deadline": _deadline,
           "unauthenticated": _unauthenticated}


# --- the load -----------------------------------------------------------------------------------


def plan(mix: dict[str, int], n: int, seed: int) -> list[str]:
    """n categories in proportion to the weights (largest remainders), shuffled with `seed`."""
    total = sum(mix.values())
    exact = {c: n * w / total for c, w in mix.items()}
    counts = {c: int(x) for c, x in exact.items()}
    for c in sorted(exact, key=lambda c: exact[c] - counts[c], reverse=True)[: n - sum(counts.values())]:
        counts[c] += 1
    order = [c for c, k in counts.items() for _ in range(k)]
    random.Random(seed).shuffle(order)
    return order


async def run_load(address: str, categories: list[str], concurrency: int, payloads: Payloads, seed: int,
                   token: str | None = None, progress=None) -> list[tuple[str, str, str]]:
    """Send one request per category with at most `concurrency` in flight -> [(category, variant, status)]."""
    import grpc

    from server.pb.medhallguard.v1 import guard_pb2 as pb
    from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc

    results: list[tuple[str, str, str]] = []
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    queue: asyncio.Queue = asyncio.Queue()
    for i, category in enumerate(categories):
        queue.put_nowait((i, category))

    async def worker(stub):
        while not queue.empty():
            i, category = queue.get_nowait()
            rng = random.Random(seed * 1_000_003 + i)
            variant, status = await SENDERS[category](stub, pb, payloads, rng, metadata)
            results.append((category, variant, status))
            if progress:
                progress()

    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.MedHallGuardStub(channel)
        await asyncio.gather(*(worker(stub) for _ in range(concurrency)))
    return results


async def check_serving(address: str, token: str | None) -> tuple[str, str]:
    """-> (health status name, status of one last good Ask)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from server.pb.medhallguard.v1 import guard_pb2 as pb
    from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                    timeout=10)
            health = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as e:
            health = f"unreachable ({e.code().name})"
        image = _encode(np.full((64, 64, 3), 128, np.uint8), "PNG")
        last = await _status(pb_grpc.MedHallGuardStub(channel).Ask(
            pb.AskRequest(image=image, media_type="image/png", question="Is there a pleural effusion?"), timeout=60,
            metadata=(("authorization", f"Bearer {token}"),) if token else ()))
    return health, last


# --- the server process -------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """Resident memory (bytes) and thread count of a live process, from /proc (Linux)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                fields[key] = int(value.split()[0])
    return {"rss_bytes": fields["VmRSS"] * 1024, "threads": fields["Threads"]}


class RssSampler:
    """Samples the server's RSS every `interval_s` in a background thread while the load runs."""

    def __init__(self, pid: int, interval_s: float = 1.0):
        import threading

        self.pid, self.interval_s, self.mib = pid, interval_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.mib.append(round(proc_status(self.pid)["rss_bytes"] / 2**20, 1))
            except (OSError, KeyError):  # the process is gone; the summary says so
                return

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def settle(pid: int, seconds: float) -> dict[str, int]:
    """Wait `seconds` for in-flight work (cancelled decodes, idle grpc threads) to finish, then sample."""
    time.sleep(seconds)
    return proc_status(pid)


def parse_mix(text: str, auth: bool = True) -> dict[str, int]:
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        if name not in CATEGORIES:
            raise ValueError(f"--mix: unknown category {name!r}; use {', '.join(CATEGORIES)}")
        if not weight.isdigit():
            raise ValueError(f"--mix: {part!r} needs a whole-number weight, e.g. {name}=10")
        mix[name] = int(weight)
    if mix.get("unauthenticated") and not auth:
        raise ValueError("--mix: `unauthenticated` needs the server's token auth; drop --no-auth or leave it out")
    if not any(mix.values()):
        raise ValueError("--mix: every weight is 0")
    return {k: v for k, v in mix.items() if v}


def make_model(root: Path) -> Path:
    """A random-init nano SmolVLM (`medhallguard init-model`); its answers mean nothing, which is fine here."""
    from training.init_model import init_model

    return Path(init_model("smolvlm", "nano", root / "nano-smolvlm", seed=0))


def soak(args, mix: dict[str, int], log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """`mix` is parse_mix(args.mix): category -> weight."""
    from server.launch import served_process

    payloads = Payloads.make(args.seed)
    token = None if args.no_auth else secrets.token_urlsafe(32)
    env = {"MEDHALLGUARD_AUTH_TOKENS": f"soak:{token}"} if token else {}
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        model = Path(args.model) if args.model else make_model(Path(tmp))
        config = Path(tmp) / "soak.toml"
        config.write_text(SERVER_TOML.format(max_concurrency=args.server_concurrency,
                                             max_queue=max(64, 2 * args.concurrency), threads=args.server_threads,
                                             max_new_tokens=args.max_new_tokens,
                                             auth="false" if args.no_auth else "true"))
        summary: dict = {"requests": args.requests, "concurrency": args.concurrency, "warmup_requests": args.warmup,
                         "mix": mix, "model": str(args.model or "random-init nano smolvlm (init-model)"),
                         "server": {"max_concurrency": args.server_concurrency, "threads": args.server_threads,
                                    "max_new_tokens": args.max_new_tokens},
                         "auth": "off (--no-auth)" if args.no_auth else "bearer token, plaintext on loopback"}
        failures: list[str] = []
        server_log = Path(args.server_log or Path(tmp) / "server.log")
        try:
            with open(server_log, "w") as log_file, \
                    served_process(model, config, log=log, token=token, env=env, stderr=log_file) as (address, proc):
                log(f"warm-up: {args.warmup} requests")
                asyncio.run(run_load(address, plan(mix, args.warmup, args.seed + 1), args.concurrency, payloads,
                                     args.seed + 1, token))
                before = settle(proc.pid, args.settle_s)
                log(f"after warm-up: rss {before['rss_bytes'] / 2**20:.1f} MiB, {before['threads']} threads; "
                    f"sending {args.requests} requests at concurrency {args.concurrency}")
                bar = _progress(args.requests)
                t0 = time.perf_counter()
                with RssSampler(proc.pid) as sampler:
                    results = asyncio.run(run_load(address, plan(mix, args.requests, args.seed), args.concurrency,
                                                   payloads, args.seed, token, progress=bar.update))
                duration_s = time.perf_counter() - t0
                bar.close()
                after = settle(proc.pid, args.settle_s)
                alive = proc.poll() is None
                health, last = asyncio.run(check_serving(address, token)) if alive else ("process exited", "-")
                summary.update(_tally(results, duration_s, before, after))
                summary["rss_mib"]["during_run_every_1s"] = sampler.mib
                summary.update(server_alive=alive, health_end=health, last_good_request=last)
        except RuntimeError as e:  # the server did not come up, or did not exit 0 on SIGTERM
            failures.append(str(e))
            summary["exit_on_sigterm"] = str(e)
        else:
            summary["exit_on_sigterm"] = 0
        summary["server_log_errors"] = _log_errors(server_log.read_text(errors="replace"))
    failures += _judge(summary, args.max_rss_growth)
    summary["failures"] = failures
    summary["passed"] = not failures
    return summary


def _tally(results, duration_s: float, before: dict, after: dict) -> dict:
    counts: dict[str, Counter] = defaultdict(Counter)
    variants: dict[str, Counter] = defaultdict(Counter)
    unexpected: Counter = Counter()
    for category, variant, status in results:
        counts[category][status] += 1
        variants[category][variant] += 1
        if status not in ALLOWED_VARIANT.get(f"{category}/{variant}", ALLOWED[category]):
            unexpected[f"{category}/{variant}: {status}"] += 1
    return {
        "sent": len(results),
        "duration_s": round(duration_s, 2),
        "requests_per_s": round(len(results) / duration_s, 1),
        "counts": {c: dict(sorted(v.items())) for c, v in sorted(counts.items())},
        "variants": {c: dict(sorted(v.items())) for c, v in sorted(variants.items())},
        "unexpected": dict(unexpected),
        "rss_mib": {"after_warmup": round(before["rss_bytes"] / 2**20, 1), "end": round(after["rss_bytes"] / 2**20, 1),
                    "growth": round(after["rss_bytes"] / before["rss_bytes"] - 1, 4)},
        "threads": {"after_warmup": before["threads"], "end": after["threads"]},
    }


def _log_errors(text: str, keep: int = 3) -> dict:
    """ERROR lines and tracebacks in the server's log: any is a bug (a crash, an INTERNAL, a leaked exception)."""
    lines = [line for line in text.splitlines() if " ERROR " in line or line.startswith("Traceback")]
    return {"count": len(lines), "first": lines[:keep]}


def _judge(summary: dict, max_rss_growth: float) -> list[str]:
    failures = []
    if summary["server_log_errors"]["count"]:
        failures.append(f"the server logged {summary['server_log_errors']['count']} errors or tracebacks, e.g. "
                        f"{summary['server_log_errors']['first'][0]!r}")
    if "sent" not in summary:
        return failures  # the server never served; that failure is already recorded
    if summary["sent"] != summary["requests"]:
        failures.append(f"only {summary['sent']} of {summary['requests']} requests finished")
    if summary["unexpected"]:
        failures.append(f"{sum(summary['unexpected'].values())} responses with a status their category does not "
                        f"allow: {summary['unexpected']}")
    if not summary["server_alive"]:
        failures.append("the server process died during the run")
    if summary["health_end"] != "SERVING":
        failures.append(f"health at the end is {summary['health_end']}, not SERVING")
    if summary["last_good_request"] != "OK":
        failures.append(f"a good request after the run got {summary['last_good_request']}")
    if summary["rss_mib"]["growth"] >= max_rss_growth:
        failures.append(f"RSS grew {summary['rss_mib']['growth']:.1%} after warm-up (limit {max_rss_growth:.0%})")
    if summary["threads"]["end"] > summary["threads"]["after_warmup"]:
        failures.append(f"threads went from {summary['threads']['after_warmup']} to {summary['threads']['end']}")
    return failures


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # serving-only installs: no bar
        class _Quiet:
            def update(self, n=1): ...
            def close(self): ...
        return _Quiet()
    return tqdm(total=total, unit="req", file=sys.stderr, mininterval=2.0, disable=not sys.stderr.isatty())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/soak.py",
        description=__doc__.split("\n\n")[0],
        epilog=(
            "examples:\n"
            "  python benchmarks/soak.py                                  # full size: 2,000 requests, concurrency 32\n"
            "  python benchmarks/soak.py --requests 200 --warmup 40       # a quick check\n"
            "  python benchmarks/soak.py --model bundles/nano-fp32        # serve an export bundle (onnxruntime)\n"
            "  python benchmarks/soak.py --mix good=1,bad_image=1         # only these two categories\n\n"
            "categories: good -> OK; bad_image -> INVALID_ARGUMENT; cancelled -> CANCELLED;\n"
            "deadline -> DEADLINE_EXCEEDED; unauthenticated -> UNAUTHENTICATED (wrong token: PERMISSION_DENIED)\n"
            "exit status: 0 when every check passed, 1 otherwise; the JSON summary goes to stdout"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--requests", type=int, default=2000, help="requests in the measured run (default 2000)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once (default 32)")
    p.add_argument("--warmup", type=int, default=200, help="requests of the same mix before measuring (default 200)")
    p.add_argument("--mix", default=",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items()),
                   help=f"category weights (default {','.join(f'{k}={v}' for k, v in DEFAULT_MIX.items())})")
    p.add_argument("--model", metavar="DIR",
                   help="model directory or export bundle to serve (default: a fresh random-init nano model)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="the server's [decode] max_new_tokens (default 8)")
    p.add_argument("--server-concurrency", type=int, default=2, help="the server's max_concurrency (default 2)")
    p.add_argument("--server-threads", type=int, default=1, help="the server's [backend] threads (default 1)")
    p.add_argument("--settle-s", type=float, default=3.0,
                   help="seconds to let requests settle before sampling RSS and threads (default 3)")
    p.add_argument("--max-rss-growth", type=float, default=0.10,
                   help="largest allowed RSS growth after warm-up, as a fraction (default 0.10)")
    p.add_argument("--server-log", type=Path, metavar="FILE", help="keep the server's log here (default: discarded)")
    p.add_argument("--no-auth", action="store_true",
                   help="serve without bearer-token auth (then the mix cannot include unauthenticated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, metavar="FILE.json", help="also write the summary here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("error: the soak test reads the server's memory and threads from /proc (Linux only)", file=sys.stderr)
        return 2
    try:
        mix = parse_mix(args.mix, auth=not args.no_auth)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = soak(args, mix)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
