"""Parity: the export gate's figures (export/parity.py) on more prompts, per precision.

For each model and precision, the export bundle served by onnxruntime is
compared with the PyTorch model it came from, with `export.parity.compare` —
the same code the export's blocking gate runs — on more prompts and longer
answers than the gate uses. Reported per precision: greedy answers identical,
token agreement (the candidate's argmax on the reference's answer), max abs
logit error and its share of the logit scale, the guard outputs' max abs
difference on the same answer, verdict agreement (on each backend's own
answer, and on the same answer), max |delta p_hallucination|, and whether the
gate's thresholds would pass on these prompts.

Random-weight models (nano, 256m) have near-uniform logits, where int8/int4
rounding flips argmax ties: their quantized figures say little about a
trained model's. The default model's figures are the ones that matter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.common import (RESULTS_DIR, done, emit, header, load_average, machine_lines, md_table, say, subset,
                               write_json)

PRECISIONS = ("fp32", "int8", "int4")


def bench_model(model, precisions: list[str], args) -> list[dict]:
    from benchmarks.models import bundle
    from export import parity
    from guard.backends import load_backend
    from guard.head import GuardHeads
    from guard.prompt import Prompter
    from guard.spec import HEADS_FILE

    config = parity.ParityConfig(phantom_prompts=args.prompts, medhalltune_prompts=args.prompts,
                                 max_new_tokens=args.max_new_tokens)
    prompts = parity.parity_prompts(config)
    reference = load_backend("torch", model.path, threads=args.threads)
    heads = GuardHeads.load(model.path / HEADS_FILE)
    rows = []
    for precision in precisions:
        path = bundle(model, precision, args.threads, args.bundles)
        candidate = load_backend("onnxruntime", path, threads=args.threads)
        prompter = Prompter(path / "tokenizer.json", candidate.spec)
        say(f"{model.label} {precision}: {len(prompts)} prompts × {args.max_new_tokens} tokens "
            f"(load {load_average()[0]})")
        r = parity.compare(reference, candidate, prompter, heads, prompts, args.max_new_tokens)
        failed = parity.failures(r, parity.THRESHOLDS[precision])
        r.update(model=model.label, precision=precision, gate_passes=not failed, gate_failures=failed,
                 note=model.note)
        emit({"bench": "parity", "event": "precision", **{k: v for k, v in r.items() if k != "per_prompt"}})
        rows.append(r)
        del candidate
    return rows


def report(head: dict, results: list[dict], load_end: list[float], args, out: Path) -> None:
    lines = ["# Export parity", "", *machine_lines(head, load_end),
             f"Each bundle (onnxruntime, CPU) against the PyTorch model it was exported from, with "
             f"`export.parity.compare`: {2 * args.prompts} prompts ({args.prompts} phantom, {args.prompts} MedHallTune "
             f"questions on phantom images), {args.max_new_tokens} greedy tokens each. Gate thresholds: fp32 — identical "
             "greedy tokens, logits within 1e-3 of the logit scale, guard outputs within 1e-4; int8/int4 — token "
             "agreement ≥ 90% and the same verdict on ≥ 98% of prompts.", ""]
    by_model: dict[str, list[dict]] = {}
    for r in results:
        by_model.setdefault(r["model"], []).append(r)
    for label, rows in by_model.items():
        lines += [f"## Model `{label}`", ""]
        if rows[0]["note"]:
            lines += [f"Model: {rows[0]['note']}.", ""]
        table = []
        for r in rows:
            table.append([r["precision"], f"{r['greedy_identical']}/{r['prompts']}", f"{r['token_agreement']:.1%}",
                          f"{r['logits_max_abs_diff']:.3g}", f"{r['logits_rel_diff']:.2e}", f"{r['logit_scale']:.3g}",
                          f"{r['guard_max_abs_diff']:.2e}", f"{r['verdict_agreement']:.0%}",
                          f"{r['verdict_agreement_same_answer']:.0%}", f"{r['max_abs_dp_hallucination']:.3g}",
                          "passes" if r["gate_passes"] else "fails: " + "; ".join(r["gate_failures"])])
        lines += [md_table(["precision", "greedy identical", "token agreement", "max abs logit error",
                            "÷ logit scale", "logit scale", "guard max abs diff (same answer)",
                            "same verdict (own answers)", "same verdict (same answer)", "max abs Δp_halluc.",
                            "gate on these prompts"], table), ""]
    (out / "parity.md").write_text("\n".join(lines))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.parity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m benchmarks.parity                          # default and 256m, fp32/int8/int4\n"
               "  python -m benchmarks.parity --models default --prompts 32 --max-new-tokens 48\n"
               "  python -m benchmarks.parity --smoke                  # seconds: nano, 1+1 prompts, 4 tokens",
    )
    p.add_argument("--models", default="default,256m", help="comma-separated: default, nano, 256m or NAME=MODEL_DIR")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated subset of fp32,int8,int4")
    p.add_argument("--prompts", type=int, default=8, help="phantom prompts and MedHallTune prompts each (default 8+8)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="greedy tokens per prompt (default 24)")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    p.add_argument("--bundle", action="append", default=[], metavar="MODEL:PRECISION=DIR",
                   help="use this export bundle instead of exporting one into the cache (repeatable)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="seconds: nano model, 1+1 prompts, 4 tokens")
    args = p.parse_args(argv)
    if args.smoke:
        if args.models == "default,256m":
            args.models = "nano"
        args.prompts, args.max_new_tokens = 1, 4
    args.precisions = subset(p, args.precisions, PRECISIONS, "precision")
    if args.prompts < 1 or args.max_new_tokens < 1:
        p.error("--prompts and --max-new-tokens must be >= 1")
    from benchmarks.models import parse_bundles

    args.bundles = parse_bundles(args.bundle)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from benchmarks.models import resolve

    head = header("parity", argv)
    emit(head)
    results = []
    for spec in args.models.split(","):
        results += bench_model(resolve(spec), args.precisions, args)
    load_end = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "parity.json", {"header": head, "load_average_end": load_end, "results": results})
    report(head, results, load_end, args, args.out)
    done("parity", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
