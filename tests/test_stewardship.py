"""Stewarding the subscription: priorities and a reserve of the plan's windows, token and cost
quotas that hold under concurrency, who spent the plan."""

import concurrent.futures
import json
import time

import ocp
from helpers import ServerTest, TempHome, directive
from test_cli import run_main

ADMIN = "ocp_admin_" + "s" * 32


class Household(ServerTest):
    env = {"CLAUDE_AUTH_MODE": "multi", "OCP_ADMIN_KEY": ADMIN, "OCP_TIMEZONE": "UTC"}

    def admin(self, method, path, body=None):
        return self.request(method, path, body, headers={"Authorization": f"Bearer {ADMIN}"})

    def add_key(self, name, **policy):
        status, _, body = self.admin("POST", "/api/keys", dict(policy, name=name))
        self.assertEqual(status, 201, body)
        return body["key"]

    def ask(self, secret, content="hi", **params):
        body = {"model": params.pop("model", "sonnet"), "messages": [{"role": "user", "content": content}]}
        body.update(params)
        return self.request("POST", "/v1/chat/completions", body, headers={"Authorization": f"Bearer {secret}"})

    def at_once(self, count, call):
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            return list(pool.map(lambda _: call(), range(count)))

    def report(self, five_hour, seven_day=0.10, resets_in=3600):
        """The plan as a rate_limit_event reports it."""
        now = self.server.wall()
        self.server.plan.observe({"unifiedWindows": {
            "five_hour": {"utilization": five_hour, "resetsAt": int(now + resets_in), "status": "allowed"},
            "seven_day": {"utilization": seven_day, "resetsAt": int(now + 4 * 86400), "status": "allowed"}}})


class Reserve(Household):
    env = dict(Household.env, OCP_RESERVE_5H="20")

    def test_low_priority_keys_wait_past_the_reserve_and_high_ones_are_served(self):
        kid = self.add_key("kid", priority="low")
        member = self.add_key("member")
        owner = self.add_key("owner", priority="high")
        self.report(0.85)
        answers = self.at_once(40, lambda: self.ask(kid))
        self.assertEqual({status for status, _, _ in answers}, {429})
        _, headers, body = answers[0]
        self.assertEqual(body["error"]["code"], "plan_reserved")
        self.assertIn("kept for higher-priority keys", body["error"]["message"])
        self.assertTrue(3500 <= int(headers["Retry-After"]) <= 3600, headers["Retry-After"])
        self.assertEqual(headers["x-should-retry"], "false")
        self.assertEqual(self.runs(), [], "no CLI was started for a refused request")
        self.assertEqual(self.ask(member)[0], 200, "a normal key waits only past 100 - 20/2 %")
        self.assertEqual(self.ask(owner)[0], 200)
        self.assertEqual(self.request("POST", "/v1/chat/completions", {"model": "sonnet", "messages": [
            {"role": "user", "content": "hi"}]}, headers={"Authorization": f"Bearer {ADMIN}"})[0], 200,
            "the owner's admin key is high priority")
        self.report(0.92)
        self.assertEqual(self.ask(member)[2]["error"]["code"], "plan_reserved")
        self.assertEqual(self.ask(owner)[0], 200, "high never waits for the reserve")

    def test_the_owner_changes_the_reserve_without_a_restart(self):
        kid = self.add_key("kid", priority="low")
        self.report(0.85)
        self.assertEqual(self.ask(kid)[0], 429)
        status, _, result = self.admin("PATCH", "/settings", {"reserve5h": 10})
        self.assertEqual((status, result["settings"]["reserve5h"]["value"]), (200, 10))
        self.assertEqual(self.ask(kid)[0], 200, "85 % < 100 - 10")
        self.assertEqual(self.admin("PATCH", "/settings", {"reserve5h": 101})[0], 400)

    def test_a_window_that_reset_holds_nothing_back(self):
        kid = self.add_key("kid", priority="low")
        self.report(0.95, resets_in=-10)
        self.assertEqual(self.ask(kid)[0], 200)

    def test_priority_is_set_and_changed_like_a_quota(self):
        self.add_key("kid", priority="low")
        status, _, body = self.admin("PATCH", "/api/keys/kid/quota", {"priority": "high"})
        self.assertEqual((status, body["priority"]), (200, "high"))
        status, _, body = self.admin("PATCH", "/api/keys/kid/quota", {"priority": "urgent"})
        self.assertEqual((status, body["error"]["param"]), (400, "priority"))


