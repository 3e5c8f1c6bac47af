"""Guard heads: small numpy MLPs over the model's own hidden states.

- The answer head reads the answer tokens' hidden states, pooled (mean) at a
  middle layer and the last, plus uncertainty features; it outputs the
  p(hallucination) logit and the four MedHallTune scores.
- The premise head reads the last prompt position only (question + image,
  before any answer); it outputs the logit of "the question's premise is false".

Both are stored in one safetensors file next to the model. Serving runs them
in numpy, so every backend shares them and they cost microseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guard.errors import ModelLoadError
from guard.types import Generation, GuardScores

UNCERTAINTY_FEATURES = ("mean_logprob", "min_logprob", "mean_entropy", "max_entropy", "log_num_tokens")
SCORE_NAMES = ("clinical_accuracy", "clinical_relevance", "detail_level", "risk_level")


def answer_features(gen: Generation) -> np.ndarray:
    """-> [2D + 5] float32."""
    unc = [gen.logprobs.mean(), gen.logprobs.min(), gen.entropies.mean(), gen.entropies.max(), np.log1p(len(gen.logprobs))]
    return np.concatenate([gen.hidden_mid.mean(0), gen.hidden_last.mean(0), np.array(unc)]).astype(np.float32)


def prompt_features(gen: Generation) -> np.ndarray:
    """-> [2D] float32: computed from the prompt alone."""
    return np.concatenate([gen.prompt_hidden_mid, gen.prompt_hidden_last]).astype(np.float32)


@dataclass
class MLPHead:
    """standardize -> Linear -> GELU -> Linear. x [N, F] -> [N, out]."""

    mean: np.ndarray  # [F]
    std: np.ndarray  # [F]
    w1: np.ndarray  # [F, H]
    b1: np.ndarray  # [H]
    w2: np.ndarray  # [H, out]
    b2: np.ndarray  # [out]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h = (x - self.mean) / self.std @ self.w1 + self.b1
        h = 0.5 * h * (1.0 + np.tanh(0.7978845608 * (h + 0.044715 * h**3)))  # GELU, tanh form
        return h @ self.w2 + self.b2

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{k}": np.ascontiguousarray(v, np.float32) for k, v in vars(self).items()}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], prefix: str) -> "MLPHead":
        return cls(**{k: t[f"{prefix}.{k}"] for k in ("mean", "std", "w1", "b1", "w2", "b2")})

    @classmethod
    def random(cls, in_dim: int, hidden: int, out: int, rng: np.random.Generator) -> "MLPHead":
        return cls(
            mean=np.zeros(in_dim, np.float32),
            std=np.ones(in_dim, np.float32),
            w1=(rng.standard_normal((in_dim, hidden)) / np.sqrt(in_dim)).astype(np.float32),
            b1=np.zeros(hidden, np.float32),
            w2=(rng.standard_normal((hidden, out)) / np.sqrt(hidden)).astype(np.float32),
            b2=np.zeros(out, np.float32),
        )


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class GuardHeads:
    answer: MLPHead  # -> [p_hallucination logit, 4 score logits]
    premise: MLPHead  # -> [premise-false logit]
    answer_temperature: float = 1.0
    premise_temperature: float = 1.0
    trained: bool = False
    """False for random-init heads: their outputs mean nothing."""
    info: dict | None = None
    """Free-form training record (data, metrics), kept in the file's metadata."""

    def score(self, gen: Generation) -> GuardScores:
        a = self.answer(answer_features(gen)[None])[0]
        p = self.premise(prompt_features(gen)[None])[0]
        scores = 1.0 + 9.0 * _sigmoid(a[1:5])
        return GuardScores(
            p_hallucination=float(_sigmoid(a[0] / self.answer_temperature)),
            premise_risk=float(_sigmoid(p[0] / self.premise_temperature)),
            heads_trained=self.trained,
            **{name: float(s) for name, s in zip(SCORE_NAMES, scores)},
        )

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        meta = {
            "format": "medhallguard-heads-v1",
            "answer_temperature": repr(self.answer_temperature),
            "premise_temperature": repr(self.premise_temperature),
            "trained": "true" if self.trained else "false",
            "info": json.dumps(self.info or {}),
        }
        save_file({**self.answer.tensors("answer"), **self.premise.tensors("premise")}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "GuardHeads":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("format") != "medhallguard-heads-v1":
                raise ValueError(f"unknown format {meta.get('format')!r}")
            return cls(
                answer=MLPHead.from_tensors(t, "answer"),
                premise=MLPHead.from_tensors(t, "premise"),
                answer_temperature=float(meta["answer_temperature"]),
                premise_temperature=float(meta["premise_temperature"]),
                trained=meta["trained"] == "true",
                info=json.loads(meta.get("info", "{}")),
            )
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise ModelLoadError(
                f"guard heads at {path} cannot be loaded ({exc}); retrain them with `medhallguard train` "
                "or write random ones with `medhallguard init-model`"
            ) from exc

    @classmethod
    def random(cls, hidden_size: int, seed: int = 0, width: int = 64) -> "GuardHeads":
        rng = np.random.default_rng(seed)
        return cls(
            answer=MLPHead.random(2 * hidden_size + len(UNCERTAINTY_FEATURES), width, 1 + len(SCORE_NAMES), rng),
            premise=MLPHead.random(2 * hidden_size, width, 1, rng),
            trained=False,
        )
