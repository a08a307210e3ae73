"""An ended CLI never calls the model again (real claude CLI 2.1.330, a recording fake API).

On SIGTERM a CLI parked on a client's tool call answers the call as interrupted and asks the
model to go on — a whole model call billed for an answer nobody reads. OCP kills idle CLIs
(parked, pooled) outright. Each test counts the upstream requests of each CLI process by
its session id, after the CLI is gone.
"""

import collections
import socket
import json
import time

from e2e.base import RealCliTest
from e2e.fake_anthropic import Reply
from helpers import pid_alive, wait_until

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
ADMIN = "ocp_admin_key_for_the_e2e_ended_clis"
TOOL_RUN_S = 1.0  # a client's tool runs a while: a CLI ended at once may not yet make the extra request
SETTLE_S = 2.0  # what a killed CLI would need to send its last request: nothing may come in this time


def use(name, **arguments):
    return {"name": "mcp__ocp__" + name, "input": arguments}


class EndedClisCallNoModel(RealCliTest):
    env = {"OCP_ADMIN_KEY": ADMIN, "OCP_TOOL_PARK_TTL": "600000"}

    def setUp(self):
        super().setUp()
        self.addCleanup(self.server.parks.close)
        self.seen = set()  # the parked CLIs' pids so far
        self.upstream.script(Reply(text="", tool_uses=[use("get_weather", city="Oslo")]), Reply(text="Cold."))

    def posts_by_session(self):
        with self.upstream._lock:
            posts = [r for r in self.upstream.requests if r["method"] == "POST" and r["path"].startswith("/v1/messages")]
        return collections.Counter(p["headers"].get("X-Claude-Code-Session-Id") for p in posts)

    def round(self, city="Oslo", **body):
        messages = [{"role": "user", "content": f"Weather in {city}?"}]
        status, _, reply = self.request("POST", "/v1/chat/completions", dict(
            {"model": "sonnet", "messages": messages, "tools": [WEATHER]}, **body))
        self.assertEqual(status, 200, reply)
        self.assertEqual(reply["choices"][0]["finish_reason"], "tool_calls", (reply, [json.dumps(m)[-400:] for m in self.upstream.messages()]))
        (parked,) = [e for e in self.server.runner.live() if e["parked"] and e["pid"] not in self.seen]
        self.seen.add(parked["pid"])
        park = [p for p in self.server.parks._parks if p.lease.proc.pid == parked["pid"]]
        if park:  # the CLI has asked OCP's tool server for the call: it waits, as a client's agent would see it
            wait_until(lambda: park[0].bridge._held, timeout=10)
        time.sleep(TOOL_RUN_S)
        return messages, reply, parked["pid"]


    def assert_no_more_requests(self, pid, before):
        wait_until(lambda: not pid_alive(pid), timeout=15)
        time.sleep(SETTLE_S)
        self.assertEqual(self.posts_by_session(), before, "an ended CLI called the model again")

    def test_a_park_that_expires(self):
        _, _, pid = self.round()
        before = self.posts_by_session()
        self.server.parks._parks[0].expires_at = 0  # (the reaper ends it within a second)
        self.assert_no_more_requests(pid, before)
        self.assertEqual(self.server.parks.snapshot()["expired"], 1)

    def test_a_park_evicted_by_another(self):
        self.server.config = self.server.config.__class__(**dict(
            self.server.config.__dict__, tool_park_max=1))
        self.upstream.script(Reply(text="", tool_uses=[use("get_weather", city="Oslo")]),
                             Reply(text="", tool_uses=[use("get_weather", city="Rome")]), Reply(text="Cold."))
        _, _, first = self.round("Oslo")
        _, _, second = self.round("Rome")
        before = self.posts_by_session()
        self.assert_no_more_requests(first, before)
        self.assertTrue(pid_alive(second))

    def test_a_park_whose_follow_up_does_not_match(self):
        messages, reply, pid = self.round()
        message = reply["choices"][0]["message"]
        edited = [{"role": "user", "content": "Weather in Paris?"}, message,
                  {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "cold"}]
        status, _, _ = self.request("POST", "/v1/chat/completions", {"model": "sonnet", "messages": edited,
                                                                      "tools": [WEATHER]})
        self.assertEqual(status, 200)
        wait_until(lambda: not pid_alive(pid), timeout=15)
        time.sleep(SETTLE_S)
        sessions = self.posts_by_session()
        self.assertEqual(len(sessions), 2)
        self.assertEqual(sorted(sessions.values()), [1, 1], "the ended CLI made its one request only")

    def test_a_park_left_behind_by_the_next_request(self):
        messages, reply, pid = self.round()
        message = reply["choices"][0]["message"]
        later = messages + [message, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"],
                                      "content": "[Tool call interrupted by user]"},
                            {"role": "user", "content": "Never mind."}]
        self.upstream.script(Reply(text="Fine."))
        status, _, _ = self.request("POST", "/v1/chat/completions", {"model": "sonnet", "messages": later,
                                                                      "tools": [WEATHER]})
        self.assertEqual(status, 200)
        wait_until(lambda: not pid_alive(pid), timeout=5)
        time.sleep(SETTLE_S)
        self.assertEqual(sorted(self.posts_by_session().values()), [1, 1])
        self.assertEqual(self.server.parks.snapshot()["abandoned"], 1)

    def test_parks_at_shutdown(self):
        _, _, pid = self.round()
        before = self.posts_by_session()
        self.server.runner.stop()
        self.server.parks.close()
        self.assert_no_more_requests(pid, before)

    def test_parks_cleared_by_the_operator(self):
        _, _, pid = self.round()
        before = self.posts_by_session()
        status, _, body = self.request("DELETE", "/sessions", headers={"Authorization": f"Bearer {ADMIN}"})
        self.assertEqual((status, body["cancelled"]), (200, 1))
        self.assertEqual(self.server.parks.snapshot()["parked_now"], 1, "(it is forgotten when its CLI is seen gone)")
        self.assert_no_more_requests(pid, before)

    def test_a_client_that_leaves_mid_answer(self):
        self.upstream.script(Reply(text="x" * 400, deltas=40, pace_s=0.1))
        data = json.dumps({"model": "sonnet", "stream": True,
                           "messages": [{"role": "user", "content": "Tell me a long story."}]}).encode()
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(data) + data)
        received = b""
        while b"xxxx" not in received:
            received += sock.recv(4096)
        (entry,) = self.server.runner.live()
        sock.close()
        wait_until(lambda: not pid_alive(entry["pid"]), timeout=15)
        time.sleep(SETTLE_S)
        self.assertEqual(list(self.posts_by_session().values()), [1])


