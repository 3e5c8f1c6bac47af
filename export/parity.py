"""Parity: fixed prompts through a candidate backend and the reference, and the gate an export must pass.

The prompts are synthetic phantom images (PhantomVQA-like chest films) with
phantom questions, plus MedHallTune question text (its images are not
distributed, so those questions go with a phantom image). Both backends run
the real decode loop (`guard.decode.generate`, greedy) and the real guard heads
and policy. What is measured, per precision:

- greedy tokens: identical on every prompt (fp32);
- logits: max |candidate - reference| over the decode steps whose inputs still
  agree, against the logit scale, max |reference logit| over those steps (fp32:
  <= 1e-3 of the scale);
- guard outputs: p_hallucination, premise_risk and the four scores of the same
  answer (the reference's), teacher-forced through each backend (fp32: <= 1e-4);
- token agreement: the share of the reference's tokens that the candidate
  predicts (argmax) when fed the reference's answer (quantized: >= 90%);
- verdicts: the policy's verdict on each backend's own answer, as served
  (quantized: the same in >= 98% of prompts), and the max |delta p_hallucination|.
  Both are also reported on the same answer, which separates the guard's own
  drift from answers that diverged.
With the default 8 prompts, ">= 98%" means all 8.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from guard import decode
from guard.backends import Backend
from guard.head import GuardHeads
from guard.policy import PolicyConfig, decide
from guard.preprocess import preprocess
from guard.prompt import Prompter
from guard.types import DecodeConfig, Generation, GuardScores

MEDHALLTUNE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "medhalltune"
MEDHALLTUNE_FILES = ("val_positive_qa-filtered.jsonl", "val_negative_qa-filtered.jsonl")
PHANTOM_QUESTIONS = (
    "Is there a nodule in the right lung?",
    "What imaging modality is this?",
    "Is there a pleural effusion on the left side?",
    "Describe the findings in this image.",
    "How many nodules are visible?",
    "Is the heart enlarged?",
)
# Used only when the MedHallTune files are not beside the repo.
FALLBACK_QUESTIONS = (
    "Does the image indicate that the lesion affects the surrounding tissue?",
    "What does the arrow in the image point to?",
    "Is there evidence of calcification in the mass?",
    "Which organ is shown in this scan?",
)
_SCORE_FIELDS = tuple(f.name for f in fields(GuardScores) if f.name != "heads_trained")


class ParityError(Exception):
    """The candidate failed the gate; `report` says by how much."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ParityConfig:
    phantom_prompts: int = 4
    """Phantom image + phantom question prompts."""
    medhalltune_prompts: int = 4
    """MedHallTune question prompts (positive and negative rows, alternating)."""
    max_new_tokens: int = 16
    """Greedy tokens generated per prompt by each backend."""
    medhalltune_dir: str = str(MEDHALLTUNE_DIR)

    def __post_init__(self) -> None:
        counts = (self.phantom_prompts, self.medhalltune_prompts)
        if min(counts) < 0 or sum(counts) < 1:
            raise ValueError("`phantom_prompts` + `medhalltune_prompts` must be at least 1 (and neither negative)")
        if self.max_new_tokens < 1:
            raise ValueError("`max_new_tokens` must be at least 1")


@dataclass(frozen=True)
class Thresholds:
    identical_tokens: bool
    """Greedy tokens identical on every prompt."""
    logits_rel: float | None
    """Max abs logit difference over the logit scale, at most this."""
    guard_abs: float | None
    """Max abs difference of the guard outputs on the same answer, at most this."""
    token_agreement: float
    """Share of the reference's tokens the candidate predicts, at least this."""
    verdict_agreement: float
    """Share of prompts with the same verdict, at least this."""


EXACT = Thresholds(identical_tokens=True, logits_rel=1e-3, guard_abs=1e-4, token_agreement=1.0, verdict_agreement=0.0)
APPROXIMATE = Thresholds(identical_tokens=False, logits_rel=None, guard_abs=None, token_agreement=0.90,
                         verdict_agreement=0.98)
THRESHOLDS = {"fp32": EXACT, "fp16": APPROXIMATE, "int8": APPROXIMATE, "int4": APPROXIMATE}


@dataclass(frozen=True)
class Prompt:
    name: str
    image: bytes  # PNG
    question: str


