"""Batched training-time features agree with the runtime's one-request path."""

import numpy as np
import pytest

from guard import decode
from guard.preprocess import preprocess
from guard.runtime import load_guard
from guard.types import DecodeConfig
from tests.conftest import FAMILIES, png_bytes
from training.features import TorchModel, generate_batch, teacher_force_batch

QUESTIONS = ["Is there a nodule?", "What imaging modality is this, and is there any effusion on the left side?"]


@pytest.fixture(scope="module")
def guards(nano_models):
    return {f: load_guard(nano_models[f]) for f in FAMILIES}


def _inputs(g):
    pixels = np.stack([preprocess(png_bytes(seed=i), "image/png", g.spec.preprocess) for i in range(len(QUESTIONS))])
    prompts = [g.prompter.encode_prompt(q).tolist() for q in QUESTIONS]
    return prompts, pixels


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_generation_matches_the_runtime_decode_loop(guards, family):
    g = guards[family]
    prompts, pixels = _inputs(g)
    batched = generate_batch(TorchModel(g.backend.model, g.spec), prompts, pixels, max_new_tokens=8)
    for q, px, tokens in zip(QUESTIONS, pixels, batched):
        embeds, question = g._prompt_embeds(q, px[None])
        single = decode.generate(g.backend, embeds, g.spec.eos_token_ids, DecodeConfig(max_new_tokens=8),
                                 question_ids=question)
        assert tokens == single.token_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_teacher_forcing_matches_the_runtime_features(guards, family):
    g = guards[family]
    prompts, pixels = _inputs(g)
    answers = [g.prompter.encode_answer("No nodule.") + [g.spec.eos_token_ids[0]],
               g.prompter.encode_answer("This is a CT slice with a small left effusion.") + [g.spec.eos_token_ids[0]]]
    batched = teacher_force_batch(TorchModel(g.backend.model, g.spec), prompts, answers, pixels)
    for q, px, a, b in zip(QUESTIONS, pixels, answers, batched):
        embeds, question = g._prompt_embeds(q, px[None])
        single = decode.teacher_force(g.backend, embeds, a, question_ids=question)
        assert b.question_ids.tolist() == single.question_ids.tolist() == question.tolist()
        np.testing.assert_allclose(b.logprobs, single.logprobs, atol=1e-4)
        np.testing.assert_allclose(b.hidden_mid, single.hidden_mid, atol=1e-4)
        np.testing.assert_allclose(b.hidden_last, single.hidden_last, atol=1e-4)
        np.testing.assert_allclose(b.question_hidden_mid, single.question_hidden_mid, atol=1e-4)
        np.testing.assert_allclose(b.question_hidden_last, single.question_hidden_last, atol=1e-4)
