"""The risk policy as a table of (scores, expected verdict), and its fail-closed paths."""

import math

import pytest

from guard.policy import PolicyConfig, decide
from guard.types import GuardScores, VerdictKind

A, W, X = VerdictKind.ANSWER, VerdictKind.ANSWER_WITH_WARNING, VerdictKind.ABSTAIN


def _scores(p=0.1, premise=0.1, risk=8.0, trained=True):
    return GuardScores(p, premise, 7.0, 7.0, 6.0, risk, trained)


@pytest.mark.parametrize(
    "scores, expected",
    [
        (_scores(p=0.05), A),
        (_scores(p=0.29), A),
        (_scores(p=0.30), W),
        (_scores(p=0.59), W),
        (_scores(p=0.60), X),
        (_scores(p=0.99), X),
        (_scores(premise=0.5), W),
        (_scores(risk=4.0), W),
        (_scores(risk=4.1), A),
        (_scores(p=0.9, premise=0.9), X),
    ],
)
def test_thresholds_map_scores_to_verdicts(scores, expected):
    assert decide(scores, PolicyConfig()).kind is expected


def test_every_non_answer_verdict_says_why():
    for s in (_scores(p=0.4), _scores(p=0.9), _scores(premise=0.8), _scores(risk=2.0)):
        assert decide(s, PolicyConfig()).reasons


def test_missing_scores_abstain():
    v = decide(None, PolicyConfig())
    assert v.kind is X and "could not score" in v.reasons[0]


def test_non_finite_scores_abstain():
    assert decide(_scores(p=math.nan), PolicyConfig()).kind is X


def test_untrained_heads_abstain_by_default_and_warn_when_allowed():
    assert decide(_scores(p=0.0, trained=False), PolicyConfig()).kind is X
    v = decide(_scores(p=0.0, trained=False), PolicyConfig(allow_untrained_heads=True))
    assert v.kind is W and any("untrained" in r for r in v.reasons)


def test_untrained_heads_never_upgrade_an_abstention():
    assert decide(_scores(p=0.95, trained=False), PolicyConfig(allow_untrained_heads=True)).kind is X


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(warn_p_hallucination=1.5), "warn_p_hallucination"),
        (dict(warn_p_hallucination=0.7, abstain_p_hallucination=0.6), "warn_p_hallucination"),
        (dict(warn_risk_level=0.0), "warn_risk_level"),
    ],
)
def test_bad_thresholds_are_rejected_with_the_field_name(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PolicyConfig(**kwargs)
