"""Guard heads: small numpy models over the model's own hidden states.

Features (D = hidden size; "mid" is layer `spec.mid_layer`, "last" the final normed layer):
- question features [2D]: the mean hidden state, mid and last, over the question
  (every prompt position after the image slots: the question and the turn's end);
- answer features [4D + 5]: the mean over the answer tokens' hidden states, mid
  and last, the question features, and uncertainty features.

- question n-grams [V]: TF-IDF of the question's token ids (unigrams and bigrams,
  the same positions as the question features), `QuestionNgrams`.

Heads (format v3):
- hallucination: MLP on answer features -> the p(hallucination) logit;
- scores: linear (ridge) on answer features -> the four MedHallTune score logits;
- premise: linear (logistic) on [question features, question n-grams] -> the
  "premise is false" logit. The n-grams carry the wording a false premise is
  phrased in; the hidden states carry what the model makes of it.

Format v2 is v3 without the n-grams (the premise head reads question features
only); its files still load and serve. Format v1 read the last prompt position
only; its files are refused with a clear error, because their weights mean
nothing on later features. All heads are stored in one safetensors file next to
the model. Serving runs them in numpy, so every backend shares them and they
cost microseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from guard.errors import ModelLoadError
from guard.types import Generation, GuardScores

UNCERTAINTY_FEATURES = ("mean_logprob", "min_logprob", "mean_entropy", "max_entropy", "log_num_tokens")
SCORE_NAMES = ("clinical_accuracy", "clinical_relevance", "detail_level", "risk_level")
HEADS_FORMAT = "medhallguard-heads-v3"
"""The format this release writes."""
READABLE_HEADS_FORMATS = ("medhallguard-heads-v2", HEADS_FORMAT)
"""The formats this release serves: v2 files have no question n-grams."""


def prompt_features(gen: Generation) -> np.ndarray:
    """-> [2D] float32: the question's mean hidden states; computed from the prompt alone."""
    return np.concatenate([gen.question_hidden_mid, gen.question_hidden_last]).astype(np.float32)


def answer_features(gen: Generation) -> np.ndarray:
    """-> [4D + 5] float32: answer means (mid, last), question means (mid, last), uncertainty."""
    unc = [gen.logprobs.mean(), gen.logprobs.min(), gen.entropies.mean(), gen.entropies.max(), np.log1p(len(gen.logprobs))]
    return np.concatenate([gen.hidden_mid.mean(0), gen.hidden_last.mean(0), prompt_features(gen),
                           np.array(unc)]).astype(np.float32)


def heads_format(path: str | Path) -> str | None:
    """The format a heads file declares (None when it declares none); raises OSError if it cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return (f.metadata() or {}).get("format")
    except SafetensorError as exc:
        raise OSError(f"{path} is not a safetensors file ({exc})") from exc


def feature_sizes(hidden_size: int) -> tuple[int, int]:
    """-> (answer features, prompt features) lengths for a model of this hidden size."""
    return 4 * hidden_size + len(UNCERTAINTY_FEATURES), 2 * hidden_size


class _SavedAsTensors:
    """tensors()/from_tensors(): a head's fields as named float32 arrays in a safetensors file."""

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{k}": np.ascontiguousarray(v, np.float32) for k, v in vars(self).items()}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], prefix: str):
        return cls(**{f.name: t[f"{prefix}.{f.name}"] for f in fields(cls)})


@dataclass
class LinearHead(_SavedAsTensors):
    """standardize -> Linear. x [N, F] -> [N, out]."""

    mean: np.ndarray  # [F]
    std: np.ndarray  # [F]
    w: np.ndarray  # [F, out]
    b: np.ndarray  # [out]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std @ self.w + self.b

    @property
    def in_dim(self) -> int:
        return self.w.shape[0]

    @classmethod
    def random(cls, in_dim: int, out: int, rng: np.random.Generator) -> "LinearHead":
        return cls(mean=np.zeros(in_dim, np.float32), std=np.ones(in_dim, np.float32),
                   w=(rng.standard_normal((in_dim, out)) / np.sqrt(in_dim)).astype(np.float32),
                   b=np.zeros(out, np.float32))


@dataclass
class MLPHead(_SavedAsTensors):
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

    @property
    def in_dim(self) -> int:
        return self.w1.shape[0]

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


_BIGRAM = np.int64(1) << 32


