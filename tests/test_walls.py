"""Walls: refusals that waiting will not fix, answered so that every client stops at once and
shows why — each client read from its own source (README: "When a key hits a wall")."""

import json
import time
import unittest

import ocp
from helpers import ServerTest, directive, wait_until

ADMIN = "ocp_admin_key_for_the_walls_tests_0"
CLIENTS = {  # User-Agents as the real clients send them (measured through OCP)
    "opencode": "opencode/1.18.33 ai-sdk/provider-utils/4.0.23 runtime/bun/1.3.14",
    "aider": "litellm/1.81.10",
    "cn": "ls/JS 5.23.2",
    "openai-python": "OpenAI/Python 3.63.0",
    "openai-node": "OpenAI/JS 6.9.1",
    "llm": "OpenAI/Python 2.8.1",
    "codex": "codex_exec/0.171.0 (Debian 12.0.0; x86_64) unknown (codex_exec; 0.171.0)",
    "claude-code": "claude-cli/2.1.330 (external, sdk-cli)",
}
RETRY_EVERY_429 = ("opencode", "aider", "cn")


class WallTest(ServerTest):
    env = {"CLAUDE_AUTH_MODE": "multi", "OCP_ADMIN_KEY": ADMIN}

    def key(self, name="member", **quota):
        return self.server.store.add_key(name, ocp.KeyPolicy(**quota), time.time())[1]

    def ask(self, secret, client, path="/v1/chat/completions", **body):
        body.setdefault("model", "sonnet")
        if path == "/v1/responses":
            body.setdefault("input", "hi")
        else:
            body.setdefault("messages", [{"role": "user", "content": "hi"}])
        if path == "/v1/messages":
            body.setdefault("max_tokens", 100)
        conn = self.connection()
        conn.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {secret}", "x-api-key": secret,
                                                       "User-Agent": CLIENTS[client],
                                                       "Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read().decode("utf-8")
        return response.status, response.headers, json.loads(raw), raw

    def over_quota(self):
        secret = self.key(daily=1)
        self.assertEqual(self.ask(secret, "openai-python")[0], 200)
        return secret


class QuotaWall(WallTest):
    def test_clients_that_retry_every_429_get_a_final_400_that_says_why(self):
        secret = self.over_quota()
        for client in RETRY_EVERY_429:
            with self.subTest(client):
                status, headers, body, raw = self.ask(secret, client)
                self.assertEqual((status, body["error"]["type"], body["error"]["code"]),
                                 (400, "insufficient_quota", "insufficient_quota"))
                self.assertIn("Quota exceeded: 1/1 requests today", body["error"]["message"])
                self.assertIn("ask the owner", body["error"]["message"])
                self.assertNotIn("Retry-After", headers, "opencode would sleep it out")
                self.assertIsNone(ocp.RETRY_BAIT.search(raw), raw)

    def test_the_sdks_keep_the_429_that_says_do_not_retry(self):
        secret = self.over_quota()
        for client in ("openai-python", "openai-node", "llm"):
            with self.subTest(client):
                status, headers, body, raw = self.ask(secret, client)
                self.assertEqual((status, headers["x-should-retry"], body["error"]["code"]),
                                 (429, "false", "quota_exceeded"))
                self.assertTrue(int(headers["Retry-After"]) > 60)
                self.assertEqual(body["error"]["quota"]["limit"], 1)

    def test_codex_gets_its_usage_limit_with_the_reset(self):
        secret = self.over_quota()
        status, headers, body, _ = self.ask(secret, "codex", "/v1/responses")
        self.assertEqual((status, body["error"]["type"]), (429, "usage_limit_reached"))
        self.assertGreater(body["error"]["resets_at"], time.time() + 60)
        self.assertIn("Quota exceeded", body["error"]["message"])

    def test_the_ai_sdk_on_responses_gets_the_400_too(self):
        secret = self.over_quota()
        status, headers, body, raw = self.ask(secret, "opencode", "/v1/responses")
        self.assertEqual((status, body["error"]["type"]), (400, "insufficient_quota"))
        self.assertIsNone(ocp.RETRY_BAIT.search(raw), raw)

    def test_claude_code_gets_anthropics_envelope_and_no_retry(self):
        secret = self.over_quota()
        status, headers, body, raw = self.ask(secret, "claude-code", "/v1/messages")
        self.assertEqual((status, body["type"], body["error"]["type"]), (429, "error", "rate_limit_error"))
        self.assertEqual(headers["x-should-retry"], "false")
        self.assertTrue(headers["request-id"].startswith("req_"))
        self.assertNotIn(headers["request-id"], raw, "the request id only in a header")

    def test_a_limit_of_five_hundred_reads_as_one_and_matches_no_pattern(self):
        error = ocp.quota_error({"period": "day", "unit": "requests", "limit": 500, "used": 500,
                                 "resets_at": time.time() + 3600, "estimate": 1}, time.time())
        shaped = ocp.wall_for(error, "openai", CLIENTS["opencode"])
        self.assertIsNone(ocp.RETRY_BAIT.search(json.dumps(shaped.body(), ensure_ascii=False)))
        self.assertIn("5\u206000/5\u206000", shaped.message, "still 500 to a reader")

    def test_the_owner_can_force_a_plain_429_for_everyone(self):
        self.server.config = ocp.dataclasses.replace(self.server.config, wall_status="429")
        secret = self.over_quota()
        status, headers, _, _ = self.ask(secret, "opencode")
        self.assertEqual((status, headers["x-should-retry"]), (429, "false"))


