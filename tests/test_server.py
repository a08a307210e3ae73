"""The real server on port 0 driving tests/fake_claude.py: routes, chat, streaming, errors."""

import json
import os
import socket
import time
import unittest

import ocp
from helpers import ROOT, ServerTest, content_of, directive, wait_until

PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAE"
       "hQGAhKmMIQAAAABJRU5ErkJggg==")


class ModelRoutes(ServerTest):
    def test_list(self):
        status, _, body = self.request("GET", "/v1/models")
        self.assertEqual(status, 200)
        ids = [m["id"] for m in body["data"]]
        self.assertIn("claude-opus-5-5", ids)
        self.assertEqual(body["object"], "list")

    def test_routing_tolerates_prefix_query_and_slash(self):
        for path in ("/models", "/v1/models/", "/v1/models?x=1", "/models/?limit=2", "//v1//models"):
            with self.subTest(path):
                status, _, body = self.request("GET", path)
                self.assertEqual((status, body["object"]), (200, "list"))

    def test_retrieve_by_id_or_alias(self):
        for path in ("/v1/models/claude-sonnet-5-5", "/v1/models/sonnet", "/models/sonnet/?a=b"):
            with self.subTest(path):
                status, _, body = self.request("GET", path)
                self.assertEqual((status, body["id"]), (200, "claude-sonnet-5-5"))

    def test_created_is_stable(self):
        first = self.request("GET", "/v1/models/opus")[2]["created"]
        self.assertEqual(self.request("GET", "/v1/models/opus")[2]["created"], first)

    def test_the_node_originals_ids_work_as_they_are(self):
        listed = {m["id"] for m in self.request("GET", "/v1/models")[2]["data"]}
        for model in ("claude-opus-5", "claude-opus-4-8", "claude-opus-4-7", "claude-opus-4-6", "claude-sonnet-5",
                      "claude-sonnet-4-6", "claude-haiku-4-5-20251001", "claude-haiku-4-5", "claude-opus-4-1"):
            with self.subTest(model):
                status, _, body = self.chat("hi", model=model)
                self.assertEqual(status, 200, body)
                argv = self.runs()[-1]["argv"]
                resolved = ocp.Models.load(os.path.join(ROOT, "models.json")).find(model).id
                self.assertEqual(argv[argv.index("--model") + 1], resolved)
                self.assertIn(resolved, listed)
        status, _, body = self.chat("hi", model="claude-opus-4-8")
        argv = self.runs()[-1]["argv"]
        self.assertEqual((status, body["model"], argv[argv.index("--model") + 1]),
                         (200, "claude-opus-4-8", "claude-opus-4-8"))

    def test_unknown_model_is_404(self):
        status, _, body = self.request("GET", "/v1/models/gpt-5")
        self.assertEqual((status, body["error"]["code"]), (404, "model_not_found"))


class HealthRoute(ServerTest):
    def test_public_and_minimal(self):
        status, _, body = self.request("GET", "/health")
        self.assertEqual(status, 200)
        self.assertEqual(body, {"status": "ok", "version": ocp.__version__, "authMode": "none"})


