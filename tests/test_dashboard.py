"""The dashboard's server side: the page, login sessions as cookies, role-scoped data."""

import http.client
import json
import os
import re
import subprocess
import sys
import unittest

import ocp
from helpers import ROOT, ServerTest, TempHome, free_port

ADMIN = "ocp_admin_key_for_dashboard_tests00"


class DashboardSessions(ServerTest):
    env = {"CLAUDE_AUTH_MODE": "multi", "OCP_ADMIN_KEY": ADMIN}

    def setUp(self):
        super().setUp()
        self.now = 1_800_000_000.0
        self.server.wall = lambda: self.now
        self.alice = self.add_key("alice")
        self.bob = self.add_key("bob")
        for key in (self.alice, self.alice, self.bob):
            self.request("POST", "/v1/chat/completions", {"model": "sonnet", "messages": [
                {"role": "user", "content": "hi"}]}, headers={"Authorization": f"Bearer {key}"})

    def add_key(self, name):
        return self.request("POST", "/api/keys", {"name": name}, headers={"Authorization": f"Bearer {ADMIN}"})[2]["key"]

    def login(self, key):
        conn = self.connection()
        conn.request("POST", "/dashboard/login", json.dumps({"key": key}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        body = json.loads(response.read())
        return response.status, response.headers.get("Set-Cookie", ""), body

    def with_cookie(self, method, path, cookie, body=None):
        token = cookie.split(";")[0]
        return self.request(method, path, body, headers={"Cookie": token})

    def test_the_page_is_public_and_locked_down(self):
        conn = self.connection()
        conn.request("GET", "/dashboard")
        response = conn.getresponse()
        page = response.read().decode()
        self.assertEqual(response.status, 200)
        self.assertTrue(response.headers["Content-Type"].startswith("text/html"))
        policy = response.headers["Content-Security-Policy"]
        self.assertIn("default-src 'none'", policy)
        self.assertIn("connect-src 'self'", policy)
        self.assertRegex(policy, r"script-src 'sha256-[A-Za-z0-9+/=]+'")
        self.assertIsNone(re.search(r'(src|href)="https?://', page), "no external requests")
        self.assertNotIn("innerHTML", page)

    def test_login_sets_an_httponly_strict_cookie_and_no_key_travels_again(self):
        status, cookie, body = self.login(ADMIN)
        self.assertEqual((status, body), (200, {"role": "admin", "name": "admin"}))
        self.assertIn("HttpOnly", cookie)
        self.assertIn("SameSite=Strict", cookie)
        self.assertNotIn(ADMIN, cookie)
        status, _, data = self.with_cookie("GET", "/dashboard/data", cookie)
        self.assertEqual((status, data["role"]), (200, "admin"))
        self.assertEqual(sorted(k["name"] for k in data["keys"]), ["alice", "bob"])
        self.assertEqual(len(data["series"]["points"]), 24)
        self.assertEqual(sum(p["requests"] for p in data["series"]["points"]), 3)
        self.assertEqual(self.with_cookie("POST", "/api/keys", cookie, {"name": "carol"})[0], 201,
                         "the admin's session can act")

    def test_a_member_sees_only_its_own(self):
        status, cookie, body = self.login(self.alice)
        self.assertEqual(body, {"role": "member", "name": "alice"})
        data = self.with_cookie("GET", "/dashboard/data", cookie)[2]
        self.assertEqual([k["name"] for k in data["keys"]], ["alice"])
        self.assertEqual({r["key_name"] for r in data["recent"]}, {"alice"})
        self.assertEqual([u["key_name"] for u in data["usage_by_key"]], ["alice"])
        self.assertNotIn("detail", data["health"])
        self.assertEqual(self.with_cookie("GET", "/api/keys", cookie)[0], 403)
        self.assertEqual(self.with_cookie("POST", "/api/keys", cookie, {"name": "x"})[0], 403)

    def test_bad_keys_do_not_log_in(self):
        for key in ("", "ocp_" + "n" * 32, None):
            with self.subTest(key):
                self.assertEqual(self.login(key)[0], 401)
        self.assertEqual(self.request("GET", "/dashboard/me")[2], {"role": None, "name": None})
        self.assertEqual(self.request("GET", "/dashboard/data")[0], 401)

    def test_logout_expiry_and_revocation_end_a_session(self):
        cookie = self.login(ADMIN)[1]
        conn = self.connection()
        conn.request("POST", "/dashboard/logout", headers={"Cookie": cookie.split(";")[0]})
        response = conn.getresponse()
        response.read()
        self.assertIn("Max-Age=0", response.headers["Set-Cookie"])
        self.assertEqual(self.with_cookie("GET", "/dashboard/data", cookie)[0], 401)

        cookie = self.login(ADMIN)[1]
        self.now += ocp.SESSION_TTL_S + 1
        self.assertEqual(self.with_cookie("GET", "/dashboard/data", cookie)[0], 401, "expired")

        cookie = self.login(self.bob)[1]
        self.request("DELETE", "/api/keys/bob", headers={"Authorization": f"Bearer {ADMIN}"})
        self.assertEqual(self.with_cookie("GET", "/dashboard/data", cookie)[0], 401, "revoked key")

    def test_failed_logins_are_throttled_per_address_and_audited_within_bounds(self):
        statuses = [self.login("ocp_" + "w" * 32)[0] for _ in range(40)]
        self.assertEqual(statuses[:ocp.LOGIN_FAILURES_ALLOWED], [401] * ocp.LOGIN_FAILURES_ALLOWED)
        self.assertEqual(set(statuses[ocp.LOGIN_FAILURES_ALLOWED:]), {429})
        self.assertEqual(self.login(ADMIN)[0], 429, "even the right key waits out the window")
        audited = [a for a in self.server.store.audit_trail(1000) if a["action"] == "dashboard.login_failed"]
        self.assertEqual(len(audited), ocp.LOGIN_FAILURES_ALLOWED)
        self.now += ocp.LOGIN_FAILURE_WINDOW_S + 1
        self.assertEqual(self.login(ADMIN)[0], 200)

    def test_origins_must_match_scheme_host_and_port(self):
        host = f"127.0.0.1:{self.port}"
        cookie = self.login(ADMIN)[1].split(";")[0]
        for origin, expected in ((f"http://{host}", 200), (f"https://{host}", 403),
                                 (f"http://127.0.0.1:{self.port + 1}", 403), (f"http://{host}.evil.example", 403),
                                 ("http://127.0.0.1:x", 403)):
            with self.subTest(origin):
                status, _, _ = self.request("GET", "/api/keys", headers={"Cookie": cookie, "Origin": origin,
                                                                        "Host": host})
                self.assertEqual(status, expected)

    def test_a_host_with_two_ports_is_refused(self):
        for host in ("evil.example.com:1:2", "127.0.0.1:1:2", "::1"):
            with self.subTest(host):
                self.assertEqual(self.request("GET", "/health", headers={"Host": host})[0], 403)

    def test_a_cross_site_request_cannot_ride_the_cookie(self):
        cookie = self.login(ADMIN)[1].split(";")[0]
        status, _, body = self.request("POST", "/api/keys", {"name": "evil"},
                                       headers={"Cookie": cookie, "Origin": "http://evil.example"})
        self.assertEqual((status, body["error"]["code"]), (403, "cross_origin_forbidden"))


class InEveryAuthMode(TempHome):
    def test_the_owner_can_log_in_with_no_auth_mode_set(self):
        port = free_port()
        env = dict(self.environ(), CLAUDE_PROXY_PORT=str(port), PYTHONUNBUFFERED="1")
        env.pop("CLAUDE_AUTH_MODE", None)
        daemon = subprocess.Popen([sys.executable, os.path.join(ROOT, "ocp.py"), "serve"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(daemon.wait)
        self.addCleanup(daemon.terminate)
        output = b""
        while b"dashboard:" not in output:
            output += daemon.stdout.readline()
        daemon.stdout.close()
        admin_file = os.path.join(self.ocp_home, "admin-key")
        self.assertIn(f"log in with the admin key in {admin_file}".encode(), output)
        with open(admin_file) as f:
            admin = f.read().strip()
        self.assertNotIn(admin.encode(), output)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", "/dashboard/login", json.dumps({"key": admin}))
        response = conn.getresponse()
        self.assertEqual((response.status, json.loads(response.read())["role"]), (200, "admin"))


if __name__ == "__main__":
    unittest.main()
