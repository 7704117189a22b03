r"""An OpenAI-compatible chat-completions server on loopback, and the offline rule judge it serves.

Contract
--------
:class:`ChatCompletionsServer` is a real HTTP server (a thread, ``127.0.0.1``, a free port) answering
``POST /v1/chat/completions`` in the OpenAI format, its reply text computed by ``reply(messages)``; when
``reply`` raises, the request gets HTTP 500 with the error. The demo and the tests run the judge client's
real network path against it, with no model.

:func:`rule_judge_reply` is the offline judge: it reads the behaviour from the prompt's ``## Behavior:``
line and the response between ``<response>`` tags (the format of
:func:`megatron_ovr.eval.behaviors.judge_messages`), counts that behaviour's cue phrases
(:data:`CUES`: "wait", "let me re-check the image", "first ... then", "verify", ...) and answers
``<count>N</count>``. Rules, not understanding: use it for plumbing and demos, never for results.

    with ChatCompletionsServer(rule_judge_reply) as server:
        client = JudgeClient(base_url=server.base_url, model=OFFLINE_JUDGE_MODEL)
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from .behaviors import BEHAVIORS

__all__ = ["CUES", "ChatCompletionsServer", "OFFLINE_JUDGE_MODEL", "count_cues", "rule_judge_reply"]

logger = logging.getLogger(__name__)

OFFLINE_JUDGE_MODEL = "offline-rule-judge"

_IMAGE = r"(?:image|figure|diagram|picture|graph|chart|plot)"
CUES: dict[str, tuple[str, ...]] = {
    "visual_reflection": (
        rf"\blet me (?:re-?check|re-?examine|re-?inspect|look at|revisit) the {_IMAGE}",
        rf"\blooking (?:back )?at the {_IMAGE} again\b",
        rf"\bre-?(?:examin|inspect)(?:e|ing) the {_IMAGE}",
    ),
    "divide_and_conquer": (
        rf"\b(?:split|divide|break|decompose)s? (?:the |this )?{_IMAGE} into\b",
        r"\b(?:each|every) (?:region|part|section|piece|shape|panel|segment|bar)\b",
    ),
    "visual_verification": (
        rf"\b(?:matches|consistent with|agrees with|confirmed by) the {_IMAGE}\b",
        rf"\b(?:check|verify|confirm)(?:ing|s|ed)? (?:this |it |that )?(?:against|with|in) the {_IMAGE}\b",
    ),
    "goal_driven_visual_tracing": (
        r"\btrac(?:e|es|ed|ing)\b",
        r"\bfollow(?:s|ed|ing)? the (?:line|path|curve|arrow|edge)\b",
        rf"\blocat(?:e|ing) [^.\n]{{0,60}}\b(?:in|on) the {_IMAGE}\b",
    ),
    "backtracking": (
        r"\bwait\b",
        r"\bon second thought\b",
        r"\bI made a mistake\b",
        r"\blet me reconsider\b",
        r"\bthat(?:'s| is) (?:not right|wrong|incorrect)\b",
    ),
    "subgoal_setting": (
        r"\bfirst\b[\s\S]{0,200}?\bthen\b",
        r"\bstep \d+\b",
        r"\blet'?s break (?:this|it|the problem) (?:down|into)\b",
    ),
    "verification": (
        r"\bverify\b",
        r"\bdouble-?check\b",
        r"\blet me check\b",
        r"\bsubstitut(?:e|ing) (?:it |this |the answer )?back\b",
    ),
    "backward_chaining": (
        r"\bwork(?:ing)? backwards?\b",
        r"\bto (?:find|get|compute) [^.,\n]{1,60}, (?:we|I) need\b",
        r"\bstarting from the (?:goal|answer|result)\b",
    ),
}
"""Cue patterns per behaviour key (case-insensitive); a response's count is their non-overlapping matches."""

_COMPILED = {key: re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) for key, patterns in CUES.items()}
_TITLE_TO_KEY = {behavior.title: key for key, behavior in BEHAVIORS.items()}
_BEHAVIOR_LINE = re.compile(r"^## Behavior: (.+)$", re.MULTILINE)
_RESPONSE = re.compile(r"<response>\n(.*)\n</response>", re.DOTALL)


def count_cues(behavior_key: str, text: str) -> int:
    """Non-overlapping cue matches of one behaviour in ``text``."""
    return len(_COMPILED[behavior_key].findall(text))


def rule_judge_reply(messages: list[dict]) -> str:
    """The offline judge's reply to one judge prompt (see the module docstring)."""
    prompt = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")
    title, response = _BEHAVIOR_LINE.search(prompt), _RESPONSE.search(prompt)
    if title is None or response is None or title.group(1) not in _TITLE_TO_KEY:
        raise ValueError("not a behaviour-judge prompt: expected a known '## Behavior:' line and <response> tags")
    key = _TITLE_TO_KEY[title.group(1)]
    return f"Counted cue phrases of {key}.\n<count>{count_cues(key, response.group(1))}</count>"


class _LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    """Handler threads may still be sleeping in a slow reply at shutdown: never wait for them."""
    request_queue_size = 128
    """The default backlog (5) drops connections when many judge calls arrive at once; each dropped one
    costs its client a 1 s connect retry."""


class ChatCompletionsServer:
    """``POST /v1/chat/completions`` on ``127.0.0.1`` in a daemon thread (see the module docstring).

    Args:
        reply: computes the assistant text from the request's messages; raising gives HTTP 500.
        port: 0 picks a free port.
    """

    def __init__(self, reply: Callable[[list[dict]], str], *, host: str = "127.0.0.1", port: int = 0):
        self.reply = reply
        self.requests_served = 0
        self._lock = threading.Lock()
        self._httpd = _LoopbackHTTPServer((host, port), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "ChatCompletionsServer":
        # A short poll interval: stop() waits for the serving loop's next poll.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="chat-completions-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "ChatCompletionsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _count_request(self) -> int:
        with self._lock:
            self.requests_served += 1
            return self.requests_served

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                number = server._count_request()
                try:
                    request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    content = server.reply(request["messages"])
                except Exception as err:  # the reply function's failure is the client's HTTP 500
                    self._send(500, {"error": {"message": f"{type(err).__name__}: {err}"}})
                    return
                self._send(200, {
                    "id": f"chatcmpl-{number}", "object": "chat.completion", "created": int(time.time()),
                    "model": request.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                })

            def _send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its time-out) before a slow reply was ready

            def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
                logger.debug("judge server: " + format, *args)

        return Handler
