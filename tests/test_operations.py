"""Running for months: plan windows that survive restarts, overage, health from real outcomes."""

import json
import os
import unittest

import ocp
from helpers import ServerTest, directive

ADMIN = "ocp_admin_key_for_operations_tests0"
RESET = 1795503600  # the fake CLI's five-hour reset


class PlanLimitAcrossRestarts(ServerTest):
    env = {"OCP_ADMIN_KEY": ADMIN, "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-test"}

    def setUp(self):
        super().setUp()
        self.server.wall = lambda: RESET - 5400
        self.server.started_at = RESET - 5400

    def admin(self, path):
        return self.request("GET", path, headers={"Authorization": f"Bearer {ADMIN}"})

    def test_hold_windows_and_restart(self):
        self.assertEqual(self.chat("fine")[0], 200)  # an allowed answer reports the windows
        status, headers, body = self.chat("x " + directive(error="plan_limit"))
        self.assertEqual((status, headers["Retry-After"]), (429, "5400"))
        for _ in range(10):
            status, headers, body = self.chat("held")
            self.assertEqual((status, body["error"]["code"], headers["Retry-After"]), (429, "usage_limit_reached", "5400"))
        self.assertEqual(len(self.runs()), 2, "the 10 held requests spawned nothing")
        usage = self.admin("/usage")[2]
        windows = {w["window"]: w for w in usage["plan"]["windows"]}
        self.assertEqual(windows["five_hour"]["resets_at"], RESET)
        self.assertEqual(windows["five_hour"]["utilization_pct"], 100.0)
        self.assertEqual(windows["seven_day"]["utilization_pct"], 45.0)
        self.assertEqual(usage["plan"]["held_until"], RESET)
        self.assertEqual(self.request("GET", "/health")[2]["status"], "degraded")

        self.server.shutdown()
        self.server.server_close()
        self.start_server(**self.server_env())  # a restart on the same OCP_HOME
        self.server.wall = lambda: RESET - 3600
        status, headers, _ = self.chat("after the restart")
        self.assertEqual((status, headers["Retry-After"]), (429, "3600"))
        self.assertEqual(len(self.runs()), 2)
        windows = {w["window"]: w for w in self.admin("/usage")[2]["plan"]["windows"]}
        self.assertEqual(windows["seven_day"]["utilization_pct"], 45.0)

    def test_usage_needs_the_admin_key_and_shows_models(self):
        self.chat("one", model="haiku")
        self.chat("x " + directive(error="overloaded"), model="haiku")
        self.assertEqual(self.request("GET", "/usage")[0], 403)
        body = self.admin("/usage?hours=2")[2]
        [haiku] = body["models"]["data"]
        self.assertEqual((haiku["model"], haiku["requests"], haiku["errors"]), ("claude-haiku-5-5", 2, 1))
        self.assertGreater(haiku["prompt_tokens"], 0)
        self.assertEqual(body["proxy"]["requests"], {"ok": 1, "error": 1})
        self.assertEqual(self.admin("/usage?hours=0")[0], 400)


class Overage(ServerTest):
    env = {"CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-test"}

    def setUp(self):
        super().setUp()
        self.server.wall = lambda: RESET - 600

    def test_an_answer_paid_from_extra_usage_is_flagged(self):
        status, headers, _ = self.chat("x " + directive(overage=True))
        self.assertEqual((status, headers["x-ocp-plan-overage"]), (200, "true"))
        status, headers, events = self.stream("x " + directive(overage=True))
        self.assertEqual(headers["x-ocp-plan-overage"], "true", "known from the last answer")

    def test_a_stream_learns_it_late_and_says_so_in_band(self):
        conn = self.connection()
        conn.request("POST", "/v1/chat/completions", json.dumps({"model": "sonnet", "stream": True, "messages": [
            {"role": "user", "content": "x " + directive(overage=True)}]}))
        response = conn.getresponse()
        self.assertIsNone(response.headers["x-ocp-plan-overage"])
        self.assertIn(b": x-ocp-plan-overage: true", response.read())


class PlanOnly(ServerTest):
    env = {"CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-test", "OCP_PLAN_ONLY": "1"}

    def test_extra_usage_is_refused_after_it_shows(self):
        self.server.wall = lambda: RESET - 600
        self.assertEqual(self.chat("x " + directive(overage=True))[0], 200)
        status, headers, body = self.chat("more")
        self.assertEqual((status, body["error"]["code"], headers["Retry-After"]), (429, "plan_only", "600"))
        self.assertEqual(len(self.runs()), 1)


class HealthFromRealOutcomes(ServerTest):
    env = {"CLAUDE_TIMEOUT": "1000"}

    def status(self):
        return self.request("GET", "/health")[2]

    def test_two_login_failures_in_a_row_mean_down(self):
        self.chat("x " + directive(error="auth"))
        self.assertEqual(self.status()["status"], "ok", "one failure is not yet a verdict")
        self.chat("x " + directive(error="not_logged_in"))
        health = self.status()
        self.assertEqual(health["status"], "down")
        self.assertIn("claude setup-token", health["reason"])
        self.chat("fine again")
        self.assertEqual(self.status()["status"], "ok")

    def test_a_timeout_is_no_evidence(self):
        self.assertEqual(self.chat("x " + directive(hang=True))[0], 504)
        self.assertEqual(self.status()["status"], "ok")


if __name__ == "__main__":
    unittest.main()
