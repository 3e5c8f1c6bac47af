"""Guard heads: feature layout, score ranges, the safetensors round trip and the format check."""

import numpy as np
import pytest

from guard.errors import ModelLoadError
from guard.head import UNCERTAINTY_FEATURES, GuardHeads, answer_features, feature_sizes, prompt_features
from guard.types import Generation

D = 8


def _gen(t=5, seed=0):
    r = np.random.default_rng(seed)
    return Generation(
        token_ids=list(range(t)),
        logprobs=-r.random(t).astype(np.float32),
        entropies=r.random(t).astype(np.float32),
        hidden_mid=r.standard_normal((t, D)).astype(np.float32),
        hidden_last=r.standard_normal((t, D)).astype(np.float32),
        question_hidden_mid=r.standard_normal(D).astype(np.float32),
        question_hidden_last=r.standard_normal(D).astype(np.float32),
        stop_reason="eos",
    )


def test_answer_features_pool_both_layers_add_the_question_and_uncertainty():
    g = _gen()
    f = answer_features(g)
    assert f.shape == (4 * D + len(UNCERTAINTY_FEATURES),) == (feature_sizes(D)[0],)
    np.testing.assert_allclose(f[:D], g.hidden_mid.mean(0), rtol=1e-6)
    np.testing.assert_allclose(f[D : 2 * D], g.hidden_last.mean(0), rtol=1e-6)
    np.testing.assert_array_equal(f[2 * D : 4 * D], prompt_features(g))
    assert f[4 * D] == pytest.approx(g.logprobs.mean())


def test_prompt_features_are_the_question_means_and_ignore_the_answer():
    a, b = _gen(t=3, seed=1), _gen(t=9, seed=2)
    b.question_hidden_mid, b.question_hidden_last = a.question_hidden_mid, a.question_hidden_last
    np.testing.assert_array_equal(prompt_features(a), prompt_features(b))
    np.testing.assert_array_equal(prompt_features(a), np.concatenate([a.question_hidden_mid, a.question_hidden_last]))
    assert prompt_features(a).shape == (feature_sizes(D)[1],)


def test_scores_are_in_their_ranges():
    s = GuardHeads.random(D, seed=3).score(_gen())
    assert 0 <= s.p_hallucination <= 1 and 0 <= s.premise_risk <= 1
    for v in (s.clinical_accuracy, s.clinical_relevance, s.detail_level, s.risk_level):
        assert 1 <= v <= 10
    assert s.heads_trained is False


def test_heads_round_trip_through_safetensors(tmp_path):
    heads = GuardHeads.random(D, seed=4)
    heads.trained, heads.answer_temperature, heads.info = True, 1.7, {"auroc": 0.93}
    heads.save(tmp_path / "h.safetensors")
    loaded = GuardHeads.load(tmp_path / "h.safetensors")
    assert loaded.trained and loaded.answer_temperature == 1.7 and loaded.info == {"auroc": 0.93}
    assert loaded.score(_gen()) == heads.score(_gen())


def test_temperature_softens_p_hallucination():
    heads = GuardHeads.random(D, seed=5)
    p1 = heads.score(_gen()).p_hallucination
    heads.answer_temperature = 100.0
    assert abs(heads.score(_gen()).p_hallucination - 0.5) < abs(p1 - 0.5) + 1e-9


def test_a_corrupt_heads_file_fails_with_a_clear_error(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        GuardHeads.load(path)


def test_heads_of_the_old_format_are_refused_with_how_to_refit(tmp_path):
    """v1 heads read the last prompt position only: loading them must fail, never score with them."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    v1 = {f"{p}.{k}": rng.standard_normal(shape).astype(np.float32)
          for p, f_in, out in (("answer", 2 * D + 5, 5), ("premise", 2 * D, 1))
          for k, shape in (("mean", (f_in,)), ("std", (f_in,)), ("w1", (f_in, 4)), ("b1", (4,)), ("w2", (4, out)), ("b2", (out,)))}
    save_file(v1, str(tmp_path / "guard_heads.safetensors"), metadata={
        "format": "medhallguard-heads-v1", "answer_temperature": "1.0", "premise_temperature": "1.0", "trained": "true"})
    with pytest.raises(ModelLoadError, match="heads-v1.*--heads-only"):
        GuardHeads.load(tmp_path / "guard_heads.safetensors")
    from training.build_default import heads_are_current

    assert not heads_are_current(tmp_path)  # so ensure_default() refits before serving
    GuardHeads.random(D).save(tmp_path / "guard_heads.safetensors")
    assert heads_are_current(tmp_path)
