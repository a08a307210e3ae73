"""POST /v1/messages (Anthropic's Messages API, AGENTS-SPEC §3) on the turn layer, with the fake CLI."""

import json
import ocp

from helpers import ServerTest, directive, named_events

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
HEADERS = {"anthropic-version": "2023-06-01", "content-type": "application/json"}


class MessagesTest(ServerTest):
    def messages(self, body, headers=None, path="/v1/messages?beta=true"):
        body = dict({"model": "claude-sonnet-5-5", "max_tokens": 1024}, **body)
        return self.request("POST", path, body, headers=dict(HEADERS, **(headers or {})))

    def events(self, text):
        return named_events(text)


class Messages(MessagesTest):
    def test_a_plain_answer(self):
        status, headers, body = self.messages({"system": [{"type": "text", "text": "x-anthropic-billing-header: cc=1"},
                                                          {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
                                               "messages": [{"role": "user", "content": "hi"}],
                                               "metadata": {"user_id": "u"}, "temperature": 0.5, "context_management": {}})
        self.assertEqual(status, 200, body)
        self.assertTrue(headers["request-id"].startswith("req_"))
        self.assertEqual((body["type"], body["role"], body["stop_reason"]), ("message", "assistant", "end_turn"))
        self.assertEqual(body["content"], [{"type": "text", "text": "Echo: hi"}])
        self.assertEqual(body["usage"]["input_tokens"], 4408)
        self.assertIn("Be brief.", self.runs()[0]["system_prompt"])
        self.assertNotIn("billing-header", self.runs()[0]["system_prompt"])

    def test_the_stream_is_anthropics_event_sequence(self):
        status, headers, text = self.messages({"stream": True, "messages": [
            {"role": "user", "content": "x " + directive(text="Hello there", deltas=2)}]})
        self.assertEqual(status, 200)
        events = self.events(text)
        self.assertEqual([name for name, _ in events], [
            "message_start", "content_block_start", "content_block_delta", "content_block_delta",
            "content_block_stop", "message_delta", "message_stop"])
        self.assertTrue(all(name == data["type"] for name, data in events))
        self.assertEqual("".join(d["delta"]["text"] for n, d in events if n == "content_block_delta"), "Hello there")
        self.assertEqual(events[-2][1]["delta"], {"stop_reason": "end_turn", "stop_sequence": None})

    def test_thinking_only_when_asked(self):
        body = {"messages": [{"role": "user", "content": "x " + directive(text="ok", thinking="hmm")}]}
        _, _, plain = self.messages(body)
        self.assertEqual([b["type"] for b in plain["content"]], ["text"])
        _, _, thought = self.messages(dict(body, thinking={"type": "enabled", "budget_tokens": 2000}))
        self.assertEqual([b["type"] for b in thought["content"]], ["thinking", "text"])

    def test_a_stop_sequence_is_named(self):
        _, _, body = self.messages({"stop_sequences": ["STOP"], "messages": [
            {"role": "user", "content": "x " + directive(text="one STOP two")}]})
        self.assertEqual((body["stop_reason"], body["stop_sequence"], body["content"][0]["text"]),
                         ("stop_sequence", "STOP", "one "))

    def test_a_tool_round_parks_and_the_tool_result_continues_the_same_cli(self):
        first = [{"role": "user", "content": "w " + directive(calls=[[{"name": "get_weather", "arguments": {"city": "Oslo"}}]])}]
        status, _, text = self.messages({"stream": True, "tools": [WEATHER, {"type": "web_search_20250305", "name": "web_search"}],
                                         "messages": first})
        events = self.events(text)
        start = [d for n, d in events if n == "content_block_start"][0]
        self.assertEqual(start["content_block"]["type"], "tool_use")
        self.assertEqual(start["content_block"]["name"], "get_weather")
        arguments = "".join(d["delta"]["partial_json"] for n, d in events if n == "content_block_delta")
        self.assertEqual(json.loads(arguments), {"city": "Oslo"})
        self.assertEqual(events[-2][1]["delta"]["stop_reason"], "tool_use")
        tool_id = start["content_block"]["id"]
        follow = first + [{"role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": "get_weather",
                                                             "input": {"city": "Oslo"}}]},
                          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": "cold"},
                                                       {"type": "text", "text": "<system-reminder>x</system-reminder>"}]}]
        status, _, body = self.messages({"tools": [WEATHER], "messages": follow})
        self.assertEqual(status, 200, body)
        self.assertEqual(body["content"][0]["text"], "Done: cold\n<system-reminder>x</system-reminder>")
        self.assertEqual(len(self.runs()), 1, "the parked CLI continued")

    def test_errors_are_anthropic_shaped(self):
        cases = [({"messages": "nope"}, 400, "invalid_request_error"),
                 ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "not_found_error"),
                 ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400, "invalid_request_error"),
                 ({"tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error"),
                 ({"messages": [{"role": "user", "content": "x " + directive(error="overloaded")}]}, 502, "api_error")]
        for body, status, kind in cases:
            with self.subTest(kind=kind, status=status):
                got, headers, answer = self.messages(body)
                self.assertEqual((got, answer["type"], answer["error"]["type"]), (status, "error", kind), answer)
                self.assertEqual(answer["request_id"], headers["request-id"])

    def test_count_tokens_hello_and_models(self):
        status, _, body = self.messages({"messages": [{"role": "user", "content": "a" * 300}]},
                                        path="/v1/messages/count_tokens")
        self.assertEqual(status, 200)
        self.assertGreaterEqual(body["input_tokens"], 100)
        self.assertEqual(self.runs(), [], "no CLI run for a count")
        status, _, _ = self.request("HEAD", "/api/hello")
        self.assertEqual(status, 200)
        status, _, body = self.request("GET", "/v1/models", headers={"anthropic-version": "2023-06-01"})
        self.assertEqual((body["data"][0]["type"], body["has_more"]), ("model", False))
        self.assertEqual(body["first_id"], body["data"][0]["id"])


