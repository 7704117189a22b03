"""The judge client against a real HTTP server thread on 127.0.0.1: replies, retries (HTTP 500, time-outs,
unparseable replies), clear failures, the on-disk cache and resuming an interrupted analysis."""

import json
import threading
import time

import pytest

from megatron_ovr.eval.behaviors import BEHAVIORS, JudgedResponse, count_behaviors, judge_messages
from megatron_ovr.eval.judge import JudgeCache, JudgeClient, JudgeError, parse_count
from megatron_ovr.eval.judge_server import ChatCompletionsServer, rule_judge_reply

MESSAGES = [{"role": "user", "content": "count it"}]


class ScriptedReplies:
    """A reply function that plays one scripted action per request: ("ok", text), ("fail",), ("sleep", s)."""

    def __init__(self, *actions):
        self.actions = list(actions)
        self.requests = []
        self._lock = threading.Lock()

    def __call__(self, messages):
        with self._lock:
            self.requests.append(messages)
            action = self.actions.pop(0) if len(self.actions) > 1 else self.actions[0]
        if action[0] == "fail":
            raise RuntimeError("engine overloaded")
        if action[0] == "sleep":
            time.sleep(action[1])
            return "<count>9</count>"
        return action[1]


def _client(server, **kwargs):
    return JudgeClient(base_url=server.base_url, model="judge", backoff_s=0.01, **kwargs)


def test_reply_is_parsed_and_request_is_openai_format():
    replies = ScriptedReplies(("ok", "Two instances.\n<count>2</count>"))
    with ChatCompletionsServer(replies) as server:
        assert _client(server).count(MESSAGES) == 2
    assert replies.requests == [MESSAGES]


def test_server_error_is_retried_then_succeeds():
    replies = ScriptedReplies(("fail",), ("ok", "<count>3</count>"))
    with ChatCompletionsServer(replies) as server:
        assert _client(server, max_attempts=3).count(MESSAGES) == 3
        assert server.requests_served == 2


def test_slow_reply_times_out_and_is_retried():
    replies = ScriptedReplies(("sleep", 3.0), ("ok", "<count>1</count>"))
    with ChatCompletionsServer(replies) as server:
        assert _client(server, timeout_s=1.0, max_attempts=2).count(MESSAGES) == 1


def test_always_slow_fails_clearly_within_bounded_time():
    with ChatCompletionsServer(ScriptedReplies(("sleep", 3.0))) as server:
        began = time.monotonic()
        with pytest.raises(JudgeError, match=r"failed after 2 attempt\(s\); last error: no reply within timeout_s=0.5"):
            _client(server, timeout_s=0.5, max_attempts=2).count(MESSAGES)
        assert time.monotonic() - began < 2.5  # two time-outs, never the 3 s of a reply


def test_reply_without_count_is_retried_then_fails():
    replies = ScriptedReplies(("ok", "I am not sure."))
    with ChatCompletionsServer(replies) as server:
        with pytest.raises(JudgeError, match=r"the reply has no <count>N</count>: 'I am not sure.'"):
            _client(server, max_attempts=3).count(MESSAGES)
    assert len(replies.requests) == 3


def test_client_error_is_not_retried():
    with ChatCompletionsServer(ScriptedReplies(("ok", "<count>1</count>"))) as server:
        client = JudgeClient(base_url=server.base_url.replace("/v1", "/wrong"), model="judge", backoff_s=0.01)
        with pytest.raises(JudgeError, match="was refused: HTTP 404"):
            client.count(MESSAGES)
        assert server.requests_served == 0


def test_unreachable_endpoint_fails_clearly():
    server = ChatCompletionsServer(rule_judge_reply)
    url = server.base_url
    server.stop()  # the port is closed: connections are refused
    with pytest.raises(JudgeError, match="cannot reach"):
        JudgeClient(base_url=url, model="judge", max_attempts=2, backoff_s=0.01).count(MESSAGES)


def test_loopback_judge_ignores_proxy_settings(monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a proxy that does not exist
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with ChatCompletionsServer(ScriptedReplies(("ok", "<count>4</count>"))) as server:
        assert _client(server, max_attempts=1).count(MESSAGES) == 4


def test_parse_count_takes_the_last():
    assert parse_count("<count>1</count> then <COUNT> 12 </COUNT>") == 12
    assert parse_count("no count") is None


def test_cache_reuses_finished_calls_across_instances(tmp_path):
    replies = ScriptedReplies(("ok", "<count>5</count>"))
    with ChatCompletionsServer(replies) as server:
        assert _client(server, cache=JudgeCache(tmp_path / "c.jsonl")).count(MESSAGES) == 5
        reloaded = JudgeCache(tmp_path / "c.jsonl")
        assert len(reloaded) == 1
        assert _client(server, cache=reloaded).count(MESSAGES) == 5
        assert server.requests_served == 1
        # The key is the model and the exact request: another model or prompt is a new call.
        other_model = JudgeClient(base_url=server.base_url, model="other", cache=reloaded)
        assert other_model.cache_key(MESSAGES) != _client(server).cache_key(MESSAGES)
        other_model.count(MESSAGES)
        _client(server, cache=reloaded).count([{"role": "user", "content": "count that"}])
        assert server.requests_served == 3


def test_cache_survives_a_line_cut_short_by_a_crash(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"key": "a", "count": 1, "reply": ""}) + "\n" + '{"key": "b", "cou')
    cache = JudgeCache(path)
    assert cache.get("a") == 1 and cache.get("b") is None
    cache.put("c", 2, "<count>2</count>")
    assert JudgeCache(path).get("c") == 2


def test_interrupted_analysis_resumes_from_the_cache(tmp_path):
    responses = [JudgedResponse(id=str(i), response=f"Wait, step {i}. Let me verify.") for i in range(3)]
    calls = len(responses) * len(BEHAVIORS)
    failing_after = 10

    def flaky(messages):
        if flaky.calls >= failing_after:
            raise RuntimeError("judge crashed")
        flaky.calls += 1
        return rule_judge_reply(messages)

    flaky.calls = 0
    cache = JudgeCache(tmp_path / "cache.jsonl")
    with ChatCompletionsServer(flaky) as server:
        with pytest.raises(JudgeError, match="rerun to resume"):
            count_behaviors(responses, _client(server, cache=cache, max_attempts=1), concurrency=1)
    assert len(JudgeCache(tmp_path / "cache.jsonl")) == failing_after

    with ChatCompletionsServer(rule_judge_reply) as server:
        counts = count_behaviors(responses, _client(server, cache=JudgeCache(tmp_path / "cache.jsonl")), concurrency=4)
        assert server.requests_served == calls - failing_after
    assert counts["backtracking"] == [1, 1, 1] and counts["verification"] == [1, 1, 1]
    assert counts["subgoal_setting"] == [1, 1, 1] and counts["visual_reflection"] == [0, 0, 0]


def test_offline_judge_rejects_a_foreign_prompt():
    with ChatCompletionsServer(rule_judge_reply) as server:
        with pytest.raises(JudgeError, match="HTTP 500.*not a behaviour-judge prompt"):
            _client(server, max_attempts=1).count(MESSAGES)
        message = judge_messages(BEHAVIORS["backtracking"], "Wait. Wait, no.")
        assert _client(server).count(message) == 2
