"""The parity gate's logic, on hand-written reports, and its fixed prompts; no model, no torch."""

from __future__ import annotations

import json

import pytest

from export.parity import (
    EXACT,
    ParityConfig,
    ParityError,
    failures,
    gate,
    medhalltune_questions,
    parity_prompts,
    phantom_png,
)


def _report(**overrides) -> dict:
    report = dict(prompts=8, greedy_identical=8, token_agreement=1.0, logit_scale=12.0, logits_max_abs_diff=3.6e-4,
                  logits_rel_diff=3e-5, guard_max_abs_diff=2e-6, verdict_agreement=1.0, max_abs_dp_hallucination=1e-6)
    report.update(overrides)
    return report


GATE_CASES = [
    # (precision, measurements, the failure it must name or None)
    ("fp32", {}, None),
    ("fp32", dict(greedy_identical=7, token_agreement=0.99), "greedy tokens differ on 1 of 8"),
    ("fp32", dict(logits_max_abs_diff=0.013, logits_rel_diff=0.013 / 12), "of the logit scale"),
    ("fp32", dict(guard_max_abs_diff=2e-4), "guard outputs differ"),
    ("fp32", dict(verdict_agreement=0.5), None),  # fp32 gates the numbers; verdicts follow from them
    ("int8", dict(greedy_identical=2, token_agreement=0.93, logits_rel_diff=0.05, guard_max_abs_diff=0.05), None),
    ("int8", dict(token_agreement=0.89), "token agreement 89.0%"),
    ("int8", dict(verdict_agreement=7 / 8), "same verdict on 87.5%"),
    ("int4", dict(token_agreement=0.9, verdict_agreement=0.98), None),
    ("fp16", dict(token_agreement=0.5), "token agreement"),
]


@pytest.mark.parametrize("precision, measured, failure", GATE_CASES)
def test_the_gate_passes_or_names_what_failed(precision, measured, failure):
    report = _report(**measured)
    if failure is None:
        assert gate(report, precision)["passed"] is True and report["failures"] == []
    else:
        with pytest.raises(ParityError, match=failure) as e:
            gate(report, precision)
        assert e.value.report["passed"] is False and e.value.report["thresholds"]


def test_the_fp32_logit_limit_scales_with_the_logits():
    """1e-3 of the logit scale: 3.6e-4 passes at scale 12 (FINDINGS' 256M figure) but not at scale 0.1."""
    assert failures(_report(logits_rel_diff=3.6e-4 / 12), EXACT) == []
    assert failures(_report(logit_scale=0.1, logits_rel_diff=3.6e-4 / 0.1), EXACT)


def test_a_report_stays_json_for_the_manifest():
    json.dumps(gate(_report(), "int8"))


def test_the_prompts_are_fixed_and_mix_phantom_and_medhalltune_text(tmp_path):
    prompts = parity_prompts(ParityConfig(phantom_prompts=3, medhalltune_prompts=2))
    assert [p.name for p in prompts] == ["phantom-0", "phantom-1", "phantom-2", "medhalltune-0", "medhalltune-1"]
    assert prompts == parity_prompts(ParityConfig(phantom_prompts=3, medhalltune_prompts=2))
    assert phantom_png(1) != phantom_png(2) and phantom_png(1).startswith(b"\x89PNG")
    assert all("<image>" not in p.question and p.question for p in prompts)


def test_medhalltune_questions_alternate_files_and_fall_back_when_absent(tmp_path):
    rows = {"val_positive_qa-filtered.jsonl": ["Is the mass benign?", "Is there edema?"],
            "val_negative_qa-filtered.jsonl": ["Does the arrow show a fracture?\n<image>"]}
    for name, questions in rows.items():
        (tmp_path / name).write_text("".join(json.dumps({"text": q}) + "\n" for q in questions))
    assert medhalltune_questions(3, tmp_path) == ["Is the mass benign?", "Does the arrow show a fracture?",
                                                  "Is there edema?"]
    assert len(medhalltune_questions(2, tmp_path / "missing")) == 2


def test_parity_config_rejects_an_empty_prompt_set():
    with pytest.raises(ValueError, match="phantom_prompts"):
        ParityConfig(phantom_prompts=0, medhalltune_prompts=0)
