"""The plans Anthropic sells now: every window by name, per-model limits, a forecast, alerts,
the CLI a model needs, nothing started while held, and keys that end."""

import json
import os
import socket
import threading
import time
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import ocp
from helpers import ServerTest, TempHome, directive, wait_until
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


WEEK_RESET = 1795838400  # the fake CLI's weekly reset
OAUTH = {"CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-test"}  # subscription mode: the fake CLI reports the plan


class PlanTest(ServerTest):
    env = dict(OAUTH, CLAUDE_AUTH_MODE="multi", OCP_ADMIN_KEY=ADMIN)

    def setUp(self):
        super().setUp()
        self.now = NOW
        self.server.wall = lambda: self.now
        status, _, body = self.admin("POST", "/api/keys", {"name": "ann"})
        self.ann = body["key"]

    def admin(self, method, path, body=None):
        return self.request(method, path, body, headers={"Authorization": f"Bearer {ADMIN}"})

    def ask(self, content="hi", model="sonnet", key=None, path="/v1/chat/completions"):
        body = {"model": model, "messages": [{"role": "user", "content": content}]}
        if path == "/v1/responses":
            body = {"model": model, "input": content}
        return self.request("POST", path, body, headers={"Authorization": f"Bearer {key or self.ann}"})

    def plan(self):
        return self.admin("GET", "/usage")[2]["plan"]


class EveryWindowByName(PlanTest):
    def test_a_per_model_window_is_kept_shown_and_sent_to_claude_code(self):
        self.ask(directive(claim="seven_day_opus", claim_status="allowed_warning", claim_utilization=0.91),
                 model="opus")
        windows = {w["window"]: w for w in self.plan()["windows"]}
        self.assertEqual(list(windows), ["five_hour", "seven_day", "seven_day_opus"], "display order")
        self.assertEqual((windows["seven_day_opus"]["label"], windows["seven_day_opus"]["utilization_pct"],
                          windows["seven_day_opus"]["status"]), ("weekly Opus", 91.0, "allowed_warning"))
        status, headers, _ = self.request("POST", "/v1/messages", {"model": "opus", "max_tokens": 100, "messages": [
            {"role": "user", "content": "hi"}]}, headers={"x-api-key": self.ann})
        self.assertEqual(status, 200)
        self.assertEqual((headers["anthropic-ratelimit-unified-7d_opus-utilization"],
                          headers["anthropic-ratelimit-unified-7d_opus-status"]), ("0.91", "allowed_warning"))
        metrics = self.admin("GET", "/metrics")[2]
        self.assertIn('ocp_plan_utilization{window="seven_day_opus"} 0.91', metrics)
        self.ask(directive(claim="seven_day_opus", claim_utilization=0.93), model="sonnet")  # the rise after ann's
        shares = self.admin("GET", "/api/usage?all=true")[2]["plan_share"]["windows"]  # opus requests is ann's
        self.assertEqual({k["key"]: k["share_pct"] for k in shares["seven_day_opus"]["keys"]},
                         {"(outside OCP)": 91.0, "ann": 2.0})
        self.assertEqual([k["key"] for k in shares["five_hour"]["keys"]][0], "(outside OCP)")

    def test_a_weekly_only_account_is_shown_weekly_first_and_codex_gets_it_as_primary(self):
        self.ask(directive(weekly_only=True))
        status, headers, _ = self.ask(directive(weekly_only=True), path="/v1/responses")
        self.assertEqual(status, 200)
        self.assertEqual([w["window"] for w in self.plan()["windows"]], ["seven_day"])
        dashboard = self.request("GET", "/dashboard/data", headers={"Authorization": f"Bearer {ADMIN}"})[2]
        self.assertEqual([(w["window"], w["label"]) for w in dashboard["plan"]["windows"]], [("seven_day", "weekly")])
        self.assertTrue(dashboard["plan"]["windows"][0]["forecast"]["estimate"])
        self.assertEqual((headers["x-codex-primary-used-percent"], headers["x-codex-primary-window-minutes"]),
                         ("45", "10080"))
        self.assertNotIn("x-codex-secondary-used-percent", headers)
        status, headers, _ = self.request("POST", "/v1/messages", {"model": "sonnet", "max_tokens": 100, "messages": [
            {"role": "user", "content": "hi"}]}, headers={"x-api-key": self.ann})
        self.assertEqual(headers["anthropic-ratelimit-unified-representative-claim"], "seven_day")
        self.assertNotIn("anthropic-ratelimit-unified-5h-utilization", headers)

    def test_a_window_the_cli_stopped_reporting_is_gone_after_its_reset(self):
        self.ask()
        self.assertEqual([w["window"] for w in self.plan()["windows"]], ["five_hour", "seven_day"])
        self.now = 1795503600 + 60  # past the 5-hour reset; the account lost its 5-hour window
        self.ask(directive(weekly_only=True))
        self.assertEqual([w["window"] for w in self.plan()["windows"]], ["seven_day"])
        self.assertNotIn("five_hour", self.server.plan.snapshot()["windows"], "not kept either")