def phantom_png(seed: int, size: int = 128) -> bytes:
    """A chest-film-like phantom: body, two lungs, heart, and (odd seeds) a nodule; deterministic."""
    rng = np.random.default_rng(seed)
    img = Image.new("L", (size, size), 10)
    d = ImageDraw.Draw(img)
    s = size / 128
    d.ellipse([10 * s, 8 * s, 118 * s, 124 * s], fill=150)
    for x0 in (22, 70):  # lungs, dark
        d.ellipse([x0 * s, 18 * s, (x0 + 36) * s, 104 * s], fill=int(40 + rng.integers(0, 20)))
    d.ellipse([52 * s, 60 * s, 84 * s, 100 * s], fill=175)  # heart
    if seed % 2:
        cx, cy, r = rng.uniform(30, 50) * s, rng.uniform(30, 80) * s, rng.uniform(3, 7) * s
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=210)
    noise = rng.normal(0, 6, (size, size))
    arr = np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def medhalltune_questions(n: int, root: str | Path = MEDHALLTUNE_DIR) -> list[str]:
    """The first rows of the positive and negative validation files, alternating; fixed built-ins if absent."""
    columns = []
    for name in MEDHALLTUNE_FILES:
        path = Path(root) / name
        if path.is_file():
            with path.open() as f:
                rows = [json.loads(line) for _, line in zip(range(n), f)]
            columns.append([r["text"].replace("<image>", "").strip() for r in rows])
    if not columns:
        columns = [list(FALLBACK_QUESTIONS)]
    interleaved = [q for group in zip(*columns) for q in group] + [q for c in columns for q in c]
    return list(dict.fromkeys(interleaved))[:n]


def parity_prompts(config: ParityConfig = ParityConfig()) -> list[Prompt]:
    prompts = [Prompt(f"phantom-{i}", phantom_png(i), PHANTOM_QUESTIONS[i % len(PHANTOM_QUESTIONS)])
               for i in range(config.phantom_prompts)]
    questions = medhalltune_questions(config.medhalltune_prompts, config.medhalltune_dir)
    prompts += [Prompt(f"medhalltune-{i}", phantom_png(100 + i), q) for i, q in enumerate(questions)]
    return prompts


class _Recording:
    """A Backend that remembers the logits of every decoder call (a view, not a copy)."""

    def __init__(self, backend: Backend):
        self.backend, self.spec, self.name, self.checksum = backend, backend.spec, backend.name, backend.checksum
        self.logits: list[np.ndarray] = []  # per call: [S, V]

    def encode_image(self, pixels):
        return self.backend.encode_image(pixels)

    def embed(self, ids):
        return self.backend.embed(ids)

    def new_cache(self, batch):
        return self.backend.new_cache(batch)

    def forward(self, embeds, attention_mask, position_ids, cache):
        out, cache = self.backend.forward(embeds, attention_mask, position_ids, cache)
        self.logits.append(out.logits[0])
        return out, cache


def _prompt_embeds(backend: Backend, prompter: Prompter, prompt: Prompt) -> tuple[np.ndarray, np.ndarray]:
    """-> (prompt embeddings [1, S, D] with the image spliced in, the question's ids: the prompt's tail)."""
    spec = backend.spec
    pixels = preprocess(prompt.image, "image/png", spec.preprocess)[None]
    ids = prompter.encode_prompt(prompt.question)
    embeds = decode.splice_image(backend.embed(ids[None]), ids, backend.encode_image(pixels), spec.image_token_id)
    return embeds, decode.question_ids(ids, spec.image_token_id)


def _greedy(backend: Backend, prompt: tuple[np.ndarray, np.ndarray], max_new_tokens: int) -> tuple[Generation, list[np.ndarray]]:
    """-> the answer and each step's logits [V]."""
    rec = _Recording(backend)
    embeds, question = prompt
    gen = decode.generate(rec, embeds, backend.spec.eos_token_ids, DecodeConfig(max_new_tokens=max_new_tokens),
                          question_ids=question)
    return gen, [step[-1] for step in rec.logits]


def _forced(backend: Backend, prompt: tuple[np.ndarray, np.ndarray], tokens: list[int]) -> tuple[Generation, np.ndarray]:
    """-> features of `tokens` as an answer, and the logits [n, V] that predicted each of them."""
    rec = _Recording(backend)
    embeds, question = prompt
    gen = decode.teacher_force(rec, embeds, tokens, question_ids=question)
    seq_len = embeds.shape[1]
    return gen, rec.logits[0][seq_len - 1 : seq_len - 1 + len(tokens)]


