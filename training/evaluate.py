"""`medhallguard eval-default`: the default model and its baseline, served through gRPC, on held-out data.

Every number comes from requests to real `medhallguard serve` processes on loopback:
- PhantomVQA held-out images: accuracy on positive questions, the hallucination
  rate on negative questions (the share of answers that accept the false
  premise), and the guard's AUROC for p(hallucination) on held-out generations:
  the tuned model's own answers (Ask) plus the baseline's answers judged by the
  tuned guard (Score), labelled exactly by the PhantomVQA judge.
- MedHallTune held-out images: premise_risk AUROC and the Spearman correlation
  of each predicted score with GPT-4o's (Score on LLaVA-Med's answers), beside
  text-only TF-IDF baselines fitted on the training part of the same split.
Writes `report.json` and `report.md`.
"""

from __future__ import annotations

import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from training.data import image_payload
from training.heads import safe

# Evaluation serves answers even when the guard would abstain, so that the
# model's raw answers can be judged; the verdicts are reported separately.
_EVAL_POLICY = {"withhold_answer_on_abstain": False}


def _config_file(tmp: Path, name: str, policy: dict, max_new_tokens: int) -> Path:
    lines = ["[policy]"] + [f"{k} = {json.dumps(v)}" for k, v in policy.items()]
    lines += ["[decode]", f"max_new_tokens = {max_new_tokens}", "[server]", "max_queue = 64"]
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def call_all(address: str, requests: list, rpc: str, concurrency: int, desc: str, timeout_s: float = 120.0) -> list:
    import grpc
    from tqdm.auto import tqdm

    from server.pb.medhallguard.v1 import guard_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = guard_pb2_grpc.MedHallGuardStub(channel)
        call = getattr(stub, rpc)
        with ThreadPoolExecutor(concurrency) as pool:
            return list(tqdm(pool.map(lambda r: call(r, timeout=timeout_s), requests), total=len(requests), desc=desc))


def ask_requests(examples, max_new_tokens: int | None = None):
    """One AskRequest per example; `max_new_tokens` overrides the server's default when given."""
    from server.pb.medhallguard.v1 import guard_pb2 as pb

    generation = {"generation": pb.GenerationSettings(max_new_tokens=max_new_tokens)} if max_new_tokens else {}
    return [pb.AskRequest(**_image_fields(e), question=e.question, request_id=e.id, **generation) for e in examples]


def score_requests(examples, answers):
    from server.pb.medhallguard.v1 import guard_pb2 as pb

    return [pb.ScoreRequest(**_image_fields(e), question=e.question, answer=a or "(no answer)", request_id=e.id)
            for e, a in zip(examples, answers)]


def _image_fields(example) -> dict:
    image, media_type = image_payload(example)
    return {"image": image, "media_type": media_type}


def phantom_judgements(examples, answers) -> list:
    """The exact judge's Judgement (training.phantom_judge) of each answer, row by row."""
    from training.phantom_judge import judge, qa_of

    return [judge(a, qa_of(e)) for e, a in zip(examples, answers)]


def phantom_rates(examples, judgements) -> dict:
    """Accuracy on positive questions and false-premise acceptance on negative ones, from phantom_judgements."""
    from training.metrics import proportion_interval

    pos = [j for j, e in zip(judgements, examples) if e.polarity == "positive"]
    neg = [j for j, e in zip(judgements, examples) if e.polarity == "negative"]
    right, accepted = sum(bool(j.correct) for j in pos), sum(bool(j.accepted_false_premise) for j in neg)
    return {
        "positive_questions": len(pos), "negative_questions": len(neg),
        "positive_accuracy": safe(right / len(pos)) if pos else None,
        "positive_accuracy_ci95": interval(proportion_interval(right, len(pos))),
        "negative_hallucination_rate": safe(accepted / len(neg)) if neg else None,
        "negative_hallucination_rate_ci95": interval(proportion_interval(accepted, len(neg))),
        "hallucinated_any": safe(np.mean([j.hallucinated for j in judgements])),
    }


def interval(bounds: tuple[float, float]) -> list[float | None]:
    """A (low, high) interval as JSON: rounded, None where undefined."""
    return [safe(v) for v in bounds]


def rate_key(polarity: str) -> str:
    """The rate a question kind is scored by: accuracy for positive kinds, false-premise acceptance for negative."""
    return "accuracy" if polarity == "positive" else "hallucination_rate"