class PooledClisCallNoModel(RealCliTest):
    env = {"OCP_ADMIN_KEY": ADMIN, "OCP_POOL": "1", "OCP_POOL_SPARE_AFTER": "1"}

    def setUp(self):
        super().setUp()
        self.addCleanup(self.server.runner.pool.close)

    def test_pooled_clis_ended_by_eviction_or_the_operator(self):
        status, _, _ = self.chat("Hello there.")
        self.assertEqual(status, 200)
        wait_until(lambda: self.server.runner.pool.snapshot()["warm"] == 1
                   and not self.server.runner.pool.snapshot()["starting"], timeout=30)
        pids = [e["pid"] for e in self.server.runner.live()]
        self.assertEqual(len(pids), 2, "the conversation's CLI and a warm spare")
        before = len(self.upstream.messages())
        self.server.config = self.server.config.__class__(**dict(self.server.config.__dict__, pool_max_mb=1))
        self.server.runner.apply(self.server.config)
        self.assertGreaterEqual(self.server.runner.pool.fit(), 1)
        self.request("DELETE", "/sessions", headers={"Authorization": f"Bearer {ADMIN}"})
        for pid in pids:
            wait_until(lambda: not pid_alive(pid), timeout=15)
        time.sleep(SETTLE_S)
        self.assertEqual(len(self.upstream.messages()), before)


