"""Running for months: plan windows that survive restarts, overage, health from real outcomes."""

import contextlib
import http.client
import io
import json
import logging
import os
import re
import sys
import threading
import unittest

import ocp
from helpers import ROOT, ServerTest, TempHome, directive, free_port, pid_alive, wait_until

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

    def outcomes(self):
        """Requests finished so far: each is recorded just after its answer leaves."""
        return sum(self.server.metrics.counts_by_status().values())

    def test_two_login_failures_in_a_row_mean_down(self):
        self.chat("x " + directive(error="auth"))
        wait_until(lambda: self.outcomes() == 1)
        self.assertEqual(self.status()["status"], "ok", "one failure is not yet a verdict")
        self.chat("x " + directive(error="not_logged_in"))
        wait_until(lambda: self.outcomes() == 2)
        health = self.status()
        self.assertEqual(health["status"], "down")
        self.assertIn("claude setup-token", health["reason"])
        self.chat("fine again")
        wait_until(lambda: self.outcomes() == 3)
        self.assertEqual(self.status()["status"], "ok")

    def test_a_timeout_is_no_evidence(self):
        self.assertEqual(self.chat("x " + directive(hang=True))[0], 504)
        wait_until(lambda: self.outcomes() == 1)
        self.assertEqual(self.status()["status"], "ok")


if __name__ == "__main__":
    unittest.main()


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (-?[0-9.e+-]+|\+Inf|-Inf|NaN)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"(,|$)')


def parse_prometheus(text):
    """A strict reader of the Prometheus text format (0.0.4): {(name, labels): value}, {name: type}."""
    assert text.endswith("\n"), "exposition ends with a newline"
    types_, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in types_, f"TYPE given twice for {name}"
            types_[name] = kind
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, _, body, value = match.groups()
        labels = {}
        position = 0
        while body and position < len(body):
            label = LABEL.match(body, position)
            assert label, f"bad labels in {line!r}"
            labels[label.group(1)] = label.group(2)
            position = label.end()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types_ else name
        assert family in types_, f"sample {name} before its TYPE"
        key = (name, tuple(sorted(labels.items())))
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(value)
    for family, kind in types_.items():
        if kind != "histogram":
            continue
        groups = {}
        for (name, labels), value in samples.items():
            if name == family + "_bucket":
                rest = tuple(l for l in labels if l[0] != "le")
                groups.setdefault(rest, []).append((dict(labels)["le"], value))
        for rest, buckets in groups.items():
            ordered = sorted(buckets, key=lambda b: float(b[0]))
            values = [v for _, v in ordered]
            assert values == sorted(values), f"{family} buckets are cumulative"
            assert ordered[-1][0] == "+Inf"
            assert samples[(family + "_count", rest)] == ordered[-1][1]
    return samples, types_


