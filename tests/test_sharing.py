"""Sharing: keys stored as hashes, exact quotas, usage, admin routes, browser safety, the original's DB."""

import contextlib
import datetime
import glob
import http.client
import io
import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import unittest
import zoneinfo

import ocp
from helpers import ROOT, ServerTest, TempHome, connectable, directive, free_port, wait_until
from test_cli import run_main

ADMIN = "ocp_admin_key_for_tests_0000000000"
UTC = datetime.timezone.utc


def epoch(*args, tz=UTC):
    return int(datetime.datetime(*args, tzinfo=tz).timestamp())


def raw_database_bytes(home):
    data = b""
    for path in glob.glob(os.path.join(home, "ocp.db*")):
        with open(path, "rb") as f:
            data += f.read()
    return data


class QuotaWindows(unittest.TestCase):
    def test_day_week_month_in_utc(self):
        now = epoch(2026, 11, 25, 15, 30)  # a Wednesday
        bounds = ocp.period_bounds(now, UTC)
        self.assertEqual(bounds["day"], (epoch(2026, 11, 25), epoch(2026, 11, 26)))
        self.assertEqual(bounds["week"], (epoch(2026, 11, 23), epoch(2026, 11, 30)))
        self.assertEqual(bounds["month"], (epoch(2026, 11, 1), epoch(2026, 12, 1)))

    def test_december_rolls_into_january(self):
        bounds = ocp.period_bounds(epoch(2026, 12, 31, 23, 59), UTC)
        self.assertEqual(bounds["month"], (epoch(2026, 12, 1), epoch(2027, 1, 1)))
        self.assertEqual(bounds["day"][1], epoch(2027, 1, 1))

    def test_operator_time_zone_and_dst(self):
        york = zoneinfo.ZoneInfo("America/New_York")
        now = epoch(2026, 3, 8, 12, 0, tz=york)  # clocks went forward at 2am: a 23-hour day
        start, reset = ocp.period_bounds(now, york)["day"]
        self.assertEqual((start, reset), (epoch(2026, 3, 8, tz=york), epoch(2026, 3, 9, tz=york)))
        self.assertEqual(reset - start, 23 * 3600)

    def test_format_wait(self):
        for seconds, text in ((45, "45s"), (125, "2m 5s"), (6 * 3600 + 12 * 60, "6h 12m"), (3 * 86400 + 4 * 3600, "3d 4h")):
            with self.subTest(seconds):
                self.assertEqual(ocp.format_wait(seconds), text)

    def test_quota_error_body(self):
        breach = {"period": "day", "unit": "requests", "limit": 20, "used": 20, "resets_at": 1000 + 6 * 3600 + 12 * 60}
        error = ocp.quota_error(breach, 1000)
        self.assertEqual(error.status, 429)
        self.assertEqual(error.body(), {"error": {
            "message": "Quota exceeded: 20/20 requests today. Resets in 6h 12m. For more, ask the owner of this OCP "
                       "to raise this key's quota.", "type": "insufficient_quota",
            "param": None, "code": "quota_exceeded",
            "quota": {"period": "day", "limit": 20, "used": 20, "resets_at": 23320, "unit": "requests"}}})
        self.assertEqual(error.headers["Retry-After"], str(6 * 3600 + 12 * 60))