@dataclass
class QuestionNgrams:
    """TF-IDF over a question's token ids: unigrams and bigrams, sublinear tf (1 + log tf) x idf, L2-normalised.

    The vocabulary is fitted at training time (sklearn's TfidfVectorizer, smooth idf); n-grams outside
    it are ignored. A unigram t has key t, a bigram (a, b) key (a + 1) * 2**32 + b: int64, since a
    49k vocabulary's bigram keys are beyond float32's exact integers.
    """

    keys: np.ndarray  # [V] int64, sorted: the n-gram of each feature
    idf: np.ndarray  # [V] float32

    def __post_init__(self) -> None:
        self.keys = np.asarray(self.keys, np.int64)
        self.idf = np.asarray(self.idf, np.float32)
        assert self.keys.shape == self.idf.shape and np.all(np.diff(self.keys) > 0), "keys are sorted and unique"

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def ngram_keys(ids) -> np.ndarray:
        """Token ids [Q] -> the keys of their unigrams and bigrams [2Q - 1], int64."""
        ids = np.asarray(ids, np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= _BIGRAM >> 1):
            raise ValueError("question token ids must be in [0, 2**31)")
        return np.concatenate([ids, (ids[:-1] + 1) * _BIGRAM + ids[1:]])

    def sparse(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Token ids [Q] -> (feature indices [K], values [K] float32) of the known n-grams."""
        keys, counts = np.unique(self.ngram_keys(ids), return_counts=True)
        at = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        known = self.keys[at] == keys if len(self.keys) else np.zeros(len(keys), bool)
        at, counts = at[known], counts[known]
        values = (1.0 + np.log(counts)) * self.idf[at]
        norm = np.sqrt(np.sum(values.astype(np.float64) ** 2))
        return at, (values / norm if norm > 0 else values).astype(np.float32)

    def __call__(self, ids) -> np.ndarray:
        """Token ids [Q] -> the dense TF-IDF vector [V] float32."""
        out = np.zeros(len(self.keys), np.float32)
        at, values = self.sparse(ids)
        out[at] = values
        return out

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.keys": np.ascontiguousarray(self.keys, np.int64),
                f"{prefix}.idf": np.ascontiguousarray(self.idf, np.float32)}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], prefix: str) -> "QuestionNgrams | None":
        if f"{prefix}.keys" not in t:
            return None
        if t[f"{prefix}.keys"].dtype != np.int64:
            raise ValueError(f"{prefix}.keys must be int64")
        return cls(keys=t[f"{prefix}.keys"], idf=t[f"{prefix}.idf"])


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class GuardHeads:
    hallucination: MLPHead  # answer features -> [p_hallucination logit]
    scores: LinearHead  # answer features -> [4 score logits]; score = 1 + 9 * sigmoid(logit)
    premise: LinearHead  # premise features (premise_features()) -> [premise-false logit]
    answer_temperature: float = 1.0
    premise_temperature: float = 1.0
    trained: bool = False
    """False for random-init heads: their outputs mean nothing."""
    info: dict | None = None
    """Free-form training record (data, metrics), kept in the file's metadata."""
    premise_ngrams: QuestionNgrams | None = None
    """The question n-grams the premise head also reads; None: it reads the question features only (v2)."""

    def feature_sizes(self) -> tuple[int, int]:
        """-> (answer features, prompt features) lengths these heads read from hidden states."""
        assert self.hallucination.in_dim == self.scores.in_dim, "both answer heads read the same features"
        return self.hallucination.in_dim, self.premise.in_dim - len(self.premise_ngrams or ())

    def premise_features(self, gen: Generation) -> np.ndarray:
        """-> [2D (+ V)] float32: the prompt features, then the question's n-gram TF-IDF when the head reads it."""
        if self.premise_ngrams is None:
            return prompt_features(gen)
        return np.concatenate([prompt_features(gen), self.premise_ngrams(gen.question_ids)])

    def score(self, gen: Generation) -> GuardScores:
        a = answer_features(gen)[None]
        h, s = self.hallucination(a)[0, 0], self.scores(a)[0]
        p = self.premise(self.premise_features(gen)[None])[0, 0]
        scores = 1.0 + 9.0 * _sigmoid(s)
        return GuardScores(
            p_hallucination=float(_sigmoid(h / self.answer_temperature)),
            premise_risk=float(_sigmoid(p / self.premise_temperature)),
            heads_trained=self.trained,
            **{name: float(v) for name, v in zip(SCORE_NAMES, scores)},
        )

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        meta = {
            "format": HEADS_FORMAT,
            "answer_temperature": repr(self.answer_temperature),
            "premise_temperature": repr(self.premise_temperature),
            "trained": "true" if self.trained else "false",
            "info": json.dumps(self.info or {}),
        }
        tensors = {**self.hallucination.tensors("hallucination"), **self.scores.tensors("scores"),
                   **self.premise.tensors("premise")}
        if self.premise_ngrams is not None:
            tensors.update(self.premise_ngrams.tensors("premise_ngrams"))
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "GuardHeads":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError) as exc:
            raise ModelLoadError(f"guard heads at {path} cannot be read ({exc}); refit them with "
                                 "`medhallguard build-default --heads-only` or `medhallguard init-model`") from exc
        fmt = meta.get("format")
        if fmt not in READABLE_HEADS_FORMATS:
            raise ModelLoadError(
                f"guard heads at {path} are format {fmt!r}, but this release reads {READABLE_HEADS_FORMATS} "
                "(v2 and later pool the question's hidden states; v1 weights mean nothing on those features). "
                "Refit the heads on the model: `medhallguard build-default --heads-only --out BUILD_DIR` "
                "for the default recipe, or write random ones with `medhallguard init-model`"
            )
        try:
            return cls(
                hallucination=MLPHead.from_tensors(t, "hallucination"),
                scores=LinearHead.from_tensors(t, "scores"),
                premise=LinearHead.from_tensors(t, "premise"),
                answer_temperature=float(meta["answer_temperature"]),
                premise_temperature=float(meta["premise_temperature"]),
                trained=meta["trained"] == "true",
                info=json.loads(meta.get("info", "{}")),
                premise_ngrams=QuestionNgrams.from_tensors(t, "premise_ngrams") if fmt == HEADS_FORMAT else None,
            )
        except (ValueError, KeyError, AssertionError) as exc:
            raise ModelLoadError(f"guard heads at {path} are incomplete ({exc!r} is missing or bad); refit them "
                                 "with `medhallguard build-default --heads-only` or `medhallguard init-model`") from exc

    @classmethod
    def random(cls, hidden_size: int, seed: int = 0, width: int = 64) -> "GuardHeads":
        rng = np.random.default_rng(seed)
        answer_dim, prompt_dim = feature_sizes(hidden_size)
        return cls(
            hallucination=MLPHead.random(answer_dim, width, 1, rng),
            scores=LinearHead.random(answer_dim, len(SCORE_NAMES), rng),
            premise=LinearHead.random(prompt_dim, 1, rng),
            trained=False,
        )