class NonStreamingChat(ServerTest):
    def test_content_usage_and_finish_reason(self):
        status, headers, body = self.chat("hello there", model="opus")
        self.assertEqual(status, 200)
        self.assertTrue(body["id"].startswith("chatcmpl-"))
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(body["model"], "claude-opus-5-5")
        choice = body["choices"][0]
        self.assertEqual(choice["message"]["role"], "assistant")
        self.assertEqual(choice["message"]["content"], "Echo: hello there")
        self.assertEqual(choice["finish_reason"], "stop")
        self.assertEqual(body["usage"]["prompt_tokens"], 4408)
        self.assertGreater(body["usage"]["completion_tokens"], 0)
        self.assertTrue(headers["x-request-id"].startswith("req_"))

    def test_cached_tokens_reported(self):
        steer = directive(usage={"input": 10, "output": 7, "cache_read": 900, "cache_creation": 90})
        body = self.chat("x " + steer)[2]
        self.assertEqual(body["usage"], {"prompt_tokens": 1000, "completion_tokens": 7, "total_tokens": 1007,
                                         "prompt_tokens_details": {"cached_tokens": 900}})

    def test_reasoning_content(self):
        body = self.chat("x " + directive(thinking="Let me think.", text="Answer."))[2]
        message = body["choices"][0]["message"]
        self.assertEqual((message["reasoning_content"], message["content"]), ("Let me think.", "Answer."))

    def test_what_reaches_the_cli(self):
        self.chat(messages=[{"role": "system", "content": "Be a pirate."},
                            {"role": "user", "content": "hi"}],
                  model="haiku", reasoning_effort="high")
        run = self.runs()[-1]
        argv = run["argv"]
        self.assertEqual(argv[argv.index("--model") + 1], "claude-haiku-5-5")
        self.assertEqual(argv[argv.index("--tools") + 1], "")
        self.assertEqual(argv[argv.index("--effort") + 1], "high")
        self.assertEqual(run["system_prompt"], "Be a pirate.")
        self.assertIn("--no-session-persistence", argv)
        self.assertEqual(run["stdin_blocks"], [{"type": "text", "text": "hi"}])
        self.assertNotEqual(run["pid"], os.getpid())
        self.assertEqual(run["pgid"], run["pid"], "each child leads its own process group")

    def test_scratch_home_and_cleanup(self):
        self.chat("hi")
        run = self.runs()[-1]
        spawn = os.path.join(self.ocp_home, "spawn")
        self.assertEqual(run["env"]["HOME"], os.path.join(spawn, "home"))
        self.assertEqual(run["cwd"], os.path.join(spawn, "work"))
        self.assertTrue(run["env"]["TMPDIR"].startswith(os.path.join(spawn, "run-")))
        self.settle()
        self.assertFalse(os.path.exists(run["env"]["TMPDIR"]), "the run's scratch directory is removed")

    def test_a_large_system_prompt_goes_through_a_private_file(self):
        big = "rule. " * 20000
        self.chat(messages=[{"role": "system", "content": big}, {"role": "user", "content": "hi"}])
        run = self.runs()[-1]
        self.assertIn("--system-prompt-file", run["argv"])
        self.assertEqual(run["system_prompt"], big)
        self.assertNotIn("rule. rule.", " ".join(run["argv"]))

    def test_a_200kb_prompt_and_an_image_reach_the_cli(self):
        long_text = "word " * 40000
        status, _, body = self.chat(messages=[{"role": "user", "content": [
            {"type": "text", "text": long_text},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]}])
        self.assertEqual(status, 200)
        blocks = self.runs()[-1]["stdin_blocks"]
        self.assertEqual(blocks[0]["text"], long_text)
        self.assertEqual(blocks[1]["source"]["data"], PNG)

    def test_multi_turn_history_is_framed(self):
        self.chat(messages=[{"role": "user", "content": "first"},
                            {"role": "assistant", "content": "second"},
                            {"role": "user", "content": "third"}])
        blocks = self.runs()[-1]["stdin_blocks"]
        self.assertEqual(len(blocks), 3)
        self.assertIn('role="assistant">\nsecond\n', blocks[1]["text"])
        self.assertEqual(blocks[2], {"type": "text", "text": "third"})

    def test_stop_sequence_cuts_and_ends_the_turn(self):
        status, _, body = self.chat("x " + directive(text="one two STOP three"), stop=["STOP"])
        self.assertEqual(body["choices"][0]["message"]["content"], "one two ")
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")

    def test_max_tokens_gives_length(self):
        status, _, body = self.chat("x " + directive(text="a" * 400, deltas=40, pace_ms=20), max_tokens=10)
        self.assertEqual(status, 200)
        self.assertEqual(body["choices"][0]["finish_reason"], "length")
        self.assertEqual(body["choices"][0]["message"]["content"], "a" * 40)
        run = self.runs()[-1]
        self.assertEqual(run["env"]["CLAUDE_CODE_MAX_OUTPUT_TOKENS"], "10")
        wait_until(lambda: self.runs()[-1]["ended"] == "sigterm")  # OCP ended the turn itself

    def test_max_tokens_in_a_stream(self):
        _, _, events = self.stream("x " + directive(text="b" * 400, deltas=40), max_tokens=10)
        self.assertEqual(content_of(events), "b" * 40)
        finishing = [e["choices"][0]["finish_reason"] for _, e in events
                     if isinstance(e, dict) and e["choices"] and e["choices"][0]["finish_reason"]]
        self.assertEqual(finishing, ["length"])

    def test_json_object_is_validated(self):
        body = self.chat("x " + directive(text='```json\n{"a": 1}\n```'),
                         response_format={"type": "json_object"})[2]
        self.assertEqual(json.loads(body["choices"][0]["message"]["content"]), {"a": 1})
        self.assertEqual(len(self.runs()), 1)

    def test_json_schema_is_retried_once_with_the_error(self):
        schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
        body = self.chat("x " + directive(texts=['{"nom": "Ada"}', '{"name": "Ada"}']),
                         response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})[2]
        self.assertEqual(json.loads(body["choices"][0]["message"]["content"]), {"name": "Ada"})
        runs = self.runs()
        self.assertEqual(len(runs), 2)
        retry_text = "\n".join(b["text"] for b in runs[1]["stdin_blocks"])
        self.assertIn("$.name is required", retry_text)
        self.assertEqual(body["usage"]["prompt_tokens"], 2 * 4408)

    def test_json_that_stays_invalid_is_a_refusal(self):
        body = self.chat("x " + directive(text="no json here"), response_format={"type": "json_object"})[2]
        message = body["choices"][0]["message"]
        self.assertIsNone(message["content"])
        self.assertIn("not valid JSON", message["refusal"])
        self.assertEqual(len(self.runs()), 2)

    def test_unparsable_cli_lines_are_skipped(self):
        body = self.chat("x " + directive(text="fine", garbage=True))[2]
        self.assertEqual(body["choices"][0]["message"]["content"], "fine")


