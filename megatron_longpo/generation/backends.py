"""Generation backends behind one small interface.

- `OpenAIChatBackend`: any OpenAI-compatible `/v1/chat/completions` server (vLLM, SGLang, TGI,
  llama.cpp / llama-cpp-python). Standard library only (urllib). Requests run in a bounded thread
  pool; connection errors, time-outs, 408/429 and 5xx answers are retried with exponential
  back-off and jitter (a `Retry-After` header is honoured); other 4xx answers fail at once with
  the server's message. The server decides the model: to generate with an extended-RoPE
  checkpoint (iterative LongPO rounds), start the server with that checkpoint.
- `TransformersBackend` (transformers_backend.py): in-process `generate()` on CPU or GPU, batched
  with left padding, greedy (temperature 0) or sampled, with an optional RoPE base override.

`chat(conversations, params)` returns `n` completions per conversation. When some conversations
fail, it raises `GenerationError` whose `partial` holds the completions that succeeded (None for
the failed ones) and whose `errors` maps each failed index to its exception, so a caller can keep
the work that was done.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException
from typing import Protocol, Sequence

Message = dict[str, str]
Conversation = list[Message]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1  # completions per conversation
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")


class GenerationError(RuntimeError):
    """Some conversations of a `chat` call failed; `partial[i]` is None exactly for those."""

    def __init__(self, errors: dict[int, BaseException], partial: list[list[str] | None]) -> None:
        first = next(iter(errors.values()))
        super().__init__(f"{len(errors)} of {len(partial)} conversations failed; first: {first}")
        self.errors = errors
        self.partial = partial


class RequestError(RuntimeError):
    """One request failed for good (a 4xx answer, or retries exhausted)."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class GenerationBackend(Protocol):
    name: str

    def chat(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]: ...


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


# ---------------------------------------------------------------- OpenAI-compatible HTTP


@dataclass
class HTTPStats:
    requests: int = 0
    retries: int = 0
    failed: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    seconds_in_requests: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: float) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in
                ("requests", "retries", "failed", "prompt_tokens", "completion_tokens", "seconds_in_requests")}


class OpenAIChatBackend:
    """Client of an OpenAI-compatible chat-completions server."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        max_retries: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        extra_body: dict | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        root = base_url.rstrip("/")
        if root.endswith("/chat/completions"):
            root = root[: -len("/chat/completions")]
        if not root.endswith("/v1"):
            root += "/v1"
        self.root = root
        self.model = model
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.extra_body = dict(extra_body or {})
        self.stats = HTTPStats()
        self._model_lock = threading.Lock()
        self._model_resolved = model is not None

    @property
    def name(self) -> str:
        return f"openai:{self.root}:{self.model or 'server-default'}"

    # -- one HTTP exchange
    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.root + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            retryable = e.code in (408, 429) or e.code >= 500
            hint = ""
            if e.code in (401, 403):
                hint = " (check --api-key / OPENAI_API_KEY)"
            elif e.code == 404:
                hint = f" (is {self.root} an OpenAI-compatible server? check --base-url and --served-model)"
            elif e.code == 400:
                hint = " (a prompt longer than the server's context window answers 400: raise the server's max length or lower --max-doc-tokens)"
            err = RequestError(f"{method} {self.root}{path}: HTTP {e.code}{hint}: {detail}", e.code, retryable)
            err.retry_after = e.headers.get("Retry-After") if e.headers else None  # type: ignore[attr-defined]
            raise err from None
        except (urllib.error.URLError, HTTPException, ConnectionError, socket.timeout, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise RequestError(f"{method} {self.root}{path}: {type(e).__name__}: {reason}", None, True) from None
        except json.JSONDecodeError as e:
            raise RequestError(f"{method} {self.root}{path}: the answer is not JSON ({e.msg})", None, True) from None

    def _with_retries(self, method: str, path: str, body: dict | None = None) -> dict:
        attempt = 0
        while True:
            t0 = time.monotonic()
            try:
                out = self._request(method, path, body)
                self.stats.add(requests=1, seconds_in_requests=time.monotonic() - t0)
                return out
            except RequestError as e:
                self.stats.add(requests=1, seconds_in_requests=time.monotonic() - t0)
                if not e.retryable or attempt >= self.max_retries:
                    self.stats.add(failed=1)
                    if e.retryable:
                        raise RequestError(
                            f"{e} (gave up after {attempt + 1} attempts; is the server at {self.root} running?)",
                            e.status,
                        ) from None
                    raise
                delay = min(self.backoff_max, self.backoff_base * 2**attempt) * (0.5 + random.random() / 2)
                retry_after = getattr(e, "retry_after", None)
                if retry_after:
                    try:
                        delay = max(delay, min(self.backoff_max, float(retry_after)))
                    except ValueError:
                        pass
                self.stats.add(retries=1)
                attempt += 1
                time.sleep(delay)

    def resolve_model(self) -> str | None:
        """The model name to send: the one given, else the first the server lists (None if it lists none)."""
        with self._model_lock:
            if not self._model_resolved:
                try:
                    listed = self._with_retries("GET", "/models").get("data") or []
                    self.model = listed[0]["id"] if listed else None
                except RequestError as e:
                    if e.status is None:
                        raise
                    self.model = None  # a server without /v1/models: send no model name
                self._model_resolved = True
            return self.model

    def complete(self, conversation: Conversation, params: SamplingParams, sample_index: int = 0) -> str:
        body: dict = {
            "messages": conversation,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": 1,
            **self.extra_body,
        }
        model = self.resolve_model()
        if model:
            body["model"] = model
        if params.seed is not None:
            body["seed"] = params.seed + sample_index
        if params.stop:
            body["stop"] = list(params.stop)
        out = self._with_retries("POST", "/chat/completions", body)
        try:
            text = out["choices"][0]["message"].get("content") or ""
        except (KeyError, IndexError, TypeError):
            raise RequestError(f"POST {self.root}/chat/completions: unexpected answer {str(out)[:300]}") from None
        usage = out.get("usage") or {}
        self.stats.add(completion_tokens=int(usage.get("completion_tokens") or 0),
                       prompt_tokens=int(usage.get("prompt_tokens") or 0))
        return truncate_at_stop(text, params.stop)

    def chat(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        """`n` completions per conversation, as `n` separate requests (every server supports it;
        servers with prefix caching reuse the prompt). Seeds are `seed + sample index`."""
        jobs = [(i, k) for i in range(len(conversations)) for k in range(params.n)]
        results: list[list[str | None]] = [[None] * params.n for _ in conversations]
        errors: dict[int, BaseException] = {}

        def run(job: tuple[int, int]) -> None:
            i, k = job
            if i in errors:
                return
            try:
                results[i][k] = self.complete(conversations[i], params, k)
            except RequestError as e:
                errors.setdefault(i, e)

        if not jobs:
            return []
        if len(jobs) == 1:
            run(jobs[0])
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs))) as pool:
                list(pool.map(run, jobs))
        if errors:
            partial = [None if i in errors else list(r) for i, r in enumerate(results)]
            raise GenerationError(errors, partial)  # type: ignore[arg-type]
        return [list(r) for r in results]  # type: ignore[misc]


# ---------------------------------------------------------------- in-process transformers (transformers_backend.py)

DEFAULT_MAX_ATTENTION_CELLS = 2**32
