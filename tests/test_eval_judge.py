"""The LLM judge against a fake OpenAI-compatible endpoint (http.server in a thread): retries, cache, errors."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from evaluation.judge import Judge, JudgeConfig, JudgeError


@contextlib.contextmanager
def fake_endpoint(script: list[tuple[int, str]]):
    """Serve /v1/chat/completions; the i-th request gets script[i] (status, reply text), the last one repeats."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            status, text = script[min(len(seen), len(script)) - 1]
            payload = {"choices": [{"message": {"role": "assistant", "content": text}}]} if status == 200 \
                else {"error": {"message": text}}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


def _judge(url, tmp_path, **kw) -> Judge:
    return Judge(JudgeConfig(base_url=url, model="fake-judge", api_key="k", cache_dir=tmp_path / "cache",
                             backoff_s=0.01, **kw))


QA = dict(question="Is there an effusion?", answer="A small left effusion.", reference="Yes, a small left effusion.")


@pytest.mark.parametrize("first_status", [429, 500])
def test_judge_retries_after_a_transient_error_then_reads_the_four_scores(tmp_path, first_status):
    with fake_endpoint([(first_status, "busy"), (200, "8 9 6 9\nAccurate and relevant.")]) as (url, seen):
        j = _judge(url, tmp_path).judge(**QA)
    assert j.scores == (8.0, 9.0, 6.0, 9.0) and not j.cached
    assert len(seen) == 2 and seen[-1]["path"] == "/v1/chat/completions"
    body = seen[-1]["body"]
    assert body["model"] == "fake-judge" and body["temperature"] == 0 and seen[-1]["auth"] == "Bearer k"
    prompt = body["messages"][0]["content"]
    assert QA["question"] in prompt and QA["answer"] in prompt and QA["reference"] in prompt


def test_a_second_identical_judgement_comes_from_the_cache(tmp_path):
    with fake_endpoint([(200, "7 7 5 8")]) as (url, seen):
        first = _judge(url, tmp_path).judge(**QA)
        again = _judge(url, tmp_path).judge(**QA)  # a fresh Judge: the cache is on disk
        other = _judge(url, tmp_path).judge(**{**QA, "answer": "No effusion."})
    assert first.scores == again.scores == (7.0, 7.0, 5.0, 8.0)
    assert again.cached and not other.cached and len(seen) == 2


def test_the_cache_key_includes_the_model(tmp_path):
    with fake_endpoint([(200, "7 7 5 8")]) as (url, seen):
        _judge(url, tmp_path).judge(**QA)
        Judge(JudgeConfig(base_url=url, model="another-judge", cache_dir=tmp_path / "cache")).judge(**QA)
    assert len(seen) == 2


def test_persistent_failure_gives_up_after_the_retries_and_says_so(tmp_path):
    with fake_endpoint([(503, "down")]) as (url, seen):
        with pytest.raises(JudgeError, match="still failing after 3 attempts .*HTTP 503"):
            _judge(url, tmp_path, max_retries=2).judge(**QA)
    assert len(seen) == 3


def test_a_client_error_is_not_retried(tmp_path):
    with fake_endpoint([(401, "bad key")]) as (url, seen):
        with pytest.raises(JudgeError, match="HTTP 401"):
            _judge(url, tmp_path).judge(**QA)
    assert len(seen) == 1


def test_a_reply_without_four_scores_is_an_error_and_is_not_cached(tmp_path):
    with fake_endpoint([(200, "The answer looks fine to me.")]) as (url, seen):
        with pytest.raises(JudgeError, match="no four scores"):
            _judge(url, tmp_path).judge(**QA)
    assert not list((tmp_path / "cache").glob("*.json"))


def test_eval_with_judge_reports_judge_scores_and_guard_correlations(nano_models, tmp_path):
    from evaluation.cli import evaluate
    from evaluation.run import InProcessRunner
    from tests.test_eval import VAL, _slice

    if not VAL["positive"].is_file():
        pytest.skip("MedHallTune dev split not beside the repo")
    data = [_slice(VAL[p], tmp_path, 3) for p in ("positive", "negative")]
    with fake_endpoint([(200, "3 4 2 3\nInvents findings.")]) as (url, seen):
        report = evaluate(InProcessRunner(nano_models["smolvlm"]), tmp_path / "out", data,
                          allow_missing_images=True, max_new_tokens=3, text_metrics=False,
                          judge=_judge(url, tmp_path), log=lambda *_: None)
    j = report["generation"]["judge"]
    assert len(seen) == 6 and j["model"] == "fake-judge"
    assert j["mean_scores"]["negative"]["clinical_accuracy"] == 3.0
    assert j["p_hallucination"]["all"]["positives"] == 6  # clinical_accuracy 3 <= 4 for every answer
    assert "LLM judge (fake-judge): mean score" in (tmp_path / "out" / "report.md").read_text()


def test_judge_config_rejects_a_url_without_a_scheme():
    with pytest.raises(ValueError, match="http:// or https://"):
        JudgeConfig(base_url="localhost:8000/v1", model="m")
