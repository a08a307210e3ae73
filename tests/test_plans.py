"""The plans Anthropic sells now: every window by name, per-model limits, a forecast, alerts,
the CLI a model needs, nothing started while held, and keys that end."""

import json
import os
import time
import unittest

import ocp
from helpers import ServerTest, TempHome, directive
from test_cli import run_main

ADMIN = "ocp_admin_key_for_the_plans_tests00"
GUEST = "ocp_guest_key_for_the_plans_tests00"
NOW = 1795500000  # an hour before the fake CLI's 5-hour reset (PLAN_RESET)


class KeysThatEnd(ServerTest):
    env = {"CLAUDE_AUTH_MODE": "multi", "OCP_ADMIN_KEY": ADMIN, "PROXY_ANONYMOUS_KEY": GUEST,
           "PROXY_ANONYMOUS_KEY_EXPIRES": "2026-11-24T10:00:00Z"}

    def setUp(self):
        super().setUp()
        self.now = NOW
        self.server.wall = lambda: self.now

    def admin(self, method, path, body=None):
        return self.request(method, path, body, headers={"Authorization": f"Bearer {ADMIN}"})

    def ask(self, secret):
        return self.request("POST", "/v1/chat/completions", {"model": "sonnet", "messages": [
            {"role": "user", "content": "hi"}]}, headers={"Authorization": f"Bearer {secret}"})

    def test_a_key_with_a_lifetime_is_refused_after_it_naming_when(self):
        status, _, key = self.admin("POST", "/api/keys", {"name": "visitor", "expires": "1h"})
        self.assertEqual((status, key["expires"], key["status"]), (201, NOW + 3600, "active"))
        self.assertEqual(self.ask(key["key"])[0], 200)
        self.now = NOW + 3600
        status, headers, body = self.ask(key["key"])
        self.assertEqual((status, body["error"]["code"], headers["WWW-Authenticate"]), (401, "key_expired", "Bearer"))
        self.assertIn("expired on 2026-11-24 07:00 UTC", body["error"]["message"])
        listed = {k["name"]: k for k in self.admin("GET", "/api/keys")[2]["data"]}
        self.assertEqual(listed["visitor"]["status"], "expired")
        self.assertEqual(self.admin("GET", "/health")[2]["detail"]["keys"], {"active": 0, "revoked": 0, "expired": 1})
        status, _, body = self.admin("PATCH", "/api/keys/visitor/quota", {"expires": "30d"})
        self.assertEqual((status, body["expires"], body["status"]), (200, NOW + 3600 + 30 * 86400, "active"))
        self.assertEqual(self.ask(key["key"])[0], 200)
        self.assertEqual(self.admin("PATCH", "/api/keys/visitor/quota", {"expires": None})[2]["expires"], None)

    def test_a_lifetime_that_is_no_time_is_a_400_naming_the_field(self):
        for bad in ("soon", "30 days", -5, True, [1]):
            status, _, body = self.admin("POST", "/api/keys", {"name": "x", "expires": bad})
            self.assertEqual((status, body["error"]["param"]), (400, "expires"), bad)

    def test_the_guest_key_can_end_too(self):
        self.now = 1795514400 - 60  # 2026-11-24T09:59 UTC
        self.assertEqual(self.ask(GUEST)[0], 200)
        self.now = 1795514400 + 60
        status, _, body = self.ask(GUEST)
        self.assertEqual((status, body["error"]["code"]), (401, "key_expired"))
        self.assertIn("2026-11-24 10:00 UTC", body["error"]["message"])
        self.assertEqual(self.request("GET", "/health", headers={"Authorization": f"Bearer {GUEST}"})[0], 200)


class KeyLifetimeOnTheCommandLine(TempHome):
    def test_keys_add_and_quota_take_expires(self):
        env = self.environ()
        before = int(time.time())
        code, out, err = run_main(["keys", "add", "visitor", "--expires", "30d", "--json"], env)
        self.assertEqual(code, 0, err)
        self.assertAlmostEqual(json.loads(out)["expires"], before + 30 * 86400, delta=5)
        code, out, _ = run_main(["keys"], env)
        self.assertIn("EXPIRES", out.splitlines()[0])
        self.assertIn(time.strftime("%Y-%m-%d", time.localtime(before + 30 * 86400)), out)
        code, out, _ = run_main(["keys", "quota", "visitor", "--expires", "2020-01-01", "--json"], env)
        self.assertEqual((json.loads(out)["expires"], json.loads(out)["status"]), (1577836800, "expired"))
        code, out, _ = run_main(["keys", "quota", "visitor", "--expires", "never", "--json"], env)
        self.assertEqual((json.loads(out)["expires"], json.loads(out)["status"]), (None, "active"))

    def test_a_guest_lifetime_that_is_no_date_stops_the_daemon(self):
        with self.assertRaises(ocp.ConfigError) as caught:
            ocp.load_config(self.environ(PROXY_ANONYMOUS_KEY_EXPIRES="next week"))
        self.assertIn("PROXY_ANONYMOUS_KEY_EXPIRES", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
