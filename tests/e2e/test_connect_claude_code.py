"""Claude Code used as a client on a machine that ran ocp_connect.py: its settings point it at OCP
(/v1/messages); the scripted model (the fake CLI behind OCP) has it run its own Read tool."""

import os
import subprocess

from e2e.base import ConnectedClientTest, real_claude
from helpers import directive


class ClaudeCodeAfterConnect(ConnectedClientTest):
    def setUp(self):
        self.client = real_claude()  # the pinned CLI, here as the client
        super().setUp()

    def test_claude_p_reads_a_file_through_ocp_right_after_connect(self):
        os.makedirs(os.path.join(self.home, ".claude"))  # Claude Code was installed here, never logged in
        self.connect()
        work = self.project()
        with open(os.path.join(work, "todo.txt"), "w") as f:
            f.write("water the plants")
        steer = directive(calls=[[{"name": "Read", "arguments": {"file_path": os.path.join(work, "todo.txt")}}]])
        done = subprocess.run([self.client, "-p", "what is in todo.txt? " + steer], cwd=work, capture_output=True,
                              text=True, timeout=180, stdin=subprocess.DEVNULL,
                              env={"HOME": self.home, "PATH": os.environ["PATH"],
                                   "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"})
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("water the plants", done.stdout, "Claude Code's Read ran and its result reached the model")
        self.assertEqual(self.server.parks.snapshot()["resumed"], 1)
