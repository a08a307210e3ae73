"""Configuration and the command line: `main([...])` with captured output."""

import contextlib
import io
import json
import os
import unittest

import ocp
from helpers import FAKE_CLAUDE_BIN, TempHome


def run_main(argv, environ):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = ocp.main(argv, environ)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


class LoadingConfig(TempHome):
    def test_defaults(self):
        config = ocp.load_config({"HOME": self.home})
        self.assertEqual((config.port, config.bind, config.auth_mode, config.timeout_ms,
                          config.max_concurrent, config.max_queue, config.heartbeat_ms),
                         (3456, "127.0.0.1", "none", 600000, 8, 16, 15000))
        self.assertEqual(config.home, os.path.join(self.home, ".ocp"))
        self.assertEqual(config.allowed_tools, "")

    def test_original_env_names(self):
        config = ocp.load_config({"HOME": self.home, "CLAUDE_PROXY_PORT": "4000", "CLAUDE_BIND": "0.0.0.0",
                                  "CLAUDE_TIMEOUT": "5000", "CLAUDE_MAX_CONCURRENT": "2",
                                  "CLAUDE_MAX_QUEUE": "3", "CLAUDE_HEARTBEAT_INTERVAL": "0",
                                  "CLAUDE_SYSTEM_PROMPT": "Be kind.", "CLAUDE_NO_CONTEXT": "false",
                                  "PROXY_API_KEY": "k", "OCP_HOME": "~/x"})
        self.assertEqual((config.port, config.bind, config.timeout_ms, config.max_concurrent,
                          config.max_queue, config.heartbeat_ms, config.system_prompt, config.no_context,
                          config.auth_mode), (4000, "0.0.0.0", 5000, 2, 3, 0, "Be kind.", False, "shared"))
        self.assertEqual(config.home, os.path.join(self.home, "x"))

    def test_flags_beat_env(self):
        config = ocp.load_config({"HOME": self.home, "CLAUDE_PROXY_PORT": "4000"}, {"port": "5000"})
        self.assertEqual(config.port, 5000)

    def test_secrets_stay_out_of_repr(self):
        config = ocp.load_config({"HOME": self.home, "PROXY_API_KEY": "very-secret"})
        self.assertNotIn("very-secret", repr(config))

    def test_invalid_values_stop_the_daemon_with_one_line(self):
        cases = [
            ({"CLAUDE_PROXY_PORT": "http"}, "CLAUDE_PROXY_PORT='http' is not a whole number"),
            ({"CLAUDE_PROXY_PORT": "70000"}, "out of range"),
            ({"CLAUDE_TIMEOUT": "-5"}, "CLAUDE_TIMEOUT=-5 is out of range"),
            ({"CLAUDE_MAX_CONCURRENT": "0"}, "out of range"),
            ({"CLAUDE_AUTH_MODE": "open"}, "is not one of none, shared, multi"),
            ({"CLAUDE_AUTH_MODE": "shared"}, "needs PROXY_API_KEY"),
            ({"OCP_TIMEZONE": "Mars/Olympus"}, "is not a known time zone"),
            ({"CLAUDE_ALLOWED_TOOLS": "Read", "CLAUDE_AUTH_MODE": "multi"}, "in multi mode"),
            ({"CLAUDE_NO_CONTEXT": "maybe"}, "is not a boolean"),
            ({"CLAUDE_ALLOWED_TOOLS": "Read", "CLAUDE_BIND": "0.0.0.0"}, "refused on a non-loopback bind"),
            ({"OCP_UPSTREAM_BASE_URL": "ftp://x"}, "must start with http"),
        ]
        for env, reason in cases:
            with self.subTest(env):
                with self.assertRaises(ocp.ConfigError) as caught:
                    ocp.load_config(dict(env, HOME=self.home))
                self.assertIn(reason, str(caught.exception))
                self.assertNotIn("\n", str(caught.exception))

    def test_tools_allowed_on_loopback(self):
        config = ocp.load_config({"HOME": self.home, "CLAUDE_ALLOWED_TOOLS": "Read,Grep"})
        self.assertEqual(config.allowed_tools, "Read,Grep")


