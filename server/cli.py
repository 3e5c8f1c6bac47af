"""`medhallguard`: serve the guard over gRPC, or ask it a question (remotely or in-process).

Parsing stays light: torch, transformers and the runtime are imported inside
the subcommands that need them, so `medhallguard --help` and
`medhallguard ask --server ...` start fast on a machine with no torch.
Subcommands that live in other packages are listed in `_EXTERNAL`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path

# --- subcommands owned by other packages ------------------------------------
# name -> ("module:function", one-line help). function(subparsers) must call
# subparsers.add_parser(name, ...) and set_defaults(func=callable(args) -> int).
# The module is imported only when its subcommand is run (or asked for --help);
# a missing module is skipped, so a serving-only install simply lacks the command.
_EXTERNAL = {
    "init-model": ("training.init_model:add_parser", "write a random-init model directory (for tests and plumbing)"),
    "train": ("training.train:add_parser", "fine-tune a model (LoRA or full) on MedHallTune-format data and fit its guard heads"),
    "build-default": ("training.build_default:add_parser", "train the default nano model and its baseline from scratch"),
    "eval-default": ("training.evaluate:add_parser", "report the default model and baseline on held-out data, through gRPC"),
    "export": ("export.onnx_export:add_parser", "export the model to ONNX graphs plus manifest.json"),
    "eval": ("evaluation.cli:add_parser", "answer MedHallTune-format questions: upload file, reference and guard metrics"),
}

_EXIT_CODES = {"INVALID_ARGUMENT": 2, "UNAVAILABLE": 3, "UNAUTHENTICATED": 4, "PERMISSION_DENIED": 4}  # else 1
_SERVICE = "medhallguard.v1.MedHallGuard"
_CLIENT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class _Failure(Exception):
    """A failed call, as a status code name and details (from gRPC or the in-process runtime)."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code = code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args) or 0
    except _Failure as e:
        print(f"error: {e}", file=sys.stderr)
        return _EXIT_CODES.get(e.code, 1)
    except KeyboardInterrupt:
        return 130