class KeyStore(TempHome):
    def setUp(self):
        super().setUp()
        os.makedirs(self.ocp_home)
        self.store = ocp.Store(os.path.join(self.ocp_home, "ocp.db"))
        self.addCleanup(self.store.close)

    def test_secret_shown_once_and_stored_as_a_hash(self):
        key, secret = self.store.add_key("laptop", ocp.KeyPolicy(), 1000)
        self.assertRegex(secret, r"^ocp_[A-Za-z0-9_-]{32}$")
        self.assertEqual(key.prefix, secret[:8])
        self.assertEqual(self.store.key_by_secret(secret, 1000).name, "laptop")
        self.assertIsNone(self.store.key_by_secret(secret + "x", 1000))
        self.assertNotIn(secret.encode(), raw_database_bytes(self.ocp_home))
        self.assertNotIn(secret[8:].encode(), raw_database_bytes(self.ocp_home))

    def test_names_are_unique_and_keys_addressed_by_name_or_id(self):
        key, _ = self.store.add_key("laptop", ocp.KeyPolicy(), 1000)
        with self.assertRaises(ocp.ApiError) as caught:
            self.store.add_key("laptop", ocp.KeyPolicy(), 1000)
        self.assertEqual(caught.exception.status, 409)
        self.assertEqual(self.store.find_key(str(key.id)).name, "laptop")
        self.assertEqual(self.store.find_key("laptop").id, key.id)
        with self.assertRaises(ocp.ApiError):
            self.store.find_key("nobody")

    def test_revoked_keys_stop_working(self):
        key, secret = self.store.add_key("phone", ocp.KeyPolicy(), 1000)
        self.assertTrue(self.store.revoke_key(key, 2000))
        self.assertFalse(self.store.revoke_key(key, 3000))
        self.assertIsNone(self.store.key_by_secret(secret, 1000))

    def test_schema_version_and_file_modes(self):
        self.assertEqual(self.store._execute("PRAGMA user_version")[0][0], len(ocp.MIGRATIONS))
        self.assertEqual(self.store._execute("PRAGMA journal_mode")[0][0], "wal")
        self.assertEqual(stat.S_IMODE(os.stat(self.store.path).st_mode), 0o600)
        again = ocp.Store(self.store.path)  # reopening runs no migration twice
        again.close()

    def test_reservations_count_and_release(self):
        key, _ = self.store.add_key("kid", ocp.KeyPolicy(daily=2), 1000)
        bounds = ocp.period_bounds(5000, UTC)
        first, counts = self.store.reserve(key, key.name, "m", "r1", 5000, bounds)
        self.assertEqual(counts["day"], 1)
        second, _ = self.store.reserve(key, key.name, "m", "r2", 5000, bounds)
        with self.assertRaises(ocp.QuotaExceeded):
            self.store.reserve(key, key.name, "m", "r3", 5000, bounds)
        self.store.finish(second, "error", 502)
        third, _ = self.store.reserve(key, key.name, "m", "r4", 5000, bounds)
        self.store.finish(third, "cancelled", 499)
        self.store.finish(first, "ok", 200, ocp.Usage(input=10, output=5))
        self.store.reserve(key, key.name, "m", "r5", 5000, bounds)
        with self.assertRaises(ocp.QuotaExceeded):
            self.store.reserve(key, key.name, "m", "r6", 5000, bounds)

    def test_token_quota(self):
        key, _ = self.store.add_key("kid", ocp.KeyPolicy(tokens_daily=100), 1000)
        bounds = ocp.period_bounds(5000, UTC)
        row, _ = self.store.reserve(key, key.name, "m", "r1", 5000, bounds)
        self.store.finish(row, "ok", 200, ocp.Usage(input=90, output=20))
        with self.assertRaises(ocp.QuotaExceeded) as caught:
            self.store.reserve(key, key.name, "m", "r2", 5000, bounds)
        self.assertEqual(caught.exception.breach["unit"], "tokens")

    def test_stale_reservations_are_released_at_start(self):
        key, _ = self.store.add_key("kid", ocp.KeyPolicy(daily=1), 1000)
        bounds = ocp.period_bounds(5000, UTC)
        self.store.reserve(key, key.name, "m", "r1", 5000, bounds)
        self.store.cancel_stale()
        self.store.reserve(key, key.name, "m", "r2", 5000, bounds)


LEGACY_SCHEMA = """
CREATE TABLE api_keys (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT UNIQUE NOT NULL, name TEXT NOT NULL,
  created_at TEXT NOT NULL DEFAULT (datetime('now')), revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE usage_log (id INTEGER PRIMARY KEY AUTOINCREMENT, key_id INTEGER, key_name TEXT NOT NULL DEFAULT 'anonymous',
  model TEXT NOT NULL, prompt_chars INTEGER NOT NULL DEFAULT 0, response_chars INTEGER NOT NULL DEFAULT 0,
  elapsed_ms INTEGER NOT NULL DEFAULT 0, success INTEGER NOT NULL DEFAULT 1,
  created_at TEXT NOT NULL DEFAULT (datetime('now')), FOREIGN KEY (key_id) REFERENCES api_keys(id));
CREATE INDEX idx_usage_created ON usage_log(created_at);
CREATE INDEX idx_usage_key ON usage_log(key_id);
CREATE TABLE response_cache (id INTEGER PRIMARY KEY AUTOINCREMENT, hash TEXT UNIQUE NOT NULL, model TEXT NOT NULL,
  response TEXT NOT NULL, created_at TEXT NOT NULL DEFAULT (datetime('now')), last_hit_at TEXT, hits INTEGER NOT NULL DEFAULT 0);
ALTER TABLE api_keys ADD COLUMN quota_daily INTEGER DEFAULT NULL;
ALTER TABLE api_keys ADD COLUMN quota_weekly INTEGER DEFAULT NULL;
ALTER TABLE api_keys ADD COLUMN quota_monthly INTEGER DEFAULT NULL;
"""
LEGACY_KEYS = [("ocp_Legacy0wife0laptop000000000000", "wife-laptop", 0, 20),
               ("ocp_Legacy0son0ipad000000000000000", "son-ipad", 0, None),
               ("ocp_Legacy0duplicate0name000000000", "son-ipad", 0, None),
               ("ocp_Legacy0revoked000000000000000x", "old-phone", 1, None)]


