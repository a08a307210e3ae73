"""The real aider answers through OCP right after ocp_connect.py: no OPENAI_* asked for, the diff format."""

import contextlib
import io
import os
import subprocess

import ocp_connect
from e2e.base import require
from helpers import ServerTest

AIDER = os.environ.get("OCP_E2E_AIDER", "")
KEY = "ocp_aider_key_for_tests_000000000000"


class AiderAfterConnect(ServerTest):
    env = {"CLAUDE_AUTH_MODE": "shared", "PROXY_API_KEY": KEY}

    def setUp(self):
        require(bool(AIDER) and os.access(AIDER, os.X_OK), "aider is not installed",
                "set OCP_E2E_AIDER to aider-chat's aider, as .ci/run does")
        super().setUp()
        with open(os.path.join(self.home, ".aider.conf.yml"), "w") as f:
            f.write("dark-mode: true\n")  # the owner's own aider settings
        self.work = os.path.join(self.tmp, "project")
        os.makedirs(self.work)

    def test_aider_message_answers_through_ocp(self):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = ocp_connect.main([f"127.0.0.1:{self.port}", "--key", KEY],
                                    {"HOME": self.home, "PATH": os.environ["PATH"]}, "linux")
        self.assertEqual(code, 0, out.getvalue())
        done = subprocess.run([AIDER, "--model", "hosted_vllm/claude-sonnet-5-5", "--message", "say hi", "--no-git",
                               "--yes-always", "--no-check-update", "--no-show-release-notes", "--no-analytics"],
                              cwd=self.work, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
                              env={"HOME": self.home, "PATH": os.environ["PATH"], "TERM": "dumb"})
        output = done.stdout + done.stderr
        self.assertEqual(done.returncode, 0, output)
        self.assertIn("Model: hosted_vllm/claude-sonnet-5-5 with diff edit format", output)
        self.assertNotIn("environment variables", output, "no missing-key warning or prompt")
        self.assertIn("Echo: say hi", output)
