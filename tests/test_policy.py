"""Policy as data: a setting, a per-key field, a CLI event are each one row, and every request
comes in one way (Server.authenticate)."""

import dataclasses
import json
import logging
import os
import re
import sqlite3
import threading
import unittest
from unittest import mock

import ocp
from helpers import ROOT, ServerTest, TempHome, directive
from test_cli import run_main
from test_operations import parse_prometheus

ADMIN = "ocp_admin_key_for_the_policy_tests0"
GUEST = "ocp_guest_key_for_the_policy_tests0"


class SettingKinds(unittest.TestCase):
    """Setting.check reads a JSON value (PATCH /settings, settings.json) as the row's kind."""

    def setting(self, kind, **fields):
        return ocp.Setting("x", "OCP_X", "--x", kind, "a setting of kind " + kind, **fields)

    def refused(self, setting, value):
        with self.assertRaises(ocp.ConfigError) as caught:
            setting.check("x", value)
        return str(caught.exception)

    def test_a_number_within_its_bounds(self):
        ratio = self.setting("float", bounds=(0, 1))
        self.assertEqual([ratio.check("x", v) for v in (0.5, "0.25", 1)], [0.5, 0.25, 1.0])
        for bad in (True, "half", [0.5], None):
            self.assertIn("a number", self.refused(ratio, bad))
        self.assertIn("out of range", self.refused(ratio, 2))
        whole = self.setting("int", bounds=(1, 10))
        self.assertEqual((whole.check("x", 3), whole.check("x", "7")), (3, 7))
        self.assertIn("x must be a whole number", self.refused(whole, True))
        self.assertIn("must be a whole number", self.refused(whole, 1.5))
        self.assertIn("is not a whole number", self.refused(whole, "1.5"))

    def test_a_boolean_a_word_and_a_list(self):
        flag = self.setting("bool")
        self.assertEqual([flag.check("x", v) for v in (True, False, "yes", "off", 1, 0)],
                         [True, False, True, False, True, False])
        self.assertIn("is not a boolean", self.refused(flag, "maybe"))
        self.assertIn("must be true or false", self.refused(flag, None))
        word = self.setting("str", choices=("auto", "429"))
        self.assertEqual(word.check("x", "429"), "429")
        self.assertIn("is not one of auto, 429", self.refused(word, "400"))
        self.assertIn("must be a string", self.refused(word, 429))
        listing = self.setting("list")
        self.assertEqual((listing.check("x", ["a", "b"]), listing.check("x", "a, b")), (("a", "b"), ("a", "b")))

    def test_every_row_is_whole_and_names_are_unique(self):
        fields = {f.name for f in dataclasses.fields(ocp.Config)}
        for setting in ocp.SETTINGS:
            with self.subTest(setting.field):
                self.assertIn(setting.field, fields)
                self.assertIn(setting.kind, ocp.KIND_WORDS)
                self.assertTrue(setting.help and re.fullmatch(r"(CLAUDE|OCP|PROXY)_[A-Z0-9_]+", setting.env))
                self.assertEqual(setting.flag == "", setting.kind == "secret", "a secret is never a flag")
                self.assertTrue(setting.bounds is None or setting.kind in ("int", "float"))
                self.assertTrue(not setting.choices or setting.kind == "str")
        for name in ("field", "env", "flag", "runtime"):
            values = [getattr(s, name) for s in ocp.SETTINGS if getattr(s, name)]
            self.assertEqual(len(values), len(set(values)), f"each {name} once")

    def test_serve_has_a_flag_for_every_setting_but_the_secrets(self):
        serve = ocp.build_parser()._subparsers._group_actions[0].choices["serve"]
        flags = {option for action in serve._actions for option in action.option_strings}
        self.assertEqual({s.flag for s in ocp.SETTINGS if s.flag} - flags, set())
        self.assertFalse({"--api-key", "--admin-key", "--anonymous-key"} & flags)