class WallSetting(unittest.TestCase):
    def test_only_auto_or_429(self):
        for value in ("auto", "429"):
            ocp.validate_config(ocp.Config(wall_status=value))
        with self.assertRaises(ocp.ConfigError):
            ocp.validate_config(ocp.Config(wall_status="400"))


class OtherWalls(WallTest):
    def test_a_model_the_key_may_not_use_stops_every_client(self):
        secret = self.server.store.add_key("kid", ocp.KeyPolicy(models=("haiku",)), time.time())[1]
        self.assertEqual(self.ask(secret, "aider", model="opus")[0], 400, "litellm retries a 403")
        self.assertEqual(self.ask(secret, "openai-python", model="opus")[0], 403)
        status, _, body, _ = self.ask(secret, "claude-code", "/v1/messages", model="opus")
        self.assertEqual((status, body["error"]["type"]), (404, "not_found_error"))

    def test_a_plan_limit_held_for_hours_is_a_wall(self):
        secret = self.key()
        status, _, _, _ = self.ask(secret, "openai-python", messages=[
            {"role": "user", "content": "x " + directive(error="plan_limit")}])
        self.assertEqual(status, 429)
        self.server.plan.hold(int(time.time()) + 3 * 3600, "You've hit your 5-hour limit")
        for client, expected in (("opencode", 400), ("openai-python", 429), ("codex", 429)):
            path = "/v1/responses" if client == "codex" else "/v1/chat/completions"
            with self.subTest(client):
                status, headers, body, raw = self.ask(secret, client, path)
                self.assertEqual(status, expected, body)
                if client == "codex":
                    self.assertEqual(body["error"]["type"], "usage_limit_reached")
                if client == "opencode":
                    self.assertIsNone(ocp.RETRY_BAIT.search(raw), raw)

    def test_a_plan_limit_that_ends_within_a_minute_stays_a_retryable_429(self):
        secret = self.key()
        self.server.plan.hold(int(time.time()) + 30, "You've hit your 5-hour limit")
        status, headers, _, _ = self.ask(secret, "opencode")
        self.assertEqual(status, 429)
        self.assertLessEqual(int(headers["Retry-After"]), 31)

    def test_a_busy_proxy_stays_a_retryable_429(self):
        self.server.config = ocp.dataclasses.replace(self.server.config, max_concurrent=1, max_queue=0)
        self.server.runner.apply(self.server.config)
        self.settle()  # (no CLI from before is still exiting: the live run below is the hanging one)
        sock = self.open_raw({"model": "sonnet", "messages": [{"role": "user", "content": "x " + directive(hang=True)}]},
                             ADMIN)
        wait_until(lambda: self.server.runner.live())
        status, headers, body, _ = self.ask(self.key(), "opencode")
        self.assertEqual((status, body["error"]["code"], headers["Retry-After"]), (429, "queue_full", "5"))
        sock.close()


class ContextWall(WallTest):
    """The CLI's own context refusal (blocking_limit) is the route's context-length error, not a 502."""

    def test_every_route_says_the_context_is_exceeded(self):
        secret = self.key()
        prompt = "x " + directive(error="blocking_limit")
        status, _, body, _ = self.ask(secret, "opencode", messages=[{"role": "user", "content": prompt}])
        self.assertEqual((status, body["error"]["code"]), (400, "context_length_exceeded"))
        self.assertIn("maximum context length", body["error"]["message"])
        status, _, body, _ = self.ask(secret, "codex", "/v1/responses", input=prompt)
        self.assertEqual((status, body["error"]["code"]), (400, "context_length_exceeded"))
        status, _, body, _ = self.ask(secret, "claude-code", "/v1/messages",
                                      messages=[{"role": "user", "content": prompt}])
        self.assertEqual((status, body["error"]["type"]), (400, "invalid_request_error"))
        self.assertIn("prompt is too long", body["error"]["message"])

    def test_the_cli_s_refusal_maps_in_whatever_field_it_comes(self):
        for result in ({"terminal_reason": "blocking_limit", "result": "Prompt is too long"},
                       {"terminal_reason": "prompt_too_long", "result": "Prompt is too long · ~250000 tokens"},
                       {"terminal_reason": "api_error", "result": "Prompt is too long", "api_error_status": None}):
            with self.subTest(result):
                error = ocp.result_error(dict(result, is_error=True), {}, [], time.time())
                self.assertEqual((error.status, error.code), (400, "context_length_exceeded"))


if __name__ == "__main__":
    unittest.main()