def build_legacy_database(path):
    """A database as the Node original (keys.mjs) leaves it, with plaintext keys and history."""
    db = sqlite3.connect(path)
    db.executescript(LEGACY_SCHEMA)
    db.execute("PRAGMA journal_mode = WAL")
    for key, name, revoked, daily in LEGACY_KEYS:
        db.execute("INSERT INTO api_keys (key, name, revoked, quota_daily, created_at) VALUES (?, ?, ?, ?, "
                   "'2026-01-05 10:00:00')", (key, name, revoked, daily))
    for i in range(7):
        db.execute("INSERT INTO usage_log (key_id, key_name, model, elapsed_ms, success, created_at) VALUES "
                   "(?, ?, 'claude-sonnet-4-6', 1200, ?, datetime('now', '-1 day'))",
                   (1 if i < 5 else 2, "wife-laptop" if i < 5 else "son-ipad", 0 if i == 4 else 1))
    db.execute("INSERT INTO response_cache (hash, model, response) VALUES ('h', 'm', 'a cached answer')")
    db.commit()
    db.close()


class Retention(KeyStore):
    DAY = 86400

    def test_old_usage_is_folded_into_daily_totals_and_old_audit_rows_go(self):
        key, _ = self.store.add_key("laptop", ocp.KeyPolicy(), 0)
        now = 1_800_000_000
        for age_days, status, tokens in ((500, "ok", 10), (500, "ok", 20), (450, "error", 0), (10, "ok", 5)):
            row, _ = self.store.reserve(key, key.name, "m", "r", now - age_days * self.DAY,
                                        ocp.period_bounds(now - age_days * self.DAY, datetime.timezone.utc))
            self.store.finish(row, status, 200, ocp.Usage(input=tokens, output=1))
            self.store.audit("test", "x", "y", "", now - age_days * self.DAY)
        before = self.store.usage_by_key(0, now + 1)
        self.assertEqual(self.store.prune(now, 400, 30), (3, 3))
        self.assertEqual(self.store.usage_by_key(0, now + 1), before, "totals survive in usage_daily")
        self.assertEqual(len(self.store.usage_rows(None, None, 0, now + 1, 100)), 1)
        self.assertEqual([a["at"] for a in self.store.audit_trail(100)], [now - 10 * self.DAY])
        self.assertEqual(self.store.prune(now, 400, 30), (0, 0))

    def test_modes_are_tightened_again_at_start(self):
        config = ocp.load_config(self.environ())
        logs = os.path.join(self.ocp_home, "logs")
        os.makedirs(logs)
        self.store.save_state("x", 1)  # the WAL files exist
        paths = [os.path.join(logs, "ocp.log"), os.path.join(logs, "ocp.log.1"), config.settings_path]
        for path in paths:
            open(path, "w").close()
        paths += [config.db_path + "-wal", config.db_path + "-shm", config.db_path]
        for path in paths + [logs, self.ocp_home]:
            os.chmod(path, 0o777 if os.path.isdir(path) else 0o666)
        ocp.tighten_home(config)
        for path in paths:
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)
        for path in (logs, self.ocp_home):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700, path)


class AnOlderOriginalsDatabase(TempHome):
    def test_without_quota_or_revoked_columns(self):
        os.makedirs(self.ocp_home)
        path = os.path.join(self.ocp_home, "ocp.db")
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE api_keys (id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, name TEXT NOT NULL)")
        db.execute("INSERT INTO api_keys (key, name) VALUES ('ocp_Older0release0key000000000000', '7')")
        db.commit()
        db.close()
        store = ocp.Store(path)
        self.addCleanup(store.close)
        key = store.key_by_secret("ocp_Older0release0key000000000000", 1000)
        self.assertEqual((key.name, key.revoked_at, key.policy.daily), ("key-7", None, None))


