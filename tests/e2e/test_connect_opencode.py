"""The real opencode CLI answers through OCP right after ocp_connect.py, with no flag or manual fix."""

import os
import subprocess

from e2e.base import ConnectedClientTest, require
from helpers import directive

OPENCODE = os.environ.get("OCP_E2E_OPENCODE", "")


class OpencodeAfterConnect(ConnectedClientTest):
    def setUp(self):
        require(bool(OPENCODE) and os.access(OPENCODE, os.X_OK), "the opencode CLI is not installed",
                "set OCP_E2E_OPENCODE to npm's opencode-ai, as .ci/run does")
        super().setUp()
        os.makedirs(os.path.join(self.home, ".config", "opencode"))  # opencode was set up on this machine
        self.work = self.project()

    def test_opencode_run_answers_through_ocp(self):
        self.connect()
        env = {"HOME": self.home, "PATH": os.environ["PATH"],
               # opencode fetches its provider package from the npm registry once: keep it between runs
               "XDG_CACHE_HOME": os.environ.get("OCP_E2E_OPENCODE_CACHE", os.path.join(self.tmp, "cache"))}
        done = subprocess.run([OPENCODE, "run", "-m", "ocp/claude-sonnet-5-5", "say hi"], cwd=self.work, env=env,
                              capture_output=True, text=True, timeout=240)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("Echo:", done.stdout)
        asked = [r for r in self.runs() if "say hi" in "".join(b.get("text", "") for b in r.get("stdin_blocks", []))]
        self.assertTrue(asked, "the prompt reached the CLI through OCP")

    def test_with_default_opencode_needs_no_model_flag(self):
        self.connect("--default")
        env = {"HOME": self.home, "PATH": os.environ["PATH"],
               "XDG_CACHE_HOME": os.environ.get("OCP_E2E_OPENCODE_CACHE", os.path.join(self.tmp, "cache"))}
        done = subprocess.run([OPENCODE, "run", "say hi by default"], cwd=self.work, env=env,
                              capture_output=True, text=True, timeout=240)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("Echo:", done.stdout)
        self.assertIn("claude-sonnet-5-5", done.stdout + done.stderr)

    def test_a_task_that_needs_opencodes_write_tool_writes_the_file(self):
        self.connect()
        env = {"HOME": self.home, "PATH": os.environ["PATH"],
               "XDG_CACHE_HOME": os.environ.get("OCP_E2E_OPENCODE_CACHE", os.path.join(self.tmp, "cache"))}
        target = os.path.join(self.work, "notes.txt")
        steer = directive(calls=[[{"name": "write", "arguments": {"filePath": target, "content": "milk, eggs\n"}}]],
                          final="I wrote notes.txt.")
        done = subprocess.run([OPENCODE, "run", "-m", "ocp/claude-sonnet-5-5", "create notes.txt " + steer],
                              cwd=self.work, env=env, capture_output=True, text=True, timeout=240)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        with open(target) as f:
            self.assertEqual(f.read(), "milk, eggs\n")
        self.assertIn("I wrote notes.txt.", done.stdout)
        tool_runs = [r for r in self.runs() if "--mcp-config" in r["argv"]]
        self.assertEqual(len(tool_runs), 1, "opencode's follow-up continued the parked CLI")
        self.assertEqual(self.server.parks.snapshot()["resumed"], 1)
