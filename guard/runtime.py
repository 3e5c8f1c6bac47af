"""Guard: the runtime's main flow. `Guard.answer()` is the table of contents.

preprocess -> encode image -> decode -> score -> decide. Each step lives in
its own module; with batching on, encode and decode run in the batch
scheduler (guard/batching.py) that concurrent calls share. This file wires
them, times them, and assembles the config tables of a deployment's TOML
file (the `[server]` table belongs to server/).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np

from guard import decode
from guard.backends import Backend, load_backend
from guard.batching import BatchingConfig, BatchScheduler
from guard.errors import InvalidRequestError, ModelLoadError
from guard.head import GuardHeads, feature_sizes
from guard.manifest import MANIFEST_FILE, is_bundle
from guard.policy import PolicyConfig, decide
from guard.preprocess import ImageLimits, preprocess
from guard.prompt import Prompter
from guard.spec import HEADS_FILE
from guard.types import (
    DecodeConfig,
    Generation,
    GuardResult,
    GuardScores,
    ModelInfo,
    StopSignal,
    Timings,
    VerdictKind,
    VqaRequest,
)

log = logging.getLogger(__name__)


BACKEND_KINDS = ("auto", "torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class BackendConfig:
    kind: str = "auto"
    """Which backend runs the model: `auto` (torch for a model directory, onnxruntime for an
    export bundle), `torch`, `onnxruntime` or `tensorrt` (the last two serve bundles)."""
    device: str = "cpu"
    """torch: `cpu` or `cuda:0`; onnxruntime: `cpu`, `cuda[:N]` or `tensorrt[:N]` (used only when active)."""
    dtype: str = "float32"
    """Weight dtype for the torch backend: float32, bfloat16 or float16 (a bundle has its own precision)."""
    threads: int = 0
    """Intra-op threads; 0 keeps the library default."""

    def __post_init__(self) -> None:
        if self.kind not in BACKEND_KINDS:
            raise ValueError(f"`backend.kind` must be one of {BACKEND_KINDS}, got {self.kind!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"`backend.dtype` must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.threads < 0:
            raise ValueError("`backend.threads` must be >= 0")


@dataclass(frozen=True)
class GuardConfig:
    backend: BackendConfig = field(default_factory=BackendConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    limits: ImageLimits = field(default_factory=ImageLimits)
    batching: BatchingConfig = field(default_factory=BatchingConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "GuardConfig":
        """Build from parsed TOML tables; an unknown table or key is an error that names it."""
        tables = {f.name: f.default_factory for f in fields(cls)}
        kwargs = {}
        for name, value in d.items():
            if name not in tables:
                raise ValueError(f"unknown config table [{name}]; known tables: {sorted(tables)} and [server]")
            table_cls = tables[name]
            known = {f.name for f in fields(table_cls)}
            unknown = set(value) - known
            if unknown:
                raise ValueError(f"unknown key(s) {sorted(unknown)} in [{name}]; known keys: {sorted(known)}")
            kwargs[name] = table_cls(**value)
        return cls(**kwargs)


class Guard:
    def __init__(self, backend: Backend, prompter: Prompter, heads: GuardHeads, config: GuardConfig):
        self.backend = backend
        self.prompter = prompter
        self.heads = heads
        self.config = config
        self.spec = backend.spec
        self.batcher = (
            BatchScheduler(backend, config.batching, self.spec.image_token_id, self.spec.eos_token_ids)
            if config.batching.enabled else None
        )
        """Shares the decoder among concurrent answer() calls; None runs each call on its own."""

    def answer(
        self, req: VqaRequest, stop: StopSignal | None = None, on_text: Callable[[str], None] | None = None
    ) -> GuardResult:
        """Answer one question about one image, and judge the answer."""
        _check_question(req.question)
        timings = Timings()
        # 1) Image bytes -> normalized pixels [1, 3, H, W].
        t = time.perf_counter()
        pixels = preprocess(req.image, req.media_type, self.spec.preprocess, self.config.limits)[None]
        timings.preprocess_ms = _ms_since(t)
        # 2) Vision encoder, then 3) decode, batched with other requests when batching is on;
        #    or teacher-force an answer produced elsewhere (never batched).
        if req.answer is None:
            streamer = _TextStreamer(self.prompter, on_text) if on_text else None
            gen = self._generate(req.question, pixels, req.decode, stop, streamer and streamer.on_token)
            text = self.prompter.decode(gen.token_ids)
            if streamer:
                streamer.flush(text)
        else:
            answer_ids = self.prompter.encode_answer(req.answer) + [self.spec.eos_token_ids[0]]
            gen = self._teacher_force(req.question, pixels, answer_ids, stop)
            text = req.answer
        timings.vision_ms, timings.prefill_ms, timings.decode_ms = gen.vision_ms, gen.prefill_ms, gen.decode_ms
        # 4) Guard heads -> scores; 5) policy -> verdict. Fails closed on any scoring error.
        t = time.perf_counter()
        scores = self._score(gen, req.request_id)
        verdict = decide(scores, self.config.policy)
        timings.guard_ms = _ms_since(t)
        if verdict.kind is VerdictKind.ABSTAIN and self.config.policy.withhold_answer_on_abstain:
            text = ""
        return GuardResult(
            request_id=req.request_id,
            answer=text,
            verdict=verdict,
            scores=scores,
            timings=timings,
            model_id=self.spec.model_id,
            model_checksum=self.backend.checksum,
            backend=self.backend.name,
            num_tokens=len(gen.token_ids),
            stop_reason=gen.stop_reason,
        )

    def score(self, req: VqaRequest, stop: StopSignal | None = None) -> GuardResult:
        """Judge an answer produced elsewhere (req.answer), with no generation."""
        if req.answer is None or not req.answer.strip():
            raise InvalidRequestError("`answer` is empty; Score needs the answer text to judge")
        return self.answer(req, stop)

    def _generate(self, question: str, pixels: np.ndarray, config: DecodeConfig, stop: StopSignal | None,
                  on_token: Callable[[int], None] | None) -> Generation:
        ids = self.prompter.encode_prompt(question)
        if self.batcher is not None:
            return self.batcher.generate(ids, pixels[0], config, stop, on_token)
        t = time.perf_counter()
        prompt_embeds = self._embed_prompt(ids, pixels)
        vision_ms = _ms_since(t)
        gen = decode.generate(self.backend, prompt_embeds, self.spec.eos_token_ids, config, stop, on_token,
                              question_ids=decode.question_ids(ids, self.spec.image_token_id))
        gen.vision_ms = vision_ms
        return gen

    def _teacher_force(self, question: str, pixels: np.ndarray, answer_ids: list[int],
                       stop: StopSignal | None) -> Generation:
        t = time.perf_counter()
        prompt_embeds, question_ids = self._prompt_embeds(question, pixels)
        vision_ms = _ms_since(t)
        gen = decode.teacher_force(self.backend, prompt_embeds, answer_ids, stop, question_ids=question_ids)
        gen.vision_ms = vision_ms
        return gen

    def _prompt_embeds(self, question: str, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (prompt embeddings [1,S,D] with the image spliced in, the question's ids: the prompt's tail)."""
        ids = self.prompter.encode_prompt(question)
        return self._embed_prompt(ids, pixels), decode.question_ids(ids, self.spec.image_token_id)

    def _embed_prompt(self, ids: np.ndarray, pixels: np.ndarray) -> np.ndarray:
        """ids [S] with image slots, pixels [1,3,H,W] -> prompt embeddings [1,S,D] with the image spliced in."""
        features = self.backend.encode_image(pixels)
        return decode.splice_image(self.backend.embed(ids[None]), ids, features, self.spec.image_token_id)

    def _score(self, gen, request_id: str) -> GuardScores | None:
        try:
            return self.heads.score(gen)
        except Exception:  # fail closed: the policy turns None into ABSTAIN
            log.exception("guard heads failed to score request %s", request_id)
            return None

    def close(self) -> None:
        """Stop the batch scheduler's thread (also done at interpreter exit)."""
        if self.batcher is not None:
            self.batcher.close()

    def info(self) -> ModelInfo:
        p = self.config.policy
        return ModelInfo(
            model_id=self.spec.model_id,
            family=self.spec.family,
            checksum=self.backend.checksum,
            backend=self.backend.name,
            image_size=self.spec.preprocess.image_size,
            num_image_tokens=self.spec.num_image_tokens,
            heads_trained=self.heads.trained,
            verified=getattr(self.backend, "verified", True),
            thresholds={
                "warn_p_hallucination": p.warn_p_hallucination,
                "abstain_p_hallucination": p.abstain_p_hallucination,
                "warn_premise_risk": p.warn_premise_risk,
                "warn_risk_level": p.warn_risk_level,
            },
        )

    def warmup(self) -> None:
        """Run one tiny request end to end, so the first real one is not slow."""
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("L", (32, 32), 128).save(buf, format="PNG")
        self.answer(VqaRequest(buf.getvalue(), "image/png", "warm-up", DecodeConfig(max_new_tokens=2)))


