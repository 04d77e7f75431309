"""A judge behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp...).

``POST {base_url}/chat/completions`` with temperature 0 and a few output tokens, several requests
in flight at once (a thread pool: httpx's client is thread-safe and the work is waiting on the
network). Transient failures are retried with exponential backoff and jitter: timeouts,
connection errors, HTTP 429 and 5xx, and 200 replies whose body is not a chat-completions
response. A server's ``Retry-After`` is honoured. Any other 4xx (bad key, unknown model) is the
user's to fix and is not retried.

When a request still fails after ``max_tries``, no new requests are started, those in flight are
allowed to finish (their verdicts are yielded, so the caller can store them), and a ``UserError``
names the endpoint and the last error. A reply that is a well-formed response whose text is not
``A``/``B``/``Tie`` is returned with a verdict of ``None``, not as an error: ``judge_pairs`` asks
it again and, if it stays unreadable, reports it as unparsed without caching it.
"""

from __future__ import annotations

import email.utils
import math
import os
import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from bdctl.errors import UserError
from bdctl.judges.base import JudgeOutput, JudgeRequest
from bdctl.judges.prompt import PROMPT_VERSION, build_messages, parse_verdict

if TYPE_CHECKING:
    import httpx


class _Retryable(Exception):
    """A failure worth another try; ``retry_after`` is the server's requested wait, if any."""

    def __init__(self, reason: str, *, unreachable: bool = False, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable
        self.retry_after = retry_after


class _Aborted(Exception):
    """Another request failed for good: this one stops retrying."""


class OpenAIJudge:
    """A judge model served over the OpenAI chat-completions protocol.

    Args:
        model: the model name sent in each request (e.g. ``gpt-4o-mini``).
        base_url: the API root, up to and including the version (``https://api.openai.com/v1``).
        api_key_env: NAME of the environment variable holding the API key, sent as a bearer
            token; ``None`` for servers that need no key (a local vLLM, for instance).
        concurrency: requests in flight at once.
        max_tries: attempts per request, the first included.
        timeout_s: per-attempt limit for connecting, sending and reading.
        backoff_base_s: the wait before the second attempt; it doubles with each further one.
        backoff_max_s: the longest single wait, also the cap on a server's ``Retry-After``.
        max_tokens: reply length limit; one word is expected, a few tokens leave room for
            quotes or a period.
        seed: seeds the backoff jitter (``None``: unseeded).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 8,
        max_tries: int = 4,
        timeout_s: float = 60.0,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_tokens: int = 4,
        seed: int | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise UserError(f"judge base_url {base_url!r} must start with http:// or https://")
        if not model:
            raise UserError(f"judge model name for endpoint {base_url} is empty")
        for name, value in (("concurrency", concurrency), ("max_tries", max_tries), ("max_tokens", max_tokens)):
            if value < 1:
                raise UserError(f"judge setting {name} is {value}, expected at least 1")
        for name, number in (
            ("timeout_s", timeout_s),
            ("backoff_base_s", backoff_base_s),
            ("backoff_max_s", backoff_max_s),
        ):
            if number < 0:
                raise UserError(f"judge setting {name} is {number}, expected a number >= 0")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.max_tries = max_tries
        self.timeout_s = timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_tokens = max_tokens
        self._random = random.Random(seed)
        self._random_lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        """The URL every request is posted to."""
        return f"{self.base_url}/chat/completions"

    @property
    def identity(self) -> Mapping[str, str]:
        """What decides this judge's verdicts (the API key does not, and is left out)."""
        return {
            "backend": "openai",
            "model": self.model,
            "base_url": self.base_url,
            "prompt_version": PROMPT_VERSION,
            "max_tokens": str(self.max_tokens),
        }

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env, "").strip()
            if not key:
                raise UserError(
                    f"environment variable {self.api_key_env} is empty or unset; judge endpoint "
                    f"{self.base_url} needs an API key there (or set api_key_env to none)"
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    # -- one request ----------------------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.backoff_max_s)
        delay = min(self.backoff_base_s * 2 ** (attempt - 1), self.backoff_max_s)
        with self._random_lock:
            # "Equal jitter": at least half the delay, so retries stay spaced, plus a random
            # share, so that concurrent requests that failed together do not retry together.
            return delay / 2 + self._random.uniform(0.0, delay / 2)

    def _post_once(self, client: httpx.Client, body: dict[str, Any]) -> str:
        """One attempt: the reply's text, or ``_Retryable`` / ``UserError``."""
        import httpx

        try:
            response = client.post(self.endpoint, json=body)
        except httpx.TimeoutException:
            raise _Retryable(f"no reply within {self.timeout_s:g} s (timeout)") from None
        except httpx.TransportError as exc:
            raise _Retryable(_describe_transport_error(exc), unreachable=True) from None

        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retryable(
                f"HTTP {status}{_snippet(response.text)}",
                retry_after=_parse_retry_after(response.headers.get("Retry-After")),
            )
        if status != 200:
            raise UserError(
                f"judge endpoint {self.endpoint} refused the request with HTTP {status}"
                f"{_snippet(response.text)} (check the model name, API key and base_url)"
            )
        try:
            message = response.json()["choices"][0]["message"]
            content = message.get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            # A proxy or overloaded server can garble a reply; if it persists the endpoint is
            # probably not a chat-completions server, which the final UserError says.
            raise _Retryable(f"reply is not a chat-completions response{_snippet(response.text)}") from None
        # A refusal or tool call has no text: an unparseable verdict, not a transport failure.
        return content if isinstance(content, str) else ""

    def _judge_one(self, client: httpx.Client, request: JudgeRequest, abort: threading.Event) -> JudgeOutput:
        try:
            return self._judge_with_retries(client, request, abort)
        except UserError:
            # Raised here, in the worker, so that the next queued request sees it before it
            # starts: the main thread may only notice the failure after that.
            abort.set()
            raise

    def _judge_with_retries(self, client: httpx.Client, request: JudgeRequest, abort: threading.Event) -> JudgeOutput:
        body = {
            "model": self.model,
            "messages": build_messages(request.instruction, request.input, request.answer_a, request.answer_b),
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        for attempt in range(1, self.max_tries + 1):
            if abort.is_set():
                raise _Aborted
            try:
                text = self._post_once(client, body)
            except _Retryable as failure:
                if attempt == self.max_tries:
                    what = "unreachable" if failure.unreachable else "failing"
                    raise UserError(
                        f"judge endpoint {self.base_url} {what} after {self.max_tries} tries: {failure.reason}"
                    ) from None
                # Wake early if another request failed for good: no point retrying then.
                if abort.wait(self._backoff(attempt, failure.retry_after)):
                    raise _Aborted from None
                continue
            return JudgeOutput(raw=text, verdict=parse_verdict(text))
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    # -- many requests --------------------------------------------------------------------

    def judge_many(self, requests: Sequence[JudgeRequest]) -> Iterator[tuple[int, JudgeOutput]]:
        """Yield ``(index, output)`` as verdicts arrive; see the module docstring for failures."""
        import httpx

        if not requests:
            return
        headers = self._headers()
        abort = threading.Event()
        failure: BaseException | None = None
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        with httpx.Client(headers=headers, timeout=self.timeout_s, limits=limits) as client:
            pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="bdctl-judge")
            try:
                pending: dict[Future[JudgeOutput], int] = {
                    pool.submit(self._judge_one, client, request, abort): index
                    for index, request in enumerate(requests)
                }
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        index = pending.pop(future)
                        if future.cancelled():
                            continue
                        error = future.exception()
                        if error is None:
                            yield index, future.result()
                        elif not isinstance(error, _Aborted) and failure is None:
                            failure = error
                            abort.set()
                            for other in pending:
                                other.cancel()
            finally:
                # Also reached when the caller stops early: stop retries, drop queued work.
                abort.set()
                pool.shutdown(wait=True, cancel_futures=True)
        if failure is not None:
            raise failure


def _describe_transport_error(exc: Exception) -> str:
    """A short reason for a connection-level failure (\"connection refused\" where it is one)."""
    text = str(exc) or type(exc).__name__
    if "refused" in text.lower() or isinstance(exc.__context__, ConnectionRefusedError):
        return "connection refused"
    return " ".join(text.split())


def _snippet(text: str, limit: int = 120) -> str:
    """The start of a response body on one line, for error messages."""
    flat = " ".join(text.split())
    if not flat:
        return ""
    return f": {flat[:limit]}{'...' if len(flat) > limit else ''}"


def _parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number, or an HTTP date; ``None`` if absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)