class RuntimeSettingsOfEveryKind(ServerTest):
    env = {"OCP_ADMIN_KEY": ADMIN}

    def admin(self, method, path, body=None):
        return self.request(method, path, body, headers={"Authorization": f"Bearer {ADMIN}"})

    def test_a_boolean_and_a_word_change_while_running_and_stay(self):
        status, _, body = self.admin("PATCH", "/settings", {"planOnly": True, "wallStatus": "429"})
        self.assertEqual(status, 200, body)
        self.assertEqual((body["settings"]["planOnly"]["value"], body["settings"]["wallStatus"]["value"]),
                         (True, "429"))
        self.assertEqual(body["settings"]["wallStatus"]["choices"], ["auto", "429"])
        self.assertEqual((self.server.config.plan_only, self.server.config.wall_status), (True, "429"))
        with open(self.server.config.settings_path) as f:
            self.assertEqual(json.load(f), {"planOnly": True, "wallStatus": "429"})
        status, _, body = self.admin("PATCH", "/settings", {"wallStatus": "400"})
        self.assertEqual((status, body["error"]["code"]), (400, "invalid_setting"))
        self.assertIn("auto, 429", body["error"]["message"])
        self.assertEqual(self.admin("PATCH", "/settings", {"planOnly": "maybe"})[0], 400)
        self.assertEqual(self.server.config.wall_status, "429", "a refused change changes nothing")
        restarted = ocp.load_config(self.environ())
        self.assertEqual((restarted.plan_only, restarted.wall_status), (True, "429"))
        self.assertEqual(restarted.sources["plan_only"], "settings.json")


class ReadmeSettingsTables(unittest.TestCase):
    """The README's tables are the settings the code has: no more, no fewer."""

    def setUp(self):
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            self.lines = [line.strip() for line in f]
        self.rows = [self.cells(line) for line in self.lines if line.startswith("| `")]

    @staticmethod
    def cells(line):
        return [cell.strip() for cell in line.strip("|").split("|")]

    def test_every_variable_is_documented_and_every_documented_one_exists(self):
        documented = {name for row in self.rows for name in re.findall(r"`((?:CLAUDE|OCP|PROXY)_[A-Z0-9_]+)`", row[0])}
        self.assertEqual(documented, {s.env for s in ocp.SETTINGS})

    def test_the_runtime_settings_table(self):
        start = self.lines.index("| runtime setting | variable |") + 2
        table = self.lines[start:next(i for i in range(start, len(self.lines)) if not self.lines[i].startswith("|"))]
        runtime = {cells[0].strip("`"): cells[1].strip("`") for cells in map(self.cells, table)}
        self.assertEqual(runtime, {name: s.env for name, s in ocp.RUNTIME_SETTINGS.items()})


