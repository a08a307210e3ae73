"""The real Continue CLI (`cn -p`) answers through OCP right after ocp_connect.py, with no flag or manual fix."""

import os
import subprocess

from e2e.base import ConnectedClientTest, require
from helpers import directive
from test_connect import EXISTING

CN = os.environ.get("OCP_E2E_CN", "")


class ContinueAfterConnect(ConnectedClientTest):
    def setUp(self):
        require(bool(CN) and os.access(CN, os.X_OK), "the Continue CLI (cn) is not installed",
                "set OCP_E2E_CN to npm's @continuedev/cli, as .ci/run does")
        super().setUp()
        path = os.path.join(self.home, ".continue", "config.yaml")
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:  # the owner's own config, with a local model listed first
            f.write(EXISTING[".continue/config.yaml"])
        self.work = self.project()

    def test_cn_print_answers_through_ocp(self):
        self.connect()
        done = subprocess.run([CN, "-p", "say hi"], cwd=self.work, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, env={"HOME": self.home, "PATH": os.environ["PATH"]})
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("Echo: say hi", done.stdout)

    def test_a_task_that_needs_its_read_tool_gets_the_file_to_the_model(self):
        self.connect()
        with open(os.path.join(self.work, "secret.txt"), "w") as f:
            f.write("the treasure is under the oak")
        steer = directive(calls=[[{"name": "Read", "arguments": {"filepath": "secret.txt"}}]])
        done = subprocess.run([CN, "-p", "what does secret.txt say? " + steer], cwd=self.work, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL,
                              env={"HOME": self.home, "PATH": os.environ["PATH"]})
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("the treasure is under the oak", done.stdout, "the file's content reached the model")
        tool_runs = [r for r in self.runs() if "--mcp-config" in r["argv"]]
        self.assertEqual(len(tool_runs), 1, "cn's follow-up continued the parked CLI")
        self.assertEqual(self.server.parks.snapshot()["resumed"], 1)
