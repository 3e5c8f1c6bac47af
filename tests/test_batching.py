"""Continuous batching (guard/batching.py) on real nano models: every request in a batch gets what it would get alone.

The reference is the unbatched path, `decode.generate`, on the same backend.
A `SpyBackend` wraps the real one to record batch sizes and to run a hook in
the scheduler thread at a chosen decode step, so joins, cancellations and
deadlines happen at known points, not after sleeps.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from guard import decode
from guard.batching import BatchingConfig, BatchScheduler
from guard.errors import BackendUnavailableError, CancelledError, DeadlineExceededError
from guard.policy import PolicyConfig
from guard.preprocess import preprocess
from guard.runtime import Guard, GuardConfig, load_guard
from guard.types import DecodeConfig, StopSignal, VerdictKind, VqaRequest
from tests.conftest import FAMILIES, png_bytes

pytest.importorskip("torch", reason="the nano models need the [torch] extra")

QUESTIONS = (
    "Is there a nodule?",
    "What is the size of the mass on the right side, upper zone?",
    "Describe.",
    "Is there an effusion at the left lung base, and how large is it?",
)
NO_ABSTAIN = PolicyConfig(allow_untrained_heads=True, withhold_answer_on_abstain=False)
UNBATCHED = GuardConfig(policy=NO_ABSTAIN, batching=BatchingConfig(enabled=False))


class SpyBackend:
    """The real backend, plus a record of decode batch sizes and an optional hook before each decode step."""

    def __init__(self, inner):
        self.inner = inner
        self.decode_batches: list[int] = []
        self.before_decode_step = None  # called with the step's batch size, in the scheduler thread
        self.bad_marker: float | None = None  # encode_image raises for an image whose first value is this

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, embeds, attention_mask, position_ids, cache):
        if embeds.shape[1] == 1:
            if self.before_decode_step is not None:
                self.before_decode_step(embeds.shape[0])
            self.decode_batches.append(embeds.shape[0])
        return self.inner.forward(embeds, attention_mask, position_ids, cache)

    def encode_image(self, pixels):
        if self.bad_marker is not None and (pixels[:, 0, 0, 0] == self.bad_marker).any():
            raise ValueError("this image breaks the vision encoder")
        return self.inner.encode_image(pixels)


@pytest.fixture(scope="module")
def guards(nano_models):
    return {f: load_guard(nano_models[f], UNBATCHED) for f in FAMILIES}


def _inputs(guard, i: int, question: str | None = None):
    """(prompt ids [S], pixels [3,H,W]) of test request i."""
    pixels = preprocess(png_bytes(seed=i), "image/png", guard.spec.preprocess)
    return guard.prompter.encode_prompt(question or QUESTIONS[i % len(QUESTIONS)]), pixels


def _unbatched(guard, ids, pixels, config: DecodeConfig, eos: tuple[int, ...] | None = None):
    embeds = guard._embed_prompt(ids, pixels[None])
    return decode.generate(guard.backend, embeds, eos or guard.spec.eos_token_ids, config,
                           question_ids=decode.question_ids(ids, guard.spec.image_token_id))


def _scheduler(guard, backend=None, eos: tuple[int, ...] | None = None, **batching) -> BatchScheduler:
    config = BatchingConfig(**{"max_batch_size": 8, "max_wait_ms": 5000, **batching})
    eos = eos or guard.spec.eos_token_ids
    return BatchScheduler(backend or guard.backend, config, guard.spec.image_token_id, eos)


def _run_concurrently(fns) -> list:
    """Call each fn in its own thread -> its result or the exception it raised, in order."""
    results = [None] * len(fns)

    def call(i):
        try:
            results[i] = fns[i]()
        except Exception as exc:  # noqa: BLE001 (the test inspects it)
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def assert_same_generation(batched, alone) -> None:
    assert batched.token_ids == alone.token_ids
    assert batched.stop_reason == alone.stop_reason
    np.testing.assert_allclose(batched.logprobs, alone.logprobs, atol=1e-4)
    np.testing.assert_allclose(batched.entropies, alone.entropies, atol=1e-4)
    np.testing.assert_allclose(batched.hidden_mid, alone.hidden_mid, atol=1e-4)
    np.testing.assert_allclose(batched.hidden_last, alone.hidden_last, atol=1e-4)
    np.testing.assert_allclose(batched.question_hidden_mid, alone.question_hidden_mid, atol=1e-4)
    np.testing.assert_allclose(batched.question_hidden_last, alone.question_hidden_last, atol=1e-4)
    assert batched.question_ids.tolist() == alone.question_ids.tolist() and len(batched.question_ids) > 0


def _check_batched_equals_unbatched(guard, configs, eos: tuple[int, ...] | None = None) -> SpyBackend:
    """Run `configs` (request i: question i, image i) concurrently through a scheduler and each alone; compare."""
    spy = SpyBackend(guard.backend)
    sched = _scheduler(guard, spy, eos, max_batch_size=len(configs))
    inputs = [_inputs(guard, i) for i in range(len(configs))]
    try:
        batched = _run_concurrently([lambda i=i: sched.generate(*inputs[i], configs[i]) for i in range(len(configs))])
    finally:
        sched.close()
    alone = [_unbatched(guard, ids, pixels, config, eos) for (ids, pixels), config in zip(inputs, configs)]
    for got, want in zip(batched, alone):
        assert_same_generation(got, want)
    return spy


# Different prompt lengths (left padding), answer lengths (rows leave at different steps) and samplers.
# The random nano models always pick the same greedy token, so most requests sample (with a seed).
MIXED = [
    DecodeConfig(max_new_tokens=12, ignore_eos=True),
    DecodeConfig(max_new_tokens=12, temperature=1.0, seed=1),
    DecodeConfig(max_new_tokens=20, temperature=0.7, seed=2, ignore_eos=True),
    DecodeConfig(max_new_tokens=9, temperature=1.0, seed=3),
]


def _check_mixed(guard) -> SpyBackend:
    """MIXED with an end-of-sequence token that request 1 samples as its 4th token, so it ends early on EOS."""
    free = DecodeConfig(max_new_tokens=12, temperature=1.0, seed=1, ignore_eos=True)
    eos = (_unbatched(guard, *_inputs(guard, 1), free).token_ids[3],)
    assert _unbatched(guard, *_inputs(guard, 1), MIXED[1], eos).stop_reason == "eos"
    spy = _check_batched_equals_unbatched(guard, MIXED, eos)
    assert max(spy.decode_batches) == len(MIXED), "all four requests were decoded in one batch"
    return spy


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generation_equals_unbatched_for_each_request(guards, family):
    _check_mixed(guards[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generation_equals_unbatched_on_an_onnxruntime_bundle(nano_models, tmp_path_factory, family):
    pytest.importorskip("onnx", reason="exporting a bundle needs the [export] extra")
    from tests.bundles import export_nano

    guard = load_guard(export_nano(tmp_path_factory, nano_models[family]), UNBATCHED)
    assert guard.backend.name.startswith("onnxruntime")
    _check_mixed(guard)


def test_batched_generation_equals_unbatched_with_onnxruntime_io_binding(nano_models, tmp_path_factory):
    """The cache row operations on OrtValues (the GPU path), exercised on the CPU provider."""
    pytest.importorskip("onnx", reason="exporting a bundle needs the [export] extra")
    from guard.backends.ort_backend import load
    from tests.bundles import export_nano

    bundle = export_nano(tmp_path_factory, nano_models["smolvlm"])
    plain = load_guard(bundle, UNBATCHED)
    bound = Guard(load(bundle, io_binding=True), plain.prompter, plain.heads, UNBATCHED)
    assert bound.backend.io_binding
    _check_mixed(bound)


def test_seeded_sampling_gives_each_request_its_unbatched_answer(guards):
    configs = [DecodeConfig(max_new_tokens=10, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 1)]
    _check_batched_equals_unbatched(guards["smolvlm"], configs)


def test_a_request_joins_a_running_batch_mid_decode(guards):
    guard = guards["smolvlm"]
    spy = SpyBackend(guard.backend)
    sched = _scheduler(guard, spy, max_wait_ms=0)
    first_cfg, second_cfg = DecodeConfig(max_new_tokens=16, ignore_eos=True), DecodeConfig(max_new_tokens=6)
    (ids1, px1), (ids2, px2) = _inputs(guard, 0), _inputs(guard, 1)
    second: list = []
    steps = []

    def before_step(batch):  # in the scheduler thread: at the first request's 4th step, the second arrives
        steps.append(batch)
        if len(steps) == 4:
            t = threading.Thread(target=lambda: second.append(sched.generate(ids2, px2, second_cfg)))
            t.start()
            _wait_until(lambda: sched.queued() == 1)

    spy.before_decode_step = before_step
    try:
        first = sched.generate(ids1, px1, first_cfg)
        _wait_until(lambda: len(second) == 1)
    finally:
        sched.close()
    assert steps[:4] == [1, 1, 1, 1] and 2 in steps, "the second request joined the running batch"
    assert_same_generation(first, _unbatched(guard, ids1, px1, first_cfg))
    assert_same_generation(second[0], _unbatched(guard, ids2, px2, second_cfg))


def _at_decode_step(n: int, action):
    """A hook for SpyBackend.before_decode_step that runs `action` once, before decode step n (1-based)."""
    steps = []

    def hook(batch):
        steps.append(batch)
        if len(steps) == n:
            action()

    return hook


def test_cancelling_one_request_leaves_the_others_intact(guards):
    guard = guards["llava"]
    spy = SpyBackend(guard.backend)
    cancel = threading.Event()
    spy.before_decode_step = _at_decode_step(3, cancel.set)
    sched = _scheduler(guard, spy, max_batch_size=3)
    config = DecodeConfig(max_new_tokens=12, ignore_eos=True)
    inputs = [_inputs(guard, i) for i in range(3)]
    streamed: list[int] = []
    try:
        results = _run_concurrently([
            lambda: sched.generate(*inputs[0], config),
            lambda: sched.generate(*inputs[1], config, StopSignal(cancelled=cancel), streamed.append),
            lambda: sched.generate(*inputs[2], config),
        ])
    finally:
        sched.close()
    assert isinstance(results[1], CancelledError)
    # Cancelled during step 3 (after that step's check): it got the prefill's token and three more, then left.
    assert len(streamed) == 4
    assert spy.decode_batches == [3, 3, 3] + [2] * 8
    for i in (0, 2):
        assert_same_generation(results[i], _unbatched(guard, *inputs[i], config))


def test_a_passed_deadline_fails_only_its_request(guards):
    guard = guards["smolvlm"]
    spy = SpyBackend(guard.backend)
    late = StopSignal(deadline=time.monotonic() + 3600)
    spy.before_decode_step = _at_decode_step(3, lambda: setattr(late, "deadline", time.monotonic() - 1))
    sched = _scheduler(guard, spy, max_batch_size=2)
    config = DecodeConfig(max_new_tokens=12, ignore_eos=True)
    inputs = [_inputs(guard, i) for i in range(2)]
    try:
        results = _run_concurrently([
            lambda: sched.generate(*inputs[0], config),
            lambda: sched.generate(*inputs[1], config, late),
        ])
    finally:
        sched.close()
    assert isinstance(results[1], DeadlineExceededError)
    assert_same_generation(results[0], _unbatched(guard, *inputs[0], config))


def test_a_request_whose_deadline_passed_while_queued_never_runs(guards):
    guard = guards["smolvlm"]
    spy = SpyBackend(guard.backend)
    sched = _scheduler(guard, spy, max_wait_ms=0)
    try:
        with pytest.raises(DeadlineExceededError):
            sched.generate(*_inputs(guard, 0), DecodeConfig(), StopSignal(deadline=time.monotonic() - 1))
    finally:
        sched.close()
    assert spy.decode_batches == []


def test_a_request_whose_streaming_callback_raises_leaves_the_batch(guards):
    guard = guards["smolvlm"]
    spy = SpyBackend(guard.backend)
    sched = _scheduler(guard, spy, max_batch_size=2)
    config = DecodeConfig(max_new_tokens=30, ignore_eos=True)
    inputs = [_inputs(guard, i) for i in range(2)]
    left = threading.Event()

    def broken_callback(token):
        raise OSError("the client's stream broke")

    def wait_for_the_caller_to_leave(batch):  # keeps the batch at 2 until the failing caller has left
        if batch == 2:
            left.wait(60)

    spy.before_decode_step = wait_for_the_caller_to_leave

    def failing():
        try:
            return sched.generate(*inputs[1], config, None, broken_callback)
        finally:
            left.set()

    try:
        results = _run_concurrently([lambda: sched.generate(*inputs[0], config), failing])
    finally:
        sched.close()
    assert isinstance(results[1], OSError)
    assert spy.decode_batches.count(2) <= 2 and spy.decode_batches[-1] == 1, "the abandoned request left the batch"
    assert_same_generation(results[0], _unbatched(guard, *inputs[0], config))


def test_an_image_that_breaks_the_vision_encoder_fails_only_its_request(guards):
    guard = guards["smolvlm"]
    spy = SpyBackend(guard.backend)
    spy.bad_marker = 123.0
    sched = _scheduler(guard, spy, max_batch_size=3)
    config = DecodeConfig(max_new_tokens=6, ignore_eos=True)
    inputs = [_inputs(guard, i) for i in range(3)]
    bad_pixels = inputs[1][1].copy()
    bad_pixels[0, 0, 0] = spy.bad_marker
    try:
        results = _run_concurrently([
            lambda: sched.generate(*inputs[0], config),
            lambda: sched.generate(inputs[1][0], bad_pixels, config),
            lambda: sched.generate(*inputs[2], config),
        ])
    finally:
        sched.close()
    assert isinstance(results[1], ValueError)
    for i in (0, 2):
        assert_same_generation(results[i], _unbatched(guard, *inputs[i], config))


def test_a_backend_failure_fails_the_batch_and_the_scheduler_serves_on(guards):
    guard = guards["smolvlm"]
    spy = SpyBackend(guard.backend)
    failures = [RuntimeError("the decoder failed")]

    def fail_once(batch):
        if failures:
            raise failures.pop()

    spy.before_decode_step = fail_once
    sched = _scheduler(guard, spy, max_wait_ms=0)
    config = DecodeConfig(max_new_tokens=4, ignore_eos=True)
    ids, pixels = _inputs(guard, 0)
    try:
        with pytest.raises(RuntimeError, match="decoder failed"):
            sched.generate(ids, pixels, config)
        assert_same_generation(sched.generate(ids, pixels, config), _unbatched(guard, ids, pixels, config))
    finally:
        sched.close()


def test_a_closed_scheduler_refuses_requests(guards):
    guard = guards["smolvlm"]
    sched = _scheduler(guard)
    sched.close()
    with pytest.raises(BackendUnavailableError, match="shut down"):
        sched.generate(*_inputs(guard, 0), DecodeConfig(max_new_tokens=2))


# --- through Guard.answer ----------------------------------------------------------------


def _batched_guard(guard, backend=None, heads=None, policy=NO_ABSTAIN, **batching) -> Guard:
    config = GuardConfig(policy=policy, batching=BatchingConfig(**{"max_wait_ms": 5000, **batching}))
    return Guard(backend or guard.backend, guard.prompter, heads or guard.heads, config)


def _req(i: int, max_new_tokens: int = 10, **kw) -> VqaRequest:
    decode_config = DecodeConfig(max_new_tokens=max_new_tokens, ignore_eos=True)
    return VqaRequest(png_bytes(seed=i), "image/png", QUESTIONS[i], decode_config, request_id=f"r{i}", **kw)


def test_streamed_deltas_add_up_to_each_final_answer_in_a_batch(guards):
    batched = _batched_guard(guards["smolvlm"], max_batch_size=3)
    deltas: dict[int, list[str]] = {i: [] for i in range(3)}
    try:
        results = _run_concurrently(
            [lambda i=i: batched.answer(_req(i, 8 + 4 * i), on_text=deltas[i].append) for i in range(3)]
        )
    finally:
        batched.close()
    for i, result in enumerate(results):
        alone = guards["smolvlm"].answer(_req(i, 8 + 4 * i))
        assert result.answer == alone.answer and result.num_tokens == alone.num_tokens
        assert "".join(deltas[i]) == result.answer
        assert result.timings.vision_ms > 0 and result.timings.decode_ms > 0


class _HeadsFailingFor:
    """The real heads, except for answers of one length, where scoring raises."""

    def __init__(self, heads, num_tokens: int):
        self.heads, self.num_tokens = heads, num_tokens

    def __getattr__(self, name):
        return getattr(self.heads, name)

    def score(self, gen):
        if len(gen.token_ids) == self.num_tokens:
            raise RuntimeError("the guard head failed")
        return self.heads.score(gen)


def test_a_guard_head_failure_abstains_only_for_its_request(guards):
    guard = guards["llava"]
    withholding = PolicyConfig(allow_untrained_heads=True, withhold_answer_on_abstain=True)
    batched = _batched_guard(guard, heads=_HeadsFailingFor(guard.heads, 7), policy=withholding, max_batch_size=2)
    try:
        ok, failed = _run_concurrently([lambda: batched.answer(_req(0, 5)), lambda: batched.answer(_req(1, 7))])
    finally:
        batched.close()
    assert failed.scores is None and failed.verdict.kind is VerdictKind.ABSTAIN and failed.answer == ""
    assert ok.scores is not None and ok.num_tokens == 5


def test_concurrent_grpc_requests_are_batched_and_answered_as_alone(guards):
    """Four Ask calls and one AskStream through the real server share batches and get their unbatched answers."""
    from server.config import ServerConfig
    from server.pb.medhallguard.v1 import guard_pb2 as pb
    from server.pb.medhallguard.v1 import guard_pb2_grpc as pb_grpc
    from tests.fakes import serve_in_thread

    guard = guards["smolvlm"]
    spy = SpyBackend(guard.backend)
    batched = _batched_guard(guard, spy, max_batch_size=5, max_wait_ms=5000)  # warm-up waits this long, alone

    def ask(i: int) -> pb.AskRequest:
        return pb.AskRequest(image=png_bytes(seed=i), media_type="image/png", question=QUESTIONS[i % 4],
                             generation=pb.GenerationSettings(max_new_tokens=6 + i))

    try:
        with serve_in_thread(batched, ServerConfig(address="127.0.0.1:0", max_concurrency=1)) as running:
            spy.decode_batches.clear()
            with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = pb_grpc.MedHallGuardStub(channel)

                def stream(i):
                    return list(stub.AskStream(ask(i), timeout=120))

                replies = _run_concurrently([*(lambda i=i: stub.Ask(ask(i), timeout=120) for i in range(4)),
                                             lambda: stream(4)])
    finally:
        batched.close()
    *answers, streamed = replies
    for i, reply in enumerate([*answers, streamed[-1].final]):
        alone = guard.answer(VqaRequest(png_bytes(seed=i), "image/png", QUESTIONS[i % 4],
                                        DecodeConfig(max_new_tokens=6 + i)))
        assert (reply.answer, reply.num_tokens) == (alone.answer, alone.num_tokens)
    assert "".join(m.delta for m in streamed[:-1]) == streamed[-1].final.answer
    assert max(spy.decode_batches) == 5, "the five requests were admitted at once (max_concurrency=1) and batched"


# --- configuration -----------------------------------------------------------------------


def test_batching_table_is_read_from_the_config_and_checked():
    config = GuardConfig.from_dict({"batching": {"enabled": False, "max_batch_size": 4, "max_wait_ms": 2.5}})
    assert config.batching == BatchingConfig(enabled=False, max_batch_size=4, max_wait_ms=2.5)
    with pytest.raises(ValueError, match="batching.max_batch_size"):
        BatchingConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="batching.max_wait_ms"):
        BatchingConfig(max_wait_ms=-1)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['size'\] in \[batching\]"):
        GuardConfig.from_dict({"batching": {"size": 4}})


def _wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the scheduler"
        time.sleep(0.005)


def test_the_batch_mask_grows_in_place_and_equals_the_concatenated_mask():
    from guard.batching import _Mask

    start = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], np.int64)
    mask, expected, handed = _Mask(start), start, []
    for _ in range(150):  # past the spare columns, so the buffer grows (twice)
        step = mask.extend()
        expected = np.concatenate([expected, np.ones((2, 1), np.int64)], axis=1)
        np.testing.assert_array_equal(step, expected)
        handed.append((step, expected))
    for step, seen in handed[:5]:  # what a backend was given is never rewritten by later steps
        np.testing.assert_array_equal(step, seen)
    np.testing.assert_array_equal(mask.array, expected)
