"""JSON over HTTP to vLLM servers: URL checks, one call with a timeout, retries with back-off,
waits for health with progress lines.

Standard library only (urllib). Every call has a timeout and every failure ends in a
`VLLMServerError` that names the URL, the attempts made and the last cause, because a silent
hang in a weight update is the failure mode seen most often in RL frameworks (docs/vllm.md).
Failures are told apart where the caller must act differently: a refused connection
(`ConnectionRefused`: the server is still loading, worth waiting for) versus a host that does
not resolve or a URL that cannot be right (fail at once).
"""
from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

# 429 (too many requests) and 5xx are worth another try; other 4xx are the caller's mistake.
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0
PROGRESS_EVERY_S = 30.0  # a waiting loop logs a line this often


class VLLMServerError(RuntimeError):
    """A vLLM server could not be reached, timed out, or answered something unusable."""


class ConnectionRefused(VLLMServerError):
    """Nothing listens on the port (yet): a server that is still loading its model."""


class HTTPStatusError(VLLMServerError):
    """The server answered with a non-2xx status; `status` and `body` hold what it said."""

    def __init__(self, url: str, status: int, body: str):
        super().__init__(f"{url}: HTTP {status}: {body[:500]}")
        self.url, self.status, self.body = url, status, body


def check_base_url(url: str, field: str = "base_urls") -> str:
    """Returns `url` without a trailing slash, or raises naming `field` and the URL at once.

    Expected: http(s)://HOST[:PORT] with nothing after the root; HOST must resolve (a typo'd
    host name fails here, not after health_timeout_s of waiting).
    """
    if not isinstance(url, str):
        raise ValueError(f"{field}: expected a URL string, got {url!r}")
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{field}: {url!r} is not an http:// or https:// URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"{field}: {url!r} has a bad port") from None
    if not parts.hostname:
        raise ValueError(f"{field}: {url!r} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{field}: {url!r}: expected the server's root (no path or query), "
                         f"e.g. http://host:8000")
    try:
        socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise VLLMServerError(f"{field}: {url!r}: host {parts.hostname!r} does not resolve "
                              f"({e})") from None
    return url.strip().rstrip("/")


def request_json(url: str, body: Any = None, *, method: str | None = None,
                 timeout_s: float) -> Any:
    """One HTTP call: sends `body` as JSON (POST when given, else GET), returns the decoded JSON.

    An empty 2xx body returns None. Raises `HTTPStatusError` on a non-2xx status,
    `ConnectionRefused` when nothing listens, and `VLLMServerError` on any other connection
    failure, a timeout or a body that is not JSON.
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
        if isinstance(e.reason, ConnectionRefusedError):
            raise ConnectionRefused(f"{url}: connection refused (nothing listens)") from None
        raise VLLMServerError(f"{url}: cannot connect ({e.reason})") from None
    except ConnectionRefusedError:
        raise ConnectionRefused(f"{url}: connection refused (nothing listens)") from None
    except (ConnectionError, OSError) as e:  # reset / remote closed mid-answer
        raise VLLMServerError(f"{url}: connection failed ({e!r})") from None
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise VLLMServerError(f"{url}: answer is not JSON ({e}): {raw[:200]!r}") from None


def is_retryable(err: Exception, retry_status: frozenset | None = None) -> bool:
    """Connection failures and timeouts are retried, and HTTP statuses in `retry_status`
    (default RETRYABLE_STATUS: 429 and 5xx); other statuses are not."""
    if isinstance(err, HTTPStatusError):
        return err.status in (RETRYABLE_STATUS if retry_status is None else retry_status)
    return isinstance(err, VLLMServerError)


def backoff_delay_s(attempt: int, backoff_s: float) -> float:
    """Seconds to wait before retry `attempt` (1-based): backoff_s * 2**(attempt-1), capped."""
    return min(backoff_s * 2.0 ** (attempt - 1), MAX_BACKOFF_S)


def call_with_retries(call: Callable[[str], Any], base_urls: Sequence[str], *, what: str,
                      max_retries: int, backoff_s: float,
                      retry_status: frozenset | None = None) -> Any:
    """Runs `call(base_url)` up to 1 + max_retries times, attempt a on base_urls[a % len].

    Passing several servers fails a request over to the next one; passing one retries it in
    place. Non-retryable errors (HTTP statuses outside `retry_status`, see `is_retryable`) are
    raised at once. After the last attempt
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
            if not is_retryable(e, retry_status):
                raise
            last = e
    raise VLLMServerError(f"{what} failed after {max_retries + 1} attempts "
                          f"(max_retries={max_retries}); last error: {last}") from last


def wait_until(check: Callable[[], str | None], *, what: str, deadline_s: float,
               poll_s: float = 0.5, progress_every_s: float = PROGRESS_EVERY_S) -> float:
    """Calls `check()` until it returns None (done); returns the seconds waited.

    `check` returns a short reason while not done (logged every `progress_every_s` seconds as
    "waiting for {what}: {reason} ({t}s of {deadline_s}s)") and raises to stop at once. Raises
    `VLLMServerError` naming `what` and the last reason once `deadline_s` seconds have passed.
    """
    start = time.monotonic()
    next_progress = progress_every_s
    while True:
        reason = check()
        waited = time.monotonic() - start
        if reason is None:
            return waited
        if waited >= deadline_s:
            raise VLLMServerError(f"{what}: not ready after {waited:.1f}s (deadline "
                                  f"{deadline_s:g}s); last answer: {reason}")
        if waited >= next_progress:
            log.warning("waiting for %s: %s (%.0fs of %gs)", what, reason, waited, deadline_s)
            next_progress += progress_every_s
        time.sleep(min(poll_s, max(deadline_s - waited, 0.0)))


def wait_for_health(base_url: str, *, deadline_s: float, poll_s: float = 0.5,
                    timeout_s: float = 5.0, progress_every_s: float = PROGRESS_EVERY_S) -> float:
    """Polls GET {base_url}/health until it answers 200; returns the seconds waited.

    A refused connection (the server still loading), 503 (engine not ready) and a health call
    that times out mean "not yet", with a progress line every `progress_every_s` seconds; any
    other failure (the host went away, a wrong scheme, HTTP 404: not a vLLM server) raises at
    once. Raises `VLLMServerError` naming the URL and the last answer after `deadline_s` seconds
    (health_timeout_s).
    """
    def check() -> str | None:
        try:
            request_json(f"{base_url}/health", timeout_s=timeout_s)
            return None
        except ConnectionRefused as e:
            return str(e)
        except HTTPStatusError as e:
            if e.status != 503:
                raise
            return str(e)
        except VLLMServerError as e:
            if "no answer within" not in str(e):
                raise
            return str(e)

    return wait_until(check, what=f"{base_url}/health (health_timeout_s={deadline_s:g})",
                      deadline_s=deadline_s, poll_s=poll_s, progress_every_s=progress_every_s)
