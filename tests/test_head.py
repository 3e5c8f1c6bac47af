"""Guard heads: feature layout, score ranges, the safetensors round trip and the format check."""

import numpy as np
import pytest

from guard.errors import ModelLoadError
from guard.head import (
    HEADS_FORMAT,
    UNCERTAINTY_FEATURES,
    GuardHeads,
    LinearHead,
    QuestionNgrams,
    answer_features,
    feature_sizes,
    prompt_features,
)
from guard.types import Generation

D = 8


def _gen(t=5, seed=0, question=(11, 12, 13, 2)):
    r = np.random.default_rng(seed)
    return Generation(
        token_ids=list(range(t)),
        logprobs=-r.random(t).astype(np.float32),
        entropies=r.random(t).astype(np.float32),
        hidden_mid=r.standard_normal((t, D)).astype(np.float32),
        hidden_last=r.standard_normal((t, D)).astype(np.float32),
        question_hidden_mid=r.standard_normal(D).astype(np.float32),
        question_hidden_last=r.standard_normal(D).astype(np.float32),
        question_ids=np.array(question, np.int64),
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


# --- the premise head's question n-grams (format v3) ----------------------------

QUESTIONS = [[11, 12, 13, 2], [11, 14, 13, 2], [15, 12, 12, 12, 2], [49_000, 48_999, 2], [49_000, 48_999, 13, 2]]


def _ngram_heads(seed=6) -> GuardHeads:
    from training.heads import fit_question_ngrams

    heads = GuardHeads.random(D, seed=seed)
    ngrams = fit_question_ngrams(QUESTIONS)
    rng = np.random.default_rng(seed)
    f = 2 * D + len(ngrams)
    heads.premise = LinearHead(mean=np.zeros(f, np.float32), std=np.ones(f, np.float32),
                               w=rng.standard_normal((f, 1)).astype(np.float32), b=np.zeros(1, np.float32))
    heads.premise_ngrams, heads.trained = ngrams, True
    return heads


def test_the_numpy_ngram_tfidf_equals_sklearns_tfidf_vectorizer():
    from sklearn.feature_extraction.text import TfidfVectorizer

    from training.heads import NGRAM_TFIDF, fit_question_ngrams, ids_text, ngram_matrix

    ngrams = fit_question_ngrams(QUESTIONS)
    vec = TfidfVectorizer(**NGRAM_TFIDF, min_df=2).fit([ids_text(q) for q in QUESTIONS])
    unseen = [[11, 12, 99, 2], [99, 98], [49_000, 48_999, 48_999, 2]]  # unknown n-grams are ignored
    ours = np.stack([ngrams(q) for q in QUESTIONS + unseen])
    # sklearn's columns, in our key order: the key of "t11 t12" is the bigram (11, 12)
    order = [vec.vocabulary_[" ".join(f"t{i}" for i in _key_ids(k))] for k in ngrams.keys]
    theirs = vec.transform([ids_text(q) for q in QUESTIONS + unseen]).toarray()[:, order]
    assert len(ngrams) == len(vec.vocabulary_) > 0
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    np.testing.assert_allclose(ngram_matrix(ngrams, QUESTIONS + unseen).toarray(), theirs, atol=1e-6)
    assert not ours[-2].any()  # nothing known: all zeros, as sklearn


def _key_ids(key: int) -> list[int]:
    return [int(key)] if key < 2**32 else [int(key >> 32) - 1, int(key & (2**32 - 1))]


def test_bigram_keys_of_a_49k_vocabulary_are_exact_int64():
    keys = QuestionNgrams.ngram_keys([49_151, 49_150])
    assert keys.dtype == np.int64 and keys.tolist() == [49_151, 49_150, (49_152 << 32) + 49_150]
    assert np.float32(keys[-1]) == np.float32(keys[-1] + 1)  # why they are never stored as float32
    with pytest.raises(ValueError, match="token ids"):
        QuestionNgrams.ngram_keys([-1, 3])


def test_the_premise_head_moves_when_only_the_question_tokens_change():
    heads = _ngram_heads()
    a, b = _gen(question=QUESTIONS[0]), _gen(question=QUESTIONS[1])  # same hidden states, other tokens
    np.testing.assert_array_equal(prompt_features(a), prompt_features(b))
    assert heads.score(a).premise_risk != heads.score(b).premise_risk
    assert heads.score(a).p_hallucination == heads.score(b).p_hallucination  # the answer heads read no n-grams
    assert heads.feature_sizes() == feature_sizes(D)


def test_v3_heads_with_question_ngrams_round_trip(tmp_path):
    from safetensors import safe_open

    heads = _ngram_heads()
    heads.save(tmp_path / "h.safetensors")
    with safe_open(str(tmp_path / "h.safetensors"), framework="np") as f:
        assert f.metadata()["format"] == HEADS_FORMAT == "medhallguard-heads-v3"
        assert f.get_tensor("premise_ngrams.keys").dtype == np.int64
    loaded = GuardHeads.load(tmp_path / "h.safetensors")
    np.testing.assert_array_equal(loaded.premise_ngrams.keys, heads.premise_ngrams.keys)
    for q in QUESTIONS:
        assert loaded.score(_gen(question=q)) == heads.score(_gen(question=q))


def test_v2_heads_still_load_and_score_on_hidden_states_only(tmp_path):
    """Bundles written before the n-grams keep serving: a v2 file is the v3 layout without them."""
    from safetensors.numpy import save_file

    heads = GuardHeads.random(D, seed=7)
    heads.trained = True
    tensors = {**heads.hallucination.tensors("hallucination"), **heads.scores.tensors("scores"),
               **heads.premise.tensors("premise")}
    save_file(tensors, str(tmp_path / "guard_heads.safetensors"), metadata={
        "format": "medhallguard-heads-v2", "answer_temperature": "1.0", "premise_temperature": "1.5",
        "trained": "true", "info": "{}"})
    loaded = GuardHeads.load(tmp_path / "guard_heads.safetensors")
    assert loaded.premise_ngrams is None and loaded.feature_sizes() == feature_sizes(D)
    a, b = _gen(question=QUESTIONS[0]), _gen(question=QUESTIONS[1])
    expected = 1 / (1 + np.exp(-heads.premise(prompt_features(a)[None])[0, 0] / 1.5))
    assert loaded.score(a).premise_risk == pytest.approx(expected, rel=1e-6)
    assert loaded.score(a).premise_risk == loaded.score(b).premise_risk  # v2 reads no tokens
