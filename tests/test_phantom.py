"""Tests for training.phantom (cases, images, questions, dataset files) and training.phantom_judge."""

from __future__ import annotations

import io
import json
import re
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest

from training.phantom import (
    DISC_KINDS,
    NEGATIVE_KINDS,
    NOUNS,
    PLURALS,
    POSITIVE_KINDS,
    QA,
    REFERENCE_SIZE,
    Case,
    Finding,
    finding_masks,
    generate,
    main,
    pixel_spacing_mm,
    questions_for,
    render,
    size_within_tolerance,
    write_dataset,
)
from training.phantom_judge import judge


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    return generate(120, seed=3)


@pytest.fixture(scope="module")
def qa_set(cases) -> list[tuple[Case, QA]]:
    rng = np.random.default_rng(0)
    return [(c, qa) for c in cases for qa in questions_for(c, rng)]


def _png(case: Case, size: int = 64) -> bytes:
    buf = io.BytesIO()
    render(case, size).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(case: Case, size: int = 64) -> np.ndarray:
    return np.asarray(render(case, size), dtype=np.float64)


def _pixel_of(case: Case, size: int, x_mm: float, y_mm: float) -> tuple[int, int]:
    sp = pixel_spacing_mm(case, size)
    return int(y_mm / sp + size / 2), int(x_mm / sp + size / 2)


# ---- determinism -------------------------------------------------------------------------------


def test_same_seed_gives_identical_pngs_and_questions():
    a, b = generate(8, seed=11), generate(8, seed=11)
    assert a == b
    assert [_png(c) for c in a] == [_png(c) for c in b]
    qa = [questions_for(c, np.random.default_rng(5)) for c in a]
    qb = [questions_for(c, np.random.default_rng(5)) for c in b]
    assert qa == qb


def test_different_seed_gives_different_cases_and_images():
    a, b = generate(8, seed=11), generate(8, seed=12)
    assert [c.seed for c in a] != [c.seed for c in b]
    assert all(_png(x) != _png(y) for x, y in zip(a, b))


# ---- images against their own labels -----------------------------------------------------------


def test_render_gives_grayscale_images_of_the_requested_size(cases):
    for size in (64, 128, 200):
        image = render(cases[0], size)
        assert image.mode == "L" and image.size == (size, size)
    assert pixel_spacing_mm(cases[0], 128) == pytest.approx(cases[0].pixel_spacing_mm * REFERENCE_SIZE / 128)
    assert 5.0 < cases[0].pixel_spacing_mm < 6.0  # ~350 mm field at 64 px


def test_removing_findings_changes_only_their_pixels(cases):
    for case in cases:
        bare = replace(case, findings=())
        with_f, without = _pixels(case), _pixels(bare)
        if not case.findings:
            assert _png(case) == _png(bare)
            continue
        masks = finding_masks(case, 64)
        assert not ((with_f != without) & ~np.any(masks, axis=0)).any(), case.case_id
        for f, mask in zip(case.findings, masks):  # each finding is visible at 64 px
            assert np.abs(with_f - without)[mask].max() >= 35, (case.case_id, f.kind)


def test_disc_findings_are_brighter_than_the_lung_around_them(cases):
    size = 128
    for case in cases:
        if not any(f.kind in DISC_KINDS for f in case.findings):
            continue
        img, bare = _pixels(case, size), _pixels(replace(case, findings=()), size)
        sp = pixel_spacing_mm(case, size)
        yy, xx = np.mgrid[:size, :size]
        for f in (f for f in case.findings if f.kind in DISC_KINDS):
            for cx, cy in f.centers_mm:
                i, j = _pixel_of(case, size, cx, cy)
                assert (img - bare)[i - 1:i + 2, j - 1:j + 2].max() > 60, (case.case_id, f.kind)
                r = np.hypot((xx + 0.5 - size / 2) * sp - cx, (yy + 0.5 - size / 2) * sp - cy)
                ring = (r > f.size_mm / 2 + sp) & (r < f.size_mm / 2 + 4 * sp)
                assert img[i, j] - np.median(bare[ring]) > 30, (case.case_id, f.kind)


def test_effusion_brightens_the_lower_zone_of_its_side():
    cases = [c for c in generate(300, seed=4) if c.finding("effusion") and c.modality == "chest X-ray"][:6]
    assert cases
    for case in cases:
        f = case.finding("effusion")
        others = tuple(g for g in case.findings if g is not f)
        delta = _pixels(case) - _pixels(replace(case, findings=others))  # the effusion alone
        lower = delta[40:, :]  # the lung bases lie in the bottom third of the image
        named = lower[:, :32] if f.side == "right" else lower[:, 32:]  # patient's right is image left
        other = lower[:, 32:] if f.side == "right" else lower[:, :32]
        assert named.mean() > 3 and named.mean() > other.mean() + 3, case.case_id