class StreamingChat(ServerTest):
    def test_deltas_arrive_as_the_cli_emits_them(self):
        status, headers, events = self.stream("x " + directive(text="abcdefghij", deltas=5, pace_ms=150))
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "text/event-stream; charset=utf-8")
        self.assertEqual(headers["Cache-Control"], "no-cache")
        self.assertEqual(headers["X-Accel-Buffering"], "no")
        chunks = [(t, e) for t, e in events if isinstance(e, dict) and e["choices"]
                  and e["choices"][0]["delta"].get("content")]
        self.assertEqual([e["choices"][0]["delta"]["content"] for _, e in chunks], ["ab", "cd", "ef", "gh", "ij"])
        self.assertGreater(chunks[-1][0] - chunks[0][0], 0.4, "chunks were not sent as they came")
        self.assertEqual(events[-1][1], "[DONE]")

    def test_first_chunk_has_the_role_and_last_the_finish_reason(self):
        _, _, events = self.stream("hi", stream_options={"include_usage": True})
        dicts = [e for _, e in events if isinstance(e, dict)]
        self.assertEqual(dicts[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        finishing = [d for d in dicts if d["choices"] and d["choices"][0]["finish_reason"]]
        self.assertEqual([d["choices"][0]["finish_reason"] for d in finishing], ["stop"])
        self.assertEqual(dicts[-1]["choices"], [])
        self.assertEqual(dicts[-1]["usage"]["prompt_tokens"], 4408)
        self.assertTrue(all("usage" in d for d in dicts))
        self.assertEqual(content_of(events), "Echo: hi")

    def test_without_include_usage_there_is_no_usage_chunk(self):
        _, _, events = self.stream("hi")
        dicts = [e for _, e in events if isinstance(e, dict)]
        self.assertTrue(all(d["choices"] for d in dicts))
        self.assertTrue(all("usage" not in d for d in dicts))

    def test_reasoning_deltas(self):
        _, _, events = self.stream("x " + directive(thinking="hmm, yes", text="ok"))
        reasoning = "".join(e["choices"][0]["delta"].get("reasoning_content") or "" for _, e in events
                            if isinstance(e, dict))
        self.assertEqual(reasoning, "hmm, yes")

    def test_a_dropped_upstream_connection_sends_the_text_once(self):
        _, _, events = self.stream("x " + directive(text="This answer is cut off by a drop.", drop=True, deltas=4))
        self.assertEqual(content_of(events), "This answer is cut off by a drop.")

    def test_stop_sequence_in_a_stream(self):
        _, _, events = self.stream("x " + directive(text="alpha beta gamma", deltas=8), stop="ta g")
        self.assertEqual(content_of(events), "alpha be")

    def test_errors_before_the_first_token_keep_their_status(self):
        status, headers, body = self.stream("x " + directive(error="overloaded"))
        self.assertEqual((status, body["error"]["code"]), (502, "overloaded"))

    def test_errors_after_the_first_token_travel_in_band(self):
        status, _, events = self.stream("x " + directive(error="mid_stream", text="partial answer"))
        self.assertEqual(status, 200)
        self.assertEqual(events[-1][1], "[DONE]")
        self.assertEqual(events[-2][1]["error"]["type"], "upstream_error")
        self.assertIn("partial answer", content_of(events))

    def test_structured_output_streams_after_validation(self):
        _, _, events = self.stream("x " + directive(text=' {"ok": true} '), response_format={"type": "json_object"})
        self.assertEqual(json.loads(content_of(events)), {"ok": True})


class Heartbeats(ServerTest):
    env = {"CLAUDE_HEARTBEAT_INTERVAL": "100"}

    def test_keepalive_before_the_first_token_and_while_silent(self):
        _, _, events = self.stream("x " + directive(slow_start_ms=450, text="late", deltas=2, pace_ms=350))
        kinds = ["keepalive" if e == ": keepalive" else "data" for _, e in events]
        first_content = next(i for i, (_, e) in enumerate(events)
                             if isinstance(e, dict) and e["choices"] and e["choices"][0]["delta"].get("content"))
        self.assertGreaterEqual(kinds[:first_content].count("keepalive"), 2)
        self.assertIn("keepalive", kinds[first_content + 1:])
        self.assertEqual(content_of(events), "late")


class UpstreamErrors(ServerTest):
    def test_statuses(self):
        cases = [("rate_limit", 429, "upstream_rate_limited"), ("auth", 503, "upstream_auth_error"),
                 ("not_logged_in", 503, "upstream_auth_error"), ("overloaded", 502, "overloaded"),
                 ("server_error", 502, "server_error"), ("prompt_too_long", 400, "context_length_exceeded"),
                 ("bad_request", 400, "upstream_invalid_request")]
        for kind, status, code in cases:
            with self.subTest(kind):
                got, headers, body = self.chat("x " + directive(error=kind))
                self.assertEqual((got, body["error"]["code"]), (status, code))
                self.assertNotIn("/home/", body["error"]["message"])
                if status == 429:
                    self.assertIn("Retry-After", headers)

    def test_auth_error_names_the_fix(self):
        body = self.chat("x " + directive(error="auth"))[2]
        self.assertIn("claude setup-token", body["error"]["message"])

    def test_a_crash_is_502_without_paths(self):
        status, _, body = self.chat("x " + directive(crash=3))
        self.assertEqual((status, body["error"]["code"]), (502, "cli_failed"))
        self.assertNotIn("/home/", json.dumps(body))


class PlanLimit(ServerTest):
    def setUp(self):
        super().setUp()
        self.server.wall = lambda: 1795503600 - 7200  # two hours before the fake's reset

    def test_429_with_retry_after_then_answered_locally(self):
        status, headers, body = self.chat("x " + directive(error="plan_limit"))
        self.assertEqual((status, body["error"]["code"]), (429, "usage_limit_reached"))
        self.assertEqual(headers["Retry-After"], "7200")
        self.assertEqual(headers["x-should-retry"], "false")
        status, headers, body = self.chat("a normal request")
        self.assertEqual((status, body["error"]["code"]), (429, "usage_limit_reached"))
        self.assertEqual(len(self.runs()), 1, "the held request spawned no CLI")
        status, _, events = self.stream("streamed too")
        self.assertEqual(status, 429)
        self.server.wall = lambda: 1795503600 + 1
        self.assertEqual(self.chat("after the reset")[0], 200)


class NoClaudeInstalled(ServerTest):
    env = {"CLAUDE_BIN": "/nonexistent/claude"}

    def test_health_says_why_and_completions_are_503(self):
        status, _, body = self.request("GET", "/health")
        self.assertEqual((status, body["status"]), (503, "down"), "monitors see it without reading the JSON")
        self.assertIn("npm i -g @anthropic-ai/claude-code", body["reason"])
        status, _, body = self.chat("hi")
        self.assertEqual((status, body["error"]["code"]), (503, "claude_not_installed"))
        self.assertIn("claude setup-token", body["error"]["message"])
        self.assertNotIn("/nonexistent", body["error"]["message"])


class ChildEnvironment(ServerTest):
    env = {"ANTHROPIC_API_KEY": "sk-ant-billing", "ANTHROPIC_AUTH_TOKEN": "tok",
           "ANTHROPIC_BASE_URL": "http://evil.invalid", "OCP_ADMIN_KEY": "admin-secret-1",
           "MY_COPY": "admin-secret-1", "CLAUDE_CODE_OAUTH_TOKEN": "oauth-subscription-token"}

    def test_secrets_never_reach_the_cli(self):
        self.chat("hi")
        env = self.runs()[-1]["env"]
        for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "OCP_ADMIN_KEY", "MY_COPY"):
            self.assertNotIn(name, env)
        import hashlib
        self.assertEqual(env["CLAUDE_CODE_OAUTH_TOKEN"],
                         "sha256:" + hashlib.sha256(b"oauth-subscription-token").hexdigest())
        self.assertEqual(env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"], "1")


class UpstreamOverride(ServerTest):
    env = {"OCP_UPSTREAM_BASE_URL": "http://127.0.0.1:9"}

    def test_is_passed_as_anthropic_base_url(self):
        self.chat("hi")
        self.assertEqual(self.runs()[-1]["env"]["ANTHROPIC_BASE_URL"], "http://127.0.0.1:9")


class MalformedRequests(ServerTest):
    def test_every_one_is_an_openai_shaped_4xx(self):
        good = {"model": "sonnet", "messages": [{"role": "user", "content": "x"}]}
        cases = [
            ("bad json", "POST", "/v1/chat/completions", "{nope", {}, 400),
            ("empty body", "POST", "/v1/chat/completions", "", {}, 400),
            ("array body", "POST", "/v1/chat/completions", "[]", {}, 400),
            ("wrong types", "POST", "/v1/chat/completions", json.dumps({"model": 1, "messages": 2}), {}, 400),
            ("empty messages", "POST", "/v1/chat/completions", json.dumps({"model": "opus", "messages": []}), {}, 400),
            ("unknown model", "POST", "/v1/chat/completions", json.dumps(dict(good, model="gpt-4")), {}, 400),
            ("n 3", "POST", "/v1/chat/completions", json.dumps(dict(good, n=3)), {}, 400),
            ("not utf-8", "POST", "/v1/chat/completions", b"\xff\xfe\x00{", {}, 400),
            ("unknown route", "GET", "/v2/whatever", None, {}, 404),
            ("wrong method", "GET", "/v1/chat/completions", None, {}, 405),
            ("wrong method on models", "POST", "/v1/models", "{}", {}, 405),
            ("bad content-length", "POST", "/v1/chat/completions", None, {"Content-Length": "abc"}, 400),
        ]
        for name, method, path, raw, headers, status in cases:
            with self.subTest(name):
                got, response_headers, body = self.request(method, path, raw=raw, headers=headers)
                self.assertEqual(got, status)
                self.assertEqual(set(body["error"]), {"message", "type", "param", "code"})
                if status == 405:
                    self.assertIn("Allow", response_headers)
        self.assertEqual(self.runs(), [], "no bad request spawned a CLI")

    def test_oversize_body_is_413_and_closes(self):
        self.server.config = ocp.dataclasses.replace(self.server.config, max_body_bytes=2048)
        conn = self.connection()
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Length", str(10 * 1024 * 1024))
        conn.endheaders()
        response = conn.getresponse()
        self.assertEqual(response.status, 413)
        self.assertEqual(json.loads(response.read())["error"]["code"], "request_too_large")
        self.assertEqual(response.headers["Connection"], "close")

    def test_chunked_body(self):
        conn = self.connection()
        body = json.dumps({"model": "opus", "messages": [{"role": "user", "content": "chunky"}]}).encode()
        conn.request("POST", "/v1/chat/completions", body=iter([body[:10], body[10:]]),
                     headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
        response = conn.getresponse()
        self.assertEqual(json.loads(response.read())["choices"][0]["message"]["content"], "Echo: chunky")

    def test_malformed_request_line(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(b"GARBAGE\r\n\r\n")
        reply = b""
        while True:
            data = sock.recv(4096)
            if not data:
                break
            reply += data
        reply = reply.decode()
        self.assertTrue(reply.startswith("HTTP/1.1 400") or reply.startswith("HTTP/1.0 400"), reply)
        self.assertIn('"error"', reply)

    def test_keep_alive_survives_an_error(self):
        conn = self.connection()
        conn.request("POST", "/v1/chat/completions", body="{bad")
        response = conn.getresponse()
        response.read()
        self.assertEqual(response.status, 400)
        conn.request("GET", "/v1/models")
        self.assertEqual(conn.getresponse().status, 200)


class SharedKey(ServerTest):
    env = {"PROXY_API_KEY": "house-key-123"}

    def test_key_required_except_health(self):
        self.assertEqual(self.request("GET", "/health")[0], 200)
        self.assertEqual(self.request("GET", "/health/?x=1")[0], 200)
        status, headers, body = self.request("GET", "/v1/models")
        self.assertEqual((status, body["error"]["code"]), (401, "invalid_api_key"))
        self.assertEqual(self.request("GET", "/v1/models", headers={"Authorization": "Bearer nope"})[0], 401)
        self.assertEqual(self.request("GET", "/v1/models", headers={"Authorization": "Bearer house-key-123"})[0], 200)
        self.assertEqual(self.request("GET", "/v1/models", headers={"x-api-key": "house-key-123"})[0], 200)
        self.assertEqual(self.runs(), [])

    def test_the_key_never_reaches_the_cli(self):
        self.request("POST", "/v1/chat/completions", {"model": "opus", "messages": [
            {"role": "user", "content": "hi"}]}, headers={"Authorization": "Bearer house-key-123"})
        self.assertNotIn("house-key-123", json.dumps(self.runs()[-1]["env"]))


if __name__ == "__main__":
    unittest.main()


class OwnersLogin(ServerTest):
    def write_login(self, expires_in_s):
        os.makedirs(os.path.join(self.home, ".claude"))
        with open(os.path.join(self.home, ".claude", ".credentials.json"), "w") as f:
            json.dump({"claudeAiOauth": {"accessToken": "owner-access",
                                         "expiresAt": int((time.time() + expires_in_s) * 1000)}}, f)

    def test_a_fresh_login_goes_to_an_isolated_child_as_a_token(self):
        self.write_login(3600)
        self.chat("hi")
        env = self.runs()[-1]["env"]
        import hashlib
        self.assertEqual(env["CLAUDE_CODE_OAUTH_TOKEN"], "sha256:" + hashlib.sha256(b"owner-access").hexdigest())
        self.assertEqual(env["HOME"], os.path.join(self.ocp_home, "spawn", "home"))

    def test_an_expiring_login_runs_with_the_real_home_to_refresh(self):
        self.write_login(60)
        self.chat("hi")
        env = self.runs()[-1]["env"]
        self.assertNotIn("CLAUDE_CODE_OAUTH_TOKEN", env)
        self.assertEqual(env["HOME"], self.home)
        self.assertNotIn("CLAUDE_CONFIG_DIR", env)
