"""POST /v1/responses (OpenAI's Responses API, AGENTS-SPEC §2) on the turn layer, with the fake CLI."""

import json

from helpers import ServerTest, directive, named_events

SHELL = {"type": "function", "name": "shell", "description": "Run a command",
         "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}}}}


class Responses(ServerTest):
    def respond(self, body):
        return self.request("POST", "/v1/responses", dict({"model": "claude-sonnet-5-5"}, **body))

    def events(self, text):
        return named_events(text)

    def test_a_string_input_and_instructions(self):
        status, _, body = self.respond({"input": "hi", "instructions": "Be brief.", "store": False,
                                        "prompt_cache_key": "k", "include": []})
        self.assertEqual(status, 200, body)
        self.assertEqual((body["object"], body["status"]), ("response", "completed"))
        message = body["output"][0]
        self.assertEqual((message["type"], message["content"][0]["text"]), ("message", "Echo: hi"))
        self.assertEqual(body["usage"]["input_tokens"], 4408)
        self.assertIn("Be brief.", self.runs()[0]["system_prompt"])

    def test_the_stream_has_every_event_codex_and_the_sdks_need(self):
        status, _, text = self.respond({"stream": True, "input": [
            {"role": "developer", "content": "dev rule"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x " + directive(text="Hello", deltas=2)}]}]})
        events = self.events(text)
        self.assertEqual([name for name, _ in events], [
            "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
            "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
            "response.content_part.done", "response.output_item.done", "response.completed"])
        self.assertEqual([d["sequence_number"] for _, d in events], list(range(len(events))))
        self.assertEqual(events[-1][1]["response"]["output"][0]["content"][0]["text"], "Hello")
        self.assertIn("dev rule", self.runs()[0]["system_prompt"])

    def test_a_function_call_round_continues_the_parked_cli(self):
        first = [{"role": "user", "content": "list " + directive(calls=[[{"name": "shell", "arguments": {"command": ["ls"]}}]])}]
        status, _, text = self.respond({"stream": True, "tools": [SHELL, {"type": "web_search"}], "input": first})
        events = self.events(text)
        done = [d["item"] for n, d in events if n == "response.output_item.done"]
        self.assertEqual(done[-1]["type"], "function_call")
        self.assertEqual((done[-1]["name"], json.loads(done[-1]["arguments"])), ("shell", {"command": ["ls"]}))
        self.assertEqual(events[-1][0], "response.completed")
        call = done[-1]
        follow = first + [{"type": "function_call", "id": call["id"], "call_id": call["call_id"], "name": "shell",
                           "arguments": call["arguments"]},
                          {"type": "function_call_output", "call_id": call["call_id"], "output": "a.txt b.txt"}]
        status, _, body = self.respond({"tools": [SHELL], "input": follow})
        self.assertEqual(status, 200, body)
        self.assertEqual(body["output"][-1]["content"][0]["text"], "Done: a.txt b.txt")
        self.assertEqual(len(self.runs()), 1)

    def test_no_stored_responses_and_clear_errors(self):
        status, _, body = self.respond({"input": "x", "previous_response_id": "resp_1"})
        self.assertEqual((status, body["error"]["code"]), (400, "previous_response_not_found"))
        status, _, body = self.respond({"input": []})
        self.assertEqual(status, 400)
        status, _, text = self.respond({"stream": True, "input": "x " + directive(slow_start_ms=0, error="plan_limit")})
        self.assertEqual(status, 429, text)

    def test_an_error_after_the_stream_started_is_response_failed(self):
        self.server.config = __import__("ocp").dataclasses.replace(self.server.config, heartbeat_ms=100)
        self.server.runner.apply(self.server.config)
        status, _, text = self.respond({"stream": True, "input": "x " + directive(slow_start_ms=300, error="overloaded")})
        events = self.events(text)
        self.assertIn("response.in_progress", [n for n, _ in events[2:]], "in_progress is the heartbeat")
        self.assertEqual(events[-1][0], "response.failed")
        self.assertEqual(events[-1][1]["response"]["error"]["code"], "server_error")


class CodexPlanHeaders(ServerTest):
    env = {"CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-test"}

    def test_codex_sees_the_claude_plans_use(self):
        self.server.wall = lambda: 1795503600 - 3600  # an hour before the fake CLI's windows reset
        self.request("POST", "/v1/responses", {"model": "sonnet", "input": "one"})
        status, headers, _ = self.request("POST", "/v1/responses", {"model": "sonnet", "input": "two"})
        self.assertEqual(status, 200)
        self.assertEqual((headers["x-codex-primary-used-percent"], headers["x-codex-primary-window-minutes"]), ("12", "300"))
        self.assertEqual((headers["x-codex-secondary-used-percent"], headers["x-codex-secondary-window-minutes"]),
                         ("45", "10080"))


class NoPlanHeaders(ServerTest):
    env = {"CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-test", "OCP_PLAN_HEADERS": "0"}

    def test_the_operator_can_turn_them_off(self):
        self.request("POST", "/v1/responses", {"model": "sonnet", "input": "one"})
        _, headers, _ = self.request("POST", "/v1/responses", {"model": "sonnet", "input": "two"})
        self.assertNotIn("x-codex-primary-used-percent", headers)