def rates_by_kind(examples, judgements) -> dict:
    """Per question kind: its polarity, count and `rate_key` rate; positive kinds first, then by name."""
    hits: dict[str, list[bool]] = {}
    polarity: dict[str, str] = {}
    for e, j in zip(examples, judgements):
        kind = e.meta["kind"]
        polarity[kind] = e.polarity
        hits.setdefault(kind, []).append(bool(j.correct if e.polarity == "positive" else j.accepted_false_premise))
    order = sorted(hits, key=lambda k: (polarity[k] != "positive", k))
    return {k: {"polarity": polarity[k], "n": len(hits[k]), rate_key(polarity[k]): round(sum(hits[k]) / len(hits[k]), 3)}
            for k in order}


def presence_by_finding(examples, judgements) -> dict:
    """Positive presence questions ("Is there a nodule?") per finding kind: the accuracy when the
    finding is in the image (`present`) and when it is not (`absent`), each with its count."""
    hits: dict[str, dict[str, list[bool]]] = {}
    for e, j in zip(examples, judgements):
        label = e.meta.get("label") or {}
        if e.meta.get("kind") != "presence" or not label.get("finding"):
            continue
        row = hits.setdefault(label["finding"], {"present": [], "absent": []})
        row["present" if label.get("present") else "absent"].append(bool(j.correct))
    return {finding: {part: {"n": len(v), "accuracy": round(sum(v) / len(v), 3) if v else None}
                      for part, v in parts.items()}
            for finding, parts in sorted(hits.items())}


def verdict_counts(responses) -> dict:
    from server.pb.medhallguard.v1 import guard_pb2 as pb

    names = [pb.Verdict.Name(r.verdict) for r in responses]
    return {n: names.count(n) for n in sorted(set(names))}


