"""Client tool calling with the real claude CLI 2.1.330: the openai SDK drives OCP, the fake
Anthropic API scripts the model's tool calls (AGENTS-SPEC §1)."""

import json
import os
import random
import socket
import subprocess
import threading
import time

from e2e.base import OpenAIClientTest, RealCliTest, require
from e2e.fake_anthropic import Reply
from helpers import pid_alive, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                           "parameters": {"type": "object", "properties": {}}}}]


def use(name, **arguments):
    return {"name": "mcp__ocp__" + name, "input": arguments}


class ToolsWithTheRealCli(OpenAIClientTest):
    env = {"OCP_TOOL_PARK_TTL": "4000"}

    def posts(self):
        with self.upstream._lock:
            return [r for r in self.upstream.requests if r["method"] == "POST" and r["path"].startswith("/v1/messages")]

    def converse(self, stream, results=("rain", "noon", "sun")):
        """Three tool rounds then an answer; return the final text."""
        self.upstream.script(Reply(text="Checking.", tool_uses=[use("get_weather", city="Oslo")]),
                             Reply(text="", tool_uses=[use("get_time")]),
                             Reply(text="One more.", tool_uses=[use("get_weather", city="Rome")]),
                             Reply(text="All done: rain, noon, sun."))
        messages = [{"role": "user", "content": "Plan my day."}]
        for number in range(4):
            message, finish = self.complete(messages, stream)
            if number == 3:
                self.assertEqual(finish, "stop")
                return message["content"]
            self.assertEqual(finish, "tool_calls")
            messages.append(message)
            messages += [{"role": "tool", "tool_call_id": c["id"], "content": results[number]}
                         for c in message["tool_calls"]]

    def complete(self, messages, stream):
        """One request; return (assistant message as a dict, finish_reason)."""
        if not stream:
            choice = self.client.chat.completions.create(model="sonnet", messages=messages, tools=TOOLS).choices[0]
            return choice.message.model_dump(exclude_none=True), choice.finish_reason
        calls, text, finish = {}, "", None
        for chunk in self.client.chat.completions.create(model="sonnet", messages=messages, tools=TOOLS, stream=True):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            text += delta.content or ""
            for piece in delta.tool_calls or []:
                entry = calls.setdefault(piece.index, {"id": "", "type": "function",
                                                       "function": {"name": "", "arguments": ""}})
                entry["id"] = piece.id or entry["id"]
                entry["function"]["name"] = (piece.function.name or "") or entry["function"]["name"]
                entry["function"]["arguments"] += piece.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        message = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        return message, finish

    def check_one_process(self):
        posts = self.posts()
        self.assertEqual(len(posts), 4)
        sessions = {p["headers"].get("X-Claude-Code-Session-Id") for p in posts}
        self.assertEqual(len(sessions), 1, "every round ran in the one parked CLI")
        for post, result in zip(posts[1:], ("rain", "noon", "sun")):
            last = post["body"]["messages"][-1]
            blocks = [b for b in last["content"] if isinstance(b, dict) and b.get("type") == "tool_result"]
            self.assertEqual(len(blocks), 1, last)
            self.assertIn(result, json.dumps(blocks[0]["content"]))
        self.assertEqual(self.server.runner.leases_made, 1)

    def test_three_rounds_in_one_cli_process(self):
        self.assertEqual(self.converse(stream=False), "All done: rain, noon, sun.")
        self.check_one_process()
        tools = {t["name"] for t in self.posts()[0]["body"]["tools"]}
        self.assertTrue({"mcp__ocp__get_weather", "mcp__ocp__get_time"} <= tools, tools)

    def test_three_rounds_streamed_in_one_cli_process(self):
        self.assertEqual(self.converse(stream=True), "All done: rain, noon, sun.")
        self.check_one_process()

    def test_two_parallel_calls_in_one_message(self):
        self.upstream.script(Reply(text="", tool_uses=[use("get_weather", city="Oslo"), use("get_weather", city="Lima")]),
                             Reply(text="Oslo is cold, Lima is warm."))
        messages = [{"role": "user", "content": "Compare."}]
        message, finish = self.complete(messages, stream=True)
        self.assertEqual(finish, "tool_calls")
        self.assertEqual([json.loads(c["function"]["arguments"])["city"] for c in message["tool_calls"]],
                         ["Oslo", "Lima"])
        messages += [message] + [{"role": "tool", "tool_call_id": c["id"], "content": r}
                                 for c, r in zip(message["tool_calls"], ("cold", "warm"))]
        message, finish = self.complete(messages, stream=False)
        self.assertEqual((message["content"], finish), ("Oslo is cold, Lima is warm.", "stop"))
        last = self.posts()[-1]["body"]["messages"][-1]
        self.assertEqual([b["type"] for b in last["content"] if isinstance(b, dict)][:2], ["tool_result", "tool_result"])

    def test_after_the_ttl_the_conversation_still_finishes_by_text_replay(self):
        self.upstream.script(Reply(text="", tool_uses=[use("get_weather", city="Oslo")]),
                             Reply(text="Cold in Oslo."))
        messages = [{"role": "user", "content": "Weather?"}]
        message, _ = self.complete(messages, stream=False)
        pid = self.live_cli_pids()[0]
        wait_until(lambda: not pid_alive(pid), timeout=15)
        messages += [message, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "cold"}]
        with self.assertLogs("ocp", "INFO") as logs:
            message, finish = self.complete(messages, stream=False)
        self.assertEqual((message["content"], finish), ("Cold in Oslo.", "stop"))
        self.assertIn("the history goes as text", "\n".join(logs.output))
        self.assertIn("[tool call ", json.dumps(self.posts()[-1]["body"]["messages"]))
        self.assertEqual(self.server.runner.leases_made, 2)

    def test_abandoned_conversations_leave_no_process(self):
        self.upstream.script(Reply(text="", tool_uses=[use("get_time")]))
        for _ in range(3):
            self.complete([{"role": "user", "content": "Time?"}], stream=False)
        self.assertEqual(len(self.live_cli_pids()), 3)
        wait_until(lambda: not self.live_cli_pids(), timeout=20)
        runner = self.server.runner
        wait_until(lambda: runner.leases_made == runner.leases_ended, timeout=10)
        time.sleep(0.2)
        self.assertEqual(self.live_cli_pids(), [])

    def test_the_python_sdks_streaming_helper_completes_a_tool_round(self):
        self.upstream.script(Reply(text="Let me look.", tool_uses=[use("get_weather", city="Oslo")]),
                             Reply(text="It is cold in Oslo."))
        messages = [{"role": "user", "content": "Weather in Oslo?"}]
        with self.client.chat.completions.stream(model="sonnet", messages=messages, tools=TOOLS) as stream:
            for _ in stream:
                pass
            first = stream.get_final_completion()
        self.assertEqual(first.choices[0].finish_reason, "tool_calls")
        (tool_call,) = first.choices[0].message.tool_calls
        self.assertEqual((tool_call.function.name, json.loads(tool_call.function.arguments)), ("get_weather", {"city": "Oslo"}))
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": tool_call.id, "content": "cold"}]
        with self.client.chat.completions.stream(model="sonnet", messages=messages, tools=TOOLS) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        self.assertEqual(final.choices[0].message.content, "It is cold in Oslo.")
        self.assertEqual(self.server.runner.leases_made, 1)