class AMemberSeesItsOwn(PlanTest):
    def test_the_forecast_names_no_other_key_to_a_member(self):
        bob = self.admin("POST", "/api/keys", {"name": "bob"})[2]["key"]
        for i, (key, plan) in enumerate(((self.ann, 0.2), (bob, 0.3), (self.ann, 0.4), (bob, 0.5))):
            self.now = NOW + 400 * i
            self.ask(directive(plan=plan), key=key)
        mine = self.request("GET", "/dashboard/data", headers={"Authorization": f"Bearer {bob}"})[2]
        drivers = [d["key"] for w in mine["plan"]["windows"] for d in w["forecast"]["drivers"]]
        self.assertEqual(set(drivers), {"bob"})
        self.assertNotIn("ann", json.dumps(mine["plan"]))
        everyone = self.request("GET", "/dashboard/data", headers={"Authorization": f"Bearer {ADMIN}"})[2]
        self.assertLessEqual({"ann", "bob"}, {d["key"] for d in everyone["plan"]["windows"][0]["forecast"]["drivers"]})


class PerModelLimits(PlanTest):
    def test_a_rejected_opus_window_holds_opus_only(self):
        status, headers, body = self.ask(directive(error="plan_limit", limit_window="seven_day_opus"), model="opus")
        self.assertEqual((status, body["error"]["code"]), (429, "usage_limit_reached"))
        self.assertEqual(headers["Retry-After"], str(WEEK_RESET - NOW))
        runs = len(self.runs())
        status, headers, body = self.ask(model="opus")
        self.assertEqual((status, body["error"]["code"]), (429, "usage_limit_reached"))
        self.assertIn("Opus limit resets in 3d 22h", body["error"]["message"])
        self.assertIn("Other models still work: claude-sonnet-5-5", body["error"]["message"])
        self.assertEqual(len(self.runs()), runs, "held by OCP: no CLI started")
        self.assertEqual(self.ask(model="sonnet")[0], 200, "other models are served")
        self.assertEqual(self.ask(model="haiku")[0], 200)
        plan = self.plan()
        self.assertEqual((plan["held_until"], [h["models"] for h in plan["held_models"]]), (None, ["opus"]))
        dashboard = self.request("GET", "/dashboard/data", headers={"Authorization": f"Bearer {ADMIN}"})[2]
        self.assertEqual([(h["models"], h["until"]) for h in dashboard["plan"]["held_models"]], [("opus", WEEK_RESET)])
        self.assertIn('ocp_plan_held_models{models="opus"} 1', self.admin("GET", "/metrics")[2])
        self.assertEqual(self.admin("GET", "/health")[2]["status"], "ok", "the plan-wide verdict is unaffected")

    def test_the_5_hour_limit_still_holds_everyone(self):
        self.assertEqual(self.ask(directive(error="plan_limit"))[0], 429)
        self.assertEqual(self.ask(model="haiku")[0], 429)
        self.assertEqual(self.plan()["held_until"], 1795503600)

    def test_the_reserve_applies_to_every_window_a_request_draws_from(self):
        self.server.config = ocp.dataclasses.replace(self.server.config, reserve_7d=20)
        low = self.admin("POST", "/api/keys", {"name": "kid", "priority": "low"})[2]["key"]
        self.ask(directive(claim="seven_day_opus", claim_utilization=0.85), model="opus")
        status, _, body = self.ask(model="opus", key=low)
        self.assertEqual((status, body["error"]["code"]), (429, "plan_reserved"))
        self.assertIn("weekly Opus window is 85% used", body["error"]["message"])
        self.assertEqual(self.ask(model="sonnet", key=low)[0], 200, "sonnet draws from seven_day (45%) only")
        self.assertEqual(self.ask(model="opus")[0], 200, "a normal key waits from 90%")


