"""The risk policy: guard scores -> answer, answer with a warning, or abstain.

It knows nothing of models. It fails closed: no scores, non-finite scores or
untrained heads (unless explicitly allowed) never yield a plain ANSWER.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from guard.types import GuardScores, Verdict, VerdictKind


@dataclass(frozen=True)
class PolicyConfig:
    warn_p_hallucination: float = 0.3
    """Warn when p(hallucination) is at least this."""
    abstain_p_hallucination: float = 0.6
    """Abstain when p(hallucination) is at least this."""
    warn_premise_risk: float = 0.5
    """Warn when the question's premise is this likely to be false."""
    warn_risk_level: float = 4.0
    """Warn when the predicted risk-level score (1 = dangerous, 10 = safe) is at most this."""
    allow_untrained_heads: bool = False
    """Serve answers (always with a warning) from random-init heads; for plumbing tests and demos only."""
    withhold_answer_on_abstain: bool = True
    """Leave the answer text out of ABSTAIN responses, so no client can show it by mistake."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith(("p_hallucination", "premise_risk")) and not 0.0 <= v <= 1.0:
                raise ValueError(f"`policy.{f.name}` must be between 0 and 1, got {v}")
        if self.warn_p_hallucination > self.abstain_p_hallucination:
            raise ValueError("`policy.warn_p_hallucination` must not exceed `policy.abstain_p_hallucination`")
        if not 1.0 <= self.warn_risk_level <= 10.0:
            raise ValueError("`policy.warn_risk_level` must be between 1 and 10")


def decide(scores: GuardScores | None, config: PolicyConfig) -> Verdict:
    if scores is None:
        return Verdict(VerdictKind.ABSTAIN, ("the guard could not score this answer, so it is withheld",))
    values = [getattr(scores, f.name) for f in fields(scores) if f.name != "heads_trained"]
    if not all(math.isfinite(v) for v in values):
        return Verdict(VerdictKind.ABSTAIN, ("the guard produced a non-finite score, so the answer is withheld",))
    if not scores.heads_trained and not config.allow_untrained_heads:
        return Verdict(
            VerdictKind.ABSTAIN,
            ("the guard heads are untrained (random init); train them with `medhallguard train` before serving",),
        )

    abstain, warn = [], []
    p = scores.p_hallucination
    if p >= config.abstain_p_hallucination:
        abstain.append(f"likely hallucination: p={p:.2f} >= {config.abstain_p_hallucination:.2f}")
    elif p >= config.warn_p_hallucination:
        warn.append(f"possible hallucination: p={p:.2f} >= {config.warn_p_hallucination:.2f}")
    if scores.premise_risk >= config.warn_premise_risk:
        warn.append(f"the question may rest on a false premise (risk {scores.premise_risk:.2f})")
    if scores.risk_level <= config.warn_risk_level:
        warn.append(f"predicted clinical risk is high (risk-level score {scores.risk_level:.1f} of 10)")
    if not scores.heads_trained:
        warn.append("guard heads are untrained (random init): these scores mean nothing")

    if abstain:
        return Verdict(VerdictKind.ABSTAIN, tuple(abstain + warn))
    if warn:
        return Verdict(VerdictKind.ANSWER_WITH_WARNING, tuple(warn))
    return Verdict(VerdictKind.ANSWER, ())