def evaluate_default(root: Path, out_dir: Path, phantom_questions: int = 600, concurrency: int = 2, seed: int = 0,
                     log=print) -> dict:
    from server.launch import served
    from training.data import load_examples
    from training.metrics import (auroc, bootstrap_interval, ece, spearman, tfidf_classifier_scores,
                                  tfidf_regression_predictions)

    data = root / "data"
    heldout = load_examples(data / "phantom" / "heldout.json", data / "phantom" / "images").examples
    heldout = [heldout[i] for i in np.random.default_rng(seed).permutation(len(heldout))[:phantom_questions]]
    mht_train = load_examples(data / "medhalltune" / "train.json", None, allow_missing_images=True).examples
    mht_held = load_examples(data / "medhalltune" / "pred_heldout.json", None, allow_missing_images=True).examples
    report: dict = {"phantom": {}, "medhalltune": {}}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Baseline: random-init heads, so its answers are served only with the allowance.
        asks = ask_requests(heldout)  # read each image once; both models get the same requests
        base_cfg = _config_file(tmp, "baseline", {**_EVAL_POLICY, "allow_untrained_heads": True}, 48)
        with served(root / "baseline", base_cfg, log=log) as address:
            base = call_all(address, asks, "Ask", concurrency, "baseline: Ask")
        tuned_cfg = _config_file(tmp, "tuned", _EVAL_POLICY, 48)
        with served(root / "tuned", tuned_cfg, log=log) as address:
            tuned = call_all(address, asks, "Ask", concurrency, "tuned: Ask")
            judged_base = call_all(address, score_requests(heldout, [r.answer for r in base]), "Score",
                                    concurrency, "tuned guard on baseline answers: Score")
            mht = call_all(address, score_requests(mht_held, [e.model_answer for e in mht_held]), "Score",
                            concurrency, "MedHallTune held-out: Score")

    # PhantomVQA: answer quality of both models, and the tuned guard on held-out generations.
    t_js = phantom_judgements(heldout, [r.answer for r in tuned])
    b_js = phantom_judgements(heldout, [r.answer for r in base])
    t_rates, b_rates = phantom_rates(heldout, t_js), phantom_rates(heldout, b_js)
    labels = [j.hallucinated for j in t_js + b_js]
    p_hall = [r.p_hallucination for r in tuned] + [r.p_hallucination for r in judged_base]
    from server.pb.medhallguard.v1 import guard_pb2 as pb

    shown_false_premise = [j.accepted_false_premise and r.verdict != pb.VERDICT_ABSTAIN  # abstaining withholds it
                           for j, r, e in zip(t_js, tuned, heldout) if e.polarity == "negative"]
    report["phantom"] = {
        "heldout_questions": len(heldout),
        "tuned": {**t_rates, "verdicts": verdict_counts(tuned), "by_kind": rates_by_kind(heldout, t_js),
                  "presence_by_finding": presence_by_finding(heldout, t_js),
                  "negative_hallucination_rate_after_guard": safe(np.mean(shown_false_premise))},
        "baseline": {**b_rates, "by_kind": rates_by_kind(heldout, b_js),
                     "presence_by_finding": presence_by_finding(heldout, b_js)},
        "guard_auroc_tuned_and_baseline_generations": safe(auroc(labels, p_hall)),
        "guard_auroc_tuned_and_baseline_generations_ci95": interval(bootstrap_interval(auroc, labels, p_hall)),
        "guard_auroc_tuned_generations": safe(auroc(labels[: len(tuned)], p_hall[: len(tuned)])),
        "guard_auroc_tuned_generations_ci95": interval(bootstrap_interval(auroc, labels[: len(tuned)],
                                                                          p_hall[: len(tuned)])),
        "guard_ece": safe(ece(labels, p_hall)),
        "hallucinated_generations": int(sum(labels)),
    }

    # MedHallTune held-out: the guard against text-only baselines on the same split.
    negative = [e.polarity == "negative" for e in mht_held]
    gpt = np.array([e.scores for e in mht_held], float)
    pred = np.array([[r.scores.clinical_accuracy, r.scores.clinical_relevance, r.scores.detail_level,
                      r.scores.risk_level] for r in mht], float)
    train_pred = load_examples(data / "medhalltune" / "pred_train.json", None, allow_missing_images=True).examples
    names = ("clinical_accuracy", "clinical_relevance", "detail_level", "risk_level")
    tfidf_pred = tfidf_regression_predictions([f"{e.question} {e.model_answer}" for e in train_pred],
                                              [e.scores for e in train_pred],
                                              [f"{e.question} {e.model_answer}" for e in mht_held])
    premise = [r.premise_risk for r in mht]
    tfidf_premise = tfidf_classifier_scores([e.question for e in mht_train], [e.polarity == "negative" for e in mht_train],
                                            [e.question for e in mht_held])
    # Paired bootstrap over the held-out questions: does the guard beat its baseline beyond resampling noise?
    auroc_gain = lambda y, a, b: auroc(y, a) - auroc(y, b)  # noqa: E731
    spearman_gain = lambda t, a, b: spearman(a, t) - spearman(b, t)  # noqa: E731
    report["medhalltune"] = {
        "heldout_questions": len(mht_held),
        "premise_auroc_guard": safe(auroc(negative, premise)),
        "premise_auroc_guard_ci95": interval(bootstrap_interval(auroc, negative, premise)),
        "premise_auroc_tfidf_logreg": safe(auroc(negative, tfidf_premise)),
        "premise_auroc_gain_over_tfidf_ci95": interval(bootstrap_interval(auroc_gain, negative, premise, tfidf_premise)),
        "spearman_guard": {n: safe(spearman(pred[:, k], gpt[:, k])) for k, n in enumerate(names)},
        "spearman_tfidf_ridge": {n: safe(spearman(tfidf_pred[:, k], gpt[:, k])) for k, n in enumerate(names)},
        "spearman_gain_over_tfidf_ci95": {n: interval(bootstrap_interval(spearman_gain, gpt[:, k], pred[:, k],
                                                                         tfidf_pred[:, k]))
                                          for k, n in enumerate(names)},
        "premise_head": _premise_head_record(root),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(render_markdown(report))
    return report


def _premise_head_record(root: Path) -> dict | None:
    """How the served premise head was fitted, and its ablation (hidden states only, n-grams only,
    both) on the calibration fold, from the build record; None when the build has none."""
    path = root / "build_record.json"
    cal = json.loads(path.read_text()).get("head_calibration", {}) if path.is_file() else {}
    keys = ("premise_fit_rows", "premise_logistic_c", "premise_hidden_weight", "premise_ngram_vocabulary",
            "premise_cv_auroc", "premise_ablation")
    return {k: cal[k] for k in keys if k in cal} or None


def render_markdown(r: dict) -> str:
    from training.metrics import with_interval

    p, m = r["phantom"], r["medhalltune"]
    t, b = p["tuned"], p["baseline"]
    fmt = with_interval  # a value alone

    def gain(bounds) -> str:
        return "n/a" if not bounds or None in bounds else f"{bounds[0]:+.3f} to {bounds[1]:+.3f}"

    rate = lambda row, key: with_interval(row[key], row.get(f"{key}_ci95"))  # noqa: E731
    rows = [
        "| PhantomVQA held-out (value, 95% interval) | tuned | baseline (no negative questions) |",
        "|---|---|---|",
        f"| accuracy on positive questions | {rate(t, 'positive_accuracy')} | {rate(b, 'positive_accuracy')} |",
        f"| hallucination rate on negative questions | {rate(t, 'negative_hallucination_rate')} | {rate(b, 'negative_hallucination_rate')} |",
        f"| the same, counting only answers the guard lets through (ABSTAIN withholds) | {fmt(t['negative_hallucination_rate_after_guard'])} | |",
        f"| questions (positive / negative) | {t['positive_questions']} / {t['negative_questions']} | same |",
        "",
    ]
    if "by_kind" in t:  # reports written before it have no breakdown
        rows += ["| PhantomVQA held-out, by question kind | n | tuned | baseline |", "|---|---|---|---|"]
        for kind, row in t["by_kind"].items():
            key = rate_key(row["polarity"])
            base = b.get("by_kind", {}).get(kind, {}).get(key)
            rows.append(f"| {row['polarity']}: {kind} ({key.replace('_', ' ')}) | {row['n']} | {fmt(row[key])} | {fmt(base)} |")
        rows.append("")
    if t.get("presence_by_finding"):  # reports written before it have no breakdown
        rows += ["| presence questions, by finding: accuracy | n there | tuned | baseline | n not there | tuned | baseline |",
                 "|---|---|---|---|---|---|---|"]
        for finding, row in t["presence_by_finding"].items():
            base = b.get("presence_by_finding", {}).get(finding, {})
            cells = [f"{row[part]['n']} | {fmt(row[part]['accuracy'])} | {fmt(base.get(part, {}).get('accuracy'))}"
                     for part in ("present", "absent")]
            rows.append(f"| {finding} | {' | '.join(cells)} |")
        rows.append("")
    rows += [
        "| guard, PhantomVQA held-out generations | value |",
        "|---|---|",
        f"| p(hallucination) AUROC, tuned + baseline answers ({p['hallucinated_generations']} hallucinated) | {rate(p, 'guard_auroc_tuned_and_baseline_generations')} |",
        f"| p(hallucination) AUROC, tuned answers only | {rate(p, 'guard_auroc_tuned_generations')} |",
        f"| p(hallucination) ECE | {fmt(p['guard_ece'])} |",
        f"| tuned verdicts | {', '.join(f'{k}: {v}' for k, v in t['verdicts'].items())} |",
        "",
        f"| MedHallTune held-out ({m['heldout_questions']} questions) | guard | text-only baseline | guard minus baseline, 95% interval (paired bootstrap) |",
        "|---|---|---|---|",
        f"| premise_risk AUROC (baseline: TF-IDF + logistic regression) | {rate(m, 'premise_auroc_guard')} | {fmt(m['premise_auroc_tfidf_logreg'])} | {gain(m.get('premise_auroc_gain_over_tfidf_ci95'))} |",
    ]
    for name, v in m["spearman_guard"].items():
        rows.append(f"| {name} Spearman vs GPT-4o (baseline: TF-IDF + ridge) | {fmt(v)} | {fmt(m['spearman_tfidf_ridge'][name])} "
                    f"| {gain(m.get('spearman_gain_over_tfidf_ci95', {}).get(name))} |")
    ablation = (m.get("premise_head") or {}).get("premise_ablation", {}).get("medhalltune")
    if ablation:
        rows += ["", "| premise head ablation, calibration fold of the head's training rows (MedHallTune) | AUROC |",
                 "|---|---|"]
        rows += [f"| {label} | {fmt(ablation.get(key))} |" for key, label in (
            ("hidden", "question hidden states only"), ("ngrams", "question token n-grams only"),
            ("both", "both (the served head, before its refit on every row)"))]
    return "\n".join(rows) + "\n"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-default",
        help="report the default model and its baseline on held-out data, served through gRPC",
        description=__doc__,
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    p.add_argument("--root", type=Path, help="build folder of build-default (default: $MEDHALLGUARD_CACHE/default-build)")
    p.add_argument("--out", type=Path, default=Path("reports/default"), help="where report.json/.md go (default reports/default)")
    p.add_argument("--phantom-questions", type=int, default=600, help="held-out PhantomVQA questions to ask (default 600)")
    p.add_argument("--concurrency", type=int, default=2)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from training.build_default import cache_root, ensure_default

    root = args.root or cache_root() / "default-build"
    if args.root is None:
        ensure_default()
    report = evaluate_default(root, args.out, args.phantom_questions, args.concurrency)
    print(render_markdown(report))
    print(f"wrote {args.out / 'report.json'} and {args.out / 'report.md'}")
    return 0
