"""The decode loop: prefill, then one token at a time with a KV cache.

It works on embeddings, token ids and backend outputs only; it knows nothing
of images, tokenization, gRPC or thresholds. For every emitted token it keeps
the log-probability, the entropy and the two hidden states that produced it,
which is exactly what the guard heads read, and at prefill the mean hidden
states over the question (every prompt position after the image slots) and
the token ids at those positions.
`teacher_force` computes the same features for an answer produced elsewhere,
in one forward pass.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from guard.backends import Backend
from guard.types import DecodeConfig, Generation, StopSignal


def splice_image(embeds: np.ndarray, ids: np.ndarray, image_features: np.ndarray, image_token_id: int) -> np.ndarray:
    """Put image features into the image slots. embeds [1,S,D], ids [S], image_features [1,T_img,D]."""
    slots = ids == image_token_id
    assert slots.sum() == image_features.shape[1], "one image slot per image feature"
    embeds = embeds.copy()
    embeds[0, slots] = image_features[0]
    return embeds


def question_start(ids: np.ndarray, image_token_id: int) -> int:
    """ids [S] -> the first prompt position after the last image slot: the question and the turn's end."""
    slots = np.flatnonzero(ids == image_token_id)
    start = int(slots[-1]) + 1 if len(slots) else 0
    assert start < len(ids), "the prompt must hold text after the image"
    return start