class QuotasUnderConcurrency(Household):
    def test_a_token_quota_holds_when_twenty_requests_come_at_once(self):
        secret = self.add_key("kid", tokens_daily=150)
        slow = directive(pace_ms=40, deltas=5)
        answers = self.at_once(20, lambda: self.ask(secret, "hello " + slow))
        admitted = [a for a in answers if a[0] == 200]
        refused = [a for a in answers if a[0] == 429]
        self.assertEqual((len(admitted), len(refused)), (1, 19), "a request is admitted while its estimate fits")
        self.assertEqual({a[2]["error"]["quota"]["unit"] for a in refused}, {"tokens"})
        rows = [r for r in self.server.store.usage_rows(None, None, 0, 2 ** 40, 100) if r["status"] == "ok"]
        spent = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
        # The documented bound: the quota, plus what the requests admitted while their estimates fit
        # used beyond them. No answer anywhere yet, so the estimate was ocp.TOKEN_GUESS: one request
        # (0 + 100 <= 150; a second would need 200). Its ~4,400 tokens are the fake CLI's, as real
        # answers count the CLI's own system prompt. Before: all 20 were admitted (20 x that).
        self.assertEqual(len(rows), 1)
        self.assertGreater(spent, 150)
        self.assertEqual(self.ask(secret)[0], 429, "the next estimate is the last answers': it cannot fit")
        other = self.add_key("other", tokens_daily=150)
        self.assertEqual(self.ask(other)[0], 429, "a new key's estimate is everyone's recent answers")

    def test_a_cost_quota_refuses_the_request_its_estimate_would_carry_past_it(self):
        secret = self.add_key("kid", cost_daily=0.03)  # the fake CLI's answers cost $0.017952
        self.assertEqual(self.ask(secret)[0], 200)
        status, _, body = self.ask(secret)
        self.assertEqual((status, body["error"]["quota"]["unit"], body["error"]["quota"]["period"]), (429, "USD", "day"))
        self.assertIn("0.018/0.03 USD today", body["error"]["message"])


class KeyPolicyOnTheCommandLine(TempHome):
    def test_keys_add_and_quota_take_a_priority_and_cost_limits(self):
        env = self.environ()
        code, out, err = run_main(["keys", "add", "kid", "--priority", "low", "--cost-daily", "1.50", "--json"], env)
        self.assertEqual(code, 0, err)
        key = json.loads(out)
        self.assertEqual((key["priority"], key["quota"]["cost_daily"]), ("low", 1.5))
        code, out, _ = run_main(["keys", "quota", "kid", "--priority", "normal", "--cost-weekly", "none", "--json"], env)
        self.assertEqual(json.loads(out)["priority"], "normal")
        code, out, _ = run_main(["keys"], env)
        self.assertIn("PRIORITY", out)
        self.assertIn("normal", out)
        code, _, err = run_main(["keys", "add", "x", "--priority", "vip"], env)
        self.assertEqual(code, 2)


PLAN_RESET = 1795503600  # the fake CLI's 5-hour reset


class PlanTest(Household):
    """The fake CLI reports the plan (a subscription login), its windows current."""

    env = dict(Household.env, CLAUDE_CODE_OAUTH_TOKEN="sk-ant-oat01-share")

    def setUp(self):
        super().setUp()
        self.server.wall = lambda: PLAN_RESET - 3600


