"""The decode loop against a FakeBackend: determinism, limits, EOS, features, stopping."""

import threading

import numpy as np
import pytest

from guard import decode
from guard.errors import CancelledError, DeadlineExceededError
from guard.types import DecodeConfig, StopSignal
from guard.head import prompt_features
from tests.fake_backend import FakeBackend

EOS = (9,)
Q = np.array([1, 2, 3])  # the default prompt's ids: all of it is the question


def _prompt(backend, ids=(1, 2, 3)):
    return backend.embed(np.array([ids]))


def test_greedy_counts_up_from_the_last_prompt_token_and_stops_at_eos():
    b = FakeBackend()
    gen = decode.generate(b, _prompt(b), EOS, DecodeConfig(max_new_tokens=20), question_ids=Q)
    assert gen.token_ids == [4, 5, 6, 7, 8, 9]
    assert gen.stop_reason == "eos"


def test_temperature_zero_determinism():
    b = FakeBackend(peak=0.5)
    runs = [decode.generate(b, _prompt(b), EOS, DecodeConfig(max_new_tokens=12), question_ids=Q).token_ids for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


def test_seeded_sampling_repeats_with_the_same_seed_and_varies_across_seeds():
    b = FakeBackend(peak=0.5)  # flat enough that sampling often leaves the argmax
    cfg = lambda s: DecodeConfig(max_new_tokens=16, temperature=1.0, seed=s, ignore_eos=True)  # noqa: E731
    a1 = decode.generate(b, _prompt(b), EOS, cfg(7), question_ids=Q).token_ids
    a2 = decode.generate(b, _prompt(b), EOS, cfg(7), question_ids=Q).token_ids
    others = {tuple(decode.generate(b, _prompt(b), EOS, cfg(s), question_ids=Q).token_ids) for s in range(8, 14)}
    assert a1 == a2
    assert len(others | {tuple(a1)}) > 1


def test_max_new_tokens_respected():
    b = FakeBackend()
    gen = decode.generate(b, _prompt(b), (), DecodeConfig(max_new_tokens=5), question_ids=Q)
    assert len(gen.token_ids) == 5
    assert gen.stop_reason == "length"
    assert b.forward_calls == 5  # one prefill + four feeds: the last token is never fed back


def test_ignore_eos_decodes_through_end_of_sequence():
    b = FakeBackend()
    gen = decode.generate(b, _prompt(b), EOS, DecodeConfig(max_new_tokens=10, ignore_eos=True), question_ids=Q)
    assert len(gen.token_ids) == 10 and 9 in gen.token_ids


def test_features_have_one_row_per_token_from_the_state_that_chose_it():
    b = FakeBackend()
    gen = decode.generate(b, _prompt(b), EOS, DecodeConfig(max_new_tokens=4), question_ids=Q)
    assert gen.hidden_last.shape == (4, b.vocab) and gen.hidden_mid.shape == (4, b.vocab)
    # Row 0 comes from the last prompt token (3), row t from token t-1.
    assert list(gen.hidden_last.argmax(-1)) == [3, 4, 5, 6]
    np.testing.assert_array_equal(gen.question_hidden_last, b.embed(np.array([1, 2, 3])).mean(0))
    assert np.all(gen.logprobs <= 0) and np.all(gen.entropies > 0)


def test_on_token_sees_every_token_except_eos():
    b = FakeBackend()
    seen = []
    decode.generate(b, _prompt(b), EOS, DecodeConfig(max_new_tokens=20), on_token=seen.append, question_ids=Q)
    assert seen == [4, 5, 6, 7, 8]


def test_teacher_forcing_reproduces_the_generated_features():
    b = FakeBackend(peak=1.0)
    gen = decode.generate(b, _prompt(b), (), DecodeConfig(max_new_tokens=6, temperature=1.0, seed=3), question_ids=Q)
    tf = decode.teacher_force(b, _prompt(b), gen.token_ids, question_ids=Q)
    np.testing.assert_allclose(tf.logprobs, gen.logprobs, atol=1e-6)
    np.testing.assert_allclose(tf.entropies, gen.entropies, atol=1e-6)
    np.testing.assert_allclose(tf.hidden_last, gen.hidden_last)
    np.testing.assert_allclose(tf.question_hidden_mid, gen.question_hidden_mid)


def test_cancellation_stops_decoding_between_steps():
    b = FakeBackend()
    event = threading.Event()

    def cancel_after_two(token):
        if token == 5:
            event.set()

    with pytest.raises(CancelledError):
        decode.generate(b, _prompt(b), (), DecodeConfig(max_new_tokens=50), StopSignal(cancelled=event), cancel_after_two, question_ids=Q)
    assert b.forward_calls == 2


def test_a_passed_deadline_stops_before_prefill():
    b = FakeBackend()
    with pytest.raises(DeadlineExceededError):
        decode.generate(b, _prompt(b), EOS, DecodeConfig(), StopSignal(deadline=0.0), question_ids=Q)
    assert b.forward_calls == 0


def test_splice_image_fills_exactly_the_image_slots():
    emb = np.zeros((1, 5, 3), np.float32)
    ids = np.array([1, 7, 7, 2, 3])
    out = decode.splice_image(emb, ids, np.ones((1, 2, 3), np.float32), image_token_id=7)
    assert out[0, 1:3].sum() == 6 and out[0, [0, 3, 4]].sum() == 0


def test_question_features_pool_every_question_position_not_only_the_last():
    """The premise head reads these: a question token anywhere after the image must move them."""
    b = FakeBackend()  # hidden state at a position = one-hot of its token, so each position is visible
    cfg = DecodeConfig(max_new_tokens=2)
    a = decode.generate(b, _prompt(b, (1, 2, 5, 3)), EOS, cfg, question_ids=np.array([2, 5, 3]))
    c = decode.generate(b, _prompt(b, (1, 7, 5, 3)), EOS, cfg, question_ids=np.array([7, 5, 3]))  # same last token
    np.testing.assert_allclose(a.question_hidden_last, b.embed(np.array([2, 5, 3])).mean(0))
    np.testing.assert_allclose(a.question_hidden_mid, 0.5 * b.embed(np.array([2, 5, 3])).mean(0))
    assert not np.allclose(prompt_features(a), prompt_features(c))
    assert a.question_hidden_last[1] == 0  # positions before the question (the image) are left out
    tf = decode.teacher_force(b, _prompt(b, (1, 2, 5, 3)), a.token_ids, question_ids=np.array([2, 5, 3]))
    np.testing.assert_allclose(tf.question_hidden_last, a.question_hidden_last)
    assert a.question_ids.tolist() == tf.question_ids.tolist() == [2, 5, 3] and a.question_ids.dtype == np.int64


def test_question_ids_are_the_prompt_after_the_last_image_slot():
    assert decode.question_ids(np.array([0, 4, 4, 4, 7, 8]), image_token_id=4).tolist() == [7, 8]
    assert decode.question_ids(np.array([7, 8]), image_token_id=4).tolist() == [7, 8]


def test_question_start_is_the_first_position_after_the_last_image_slot():
    assert decode.question_start(np.array([0, 4, 4, 4, 7, 8]), image_token_id=4) == 4
    assert decode.question_start(np.array([7, 8]), image_token_id=4) == 0


def _count_exps(monkeypatch) -> list[int]:
    sizes: list[int] = []
    real = np.exp
    monkeypatch.setattr(decode.np, "exp", lambda x, *a, **k: sizes.append(np.size(x)) or real(x, *a, **k))
    return sizes


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_decoding_step_at_temperature_0_or_1_takes_one_exp_over_the_vocabulary(monkeypatch, temperature):
    logits = np.random.default_rng(0).normal(size=50).astype(np.float32)
    seq = decode.Sequence(DecodeConfig(max_new_tokens=4, temperature=temperature, seed=1), EOS)
    sizes = _count_exps(monkeypatch)
    seq.push(logits, np.zeros(3, np.float32), np.zeros(3, np.float32))
    assert sizes.count(logits.size) == 1


def test_sampling_from_the_shared_exp_picks_the_tokens_of_the_float64_path():
    logits = np.random.default_rng(1).normal(scale=2.0, size=300).astype(np.float32)
    _, weights = decode._shifted_exp(logits[None])
    for seed in range(100):
        alone = decode.sample(logits, 1.0, np.random.default_rng(seed))
        shared = decode.sample(logits, 1.0, np.random.default_rng(seed), weights=weights[0])
        assert shared == alone, seed
