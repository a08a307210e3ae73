"""Client tool calling (AGENTS-SPEC §1): the client's tools served to the CLI over its own pipes,
tool rounds answered as OpenAI tool_calls, the CLI parked until the results come back."""

import contextlib
import dataclasses
import json
import time
import types
import unittest

import ocp
from helpers import ServerTest, directive, pid_alive, wait_until

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def call(name, **arguments):
    return {"name": name, "arguments": arguments}


class ToolTest(ServerTest):
    def ask(self, rounds, final=None, tools=(WEATHER, TIME), **params):
        steer = {"calls": rounds}
        if final is not None:
            steer["final"] = final
        messages = [{"role": "user", "content": "weather? " + directive(**steer)}]
        return messages, self.chat(messages=messages, tools=list(tools), **params)

    def follow_up(self, messages, reply, results, tools=(WEATHER, TIME), **params):
        """Send the tool results for `reply`'s calls; return (messages, response)."""
        message = reply["choices"][0]["message"]
        messages = messages + [{"role": "assistant", "content": message["content"],
                                "tool_calls": message["tool_calls"]}]
        messages += [{"role": "tool", "tool_call_id": c["id"], "content": results[i]}
                     for i, c in enumerate(message["tool_calls"])]
        return messages, self.chat(messages=messages, tools=list(tools), **params)

    def parked(self):
        return [s for s in self.server.runner.live() if s["parked"]]