class NothingStartsWhileHeld(PlanTest):
    env = dict(PlanTest.env, OCP_POOL="1", OCP_POOL_SPARE_AFTER="1")  # a spare after any first use

    def test_no_cli_starts_once_a_limit_answer_is_known(self):
        self.assertEqual(self.ask()[0], 200)
        wait_until(lambda: self.server.runner.pool.snapshot()["warm"] >= 1)  # the pool's spare after a first use
        self.assertEqual(self.ask(directive(error="plan_limit"))[0], 429)
        runs, spawned = len(self.runs()), self.server.runner.pool.snapshot()["spawned"]
        time.sleep(1.0)  # a spare started after the limit answer would be running by now
        self.assertEqual(self.ask()[0], 429)
        self.assertEqual((len(self.runs()), self.server.runner.pool.snapshot()["spawned"]), (runs, spawned))


class AlertReceiver:
    """A local HTTP endpoint that records the JSON POSTed to it; it can answer late or fail."""

    def __init__(self, status=204, delay_s=0.0):
        self.events, self.attempts, self.status, self.delay_s = [], 0, status, delay_s
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.attempts += 1
                time.sleep(receiver.delay_s)
                if receiver.status < 300:
                    receiver.events.append(dict(json.loads(body), content_type=self.headers["Content-Type"]))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def kinds(self):
        return [e["event"] for e in self.events]


class AlertsTest(PlanTest):
    status, delay_s = 204, 0.0

    def setUp(self):
        self.receiver = AlertReceiver(self.status, self.delay_s)
        self.addCleanup(self.receiver.close)
        super().setUp()
        self.server.alerts.backoff_s = 0.01

    def server_env(self):
        return dict(self.env, OCP_ALERT_URL=self.receiver.url)

    def audited(self):
        return [row["target"] for row in self.server.store.audit_trail(100) if row["action"] == "alert"]


class AlertsTheOwnerSees(AlertsTest):
    def test_thresholds_a_forecast_and_a_hold_each_once(self):
        self.ask(directive(plan=0.5))
        self.now += 600
        self.ask(directive(plan=0.85))  # past 80 %, and 210 %/h: gone long before the reset
        self.now += 60
        self.ask(directive(plan=0.86))
        wait_until(lambda: len(self.receiver.events) >= 2)
        self.assertEqual(sorted(self.receiver.kinds()), ["plan_forecast", "plan_window"])
        window = next(e for e in self.receiver.events if e["event"] == "plan_window")
        self.assertEqual((window["window"], window["threshold_pct"], window["utilization_pct"]), ("five_hour", 80, 85.0))
        self.assertEqual(window["content_type"], "application/json")
        self.assertIn("5-hour window is 85% used (past 80%)", window["text"])
        self.assertIn("5-hour limit reached around", next(e for e in self.receiver.events
                                                           if e["event"] == "plan_forecast")["message"])
        self.assertEqual(self.ask(directive(error="plan_limit"))[0], 429)
        wait_until(lambda: "plan_held" in self.receiver.kinds())
        self.assertEqual(sorted(self.receiver.kinds()), ["plan_forecast", "plan_held", "plan_window", "plan_window"])
        self.assertEqual(sorted(self.audited()), sorted(self.receiver.kinds()), "each is in the audit log")

    def test_a_key_at_its_quota_and_a_broken_login(self):
        kid = self.admin("POST", "/api/keys", {"name": "kid", "daily": 1})[2]["key"]
        self.assertEqual(self.ask(key=kid)[0], 200)
        self.assertEqual(self.ask(key=kid)[0], 429)
        self.assertEqual(self.ask(key=kid)[0], 429)
        for _ in range(3):
            self.assertEqual(self.ask(directive(error="auth"))[0], 503)
        wait_until(lambda: len(self.receiver.events) >= 2)
        time.sleep(0.2)
        self.assertEqual(sorted(self.receiver.kinds()), ["login", "quota"], "each once")
        quota = next(e for e in self.receiver.events if e["event"] == "quota")
        self.assertEqual((quota["key"], quota["period"], quota["limit"]), ("kid", "day", 1))