def test_findings_lie_on_the_image_half_of_the_patients_side(cases):
    for case in cases:
        for f, mask in zip(case.findings, finding_masks(case, 64)):
            cols = np.nonzero(mask)[1]
            centre = cols.mean() + 0.5
            assert (centre < 32) if f.side == "right" else (centre > 32), (case.case_id, f)
            assert all((x < 0) == (f.side == "right") for x, _ in f.centers_mm)


def test_normal_cases_exist_and_findings_respect_their_specs(cases):
    assert any(not c.findings for c in cases)
    assert any(len(c.findings) == 2 for c in cases)
    assert {c.modality for c in cases} == {"chest X-ray", "axial CT"}
    for c in cases:
        for f in c.findings:
            assert c.slice_level in (None, f.zone)


@pytest.mark.parametrize("kwargs,field", [
    (dict(kind="tumour"), "kind"), (dict(side="both"), "side"), (dict(zone="apex"), "zone"),
    (dict(size_mm=0), "size_mm"), (dict(count=3, kind="mass"), "count"),
])
def test_invalid_finding_fields_are_rejected_by_name(kwargs, field):
    base = dict(kind="nodule", side="left", zone="upper", size_mm=20, count=1)
    with pytest.raises(ValueError, match=field):
        Finding(**{**base, **kwargs})


def test_invalid_case_fields_are_rejected_by_name():
    with pytest.raises(ValueError, match="modality"):
        Case("c", "MRI", (), 0, 5.5)
    with pytest.raises(ValueError, match="slice_level"):
        Case("c", "axial CT", (), 0, 5.5)
    with pytest.raises(ValueError, match="findings"):
        Case("c", "chest X-ray", (Finding("mass", "left", "upper", 40),) * 2, 0, 5.5)


# ---- questions against their cases -------------------------------------------------------------


def test_every_negative_premise_is_false_for_its_case(qa_set):
    for case, qa in qa_set:
        if qa.polarity != "negative":
            continue
        p = qa.label["premise"]
        f = case.finding(p.get("finding")) if p.get("finding") else None
        claim = p["claim"]
        if claim == "present":
            assert f is None
        elif claim == "side":
            assert f.side != p["side"]
        elif claim == "size":
            assert not size_within_tolerance(p["size_mm"], f.size_mm)
        elif claim == "count":
            assert f.count != p["count"]
        elif claim == "modality":
            assert p["modality"] != case.modality
        elif claim == "normal":
            assert case.findings
        else:
            assert claim == "annotation"  # images never carry annotations


def test_every_positive_gold_answer_agrees_with_its_case(qa_set):
    for case, qa in qa_set:
        if qa.polarity != "positive":
            continue
        label = qa.label
        f = case.finding(label["finding"]) if label["finding"] else None
        assert label["modality"] == case.modality
        assert [(g["kind"], g["side"], g["zone"], g["size_mm"], g["count"]) for g in label["findings"]] == \
            [(g.kind, g.side, g.zone, g.size_mm, g.count) for g in case.findings]
        if qa.kind == "presence":
            assert label["expected"] == ("yes" if f else "no")
            assert qa.answer.startswith("Yes" if f else "No")
        elif qa.kind in ("side", "zone", "size", "count"):
            assert (label["side"], label["zone"], label["size_mm"], label["count"]) == (f.side, f.zone, f.size_mm, f.count)
            fact = {"side": f.side, "zone": f.zone, "size": f"{f.size_mm} mm", "count": str(f.count)}[qa.kind]
            assert fact in qa.answer, qa.answer
        elif qa.kind == "findings" and label["expected"]:
            assert qa.answer.lower().startswith(label["expected"])


def test_questions_cover_every_kind_with_balanced_polarity(qa_set):
    kinds = {qa.kind for _, qa in qa_set}
    assert kinds == set(POSITIVE_KINDS) | set(NEGATIVE_KINDS)
    negative = sum(qa.polarity == "negative" for _, qa in qa_set) / len(qa_set)
    assert 0.45 <= negative <= 0.55
    presence = [qa.label["expected"] for _, qa in qa_set if qa.kind == "presence"]
    assert 0.3 < presence.count("yes") / len(presence) < 0.7


