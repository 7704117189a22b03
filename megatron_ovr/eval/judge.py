r"""A judge client for any OpenAI-compatible chat-completions endpoint: retried, cached on disk, resumable.

Contract
--------
:class:`JudgeClient` POSTs ``{"model", "messages", "temperature", "max_tokens"}`` to
``{base_url}/chat/completions`` (``base_url`` like ``http://host:8000/v1``, as vLLM's OpenAI server serves)
with plain ``urllib`` and reads ``choices[0].message.content``; :meth:`JudgeClient.count` parses the last
``<count>N</count>`` of that reply.

Failures: connection errors, time-outs (``timeout_s`` per attempt), HTTP 429 and 5xx, and replies without a
``<count>`` are retried up to ``max_attempts`` in all, sleeping ``backoff_s * 2**k`` (capped at
``max_backoff_s``) between attempts; other HTTP errors (a wrong model name: 400/404) fail at once. Either
way :class:`JudgeError` says what was tried and the last error.

Cache: :class:`JudgeCache` is an append-only JSONL file of ``{"key", "count", "reply"}``; the key is the
SHA-256 of the model name and the exact request messages and sampling settings. A finished call is on disk
before :meth:`count` returns, so a rerun after a crash reuses every finished call; a line cut short by a
crash is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["JudgeCache", "JudgeClient", "JudgeError", "parse_count"]

logger = logging.getLogger(__name__)

_COUNT = re.compile(r"<count>\s*(\d+)\s*</count>", re.IGNORECASE)
_RETRIED_HTTP_STATUSES = frozenset({429, 500, 502, 503, 504})
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class JudgeError(RuntimeError):
    """A judge call that failed for good (after its retries, or at once for a non-retryable error)."""


class _RetryableError(Exception):
    pass


def parse_count(reply: str) -> Optional[int]:
    """The last ``<count>N</count>`` in a judge reply, or None when there is none."""
    matches = _COUNT.findall(reply)
    return int(matches[-1]) if matches else None


class JudgeCache:
    """Finished judge calls on disk (append-only JSONL, see the module docstring); thread-safe."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        if self.path.is_file():
            self._load()
            self._end_last_line()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _end_last_line(self) -> None:
        # A crash mid-write can leave the last line without its newline: end it so the next entry starts clean.
        with self.path.open("rb+") as f:
            if f.seek(0, 2) > 0:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def _load(self) -> None:
        with self.path.open("r", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    self._counts[entry["key"]] = int(entry["count"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    logger.warning("%s:%d: ignoring an unreadable cache line (cut short by a crash?)",
                                   self.path, line_no)

    def __len__(self) -> int:
        return len(self._counts)

    def get(self, key: str) -> Optional[int]:
        with self._lock:
            return self._counts.get(key)

    def put(self, key: str, count: int, reply: str) -> None:
        with self._lock:
            self._counts[key] = count
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "count": count, "reply": reply}, ensure_ascii=False) + "\n")


@dataclass
class JudgeClient:
    """Counts with an LLM judge behind ``{base_url}/chat/completions`` (see the module docstring).

    Attributes:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model name (part of the cache key).
        cache: where finished calls are kept; None: no cache.
        api_key: sent as ``Authorization: Bearer`` when set.
    """

    base_url: str
    model: str
    cache: Optional[JudgeCache] = None
    timeout_s: float = 120.0
    max_attempts: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    temperature: float = 0.0
    max_tokens: int = 1024
    api_key: Optional[str] = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts}: must be >= 1")
        self.base_url = self.base_url.rstrip("/")
        # urllib sends even loopback requests through $http_proxy unless $no_proxy lists the host; a judge on
        # this machine (the offline judge, a local vLLM server) must never be proxied.
        loopback = urllib.parse.urlsplit(self.base_url).hostname in _LOOPBACK_HOSTS
        proxies = {} if loopback else None  # None: the environment's proxies
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))

    def cache_key(self, messages: list[dict]) -> str:
        request = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": self.max_tokens}
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def count(self, messages: list[dict]) -> int:
        """The judge's ``<count>`` for one prompt, from the cache when this exact call already finished."""
        key = self.cache_key(messages)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        count, reply = self._call_with_retries(messages)
        if self.cache is not None:
            self.cache.put(key, count, reply)
        return count

    def _call_with_retries(self, messages: list[dict]) -> tuple[int, str]:
        last_error = ""
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
            try:
                reply = self._post(messages)
            except _RetryableError as err:
                last_error = str(err)
                logger.info("judge attempt %d/%d failed: %s", attempt + 1, self.max_attempts, err)
                continue
            count = parse_count(reply)
            if count is not None:
                return count, reply
            last_error = f"the reply has no <count>N</count>: {reply[-200:]!r}"
        raise JudgeError(f"judge call to {self.base_url} (model {self.model!r}) failed after "
                         f"{self.max_attempts} attempt(s); last error: {last_error}")

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers,
                                         method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = f"HTTP {err.code} {err.reason}: {err.read()[:300].decode(errors='replace')}"
            if err.code in _RETRIED_HTTP_STATUSES:
                raise _RetryableError(detail) from err
            raise JudgeError(f"judge call to {self.base_url} (model {self.model!r}) was refused: {detail}") from err
        except (socket.timeout, TimeoutError) as err:
            raise _RetryableError(f"no reply within timeout_s={self.timeout_s}") from err
        except urllib.error.URLError as err:
            if isinstance(err.reason, (socket.timeout, TimeoutError)):
                raise _RetryableError(f"no reply within timeout_s={self.timeout_s}") from err
            raise _RetryableError(f"cannot reach {self.base_url}: {err.reason}") from err
        except (ConnectionError, json.JSONDecodeError) as err:
            raise _RetryableError(f"broken reply: {err}") from err
        try:
            return payload["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as err:
            raise _RetryableError(f"not a chat-completions reply: {str(payload)[:200]}") from err