class AlertsThatCannotBeDelivered(AlertsTest):
    status = 500

    def test_retries_are_bounded_and_requests_unaffected(self):
        kid = self.admin("POST", "/api/keys", {"name": "kid", "daily": 0})[2]["key"]
        self.assertEqual(self.ask(key=kid)[0], 429)
        wait_until(lambda: self.server.alerts.snapshot()["failed"] == 1)
        self.assertEqual(self.receiver.attempts, self.server.alerts.retries + 1)
        self.assertEqual(self.ask()[0], 200)

    def test_an_unreachable_url(self):
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        self.server.alerts.url = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"
        closed.close()
        kid = self.admin("POST", "/api/keys", {"name": "kid", "daily": 0})[2]["key"]
        self.assertEqual(self.ask(key=kid)[0], 429)
        wait_until(lambda: self.server.alerts.snapshot()["failed"] == 1)
        self.assertEqual(self.server.alerts.snapshot()["sent"], 0)


class AlertsThatTakeTheirTime(AlertsTest):
    delay_s = 1.2

    def test_a_slow_endpoint_never_slows_a_request(self):
        kid = self.admin("POST", "/api/keys", {"name": "kid", "daily": 0})[2]["key"]
        started = time.monotonic()
        self.assertEqual(self.ask(key=kid)[0], 429)
        self.assertEqual(self.ask()[0], 200)
        self.assertLess(time.monotonic() - started, 1.0, "the alert is sent beside the requests")
        wait_until(lambda: self.server.alerts.snapshot()["sent"] == 1, timeout=10)


class ACliThatFitsTheModels(PlanTest):
    env = dict(PlanTest.env, FAKE_CLAUDE_VERSION="2.1.200")

    def test_a_model_the_cli_is_too_old_for_is_a_clear_400_and_no_run(self):
        runs = len(self.runs())
        status, _, body = self.ask(model="opus")
        self.assertEqual((status, body["error"]["code"], body["error"]["param"]), (400, "claude_code_version_too_old", "model"))
        for words in ("claude-opus-5-5 needs the claude CLI 2.1.280", "this OCP has 2.1.200", "claude update"):
            self.assertIn(words, body["error"]["message"])
        self.assertEqual(len(self.runs()), runs)
        self.assertEqual(self.ask(model="sonnet")[0], 200)
        status, _, body = self.request("POST", "/v1/messages", {"model": "opus", "max_tokens": 10, "messages": [
            {"role": "user", "content": "hi"}]}, headers={"x-api-key": self.ann})
        self.assertEqual((status, body["type"], body["error"]["type"]), (400, "error", "invalid_request_error"))
        detail = self.admin("GET", "/health")[2]["detail"]
        self.assertEqual(detail["models_too_new_for_the_cli"], [{"model": "claude-opus-5-5", "needs": "2.1.280"}])

    def test_doctor_names_the_models_the_cli_cannot_serve(self):
        code, out, _ = run_main(["doctor", "--json"], self.environ(FAKE_CLAUDE_VERSION="2.1.200"))
        models = next(c for c in json.loads(out)["checks"] if c["id"] == "models")
        self.assertEqual(models["level"], "warn")
        self.assertIn("claude-opus-5-5 (needs 2.1.280)", models["message"])
        code, out, _ = run_main(["doctor", "--json"], self.environ())
        self.assertEqual(next(c for c in json.loads(out)["checks"] if c["id"] == "models")["level"], "ok")


