"""Every real client stops at a wall at once and shows why (README: "When a key hits a wall").

Each client is set up the usual way (ocp_connect.py with a member's key) and asked once with a
key over its daily quota, then with the plan's limit held: it must exit within seconds, after at
most 2 requests, printing OCP's reason. A transient refusal (OCP busy: queue_full) is still
retried as before. The model is the fake CLI: no wall ever reaches it.
"""

import os
import subprocess
import sys
import time

import ocp
from e2e.base import ConnectedClientTest, real_claude, require
from helpers import directive, wait_until

AIDER = os.environ.get("OCP_E2E_AIDER", "")
CN = os.environ.get("OCP_E2E_CN", "")
OPENCODE = os.environ.get("OCP_E2E_OPENCODE", "")
CODEX = os.environ.get("OCP_E2E_CODEX", "")
LLM = os.path.join(os.path.dirname(sys.executable), "llm")
ADMIN = "ocp_admin_key_for_the_e2e_walls_000"
WALL_S = 5  # how soon a client must have stopped (beside its own start-up)
OPENAI_PYTHON = """
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2])
try:
    client.chat.completions.create(model="claude-sonnet-5-5", messages=[{"role": "user", "content": "hi"}])
except openai.APIError as e:
    print("error:", e)
    sys.exit(1)
"""


