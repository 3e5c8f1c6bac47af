"""Question -> prompt token ids, and token ids -> text.

Templates are plain strings from the ModelSpec, so serving needs neither Jinja
nor transformers. User text is encoded with special-token matching turned off:
a question that contains "<image>" or "<end_of_utterance>" cannot forge image
slots or end the turn.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from guard.spec import ModelSpec


FIELDS = ("{image}", "{question}")


def template_parts(template: str) -> list[str]:
    """A prompt template -> its literal texts and fields, in order. It holds `{image}` once and
    `{question}` once after it, and may hold `{question}` before the image too: the image tokens
    then follow the question, and the model can read them with the question in view (the question
    is repeated after the image, where the guard reads it: `guard.decode.question_start`)."""
    parts = [p for p in re.split(r"(\{image\}|\{question\})", template) if p]
    if parts.count("{image}") != 1 or parts[parts.index("{image}"):].count("{question}") != 1 \
            or parts.count("{question}") > 2:
        raise ValueError(f"prompt template {template!r} must hold {{image}} once and {{question}} after it "
                         "(and at most once before it)")
    return parts


class Prompter:
    def __init__(self, tokenizer_path: str | Path, spec: ModelSpec):
        from tokenizers import Tokenizer

        self.spec = spec
        self._tok = Tokenizer.from_file(str(tokenizer_path))
        self._user_tok = Tokenizer.from_file(str(tokenizer_path))
        self._user_tok.encode_special_tokens = True
        self._image_ids = self._ids(spec.image_text)
        assert self._image_ids.count(spec.image_token_id) == spec.num_image_tokens, "image text must hold one slot per feature"
        self._parts = template_parts(spec.prompt_template)
        self._literals = {i: self._ids(part) for i, part in enumerate(self._parts) if part not in FIELDS}

    def _ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids if text else []

    def encode_prompt(self, question: str) -> np.ndarray:
        """-> int64 [S], with `num_image_tokens` image slots."""
        user = self._user_tok.encode(question.strip(), add_special_tokens=False).ids
        ids = [self.spec.bos_token_id] if self.spec.bos_token_id is not None else []
        for i, part in enumerate(self._parts):
            ids += self._image_ids if part == "{image}" else user if part == "{question}" else self._literals[i]
        return np.array(ids, dtype=np.int64)

    def encode_answer(self, answer: str) -> list[int]:
        """Answer text -> the token ids the model would have produced (without EOS)."""
        return self._user_tok.encode(self.spec.answer_prefix + answer.strip(), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i not in self.spec.eos_token_ids], skip_special_tokens=True).strip()