class CommandLine(TempHome):
    def test_version(self):
        self.assertEqual(run_main(["version"], self.environ())[:2], (0, f"ocp {ocp.__version__}\n"))
        self.assertEqual(run_main(["--version"], self.environ())[:2], (0, f"ocp {ocp.__version__}\n"))

    def test_help(self):
        code, out, _ = run_main(["--help"], self.environ())
        self.assertEqual(code, 0)
        self.assertIn("serve", out)
        code, out, _ = run_main(["serve", "--help"], self.environ())
        self.assertEqual(code, 0)
        out = " ".join(out.split())
        self.assertIn("[CLAUDE_MAX_CONCURRENT]", out)
        self.assertIn("--timeout N milliseconds for a whole request (default: 600000) [CLAUDE_TIMEOUT]", out)
        self.assertIn("--plan-only, --no-plan-only", out)
        self.assertIn("(default: True) [CLAUDE_NO_CONTEXT] --with-context the opposite of --no-context", out)

    def test_switches_are_flag_and_no_flag(self):
        parser = ocp.build_parser()
        for argv, env, expected in ((["serve", "--plan-only"], "", True), (["serve", "--no-plan-only"], "1", False),
                                    (["serve"], "1", True), (["serve"], "", False)):
            with self.subTest(argv=argv, env=env):  # a flag beats the environment, either way
                args = parser.parse_args(argv)
                flags = {s.field: getattr(args, s.field, None) for s in ocp.SETTINGS}
                self.assertIs(ocp.load_config(self.environ(OCP_PLAN_ONLY=env), flags).plan_only, expected)
        args = parser.parse_args(["serve", "--with-context"])
        flags = {s.field: getattr(args, s.field, None) for s in ocp.SETTINGS}
        self.assertFalse(ocp.load_config(self.environ(), flags).no_context)

    def test_a_second_daemon_on_the_same_home_touches_nothing(self):
        import fcntl
        env = self.environ(CLAUDE_PROXY_PORT="0")
        config = ocp.load_config(env)
        store = ocp.open_store(config)
        self.addCleanup(store.close)
        store.reserve(None, "local", "m", "r1", 0, {})  # the running daemon's request
        os.makedirs(config.spawn_dir)
        lock = open(os.path.join(config.home, "serve.lock"), "a")
        self.addCleanup(lock.close)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first daemon holds it
        code, _, err = run_main(["serve"], env)
        self.assertEqual(code, "ocp: another OCP is already running with OCP_HOME=" + config.home)
        self.assertEqual(store.status_counts(0), {"pending": 1}, "its reservation was not released as stale")

    def test_no_command_is_a_usage_error(self):
        self.assertEqual(run_main([], self.environ())[0], 2)

    def test_bad_setting_exits_2_with_a_reason(self):
        code, _, err = run_main(["serve", "--port", "abc"], self.environ())
        self.assertEqual(code, 2)
        self.assertEqual(err, "ocp: --port='abc' is not a whole number\n")

    def test_models(self):
        code, out, _ = run_main(["models", "--json"], self.environ())
        self.assertEqual(code, 0)
        self.assertIn("claude-opus-5-5", [m["id"] for m in json.loads(out)])

    def test_health_reports_the_cli(self):
        code, out, _ = run_main(["health", "--json"], self.environ(CLAUDE_PROXY_PORT="1"))
        detail = json.loads(out)
        self.assertEqual(code, 0)
        self.assertEqual(detail["claude"], FAKE_CLAUDE_BIN)
        self.assertEqual(detail["claude_version"], "2.1.330")
        self.assertEqual(detail["max_concurrent"], 8)
        self.assertEqual(detail["daemon"], "not running")

    def test_health_without_the_cli_fails(self):
        code, out, _ = run_main(["health"], self.environ(CLAUDE_BIN="/nonexistent/claude", CLAUDE_PROXY_PORT="1"))
        self.assertEqual(code, 1)
        self.assertIn("claude ", out)


if __name__ == "__main__":
    unittest.main()
