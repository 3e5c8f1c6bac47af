"""report.json -> report.md: tables split into positive and negative columns, as on the MedHallTune leaderboard."""

from __future__ import annotations

from evaluation.text_metrics import LABELS, METRICS
from training.data import SCORE_NAMES
from training.metrics import with_interval

_COLUMNS = ("positive", "negative", "all")


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(title: str, rows: list[tuple[str, list]], columns=_COLUMNS) -> list[str]:
    lines = [f"| {title} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_fmt(v) for v in values) + " |" for name, values in rows]
    return lines + [""]


def _by_split(d: dict, key=None) -> list:
    return [(d.get(c) or {}).get(key) if key else d.get(c) for c in _COLUMNS]


def _binary_rows(label: str, by_split: dict) -> list[tuple[str, list]]:
    return [(f"p_hallucination AUROC ({label})", [by_split[c]["auroc"] for c in _COLUMNS]),
            (f"p_hallucination AUPRC ({label})", [by_split[c]["auprc"] for c in _COLUMNS]),
            ("p_hallucination ECE", [by_split[c]["ece"] for c in _COLUMNS]),
            ("answers labelled hallucinated / labelled", [f"{by_split[c]['positives']} / {by_split[c]['n']}"
                                                          for c in _COLUMNS])]


def _verdict_rows(verdicts: dict) -> list[tuple[str, list]]:
    names = sorted({n for c in _COLUMNS for n in verdicts.get(c, {})})
    return [(n.removeprefix("VERDICT_"), [verdicts.get(c, {}).get(n, 0) for c in _COLUMNS]) for n in names]


def render_markdown(r: dict) -> str:
    run = r["run"]
    m = run["model"]
    out = ["# MedHallGuard evaluation", ""]
    if run.get("command"):
        out += ["```bash", run["command"], "```", ""]
    out += [f"- model: `{m.get('model_id')}` ({m.get('checksum', '')[:19]}...), backend {m.get('backend')}, "
            f"{m.get('runs')}; guard heads {'trained' if m.get('heads_trained') else 'UNTRAINED (random init)'}",
            f"- date (UTC): {run['date_utc']}; max_new_tokens: {run['max_new_tokens'] or 'model default'}"]
    for f in run["data"] + run["score_answers"]:
        out.append(f"- `{f['path']}`: {f['rows']} rows ({f['by_polarity']['positive']} positive, "
                   f"{f['by_polarity']['negative']} negative), sha256 {f['sha256'][:12]}..."
                   + (f", {f['excluded_rows']} rows excluded by image" if f["excluded_rows"] else "")
                   + (f", {len(f['skipped_malformed_rows'])} malformed rows SKIPPED" if f.get("skipped_malformed_rows")
                      else ""))
    if run["blank_images"]:
        out += ["", f"> **{run['blank_images']} rows had no image file and were run on a blank image.** "
                    f"{run['blank_image_note']}"]
    out += ["", f"Hallucination label: {run['hallucination_label']}.", ""]
    if "generation" in r:
        out += _generation(r["generation"])
    if "score_answers" in r:
        out += _scored(r["score_answers"])
    if run.get("reliability_diagram"):
        out += [f"Reliability diagram: `{run['reliability_diagram']}`.", ""]
    return "\n".join(out)


def _generation(g: dict) -> list[str]:
    out = ["## The model's own answers (`--data`)", "",
           "Prediction files (MedHallTune upload format): " + ", ".join(f"`{p}`" for p in g["prediction_files"]), ""]
    if g["answers_withheld_by_server"]:
        out += [f"> {g['answers_withheld_by_server']} answers were withheld by the server's policy (ABSTAIN); "
                "serve with `withhold_answer_on_abstain = false` to evaluate them.", ""]
    if "reference" in g:
        out += _table("answers vs reference answer", [(LABELS[k], _by_split(g["reference"], k)) for k in METRICS])
    out += _table("verdicts", _verdict_rows(g["verdicts"]))
    pr = g["premise_risk"]
    out += ["| guard | value |", "|---|---|",
            f"| premise_risk AUROC, negative vs positive questions | {_fmt(pr['auroc'])} |",
            f"| premise_risk ECE (as P(negative question)) | {_fmt(pr['ece'])} |", ""]
    if "phantom" in g:
        p = g["phantom"]
        h = p["p_hallucination"]
        out += ["| PhantomVQA (exact judge) | value |", "|---|---|",
                f"| accuracy on positive questions (95% interval) | "
                f"{with_interval(p['positive_accuracy'], p.get('positive_accuracy_ci95'))} |",
                f"| hallucination rate on negative questions (accepts the false premise; 95% interval) | "
                f"{with_interval(p['negative_hallucination_rate'], p.get('negative_hallucination_rate_ci95'))} |",
                f"| answers with any hallucination | {_fmt(p['hallucinated_any'])} |",
                f"| guard p_hallucination AUROC / AUPRC / ECE | {_fmt(h['auroc'])} / {_fmt(h['auprc'])} / "
                f"{_fmt(h['ece'])} |",
                f"| questions (positive / negative) | {p['positive_questions']} / {p['negative_questions']} |", ""]
    if "judge" in g:
        j = g["judge"]
        out += _table(f"LLM judge ({j['model']}): mean score", [(n, _by_split(j["mean_scores"], n)) for n in SCORE_NAMES])
        out += _table("guard Spearman vs LLM judge", [(n, _by_split(j["guard_spearman"], n)) for n in SCORE_NAMES])
        out += _table("guard vs LLM-judge label", _binary_rows("judge label", j["p_hallucination"]))
    return out


def _scored(s: dict) -> list[str]:
    out = ["## The guard on another model's answers (`--score-answers`, teacher forcing)", ""]
    if "reference" in s:
        out += _table("their answers vs reference answer", [(LABELS[k], _by_split(s["reference"], k)) for k in METRICS])
    out += _table("mean score: GPT-4o / guard",
                  [(n, [f"{_fmt(s['gpt4o_mean_scores'][c][n], 2)} / {_fmt(s['guard_mean_scores'][c][n], 2)}"
                        for c in _COLUMNS]) for n in SCORE_NAMES])
    out += _table("guard Spearman vs GPT-4o", [(n, _by_split(s["spearman_vs_gpt4o"], n)) for n in SCORE_NAMES])
    out += _table("guard vs GPT-4o label", _binary_rows("GPT-4o label", s["p_hallucination"]))
    pr = s["premise_risk"]
    out += ["| guard | value |", "|---|---|",
            f"| premise_risk AUROC, negative vs positive questions | {_fmt(pr['auroc'])} |", ""]
    out += _table("verdicts", _verdict_rows(s["verdicts"]))
    return out
