"""Continuous batching: many requests share one decoder batch, joining and leaving between steps.

`BatchScheduler.generate()` is called from each request's own worker thread
and blocks it until that request's answer is complete, as `decode.generate`
does. One scheduler thread owns the backend's running batch:

1. take the newcomers (when idle, wait up to `max_wait_ms` for more to arrive);
2. run their vision encoder in one call, then prefill each prompt on its own
   (exactly the unbatched prefill) and merge its KV cache into the running batch;
3. run one decode step for every sequence in the batch;
4. let finished, cancelled and timed-out sequences leave the batch.

Sequences of different lengths share the cache by left-padding: each row's
attention mask hides its padding, and its position ids count its own tokens
only, so every row sees what it would see alone. Each sequence samples with
its own generator (`decode.Sequence`), so a seed gives the same answer batched
or not. Streaming callbacks run in the request's own thread, never here.
The scheduler knows nothing of images, prompts, heads or policy.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from guard.backends import Backend
from guard.decode import Sequence, question_ids, splice_image
from guard.errors import BackendUnavailableError, GuardError
from guard.types import DecodeConfig, Generation, StopSignal

log = logging.getLogger(__name__)

_RUNNING: "weakref.WeakSet[BatchScheduler]" = weakref.WeakSet()
"""Schedulers whose thread is alive; closed at exit, since a thread that has run torch ops
and is still alive while the interpreter finalizes can abort the process."""


@dataclass(frozen=True)
class BatchingConfig:
    """The `[batching]` table: how requests share the decoder."""

    enabled: bool = True
    """Batch concurrent requests (continuous batching); false runs each request on its own."""
    max_batch_size: int = 8
    """Most sequences decoded together; more requests wait for a sequence to finish."""
    max_wait_ms: float = 5.0
    """When the decoder is idle, how long the first request waits for others to share its vision/prefill round."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size <= 256:
            raise ValueError("`batching.max_batch_size` must be between 1 and 256")
        if not 0.0 <= self.max_wait_ms <= 10_000:
            raise ValueError("`batching.max_wait_ms` must be between 0 and 10000")


@dataclass(eq=False)
class _Job:
    """One request, as the scheduler sees it; `events` carries tokens, then the result or an error."""

    ids: np.ndarray  # [S] prompt token ids, with image slots
    pixels: np.ndarray  # [3, H, W]
    config: DecodeConfig
    stop: StopSignal
    streaming: bool
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    abandoned: threading.Event = field(default_factory=threading.Event)
    """Set when the caller stopped waiting (its streaming callback raised): the job leaves the batch."""
    seq: Sequence | None = None
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_t0: float = 0.0

    def finish(self) -> None:
        assert self.seq is not None
        gen = self.seq.result(self.prefill_ms, (time.perf_counter() - self.decode_t0) * 1e3)
        gen.vision_ms = self.vision_ms
        self.events.put(("done", gen))

    def fail(self, exc: BaseException) -> None:
        self.events.put(("error", exc))


