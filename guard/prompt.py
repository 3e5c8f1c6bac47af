"""Question -> prompt token ids, and token ids -> text.

Templates are plain strings from the ModelSpec, so serving needs neither Jinja
nor transformers. User text is encoded with special-token matching turned off:
a question that contains "<image>" or "<end_of_utterance>" cannot forge image
slots or end the turn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from guard.spec import ModelSpec


class Prompter:
    def __init__(self, tokenizer_path: str | Path, spec: ModelSpec):
        from tokenizers import Tokenizer

        self.spec = spec
        self._tok = Tokenizer.from_file(str(tokenizer_path))
        self._user_tok = Tokenizer.from_file(str(tokenizer_path))
        self._user_tok.encode_special_tokens = True
        self._image_ids = self._ids(spec.image_text)
        assert self._image_ids.count(spec.image_token_id) == spec.num_image_tokens, "image text must hold one slot per feature"
        before, rest = spec.prompt_template.split("{image}")
        middle, after = rest.split("{question}")
        self._parts = (self._ids(before), self._ids(middle), self._ids(after))

    def _ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids if text else []

    def encode_prompt(self, question: str) -> np.ndarray:
        """-> int64 [S], with `num_image_tokens` image slots."""
        before, middle, after = self._parts
        user = self._user_tok.encode(question.strip(), add_special_tokens=False).ids
        bos = [self.spec.bos_token_id] if self.spec.bos_token_id is not None else []
        return np.array(bos + before + self._image_ids + middle + user + after, dtype=np.int64)

    def encode_answer(self, answer: str) -> list[int]:
        """Answer text -> the token ids the model would have produced (without EOS)."""
        return self._user_tok.encode(self.spec.answer_prefix + answer.strip(), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i not in self.spec.eos_token_ids], skip_special_tokens=True).strip()