class ToolRounds(ToolTest):
    def test_a_tool_round_then_the_answer_in_one_cli_process(self):
        messages, (status, _, body) = self.ask([[call("get_weather", city="Paris")]])
        self.assertEqual(status, 200)
        choice = body["choices"][0]
        self.assertEqual(choice["finish_reason"], "tool_calls")
        self.assertIsNone(choice["message"]["content"])
        (tool_call,) = choice["message"]["tool_calls"]
        self.assertEqual((tool_call["type"], tool_call["function"]), ("function", {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}))
        self.assertTrue(tool_call["id"].startswith("toolu_"))
        self.assertEqual(len(self.parked()), 1)
        self.assertEqual(self.server.runner.slots.snapshot()["running"], 0, "a parked CLI holds no slot")
        _, (status, _, body) = self.follow_up(messages, body, ["Sunny, 21C"])
        self.assertEqual(status, 200)
        self.assertEqual(body["choices"][0]["message"]["content"], "Done: Sunny, 21C")
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")
        runs = self.runs()
        self.assertEqual(len(runs), 1, "the parked CLI continued: no second spawn")
        argv = runs[0]["argv"]
        self.assertEqual(argv[argv.index("--tools") + 1], "")
        self.assertIn("--strict-mcp-config", argv)
        self.assertEqual(argv[argv.index("--allowedTools") + 1], "mcp__ocp__*")
        self.assertEqual(runs[0]["env"]["MAX_MCP_OUTPUT_TOKENS"], "500000")
        wait_until(lambda: self.server.runner.live() == [])
        rows = self.server.store.usage_rows(None, None, 0, 2 ** 40, 10)
        self.assertEqual([r["status"] for r in rows], ["ok", "ok"], "each HTTP request is one usage row")

    def test_a_client_that_leaves_right_after_its_tool_calls_keeps_its_parked_cli(self):
        real_watch = self.server.hangups.watch

        @contextlib.contextmanager
        def watch(sock, on_hangup):  # the client hangs up the moment its answer is complete
            with real_watch(sock, on_hangup):
                yield
                on_hangup()
        self.server.hangups.watch = watch
        messages, (_, _, body) = self.ask([[call("get_weather", city="Paris")]])
        self.server.hangups.watch = real_watch
        _, (status, _, body) = self.follow_up(messages, body, ["Sunny"])
        self.assertEqual((status, body["choices"][0]["message"]["content"]), (200, "Done: Sunny"))
        self.assertEqual(len(self.runs()), 1, "the hang-up after the answer did not end the parked CLI")

    def test_three_rounds_streamed_in_one_process(self):
        rounds = [[call("get_weather", city="Oslo")], [call("get_time")], [call("get_weather", city="Rome")]]
        messages = [{"role": "user", "content": "plan " + directive(calls=rounds)}]
        results = ["rain", "noon", "sun"]
        for number in range(3):
            status, _, events = self.stream(messages=messages, tools=[WEATHER, TIME])
            self.assertEqual(status, 200)
            chunks = [e for _, e in events if isinstance(e, dict)]
            self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "tool_calls")
            deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
            first = [d["tool_calls"][0] for d in deltas if "tool_calls" in d][0]
            self.assertEqual((first["index"], first["type"]), (0, "function"))
            arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d)
            json.loads(arguments)
            messages = messages + [{"role": "assistant", "content": None, "tool_calls": [
                {"id": first["id"], "type": "function", "function": {"name": first["function"]["name"],
                                                                     "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": first["id"], "content": results[number]}]
        status, _, events = self.stream(messages=messages, tools=[WEATHER, TIME])
        text = "".join(e["choices"][0]["delta"].get("content") or "" for _, e in events
                       if isinstance(e, dict) and e["choices"])
        self.assertEqual(text, "Done: rain | noon | sun")
        self.assertEqual(len(self.runs()), 1)

    def test_two_parallel_calls_reach_the_client_in_one_response(self):
        messages, (_, _, body) = self.ask([[call("get_weather", city="Paris"), call("get_weather", city="Lima")]])
        calls = body["choices"][0]["message"]["tool_calls"]
        self.assertEqual([json.loads(c["function"]["arguments"])["city"] for c in calls], ["Paris", "Lima"])
        _, (_, _, body) = self.follow_up(messages, body, ["warm", "cold"])
        self.assertEqual(body["choices"][0]["message"]["content"], "Done: warm | cold")

    def test_streamed_parallel_calls_have_index_0_and_1(self):
        messages = [{"role": "user", "content": directive(calls=[[call("get_weather", city="A"), call("get_time")]])}]
        _, _, events = self.stream(messages=messages, tools=[WEATHER, TIME])
        starts = [e["choices"][0]["delta"]["tool_calls"][0] for _, e in events if isinstance(e, dict)
                  and e["choices"] and "id" in (e["choices"][0]["delta"].get("tool_calls") or [{}])[0]]
        self.assertEqual([(s["index"], s["function"]["name"]) for s in starts], [(0, "get_weather"), (1, "get_time")])
        no_input = [e["choices"][0]["delta"]["tool_calls"][0] for _, e in events if isinstance(e, dict)
                    and e["choices"] and (e["choices"][0]["delta"].get("tool_calls") or [{}])[0].get("index") == 1]
        self.assertEqual("".join(d["function"]["arguments"] for d in no_input), "{}", "no input is {}")

    def test_parallel_tool_calls_false_delivers_one_and_tells_the_model_why(self):
        messages, (_, _, body) = self.ask([[call("get_weather", city="A"), call("get_time")]],
                                          parallel_tool_calls=False)
        self.assertEqual(len(body["choices"][0]["message"]["tool_calls"]), 1)
        self.assertIn("Call at most one tool per message.", self.runs()[0]["system_prompt"])
        _, (_, _, body) = self.follow_up(messages, body, ["warm"], parallel_tool_calls=False)
        self.assertEqual(body["choices"][0]["message"]["content"], "Done: warm | Not run: one tool call at a time.")

    def test_a_long_result_is_cut_with_a_marker(self):
        messages, (_, _, body) = self.ask([[call("get_time")]])
        _, (_, _, body) = self.follow_up(messages, body, ["x" * 150_000])
        text = body["choices"][0]["message"]["content"]
        self.assertTrue(text.endswith("\n[OCP: result cut from 150000 to 100000 characters]"), text[-80:])
        self.assertEqual(len(text), len("Done: ") + 100_000 + len("\n[OCP: result cut from 150000 to 100000 characters]"))


class ToolFallback(ToolTest):
    env = {"OCP_TOOL_PARK_TTL": "300"}

    def test_after_the_ttl_the_parked_cli_is_gone_and_the_history_goes_as_text(self):
        messages, (_, _, body) = self.ask([[call("get_weather", city="Paris")]])
        pid = self.runs()[0]["pid"]
        wait_until(lambda: not pid_alive(pid), timeout=5)
        self.assertEqual(self.server.runner.live(), [])
        with self.assertLogs("ocp", "INFO") as logs:
            _, (status, _, body) = self.follow_up(messages, body, ["Sunny"])
        self.assertEqual(status, 200)
        self.assertEqual(body["choices"][0]["message"]["content"], "Done after 1 round(s), from the history")
        self.assertIn("the history goes as text", "\n".join(logs.output))
        second = self.runs()[1]
        self.assertIn(ocp.FALLBACK_SENTENCE, second["system_prompt"])
        rendered = "\n".join(b.get("text", "") for b in second["stdin_blocks"])
        self.assertIn("[tool call ", rendered)
        self.assertIn("Sunny", rendered)
        counters = self.server.parks.snapshot()
        self.assertEqual((counters["expired"], counters["fallback"]), (1, 1))

    def test_a_changed_history_ends_the_parked_cli_and_falls_back(self):
        messages, (_, _, body) = self.ask([[call("get_weather", city="Paris")]])
        pid = self.runs()[0]["pid"]
        messages[0] = {"role": "user", "content": "edited " + messages[0]["content"]}
        _, (status, _, _) = self.follow_up(messages, body, ["Sunny"])
        self.assertEqual(status, 200)
        self.assertFalse(pid_alive(pid))
        self.assertEqual(len(self.runs()), 2)

    def test_a_client_that_never_returns_leaves_no_process(self):
        for _ in range(3):
            self.ask([[call("get_weather", city="Paris")]])
        self.assertEqual(len(self.parked()), 3)
        wait_until(lambda: self.server.runner.live() == [], timeout=5)
        runner = self.server.runner
        wait_until(lambda: runner.leases_made == runner.leases_ended)
        self.assertFalse([r for r in self.runs() if pid_alive(r["pid"])])


class ToolParkCap(ToolTest):
    env = {"OCP_TOOL_PARK_MAX": "1"}

    def test_past_the_cap_the_oldest_parked_cli_goes(self):
        self.ask([[call("get_weather", city="A")]])
        first = self.runs()[0]["pid"]
        self.ask([[call("get_weather", city="B")]])
        wait_until(lambda: not pid_alive(first))
        self.assertEqual(len(self.parked()), 1)
        self.assertEqual(self.server.parks.snapshot()["evicted"], 1)


class ToolRequestsChecked(ToolTest):
    env = {"OCP_ADMIN_KEY": "ocp_admin_key_for_the_tools_tests_0"}
    def test_bad_tools_are_400_naming_the_tool(self):
        cases = [([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
                 ([WEATHER, WEATHER], "tools[1].function.name"),
                 ([{"type": "function", "function": {"name": "x", "parameters": "nope"}}], "tools[0].function.parameters"),
                 (["nope"], "tools[0]")]
        for tools, param in cases:
            with self.subTest(param):
                status, _, body = self.chat("x", tools=tools)
                self.assertEqual((status, body["error"]["param"]), (400, param))

    def test_forcing_a_call_is_a_clear_400(self):
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            status, _, body = self.chat("x", tools=[WEATHER], tool_choice=choice)
            self.assertEqual((status, body["error"]["code"]), (400, "unsupported_parameter"))

    def test_tool_choice_none_spawns_without_the_tool_server(self):
        status, _, body = self.chat("hi", tools=[WEATHER], tool_choice="none")
        self.assertEqual((status, body["choices"][0]["message"]["content"]), (200, "Echo: hi"))
        self.assertNotIn("--mcp-config", self.runs()[0]["argv"])

    def test_a_tool_server_that_failed_is_a_502_not_a_tool_less_answer(self):
        status, _, body = self.chat("x " + directive(mcp_fail=True), tools=[WEATHER])
        self.assertEqual((status, body["error"]["code"]), (502, "tool_server_failed"))

    def test_other_tool_kinds_are_dropped(self):
        status, _, body = self.chat("hi", tools=[{"type": "web_search"}])
        self.assertEqual(status, 200)
        self.assertNotIn("--mcp-config", self.runs()[0]["argv"])

    def test_metrics_count_tool_rounds(self):
        messages, (_, _, body) = self.ask([[call("get_time")]])
        self.follow_up(messages, body, ["noon"])
        status, _, text = self.request("GET", "/metrics", headers={"Authorization": "Bearer ocp_admin_key_for_the_tools_tests_0"})
        self.assertIn('ocp_tool_rounds_total{event="parked"} 1', text)
        self.assertIn('ocp_tool_rounds_total{event="resumed"} 1', text)
        self.assertIn("ocp_tools_parked 0", text)


class ToolsOff(ToolTest):
    env = {"OCP_CLIENT_TOOLS": "0"}

    def test_the_kill_switch_restores_text_only_and_says_so(self):
        status, headers, body = self.chat("hi", tools=[WEATHER])
        self.assertEqual((status, headers["x-ocp-tools-ignored"]), (200, "true"))
        self.assertEqual(body["choices"][0]["message"]["content"], "Echo: hi")
        self.assertNotIn("--mcp-config", self.runs()[0]["argv"])


class ToolOwners(ToolTest):
    env = {"CLAUDE_AUTH_MODE": "multi", "CLAUDE_CACHE_TTL": "60000"}

    def keyed(self, secret, messages):
        return self.request("POST", "/v1/chat/completions", {"model": "sonnet", "messages": messages,
                                                              "tools": [WEATHER]},
                            headers={"Authorization": f"Bearer {secret}"})

    def test_a_parked_cli_answers_only_its_own_key(self):
        _, anna = self.server.store.add_key("anna", ocp.KeyPolicy(), time.time())
        _, ben = self.server.store.add_key("ben", ocp.KeyPolicy(), time.time())
        messages = [{"role": "user", "content": "w " + directive(calls=[[call("get_weather", city="Oslo")]])}]
        _, _, body = self.keyed(anna, messages)
        message = body["choices"][0]["message"]
        follow = messages + [{"role": "assistant", "content": None, "tool_calls": message["tool_calls"]},
                             {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "cold"}]
        status, _, body = self.keyed(ben, follow)  # the ids are not secrets: ben gets a fresh CLI
        self.assertEqual(status, 200)
        self.assertEqual(len(self.runs()), 2)
        self.assertEqual(len(self.parked()), 1, "anna's parked CLI is untouched")
        status, _, body = self.keyed(anna, follow)
        self.assertEqual(body["choices"][0]["message"]["content"], "Done: cold")
        self.assertEqual(len(self.runs()), 2, "anna's follow-up continued her own CLI")

    def test_tool_requests_are_never_cached(self):
        _, anna = self.server.store.add_key("anna", ocp.KeyPolicy(), time.time())
        messages = [{"role": "user", "content": "hi"}]
        for _ in range(2):
            status, headers, _ = self.keyed(anna, messages)
            self.assertEqual(status, 200)
            self.assertNotIn("x-ocp-cache", headers)
        self.assertEqual(len(self.runs()), 2)


class LegacyFunctions(ToolTest):
    FUNCTIONS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]

    def test_functions_get_a_function_call_and_the_result_goes_back_as_text(self):
        messages = [{"role": "user", "content": "w " + directive(calls=[[call("get_weather", city="Oslo")]])}]
        status, _, body = self.chat(messages=messages, functions=self.FUNCTIONS)
        self.assertEqual(status, 200)
        choice = body["choices"][0]
        self.assertEqual(choice["finish_reason"], "function_call")
        self.assertEqual(choice["message"]["function_call"], {"name": "get_weather", "arguments": '{"city": "Oslo"}'})
        self.assertNotIn("tool_calls", choice["message"])
        wait_until(lambda: self.server.runner.live() == [])  # no ids to continue it by: not parked
        messages += [{"role": "assistant", "content": None, "function_call": choice["message"]["function_call"]},
                     {"role": "function", "name": "get_weather", "content": "cold"}]
        status, _, body = self.chat(messages=messages, functions=self.FUNCTIONS)
        self.assertEqual(body["choices"][0]["message"]["content"], "Done after 1 round(s), from the history")
        rendered = "\n".join(b.get("text", "") for b in self.runs()[1]["stdin_blocks"])
        self.assertIn("get_weather", rendered)
        self.assertIn("cold", rendered)

    def test_streamed_function_call_deltas(self):
        messages = [{"role": "user", "content": "w " + directive(calls=[[call("get_weather", city="Oslo")]])}]
        _, _, events = self.stream(messages=messages, functions=self.FUNCTIONS)
        chunks = [e for _, e in events if isinstance(e, dict) and e["choices"]]
        deltas = [c["choices"][0]["delta"]["function_call"] for c in chunks if "function_call" in c["choices"][0]["delta"]]
        self.assertEqual(deltas[0], {"name": "get_weather", "arguments": ""})
        self.assertEqual("".join(d["arguments"] for d in deltas), '{"city": "Oslo"}')
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "function_call")

    def test_forcing_a_function_is_a_clear_400(self):
        status, _, body = self.chat("x", functions=self.FUNCTIONS, function_call={"name": "get_weather"})
        self.assertEqual((status, body["error"]["code"]), (400, "unsupported_parameter"))


class ToolsWithOperatorTools(ToolTest):
    env = {"CLAUDE_ALLOWED_TOOLS": "Read,Bash"}

    def test_a_tool_spawn_never_gets_the_operators_cli_tools(self):
        self.ask([[call("get_time")]])
        argv = self.runs()[0]["argv"]
        self.assertEqual(argv[argv.index("--tools") + 1], "", "nothing a client asks for runs on OCP's machine")
        self.chat("plain question")
        argv = self.runs()[1]["argv"]
        self.assertEqual(argv[argv.index("--tools") + 1], "Read,Bash", "plain requests keep the operator's choice")


class ToolsWithStructuredOutput(ToolTest):
    """tools + response_format: a round of tool calls is the answer (no JSON to check); the JSON
    is checked once the model answers, and nothing of it ever keeps a CLI slot."""

    env = {"CLAUDE_MAX_CONCURRENT": "2"}
    JSON = {"type": "json_object"}

    def test_a_fresh_request_gets_its_tool_calls(self):
        _, (status, _, body) = self.ask([[call("get_weather", city="Paris")]], final='{"ok": true}',
                                        response_format=self.JSON)
        self.assertEqual(status, 200)
        self.assertEqual(body["choices"][0]["finish_reason"], "tool_calls")
        (tool_call,) = body["choices"][0]["message"]["tool_calls"]
        self.assertEqual(len(self.parked()), 1, "the client holds the parked CLI's call ids")

    def test_the_follow_up_answers_json_from_the_parked_cli(self):
        messages, (_, _, body) = self.ask([[call("get_weather", city="Paris")]], final='{"ok": true}',
                                          response_format=self.JSON)
        _, (status, _, body) = self.follow_up(messages, body, ["Sunny"], response_format=self.JSON)
        self.assertEqual((status, json.loads(body["choices"][0]["message"]["content"])), (200, {"ok": True}))
        self.assertEqual(len(self.runs()), 1)

    def test_a_follow_up_whose_json_is_retried_leaks_no_slot(self):
        for number in range(3):  # more than the slots: one leak each would lock everyone out
            messages, (_, _, body) = self.ask([[call("get_weather", city=f"City {number}")]], final="not json",
                                              response_format=self.JSON)
            self.assertEqual(body["choices"][0]["finish_reason"], "tool_calls")
            _, (status, _, body) = self.follow_up(messages, body, ["Sunny"], response_format=self.JSON)
            self.assertEqual(status, 200, body)
            self.assertIn("did not produce the requested JSON", body["choices"][0]["message"]["refusal"])
        wait_until(lambda: self.server.runner.slots.snapshot()["running"] == 0)
        self.assertEqual(self.server.runner.slots.leaked(), 0)
        self.assertEqual(self.server.health()["status"], "ok")
        status, _, body = self.chat("still served")
        self.assertEqual((status, body["choices"][0]["message"]["content"]), (200, "Echo: still served"))

    def test_a_follow_up_asking_another_output_format_does_not_continue_the_round(self):
        messages, (_, _, body) = self.ask([[call("get_weather", city="Paris")]], final='{"ok": true}')
        _, (status, _, body) = self.follow_up(messages, body, ["Sunny"], response_format=self.JSON)
        self.assertEqual(status, 200)
        self.assertEqual(len(self.runs()), 2, "a new CLI with the whole history, not the parked one")
        self.assertEqual(self.server.parks.snapshot()["fallback"], 1)


class SharedParks(ToolTest):
    """Parked rounds are owned and bounded per key: one member's flood never ends the owner's
    round, a lower key never ends a higher key's, and an ended park's CLI is killed outright."""

    ADMIN = "ocp_admin_key_for_the_parks_tests_0"
    env = {"CLAUDE_AUTH_MODE": "multi", "OCP_ADMIN_KEY": ADMIN, "PROXY_ANONYMOUS_KEY": "ocp_guest_key_parks"}

    def setUp(self):
        super().setUp()
        self.keys = {name: self.server.store.add_key(name, ocp.KeyPolicy(), time.time())[1] for name in ("anna", "ben")}
        self.keys.update(owner=self.ADMIN, guest="ocp_guest_key_parks")

    def round_of(self, who, city):
        messages = [{"role": "user", "content": f"w {city} " + directive(calls=[[call("get_weather", city=city)]])}]
        status, _, body = self.request("POST", "/v1/chat/completions", {
            "model": "sonnet", "messages": messages, "tools": [WEATHER]},
            headers={"Authorization": f"Bearer {self.keys[who]}"})
        self.assertEqual(status, 200, body)
        pid = max(self.runs(), key=lambda r: r["started"])["pid"]
        return messages, body, pid

    def finish(self, who, messages, body, result="sunny"):
        message = body["choices"][0]["message"]
        messages = messages + [{"role": "assistant", "content": None, "tool_calls": message["tool_calls"]},
                               {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": result}]
        return self.request("POST", "/v1/chat/completions", {"model": "sonnet", "messages": messages,
                                                              "tools": [WEATHER]},
                            headers={"Authorization": f"Bearer {self.keys[who]}"})

    def test_one_keys_flood_leaves_the_owners_and_others_rounds_resumable(self):
        owner = self.round_of("owner", "Oslo")
        anna = self.round_of("anna", "Rome")
        for number in range(12):
            self.round_of("ben", f"City{number}")
        limit, per_key = ocp.park_limits(self.server.config)
        self.assertLessEqual(len(self.parked()), limit)
        self.assertEqual(sum(1 for p in self.server.parks._parks if p.owner != "admin"
                             and self.server.store.find_key(p.owner).name == "ben"), per_key)
        runs = len(self.runs())
        for who, (messages, body, pid) in (("owner", owner), ("anna", anna)):
            status, _, answer = self.finish(who, messages, body)
            self.assertEqual((status, answer["choices"][0]["message"]["content"]), (200, "Done: sunny"), who)
        self.assertEqual(len(self.runs()), runs, "both continued their own parked CLI: no new spawn")

    def test_a_lower_key_never_ends_a_higher_keys_round(self):
        self.server.config = dataclasses.replace(self.server.config, tool_park_max=2, tool_park_max_per_key=2)
        owner = self.round_of("owner", "Oslo")
        self.round_of("guest", "Lima")
        _, _, anna_pid = self.round_of("anna", "Rome")  # three for two places: the guest's (low) goes
        self.assertEqual(sorted(self.server.parks.snapshot().items())[-1], ("resumed", 0))
        keys = sorted(p.priority for p in self.server.parks._parks)
        self.assertEqual(keys, ["high", "normal"])
        _, _, guest_pid = self.round_of("guest", "Quito")  # a low key's newcomer goes itself
        wait_until(lambda: not pid_alive(guest_pid))
        self.assertEqual(sorted(p.priority for p in self.server.parks._parks), ["high", "normal"])
        status, _, answer = self.finish("owner", *owner[:2])
        self.assertEqual(answer["choices"][0]["message"]["content"], "Done: sunny")

    def test_an_ended_park_is_killed_outright_not_asked_to_stop(self):
        self.server.config = dataclasses.replace(self.server.config, tool_park_max=1)
        _, _, first = self.round_of("anna", "Oslo")
        self.round_of("ben", "Rome")
        wait_until(lambda: not pid_alive(first))
        (run,) = [r for r in self.runs() if r["pid"] == first]
        self.assertEqual(run["ended"], "running", "SIGKILL: it had no chance to answer its tool call as "
                                                  "interrupted and call the model again (it records a SIGTERM)")

    def test_a_round_the_next_request_leaves_behind_ends_at_once(self):
        messages, body, pid = self.round_of("anna", "Oslo")
        self.round_of("ben", "Rome")  # another key's round is not anna's to end
        message = body["choices"][0]["message"]
        interrupted = messages + [
            {"role": "assistant", "content": None, "tool_calls": message["tool_calls"]},
            {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "[Tool call interrupted]"},
            {"role": "assistant", "content": "Stopped."}, {"role": "user", "content": "never mind, hi"}]
        status, _, _ = self.request("POST", "/v1/chat/completions", {
            "model": "sonnet", "messages": interrupted, "tools": [WEATHER]},
            headers={"Authorization": f"Bearer {self.keys['anna']}"})
        self.assertEqual(status, 200)
        wait_until(lambda: not pid_alive(pid))
        self.assertEqual(self.server.parks.snapshot()["abandoned"], 1)
        self.assertEqual(len(self.parked()), 1, "ben's round stays")

    def test_parks_share_the_kept_clis_budget_and_one_always_stays(self):
        self.server.config = dataclasses.replace(self.server.config, pool_max_mb=1)
        self.server.runner.apply(self.server.config)
        self.round_of("anna", "Oslo")
        _, _, second = self.round_of("anna", "Rome")
        wait_until(lambda: len(self.parked()) == 1)
        self.assertEqual(self.parked()[0]["pid"], second)


class ParksToEnd(unittest.TestCase):
    """The pure rule of which parked rounds end."""

    def park(self, owner, priority, rss=100.0):
        return ocp.Park(owner, priority, types.SimpleNamespace(rss_mb=rss), None, (owner,), (), "", "", 0.0)

    def test_a_key_past_its_share_loses_its_own_oldest(self):
        mine = [self.park("ben", "normal") for _ in range(3)]
        other = self.park("anna", "normal")
        self.assertEqual(ocp.parks_to_end([mine[0], other, mine[1], mine[2]], mine[2], 10, 2, 1e9), [mine[0]])

    def test_over_the_cap_the_lowest_priority_then_the_key_with_most_goes(self):
        high, low = self.park("owner", "high"), self.park("guest", "low")
        a1, a2, b = self.park("anna", "normal"), self.park("anna", "normal"), self.park("ben", "normal")
        self.assertEqual(ocp.parks_to_end([high, low, a1, a2, b], b, 4, 4, 1e9), [low])
        self.assertEqual(ocp.parks_to_end([high, a1, a2, b], b, 3, 4, 1e9), [a1])

    def test_a_lower_newcomer_goes_itself(self):
        high, low = self.park("owner", "high"), self.park("guest", "low")
        self.assertEqual(ocp.parks_to_end([high, low], low, 1, 4, 1e9), [low])

    def test_the_memory_budget_keeps_at_least_one(self):
        parks = [self.park("anna", "normal"), self.park("ben", "normal")]
        self.assertEqual(ocp.parks_to_end(parks, parks[1], 10, 10, 150.0), [parks[0]])
        self.assertEqual(ocp.parks_to_end(parks[1:], parks[1], 10, 10, 50.0), [])


class PoolToEnd(unittest.TestCase):
    """The pure rule of which pooled CLIs end: a fair share per key, high keys kept over low."""

    def warm(self, account, priority="normal", rss=100.0):
        lease = types.SimpleNamespace(job=types.SimpleNamespace(account=account, priority=priority))
        return ocp.Warm(lease, "", 0.0, rss)

    def test_the_key_over_its_share_loses_its_own_least_recently_used(self):
        owner = self.warm("owner")
        flood = [self.warm("ben") for _ in range(4)]
        self.assertEqual(ocp.pool_to_end([owner] + flood, 400.0, 10), [flood[0]])

    def test_a_high_keys_clis_outlast_a_low_keys(self):
        high, low = self.warm("owner", "high"), self.warm("guest", "low")
        self.assertEqual(ocp.pool_to_end([high, low], 100.0, 10), [low])

    def test_the_count_bounds_them_whatever_their_size(self):
        tiny = [self.warm("anna", rss=1.0) for _ in range(5)]
        self.assertEqual(ocp.pool_to_end(tiny, 1e9, 3), tiny[:2])