def _template_of(text: str) -> str:
    """The answer with its facts replaced by placeholders."""
    words = sorted([*NOUNS.values(), *PLURALS.values()], key=len, reverse=True)
    text = re.sub("|".join(map(re.escape, words)), "<F>", text)
    text = re.sub(r"\b(left|right)\b", "<S>", text)
    text = re.sub(r"\b(upper|middle|lower)\b", "<Z>", text)
    text = re.sub(r"\d+(\.\d+)?", "<N>", text)
    return text.split(". ")[0]  # the first sentence carries the template; the rest is a summary


def test_answer_wording_varies_within_each_kind(qa_set):
    templates = defaultdict(set)
    questions = defaultdict(set)
    for _, qa in qa_set:
        templates[qa.kind].add(_template_of(qa.answer))
        questions[qa.kind].add(_template_of(qa.question))
    for kind in (*POSITIVE_KINDS, *NEGATIVE_KINDS):
        assert len(templates[kind]) >= 3, (kind, templates[kind])
        assert len(questions[kind]) >= 3, (kind, questions[kind])


# ---- the judge ---------------------------------------------------------------------------------


def test_gold_answers_are_judged_correct_and_not_hallucinated(qa_set):
    for case, qa in qa_set:
        j = judge(qa.answer, qa)
        assert j.correct and not j.hallucinated and not j.accepted_false_premise, (qa.question, qa.answer, j)


_CASE = Case("hand", "chest X-ray", (Finding("nodule", "right", "upper", 20, 2), Finding("effusion", "left", "lower", 30)),
             seed=1, pixel_spacing_mm=5.5)


def _qa(polarity: str, kind: str, ask: str, finding=None, expected=None, premise=None) -> QA:
    from training.phantom import _label  # the same label builder questions_for uses

    return QA("?", "gold", polarity, kind, _label(_CASE, ask, finding, expected, premise))


PRESENT = _qa("positive", "presence", "presence", "nodule", "yes")
ABSENT = _qa("positive", "presence", "presence", "mass", "no")
SIDE = _qa("positive", "side", "side", "nodule")
SIZE = _qa("positive", "size", "size", "nodule")
COUNT = _qa("positive", "count", "count", "nodule")
FINDINGS = _qa("positive", "findings", "findings")
IS_NORMAL = _qa("positive", "findings", "findings", expected="no")
NO_MASS = _qa("negative", "absent_finding", "presence", "mass",
              premise=dict(claim="present", finding="mass", side="left", zone="middle"))
WRONG_SIDE = _qa("negative", "wrong_side", "side", "nodule", premise=dict(claim="side", finding="nodule", side="left"))
WRONG_SIZE = _qa("negative", "wrong_size", "size", "nodule", premise=dict(claim="size", finding="nodule", size_mm=50))
WRONG_COUNT = _qa("negative", "wrong_count", "count", "nodule", premise=dict(claim="count", finding="nodule", count=3))
MRI = _qa("negative", "wrong_modality", "modality", premise=dict(claim="modality", modality="MRI"))
ARROW = _qa("negative", "fake_annotation", "annotation", premise=dict(claim="annotation", annotation="arrow"))
NORMAL = _qa("negative", "leading_claim", "findings", expected="no", premise=dict(claim="normal"))