class BatchScheduler:
    def __init__(self, backend: Backend, config: BatchingConfig, image_token_id: int, eos_token_ids: tuple[int, ...]):
        self.backend, self.config = backend, config
        self.image_token_id, self.eos_token_ids = image_token_id, eos_token_ids
        self._pending: list[_Job] = []
        self._wake = threading.Condition()
        self._closed = False
        # The running batch; only the scheduler thread touches these.
        self._rows: list[_Job] = []
        self._cache: Any = None
        self._mask = _Mask(np.zeros((0, 0), np.int64))  # [B, P]: 1 where a row has a real past position
        self._pos = np.zeros(0, np.int64)  # [B]: each row's next position id (its own token count)
        self._next = np.zeros(0, np.int64)  # [B]: each row's token to feed next
        self._thread = threading.Thread(target=self._run, name="guard-batch", daemon=True)
        self._thread.start()
        _RUNNING.add(self)

    # --- the caller's side: runs in each request's worker thread --------------

    def generate(self, ids: np.ndarray, pixels: np.ndarray, config: DecodeConfig, stop: StopSignal | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """ids [S] with image slots, pixels [3,H,W] -> the Generation that decode.generate would give."""
        job = _Job(ids, pixels, config, stop or StopSignal(), streaming=on_token is not None)
        with self._wake:
            if self._closed:
                raise BackendUnavailableError("the batch scheduler is shut down; this server is stopping")
            self._pending.append(job)
            self._wake.notify()
        try:
            return self._wait(job, on_token)
        except BaseException:
            job.abandoned.set()
            raise

    def _wait(self, job: _Job, on_token: Callable[[int], None] | None) -> Generation:
        while True:
            try:
                kind, value = job.events.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise BackendUnavailableError("the batch scheduler stopped; see the server log") from None
                continue
            if kind == "token":
                on_token(value)
            elif kind == "done":
                return value
            else:
                raise value

    def queued(self) -> int:
        """Requests waiting to join the batch."""
        with self._wake:
            return len(self._pending)

    def running(self) -> int:
        """Sequences in the running decoder batch (read from another thread: a snapshot)."""
        return len(self._rows)

    def close(self) -> None:
        """Stop the scheduler thread; waiting and running requests get BackendUnavailableError."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # --- the scheduler thread -------------------------------------------------

    def _run(self) -> None:
        while (newcomers := self._take_newcomers()) is not None:
            try:
                if newcomers:
                    self._admit(newcomers)
                if self._rows:
                    self._step()
            except Exception as exc:  # a backend failure: every sequence in the batch gets it, the loop goes on
                log.exception("batch step failed; failing the %d request(s) in the batch", len(self._rows))
                for job in self._rows + newcomers:
                    job.fail(exc)  # a job that already finished has returned; the extra event is never read
                self._reset()
        for job in self._rows + self._pending:
            job.fail(BackendUnavailableError("the batch scheduler was shut down; this server is stopping"))

    def _take_newcomers(self) -> list[_Job] | None:
        """Pending jobs that fit in the batch; blocks while there is nothing at all to do. None: shut down."""
        with self._wake:
            while not self._closed and not self._rows and not self._pending:
                self._wake.wait()
            if self._closed:
                return None
            if not self._rows and len(self._pending) < self.config.max_batch_size:
                # Idle: give others up to max_wait_ms to arrive and share this vision/prefill round.
                until = time.monotonic() + self.config.max_wait_ms / 1e3
                while (not self._closed and len(self._pending) < self.config.max_batch_size
                       and (left := until - time.monotonic()) > 0):
                    self._wake.wait(left)
            self._pending = [job for job in self._pending if _still_wanted(job)]
            room = self.config.max_batch_size - len(self._rows)
            taken, self._pending = self._pending[:room], self._pending[room:]
            return taken

    def _admit(self, jobs: list[_Job]) -> None:
        """Vision for all newcomers in one call, a prefill each, then their caches join the batch."""
        features = self._encode_images(jobs)
        caches, masks, pos, nxt, joined = [], [], [], [], []
        for job, feats in zip(jobs, features):
            if feats is None or not _still_wanted(job):
                continue
            try:
                token, cache = self._prefill(job, feats)
            except Exception as exc:  # this request's prompt failed: only it fails
                log.exception("prefill failed for one request")
                job.fail(exc)
                continue
            if token is None:  # a one-token answer: done at prefill
                job.finish()
                continue
            seq_len = len(job.ids)
            caches.append(cache)
            masks.append(np.ones((1, seq_len), np.int64))
            pos.append(seq_len)
            nxt.append(token)
            joined.append(job)
        if not joined:
            return
        if self._rows:
            caches, masks = [self._cache, *caches], [self._mask.array, *masks]
        self._cache = self.backend.merge_caches(caches)
        width = max(m.shape[1] for m in masks)
        self._mask = _Mask(np.concatenate([np.pad(m, ((0, 0), (width - m.shape[1], 0))) for m in masks]))
        self._pos = np.concatenate([self._pos, pos]).astype(np.int64)
        self._next = np.concatenate([self._next, nxt]).astype(np.int64)
        self._rows += joined

    def _prefill(self, job: _Job, feats: np.ndarray) -> tuple[int | None, Any]:
        """The unbatched prefill of one prompt -> (its first token to feed back or None, its cache)."""
        t = time.perf_counter()
        embeds = splice_image(self.backend.embed(job.ids[None]), job.ids, feats[None], self.image_token_id)
        seq_len = embeds.shape[1]
        out, cache = self.backend.forward(embeds, np.ones((1, seq_len), np.int64),
                                          np.arange(seq_len, dtype=np.int64)[None], self.backend.new_cache(1))
        stream = (lambda tok: job.events.put(("token", tok))) if job.streaming else None
        job.seq = Sequence(job.config, self.eos_token_ids, on_token=stream)
        job.seq.set_question(out.hidden_mid[0], out.hidden_last[0], question_ids(job.ids, self.image_token_id))
        token = job.seq.push(out.logits[0, -1], out.hidden_mid[0, -1], out.hidden_last[0, -1])
        job.decode_t0 = time.perf_counter()
        job.prefill_ms = (job.decode_t0 - t) * 1e3
        return token, cache

    def _encode_images(self, jobs: list[_Job]) -> list[np.ndarray | None]:
        """[T_img, D] features per job, or None for a job that failed (it has been told why)."""
        jobs_wanted = [job for job in jobs if _still_wanted(job)]
        t = time.perf_counter()
        try:
            batch = self.backend.encode_image(np.stack([job.pixels for job in jobs_wanted])) if jobs_wanted else []
            vision_ms = (time.perf_counter() - t) * 1e3
            by_job = {id(job): (feats, vision_ms) for job, feats in zip(jobs_wanted, batch)}
        except Exception:  # find the image that fails, and fail only its request
            log.warning("batched vision encoder failed; encoding %d image(s) one at a time", len(jobs_wanted))
            by_job = {}
            for job in jobs_wanted:
                t = time.perf_counter()
                try:
                    by_job[id(job)] = (self.backend.encode_image(job.pixels[None])[0], (time.perf_counter() - t) * 1e3)
                except Exception as exc:
                    job.fail(exc)
        features = []
        for job in jobs:
            feats, job.vision_ms = by_job.get(id(job), (None, 0.0))
            features.append(feats)
        return features

    def _step(self) -> None:
        """One decode step for every row; then finished and stopped rows leave."""
        keep = [i for i, job in enumerate(self._rows) if _still_wanted(job)]
        if len(keep) < len(self._rows):
            self._keep(keep)
            if not self._rows:
                return
        batch = len(self._rows)
        mask = self._mask.extend()  # on a failure the batch is reset, so the extended mask never outlives it
        out, self._cache = self.backend.forward(self.backend.embed(self._next[:, None]), mask, self._pos[:, None],
                                                self._cache)
        self._pos = self._pos + 1
        keep = []
        for i, job in enumerate(self._rows):
            token = job.seq.push(out.logits[i, -1], out.hidden_mid[i, -1], out.hidden_last[i, -1])
            if token is None:
                job.finish()
            else:
                self._next[i] = token
                keep.append(i)
        if len(keep) < batch:
            self._keep(keep)

    def _keep(self, rows: list[int]) -> None:
        """Only `rows` stay in the batch; past positions that are padding in every kept row are dropped."""
        if not rows:
            self._reset()
            return
        mask = self._mask.array[rows]
        drop = int(mask.argmax(axis=1).min())  # the first real position of the longest kept row
        self._cache = self.backend.select_cache(self._cache, rows, drop)
        self._mask, self._pos, self._next = _Mask(mask[:, drop:]), self._pos[rows], self._next[rows]
        self._rows = [self._rows[i] for i in rows]

    def _reset(self) -> None:
        self._rows, self._cache = [], None
        self._mask = _Mask(np.zeros((0, 0), np.int64))
        self._pos, self._next = np.zeros(0, np.int64), np.zeros(0, np.int64)


class _Mask:
    """The running batch's attention mask [B, P] in a buffer with spare columns.

    A decode step appends one column of ones in place (O(B)) instead of concatenating a new [B, P+1]
    array; the buffer doubles when full. Columns already handed to a backend are never written again.
    """

    _SPARE = 64  # room made at each rebuild (a request joins or leaves): most answers never grow the buffer

    def __init__(self, mask: np.ndarray):
        batch, self.width = mask.shape
        self._buf = np.zeros((batch, self.width + self._SPARE), np.int64)
        self._buf[:, : self.width] = mask

    @property
    def array(self) -> np.ndarray:
        """[B, P] view of the mask (contiguous only when B == 1; backends make it so as they need)."""
        return self._buf[:, : self.width]

    def extend(self) -> np.ndarray:
        """Append a column of ones (the token fed this step) -> the [B, P+1] mask."""
        if self.width == self._buf.shape[1]:
            grown = np.zeros((self._buf.shape[0], 2 * self._buf.shape[1]), np.int64)
            grown[:, : self.width] = self._buf
            self._buf = grown
        self._buf[:, self.width] = 1
        self.width += 1
        return self.array


@atexit.register
def _close_all() -> None:
    for scheduler in list(_RUNNING):
        scheduler.close()


def _still_wanted(job: _Job) -> bool:
    """False (and the job told why) once its client cancelled, its deadline passed or its caller left."""
    if job.abandoned.is_set():
        return False
    try:
        job.stop.check()
    except GuardError as exc:
        job.fail(exc)
        return False
    return True
