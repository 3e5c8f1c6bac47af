"""Dataclasses that cross module lines.

`VqaRequest` enters the runtime, `Generation` leaves the decode loop,
`GuardScores` leaves the heads, `Verdict` leaves the policy, and `GuardResult`
is what a caller (the gRPC servicer, the CLI, a benchmark) gets back.
Arrays are numpy: that is what every backend returns.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from guard.errors import CancelledError, DeadlineExceededError


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode one answer."""

    max_new_tokens: int = 128
    """Stop after this many new tokens if no end-of-sequence token came first."""
    temperature: float = 0.0
    """0 means greedy; above 0, sample from softmax(logits / temperature)."""
    seed: int | None = None
    """Seed for sampling; the same seed, prompt and model give the same answer."""
    ignore_eos: bool = False
    """Keep decoding past end-of-sequence (benchmarks use this for fixed-length runs)."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 4096:
            raise ValueError("`max_new_tokens` must be between 1 and 4096.")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError("`temperature` must be between 0 and 5.")


@dataclass(frozen=True)
class VqaRequest:
    """One question about one image, as the runtime sees it (no wire types)."""

    image: bytes
    media_type: str
    """`image/png`, `image/jpeg` or `application/dicom`."""
    question: str
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    request_id: str = ""
    answer: str | None = None
    """Set for scoring an answer produced elsewhere; then nothing is generated."""


@dataclass
class Generation:
    """What the decode loop produced, with the per-token features the guard reads.

    Row t of every array belongs to generated token t; its hidden states are the
    ones whose logits chose that token (so row 0 is the last prompt position).
    """

    token_ids: list[int]
    logprobs: np.ndarray  # [T] float32, log p(token_t)
    entropies: np.ndarray  # [T] float32, entropy of the distribution token_t was drawn from
    hidden_mid: np.ndarray  # [T, D] float32, a middle decoder layer
    hidden_last: np.ndarray  # [T, D] float32, the final (normed) decoder layer
    question_hidden_mid: np.ndarray  # [D] mean over the prompt positions after the image (question + turn end)
    question_hidden_last: np.ndarray  # [D] the same, final layer
    question_ids: np.ndarray  # [Q] int64, the prompt's token ids at those positions (the premise head's n-grams)
    stop_reason: str  # "eos" | "length"
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    vision_ms: float = 0.0
    """Vision encoder (and prompt embedding); with batching, the encoder call this request's image shared."""


class VerdictKind(enum.Enum):
    ANSWER = "answer"
    ANSWER_WITH_WARNING = "answer_with_warning"
    ABSTAIN = "abstain"


@dataclass(frozen=True)
class GuardScores:
    """Everything the guard heads say about one answer."""

    p_hallucination: float
    premise_risk: float
    clinical_accuracy: float
    clinical_relevance: float
    detail_level: float
    risk_level: float
    heads_trained: bool


@dataclass(frozen=True)
class Verdict:
    kind: VerdictKind
    reasons: tuple[str, ...]


@dataclass
class Timings:
    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    guard_ms: float = 0.0


@dataclass
class GuardResult:
    """The runtime's answer to one request."""

    request_id: str
    answer: str
    """Empty when the verdict is ABSTAIN and the policy withholds answers."""
    verdict: Verdict
    scores: GuardScores | None
    """None only when the guard could not score; the verdict is then ABSTAIN."""
    timings: Timings
    model_id: str
    model_checksum: str
    backend: str
    num_tokens: int = 0
    stop_reason: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """What `GetModelInfo` reports about the loaded model."""

    model_id: str
    family: str
    checksum: str
    backend: str
    """`torch`, `onnxruntime` or `tensorrt`, plus the device or provider in use."""
    image_size: int
    num_image_tokens: int
    heads_trained: bool
    verified: bool = True
    """False for an export bundle written with `--force` (parity gate skipped)."""
    thresholds: dict[str, float] = field(default_factory=dict)


class StopSignal:
    """Deadline and cancellation, checked by the decode loop between steps.

    `deadline` is a `time.monotonic()` value. The server sets `cancelled` when the
    client goes away; `check()` turns either condition into a typed error.
    """

    def __init__(self, deadline: float | None = None, cancelled: threading.Event | None = None):
        self.deadline = deadline
        self.cancelled = cancelled

    def check(self) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise CancelledError("the request was cancelled by the client; decoding stopped")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceededError(
                "the request's deadline passed before the answer was complete; "
                "raise the deadline or lower max_new_tokens"
            )