class KeyPolicyRows(TempHome):
    """Each KeyPolicy row is a command-line flag, an API field with its check, and a column."""

    SAMPLES = {"COUNT": ("5", 5), "USD": ("1.5", 1.5), "PRIORITY": ("low", "low"), "MODEL_LIST": ("haiku", None),
               "WHEN": ("2030-01-01T00:00:00Z", 1893456000)}

    def kind_name(self, field):
        return next(name for name in self.SAMPLES if getattr(ocp, name) is field.metadata["kind"])

    def test_every_field_is_a_flag_of_keys_add_and_quota_and_shows(self):
        flags = []
        for field in ocp.KEY_FIELDS:
            flags += ["--" + field.name.replace("_", "-"), self.SAMPLES[self.kind_name(field)][0]]
        code, out, err = run_main(["keys", "add", "kid"] + flags + ["--json"], self.environ())
        self.assertEqual(code, 0, err)
        key = json.loads(out)
        for field in ocp.KEY_FIELDS:
            value = key["quota"][field.name] if field.metadata["window"] else key[field.name]
            expected = self.SAMPLES[self.kind_name(field)][1]
            self.assertEqual(value, expected if expected is not None else ["claude-haiku-5-5"], field.name)
        code, out, _ = run_main(["keys", "quota", "kid", "--daily", "none", "--json"], self.environ())
        self.assertEqual((code, json.loads(out)["quota"]["daily"], json.loads(out)["quota"]["weekly"]), (0, None, 5))
        code, out, _ = run_main(["keys"], self.environ())
        for field in ocp.KEY_FIELDS:
            if field.metadata["heading"]:
                self.assertIn(field.metadata["heading"], out.splitlines()[0])
        columns = {row[1] for row in sqlite3.connect(os.path.join(self.ocp_home, "ocp.db")).execute(
            "PRAGMA table_info(keys)")}
        self.assertLessEqual({f.metadata["column"] for f in ocp.KEY_FIELDS}, columns)

    def test_a_field_added_later_gets_its_column_without_a_migration(self):
        path = os.path.join(self.tmp, "ocp.db")
        store = ocp.Store(path)
        store.add_key("kid", ocp.KeyPolicy(daily=3), 1000)
        store.close()
        later = dataclasses.make_dataclass("Later", [(
            "expires_at", int, ocp.key_field("expires_at", ocp.COUNT, "EXPIRES", "when the key stops working"))],
            bases=(ocp.KeyPolicy,), frozen=True)
        with mock.patch.object(ocp, "KEY_FIELDS", dataclasses.fields(later)):
            store = ocp.Store(path)
        self.addCleanup(store.close)
        columns = {row["name"] for row in store._execute("PRAGMA table_info(keys)")}
        self.assertIn("expires_at", columns)
        self.assertEqual(store.find_key("kid").policy.daily, 3, "the keys there keep their policy")

    def test_a_change_is_checked_field_by_field(self):
        models = ocp.Models.load(os.path.join(ROOT, "models.json"))
        policy = ocp.KeyPolicy()
        for name, bad in (("daily", -1), ("daily", True), ("tokens_monthly", 1.5), ("cost_daily", "1"),
                          ("priority", "vip"), ("models", "haiku")):
            with self.subTest(name=name, value=bad), self.assertRaises(ocp.ApiError) as caught:
                policy.updated({name: bad}, models, 1000)
            self.assertEqual((caught.exception.status, caught.exception.param), (400, name))
        with self.assertRaises(ocp.ApiError) as caught:
            policy.updated({"daily": 1, "expiry": 5}, models, 1000)
        self.assertEqual(caught.exception.code, "unknown_field")
        changed = policy.updated({"models": ["haiku", "haiku"], "cost_weekly": 2, "name": "ignored"}, models, 1000)
        self.assertEqual((changed.models, changed.cost_weekly, policy.models), (("claude-haiku-5-5",), 2, None))

    def test_usable_is_the_one_test_of_a_key(self):
        store = ocp.Store(os.path.join(self.tmp, "ocp.db"))
        self.addCleanup(store.close)
        key, secret = store.add_key("kid", ocp.KeyPolicy(), 1000)
        self.assertEqual((key.usable(1000), key.public(1000)["status"]), (True, "active"))
        store.revoke_key(key, 0)  # revoked at the epoch itself is still revoked
        key = store.find_key("kid")
        self.assertEqual((key.usable(1000), key.status(1000)), (False, "revoked"))
        self.assertIsNone(store.key_by_secret(secret, 1000))


class OneWayIn(ServerTest):
    """Server.authenticate: a key, else a dashboard session; public routes admit anyone."""

    env = {"CLAUDE_AUTH_MODE": "multi", "OCP_ADMIN_KEY": ADMIN, "PROXY_ANONYMOUS_KEY": GUEST}

    def who(self, headers, access=ocp.KEYED):
        caller = self.server.authenticate(headers, access)
        return "admin" if caller.admin else caller.name

    def refused(self, headers, access=ocp.KEYED):
        with self.assertRaises(ocp.ApiError) as caught:
            self.server.authenticate(headers, access)
        return caught.exception.status, caught.exception.headers.get("WWW-Authenticate")

    def test_each_caller_is_who_its_key_says(self):
        key, secret = self.server.store.add_key("ann", ocp.KeyPolicy(), self.server.wall())
        self.assertEqual([self.who({"Authorization": f"Bearer {ADMIN}"}), self.who({"x-api-key": secret}),
                          self.who({"Authorization": f"bearer {GUEST}"}), self.who({}, ocp.PUBLIC)],
                         ["admin", "ann", "anonymous", "public"])
        self.assertEqual(self.refused({}), (401, "Bearer"))
        self.assertEqual(self.refused({"x-api-key": "ocp_nobody"}), (401, "Bearer"))
        token = self.server.sessions.create(ocp.Caller("ann", key), self.server.wall())
        cookie = {"Cookie": f"theme=dark; {ocp.SESSION_COOKIE}={token}"}
        self.assertEqual(self.who(cookie), "ann")
        self.server.store.revoke_key(key, self.server.wall())
        self.assertEqual(self.refused({"x-api-key": secret}), (401, "Bearer"))
        self.assertEqual(self.refused(cookie), (401, "Bearer"), "a revoked key's session ends with it")
        self.assertEqual(self.who({"x-api-key": secret}, ocp.PUBLIC), "public")