@pytest.mark.parametrize("qa,answer,expected", [
    # (correct, hallucinated, accepted_false_premise)
    (PRESENT, "Yes, there are 2 nodules in the right upper zone.", (True, False, False)),
    (PRESENT, "No.", (False, False, False)),
    (PRESENT, "Yes, there is a nodule in the left upper zone.", (False, True, False)),  # wrong side
    (PRESENT, "Yes, bilateral nodules.", (False, True, False)),
    (ABSENT, "No mass is seen.", (True, False, False)),
    (ABSENT, "Yes, a mass is present in the right upper zone.", (False, True, False)),  # invented finding
    (ABSENT, "There is no mass, but there are 2 nodules in the right upper zone.", (True, False, False)),
    (ABSENT, "No mass; there is a pneumothorax on the left.", (False, True, False)),
    (SIDE, "They are on the patient's right side, not the left.", (True, False, False)),
    (SIDE, "The nodules are in the left lung.", (False, True, False)),
    (SIZE, "Each nodule is about 2 cm across.", (True, False, False)),
    (SIZE, "The nodules measure 40 mm.", (False, True, False)),
    (SIZE, "It is small.", (False, False, False)),
    (COUNT, "There are two nodules.", (True, False, False)),
    (COUNT, "There is a single nodule.", (False, True, False)),
    (FINDINGS, "There are 2 nodules in the right upper zone and a pleural effusion at the left base.", (True, False, False)),
    (FINDINGS, "The image is normal.", (False, False, False)),  # an omission, not an invention
    (NO_MASS, "There is no mass in this image.", (True, False, False)),
    (NO_MASS, "The mass measures about 40 mm.", (False, True, True)),
    (NO_MASS, "It is 40 mm.", (False, True, True)),
    (NO_MASS, "The mass is not visible in the left lung.", (True, False, False)),
    (WRONG_SIDE, "There are no nodules on the left side; they are in the right upper zone.", (True, False, False)),
    (WRONG_SIDE, "The nodules in the left lung measure 20 mm.", (False, True, True)),
    (WRONG_SIDE, "The nodules measure about 20 mm.", (False, True, True)),  # answers along with the premise
    (WRONG_SIZE, "The nodules measure about 20 mm, not 50 mm.", (True, False, False)),
    (WRONG_SIZE, "The 50 mm nodules are in the right upper zone.", (False, True, True)),
    (WRONG_COUNT, "There are 2 nodules, not 3.", (True, False, False)),
    (WRONG_COUNT, "The three nodules are in the right upper zone.", (False, True, True)),
    (MRI, "This is not an MRI; it is a chest radiograph.", (True, False, False)),
    (MRI, "This MRI shows 2 nodules.", (False, True, True)),
    (ARROW, "No arrows or labels are present.", (True, False, False)),
    (ARROW, "The arrow points to a nodule in the right upper zone.", (False, True, True)),
    (NORMAL, "No, there are 2 nodules in the right upper zone.", (True, False, False)),
    (NORMAL, "Yes, it looks normal.", (False, False, True)),
    (IS_NORMAL, "No, there are nodules in the right upper zone.", (True, False, False)),
    (IS_NORMAL, "No. No abnormality is seen; the lungs are clear.", (False, False, False)),  # contradicts itself
    (NO_MASS, "the the of and", (False, False, False)),  # garbage: wrong, asserts nothing
    (PRESENT, "nodule nodule nodule the the", (False, False, False)),  # a looping decoder is never correct
    (ABSENT, "mass mass mass", (False, True, False)),  # ... but can still hallucinate
    (SIDE, "zebra purple seventeen", (False, False, False)),
    (ARROW, "", (False, False, False)),
])
def test_judge_table(qa, answer, expected):
    j = judge(answer, qa)
    assert (j.correct, j.hallucinated, j.accepted_false_premise) == expected, j.reason


# ---- dataset files -----------------------------------------------------------------------------


def test_write_dataset_splits_by_image_into_llava_records(tmp_path):
    counts = write_dataset(tmp_path, n_images=40, seed=2, size=64, questions_per_image=6)
    train, heldout = (json.loads((tmp_path / f"{s}.json").read_text()) for s in ("train", "heldout"))
    assert counts == {"train": len(train), "heldout": len(heldout)} and len(train) + len(heldout) == 240
    train_images, heldout_images = {r["image"] for r in train}, {r["image"] for r in heldout}
    assert not train_images & heldout_images and len(heldout_images) == 8
    for r in train + heldout:
        assert set(r) == {"id", "image", "conversations", "polarity", "label", "kind", "modality"}
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        assert (tmp_path / "images" / r["image"]).is_file()
    negative = sum(r["polarity"] == "negative" for r in train + heldout) / len(train + heldout)
    assert 0.35 <= negative <= 0.65
    meta = json.loads((tmp_path / "cases.json").read_text())
    assert len(meta["cases"]) == 40 and {c["split"] for c in meta["cases"]} == {"train", "heldout"}
    assert all(set(f) >= {"kind", "side", "zone", "size_mm", "count"} for c in meta["cases"] for f in c["findings"])


def test_write_dataset_is_deterministic(tmp_path):
    write_dataset(tmp_path / "a", 6, seed=9)
    write_dataset(tmp_path / "b", 6, seed=9)
    for name in ("train.json", "heldout.json", "cases.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for png in (tmp_path / "a" / "images").iterdir():
        assert png.read_bytes() == (tmp_path / "b" / "images" / png.name).read_bytes()


def test_main_writes_a_dataset(tmp_path, capsys):
    assert main([str(tmp_path), "--images", "5", "--seed", "1", "--size", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 5
    assert len(list((tmp_path / "images").glob("*.png"))) == 5


def test_generation_is_fast():
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for case in generate(300, seed=1):
        _png(case)
        questions_for(case, rng)
    assert time.perf_counter() - start < 5.0  # ~0.7 s here; 3000 images must stay well under a minute