def build_parser(argv: list[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medhallguard",
        description="Serve a medical vision-language model with a hallucination guard on every answer.",
        epilog=(
            "examples:\n"
            "  medhallguard serve --model runs/smolvlm --config examples/demo.toml\n"
            '  medhallguard ask --server 127.0.0.1:50051 --image chest.png "Is there a pleural effusion?"\n'
            "  medhallguard info --server 127.0.0.1:50051 --json\n"
            "\nrun `medhallguard COMMAND --help` for the options of each command"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_serve(sub)
    _add_ask(sub)
    _add_score(sub)
    _add_info(sub)
    command = next((a for a in argv if not a.startswith("-")), None)
    for name, (target, help_text) in _EXTERNAL.items():
        module, _, function = target.partition(":")
        if not _module_exists(module):
            continue
        if name == command:
            getattr(importlib.import_module(module), function)(sub)
        else:  # listed in --help without importing the (possibly heavy) module
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


# --- serve ------------------------------------------------------------------


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="load a model, warm it up and serve it over gRPC until SIGTERM/SIGINT",
        description=(
            "Load the model and its guard heads, start the gRPC server (MedHallGuard, health, reflection),\n"
            "warm up, then serve until SIGTERM or SIGINT; in-flight requests get --grace-s to finish.\n"
            "The first line on stdout is 'serving on HOST:PORT' with the real port (useful with port 0);\n"
            "health turns SERVING once the warm-up has finished.\n\n"
            "Settings come from the [server] table of --config, then environment variables, then flags."
        ),
        epilog=(
            "environment variables:\n"
            "  MEDHALLGUARD_MODEL      model directory or export bundle (--model)\n"
            "  MEDHALLGUARD_CONFIG     TOML config file (--config)\n"
            "  MEDHALLGUARD_ADDRESS    HOST:PORT to listen on (--address)\n"
            "  MEDHALLGUARD_LOG_LEVEL  DEBUG, INFO, WARNING or ERROR (--log-level)\n"
            "  MEDHALLGUARD_LOG_FORMAT text or json (--log-format)\n"
            "  MEDHALLGUARD_AUTH_TOKENS  bearer tokens, comma-separated CLIENT_NAME:TOKEN (never a flag)\n\n"
            "examples:\n"
            "  medhallguard serve --model runs/smolvlm --config examples/demo.toml\n"
            "  medhallguard serve --model runs/smolvlm --address 127.0.0.1:0   # prints the port it got\n"
            "  medhallguard serve --bundle bundles/smolvlm-int8   # onnxruntime, no torch needed\n"
            "  medhallguard serve --model runs/smolvlm --port 0 --max-concurrency 4 --max-queue 16\n"
            "  medhallguard serve --model runs/smolvlm --tls-cert server.pem --tls-key server.key \\\n"
            "      --tls-client-ca clients-ca.pem --auth-tokens-file /etc/medhallguard/tokens \\\n"
            "      --metrics-address 0.0.0.0:9464 --audit-log /var/log/medhallguard/audit.jsonl --log-format json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR",
                        help="model directory with its guard heads, or an export bundle (default: $MEDHALLGUARD_MODEL)")
    source.add_argument("--bundle", metavar="DIR",
                        help="export bundle from `medhallguard export`, served by onnxruntime (no torch needed)")
    p.add_argument("--config", metavar="FILE.toml",
                   help="deployment config: [server], [backend], [decode], [policy], [limits]")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="where to listen (default 127.0.0.1:50051; port 0 picks a free port)")
    p.add_argument("--port", type=int, metavar="N", help="replace the port of the address (0 picks a free port)")
    p.add_argument("--max-concurrency", type=int, metavar="N", help="requests computing at once (default 2)")
    p.add_argument("--max-queue", type=int, metavar="N",
                   help="requests waiting beyond those; more get RESOURCE_EXHAUSTED (default 8)")
    p.add_argument("--default-deadline-s", type=float, metavar="S",
                   help="deadline for requests that send none (default 120)")
    p.add_argument("--max-message-bytes", type=int, metavar="N", help="largest gRPC message in bytes (default 32 MiB)")
    p.add_argument("--max-question-chars", type=int, metavar="N", help="longest question accepted (default 4000)")
    p.add_argument("--grace-s", type=float, metavar="S", help="shutdown grace for in-flight requests (default 10)")
    p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="default: $MEDHALLGUARD_LOG_LEVEL or INFO")
    p.add_argument("--log-format", choices=("text", "json"),
                   help="json: one object per line with the request id (default: $MEDHALLGUARD_LOG_FORMAT or text)")
    sec = p.add_argument_group("security (see README: Security)")
    sec.add_argument("--tls-cert", metavar="PEM", help="server certificate chain; with --tls-key turns TLS on")
    sec.add_argument("--tls-key", metavar="PEM", help="the server certificate's private key")
    sec.add_argument("--tls-client-ca", metavar="PEM",
                     help="CA that signs client certificates: turns mutual TLS on (clients must present one)")
    sec.add_argument("--auth-tokens-file", metavar="FILE",
                     help="bearer tokens, one CLIENT_NAME:TOKEN per line; turns auth on (also $MEDHALLGUARD_AUTH_TOKENS)")
    sec.add_argument("--insecure-auth", dest="allow_insecure_auth", action="store_const", const=True,
                     help="allow bearer tokens without TLS (clear text): loopback tests only")
    obs = p.add_argument_group("observability and audit (see README: Observability, Audit log)")
    obs.add_argument("--metrics-address", metavar="HOST:PORT",
                     help="serve Prometheus /metrics over HTTP here (default: off; port 0 picks one)")
    obs.add_argument("--audit-log", metavar="FILE.jsonl",
                     help="write one fsync'd JSON line per request here (default: off)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from server import main as server_main

    overrides = {
        name: getattr(args, name)
        for name in ("address", "max_concurrency", "max_queue", "default_deadline_s", "max_message_bytes",
                     "max_question_chars", "grace_s", "tls_cert", "tls_key", "tls_client_ca", "auth_tokens_file",
                     "allow_insecure_auth", "metrics_address", "audit_log")
    }
    try:
        return server_main.serve(args.model, args.config, overrides, port=args.port, log_level=args.log_level,
                                 bundle=args.bundle, log_format=args.log_format)
    except (ValueError, OSError) as e:  # bad config, unreadable file, port in use
        raise _Failure("INVALID_ARGUMENT" if isinstance(e, ValueError) else "UNAVAILABLE", str(e)) from None
    except Exception as e:
        from guard.errors import GuardError

        if isinstance(e, GuardError):  # e.g. ModelLoadError: say what is wrong with the model dir
            raise _Failure(_status_name(e), str(e)) from None
        raise


# --- ask / score / info -----------------------------------------------------


def _add_target(p, what: str) -> None:
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--server", metavar="HOST:PORT", help=f"{what} a running server over gRPC")
    target.add_argument("--model", metavar="DIR", help=f"{what} in-process: load the model here, no server")
    target.add_argument("--bundle", metavar="DIR", help=f"{what} in-process with an export bundle (onnxruntime)")
    p.add_argument("--config", metavar="FILE.toml",
                   help="with --model/--bundle: deployment config ([backend], [decode], [policy], [limits])")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="deadline in seconds (default: the server's default_deadline_s)")
    p.add_argument("--wait-ready", type=float, default=0.0, metavar="S",
                   help="with --server: first wait up to S seconds for health to report SERVING")
    p.add_argument("--json", action="store_true", help="print one JSON object (proto field names) instead of a layout")
    conn = p.add_argument_group("connecting to a secured --server (see README: Security)")
    conn.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CA roots")
    conn.add_argument("--ca-cert", metavar="PEM", help="use TLS, trusting this CA (implies --tls)")
    conn.add_argument("--client-cert", metavar="PEM", help="client certificate for mutual TLS (with --client-key)")
    conn.add_argument("--client-key", metavar="PEM", help="the client certificate's private key")
    conn.add_argument("--token-file", metavar="FILE", help="file whose first line is the bearer token to send")


def _add_image(p) -> None:
    p.add_argument("--image", required=True, type=Path, metavar="FILE", help="PNG, JPEG or DICOM file")
    p.add_argument("--media-type", metavar="TYPE",
                   help="image/png, image/jpeg or application/dicom (default: from the suffix .png/.jpg/.jpeg/.dcm)")
    p.add_argument("--request-id", default="", metavar="ID", help="id for logs and tracing (default: server-generated)")


def _add_ask(sub) -> None:
    p = sub.add_parser(
        "ask",
        help="ask a question about an image; prints the answer with the guard's verdict",
        description="Ask a question about an image and print the answer, the verdict, the risk scores and timings.",
        epilog=(
            "exit status: 0 ok, 2 invalid argument (bad image, question or settings), 3 server unavailable,\n"
            "4 not authorized (missing or wrong token), 1 other\n\n"
            "examples:\n"
            '  medhallguard ask --server 127.0.0.1:50051 --image chest.png "Is there a pleural effusion?"\n'
            '  medhallguard ask --server 127.0.0.1:50051 --image ct.dcm --stream "What organ is shown?"\n'
            '  medhallguard ask --model runs/smolvlm --image chest.jpg --json --max-new-tokens 32 "Any fracture?"\n'
            '  medhallguard ask --server 127.0.0.1:50051 --wait-ready 60 --image chest.png "Any nodule?"\n'
            '  medhallguard ask --server guard.internal:443 --ca-cert ca.pem --client-cert me.pem --client-key me.key \\\n'
            '      --token-file ~/.medhallguard-token --image chest.png "Is there a pneumothorax?"'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("question", help="the question about the image")
    _add_image(p)
    _add_target(p, "ask")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="longest answer in tokens (default: the server's)")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="0 is greedy; above 0 samples (default: the server's)")
    p.add_argument("--seed", type=int, metavar="S", help="sampling seed, for reproducible sampled answers")
    p.add_argument("--stream", action="store_true",
                   help="print the answer text as it is decoded (provisional until the verdict)")
    p.set_defaults(func=_cmd_ask)


def _add_score(sub) -> None:
    p = sub.add_parser(
        "score",
        help="judge an answer produced elsewhere (no generation)",
        description="Score an answer produced elsewhere: print the guard's verdict, risk scores and timings for it.",
        epilog=(
            "examples:\n"
            '  medhallguard score --server 127.0.0.1:50051 --image chest.png --question "Any effusion?" \\\n'
            '      --answer "A large left pleural effusion."\n'
            '  medhallguard score --model runs/smolvlm --image ct.dcm --question "Organ?" --answer "Liver." --json'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_image(p)
    p.add_argument("--question", required=True, help="the question the answer replies to")
    p.add_argument("--answer", required=True, help="the answer to judge")
    _add_target(p, "score with")
    p.set_defaults(func=_cmd_score)


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="describe the model and the server's limits",
        description="Print the model id, family, checksum, backend, guard thresholds and the server's limits.",
        epilog=(
            "examples:\n"
            "  medhallguard info --server 127.0.0.1:50051\n"
            "  medhallguard info --model runs/smolvlm --json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_target(p, "describe")
    p.set_defaults(func=_cmd_info)


def _cmd_ask(args) -> int:
    from server.pb.medhallguard.v1 import guard_pb2 as pb

    request = pb.AskRequest(question=args.question, request_id=args.request_id, **_image_fields(args))
    for name in ("max_new_tokens", "temperature", "seed"):
        if getattr(args, name) is not None:
            setattr(request.generation, name, getattr(args, name))
    response = _call(args, "AskStream" if args.stream else "Ask", request)
    _print(args, response, _format_answer)
    return 0


def _cmd_score(args) -> int:
    from server.pb.medhallguard.v1 import guard_pb2 as pb

    request = pb.ScoreRequest(
        question=args.question, answer=args.answer, request_id=args.request_id, **_image_fields(args)
    )
    _print(args, _call(args, "Score", request), _format_answer)
    return 0


def _cmd_info(args) -> int:
    from server.pb.medhallguard.v1 import guard_pb2 as pb

    _print(args, _call(args, "GetModelInfo", pb.GetModelInfoRequest()), _format_info)
    return 0


def _image_fields(args) -> dict:
    from guard.preprocess import SUFFIX_MEDIA_TYPES

    media_type = args.media_type or SUFFIX_MEDIA_TYPES.get(args.image.suffix.lower())
    if media_type is None:
        raise _Failure(
            "INVALID_ARGUMENT", f"cannot tell the media type of {args.image} from its suffix; pass --media-type"
        )
    try:
        return {"image": args.image.read_bytes(), "media_type": media_type}
    except OSError as e:
        raise _Failure("INVALID_ARGUMENT", f"cannot read --image {args.image}: {e.strerror}") from None


# --- calling: over gRPC or in-process ---------------------------------------


def _call(args, rpc: str, request):
    """Run one RPC against --server or the in-process --model; -> the response message."""
    on_delta = None
    if rpc == "AskStream" and not args.json:
        on_delta = lambda delta: print(delta, end="", flush=True)  # noqa: E731
    response = _call_remote(args, rpc, request, on_delta) if args.server else _call_local(args, rpc, request, on_delta)
    if on_delta is not None:
        print()  # end the streamed line
    return response


def _call_remote(args, rpc: str, request, on_delta):
    import grpc

    from server import security
    from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc

    options = [("grpc.max_receive_message_length", _CLIENT_MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", _CLIENT_MAX_MESSAGE_BYTES)]
    try:
        metadata = security.auth_metadata(security.read_token(args.token_file) if args.token_file else None)
        channel = security.client_channel(args.server, args.ca_cert, args.client_cert, args.client_key,
                                          tls=args.tls, options=options)
    except ValueError as e:  # unreadable or mismatched --ca-cert/--client-cert/--client-key/--token-file
        raise _Failure("INVALID_ARGUMENT", str(e)) from None
    with channel:
        try:
            if args.wait_ready:
                _wait_ready(channel, args.server, args.wait_ready, metadata)
            stub = pb_grpc.MedHallGuardStub(channel)
            if rpc != "AskStream":
                return getattr(stub, rpc)(request, timeout=args.timeout, metadata=metadata)
            final = None
            for message in stub.AskStream(request, timeout=args.timeout, metadata=metadata):
                if message.WhichOneof("event") == "final":
                    final = message.final
                elif on_delta is not None:
                    on_delta(message.delta)
            if final is None:
                raise _Failure("INTERNAL", "the stream ended without a final response")
            return final
        except grpc.RpcError as e:
            raise _Failure(e.code().name, e.details() or "") from None


def _wait_ready(channel, server: str, timeout_s: float, metadata=()) -> None:
    """Poll the health service until MedHallGuard is SERVING; a refused connection counts as not yet."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    status = "not reachable"
    while True:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=_SERVICE), timeout=1.0, metadata=metadata)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
        if time.monotonic() >= deadline:
            raise _Failure("UNAVAILABLE", f"{server} is not SERVING after {timeout_s:g} s (last status: {status})")
        time.sleep(0.2)


def _call_local(args, rpc: str, request, on_delta):
    from guard.errors import GuardError
    from guard.runtime import GuardConfig, load_guard  # load_guard imports the backend it needs
    from guard.types import StopSignal
    from server import service
    from server.config import split_config

    try:
        server_config, guard_tables = split_config(args.config)
        guard = load_guard(args.bundle or args.model, GuardConfig.from_dict(guard_tables), bundle=bool(args.bundle))
        if rpc == "GetModelInfo":
            return service.model_info_to_pb(guard.info(), guard.config, server_config)
        t0 = time.perf_counter()
        req = service.request_from_pb(request, guard.config.decode, server_config)
        stop = StopSignal(deadline=time.monotonic() + args.timeout) if args.timeout else None
        result = guard.score(req, stop) if rpc == "Score" else guard.answer(req, stop, on_delta)
        return service.response_to_pb(result, (time.perf_counter() - t0) * 1e3)
    except ValueError as e:  # a bad --config
        raise _Failure("INVALID_ARGUMENT", str(e)) from None
    except GuardError as e:
        raise _Failure(_status_name(e), str(e)) from None


def _status_name(exc: BaseException) -> str:
    from server.interceptors import status_for  # the one errors -> status table

    return status_for(exc).name


# --- printing ---------------------------------------------------------------


def _print(args, message, formatter) -> None:
    if args.json:
        from google.protobuf.json_format import MessageToDict

        d = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        print(json.dumps(d, indent=2, sort_keys=False))
    else:
        print(formatter(message))


def _rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows) + 2
    lines = []
    for key, value in rows:
        first, *rest = str(value).split("\n")
        lines.append(f"{key:<{width}}{first}")
        lines += [" " * width + line for line in rest]
    return "\n".join(lines)


def _format_answer(r) -> str:
    from server.pb.medhallguard.v1 import guard_pb2 as pb

    prob = lambda name: f"{getattr(r, name):.3f}" if r.HasField(name) else "n/a (the guard could not score)"  # noqa: E731
    scores = "n/a"
    if r.HasField("scores"):
        s = r.scores
        scores = (f"clinical_accuracy {s.clinical_accuracy:.1f}  clinical_relevance {s.clinical_relevance:.1f}  "
                  f"detail_level {s.detail_level:.1f}  risk_level {s.risk_level:.1f}  (of 10)")
        if not r.heads_trained:
            scores += "\n(guard heads untrained: these numbers mean nothing)"
    t = r.timings
    return _rows([
        ("answer", r.answer if r.answer else "(withheld)"),
        ("verdict", pb.Verdict.Name(r.verdict).removeprefix("VERDICT_")),
        ("p_hallucination", prob("p_hallucination")),
        ("premise_risk", prob("premise_risk")),
        ("scores", scores),
        ("reasons", "\n".join(f"- {reason}" for reason in r.reasons) or "-"),
        ("timings (ms)", f"preprocess {t.preprocess_ms:.1f}  vision {t.vision_ms:.1f}  prefill {t.prefill_ms:.1f}  "
                         f"decode {t.decode_ms:.1f}  guard {t.guard_ms:.1f}  total {t.total_ms:.1f}"),
        ("tokens", f"{r.num_tokens} (stop: {r.stop_reason or '-'})"),
        ("model", f"{r.model_id}  {r.model_checksum}  {r.backend}"),
        ("request_id", r.request_id),
    ])


def _format_info(m) -> str:
    g = m.default_generation
    seed = str(g.seed) if g.HasField("seed") else "none"
    return _rows([
        ("model_id", m.model_id),
        ("family", m.family),
        ("checksum", m.checksum),
        ("backend", m.backend),
        ("image", f"{m.image_size} px, {m.num_image_tokens} tokens"),
        ("heads_trained", "yes" if m.heads_trained else "no (random init: scores mean nothing)"),
        ("verified", "yes" if m.verified else "no (exported with --force)"),
        ("thresholds", "\n".join(f"{k} = {v:g}" for k, v in sorted(m.thresholds.items())) or "-"),
        ("generation", f"max_new_tokens {g.max_new_tokens}  temperature {g.temperature:g}  seed {seed}"),
        ("limits", f"message {m.max_message_bytes:,} B  image {m.max_image_bytes:,} B  {m.max_pixels:,} px  "
                   f"question {m.max_question_chars:,} chars  answer {m.max_answer_chars:,} chars"),
        ("server_version", m.server_version),
    ])


if __name__ == "__main__":
    sys.exit(main())