class _TextStreamer:
    """Token ids -> text deltas. Holds back a trailing incomplete UTF-8 sequence until
    more tokens complete it, and flushes whatever is left at the end, so the deltas
    always add up to the final text."""

    def __init__(self, prompter: Prompter, on_text: Callable[[str], None]):
        self.prompter, self.on_text = prompter, on_text
        self.ids: list[int] = []
        self.sent = ""

    def on_token(self, token: int) -> None:
        self.ids.append(token)
        text = self.prompter.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def flush(self, final_text: str) -> None:
        self._emit(final_text)

    def _emit(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent) :])
            self.sent = text


def _check_question(question: str) -> None:
    if not question or not question.strip():
        raise InvalidRequestError("`question` is empty; send the question to ask about the image")


def _ms_since(t: float) -> float:
    return (time.perf_counter() - t) * 1e3


def load_guard(path: str | Path, config: GuardConfig = GuardConfig(), bundle: bool = False) -> Guard:
    """Load a model directory (torch) or an export bundle (onnxruntime, tensorrt) into a ready Guard.

    With `bundle=True` the path must be a bundle: a directory without manifest.json
    is then reported as a half-written bundle, not as a bad model directory.
    """
    path = Path(path)
    b = config.backend
    kind = _backend_kind(path, b.kind, bundle or is_bundle(path))
    heads_path = path / HEADS_FILE
    if kind == "torch" and not heads_path.is_file():  # a bundle's files are checked by its manifest
        raise ModelLoadError(
            f"{heads_path} is missing: a model is served only with its guard heads; "
            "train them with `medhallguard train` (or `medhallguard init-model` for random ones)"
        )
    backend = load_backend(kind, path, device=b.device, dtype=b.dtype, threads=b.threads or None)
    heads = GuardHeads.load(heads_path)
    if heads.feature_sizes() != feature_sizes(backend.spec.hidden_size):
        raise ModelLoadError(f"{heads_path} was trained for another model (hidden size mismatch); retrain the heads")
    if not heads.trained:
        log.warning("guard heads at %s are untrained (random init): their scores mean nothing", heads_path)
    if not getattr(backend, "verified", True):
        log.warning("bundle %s is UNVERIFIED: it was exported with --force, so no parity gate has shown that it "
                    "answers like the model it came from", path)
    return Guard(backend, Prompter(path / "tokenizer.json", backend.spec), heads, config)


def _backend_kind(path: Path, kind: str, bundle: bool) -> str:
    """The backend for `path`; a model directory and a bundle each refuse the other's backends."""
    if kind == "auto":
        return "onnxruntime" if bundle else "torch"
    if bundle and kind == "torch":
        raise ModelLoadError(f"{path} is an export bundle: serve it with backend kind auto, onnxruntime or tensorrt")
    if not bundle and kind in ("onnxruntime", "tensorrt"):
        raise ModelLoadError(f"{path} is not an export bundle (no {MANIFEST_FILE}): export it first with "
                             f"`medhallguard export {path} OUT_DIR`, or serve it with backend kind torch")
    return kind