class NodeRunTools(RealCliTest):
    """openai-node's runTools() helper: it runs the client's functions and loops until the answer."""

    def setUp(self):
        modules = os.environ.get("OCP_E2E_OPENAI_NODE", "")
        require(bool(modules) and os.path.isdir(os.path.join(modules, "openai")), "openai-node is not installed",
                "set OCP_E2E_OPENAI_NODE to a node_modules holding npm's openai, as .ci/run does")
        self.modules = modules
        super().setUp()

    def run_tools(self, stream):
        self.upstream.script(Reply(text="", tool_uses=[use("get_weather", city="Oslo")]),
                             Reply(text="", tool_uses=[use("get_time")]),
                             Reply(text="Cold in Oslo at noon."))
        done = subprocess.run(["node", os.path.join(HERE, "run_tools.mjs"), f"http://127.0.0.1:{self.port}/v1",
                               "1" if stream else "0"], capture_output=True, text=True, timeout=120,
                              env={"PATH": os.environ["PATH"], "OPENAI_NODE": self.modules})
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        self.assertEqual(result, {"content": "Cold in Oslo at noon.", "calls": [["get_weather", "Oslo"], ["get_time"]]})
        self.assertEqual(self.server.runner.leases_made, 1, "both rounds ran in one parked CLI")

    def test_run_tools(self):
        self.run_tools(stream=False)

    def test_run_tools_streaming(self):
        self.run_tools(stream=True)


