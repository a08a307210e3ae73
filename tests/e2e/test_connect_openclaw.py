"""The real OpenClaw (2026.9.6, on Node 24) answers through OCP right after ocp_connect.py --default.

The machine has used OpenClaw before: its agent already has the SQLite auth store,
where a legacy auth-profiles.json entry for `ocp` stopped every run with
"requires legacy credential migration".
"""

import os
import subprocess

from e2e.base import ConnectedClientTest, require

OPENCLAW = os.environ.get("OCP_E2E_OPENCLAW", "")
NODE_BIN = os.environ.get("OCP_E2E_NODE24_BIN", "")
KEY = "ocp_openclaw_key_for_tests_000000000"


class OpenClawAfterConnect(ConnectedClientTest):
    env = {"CLAUDE_AUTH_MODE": "shared", "PROXY_API_KEY": KEY}

    def setUp(self):
        require(bool(OPENCLAW) and os.access(OPENCLAW, os.X_OK) and os.path.isdir(NODE_BIN),
                "OpenClaw (or the Node 24 it needs) is not installed",
                "set OCP_E2E_OPENCLAW and OCP_E2E_NODE24_BIN, as .ci/run does")
        super().setUp()
        os.makedirs(os.path.join(self.home, ".openclaw"))
        self.env = {"HOME": self.home, "PATH": NODE_BIN + os.pathsep + os.environ["PATH"]}
        self.agent("warm up")  # OpenClaw was used here before: the agent's own store exists
        self.assertTrue(os.path.exists(os.path.join(self.home, ".openclaw/agents/main/agent/openclaw-agent.sqlite")))

    def agent(self, message):
        return subprocess.run([OPENCLAW, "agent", "--local", "--agent", "main", "-m", message], cwd=self.tmp,
                              env=self.env, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)

    def test_an_agent_run_answers_through_ocp_as_its_primary_model(self):
        self.connect("--key", KEY, "--default", env=self.env)
        done = self.agent("say hi")
        output = done.stdout + done.stderr
        self.assertEqual(done.returncode, 0, output[-3000:])
        self.assertNotIn("legacy credential migration", output)
        self.assertIn("Echo:", output)
