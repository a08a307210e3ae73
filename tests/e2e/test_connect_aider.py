"""The real aider answers through OCP right after ocp_connect.py: no OPENAI_* asked for, the diff format."""

import os
import subprocess

from e2e.base import ConnectedClientTest, require

AIDER = os.environ.get("OCP_E2E_AIDER", "")
KEY = "ocp_aider_key_for_tests_000000000000"


class AiderAfterConnect(ConnectedClientTest):
    env = {"CLAUDE_AUTH_MODE": "shared", "PROXY_API_KEY": KEY}

    def setUp(self):
        require(bool(AIDER) and os.access(AIDER, os.X_OK), "aider is not installed",
                "set OCP_E2E_AIDER to aider-chat's aider, as .ci/run does")
        super().setUp()
        with open(os.path.join(self.home, ".aider.conf.yml"), "w") as f:
            f.write("dark-mode: true\n")  # the owner's own aider settings
        self.work = self.project()

    def test_aider_message_answers_through_ocp(self):
        self.connect("--key", KEY)
        done = subprocess.run([AIDER, "--model", "hosted_vllm/claude-sonnet-5-5", "--message", "say hi", "--no-git",
                               "--yes-always", "--no-check-update", "--no-show-release-notes", "--no-analytics"],
                              cwd=self.work, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
                              env={"HOME": self.home, "PATH": os.environ["PATH"], "TERM": "dumb"})
        output = done.stdout + done.stderr
        self.assertEqual(done.returncode, 0, output)
        self.assertIn("Model: hosted_vllm/claude-sonnet-5-5 with diff edit format", output)
        self.assertNotIn("environment variables", output, "no missing-key warning or prompt")
        self.assertIn("Echo: say hi", output)
