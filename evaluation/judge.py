"""Optional LLM judge: any OpenAI-compatible chat-completions endpoint scores answers with our rubric.

The rubric (judge_rubric.txt) asks for MedHallTune's four scores, 1-10, on
the first line of the reply, the layout of GPT-4o's `result` field, so the
reply is read by `training.data.parse_scores`. Requests are retried with
exponential backoff on 429, 5xx and connection errors (a `Retry-After` header
is honoured), and every judgement is cached on disk under a hash of rubric,
question, answer, reference, caption and model, so a rerun asks nothing twice.
HTTP is the standard library's: one POST per judgement needs no client package.
"""

from __future__ import annotations

import hashlib
import json
import string
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from training.data import parse_scores

DEFAULT_RUBRIC = Path(__file__).with_name("judge_rubric.txt")
_RETRY_STATUSES = (408, 409, 429, 500, 502, 503, 504)


class JudgeError(RuntimeError):
    """The endpoint failed for good (after retries), or its reply has no four scores."""


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str
    """OpenAI-compatible API root, e.g. https://host/v1 (requests go to {base_url}/chat/completions)."""
    model: str
    """Model name sent in each request; part of the cache key."""
    api_key: str = ""
    """Bearer token; empty sends no Authorization header."""
    cache_dir: Path = field(default_factory=lambda: Path(".judge-cache"))
    """One JSON file per judgement."""
    rubric: Path = DEFAULT_RUBRIC
    """Prompt template with $question, $reference, $caption and $answer."""
    max_retries: int = 5
    """Retries after the first attempt, on 429, 5xx and connection errors."""
    backoff_s: float = 1.0
    """First wait; doubles on each retry (capped at 60 s)."""
    timeout_s: float = 120.0
    """Per request."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"`judge base_url` must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("`judge model` is empty: name the model the endpoint serves")
        if self.max_retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError("`judge max_retries` and `backoff_s` must be >= 0 and `timeout_s` > 0")


@dataclass(frozen=True)
class Judgement:
    scores: tuple[float, float, float, float]
    """Clinical accuracy, clinical relevance, detail level, risk level (1-10)."""
    reply: str
    cached: bool


class Judge:
    def __init__(self, config: JudgeConfig):
        self.config = config
        self.template = config.rubric.read_text(encoding="utf-8")
        self._prompt = string.Template(self.template)  # parsed once; judge() fills it per answer
        self.requests_sent = 0

    def judge(self, question: str, answer: str, reference: str, caption: str | None = None) -> Judgement:
        fields = {"question": question, "answer": answer, "reference": reference, "caption": caption or ""}
        path = self.config.cache_dir / f"{self._key(fields)}.json"
        if path.is_file():
            hit = json.loads(path.read_text(encoding="utf-8"))
            return Judgement(tuple(hit["scores"]), hit["reply"], cached=True)
        prompt = self._prompt.safe_substitute(fields)
        reply = self._complete(prompt)
        try:
            scores = parse_scores(reply)
        except ValueError as e:
            raise JudgeError(f"the judge's reply has no four scores on its first line ({e}); reply: {reply[:200]!r}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"scores": list(scores), "reply": reply, "model": self.config.model}), encoding="utf-8")
        tmp.replace(path)
        return Judgement(scores, reply, cached=False)

    def _key(self, fields: dict) -> str:
        blob = json.dumps([self.template, fields["question"], fields["answer"], fields["reference"], fields["caption"],
                           self.config.model], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _complete(self, prompt: str) -> str:
        c = self.config
        body = json.dumps({"model": c.model, "temperature": 0,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if c.api_key:
            headers["Authorization"] = f"Bearer {c.api_key}"
        url = c.base_url.rstrip("/") + "/chat/completions"
        for attempt in range(c.max_retries + 1):
            wait, why = min(c.backoff_s * 2**attempt, 60.0), ""
            try:
                self.requests_sent += 1
                request = urllib.request.Request(url, body, headers, method="POST")
                with urllib.request.urlopen(request, timeout=c.timeout_s) as response:
                    return _content(json.loads(response.read()), url)
            except urllib.error.HTTPError as e:
                if e.code not in _RETRY_STATUSES:
                    raise JudgeError(f"{url} answered HTTP {e.code}: {e.read()[:300]!r}") from None
                wait, why = _retry_after(e.headers, wait), f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < c.max_retries:
                time.sleep(wait)
        raise JudgeError(f"{url} still failing after {c.max_retries + 1} attempts (last: {why})")


def _retry_after(headers, default: float) -> float:
    try:
        return min(float(headers.get("Retry-After", default)), 60.0)
    except (TypeError, ValueError):  # an HTTP date: keep our own backoff
        return default


def _content(reply: dict, url: str) -> str:
    try:
        return reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"{url} did not answer in the chat-completions format: {str(reply)[:200]}") from None