class PlanShare(PlanTest):
    COSTS = {"ann": 0.01, "ben": 0.02, "cat": 0.03}
    PER_USD = 2.0  # the fake plan: each dollar of answers raises the 5-hour window by 200 points

    def test_the_windows_rises_are_shared_by_cost_and_shown_everywhere(self):
        secrets = {name: self.add_key(name) for name in self.COSTS}
        utilization, rounds = 0.10, 3
        order = [name for _ in range(rounds) for name in self.COSTS] + ["ann"]  # the last one reports the rest
        for number, name in enumerate(order):
            cost = self.COSTS[name] if number < len(order) - 1 else 0.0
            status, _, body = self.ask(secrets[name], f"turn {number} " + directive(
                plan=round(utilization, 4), plan_week=0.40, cost=cost or 0.000001))
            self.assertEqual(status, 200, body)
            utilization += cost * self.PER_USD
        status, _, body = self.admin("GET", "/api/usage?all=true")
        share = body["plan_share"]
        self.assertIn("estimate", share["note"])
        five = {k["key"]: k["share_pct"] for k in share["windows"]["five_hour"]["keys"]}
        for name, cost in self.COSTS.items():  # rounds x cost x 200 points
            self.assertAlmostEqual(five[name], rounds * cost * self.PER_USD * 100, delta=0.1, msg=five)
        self.assertAlmostEqual(five["(outside OCP)"], 10.0, delta=0.1, msg="the first report: before OCP saw any")
        self.assertAlmostEqual(share["windows"]["five_hour"]["utilization_pct"], sum(five.values()), delta=0.2)
        _, _, mine = self.ask_usage(secrets["ben"])
        self.assertEqual([k["key"] for k in mine["plan_share"]["windows"]["five_hour"]["keys"]], ["ben"],
                         "a member sees only its own share")
        _, _, text = self.admin("GET", "/metrics")
        self.assertIn('ocp_plan_share_percent{window="five_hour",key="cat"} 18.0', text)
        _, _, data = self.admin("GET", "/dashboard/data")
        self.assertEqual({k["key"] for k in data["plan"]["share"]["windows"]["five_hour"]["keys"]},
                         set(self.COSTS) | {"(outside OCP)"})

    def ask_usage(self, secret):
        return self.request("GET", "/api/usage", headers={"Authorization": f"Bearer {secret}"})

    def test_usage_by_key_prints_the_shares_and_says_they_are_estimates(self):
        secret = self.add_key("ann")
        for number, utilization in enumerate((0.10, 0.15)):
            self.ask(secret, f"t{number} " + directive(plan=utilization))
        self.server.store.save_state("plan", self.server.plan.snapshot())
        code, out, err = run_main(["usage", "--by-key"], dict(self.environ(), OCP_ADMIN_KEY=ADMIN))
        self.assertEqual(code, 0, err)
        self.assertIn("~% 5H", out)
        self.assertIn("An estimate", out)


class Headers(PlanTest):
    def test_answers_tell_a_member_its_remaining_quota_and_its_share_of_the_plan(self):
        secret = self.add_key("ann", daily=10, tokens_daily=100000, cost_daily=1)
        self.ask(secret, "one " + directive(plan=0.10, cost=0.01))
        self.ask(secret, "two " + directive(plan=0.12, cost=0.01))
        status, headers, _ = self.ask(secret, "three")  # (headers say what was known when it was admitted)
        self.assertEqual(status, 200)
        self.assertEqual((headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]), ("10", "7"))
        self.assertEqual(headers["x-ratelimit-limit-tokens"], "100000")
        self.assertLess(int(headers["x-ratelimit-remaining-tokens"]), 100000 - 4000, "the first answer's tokens")
        self.assertEqual(headers["x-ocp-ratelimit-limit-usd"], "1.0000")
        self.assertEqual(headers["x-ocp-plan-utilization-5h"], "12")
        self.assertEqual(headers["x-ocp-plan-share-5h"], "2", "the rise from 10 to 12 % was ann's first answer")
        self.assertEqual(headers["x-ocp-plan-reset-5h"], str(PLAN_RESET))


class ExtraUsage(PlanTest):
    def test_status_and_the_dashboard_say_whether_extra_usage_is_on_and_what_ocp_spent_of_it(self):
        secret = self.add_key("ann")
        self.ask(secret, "paid " + directive(overage=True, cost=0.25))
        status, _, data = self.admin("GET", "/dashboard/data")
        plan = data["plan"]
        self.assertEqual((plan["extra_usage"], plan["overage"]), ("on", True))
        self.assertEqual(plan["overage_spent"], {"requests": 1, "cost_usd": 0.25})
        env = dict(self.environ(), OCP_ADMIN_KEY=ADMIN, CLAUDE_PROXY_PORT=str(self.port))
        code, out, err = run_main(["status"], env)
        self.assertEqual(code, 0, err)
        self.assertIn("extra usage on the account: on, paying answers now", out)
        self.assertIn("OCP's answers paid from it: 1 (~$0.25)", out)
        self.assertIn("plan five_hour: 12% used", out)


class Priorities(TempHome):
    def test_who_is_what(self):
        self.assertEqual([ocp.Caller(name).priority for name in ("local", "shared", "anonymous")],
                         ["high", "normal", "low"])
        self.assertEqual(ocp.Caller("admin", admin=True).priority, "high")
