"""`medhallguard eval`: prediction files, reference metrics, guard metrics, score-answers, PhantomVQA, bad input.

Models are the session's nano random-init models (their answers and scores
mean nothing; the tests check the plumbing and the arithmetic), data are small
slices of the real MedHallTune dev files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.data import DEFAULT_MEDHALLTUNE_DIR

MHT = DEFAULT_MEDHALLTUNE_DIR
VAL = {p: MHT / f"val_{p}_qa-filtered.jsonl" for p in ("positive", "negative")}
PRED = {"positive": MHT / "llava-med-prediction-postive-GPT4o-eval-filtered.jsonl",
        "negative": MHT / "llava-med-prediction-negative-GPT4o-eval-filtered.jsonl"}
UPLOAD_KEYS = ["question_id", "image", "question", "answer"]  # the format, written out independently

pytestmark = pytest.mark.skipif(not VAL["positive"].is_file(), reason="MedHallTune dev split not beside the repo")


def _slice(src: Path, tmp: Path, n: int) -> Path:
    """The first n rows of a dev file, under the same name (the name says the polarity)."""
    out = tmp / src.name
    out.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return out


@pytest.fixture(scope="module")
def runner(nano_models):
    from evaluation.run import InProcessRunner

    return InProcessRunner(nano_models["smolvlm"])


def test_eval_writes_one_upload_file_per_input_and_a_report_split_by_polarity(runner, tmp_path):
    from evaluation.cli import evaluate

    data = [_slice(VAL[p], tmp_path, 3) for p in ("positive", "negative")]
    logged = []
    report = evaluate(runner, tmp_path / "out", data, allow_missing_images=True, max_new_tokens=4,
                      text_metrics=False, log=logged.append)

    for src in data:
        pred = tmp_path / "out" / "predictions" / f"{src.stem}.predictions.jsonl"
        rows = [json.loads(line) for line in pred.read_text().splitlines()]
        source = [json.loads(line) for line in src.read_text().splitlines()]
        assert [list(r) for r in rows] == [UPLOAD_KEYS] * 3
        assert [r["question_id"] for r in rows] == [s["question_id"] for s in source]
        assert [r["question"] for r in rows] == [s["text"].replace("<image>", "").strip() for s in source]
        assert all(isinstance(r["answer"], str) for r in rows)
    g = report["generation"]
    assert g["questions"] == {"positive": 3, "negative": 3}
    assert sum(g["verdicts"]["positive"].values()) == 3 and sum(g["verdicts"]["all"].values()) == 6
    assert g["premise_risk"]["n"] == 6 and 0.0 <= g["premise_risk"]["auroc"] <= 1.0
    # missing images are said loudly: in the log, the JSON and the Markdown
    assert report["run"]["blank_images"] == 6 and any("BLANK image" in line for line in logged)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "run on a blank image" in md and "| verdicts | positive | negative | all |" in md
    assert json.loads((tmp_path / "out" / "report.json").read_text())["run"]["model"]["heads_trained"] is False


@pytest.mark.parametrize("line, why", [
    ('{"question_id": 1, "image": "a.jpg", "question": "q?"}', "expected exactly the keys"),
    ('{"question_id": 1, "image": "a.jpg", "question": "q?", "answer": "a", "extra": 1}', "expected exactly the keys"),
    ('{"question_id": null, "image": "a.jpg", "question": "q?", "answer": "a"}', "question_id must be"),
    ('{"question_id": 1, "image": "a.jpg", "question": "q?", "answer": 5}', "answer a string"),
    ('{"question_id": 1, "image": "a.jpg", "question": "q?", "answer": "a"', "not JSON"),
    ('{"question_id": 0, "image": "a.jpg", "question": "q?", "answer": "a"}', "repeats"),
])
def test_prediction_file_check_names_the_bad_line(tmp_path, line, why):
    from evaluation.cli import EvalInputError, check_prediction_file

    path = tmp_path / "p.jsonl"
    path.write_text('{"question_id": 0, "image": "a.jpg", "question": "q?", "answer": "a"}\n' + line + "\n")
    with pytest.raises(EvalInputError, match=f"line 2: .*{why}"):
        check_prediction_file(path)


def test_prediction_file_check_accepts_the_written_file_and_checks_its_ids(tmp_path):
    from evaluation.cli import EvalInputError, check_prediction_file

    path = tmp_path / "p.jsonl"
    path.write_text('{"question_id": 7, "image": "a.jpg", "question": "q?", "answer": ""}\n')
    assert check_prediction_file(path, [7]) == 1
    with pytest.raises(EvalInputError, match="do not match"):
        check_prediction_file(path, [7, 8])


def test_abstain_text_replaces_abstained_answers_in_the_upload_file(runner, tmp_path):
    from evaluation.cli import evaluate

    data = [_slice(VAL["positive"], tmp_path, 2)]
    # untrained heads always abstain, so every answer is replaced
    evaluate(runner, tmp_path / "out", data, allow_missing_images=True, max_new_tokens=2, text_metrics=False,
             abstain_text="I cannot answer this reliably.", log=lambda *_: None)
    rows = (tmp_path / "out" / "predictions" / f"{data[0].stem}.predictions.jsonl").read_text().splitlines()
    assert [json.loads(r)["answer"] for r in rows] == ["I cannot answer this reliably."] * 2


def test_identical_text_scores_perfectly_and_unrelated_text_does_not():
    from evaluation.text_metrics import reference_metrics

    ref = ["There is a large right pleural effusion with compressive atelectasis of the lower lobe."]
    same = reference_metrics(ref, ref)["all"]
    assert same["rouge1"] == same["rouge2"] == same["rougeL"] == 1.0
    assert same["bleu"] == pytest.approx(100.0)
    assert same["meteor"] > 0.99  # METEOR keeps a small fragmentation penalty even for identical text
    assert same["minilm_cosine"] == pytest.approx(1.0, abs=1e-5)
    other = reference_metrics(["The weather in Paris was sunny on Tuesday."], ref)["all"]
    assert other["rouge1"] < 0.2 and other["bleu"] < 5 and other["meteor"] < 0.2 and other["minilm_cosine"] < 0.3


def test_meteor_matches_wordnet_synonyms():
    from evaluation.text_metrics import meteor

    # "big" and "great" share a WordNet 3.0 synset; "blue" and "great" do not. (nltk matches synonyms
    # after stemming the unmatched words, so a pair like big/large, "large" -> "larg", is not matched.)
    assert meteor("a big mass in the lung", "a great mass in the lung") > meteor("a blue mass in the lung",
                                                                                 "a great mass in the lung")


def test_empty_answers_score_zero_not_an_error():
    from evaluation.text_metrics import reference_metrics

    m = reference_metrics([""], ["A small nodule."])["all"]
    assert m["rouge1"] == 0.0 and m["meteor"] == 0.0 and m["bleu"] == 0.0


def test_score_answers_correlates_the_guard_with_gpt4o_and_derives_the_label_from_its_scores(runner, tmp_path):
    from evaluation.cli import evaluate
    from training.data import load_examples

    files = [_slice(PRED[p], tmp_path, 8) for p in ("positive", "negative")]
    report = evaluate(runner, tmp_path / "out", score_answers=files, allow_missing_images=True,
                      hallucination_threshold=5, log=lambda *_: None)
    s = report["score_answers"]
    gpt = [e.scores for f in files for e in load_examples(f, allow_missing_images=True).examples]
    assert s["p_hallucination"]["all"]["positives"] == sum(g[0] <= 5 for g in gpt)
    assert s["p_hallucination"]["all"]["n"] == 16
    assert set(s["spearman_vs_gpt4o"]["all"]) == {"clinical_accuracy", "clinical_relevance", "detail_level",
                                                  "risk_level"}
    assert all(v is None or -1 <= v <= 1 for v in s["spearman_vs_gpt4o"]["all"].values())
    assert s["gpt4o_mean_scores"]["positive"]["clinical_accuracy"] == pytest.approx(
        sum(g[0] for g in gpt[:8]) / 8, abs=1e-3)
    assert 0.0 <= s["premise_risk"]["auroc"] <= 1.0
    assert 0.0 < s["reference"]["all"]["rouge1"] < 1.0  # LLaVA-Med's answers vs GPT-4's reference answers
    assert (tmp_path / "out" / "reliability.png").stat().st_size > 1000
    assert not (tmp_path / "out" / "predictions").exists()  # scoring writes no upload file


def test_score_answers_refuses_files_without_another_models_answers(runner, tmp_path):
    from evaluation.cli import EvalInputError, evaluate

    with pytest.raises(EvalInputError, match="--score-answers takes scored prediction files"):
        evaluate(runner, tmp_path, score_answers=[_slice(VAL["positive"], tmp_path, 2)], allow_missing_images=True)


def test_phantom_rows_get_the_exact_judges_figures(runner, tmp_path):
    from evaluation.cli import evaluate
    from training.phantom import write_dataset

    write_dataset(tmp_path / "phantom", n_images=2, seed=1, splits={"heldout": 1.0}, questions_per_image=4)
    report = evaluate(runner, tmp_path / "out", [tmp_path / "phantom" / "heldout.json"],
                      image_dir=tmp_path / "phantom" / "images", max_new_tokens=4, text_metrics=False,
                      log=lambda *_: None)
    p = report["generation"]["phantom"]
    assert p["positive_questions"] + p["negative_questions"] == 8
    assert report["run"]["blank_images"] == 0
    assert p["p_hallucination"]["n"] == 8 and 0.0 <= p["hallucinated_any"] <= 1.0
    lo, hi = p["positive_accuracy_ci95"]
    assert lo <= p["positive_accuracy"] <= hi and hi - lo > 0.3  # a handful of questions: a wide interval
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"| accuracy on positive questions (95% interval) | {p['positive_accuracy']:.3f} ({lo:.3f} to {hi:.3f}) |" in md


# --- bad input ----------------------------------------------------------------


def test_a_missing_data_file_is_named(runner, tmp_path):
    from evaluation.cli import EvalInputError, evaluate

    with pytest.raises(EvalInputError, match="no such data file: .*nope.jsonl"):
        evaluate(runner, tmp_path, [tmp_path / "nope.jsonl"])


def test_a_malformed_line_is_named_by_its_line_number(tmp_path, capsys):
    from server.cli import main

    src = VAL["positive"].read_text().splitlines()
    bad = tmp_path / "val_positive_qa-filtered.jsonl"
    bad.write_text("\n".join([src[0], src[1], '{"question_id": 3, "image": "x.jpg"', src[3]]) + "\n")
    code = main(["eval", "--model", "unused-model-dir", "--data", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "row 3" in err and "invalid JSON" in err and "--skip-malformed" in err


def test_rows_without_images_stop_the_run_unless_allowed(runner, tmp_path):
    from evaluation.cli import evaluate
    from training.data import MissingImagesError

    with pytest.raises(MissingImagesError, match="--allow-missing-images"):
        evaluate(runner, tmp_path, [_slice(VAL["positive"], tmp_path, 2)], image_dir=tmp_path)


def test_cli_without_data_or_target_explains_itself(tmp_path, capsys):
    from server.cli import main

    assert main(["eval", "--model", "m", "--out", str(tmp_path)]) == 2
    assert "pass --data FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no --model/--bundle/--server: argparse says so
        main(["eval", "--data", str(VAL["positive"])])


def test_eval_through_a_grpc_server(tmp_path):
    from evaluation.cli import evaluate
    from evaluation.run import RemoteRunner
    from tests.fakes import FakeGuard, serve_in_thread

    with serve_in_thread(FakeGuard(answer_text="No effusion is seen.")) as server:
        runner = RemoteRunner(f"127.0.0.1:{server.port}")
        report = evaluate(runner, tmp_path / "out", [_slice(VAL["negative"], tmp_path, 3)],
                          allow_missing_images=True, text_metrics=False, log=lambda *_: None)
    assert report["run"]["model"]["runs"].startswith("gRPC server")
    rows = (tmp_path / "out" / "predictions" / "val_negative_qa-filtered.predictions.jsonl").read_text().splitlines()
    assert [json.loads(r)["answer"] for r in rows] == ["No effusion is seen."] * 3
    assert report["generation"]["verdicts"]["negative"] == {"VERDICT_ANSWER": 3}


def test_eval_help_shows_examples_and_the_judge_environment(capsys):
    from server.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "examples:" in out and "MEDHALLGUARD_JUDGE_BASE_URL" in out


def test_exclude_images_in_drops_rows_of_those_images_and_counts_them(runner, tmp_path):
    from evaluation.cli import EvalInputError, evaluate

    data = _slice(VAL["positive"], tmp_path, 7)  # rows 1-5 share one image, rows 6-7 have another
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    train = tmp_path / "train_negative.jsonl"  # stands in for a model's training data
    train.write_text(json.dumps({**rows[0], "question_id": 99}) + "\n")
    report = evaluate(runner, tmp_path / "out", [data], allow_missing_images=True, max_new_tokens=2,
                      text_metrics=False, exclude_images_in=[train], log=lambda *_: None)
    kept = sum(r["image"] != rows[0]["image"] for r in rows)
    assert kept == 2 and report["generation"]["questions"]["positive"] == 2
    assert report["run"]["data"][0]["excluded_rows"] == 5
    with pytest.raises(EvalInputError, match="no rows .* left"):
        evaluate(runner, tmp_path / "out", [train], allow_missing_images=True, exclude_images_in=[train])


def test_skip_malformed_skips_and_reports_the_bad_line(runner, tmp_path):
    from evaluation.cli import evaluate

    src = VAL["negative"].read_text().splitlines()
    bad = tmp_path / "val_negative_qa-filtered.jsonl"
    bad.write_text("\n".join([src[0], "not json", src[2]]) + "\n")
    logged = []
    report = evaluate(runner, tmp_path / "out", [bad], allow_missing_images=True, skip_malformed=True,
                      max_new_tokens=2, text_metrics=False, log=logged.append)
    assert report["generation"]["questions"]["negative"] == 2
    assert any(line.startswith("skipped:") and "row 2" in line for line in logged)
    assert "1 malformed rows SKIPPED" in (tmp_path / "out" / "report.md").read_text()
    assert "row 2" in report["run"]["data"][0]["skipped_malformed_rows"][0]


def test_ask_requests_carry_max_new_tokens_from_construction_and_none_without_it(tmp_path):
    from training.data import load_examples
    from training.evaluate import ask_requests

    examples = load_examples(_slice(VAL["positive"], tmp_path, 2), None, allow_missing_images=True).examples
    capped = ask_requests(examples, max_new_tokens=7)
    assert [r.generation.max_new_tokens for r in capped] == [7, 7]
    assert not any(r.HasField("generation") for r in ask_requests(examples))  # the server's default applies


def test_the_default_report_shows_the_premise_ablation_from_the_build_record(tmp_path):
    import json

    from training.evaluate import _premise_head_record, render_markdown

    assert _premise_head_record(tmp_path) is None  # no build record: nothing to show
    ablation = {"medhalltune": {"hidden": 0.93, "ngrams": 0.91, "both": 0.95}, "phantom": {"both": 1.0}}
    (tmp_path / "build_record.json").write_text(json.dumps({"head_calibration": {
        "premise_fit_rows": "all", "premise_ablation": ablation, "p_hallucination_auroc": 0.9}}))
    record = _premise_head_record(tmp_path)
    assert record == {"premise_fit_rows": "all", "premise_ablation": ablation}
    rates = {"positive_accuracy": 0.5, "negative_hallucination_rate": 0.1, "negative_hallucination_rate_after_guard": 0.0,
             "positive_questions": 1, "negative_questions": 1, "verdicts": {"VERDICT_ANSWER": 2}}
    report = {"phantom": {"tuned": rates, "baseline": rates, "hallucinated_generations": 1,
                          "guard_auroc_tuned_and_baseline_generations": 0.9, "guard_auroc_tuned_generations": 0.9,
                          "guard_ece": 0.1},
              "medhalltune": {"heldout_questions": 2, "premise_auroc_guard": 0.96, "premise_auroc_tfidf_logreg": 0.94,
                              "spearman_guard": {}, "spearman_tfidf_ridge": {}, "premise_head": record}}
    md = render_markdown(report)
    assert "| both (the served head, before its refit on every row) | 0.950 |" in md and "| question hidden states only | 0.930 |" in md
    report["medhalltune"]["premise_head"] = None
    assert "ablation" not in render_markdown(report)


def test_rates_by_kind_counts_accuracy_for_positive_kinds_and_acceptance_for_negative_ones():
    from types import SimpleNamespace as NS

    from training.evaluate import rates_by_kind

    ex = [NS(meta={"kind": "side"}, polarity="positive")] * 2 + [NS(meta={"kind": "wrong_side"}, polarity="negative")] * 4
    js = [NS(correct=True, accepted_false_premise=False), NS(correct=False, accepted_false_premise=False)] + \
         [NS(correct=False, accepted_false_premise=a) for a in (True, False, False, False)]
    out = rates_by_kind(ex, js)
    assert list(out) == ["side", "wrong_side"]
    assert out["side"] == {"polarity": "positive", "n": 2, "accuracy": 0.5}
    assert out["wrong_side"] == {"polarity": "negative", "n": 4, "hallucination_rate": 0.25}


def test_presence_by_finding_splits_presence_questions_by_finding_and_whether_it_is_there():
    from types import SimpleNamespace as NS

    from training.evaluate import presence_by_finding

    def q(kind, finding, present):
        return NS(meta={"kind": kind, "label": {"finding": finding, "present": present}})

    ex = [q("presence", "nodule", True), q("presence", "nodule", True), q("presence", "nodule", False),
          q("presence", "mass", False), q("side", "nodule", True), NS(meta={"kind": "modality", "label": {}})]
    js = [NS(correct=c) for c in (True, False, True, False, True, True)]
    out = presence_by_finding(ex, js)
    assert list(out) == ["mass", "nodule"]  # side and modality questions are not presence questions
    assert out["nodule"] == {"present": {"n": 2, "accuracy": 0.5}, "absent": {"n": 1, "accuracy": 1.0}}
    assert out["mass"] == {"present": {"n": 0, "accuracy": None}, "absent": {"n": 1, "accuracy": 0.0}}


def test_the_wilson_interval_brackets_the_rate_and_narrows_with_more_questions():
    from training.metrics import proportion_interval

    lo, hi = proportion_interval(0, 10)
    assert lo == 0.0 and abs(hi - 0.2775) < 1e-3  # the textbook Wilson bound for 0 of 10
    small, large = proportion_interval(7, 10), proportion_interval(700, 1000)
    assert small[0] < 0.7 < small[1] and large[0] < 0.7 < large[1]
    assert large[1] - large[0] < small[1] - small[0]
    assert all(np.isnan(proportion_interval(0, 0)))


def test_the_paired_bootstrap_separates_a_better_guard_from_noise_and_not_from_itself():
    from training.metrics import auroc, bootstrap_interval

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    good, weak = y + rng.normal(0, 0.5, 400), y + rng.normal(0, 3.0, 400)
    gain = lambda y, a, b: auroc(y, a) - auroc(y, b)  # noqa: E731
    lo, hi = bootstrap_interval(gain, y, good, weak)
    assert 0 < lo < auroc(y, good) - auroc(y, weak) < hi
    assert bootstrap_interval(gain, y, good, good) == (0.0, 0.0)  # paired: the same scores never differ
    lo, hi = bootstrap_interval(auroc, y, weak)
    assert lo < auroc(y, weak) < hi
    assert all(np.isnan(bootstrap_interval(auroc, np.zeros(50), rng.random(50))))  # one class: undefined


def test_the_default_report_shows_intervals_and_the_gain_over_each_text_baseline():
    from training.evaluate import render_markdown

    rates = {"positive_accuracy": 0.727, "positive_accuracy_ci95": [0.673, 0.776], "negative_hallucination_rate": 0.054,
             "negative_hallucination_rate_ci95": [0.034, 0.086], "negative_hallucination_rate_after_guard": 0.04,
             "positive_questions": 286, "negative_questions": 314, "verdicts": {}}
    report = {"phantom": {"tuned": rates, "baseline": {**rates, "positive_accuracy_ci95": [None, None]},
                          "hallucinated_generations": 1, "guard_auroc_tuned_and_baseline_generations": 0.925,
                          "guard_auroc_tuned_and_baseline_generations_ci95": [0.9, 0.95],
                          "guard_auroc_tuned_generations": 0.86, "guard_ece": 0.03},
              "medhalltune": {"heldout_questions": 272, "premise_auroc_guard": 0.968, "premise_auroc_tfidf_logreg": 0.942,
                              "premise_auroc_gain_over_tfidf_ci95": [0.004, 0.05],
                              "spearman_guard": {"risk_level": 0.474}, "spearman_tfidf_ridge": {"risk_level": 0.369},
                              "spearman_gain_over_tfidf_ci95": {"risk_level": [-0.02, 0.23]}, "premise_head": None}}
    md = render_markdown(report)
    assert "| accuracy on positive questions | 0.727 (0.673 to 0.776) | 0.727 |" in md  # no interval: the value alone
    assert "| 0.925 (0.900 to 0.950) |" in md and "| p(hallucination) AUROC, tuned answers only | 0.860 |" in md
    assert "| 0.942 | +0.004 to +0.050 |" in md
    assert "| risk_level Spearman vs GPT-4o (baseline: TF-IDF + ridge) | 0.474 | 0.369 | -0.020 to +0.230 |" in md
