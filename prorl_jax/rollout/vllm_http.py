"""JSON over HTTP to vLLM servers: one call with a timeout, retries with back-off, health waits.

Standard library only (urllib). Every call has a timeout and every failure ends in a
`VLLMServerError` that names the URL, the attempts made and the last cause, because a silent
hang in a weight update is the failure mode seen most often in RL frameworks (docs/vllm.md).
"""
from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

# 429 (too many requests) and 5xx are worth another try; other 4xx are the caller's mistake.
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0


class VLLMServerError(RuntimeError):
    """A vLLM server could not be reached, timed out, or answered something unusable."""


class HTTPStatusError(VLLMServerError):
    """The server answered with a non-2xx status; `status` and `body` hold what it said."""

    def __init__(self, url: str, status: int, body: str):
        super().__init__(f"{url}: HTTP {status}: {body[:500]}")
        self.url, self.status, self.body = url, status, body

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUS


def request_json(url: str, body: Any = None, *, method: str | None = None,
                 timeout_s: float) -> Any:
    """One HTTP call: sends `body` as JSON (POST when given, else GET), returns the decoded JSON.

    An empty 2xx body returns None. Raises `HTTPStatusError` on a non-2xx status and
    `VLLMServerError` on a refused connection, a timeout or a body that is not JSON.
    """
    data = None if body is None else json.dumps(body).encode()
    method = method or ("GET" if body is None else "POST")
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        raise HTTPStatusError(url, e.code, text) from None
    except (TimeoutError, socket.timeout) as e:
        raise VLLMServerError(f"{url}: no answer within timeout_s={timeout_s:g} ({e})") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            raise VLLMServerError(
                f"{url}: no answer within timeout_s={timeout_s:g} ({e.reason})") from None
        raise VLLMServerError(f"{url}: cannot connect ({e.reason})") from None
    except (ConnectionError, OSError) as e:  # reset / remote closed mid-answer
        raise VLLMServerError(f"{url}: connection failed ({e!r})") from None
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise VLLMServerError(f"{url}: answer is not JSON ({e}): {raw[:200]!r}") from None


def is_retryable(err: Exception) -> bool:
    """Connection failures and timeouts are retried, and HTTP 429/5xx; other statuses are not."""
    if isinstance(err, HTTPStatusError):
        return err.retryable
    return isinstance(err, VLLMServerError)


def backoff_delay_s(attempt: int, backoff_s: float) -> float:
    """Seconds to wait before retry `attempt` (1-based): backoff_s * 2**(attempt-1), capped."""
    return min(backoff_s * 2.0 ** (attempt - 1), MAX_BACKOFF_S)


def call_with_retries(call: Callable[[str], Any], base_urls: Sequence[str], *, what: str,
                      max_retries: int, backoff_s: float) -> Any:
    """Runs `call(base_url)` up to 1 + max_retries times, attempt a on base_urls[a % len].

    Passing several servers fails a request over to the next one; passing one retries it in
    place. Non-retryable errors (HTTP 4xx but 429) are raised at once. After the last attempt
    raises a `VLLMServerError` naming `what`, the attempts and the last cause.
    """
    last: Exception | None = None
    for attempt in range(max_retries + 1):
        if attempt:
            delay = backoff_delay_s(attempt, backoff_s)
            log.warning("%s failed (%s); retry %d/%d in %.2fs", what, last, attempt,
                        max_retries, delay)
            time.sleep(delay)
        try:
            return call(base_urls[attempt % len(base_urls)])
        except VLLMServerError as e:
            if not is_retryable(e):
                raise e
            last = e
    raise VLLMServerError(f"{what} failed after {max_retries + 1} attempts "
                          f"(max_retries={max_retries}); last error: {last}") from last


def wait_for_health(base_url: str, *, deadline_s: float, poll_s: float = 0.5,
                    timeout_s: float = 5.0) -> float:
    """Polls GET {base_url}/health until it answers 200; returns the seconds waited.

    A refused connection (the server still loading) and 503 (engine not ready or dead) both
    mean "not yet". Raises `VLLMServerError` naming the URL and the last answer once
    `deadline_s` seconds have passed.
    """
    start = time.monotonic()
    last = "no answer yet"
    while True:
        try:
            request_json(f"{base_url}/health", timeout_s=timeout_s)
            return time.monotonic() - start
        except VLLMServerError as e:
            last = str(e)
        waited = time.monotonic() - start
        if waited >= deadline_s:
            raise VLLMServerError(
                f"{base_url}/health not ready after {waited:.1f}s "
                f"(health_timeout_s={deadline_s:g}); last answer: {last}")
        time.sleep(min(poll_s, max(deadline_s - waited, 0.0)))