class UpstreamSaysTheCliIsTooOld(PlanTest):
    def test_claude_code_version_too_old_from_upstream_is_the_same_error(self):
        status, _, body = self.ask(directive(error="version_too_old"), model="haiku")
        self.assertEqual((status, body["error"]["code"]), (400, "claude_code_version_too_old"))
        self.assertIn("claude-haiku-5-5 needs the claude CLI", body["error"]["message"])
        self.assertIn("this OCP has 2.1.330", body["error"]["message"])


class Forecasts(unittest.TestCase):
    """ocp.forecast on recorded utilization sequences ([time, fraction]); an estimate, labelled."""

    def test_a_steady_pace(self):
        readings = [[NOW + i * 600, 0.50 + 0.01 * i] for i in range(7)]  # 1 % every 10 minutes
        ahead = ocp.forecast(readings, 300, NOW + 4 * 3600, NOW + 3600)
        self.assertEqual((ahead["estimate"], ahead["pace_pct_per_hour"], ahead["based_on"]["readings"]), (True, 6.0, 7))
        self.assertEqual(ahead["runs_out_at"], NOW + 3600 + int(0.44 / 0.06 * 3600))
        self.assertFalse(ahead["before_reset"], "7.3 hours away; the window resets in 3")
        self.assertTrue(ocp.forecast(readings, 300, NOW + 9 * 3600, NOW + 3600)["before_reset"])

    def test_a_burst_is_read_as_the_pace_over_the_span(self):
        readings = [[NOW + i * 600, 0.30] for i in range(6)] + [[NOW + 3600, 0.60]]
        ahead = ocp.forecast(readings, 300, NOW + 3 * 3600, NOW + 3600)
        self.assertEqual(ahead["pace_pct_per_hour"], 30.0)
        self.assertEqual(ahead["runs_out_at"], NOW + 3600 + 4800)
        self.assertTrue(ahead["before_reset"])
        weekly = ocp.forecast([[NOW - 2 * 86400, 0.1], [NOW, 0.2]], ocp.WEEK_MINUTES, NOW + 86400, NOW)
        self.assertEqual(weekly["based_on"]["readings"], 1, "a weekly window reads its last day")
        self.assertIsNone(weekly["pace_pct_per_hour"])

    def test_no_pace_from_one_reading_a_short_span_or_no_rise(self):
        self.assertIsNone(ocp.forecast([[NOW, 0.5]], 300, NOW + 3600, NOW)["pace_pct_per_hour"])
        self.assertIsNone(ocp.forecast([[NOW, 0.5], [NOW + 60, 0.6]], 300, NOW + 3600, NOW + 60)["pace_pct_per_hour"])
        flat = ocp.forecast([[NOW, 0.5], [NOW + 900, 0.5]], 300, NOW + 3600, NOW + 900)
        self.assertEqual((flat["pace_pct_per_hour"], flat["runs_out_at"], flat["before_reset"]), (0.0, None, False))

    def test_a_reset_in_between_starts_the_readings_again(self):
        plan = ocp.PlanLimits()
        for i, u in enumerate((0.7, 0.8, 0.9)):
            plan.observe({"unifiedWindows": {"five_hour": {"utilization": u, "resetsAt": NOW + 1800}}}, NOW + i * 600)
        plan.observe({"unifiedWindows": {"five_hour": {"utilization": 0.05, "resetsAt": NOW + 1800 + 5 * 3600}}},
                     NOW + 1900)
        self.assertEqual(plan.snapshot()["readings"]["five_hour"], [[NOW + 1900, 0.05]])
        plan.observe({"unifiedWindows": {"five_hour": {"utilization": 0.25, "resetsAt": NOW + 1800 + 5 * 3600}}},
                     NOW + 1900 + 1800)
        report = ocp.plan_report(plan, NOW + 3700, tz=ocp.datetime.timezone.utc)
        ahead = report["windows"][0]["forecast"]
        self.assertEqual((ahead["pace_pct_per_hour"], ahead["before_reset"]), (40.0, True))
        self.assertIn("5-hour limit reached around", ahead["text"])
        self.assertEqual([d["key"] for d in ahead["drivers"]], ["(outside OCP)"])


if __name__ == "__main__":
    unittest.main()