def question_ids(ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """ids [S] -> the question's token ids [Q] int64: positions question_start.. to the prompt's end."""
    return np.asarray(ids[question_start(ids, image_token_id):], np.int64)


def question_means(hidden_mid: np.ndarray, hidden_last: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Prefill hidden states [S, D] -> their means over positions start.. ([D], [D]), float32."""
    return hidden_mid[start:].mean(0, dtype=np.float32), hidden_last[start:].mean(0, dtype=np.float32)


def _question_from(prompt_states: np.ndarray, question_ids: np.ndarray) -> int:
    """The question's first position in a prompt's states [S, D]: it fills the last len(question_ids)."""
    start = len(prompt_states) - len(question_ids)
    assert len(question_ids) and start >= 0, "the question is a non-empty tail of the prompt"
    return start


def token_stats(logits: np.ndarray, tokens: np.ndarray,
                shifted: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """logits [N, V], tokens [N] -> (log p(token) [N], entropy [N]), float32.

    One exp over the vocabulary per row, in float32: this runs once per generated
    token, and a float64 log-softmax plus a second exp for the entropy cost ~10%
    of an int8 decoding step of a 49k-vocabulary model. `shifted` is
    _shifted_exp(logits) when the caller has it (Sequence.push shares it with sample).
    """
    z, e = shifted if shifted is not None else _shifted_exp(logits)  # [N, V] each
    s = e.sum(axis=-1)
    lse = np.log(s)
    logp = z[np.arange(len(tokens)), tokens] - lse
    ent = lse - np.einsum("nv,nv->n", e, z) / s  # H = log Z - E_p[z]
    return logp.astype(np.float32), ent.astype(np.float32)


def _shifted_exp(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """logits [N, V] -> (z = logits - row max, exp(z)), in the logits' dtype."""
    z = logits - logits.max(axis=-1, keepdims=True)
    return z, np.exp(z)


def sample(logits: np.ndarray, temperature: float, rng: np.random.Generator,
           weights: np.ndarray | None = None) -> int:
    """logits: [V] at temperature 1. Greedy at 0; else softmax(logits / temperature), normalized in float64.

    `weights` is exp(logits - max) when the caller computed it: at temperature 1 it is the unnormalized
    distribution, so no second exp is needed. At any other temperature exp(z / T) is a different
    distribution from the exp(z) the token statistics need, and costs its own exp.
    """
    if temperature == 0.0:
        return int(np.argmax(logits))
    if temperature == 1.0 and weights is not None:
        p = weights.astype(np.float64)
    else:
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
    return int(rng.choice(p.shape[0], p=p / p.sum()))


class Sequence:
    """One answer being decoded: its sampler, its tokens so far and the features the guard reads.

    The unbatched loop below and the batch scheduler (guard/batching.py) both
    feed it one distribution at a time, so a sequence decodes the same either way.
    """

    def __init__(self, config: DecodeConfig, eos_token_ids: tuple[int, ...],
                 on_token: Callable[[int], None] | None = None):
        self.config, self.eos_token_ids, self.on_token = config, eos_token_ids, on_token
        self.rng = np.random.default_rng(config.seed)
        self.tokens: list[int] = []
        self._logprobs, self._entropies, self._mids, self._lasts = [], [], [], []
        self._question: tuple[np.ndarray, np.ndarray] | None = None
        self._question_ids = np.zeros(0, np.int64)
        self.stop_reason = "length"

    def set_question(self, hidden_mid: np.ndarray, hidden_last: np.ndarray, question_ids: np.ndarray) -> None:
        """Keep the question's ids ([Q], the prompt's last Q positions) and its mean hidden states
        from the prefill output ([S, D] each)."""
        self._question = question_means(hidden_mid, hidden_last, _question_from(hidden_mid, question_ids))
        self._question_ids = np.asarray(question_ids, np.int64)

    def push(self, logits: np.ndarray, h_mid: np.ndarray, h_last: np.ndarray) -> int | None:
        """Take the distribution at the newest position ([V], [D], [D]) and pick a token.

        Returns the token to feed back, or None when the sequence is complete.
        """
        shifted = _shifted_exp(logits[None])  # the one exp over the vocabulary (at temperature 0 or 1)
        token = sample(logits, self.config.temperature, self.rng, weights=shifted[1][0])
        logp, ent = token_stats(logits[None], np.array([token]), shifted)
        self.tokens.append(token)
        self._logprobs.append(logp[0])
        self._entropies.append(ent[0])
        self._mids.append(h_mid)
        self._lasts.append(h_last)
        if token in self.eos_token_ids and not self.config.ignore_eos:
            self.stop_reason = "eos"
            return None
        if self.on_token is not None:
            self.on_token(token)
        return None if len(self.tokens) == self.config.max_new_tokens else token

    def result(self, prefill_ms: float = 0.0, decode_ms: float = 0.0) -> Generation:
        assert self._question is not None and self.tokens, "a sequence yields a result only after its prefill"
        return Generation(
            token_ids=list(self.tokens),
            logprobs=np.array(self._logprobs, np.float32),
            entropies=np.array(self._entropies, np.float32),
            hidden_mid=np.stack(self._mids).astype(np.float32),
            hidden_last=np.stack(self._lasts).astype(np.float32),
            question_hidden_mid=self._question[0],
            question_hidden_last=self._question[1],
            question_ids=self._question_ids,
            stop_reason=self.stop_reason,
            prefill_ms=prefill_ms,
            decode_ms=decode_ms,
        )


def generate(
    backend: Backend,
    prompt_embeds: np.ndarray,
    eos_token_ids: tuple[int, ...],
    config: DecodeConfig,
    stop: StopSignal | None = None,
    on_token: Callable[[int], None] | None = None,
    *,
    question_ids: np.ndarray,
) -> Generation:
    """prompt_embeds: [1, S, D] with the image already spliced in; `question_ids` [Q] are the token ids of
    its last Q positions, the question (see `question_ids()`)."""
    stop = stop or StopSignal()
    seq = Sequence(config, eos_token_ids, on_token)
    seq_len = prompt_embeds.shape[1]

    # 1) Prefill the whole prompt in one call; its last position predicts token 0.
    t0 = time.perf_counter()
    stop.check()
    out, cache = backend.forward(
        prompt_embeds, np.ones((1, seq_len), np.int64), np.arange(seq_len, dtype=np.int64)[None], backend.new_cache(1)
    )
    seq.set_question(out.hidden_mid[0], out.hidden_last[0], question_ids)
    token = seq.push(out.logits[0, -1], out.hidden_mid[0, -1], out.hidden_last[0, -1])
    t1 = time.perf_counter()

    # 2) Decode: feed the picked token back, one position at a time, until the sequence is complete.
    while token is not None:
        stop.check()
        pos = seq_len + len(seq.tokens) - 1
        out, cache = backend.forward(
            backend.embed(np.array([[token]], np.int64)), np.ones((1, pos + 1), np.int64), np.array([[pos]], np.int64),
            cache,
        )
        token = seq.push(out.logits[0, -1], out.hidden_mid[0, -1], out.hidden_last[0, -1])
    return seq.result(prefill_ms=(t1 - t0) * 1e3, decode_ms=(time.perf_counter() - t1) * 1e3)


def teacher_force(
    backend: Backend, prompt_embeds: np.ndarray, answer_ids: list[int], stop: StopSignal | None = None,
    *, question_ids: np.ndarray,
) -> Generation:
    """Features of a given answer, as if the model had generated it. answer_ids should end with EOS;
    `question_ids` as in `generate`."""
    assert answer_ids, "teacher forcing needs at least one answer token"
    (stop or StopSignal()).check()
    t0 = time.perf_counter()
    seq_len, n = prompt_embeds.shape[1], len(answer_ids)
    ids = np.array([answer_ids[:-1]], np.int64)  # the last answer token is predicted, never fed
    embeds = np.concatenate([prompt_embeds, backend.embed(ids)], axis=1) if n > 1 else prompt_embeds
    total = seq_len + n - 1
    out, _ = backend.forward(
        embeds, np.ones((1, total), np.int64), np.arange(total, dtype=np.int64)[None], backend.new_cache(1)
    )
    rows = slice(seq_len - 1, total)  # positions whose logits predict answer tokens
    logprobs, entropies = token_stats(out.logits[0, rows], np.array(answer_ids))
    q_mid, q_last = question_means(out.hidden_mid[0, :seq_len], out.hidden_last[0, :seq_len],
                                   _question_from(out.hidden_mid[0, :seq_len], question_ids))
    return Generation(
        token_ids=list(answer_ids),
        logprobs=logprobs,
        entropies=entropies,
        hidden_mid=out.hidden_mid[0, rows].astype(np.float32),
        hidden_last=out.hidden_last[0, rows].astype(np.float32),
        question_hidden_mid=q_mid,
        question_hidden_last=q_last,
        question_ids=np.asarray(question_ids, np.int64),
        stop_reason="teacher_forced",
        prefill_ms=(time.perf_counter() - t0) * 1e3,
    )