class TheNodeOriginalsDatabase(TempHome):
    def setUp(self):
        super().setUp()
        os.makedirs(self.ocp_home)
        self.path = os.path.join(self.ocp_home, "ocp.db")
        build_legacy_database(self.path)

    def test_is_migrated_in_place(self):
        store = ocp.Store(self.path)
        self.addCleanup(store.close)
        for secret, name, revoked, daily in LEGACY_KEYS:
            key = store.key_by_secret(secret, 1000)
            if revoked:
                self.assertIsNone(key, "a revoked key stays revoked")
            else:
                self.assertIsNotNone(key, f"{name} still authenticates")
        self.assertEqual(store.key_by_secret(LEGACY_KEYS[0][0], 1000).policy.daily, 20)
        names = sorted(k.name for k in store.keys())
        self.assertEqual(names, ["old-phone", "son-ipad", "son-ipad-2", "wife-laptop"])
        by_key = {row["key_name"]: row for row in store.usage_by_key(0, int(time.time()) + 10)}
        self.assertEqual((by_key["wife-laptop"]["requests"], by_key["wife-laptop"]["errors"]), (5, 1))
        self.assertEqual(by_key["son-ipad"]["requests"], 2)
        self.assertEqual([a["action"] for a in store.audit_trail()], ["migrate"])

    def test_no_plaintext_key_remains_anywhere_in_the_files(self):
        ocp.Store(self.path).close()
        data = raw_database_bytes(self.ocp_home)
        for secret, *_ in LEGACY_KEYS:
            self.assertNotIn(secret.encode(), data)
        self.assertNotIn(b"a cached answer", data)

    def test_history_shows_in_usage_by_key(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = ocp.main(["usage", "--by-key"], self.environ())
        self.assertEqual(code, 0)
        self.assertRegex(out.getvalue(), r"wife-laptop\s+5\s+4\s+1")
        self.assertRegex(out.getvalue(), r"son-ipad\s+2\s+2")


class MultiMode(ServerTest):
    env = {"CLAUDE_AUTH_MODE": "multi", "OCP_ADMIN_KEY": ADMIN, "OCP_TIMEZONE": "UTC",
           "PROXY_ANONYMOUS_KEY": "ocp_guest_key_for_tests_00000000000"}

    def admin(self, method, path, body=None):
        return self.request(method, path, body, headers={"Authorization": f"Bearer {ADMIN}"})

    def add_key(self, name, **quota):
        status, _, body = self.admin("POST", "/api/keys", dict(quota, name=name))
        self.assertEqual(status, 201, body)
        return body["key"]

    def ask(self, key, content="hi", **params):
        body = {"model": params.pop("model", "sonnet"), "messages": [{"role": "user", "content": content}]}
        body.update(params)
        return self.request("POST", "/v1/chat/completions", body, headers={"Authorization": f"Bearer {key}"})

    def test_a_request_without_a_valid_key_is_401(self):
        secret = self.add_key("laptop")
        self.assertEqual(self.request("POST", "/v1/chat/completions", {"model": "opus", "messages": [
            {"role": "user", "content": "x"}]})[0], 401)
        self.assertEqual(self.ask("ocp_" + "z" * 32)[0], 401)
        self.assertEqual(self.request("GET", "/v1/models")[0], 401, "being on localhost grants nothing")
        self.assertEqual(self.ask(secret)[0], 200)
        self.assertEqual(self.request("GET", "/v1/models", headers={"x-api-key": secret})[0], 200)
        self.assertEqual(self.admin("DELETE", "/api/keys/laptop")[0], 200)
        self.assertEqual(self.ask(secret)[0], 401)
        self.assertEqual(len(self.runs()), 1)

    def test_a_stream_read_to_the_end_then_dropped_still_counts(self):
        secret = self.add_key("member", daily=3)
        body = {"model": "sonnet", "stream": True, "messages": [
            {"role": "user", "content": "x " + directive(text="the whole answer", deltas=4, tail_ms=400,
                                                         usage={"input": 100, "output": 7})}]}
        for _ in range(3):
            sock = self.open_raw(body, key=secret)
            received = b""
            while received.count(b'"content": "') < 5:  # the role chunk and all 4 deltas; not the final chunk
                received += sock.recv(65536)
            self.assertNotIn(b"[DONE]", received)
            sock.close()
        wait_until(lambda: not any(r["status"] == "pending" for r in self.admin("GET", "/api/usage?all=true")[2]["data"]))
        rows = self.admin("GET", "/api/usage?all=true")[2]["data"]
        self.assertEqual([(r["status"], r["http_status"]) for r in rows], [("partial", 499)] * 3)
        self.assertEqual([r["prompt_tokens"] for r in rows], [100] * 3)
        for row in rows:  # the CLI's own count (7) when its message_delta came first, else 16 chars / 4
            self.assertIn(row["completion_tokens"], (7, 4))
        status, _, body = self.ask(secret)
        self.assertEqual(status, 429, "three delivered answers used the daily quota of 3")

    def test_a_client_that_leaves_before_any_answer_gets_its_place_back(self):
        secret = self.add_key("member", daily=1)
        sock = self.open_raw({"model": "sonnet", "stream": True, "messages": [
            {"role": "user", "content": "x " + directive(hang=True)}]}, key=secret)
        wait_until(lambda: self.server.runner.live())
        sock.close()
        wait_until(lambda: not self.server.runner.live())
        wait_until(lambda: self.admin("GET", "/api/usage?all=true")[2]["data"][0]["status"] == "cancelled")
        self.assertEqual(self.ask(secret)[0], 200)

    def test_a_key_lists_only_the_models_it_may_use(self):
        secret = self.add_key("kid", models=["haiku", "claude-opus-4-8"])
        listed = [m["id"] for m in self.request("GET", "/v1/models", headers={"x-api-key": secret})[2]["data"]]
        self.assertEqual(sorted(listed), ["claude-haiku-5-5", "claude-opus-4-8"])
        everything = self.admin("GET", "/v1/models")[2]["data"]
        self.assertGreater(len(everything), 2)

    def test_refusals_are_counted_per_key_and_by_code(self):
        secret = self.add_key("kid", daily=1, models=["haiku"])
        self.assertEqual(self.ask(secret, model="haiku")[0], 200)
        status, headers, body = self.ask(secret, model="haiku")
        self.assertEqual((status, headers["x-should-retry"]), (429, "false"), "a far reset: clients must not retry")
        self.assertTrue(body["error"]["message"].startswith("Quota exceeded: 1/1 requests today. Resets in"))
        self.assertEqual(self.ask(secret, model="opus")[0], 403)
        self.assertEqual(self.ask(secret, model="haiku", stream="yes")[0], 400)
        self.assertEqual(self.ask("ocp_" + "n" * 32)[0], 401)
        [row] = self.server.store.usage_by_key(0, 2 ** 40)
        self.assertEqual((row["key_name"], row["ok"], row["refused"]), ("kid", 1, 3))
        metrics = self.admin("GET", "/metrics")[2]
        for code in ("200", "400", "401", "403", "429"):
            self.assertIn(f'ocp_http_responses_total{{route="/v1/chat/completions",method="POST",code="{code}"}} 1',
                          metrics)
        self.assertEqual(self.ask(secret, model="haiku")[0], 429, "refusals used no quota, the answer did")

    def test_the_anonymous_key_is_opt_in_and_not_advertised(self):
        status, _, body = self.ask(self.config.anonymous_key)
        self.assertEqual(status, 200)
        self.assertNotIn("anonymousKey", self.request("GET", "/health")[2])

    def test_admin_routes_need_the_admin_key(self):
        member = self.add_key("member")
        self.assertEqual(self.request("GET", "/api/keys")[0], 401)
        self.assertEqual(self.request("GET", "/api/keys", headers={"Authorization": f"Bearer {member}"})[0], 403)
        status, _, body = self.admin("GET", "/api/keys")
        self.assertEqual(status, 200)
        self.assertNotIn(member, json.dumps(body))
        self.assertEqual(body["data"][0]["prefix"], member[:8])

    def test_key_and_quota_routes(self):
        self.add_key("kid", daily=5, models=["haiku"])
        status, _, body = self.admin("GET", "/api/keys/kid/quota")
        self.assertEqual(status, 200)
        self.assertEqual(body["quota"]["daily"], 5)
        self.assertEqual(body["models"], ["claude-haiku-5-5"])
        daily = [w for w in body["windows"] if w["quota"] == "daily"][0]
        self.assertEqual((daily["used"], daily["limit"]), (0, 5))
        status, _, body = self.admin("PATCH", "/api/keys/kid/quota", {"daily": None, "weekly": 9, "models": None})
        self.assertEqual((status, body["quota"]["daily"], body["quota"]["weekly"], body["models"]), (200, None, 9, None))
        for bad in ({"daily": -1}, {"daily": "5"}, {"models": ["gpt-4"]}, {"colour": 1}, {"weekly": True}):
            with self.subTest(bad):
                self.assertEqual(self.admin("PATCH", "/api/keys/kid/quota", bad)[0], 400)
        self.assertEqual(self.admin("GET", "/api/keys/nobody/quota")[0], 404)
        self.assertEqual(self.admin("POST", "/api/keys", {"name": "kid"})[0], 409)
        self.assertEqual(self.admin("POST", "/api/keys", {"name": "42"})[0], 400)
        self.assertEqual(self.admin("POST", "/api/keys", {"name": ""})[0], 400)
        actions = [a["action"] for a in self.server.store.audit_trail()]
        self.assertEqual(actions[:2], ["key.quota", "key.add"])

    def test_concurrent_requests_admit_exactly_the_quota(self):
        secret = self.add_key("kid", daily=10)
        results = []
        barrier = threading.Barrier(40)

        def one():
            barrier.wait()
            results.append(self.ask(secret, "x " + directive(pace_ms=50, deltas=3, text="abc")))

        threads = [threading.Thread(target=one) for _ in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        statuses = sorted(status for status, _, _ in results)
        self.assertEqual(statuses, [200] * 10 + [429] * 30)
        refused = [(headers, body) for status, headers, body in results if status == 429]
        for headers, body in refused:
            self.assertGreater(int(headers["Retry-After"]), 0)
            self.assertEqual((body["error"]["type"], body["error"]["code"]), ("insufficient_quota", "quota_exceeded"))
            self.assertEqual(body["error"]["quota"]["limit"], 10)
        self.assertRegex(refused[0][1]["error"]["message"], r"^Quota exceeded: 10/10 requests today\. Resets in ")
        self.assertEqual(len(self.runs()), 10)

    def test_failed_and_cancelled_requests_do_not_consume_quota(self):
        secret = self.add_key("kid", daily=2)
        self.assertEqual(self.ask(secret, "x " + directive(error="overloaded"))[0], 502)
        sock = self.open_raw({"model": "sonnet", "messages": [{"role": "user", "content": "x " + directive(hang=True)}]},
                             secret)
        wait_until(lambda: len(self.runs()) == 2 and self.runs()[-1].get("stdin_blocks"))
        sock.close()
        wait_until(lambda: self.server.runner.live() == [])
        wait_until(lambda: [r["status"] for r in self.server.store.usage_rows(None, None, 0, 2 ** 40, 10)]
                   .count("pending") == 0)
        self.assertEqual(self.ask(secret)[0], 200)
        self.assertEqual(self.ask(secret)[0], 200)
        self.assertEqual(self.ask(secret)[0], 429)
        statuses = [r["status"] for r in self.server.store.usage_rows(None, None, 0, 2 ** 40, 10)]
        self.assertEqual(sorted(statuses), ["cancelled", "error", "ok", "ok", "refused"])  # the 429 is shown

    def test_ratelimit_headers(self):
        secret = self.add_key("kid", daily=3, weekly=10)
        status, headers, _ = self.ask(secret)
        self.assertEqual(status, 200)
        self.assertEqual(headers["x-ratelimit-limit-requests"], "3")
        self.assertEqual(headers["x-ratelimit-remaining-requests"], "2")
        self.assertRegex(headers["x-ratelimit-reset-requests"], r"^\d+s$")

    def test_model_allowlist(self):
        secret = self.add_key("kid", models=["haiku"])
        self.assertEqual(self.ask(secret, model="haiku")[0], 200)
        status, _, body = self.ask(secret, model="opus")
        self.assertEqual((status, body["error"]["code"]), (403, "model_not_allowed"))

    def test_usage_rows_are_recorded_and_private(self):
        kid, mum = self.add_key("kid"), self.add_key("mum")
        self.ask(kid, "x " + directive(usage={"input": 10, "output": 4, "cache_read": 2}))
        self.ask(mum)
        status, _, body = self.request("GET", "/api/usage", headers={"Authorization": f"Bearer {kid}"})
        self.assertEqual(status, 200)
        [row] = body["data"]
        self.assertEqual((row["key_name"], row["status"], row["http_status"], row["prompt_tokens"],
                          row["completion_tokens"], row["cached_tokens"], row["model"]),
                         ("kid", "ok", 200, 12, 4, 2, "claude-sonnet-5-5"))
        self.assertIsNotNone(row["ttft_ms"])
        self.assertGreater(row["cost_usd"], 0)
        status, _, body = self.request("GET", "/api/usage?all=true", headers={"Authorization": f"Bearer {kid}"})
        self.assertEqual(status, 403)
        status, _, body = self.admin("GET", "/api/usage?all=true&hours=1&limit=10")
        self.assertEqual(sorted(r["key_name"] for r in body["data"]), ["kid", "mum"])
        self.assertEqual(self.server.store.audit_trail()[0]["action"], "usage.all")
        for query in ("hours=0", "hours=abc", "limit=-1", "limit=5000", "since=yesterday", "all=maybe",
                      "since=2000&until=1000"):
            with self.subTest(query):
                status, _, body = self.admin("GET", "/api/usage?" + query)
                self.assertEqual((status, body["error"]["type"]), (400, "invalid_request_error"))

    def test_health_detail_only_for_the_admin(self):
        public = self.request("GET", "/health")[2]
        self.assertNotIn("detail", public)
        detail = self.admin("GET", "/health")[2]["detail"]
        self.assertEqual(detail["slots"]["limit"], 8)
        self.assertIn("claude", detail)



class SmallHolesFound(ServerTest):
    """What the sharing audit found: a built-in caller's name, a model allowlist count_tokens
    forgot, a Responses format that crashed the parser."""

    GUEST = "ocp_guest_key_for_tests_00000000000"
    env, admin, ask = MultiMode.env, MultiMode.admin, MultiMode.ask

    def test_a_key_may_not_take_a_built_in_callers_name(self):
        for name in ("anonymous", "Admin", "shared", "local"):
            status, _, body = self.admin("POST", "/api/keys", {"name": name})
            self.assertEqual((status, body["error"]["code"]), (400, "reserved_name"), name)
        with contextlib.redirect_stderr(io.StringIO()) as err:
            self.assertNotEqual(ocp.main(["keys", "add", "anonymous"], self.environ()), 0)
        self.assertIn("built-in caller", err.getvalue())

    def test_an_older_key_named_like_the_guest_keeps_its_own_figures(self):
        _, secret = self.server.store.add_key("anonymous", ocp.KeyPolicy(), time.time())  # made before names were reserved
        self.assertEqual(self.ask(secret)[0], 200)
        self.assertEqual(self.ask(self.GUEST)[0], 200)
        self.assertEqual(self.ask(self.GUEST)[0], 200)
        status, _, data = self.request("GET", "/dashboard/data", headers={"Authorization": f"Bearer {secret}"})
        self.assertEqual(status, 200)
        self.assertEqual([(u["key_name"], u["requests"]) for u in data["usage_by_key"]], [("anonymous", 1)])
        everyone = self.server.store.usage_by_key(0, 2 ** 40)
        self.assertEqual(sorted((u["key_id"] is None, u["requests"]) for u in everyone), [(False, 1), (True, 2)])
        key = self.server.store.find_key("anonymous")
        self.assertEqual(ocp.Caller("anonymous", key).label, f"anonymous#{key.id}")

    def test_count_tokens_keeps_the_keys_model_allowlist(self):
        status, _, body = self.admin("POST", "/api/keys", {"name": "kid", "models": ["haiku"]})
        secret = body["key"]
        status, _, body = self.request("POST", "/v1/messages/count_tokens", {
            "model": "opus", "messages": [{"role": "user", "content": "hi"}]}, headers={"x-api-key": secret})
        self.assertEqual((status, body["type"], body["error"]["type"]), (404, "error", "not_found_error"))
        status, _, body = self.request("POST", "/v1/messages/count_tokens", {
            "model": "haiku", "messages": [{"role": "user", "content": "hi"}]}, headers={"x-api-key": secret})
        self.assertEqual(status, 200)

    def test_a_responses_text_format_that_is_no_object_is_a_400(self):
        for text in ({"format": "json"}, {"format": 5}, "plain", [1]):
            status, _, body = self.request("POST", "/v1/responses", {"model": "sonnet", "input": "hi", "text": text},
                                           headers={"Authorization": f"Bearer {ADMIN}"})
            self.assertEqual((status, body["error"]["type"]), (400, "invalid_request_error"), text)

class AdvertisedGuestKey(ServerTest):
    env = {"CLAUDE_AUTH_MODE": "multi", "PROXY_ANONYMOUS_KEY": "ocp_guest", "PROXY_ADVERTISE_ANON_KEY": "1"}

    def test_health_advertises_it(self):
        self.assertEqual(self.request("GET", "/health")[2]["anonymousKey"], "ocp_guest")


class BrowserSafety(ServerTest):
    env = {"OCP_CORS_ORIGINS": "http://dashboard.example:8080", "OCP_ALLOWED_HOSTS": "ocp.home.arpa"}

    def test_foreign_host_is_refused(self):
        status, _, body = self.request("GET", "/v1/models", headers={"Host": "evil.example"})
        self.assertEqual((status, body["error"]["code"]), (403, "host_not_allowed"))
        for host in ("127.0.0.1:3456", "localhost", "[::1]:3456", "192.168.1.20", "ocp.home.arpa",
                     socket.gethostname()):
            with self.subTest(host):
                self.assertEqual(self.request("GET", "/v1/models", headers={"Host": host})[0], 200)

    def test_cross_site_browser_post_is_refused(self):
        body = {"model": "opus", "messages": [{"role": "user", "content": "x"}]}
        status, _, error = self.request("POST", "/v1/chat/completions", body,
                                        headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
        self.assertEqual((status, error["error"]["code"]), (403, "cross_origin_forbidden"))
        status, _, _ = self.request("GET", "/v1/models", headers={"Sec-Fetch-Site": "cross-site"})
        self.assertEqual(status, 403)
        self.assertEqual(self.runs(), [])

    def test_same_origin_and_listed_origins_pass(self):
        host = f"127.0.0.1:{self.port}"
        self.assertEqual(self.request("GET", "/v1/models", headers={"Origin": f"http://{host}", "Host": host})[0], 200)
        status, headers, _ = self.request("GET", "/v1/models", headers={"Origin": "http://dashboard.example:8080"})
        self.assertEqual(status, 200)
        self.assertEqual(headers["Access-Control-Allow-Origin"], "http://dashboard.example:8080")
        status, headers, _ = self.request("OPTIONS", "/v1/chat/completions",
                                          headers={"Origin": "http://dashboard.example:8080"})
        self.assertEqual(status, 204)
        self.assertIn("POST", headers["Access-Control-Allow-Methods"])


def run_cli(args, env):
    """An admin command beside the daemon (in process: a subprocess would compile ocp.py anew)."""
    return run_main(args, env)


class AsANewUserWould(TempHome):
    """`serve --bind 0.0.0.0 --auth-mode multi`, `keys add laptop`, then a client from another address."""

    def test_the_household_setup(self):
        port = free_port()
        env = dict(self.environ(), PYTHONUNBUFFERED="1")
        env.pop("CLAUDE_PROXY_PORT")
        daemon = subprocess.Popen([sys.executable, os.path.join(ROOT, "ocp.py"), "serve", "--bind", "0.0.0.0",
                                   "--auth-mode", "multi", "--port", str(port)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: daemon.poll() is None and daemon.kill())
        wait_until(lambda: connectable(port))
        admin_file = os.path.join(self.ocp_home, "admin-key")
        self.assertEqual(stat.S_IMODE(os.stat(admin_file).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.ocp_home).st_mode), 0o700)

        code, out, _ = run_cli(["keys", "add", "laptop"], env)
        self.assertEqual(code, 0)
        [secret] = [w for w in out.split() if w.startswith("ocp_")]
        self.assertEqual(out.count(secret), 1)
        self.assertNotIn(secret, run_cli(["keys"], env)[1])

        def ask(key=None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=("127.0.0.2", 0))
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            conn.request("POST", "/v1/chat/completions", json.dumps(
                {"model": "sonnet", "messages": [{"role": "user", "content": "hello"}]}), headers)
            status = conn.getresponse().status
            conn.close()
            return status

        self.assertEqual(ask(secret), 200, "the key works from another address")
        self.assertEqual(ask(), 401)
        self.assertEqual(ask("ocp_" + "w" * 32), 401)
        self.assertEqual(run_cli(["keys", "revoke", "laptop"], env)[0], 0)
        self.assertEqual(ask(secret), 401)
        self.assertNotIn(secret.encode(), raw_database_bytes(self.ocp_home))

        with open(admin_file) as f:
            env["OCP_ADMIN_KEY"] = f.read().strip()
        env["CLAUDE_PROXY_PORT"] = str(port)
        code, out, _ = run_cli(["status", "--json"], env)
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out)["detail"]["keys"], {"active": 0, "revoked": 1})
        code, out, _ = run_cli(["usage", "--by-key", "--json"], env)
        self.assertEqual(json.loads(out)[0]["key_name"], "laptop")
        daemon.terminate()
        output = daemon.communicate(timeout=15)[0].decode()
        self.assertNotIn(env["OCP_ADMIN_KEY"], output, "the admin key is never logged")
        self.assertIn("admin-key", output, "its path is printed")


class KeyCommands(TempHome):
    def main(self, *args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = ocp.main(list(args), self.environ())
            except SystemExit as e:
                code = e.code
        return code, out.getvalue(), err.getvalue()

    def test_add_list_quota_revoke(self):
        code, out, _ = self.main("keys", "add", "tablet", "--daily", "5", "--models", "opus,haiku", "--json")
        self.assertEqual(code, 0)
        created = json.loads(out)
        self.assertEqual((created["quota"]["daily"], created["models"]), (5, ["claude-haiku-5-5", "claude-opus-5-5"]))
        code, out, _ = self.main("keys")
        self.assertRegex(out, r"tablet\s+ocp_\S{4}\s+active")
        self.assertNotIn(created["key"], out)
        code, out, _ = self.main("keys", "quota", "tablet", "--daily", "none", "--weekly", "7", "--json")
        report = json.loads(out)
        self.assertEqual((report["quota"]["daily"], report["quota"]["weekly"]), (None, 7))
        code, out, _ = self.main("keys", "quota", "tablet")
        self.assertRegex(out, r"weekly\s+0\s+7\s+requests")
        self.assertEqual(self.main("keys", "revoke", str(created["id"]))[0], 0)
        self.assertIn("revoked", self.main("keys", "list")[1])

    def test_exit_codes(self):
        self.assertEqual(self.main("keys", "revoke", "ghost")[0], 1)
        self.assertEqual(self.main("keys", "add", "123")[0], 2)
        self.assertEqual(self.main("keys", "add", "x", "--daily", "lots")[0], 2)
        self.assertEqual(self.main("keys", "add", "x", "--models", "gpt-4")[0], 2)
        code, _, err = self.main("status")
        self.assertEqual(code, 1)
        self.assertIn("not answering", err)


if __name__ == "__main__":
    unittest.main()