class CliEventsCounted(ServerTest):
    """A CLI event beside the answer is counted by name and logged (CLI_EVENTS)."""

    env = {"OCP_ADMIN_KEY": ADMIN}

    def test_retries_and_a_model_fallback(self):
        ocp.log.addHandler(self.server.ring)
        self.addCleanup(ocp.log.removeHandler, self.server.ring)
        status, _, body = self.chat("hi " + directive(fallback=True))
        self.assertEqual(status, 200, body)
        text = self.request("GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})[2]
        samples, types_ = parse_prometheus(text)
        self.assertEqual(types_["ocp_cli_events_total"], "counter")
        counted = {labels[0][1]: n for (name, labels), n in samples.items() if name == "ocp_cli_events_total"}
        self.assertEqual(counted, {"init": 1, "api_retry": 2, "model_fallback": 1})
        warned = [e for e in self.server.ring.tail(50, "WARNING") if e.get("cli_event") == "model_fallback"]
        self.assertEqual(len(warned), 1)
        self.assertIn('"fallback_model": "claude-sonnet-5-5"', warned[0]["msg"])


class LogFileClosed(TempHome):
    def test_a_record_after_close_does_not_reopen_the_file(self):
        handler = ocp.PrivateRotatingFile(os.path.join(self.tmp, "ocp.log"), maxBytes=1 << 20, backupCount=1)
        handler.emit(logging.makeLogRecord({"msg": "before"}))
        handler.close()
        handler.emit(logging.makeLogRecord({"msg": "a request thread finishing late"}))
        self.assertIsNone(handler.stream, "logging's FileHandler would reopen its file, and leak it")

    def test_a_batch_is_written_in_order_rolls_over_at_the_cap_and_not_once_closed(self):
        path = os.path.join(self.tmp, "ocp.log")
        handler = ocp.PrivateRotatingFile(path, maxBytes=200, backupCount=1)
        handler.setFormatter(logging.Formatter("%(message)s"))
        batch = [logging.makeLogRecord({"msg": f"line {n}", "levelno": logging.INFO}) for n in range(30)]
        ocp.write_records(handler, batch)
        with open(path) as f:
            self.assertEqual(f.read().splitlines(), [f"line {n}" for n in range(30)])
        ocp.write_records(handler, batch[:1])  # past 200 bytes: the file rolls over first
        with open(path) as f:
            self.assertEqual(f.read(), "line 0\n")
        self.assertTrue(os.path.exists(path + ".1"))
        handler.close()
        ocp.write_records(handler, batch)
        self.assertIsNone(handler.stream)
        with open(path) as f:
            self.assertEqual(f.read(), "line 0\n")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)


class Ids(unittest.TestCase):
    def test_ids_are_hex_of_their_length_and_never_repeat_across_refills(self):
        ids = ocp.RandomIds(chunk=64)
        made = [ids.hex(12) for _ in range(200)] + [ids.hex(100)]
        self.assertEqual(len(set(made)), len(made))
        self.assertTrue(all(len(i) == 24 and int(i, 16) >= 0 for i in made[:-1]))
        self.assertEqual(len(made[-1]), 200)
        threads, lock = [], threading.Lock()

        def make():
            mine = [ids.hex(12) for _ in range(300)]
            with lock:
                made.extend(mine)
        threads = [threading.Thread(target=make) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(len(set(made)), 201 + 1200, "each thread draws from its own buffer")


if __name__ == "__main__":
    unittest.main()
