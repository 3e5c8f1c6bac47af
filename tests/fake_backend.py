"""FakeBackend: scripted logits for decode, head and policy tests; no model files.

Token t's embedding is one-hot, and the "model" prefers token (t + 1) % V with
a softmax spread, so greedy decoding counts upwards and sampling has real
choices to make.
"""

from __future__ import annotations

import numpy as np

from guard.backends import StepOutput


class FakeBackend:
    name = "fake"
    checksum = "sha256:fake"

    def __init__(self, vocab: int = 16, peak: float = 3.0):
        self.vocab = vocab
        self.peak = peak
        self.forward_calls = 0

    def encode_image(self, pixels):
        return np.zeros((pixels.shape[0], 2, self.vocab), np.float32)

    def embed(self, ids):
        return np.eye(self.vocab, dtype=np.float32)[ids]

    def new_cache(self, batch):
        return []

    def forward(self, embeds, attention_mask, position_ids, cache):
        self.forward_calls += 1
        assert attention_mask.shape[1] == len(cache) + embeds.shape[1], "mask covers past + new positions"
        tokens = embeds[0].argmax(-1)
        logits = np.zeros((1, len(tokens), self.vocab), np.float32)
        logits[0, np.arange(len(tokens)), (tokens + 1) % self.vocab] = self.peak
        step = StepOutput(logits=logits, hidden_mid=embeds * 0.5, hidden_last=embeds.copy())
        return step, cache + list(tokens)