class AbandonedConversations(RealCliTest):
    """100 tool conversations left at random points leave no CLI process behind."""

    env = {"OCP_TOOL_PARK_TTL": "3000", "CLAUDE_MAX_CONCURRENT": "4", "CLAUDE_MAX_QUEUE": "200"}

    def one(self, rng, number):
        body = {"model": "sonnet", "tools": TOOLS, "stream": rng.random() < 0.5,
                "messages": [{"role": "user", "content": f"conversation {number}"}]}
        point = rng.choice(["hang-up", "never-return", "hang-up-later", "finish"])
        if point == "hang-up":  # leave while the first answer streams
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            data = json.dumps(dict(body, stream=True)).encode()
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
            time.sleep(rng.random() * 0.5)
            sock.close()
            return
        status, _, reply = self.request("POST", "/v1/chat/completions", dict(body, stream=False))
        if point == "never-return" or status != 200 or not reply["choices"][0]["message"].get("tool_calls"):
            return
        message = reply["choices"][0]["message"]
        follow = dict(body, stream=False, messages=body["messages"] + [
            {"role": "assistant", "content": message["content"], "tool_calls": message["tool_calls"]},
            {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "cold"}])
        if point == "finish":
            self.request("POST", "/v1/chat/completions", follow)
            return
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)  # leave during the continuation
        data = json.dumps(follow).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        time.sleep(rng.random() * 0.3)
        sock.close()

    def test_a_hundred_abandoned_conversations_leave_no_process(self):
        def respond(body):  # a tool call first, the answer once a result came back
            last = body.get("messages", [{}])[-1].get("content")
            if isinstance(last, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in last):
                return Reply(text="It is cold in Oslo today.", deltas=8, pace_s=0.02)
            return Reply(text="Let me check.", deltas=4, pace_s=0.02, tool_uses=[use("get_weather", city="Oslo")])
        self.upstream.responder = respond
        rng = random.Random(13)
        threads = []
        for number in range(100):
            thread = threading.Thread(target=self.one, args=(random.Random(rng.random()), number))
            thread.start()
            threads.append(thread)
            if len(threads) % 4 == 0:
                for t in threads[-4:]:
                    t.join(120)
        for thread in threads:
            thread.join(120)
        runner = self.server.runner
        wait_until(lambda: runner.live() == [] and runner.leases_made == runner.leases_ended, timeout=60)
        self.assertGreater(runner.leases_made, 50)
        parks = self.server.parks.snapshot()
        self.assertEqual(parks["parked_now"], 0)
        self.assertGreater(parks["parked"], 30, parks)
        self.assertGreater(parks["resumed"], 10, parks)
        # one key's abandoned rounds end by expiry, or by its own newer rounds past its share of the parks
        self.assertGreater(parks["expired"] + parks["evicted"], 10, parks)
        leftovers = subprocess.run(["pgrep", "-f", self.claude], capture_output=True, text=True).stdout.split()
        self.assertEqual(leftovers, [], "no claude process outlives its conversation")


class ResponsesWithTheSdk(OpenAIClientTest):
    """openai-python's responses.create and responses.stream, with and without tools."""

    def test_create_and_stream(self):
        self.upstream.script(Reply(text="Hello from Responses.", deltas=3))
        response = self.client.responses.create(model="sonnet", input="hi")
        self.assertEqual((response.output_text, response.status), ("Hello from Responses.", "completed"))
        self.assertEqual(response.usage.input_tokens, 321)
        with self.client.responses.stream(model="sonnet", input="hi") as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()
        self.assertEqual(("".join(deltas), final.output_text), ("Hello from Responses.", "Hello from Responses."))

    def test_function_calls_create_and_stream_in_one_cli(self):
        def respond(body):
            last = [m for m in body.get("messages", []) if m.get("role") != "system"][-1].get("content")
            if "tool_result" in json.dumps(last):
                return Reply(text="Two files.")
            return Reply(text="", tool_uses=[use("get_weather", city="Oslo")])
        self.upstream.responder = respond
        tools = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
                  "parameters": t["function"]["parameters"]} for t in TOOLS]
        first = self.client.responses.create(model="sonnet", input="Weather?", tools=tools)
        call = [item for item in first.output if item.type == "function_call"][0]
        self.assertEqual((call.name, json.loads(call.arguments)), ("get_weather", {"city": "Oslo"}))
        follow = [{"role": "user", "content": "Weather?"}, call.model_dump(exclude_none=True),
                  {"type": "function_call_output", "call_id": call.call_id, "output": "cold"}]
        with self.client.responses.stream(model="sonnet", input=follow, tools=tools) as stream:
            for _ in stream:
                pass
            final = stream.get_final_response()
        self.assertEqual(final.output_text, "Two files.")
        self.assertEqual(self.server.runner.leases_made, 1)