class RuntimeSettings(ServerTest):
    env = {"OCP_ADMIN_KEY": ADMIN, "CLAUDE_TIMEOUT": "600000"}

    def admin(self, method, path, body=None):
        return self.request(method, path, body, headers={"Authorization": f"Bearer {ADMIN}"})

    def test_change_validate_persist_and_survive_a_restart(self):
        status, _, view = self.admin("GET", "/settings")
        self.assertEqual((status, view["maxConcurrent"]["value"], view["maxConcurrent"]["source"]), (200, 8, "default"))
        status, _, result = self.admin("PATCH", "/settings", {"maxConcurrent": 3, "heartbeat": 2000, "timeout": 5000})
        self.assertEqual(status, 200)
        self.assertEqual(result["settings"]["maxConcurrent"], {"value": 3, "source": "settings.json",
                                                               "env": "CLAUDE_MAX_CONCURRENT", "min": 1, "max": 256})
        self.assertEqual(result["overridden_at_start_by"], ["CLAUDE_TIMEOUT"])
        self.assertEqual(self.server.runner.slots.snapshot()["limit"], 3, "in effect without a restart")
        with open(os.path.join(self.ocp_home, "settings.json")) as f:
            self.assertEqual(json.load(f), {"heartbeat": 2000, "maxConcurrent": 3, "timeout": 5000})
        for bad in ({"maxConcurrent": 0}, {"maxConcurrent": "lots"}, {"colour": 1}, {"heartbeat": True}, {}):
            with self.subTest(bad):
                self.assertEqual(self.admin("PATCH", "/settings", bad)[0], 400)
        self.assertEqual(self.request("PATCH", "/settings", {"maxQueue": 1})[0], 403)
        self.server.shutdown()
        self.server.server_close()
        self.start_server(**self.server_env())
        view = self.admin("GET", "/settings")[2]
        self.assertEqual((view["maxConcurrent"]["value"], view["heartbeat"]["value"]), (3, 2000))
        self.assertEqual((view["timeout"]["value"], view["timeout"]["source"]), (600000, "CLAUDE_TIMEOUT"),
                         "the environment beats settings.json")

    def test_a_bad_settings_file_stops_the_daemon_with_a_reason(self):
        with open(os.path.join(self.ocp_home, "settings.json"), "w") as f:
            json.dump({"maxQueue": -4}, f)
        with self.assertRaises(ocp.ConfigError) as caught:
            ocp.load_config(self.environ())
        self.assertIn("maxQueue", str(caught.exception))

    def test_raising_the_limit_lets_waiting_requests_in(self):
        self.admin("PATCH", "/settings", {"maxConcurrent": 1})
        first = self.open_raw({"model": "sonnet", "messages": [{"role": "user", "content": "x " + directive(hang=True)}]})
        wait_until(lambda: self.runs())
        results = []
        thread = threading.Thread(target=lambda: results.append(self.chat("waiting")[0]))
        thread.start()
        wait_until(lambda: self.server.runner.slots.snapshot()["queued"] == 1)
        self.admin("PATCH", "/settings", {"maxConcurrent": 2})
        thread.join(10)
        self.assertEqual(results, [200])
        first.close()


