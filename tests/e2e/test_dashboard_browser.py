"""The dashboard in a real headless Chromium (Debian's), driven by Playwright for Python."""

import os
import re
import unittest

from e2e.base import require
from helpers import ROOT, ServerTest, directive

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # checked in setUpClass: skip on a bare machine, fail under OCP_E2E=1
    sync_playwright = None

ADMIN = "ocp_admin_key_for_browser_tests0000"
CHROMIUM = os.environ.get("OCP_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = os.environ.get("OCP_SCREENSHOTS", os.path.join(ROOT, "screenshots"))
HOSTILE = "<script>alert(1)</script>"
PLAN_RESET = 1795503600  # the fake CLI's 5-hour reset
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync", "--disable-quic"]


class DashboardInChromium(ServerTest):
    env = {"CLAUDE_AUTH_MODE": "multi", "OCP_ADMIN_KEY": ADMIN, "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-ui",
           "OCP_POOL": "1", "OCP_POOL_SPARE_AFTER": "1"}

    @classmethod
    def setUpClass(cls):
        require(sync_playwright is not None, "playwright is not installed",
                "run the suite with a python that has playwright, as .ci/run does")
        require(os.access(CHROMIUM, os.X_OK), f"chromium is not installed at {CHROMIUM}",
                "apt-get install chromium, as .ci/run does")
        super().setUpClass()
        cls.playwright = sync_playwright().start()
        cls.browser = cls.playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)

    @classmethod
    def tearDownClass(cls):
        cls.browser.close()
        cls.playwright.stop()
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        self.addCleanup(self.server.runner.pool.close)
        self.context = self.browser.new_context(viewport={"width": 1280, "height": 900})
        self.addCleanup(self.context.close)
        self.page = self.context.new_page()
        self.problems = []
        self.page.on("console", lambda m: self.problems.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.problems.append(str(e)))
        self.page.on("dialog", self.on_dialog)
        self.confirming = False
        self.addCleanup(lambda: self.assertEqual(self.problems, [], "console errors or unexpected dialogs"))
        self.alice = self.api_key("alice", daily=50)
        self.bob = self.api_key("bob")

    def on_dialog(self, dialog):
        if dialog.type == "confirm" and self.confirming:
            dialog.accept()
        else:
            self.problems.append(f"unexpected {dialog.type}: {dialog.message}")
            dialog.dismiss()

    def api_key(self, name, **quota):
        status, _, body = self.request("POST", "/api/keys", dict(quota, name=name),
                                       headers={"Authorization": f"Bearer {ADMIN}"})
        self.assertEqual(status, 201, body)
        return body["key"]

    def ask(self, key, content="hello"):
        return self.request("POST", "/v1/chat/completions", {"model": "sonnet", "messages": [
            {"role": "user", "content": content}]}, headers={"Authorization": f"Bearer {key}"})[0]

    def open(self, key):
        page = self.page
        page.goto(f"http://127.0.0.1:{self.port}/dashboard")
        page.wait_for_selector("#login-key")
        page.fill("#login-key", key)
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#keys-table tbody tr")
        return page

    def key_row(self, name):
        return self.page.locator("#keys-table tbody tr").filter(
            has=self.page.locator("td", has_text=re.compile("^" + re.escape(name) + "$")))

    def test_admin_sees_everything_and_hostile_names_stay_text(self):
        self.server.wall = lambda: PLAN_RESET - 3600  # the fake CLI's windows are current (past ones are not shown)
        self.api_key(HOSTILE)
        for _ in range(3):
            self.ask(self.alice)
        self.ask(self.bob, "x " + directive(error="overloaded"))
        page = self.open(ADMIN)
        self.assertEqual(page.locator("#who").inner_text(), "admin (admin)")
        self.assertRegex(page.locator("#health-text").inner_text(),
                         r"warm pool: \d+ warm, \d+ holding a conversation, \d+ of \d+ MB; 2 hits \(0 continued\), 2 misses")
        self.assertEqual(self.key_row("alice").count(), 1, "a key created through the API")
        self.assertEqual(self.key_row(HOSTILE).count(), 1, "the name shows as text")
        self.assertEqual(page.locator("#keys-table script").count(), 0)
        self.assertGreaterEqual(page.locator("#plan .bar > div").count(), 2, "plan bars")
        self.assertGreater(page.locator("#chart-requests rect").count(), 0, "a chart with data")
        self.assertEqual(page.locator("#recent-table tbody tr").count(), 4)
        self.assertEqual(page.evaluate("document.cookie"), "", "the session cookie is HttpOnly")
        self.assertEqual(page.evaluate("localStorage.length + sessionStorage.length"), 0)
        self.assertNotIn("ocp_", page.url)
        [cookie] = self.context.cookies()
        self.assertEqual((cookie["httpOnly"], cookie["sameSite"]), (True, "Strict"))
        os.makedirs(SCREENSHOTS, exist_ok=True)
        page.screenshot(path=os.path.join(SCREENSHOTS, "dashboard-desktop.png"), full_page=True)
        self.assertIn("all", self.key_row("alice").inner_text(), "each key's model allowlist")
        ticks = page.locator("#chart-requests text.tick").all_text_contents()
        self.assertEqual(ticks, ["0", "2", "4"], "round, distinct axis ticks for at most 4 requests an hour")
        page.set_viewport_size({"width": 390, "height": 844})
        page.reload()
        page.wait_for_selector("#keys-table tbody tr")
        for name in ("Set quota", "Revoke"):  # reachable on a phone, without sideways scrolling
            box = self.key_row("alice").locator("button", has_text=name).bounding_box()
            self.assertLessEqual(box["x"] + box["width"], 390, name)
        self.assertLessEqual(page.evaluate("document.querySelector('#keys-table').scrollWidth"), 390)
        page.screenshot(path=os.path.join(SCREENSHOTS, "dashboard-phone.png"), full_page=True)

    def test_create_set_quota_and_revoke_in_the_ui(self):
        page = self.open(ADMIN)
        page.fill("#new-name", "tablet")
        page.fill("#new-daily", "5")
        page.click("#create-form button[type=submit]")
        page.wait_for_selector("#new-secret:not(.hidden)")
        secret = page.locator("#new-secret-value").inner_text()
        self.assertRegex(secret, r"^ocp_[A-Za-z0-9_-]{32}$")
        self.key_row("tablet").wait_for()
        self.assertEqual(self.request("GET", "/v1/models", headers={"Authorization": f"Bearer {secret}"})[0], 200)
        keys = self.request("GET", "/api/keys", headers={"Authorization": f"Bearer {ADMIN}"})[2]["data"]
        self.assertEqual([k["quota"]["daily"] for k in keys if k["name"] == "tablet"], [5])

        row = self.key_row("alice")
        row.locator("input[name=daily]").fill("7")
        row.locator("button", has_text="Set quota").click()
        page.wait_for_function("() => [...document.querySelectorAll('#keys-table tbody tr')].some("
                               "r => r.dataset.keyName === 'alice' && r.textContent.includes('0 / 7'))")

        self.confirming = True
        self.key_row("tablet").locator("button", has_text="Revoke").click()
        page.wait_for_function("() => [...document.querySelectorAll('#keys-table tbody tr')].some("
                               "r => r.dataset.keyName === 'tablet' && r.textContent.includes('revoked'))")
        self.assertEqual(self.request("GET", "/v1/models", headers={"Authorization": f"Bearer {secret}"})[0], 401)

    def test_a_member_sees_only_its_own_rows_and_can_log_out(self):
        self.ask(self.alice)
        self.ask(self.bob)
        self.ask(self.bob)
        page = self.open(self.alice)
        self.assertEqual(page.locator("#who").inner_text(), "alice")
        self.assertEqual(page.locator("#keys-table tbody tr").count(), 1)
        cells = page.locator("#recent-table tbody tr td:nth-child(2)").all_inner_texts()
        self.assertEqual(cells, ["alice"])
        self.assertFalse(page.locator("#create-form").is_visible(), "no admin actions")
        self.assertNotIn("bob", page.locator("main").inner_text())
        page.click("#logout")
        page.wait_for_selector("#login:not(.hidden)")
        self.assertEqual(self.context.cookies(), [])

    def test_the_plan_shows_who_spent_it_and_a_member_near_its_quota_is_warned(self):
        self.server.wall = lambda: PLAN_RESET - 3600  # the fake CLI's windows are current
        carol = self.api_key("carol", daily=5)
        for number, (key, utilization) in enumerate(((carol, 0.20), (self.bob, 0.30), (carol, 0.35), (carol, 0.40),
                                                     (carol, 0.45))):
            self.ask(key, f"t{number} " + directive(plan=utilization))
        page = self.open(ADMIN)
        self.assertGreaterEqual(page.locator("#plan .stack > span").count(), 2, "a stacked bar of who spent it")
        legend = page.locator("#plan .shares").first.inner_text()
        self.assertIn("carol ≈", legend)
        self.assertIn("bob ≈", legend)
        self.assertIn("An estimate", page.locator("#plan").inner_text())
        self.assertFalse(page.locator("#quota-warning").is_visible())
        page.click("#logout")
        page.wait_for_selector("#login:not(.hidden)")
        page = self.open(carol)
        self.assertRegex(page.locator("#quota-warning").inner_text(),
                         r"^You have used 4 of 5 requests today; it resets in \d+h \d+m\.$")
        self.assertNotIn("bob", page.locator("#plan").inner_text(), "a member sees only its own share")
        self.assertIn("carol ≈", page.locator("#plan").inner_text())


if __name__ == "__main__":
    unittest.main()