class MessagesWithKeys(MessagesTest):
    env = {"CLAUDE_AUTH_MODE": "multi"}

    def test_a_bad_key_is_401_never_403(self):
        for headers in ({}, {"x-api-key": "ocp_nope"}, {"Authorization": "Bearer sk-ant-oat01-abc"}):
            status, _, body = self.messages({"messages": [{"role": "user", "content": "x"}]}, headers)
            self.assertEqual((status, body["error"]["type"]), (401, "authentication_error"))

    def test_x_api_key_works_and_a_model_outside_the_allowlist_is_404(self):
        import time
        _, secret = self.server.store.add_key("ann", ocp.KeyPolicy(models=("claude-haiku-5-5",)), time.time())
        status, _, body = self.messages({"messages": [{"role": "user", "content": "x"}]}, {"x-api-key": secret})
        self.assertEqual((status, body["error"]["type"]), (404, "not_found_error"))
        status, _, body = self.messages({"model": "claude-haiku-5-5", "messages": [{"role": "user", "content": "x"}]},
                                        {"x-api-key": secret})
        self.assertEqual(status, 200, body)


class PlanHeaders(MessagesTest):
    env = {"CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-test"}  # subscription mode: the CLI reports the plan

    def test_the_plans_windows_come_back_as_anthropics_unified_headers(self):
        self.server.wall = lambda: 1795503600 - 3600  # an hour before the fake CLI's windows reset
        self.messages({"messages": [{"role": "user", "content": "one"}]})  # the CLI reports the windows
        status, headers, _ = self.messages({"messages": [{"role": "user", "content": "two"}]})
        self.assertEqual(status, 200)
        self.assertEqual(headers["anthropic-ratelimit-unified-5h-utilization"], "0.12")
        self.assertEqual(headers["anthropic-ratelimit-unified-7d-utilization"], "0.45")
        self.assertEqual(headers["anthropic-ratelimit-unified-representative-claim"], "five_hour")
        self.assertEqual(headers["anthropic-ratelimit-unified-status"], "allowed")

    def test_the_plan_limit_is_a_429_with_retry_after_and_no_retry(self):
        self.server.wall = lambda: 1795500000.0  # an hour before the fake CLI's 5-hour reset
        status, headers, body = self.messages({"messages": [{"role": "user", "content": "x " + directive(error="plan_limit")}]})
        self.assertEqual((status, body["error"]["type"]), (429, "rate_limit_error"))
        self.assertEqual(headers["x-should-retry"], "false")
        self.assertGreater(int(headers["retry-after"]), 60)
        status, headers, body = self.messages({"messages": [{"role": "user", "content": "again"}]})
        self.assertEqual((status, headers["anthropic-ratelimit-unified-status"]), (429, "rejected"))


class ToolResultsWithImagesAndErrors(MessagesTest):
    PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="

    def test_an_image_and_an_error_flag_reach_the_cli_as_mcp_content(self):
        first = [{"role": "user", "content": "shot " + directive(calls=[[{"name": "get_weather", "arguments": {}}]])}]
        _, _, body = self.messages({"tools": [WEATHER], "messages": first})
        use = body["content"][0]
        follow = first + [{"role": "assistant", "content": [use]},
                          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "is_error": True,
                                                        "content": [{"type": "text", "text": "partly"},
                                                                    {"type": "image", "source": {
                                                                        "type": "base64", "media_type": "image/png",
                                                                        "data": self.PNG}}]}]}]
        status, _, body = self.messages({"tools": [WEATHER], "messages": follow})
        self.assertEqual(status, 200, body)
        self.assertEqual(body["content"][0]["text"], "Done: partly [image]")
        sent = [r for r in self.runs()[0]["control_responses"]
                if "tools/call" not in json.dumps(r) and '"isError"' in json.dumps(r)]
        result = sent[0]["response"]["response"]["mcp_response"]["result"]
        self.assertEqual(result["content"][1], {"type": "image", "data": self.PNG, "mimeType": "image/png"})
        self.assertTrue(result["isError"])

    def test_ocps_own_broken_login_is_a_503_not_to_retry(self):
        status, headers, body = self.messages({"messages": [{"role": "user", "content": "x " + directive(error="auth")}]})
        self.assertEqual((status, body["error"]["type"], headers["x-should-retry"]), (503, "api_error", "false"))
        self.assertIn("claude setup-token", body["error"]["message"])
