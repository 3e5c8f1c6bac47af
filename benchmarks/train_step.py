"""Training step: what `--group-by-length` and the frozen tower's cache buy, side by side.

On the default recipe's data (PhantomVQA + MedHallTune training rows of a
`build-default` folder) and its initial model (vision-pretrained tower, frozen):
- padded tokens over the recipe's whole run, in the plain order and grouped by
  length (counted from the rows' token lengths; no model runs);
- milliseconds per optimizer step of `medhallguard train` for three variants,
  run in rotation so that each repetition sees the same machine load:
  plain, grouped, grouped + tower cache.

The cache's gain grows with the run's length: an image's tower output is reused
only once the image recurs. The report gives each cached run's hit rate; the
recipe's 4,000 steps of 16 draw each PhantomVQA training image about six times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS_DIR, done, emit, header, load_average, machine_lines, md_table, say, stats, write_json

VARIANTS = {"plain": dict(group_by_length=False, tower_cache_mb=0),
            "grouped": dict(group_by_length=True, tower_cache_mb=0),
            "grouped + tower cache": dict(group_by_length=True)}


def _config(root: Path, out: Path, steps: int, **kw):
    """The default recipe's tuned-model config on `root`'s data and initial model, with `kw` changed."""
    from dataclasses import replace

    from training.build_default import DefaultRecipe, recipe_train_config

    cfg = recipe_train_config(DefaultRecipe(), root / "data", root / "init", out, steps, positive_only=False)
    return replace(cfg, show_progress=False, **kw)


def padded_tokens(root: Path) -> dict:
    """Real and padded tokens over the recipe's run, plain order against grouped by length."""
    from guard.prompt import Prompter
    from guard.spec import spec_from_hf_dir
    from training.build_default import DefaultRecipe
    from training.data import group_by_length, mix
    from training.train import EncodedExamples, load_training_examples

    recipe = DefaultRecipe()
    cfg = _config(root, Path("unused"), recipe.steps)
    spec = spec_from_hf_dir(cfg.model)
    with contextlib.redirect_stdout(sys.stderr):
        parts, _ = load_training_examples(cfg)
    examples = mix(parts, recipe.steps * recipe.batch_size, seed=recipe.seed)
    encoded = EncodedExamples(examples, Prompter(Path(cfg.model) / "tokenizer.json", spec), cfg.max_answer_tokens,
                              cfg.question_lm)
    lengths = [encoded.length(i) for i in range(len(encoded))]
    b = recipe.batch_size

    def padded(order):
        return sum(len(order[j:j + b]) * max(lengths[i] for i in order[j:j + b]) for j in range(0, len(order), b))

    return {"rows": len(lengths), "real": sum(lengths), "plain": padded(list(range(len(lengths)))),
            "grouped": padded(group_by_length(lengths, b, seed=recipe.seed))}


def step_times(root: Path, steps: int, repeats: int, threads: int) -> dict:
    import torch

    from training.train import train

    torch.set_num_threads(threads)
    runs: dict[str, list] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="train-step-") as tmp:
        for rep in range(repeats):
            for name, kw in VARIANTS.items():
                out = Path(tmp) / f"{rep}-{name.replace(' ', '')}"
                with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON lines
                    train(_config(root, out, steps, **kw))
                run = json.loads((out / "train_record.json").read_text())["run"]
                shutil.rmtree(out)
                ms = 1000 * run["wall_s"] / run["steps_this_run"]
                runs[name].append({"ms_per_step": ms, "tower_cache": run.get("tower_cache")})
                say(f"{name}, repeat {rep + 1}/{repeats}: {ms:.1f} ms/step (load {load_average()[0]})")
                emit({"bench": "train_step", "event": "run", "variant": name, "repeat": rep, "ms_per_step": ms,
                      "tower_cache": run.get("tower_cache")})
    return runs


def report(head: dict, pad: dict, runs: dict, args, load_end, out: Path) -> None:
    from training.build_default import DefaultRecipe

    lines = ["# Training step", "", *machine_lines(head, load_end),
             f"Data and initial model: `{args.build_root}`. {args.steps} steps of batch {DefaultRecipe().batch_size} per run, "
             f"{args.repeats} runs per variant in rotation, {args.threads} threads.", "",
             "## Padded tokens over the recipe's run", "",
             md_table(["rows", "real tokens", "padded, plain order", "padded, grouped by length"],
                      [[pad["rows"], pad["real"], pad["plain"], pad["grouped"]]]), ""]
    base = stats([r["ms_per_step"] for r in runs["plain"]])["p50"]
    table = []
    for name, rs in runs.items():
        ms = stats([r["ms_per_step"] for r in rs])["p50"]
        caches = [r["tower_cache"] for r in rs if r["tower_cache"]]
        hit = sum(c["hits"] for c in caches) / max(1, sum(c["hits"] + c["misses"] for c in caches)) if caches else None
        table.append([name, f"{ms:.1f}", f"{base / ms:.2f}x", "" if hit is None else f"{hit:.0%}"])
    lines += ["## Milliseconds per step (median over runs, including the first steps' cache misses)", "",
              md_table(["variant", "ms/step", "speed-up vs plain", "tower cache hit rate"], table), ""]
    (out / "train_step.md").write_text("\n".join(lines))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  python -m benchmarks.train_step\n"
                                       "  python -m benchmarks.train_step --steps 1300 --repeats 1   # the recipe's run length")
    p.add_argument("--build-root", type=Path, help="a build-default folder (default: the cached default build)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run (default 400)")
    p.add_argument("--repeats", type=int, default=2, help="runs per variant, in rotation (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="seconds: 3 steps, one run per variant")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.repeats = 3, 1
    if args.build_root is None:
        from training.build_default import cache_root

        args.build_root = cache_root() / "default-build"
    missing = [q for q in (args.build_root / "init", args.build_root / "data" / "phantom" / "train.json") if not q.exists()]
    if missing:
        p.error(f"{args.build_root} is not a build-default folder (missing {missing[0]}); "
                "run `medhallguard build-default` first or pass --build-root")
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    head = header("train_step", argv)
    emit(head)
    pad = padded_tokens(args.build_root)
    say(f"padded tokens: plain {pad['plain']}, grouped {pad['grouped']} (real {pad['real']})")
    runs = step_times(args.build_root, args.steps, args.repeats, args.threads)
    load_end = load_average()
    write_json(args.out / "train_step.json", {"header": head, "load_average_end": load_end, "padded_tokens": pad,
                                              "runs": runs})
    report(head, pad, runs, args, load_end, args.out)
    done("train_step", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