class LogsMetricsStatusSessions(ServerTest):
    env = {"OCP_ADMIN_KEY": ADMIN}

    def setUp(self):
        super().setUp()
        ocp.setup_logging(self.config, self.server.ring, console=False)
        self.addCleanup(self.restore_logging)

    def restore_logging(self):
        for handler in ocp.log.handlers:
            handler.close()
        ocp.log.handlers[:] = [logging.NullHandler()]

    def admin(self, method, path):
        return self.request(method, path, headers={"Authorization": f"Bearer {ADMIN}"})

    def test_structured_logs_without_prompts(self):
        self.chat("a secret prompt about my diary")
        lines = lambda: [e for e in self.admin("GET", "/logs?n=20&level=info")[2]["data"]
                         if e.get("route") == "/v1/chat/completions"]
        request_lines = wait_until(lines)  # written just after the answer leaves
        body = self.admin("GET", "/logs?n=50")[2]
        self.assertEqual(request_lines[-1]["status"], 200)
        self.assertIn("ms", request_lines[-1])
        with open(os.path.join(self.ocp_home, "logs", "ocp.log")) as f:
            text = f.read()
        self.assertNotIn("diary", text)
        self.assertNotIn("diary", json.dumps(body))
        self.assertEqual(os.stat(os.path.join(self.ocp_home, "logs", "ocp.log")).st_mode & 0o777, 0o600)
        [json.loads(line) for line in text.splitlines()]
        self.assertEqual(self.admin("GET", "/logs?n=0")[0], 400)
        self.assertEqual(self.admin("GET", "/logs?level=loud")[0], 400)
        self.assertEqual(self.request("GET", "/logs")[0], 403)

    def test_metrics_parse_as_prometheus_text(self):
        self.chat("one")
        self.chat("x " + directive(error="overloaded"))
        self.settle()  # (their CLIs exit after the answers went out)
        conn = self.connection()
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
        response = conn.getresponse()
        self.assertTrue(response.headers["Content-Type"].startswith("text/plain; version=0.0.4"))
        samples, types_ = parse_prometheus(response.read().decode())
        self.assertEqual(types_["ocp_requests_total"], "counter")
        self.assertEqual(types_["ocp_request_duration_seconds"], "histogram")
        ok = ("ocp_requests_total", (("key", "local"), ("model", "claude-sonnet-5-5"), ("status", "ok")))
        error = ("ocp_requests_total", (("key", "local"), ("model", "claude-sonnet-5-5"), ("status", "error")))
        self.assertEqual((samples[ok], samples[error]), (1, 1))
        self.assertEqual(samples[("ocp_in_flight", ())], 0)
        self.assertIn(("ocp_ttft_seconds_count", (("model", "claude-sonnet-5-5"),)), samples)

    def test_every_response_is_counted_by_route_and_code_and_tokens_too(self):
        self.chat("one")
        self.request("GET", "/api/keys")  # 403: not the admin key
        self.request("POST", "/v1/chat/completions", raw="{")  # 400
        self.settle()  # the first CLI is reaped: the one live run below is the hanging one
        self.server.runner.slots.resize(1, 0)
        sock = self.open_raw({"model": "sonnet", "messages": [{"role": "user", "content": "x " + directive(hang=True)}]})
        wait_until(lambda: self.server.runner.live())
        self.assertEqual(self.chat("queue full")[0], 429)
        sock.close()
        text = self.admin("GET", "/metrics")[2]
        samples, types_ = parse_prometheus(text)
        self.assertEqual(types_["ocp_http_responses_total"], "counter")
        code = lambda route, method, n: samples.get(("ocp_http_responses_total", (
            ("code", n), ("method", method), ("route", route))))
        self.assertEqual(code("/api/keys", "GET", "403"), 1)
        self.assertEqual(code("/v1/chat/completions", "POST", "400"), 1)
        self.assertEqual(code("/v1/chat/completions", "POST", "429"), 1)
        self.assertEqual(code("/v1/chat/completions", "POST", "200"), 1)
        self.assertEqual(samples[("ocp_tokens_total", (("key", "local"), ("kind", "prompt"),
                                                       ("model", "claude-sonnet-5-5")))], 4408)
        names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
        self.assertEqual(len(names), len(set(names)), "each family is declared once")
        families = [re.sub(r"_(bucket|sum|count)$", "", re.split(r"[{ ]", line)[0])
                    for line in text.splitlines() if line and not line.startswith("#")]
        runs = [name for i, name in enumerate(families) if i == 0 or families[i - 1] != name]
        self.assertEqual(len(runs), len(set(runs)), "a family's samples stand together")

    def test_status_in_one_object(self):
        self.chat("one")
        status, _, body = self.admin("GET", "/status")
        self.assertEqual(status, 200)
        self.assertEqual(body["health"]["status"], "ok")
        self.assertEqual(body["requests"]["ok"], 1)
        self.assertIn("windows", body["plan"])

    def test_sessions_list_and_cancel(self):
        sock = self.open_raw({"model": "haiku", "messages": [{"role": "user", "content": "x " + directive(hang=True)}]})
        run = wait_until(lambda: self.runs() and self.runs()[0])
        [session] = wait_until(lambda: self.admin("GET", "/sessions")[2]["data"])
        self.assertEqual((session["key"], session["model"], session["pid"]), ("local", "claude-haiku-5-5", run["pid"]))
        self.assertEqual(self.admin("DELETE", "/sessions/nope")[0], 404)
        status, _, body = self.admin("DELETE", "/sessions")
        self.assertEqual((status, body["cancelled"]), (200, 1))
        wait_until(lambda: not pid_alive(run["pid"]))
        response = http.client.HTTPResponse(sock)
        response.begin()
        self.assertEqual(response.status, 503)
        self.assertEqual(json.loads(response.read())["error"]["code"], "stopped_by_operator",
                         "not 'ended without an answer'")
        sock.close()

    def test_a_stream_stopped_by_the_owner_says_so_in_band(self):
        sock = self.open_raw({"model": "haiku", "stream": True, "messages": [
            {"role": "user", "content": "x " + directive(text="a" * 40, deltas=40, pace_ms=100)}]})
        reader = sock.makefile("rb")
        self.addCleanup(reader.close)
        while b'"content": "a' not in reader.readline():
            pass
        [session] = self.admin("GET", "/sessions")[2]["data"]
        self.assertEqual(self.admin("DELETE", f"/sessions/{session['id']}")[0], 200)
        rest = reader.read()
        self.assertIn(b'"code": "stopped_by_operator"', rest)
        self.assertTrue(rest.rstrip().endswith(b"data: [DONE]"))