def _score_diff(a: GuardScores, b: GuardScores) -> float:
    return max(abs(getattr(a, f) - getattr(b, f)) for f in _SCORE_FIELDS)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(
    reference: Backend,
    candidate: Backend,
    prompter: Prompter,
    heads: GuardHeads,
    prompts: list[Prompt],
    max_new_tokens: int = 16,
    policy: PolicyConfig = PolicyConfig(allow_untrained_heads=True),
) -> dict:
    """Run every prompt through both backends; -> the measurements (no verdict on them: see `gate`)."""
    t0 = time.perf_counter()
    rows = []
    for prompt in prompts:
        ref_embeds = _prompt_embeds(reference, prompter, prompt)
        cand_embeds = _prompt_embeds(candidate, prompter, prompt)
        # 1) Each backend's own greedy answer, as served.
        ref_gen, ref_steps = _greedy(reference, ref_embeds, max_new_tokens)
        cand_gen, cand_steps = _greedy(candidate, cand_embeds, max_new_tokens)
        same_inputs = min(_common_prefix(ref_gen.token_ids, cand_gen.token_ids) + 1, len(ref_steps), len(cand_steps))
        ref_served, cand_served = heads.score(ref_gen), heads.score(cand_gen)
        # 2) The reference's answer fed to both: token agreement and guard outputs on the same answer.
        tokens = ref_gen.token_ids
        ref_tf, _ = _forced(reference, ref_embeds, tokens)
        cand_tf, cand_logits = _forced(candidate, cand_embeds, tokens)
        ref_same, cand_same = heads.score(ref_tf), heads.score(cand_tf)
        rows.append({
            "name": prompt.name,
            "tokens": len(tokens),
            "identical": ref_gen.token_ids == cand_gen.token_ids,
            "agreeing_tokens": int((cand_logits.argmax(-1) == np.array(tokens)).sum()),
            "logit_scale": float(max(np.abs(s).max() for s in ref_steps[:same_inputs])),
            "logits_max_abs_diff": float(max(np.abs(r - c).max() for r, c in zip(ref_steps[:same_inputs], cand_steps))),
            "guard_max_abs_diff": _score_diff(ref_same, cand_same),
            "dp_hallucination_same_answer": abs(ref_same.p_hallucination - cand_same.p_hallucination),
            "dp_hallucination": abs(ref_served.p_hallucination - cand_served.p_hallucination),
            "verdicts": [decide(ref_served, policy).kind.name, decide(cand_served, policy).kind.name],
            "verdicts_same_answer": [decide(ref_same, policy).kind.name, decide(cand_same, policy).kind.name],
        })
    n_tokens = sum(r["tokens"] for r in rows)
    logit_scale = max(r["logit_scale"] for r in rows)
    logits_diff = max(r["logits_max_abs_diff"] for r in rows)
    return {
        "reference": reference.name,
        "candidate": candidate.name,
        "prompts": len(rows),
        "max_new_tokens": max_new_tokens,
        "greedy_identical": sum(r["identical"] for r in rows),
        "token_agreement": sum(r["agreeing_tokens"] for r in rows) / n_tokens,
        "logit_scale": logit_scale,
        "logits_max_abs_diff": logits_diff,
        "logits_rel_diff": logits_diff / logit_scale if logit_scale else 0.0,
        "guard_max_abs_diff": max(r["guard_max_abs_diff"] for r in rows),
        "verdict_agreement": sum(r["verdicts"][0] == r["verdicts"][1] for r in rows) / len(rows),
        "verdict_agreement_same_answer": sum(a == b for a, b in (r["verdicts_same_answer"] for r in rows)) / len(rows),
        "max_abs_dp_hallucination": max(r["dp_hallucination"] for r in rows),
        "max_abs_dp_hallucination_same_answer": max(r["dp_hallucination_same_answer"] for r in rows),
        "seconds": round(time.perf_counter() - t0, 2),
        "per_prompt": rows,
    }


def failures(report: dict, thresholds: Thresholds) -> list[str]:
    """What the measurements in `report` fail of `thresholds`; empty when the gate passes."""
    out = []
    n = report["prompts"]
    if thresholds.identical_tokens and report["greedy_identical"] < n:
        out.append(f"greedy tokens differ on {n - report['greedy_identical']} of {n} prompts (need identical on all)")
    if thresholds.logits_rel is not None and report["logits_rel_diff"] > thresholds.logits_rel:
        out.append(f"logits max abs diff {report['logits_max_abs_diff']:.3g} is {report['logits_rel_diff']:.3g} of the "
                   f"logit scale {report['logit_scale']:.3g} (limit {thresholds.logits_rel:g})")
    if thresholds.guard_abs is not None and report["guard_max_abs_diff"] > thresholds.guard_abs:
        out.append(f"guard outputs differ by {report['guard_max_abs_diff']:.3g} (limit {thresholds.guard_abs:g})")
    if report["token_agreement"] < thresholds.token_agreement:
        out.append(f"token agreement {report['token_agreement']:.1%} (need >= {thresholds.token_agreement:.0%})")
    if report["verdict_agreement"] < thresholds.verdict_agreement:
        out.append(f"same verdict on {report['verdict_agreement']:.1%} of prompts "
                   f"(need >= {thresholds.verdict_agreement:.0%})")
    return out


def gate(report: dict, precision: str) -> dict:
    """Add the thresholds and the outcome to `report`; raise ParityError if it fails."""
    thresholds = THRESHOLDS[precision]
    failed = failures(report, thresholds)
    report.update(precision=precision, thresholds=asdict(thresholds), passed=not failed, failures=failed)
    if failed:
        raise ParityError(f"{precision} parity gate failed: " + "; ".join(failed), report)
    return report


def summary(report: dict) -> str:
    """One line for logs."""
    return (f"{report['greedy_identical']}/{report['prompts']} prompts identical, token agreement "
            f"{report['token_agreement']:.1%}, logits max diff {report['logits_max_abs_diff']:.2e} "
            f"(scale {report['logit_scale']:.3g}), guard max diff {report['guard_max_abs_diff']:.2e}, "
            f"verdicts {report['verdict_agreement']:.0%} same ({report['verdict_agreement_same_answer']:.0%} on the "
            f"same answer), max |dp| {report['max_abs_dp_hallucination']:.3g}")