class WallsWithRealClients(ConnectedClientTest):
    env = {"CLAUDE_AUTH_MODE": "multi", "OCP_ADMIN_KEY": ADMIN}

    def setUp(self):
        super().setUp()
        self.work = self.project()
        for tool in (".config/opencode", ".codex", ".claude", ".continue", ".config/io.datasette.llm"):
            os.makedirs(os.path.join(self.home, tool), exist_ok=True)  # each client was installed here
        with open(os.path.join(self.home, ".aider.conf.yml"), "w") as f:
            f.write("dark-mode: true\n")

    def member(self, name, **quota):
        key, secret = self.server.store.add_key(name, ocp.KeyPolicy(**quota), time.time())
        return key, secret

    def over_quota(self, name):
        key, secret = self.member(name, daily=1)
        status, _, _ = self.request("POST", "/v1/chat/completions", {
            "model": "sonnet", "messages": [{"role": "user", "content": "the one request of today"}]},
            headers={"Authorization": f"Bearer {secret}"})
        self.assertEqual(status, 200)
        return key, secret

    def refused(self, key):
        """The key's requests that were not answered (a wall, a hold, OCP busy): one usage row each."""
        return [r for r in self.server.store.usage_rows(key.id, key.name, 0, 2 ** 40, 100) if r["status"] != "ok"]

    def shell_env(self):
        env = {"HOME": self.home, "PATH": os.environ["PATH"], "TERM": "dumb",
               "XDG_CACHE_HOME": os.environ.get("OCP_E2E_OPENCODE_CACHE", os.path.join(self.tmp, "cache")),
               "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}
        path = os.path.join(self.home, ".config", "ocp", "env")
        if os.path.exists(path):  # what a new shell has sourced after ocp_connect.py
            with open(path) as f:
                for line in f:
                    if line.startswith("export "):
                        name, _, value = line[7:].strip().partition("=")
                        env[name] = value.strip("'")
        return env

    def run_client(self, argv, timeout=40):
        """Run a client to its end (or `timeout`: then it is killed); (seconds, exit code, output)."""
        started = time.monotonic()
        proc = subprocess.Popen(argv, cwd=self.work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL, env=self.shell_env(), start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            output, _ = proc.communicate()
            output += f"\n[killed after {timeout} s]"
        return time.monotonic() - started, proc.returncode, output

    def commands(self, secret):
        """(client, argv) for every client that is installed; each asks one question."""
        port = self.port
        clients = [("openai-python", [sys.executable, "-c", OPENAI_PYTHON, f"http://127.0.0.1:{port}/v1", secret]),
                   ("llm", [LLM, "-m", "ocp-claude-sonnet-5-5", "--no-stream", "hello"]),
                   ("aider", [AIDER, "--model", "hosted_vllm/claude-sonnet-5-5", "--message", "say hi", "--no-git",
                              "--yes-always", "--no-check-update", "--no-show-release-notes", "--no-analytics"]),
                   ("cn", [CN, "-p", "say hi"]),
                   ("opencode", [OPENCODE, "run", "-m", "ocp/claude-sonnet-5-5", "say hi"]),
                   ("codex", [CODEX, "exec", "-p", "ocp", "--skip-git-repo-check", "say hi"]),
                   ("claude-code", [real_claude(), "-p", "say hi"])]
        for name, argv in clients:
            require(bool(argv[0]) and os.access(argv[0], os.X_OK), f"{name} is not installed",
                    "run .ci/run, which installs every client")
        return clients

    @staticmethod
    def as_run(name, argv, secret):
        """The client's command as its user runs it: the script with the key, llm from a login shell."""
        if name == "openai-python":
            return argv[:-1] + [secret]
        if name == "llm":  # (its OCP models come from what connect added to the shell's rc)
            return ["bash", "-c", ". ~/.bashrc 2>/dev/null; exec " + " ".join(f"'{a}'" for a in argv)]
        return argv

    def stops_at(self, wall, words):
        """Each client, over its key's wall, exits fast after at most two requests showing `words`."""
        figures = {}
        only = os.environ.get("OCP_E2E_WALL_ONLY", "")
        for name, argv in self.commands("placeholder"):
            if only and name != only:
                continue
            with self.subTest(name):
                key, secret = wall(name)
                self.connect("--key", secret)
                seconds, code, output = self.run_client(self.as_run(name, argv, secret))
                requests = len(self.refused(key))
                if only:
                    print(output[-3000:], self.refused(key), file=sys.stderr)
                figures[name] = (round(seconds, 1), requests)
                output = " ".join(output.split())  # (aider wraps its lines)
                self.assertLessEqual(requests, 2, f"{name} retried the wall: {output[-2000:]}")
                self.assertGreaterEqual(requests, 1)
                if name != "codex":  # Codex shows its own words for usage_limit_reached
                    self.assertIn(words, output, output[-2000:])
                else:
                    self.assertIn("usage limit", output.lower(), output[-2000:])
                self.assertLess(seconds, WALL_S + self.startup_s(name), output[-2000:])
        print(f"\nwall figures (seconds, requests): {figures}", file=sys.stderr)

    def startup_s(self, name):
        """A client's own start-up, beside the wall (opencode and aider load a lot)."""
        return {"opencode": 10, "aider": 10, "cn": 5, "codex": 3, "claude-code": 5}.get(name, 3)

    def test_a_key_over_its_quota(self):
        self.stops_at(self.over_quota, "Quota exceeded")

    def test_the_plan_limit_held(self):
        self.server.plan.hold(int(time.time()) + 3 * 3600, "You've hit your 5-hour limit · resets 4pm")
        self.stops_at(lambda name: self.member(name), "hit your 5-hour limit")

    def test_a_busy_ocp_is_still_retried(self):
        self.server.config = self.server.config.__class__(**dict(self.server.config.__dict__, max_concurrent=1,
                                                                 max_queue=0))
        self.server.runner.apply(self.server.config)
        sock = self.open_raw({"model": "sonnet", "messages": [{"role": "user", "content": "x " + directive(hang=True)}]},
                             ADMIN)
        wait_until(lambda: self.server.runner.live())
        for name, argv in self.commands("placeholder"):
            if name == "codex":
                continue  # Codex never retries a 429, wall or not
            with self.subTest(name):
                key, secret = self.member(name)
                self.connect("--key", secret)
                proc = subprocess.Popen(self.as_run(name, argv, secret), cwd=self.work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        stdin=subprocess.DEVNULL, env=self.shell_env(), start_new_session=True)
                try:
                    wait_until(lambda: len(self.refused(key)) >= 2, timeout=40, interval=0.2)
                finally:
                    os.killpg(proc.pid, 9)
                    proc.wait()
                self.assertTrue(all(r["http_status"] == 429 for r in self.refused(key)), "a transient 429 stays one")
        sock.close()