class OperationsCommands(ServerTest):
    env = {"OCP_ADMIN_KEY": ADMIN}

    def main(self, *args):
        env = dict(self.environ(), OCP_ADMIN_KEY=ADMIN, CLAUDE_PROXY_PORT=str(self.port))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = ocp.main(list(args), env)
        return code, out.getvalue(), err.getvalue()

    def test_settings_command_talks_to_the_daemon(self):
        code, out, _ = self.main("settings", "maxQueue", "7")
        self.assertEqual(code, 0)
        self.assertIn("maxQueue = 7 (in effect now, saved)", out)
        self.assertEqual(self.server.runner.slots.snapshot()["limit"], 8)
        self.assertEqual(self.server.runner.slots.max_queue, 7)
        code, out, _ = self.main("settings")
        self.assertRegex(out, r"maxQueue\s+7\s+settings.json")
        self.assertEqual(self.main("settings", "maxQueue", "-1")[0], 2)

    def test_sessions_and_logs_commands(self):
        self.assertEqual(self.main("sessions")[1], "No CLI process is running.\n")
        self.assertIn("Cancelled 0", self.main("sessions", "clear")[1])
        code, out, _ = self.main("logs", "5")
        self.assertEqual(code, 0)


class SettingsWhileStopped(TempHome):
    def test_the_command_writes_the_file(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = ocp.main(["settings", "heartbeat", "5000"], dict(self.environ(), CLAUDE_PROXY_PORT="1"))
        self.assertEqual(code, 0)
        self.assertIn("takes effect when it starts", out.getvalue())
        self.assertEqual(ocp.load_config(self.environ()).heartbeat_ms, 5000)


def write_tool(folder, name, script):
    """A stand-in executable on PATH (systemctl, ip) that records how it was called."""
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\nimport sys, json, os\n{script}\n")
    os.chmod(path, 0o755)
    return path


class Doctor(TempHome):
    def doctor(self, *flags, **env):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = ocp.main(["doctor", "--json"] + list(flags), dict(self.environ(CLAUDE_PROXY_PORT=str(free_port())), **env))
        report = json.loads(out.getvalue())
        return code, {c["id"]: c for c in report["checks"]}, report["next_action"]

    def test_a_healthy_machine(self):
        code, checks, action = self.doctor("--live", CLAUDE_CODE_OAUTH_TOKEN="sk-ant-oat01-x")
        self.assertEqual(code, 0)
        self.assertEqual(checks["login"]["level"], "ok")
        self.assertIn("a real one-token request worked", checks["login"]["message"])
        self.assertEqual(checks["claude"]["message"].split()[:2], ["claude", "2.1.330"])
        self.assertEqual(checks["service"]["level"], "warn")
        self.assertEqual(action["kind"], "human_required")
        self.assertEqual(len(self.runs()), 1, "--live made exactly one request")
        self.assertEqual(self.runs()[0]["env"]["CLAUDE_CODE_MAX_OUTPUT_TOKENS"], "16")

    def test_without_live_nothing_is_spent(self):
        self.doctor(CLAUDE_CODE_OAUTH_TOKEN="sk-ant-oat01-x")
        self.assertEqual(self.runs(), [])

    def test_problems_and_what_to_do(self):
        os.makedirs(self.ocp_home)
        os.chmod(self.ocp_home, 0o755)
        with open(os.path.join(self.ocp_home, "ocp.db"), "wb") as f:
            f.write(b"SQLite format 3\x00" + b"\x00" * 84 + b"garbage" * 200)
        code, checks, action = self.doctor(CLAUDE_BIN="/nonexistent/claude")
        self.assertEqual(code, 1)
        self.assertEqual(checks["claude"]["level"], "fail")
        self.assertEqual(checks["login"]["level"], "fail")
        self.assertEqual(checks["database"]["level"], "fail")
        self.assertEqual(checks["permissions"]["level"], "warn")
        self.assertIn("npm i -g @anthropic-ai/claude-code", action["ai_executable"])
        self.assertIn(f"chmod 700 {self.ocp_home}", action["ai_executable"])
        self.assertTrue(any("claude setup-token" in step for step in action["human_required"]))


class RestartAndLan(TempHome):
    def setUp(self):
        super().setUp()
        self.bin = os.path.join(self.tmp, "bin")
        os.makedirs(self.bin)
        self.calls = os.path.join(self.tmp, "calls.json")

    def main(self, *args, **extra):
        env = self.environ(PATH=self.bin + os.pathsep + os.environ.get("PATH", ""), **extra)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = ocp.main(list(args), env)
        return code, out.getvalue(), err.getvalue()

    def test_hints_name_the_command_the_owner_runs(self):
        write_tool(self.bin, "ip", "print('2: eth0    inet 192.168.1.20/24 scope global eth0')")
        write_tool(self.bin, "crontab", "print('')")
        self.assertIn("`ocp keys add NAME`", self.main("lan", OCP_COMMAND="ocp")[1])
        self.assertIn("start it again: ocp serve.", self.main("restart", OCP_COMMAND="ocp")[2])
        self.assertIn(f"`python3 {ROOT}/ocp.py keys add NAME`", self.main("lan")[1])

    def test_restart_uses_the_installed_user_service(self):
        write_tool(self.bin, "systemctl", f"json.dump(sys.argv[1:], open({self.calls!r}, 'w'))")
        unit = os.path.join(self.home, ".config", "systemd", "user")
        os.makedirs(unit)
        open(os.path.join(unit, "ocp.service"), "w").close()
        code, out, _ = self.main("restart")
        self.assertEqual(code, 0)
        with open(self.calls) as f:
            self.assertEqual(json.load(f), ["--user", "restart", "ocp.service"])

    def test_restart_without_a_service_says_how(self):
        write_tool(self.bin, "crontab", "print('')")
        code, _, err = self.main("restart")
        self.assertEqual(code, 1)
        self.assertIn("ocp.py serve", err)

    def test_lan_lists_addresses_and_the_client_line(self):
        write_tool(self.bin, "ip", "print('2: eth0    inet 192.168.1.20/24 brd 192.168.1.255 scope global eth0\\n"
                                   "3: wlan0    inet 10.0.0.7/24 scope global wlan0')")
        code, out, _ = self.main("lan", "--json")
        self.assertEqual(json.loads(out)["addresses"], ["192.168.1.20", "10.0.0.7"])
        code, out, _ = self.main("lan")
        self.assertIn("export OPENAI_BASE_URL=http://192.168.1.20:0/v1", out)
        self.assertIn("--bind 0.0.0.0", out)


class PromptLoggingOptIn(ServerTest):
    env = {"OCP_LOG_PROMPTS": "1", "OCP_ADMIN_KEY": ADMIN}

    def test_the_exchange_is_logged_only_when_asked(self):
        ocp.setup_logging(self.config, self.server.ring, console=False)
        self.addCleanup(LogsMetricsStatusSessions.restore_logging, self)
        self.chat("what is in my diary")
        entries = wait_until(lambda: [e for e in self.server.ring.tail(50) if "prompt" in e])
        self.assertEqual(entries[-1]["prompt"], "what is in my diary")
        self.assertEqual(entries[-1]["answer"], "Echo: what is in my diary")
