"""training.data: loading MedHallTune-format files, image checks, splits, mixing and writing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from training.data import (
    BLANK_IMAGE_NOTE,
    MalformedRowError,
    MissingImagesError,
    PolarityError,
    VqaExample,
    blank_image,
    load_examples,
    load_many,
    group_by_length,
    mix,
    parse_scores,
    split_by_image,
    write_llava_json,
    write_predictions,
)

ROOT = Path(__file__).resolve().parents[1]
MEDHALLTUNE = Path(__file__).resolve().parents[2] / "shared/data/medhalltune"
FIXTURES = Path(__file__).resolve().parent / "data"
VAL = {"positive": "val_positive_qa-filtered.jsonl", "negative": "val_negative_qa-filtered.jsonl"}
PRED = {
    "positive": "llava-med-prediction-postive-GPT4o-eval-filtered.jsonl",
    "negative": "llava-med-prediction-negative-GPT4o-eval-filtered.jsonl",
}
README_ROWS = {"positive": 669, "negative": 664}
# The README's means over the full validation set (this split holds 60% of its images).
README_MEANS = {"positive": (6.28, 6.78, 5.48, 7.39), "negative": (5.03, 5.39, 4.84, 5.89)}

needs_medhalltune = pytest.mark.skipif(
    not all((MEDHALLTUNE / f).is_file() for f in [*VAL.values(), *PRED.values()]),
    reason=f"the MedHallTune development files are not at {MEDHALLTUNE}",
)


def _load(name: str, **kw):
    return load_examples(MEDHALLTUNE / name, allow_missing_images=True, **kw)


@pytest.fixture(scope="module")
def pred():
    return {pol: _load(name) for pol, name in PRED.items()}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _val_row(qid=1, image="a.jpg", **extra) -> dict:
    return {"question_id": qid, "image": image, "text": f"Question {qid}?\n<image>", "gpt4_answer": "An answer.",
            "fig_caption": "A caption.", **extra}


def _pred_row(qid=1, image="a.jpg", result="7 8 6 9\n\nWhy.", **extra) -> dict:
    return {**_val_row(qid, image), "question": f"Question {qid}?", "answer": "Model says.", "result": result, **extra}


def _example(i: int, image: str, polarity="positive", source="s") -> VqaExample:
    return VqaExample(id=f"{source}:{i}", image=image, image_path=None, question=f"q{i}?", answer="a",
                      polarity=polarity, source=source)


# ---------------------------------------------------------------- the real files


@needs_medhalltune
@pytest.mark.parametrize("files", [VAL, PRED], ids=["val", "pred"])
def test_real_files_have_the_readme_row_counts_and_no_malformed_rows(files):
    for polarity, name in files.items():
        data = _load(name)
        assert len(data) == README_ROWS[polarity]
        assert data.malformed_rows == []
        assert len({ex.id for ex in data.examples}) == len(data)


@needs_medhalltune
def test_polarity_comes_from_the_file_name_including_the_postive_spelling(pred):
    assert pred["positive"].by_polarity() == {"positive": 669, "negative": 0}
    assert pred["negative"].by_polarity() == {"positive": 0, "negative": 664}
    assert _load(VAL["negative"]).by_polarity() == {"positive": 0, "negative": 664}


@needs_medhalltune
def test_questions_are_cleaned_of_the_image_marker(pred):
    for data in pred.values():
        for ex in data.examples:
            assert "<image>" not in ex.question and ex.question == ex.question.strip()


@needs_medhalltune
@pytest.mark.parametrize(
    "polarity, qid, scores",
    [
        ("positive", 7, (5, 5, 4, 8)),  # "5 5 4 8  \n\n..." trailing spaces
        ("positive", 478, (9, 10, 6, 10)),  # two-digit scores
        ("positive", 533, (1, 1, 1, 1)),  # explanation right on the next line
        ("negative", 1, (7, 8, 6, 9)),
        ("negative", 544, (9, 10, 7, 9)),  # "9 10 7 9 \n\n..."
    ],
)
def test_scores_match_rows_checked_by_eye(pred, polarity, qid, scores):
    ex = next(ex for ex in pred[polarity].examples if ex.question_id == qid)
    assert ex.scores == tuple(float(s) for s in scores)


@needs_medhalltune
def test_prediction_rows_keep_llava_med_answer_as_model_answer(pred):
    ex = pred["negative"].examples[0]
    assert ex.id == "medhalltune-pred-negative:1" and ex.image == "pmc_478390_0.jpg"
    assert ex.model_answer.startswith("It appears that there is no visible muscle tear")
    assert ex.answer.startswith("The image primarily focuses on the bone structure")
    assert ex.caption.startswith("The provided image appears to be a computed tomography")


@needs_medhalltune
def test_prediction_files_repeat_the_validation_rows(pred):
    for polarity, name in VAL.items():
        val = _load(name)
        assert [(e.question_id, e.question, e.answer) for e in val.examples] == [
            (e.question_id, e.question, e.answer) for e in pred[polarity].examples
        ]


@needs_medhalltune
@pytest.mark.parametrize("polarity", ["positive", "negative"])
def test_mean_scores_are_near_the_readme_table(pred, polarity):
    rows = [ex.scores for ex in pred[polarity].examples]
    means = tuple(sum(col) / len(col) for col in zip(*rows))
    print(f"{polarity}: measured {tuple(round(m, 2) for m in means)} vs README {README_MEANS[polarity]}")
    assert all(abs(m - r) <= 1.0 for m, r in zip(means, README_MEANS[polarity]))


@needs_medhalltune
def test_missing_images_error_counts_rows_and_images_and_says_what_to_do(tmp_path):
    with pytest.raises(MissingImagesError) as err:
        load_examples(MEDHALLTUNE / VAL["positive"])
    msg = str(err.value)
    assert "669 of 669 rows (118 images" in msg and "--image-dir DIR" in msg and "--allow-missing-images" in msg
    with pytest.raises(MissingImagesError, match=f"664 of 664 rows .* under {re.escape(str(tmp_path))}\\. "):
        load_examples(MEDHALLTUNE / VAL["negative"], tmp_path)
    with pytest.raises(MissingImagesError, match=r"\(no such folder\)"):
        load_examples(MEDHALLTUNE / VAL["negative"], tmp_path / "typo")


@needs_medhalltune
def test_allow_missing_images_keeps_rows_without_an_image_path():
    data = _load(VAL["positive"])
    assert data.missing_images == 669 and len(data.images()) == 118
    assert all(ex.image_path is None for ex in data.examples)


@needs_medhalltune
def test_images_resolve_against_the_image_dir(tmp_path):
    names = _load(VAL["positive"]).images()[:10]
    for name in names:
        (tmp_path / name).write_bytes(b"jpg")
    with pytest.raises(MissingImagesError, match=r"of 669 rows \(108 images"):
        load_examples(MEDHALLTUNE / VAL["positive"], tmp_path)
    data = load_examples(MEDHALLTUNE / VAL["positive"], tmp_path, allow_missing_images=True)
    found = [ex for ex in data.examples if ex.image_path is not None]
    assert {ex.image for ex in found} == set(names)
    assert all(ex.image_path == tmp_path / ex.image for ex in found)
    assert data.missing_images == len(data) - len(found)


@needs_medhalltune
def test_split_by_image_on_real_data_is_near_the_fractions(pred):
    examples = pred["positive"].examples + pred["negative"].examples
    parts = split_by_image(examples)
    images = {name: {ex.image for ex in part} for name, part in parts.items()}
    assert not images["train"] & images["heldout"]
    assert 0.1 <= len(images["heldout"]) / 236 <= 0.3
    assert sum(map(len, parts.values())) == len(examples)


@needs_medhalltune
def test_real_rows_round_trip_through_llava_json(tmp_path, pred):
    examples = pred["negative"].examples[:20]
    back = load_examples(write_llava_json(examples, tmp_path / "out.json"), allow_missing_images=True)
    assert back.examples == examples


# ---------------------------------------------------------------- parsing rules


def test_parse_scores_accepts_odd_separators():
    assert parse_scores("7 8 6 9") == (7.0, 8.0, 6.0, 9.0)
    assert parse_scores("\n 7,8, 6 ,9 \nexplanation 1 2") == (7.0, 8.0, 6.0, 9.0)
    assert parse_scores("Scores: 7/10 8/10\t6/10 9/10") == (7.0, 8.0, 6.0, 9.0)


@pytest.mark.parametrize("result", ["7 8 6", "7 8 6 9 5", "0 8 6 9", "7 8 6 11", "", "The answer is good."])
def test_parse_scores_rejects_wrong_count_or_range(result):
    with pytest.raises(ValueError):
        parse_scores(result)


@pytest.mark.parametrize(
    "name, row_polarity, expected",
    [("x_postive.jsonl", None, "positive"), ("x_positive.jsonl", None, "positive"),
     ("x_negative.jsonl", None, "negative"), ("x_negative.jsonl", "positive", "positive")],
)
def test_polarity_comes_from_a_row_key_before_the_file_name(tmp_path, name, row_polarity, expected):
    row = _val_row() if row_polarity is None else _val_row(polarity=row_polarity)
    data = load_examples(_write_jsonl(tmp_path / name, [row]), allow_missing_images=True)
    assert data.examples[0].polarity == expected and data.examples[0].source == f"medhalltune-val-{expected}"


def test_no_polarity_anywhere_asks_for_the_polarity_argument(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [_val_row()])
    with pytest.raises(PolarityError, match="polarity='positive' or polarity='negative'"):
        load_examples(path, allow_missing_images=True)
    assert load_examples(path, polarity="negative", allow_missing_images=True).by_polarity()["negative"] == 1


def test_malformed_rows_are_counted_not_fatal(tmp_path):
    rows = [
        _pred_row(1),
        "{not json",
        {k: v for k, v in _pred_row(3).items() if k != "gpt4_answer"},
        _pred_row(4, result="great answer\n7 8 6 9"),
        {**_pred_row(5), "question": "A different question?"},
        _pred_row(1),
    ]
    data = load_examples(_write_jsonl(tmp_path / "pred_positive.jsonl", rows), allow_missing_images=True)
    assert [ex.question_id for ex in data.examples] == [1, 4]
    assert data.examples[1].scores is None  # kept: only its scores are unreadable
    assert [m.split(":")[0] for m in data.malformed_rows] == [f"pred_positive.jsonl row {n}" for n in (2, 3, 4, 5, 6)]
    assert "missing field 'gpt4_answer'" in data.malformed_rows[1] and "duplicate id" in data.malformed_rows[4]


def test_strict_mode_raises_with_the_row_number(tmp_path):
    path = _write_jsonl(tmp_path / "pred_negative.jsonl", [_pred_row(1), _pred_row(2, result="7 8 six 9")])
    with pytest.raises(MalformedRowError, match="pred_negative.jsonl row 2: scores unreadable"):
        load_examples(path, allow_missing_images=True, strict=True)


def test_a_bad_first_row_does_not_change_the_file_kind(tmp_path):
    first = {k: v for k, v in _pred_row(1).items() if k != "result"}
    path = _write_jsonl(tmp_path / "pred_negative.jsonl", [first, _pred_row(2), _pred_row(3)])
    data = load_examples(path, allow_missing_images=True)
    assert [ex.source for ex in data.examples] == ["medhalltune-pred-negative"] * 2
    assert data.malformed_rows == ["pred_negative.jsonl row 1: missing field 'result'"]


def test_example_validation_names_the_field():
    with pytest.raises(ValueError, match="`polarity`"):
        _example(1, "a.jpg", polarity="neutral")
    with pytest.raises(ValueError, match="`scores`"):
        VqaExample(id="s:1", image="a", image_path=None, question="q", answer="a", polarity="positive",
                   source="s", scores=(7.0, 8.0, 6.0))


def test_blank_image_is_mid_gray_and_comes_with_a_note():
    img = blank_image(16)
    assert img.size == (16, 16) and img.getpixel((3, 5)) == (128, 128, 128)
    assert "\n" not in BLANK_IMAGE_NOTE and "blank" in BLANK_IMAGE_NOTE


# ---------------------------------------------------------------- LLaVA JSON


def test_llava_json_takes_each_turn_pair_as_an_example():
    data = load_examples(FIXTURES / "llava_multiturn.json", allow_missing_images=True)
    first, second, third = data.examples
    source = "llava-json:llava_multiturn"
    assert [ex.id for ex in data.examples] == [f"{source}:ph-001:0", f"{source}:ph-001:1", f"{source}:ph-002"]
    assert second.question == "Is there a round lesion in the left half?" and first.question == "What modality is this image?"
    assert first.meta == {"label": {"lesions": 1, "side": "left"}, "generator": "phantomvqa-0.1"}
    assert third.polarity == "negative" and third.scores == (3.0, 4.0, 5.0, 2.0)
    assert third.question == "Where is the pneumothorax in this image?"


def test_llava_json_round_trip_keeps_every_field(tmp_path):
    (tmp_path / "phantom_001.png").write_bytes(b"png")
    data = load_examples(FIXTURES / "llava_multiturn.json", tmp_path, allow_missing_images=True)
    back = load_examples(write_llava_json(data.examples, tmp_path / "copy.json"), tmp_path, allow_missing_images=True)
    assert back.examples == data.examples and back.missing_images == data.missing_images == 1


# ---------------------------------------------------------------- splitting and mixing


def test_split_by_image_keeps_each_image_on_one_side():
    examples = [_example(i, f"img{i % 30}.jpg") for i in range(120)]
    parts = split_by_image(examples, {"train": 0.5, "val": 0.3, "heldout": 0.2}, seed=3)
    sides = {}
    for name, part in parts.items():
        for ex in part:
            assert sides.setdefault(ex.image, name) == name


def test_split_by_image_is_deterministic_and_stable_across_runs():
    examples = [_example(i, f"img{i}.jpg") for i in range(12)]
    heldout = [ex.image for ex in split_by_image(examples, seed=0)["heldout"]]
    assert heldout == [ex.image for ex in split_by_image(examples, seed=0)["heldout"]]
    assert heldout == ["img3.jpg", "img4.jpg", "img7.jpg", "img10.jpg", "img11.jpg"]  # pinned: SHA-256, not Python's salted hash()
    assert split_by_image(examples, seed=1) != split_by_image(examples, seed=0)


def test_mix_respects_weights_and_is_deterministic():
    a = [_example(i, "a.jpg", source="a") for i in range(200)]
    b = [_example(i, "b.jpg", source="b") for i in range(200)]
    mixed = mix([(a, 3.0), (b, 1.0)], 100, seed=0)
    assert sum(ex.source == "a" for ex in mixed) == 75 and len({ex.id for ex in mixed}) == 100
    assert mixed == mix([(a, 3.0), (b, 1.0)], 100, seed=0)
    assert mixed != mix([(a, 3.0), (b, 1.0)], 100, seed=1)


def test_mix_repeats_a_source_smaller_than_its_share():
    small = [_example(i, "s.jpg", source="s") for i in range(3)]
    big = [_example(i, "b.jpg", source="b") for i in range(100)]
    mixed = mix([(small, 1.0), (big, 1.0)], 20, seed=0)
    counts = [sum(ex.id == e.id for ex in mixed) for e in small]
    assert sorted(counts) == [3, 3, 4]


def test_group_by_length_cuts_padding_and_keeps_every_example_once():
    rng = __import__("random").Random(0)
    lengths = [rng.choice([20, 60]) + rng.randrange(5) for _ in range(400)]  # two sources, short and long
    order = group_by_length(lengths, batch_size=8, seed=0, window=10)
    assert sorted(order) == list(range(400))

    def padded(o):
        return sum(8 * max(lengths[i] for i in o[j : j + 8]) for j in range(0, len(o), 8))

    assert padded(order) < 0.8 * padded(list(range(400)))  # random order pads nearly every batch to ~60
    assert order == group_by_length(lengths, batch_size=8, seed=0, window=10)
    assert order != group_by_length(lengths, batch_size=8, seed=1, window=10)
    with pytest.raises(ValueError, match="batch_size"):
        group_by_length(lengths, batch_size=0)


def test_load_many_mixes_files_and_records_their_hashes(tmp_path):
    pos = _write_jsonl(tmp_path / "val_positive.jsonl", [_val_row(i) for i in range(10)])
    neg = _write_jsonl(tmp_path / "val_negative.jsonl", [_val_row(i) for i in range(10)])
    data = load_many([(pos, 1.0), (neg, 1.0)], 8, allow_missing_images=True)
    assert data.by_polarity() == {"positive": 4, "negative": 4} and data.missing_images == 8
    assert set(data.sha256) == {str(pos.resolve()), str(neg.resolve())}
    with pytest.raises(ValueError, match="share example id"):
        load_many([(pos, 1.0), (pos, 1.0)], 8, allow_missing_images=True)


# ---------------------------------------------------------------- predictions


def test_prediction_file_has_exactly_the_upload_keys(tmp_path):
    path = _write_jsonl(tmp_path / "val_negative.jsonl", [_val_row(3), _val_row(9)])
    data = load_examples(path, allow_missing_images=True)
    out = write_predictions([(ex, f"answer {ex.question_id}") for ex in data.examples], tmp_path / "pred.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"question_id": 3, "image": "a.jpg", "question": "Question 3?", "answer": "answer 3"}
    assert all(set(r) == {"question_id", "image", "question", "answer"} for r in rows)


def test_prediction_file_refuses_repeated_question_ids(tmp_path):
    ex_pos, ex_neg = _example(1, "a.jpg", "positive", "p"), _example(1, "b.jpg", "negative", "n")
    with pytest.raises(ValueError, match="a file of its own"):
        write_predictions([(ex_pos, "x"), (ex_neg, "y")], tmp_path / "pred.jsonl")


def test_the_data_module_imports_without_torch_or_pil():
    code = "import sys, training.data; bad = [m for m in ('torch', 'PIL', 'transformers') if m in sys.modules]; "
    code += "assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
