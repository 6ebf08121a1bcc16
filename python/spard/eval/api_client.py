"""The HTTP client shared by everything that talks to an OpenAI-compatible server: the rubric
judge (chat completions) and the `openai` generation backend (completions, adapters).

Stdlib only (urllib + threads). The API key is read from an environment variable when a request
is made (stripped of surrounding whitespace, refused with whitespace or control characters
inside), sent only in the Authorization header and never written to logs, errors, replies or
results (`spard.apikey.redact`, also applied to what the server sends back). Transient failures
(408, 429, 5xx, timeouts, dropped connections) are retried with exponential backoff from
``backoff`` seconds (Retry-After honoured); ``cancel()`` stops the retries' waits.
"""

from __future__ import annotations

import json
import random
import re
import threading
import urllib.error
import urllib.request
from typing import Callable, TypeVar

from spard.apikey import SecretError, read_api_key, redact

__all__ = ["APIClient", "Cancelled", "Retryable", "read_api_key_quietly"]

T = TypeVar("T")


def read_api_key_quietly(env_name: str) -> None:
    """Registers the key in ``$env_name`` for redaction, whatever its shape."""
    try:
        read_api_key(env_name)
    except SecretError:
        pass


class Cancelled(Exception):
    """The work was interrupted: queued requests are not sent."""


class Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class APIClient:
    """Base URL, key, timeouts, retries and statistics of one OpenAI-compatible server.

    Subclasses name themselves in messages (``what``: "the rubric judge") and choose the
    exceptions raised when the server cannot be used at all (``Unavailable``) and when one
    request failed for good (``Failed``)."""

    what = "the server"
    Unavailable: type[Exception] = RuntimeError
    Failed: type[Exception] = RuntimeError

    def _init_client(self, *, base_url: str, api_key_env: str | None, concurrency: int, timeout: float,
                     max_retries: int, backoff: float, max_backoff: float) -> None:
        if not re.match(r"^https?://", base_url or ""):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not (concurrency >= 1 and max_retries >= 0 and 0 < timeout < float("inf") and 0 <= backoff < float("inf")):
            raise ValueError("concurrency >= 1, max_retries >= 0, a finite timeout > 0 and backoff >= 0 expected; "
                             f"got {concurrency}, {max_retries}, {timeout}, {backoff}")
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env or None
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0}

    # ------------------------------------------------------------------------------------- key
    def _key(self) -> str | None:
        if self.api_key_env is None:
            return None
        try:
            key = read_api_key(self.api_key_env)  # stripped; registered for redaction
        except SecretError as e:
            raise self.Unavailable(str(e)) from None
        if not key:
            raise self.Unavailable(
                f"{self.what} reads its API key from ${self.api_key_env}, which is not set "
                "(set it, or pass an empty key variable for a server without auth)")
        return key

    def _redact(self, text: str) -> str:
        if self.api_key_env:
            read_api_key_quietly(self.api_key_env)  # registers the key even before the first request
        return redact(text)

    # ------------------------------------------------------------------------------------ HTTP
    def _http(self, method: str, path: str, body: dict | None, timeout: float) -> tuple[int, bytes, dict]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read() or b"", dict(e.headers or {})
        except ValueError as e:  # http.client's header checks quote the value: never pass it on
            raise self.Unavailable(f"{self.what}'s request could not be built: {self._redact(str(e))}") from None

    def _reach(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes, dict]:
        """One request for a check: an unreachable server or a rejected key is ``Unavailable``."""
        try:
            status, raw, headers = self._http(method, path, body, timeout=min(self.timeout, 15.0))
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise self.Unavailable(f"cannot reach {self.what} at {self.base_url}: {reason}") from None
        if status in (401, 403):
            raise self.Unavailable(
                f"{self.what} at {self.base_url} rejected the API key from ${self.api_key_env} (HTTP {status})")
        return status, raw, headers

    def check(self) -> None:
        """Key present, server reachable, key accepted (GET /models; a server without that route
        still answers, which is enough)."""
        self._reach("GET", "/models")

    def cancel(self) -> None:
        """Queued requests are not sent and retries stop waiting (Ctrl-C)."""
        self._stop.set()

    def _wait(self, seconds: float) -> None:
        """Backoff sleep that ends early (raising Cancelled) when the work is interrupted."""
        if self._stop.wait(seconds):
            raise Cancelled

    def _post(self, path: str, body: dict, parse: Callable[[bytes], T]) -> T:
        """POSTs ``body`` and returns ``parse(reply body)``; retries transient failures (and
        ``Retryable`` raised by ``parse``), raises ``Failed`` otherwise."""
        last = ""
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                raise Cancelled
            try:
                with self._lock:
                    self.stats["requests"] += 1
                status, raw, headers = self._http("POST", path, body, self.timeout)
                if status in (408, 429) or status >= 500:
                    ra = headers.get("Retry-After") or headers.get("retry-after")
                    raise Retryable(f"HTTP {status}", float(ra) if ra and ra.replace(".", "", 1).isdigit() else None)
                if status in (401, 403):
                    raise self.Unavailable(f"{self.what} rejected the API key from ${self.api_key_env} (HTTP {status})")
                if status != 200:
                    raise self.Failed(f"HTTP {status}: {self._redact(raw.decode('utf-8', 'replace'))[:200]}")
                return parse(raw)
            except Retryable as e:
                last, wait = str(e), e.retry_after
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last, wait = f"{type(e).__name__}: {getattr(e, 'reason', e)}", None
            if attempt == self.max_retries:
                break
            with self._lock:
                self.stats["retries"] += 1
            if wait is None:
                wait = self.backoff * (2 ** attempt) * random.uniform(0.5, 1.0)
            self._wait(min(wait, self.max_backoff))
        raise self.Failed(f"gave up after {self.max_retries + 1} attempts: {self._redact(last)}")