class LongToolSessions(RealCliTest):
    """The client owns the history: the CLI behind OCP never summarises it on its own."""

    env = {"OCP_TOOL_PARK_TTL": "600000"}

    def test_one_upstream_request_per_model_step_near_the_context_limit(self):
        rounds = 6
        # Each answer reports ~34K tokens more, up to 172K of claude-sonnet-4-6's 200K: past the CLI's
        # auto-compact threshold (~167K), short of its blocking limit (~177K).
        tokens = [min(34_000 * (n + 1), 172_000) for n in range(rounds + 1)]
        self.upstream.script(*[Reply(text="", input_tokens=tokens[n], tool_uses=[use("get_weather", city=f"C{n}")])
                               for n in range(rounds)], Reply(text="All done.", input_tokens=tokens[-1]))
        messages = [{"role": "user", "content": "Check six cities."}]
        for number in range(rounds + 1):
            status, _, reply = self.request("POST", "/v1/chat/completions", {
                "model": "claude-sonnet-4-6", "messages": messages, "tools": [WEATHER]})
            self.assertEqual(status, 200, reply)
            message = reply["choices"][0]["message"]
            self.assertEqual(len(self.upstream.messages()), number + 1, "one upstream request per model step")
            if number == rounds:
                self.assertEqual(message["content"], "All done.")
                break
            result = f"report {number}: cold"
            messages = messages + [message, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"],
                                             "content": result}]
        posts = self.upstream.messages()
        self.assertEqual(len(posts), rounds + 1, [json.dumps(p)[-300:] for p in posts])


class PastTheContextLimit(RealCliTest):
    """A tool session driven past the context limit: the CLI refuses the next step itself
    (blocking_limit, no upstream request), and every route answers its context-length error."""

    env = {"OCP_TOOL_PARK_TTL": "600000"}
    NEAR_FULL = 199_500  # of claude-sonnet-4-6's 200K: past the CLI's blocking limit (~177K; ~196K with max_tokens 1000)
    SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}

    def setUp(self):
        super().setUp()
        self.addCleanup(self.server.parks.close)
        self.upstream.script(Reply(text="", input_tokens=self.NEAR_FULL, tool_uses=[use("get_weather", city="Oslo")]),
                             Reply(text="never reached"))

    def post(self, path, body):
        status, _, reply = self.request("POST", path, dict(body, model="claude-sonnet-4-6"))
        return status, reply

    def test_chat_completions(self):
        messages = [{"role": "user", "content": "Weather?"}]
        status, reply = self.post("/v1/chat/completions", {"messages": messages, "tools": [WEATHER]})
        message = reply["choices"][0]["message"]
        messages += [message, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "cold"}]
        status, reply = self.post("/v1/chat/completions", {"messages": messages, "tools": [WEATHER]})
        self.assertEqual((status, reply["error"]["code"]), (400, "context_length_exceeded"), reply)
        self.assertIn("maximum context length", reply["error"]["message"])
        self.assertEqual(len(self.upstream.messages()), 1, "the CLI refused it itself")

    def test_responses(self):
        tools = [{"type": "function", "name": "get_weather", "parameters": self.SCHEMA}]
        status, reply = self.post("/v1/responses", {"input": "Weather?", "tools": tools})
        (call,) = [item for item in reply["output"] if item["type"] == "function_call"]
        follow = [{"role": "user", "content": "Weather?"}, call,
                  {"type": "function_call_output", "call_id": call["call_id"], "output": "cold"}]
        status, reply = self.post("/v1/responses", {"input": follow, "tools": tools})
        self.assertEqual((status, reply["error"]["code"]), (400, "context_length_exceeded"), reply)

    def test_messages(self):
        tools = [{"name": "get_weather", "input_schema": self.SCHEMA}]
        messages = [{"role": "user", "content": "Weather?"}]
        status, reply = self.post("/v1/messages", {"messages": messages, "tools": tools, "max_tokens": 1000})
        (use_block,) = [b for b in reply["content"] if b["type"] == "tool_use"]
        messages += [{"role": "assistant", "content": reply["content"]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use_block["id"],
                                                   "content": "cold"}]}]
        status, reply = self.post("/v1/messages", {"messages": messages, "tools": tools, "max_tokens": 1000})
        self.assertEqual((status, reply.get("error", {}).get("type")), (400, "invalid_request_error"),
                         (reply, [json.dumps(m)[-300:] for m in self.upstream.messages()]))
        self.assertIn("prompt is too long", reply["error"]["message"])
