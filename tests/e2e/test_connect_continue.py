"""The real Continue CLI (`cn -p`) answers through OCP right after ocp_connect.py, with no flag or manual fix."""

import contextlib
import io
import os
import subprocess

import ocp_connect
from e2e.base import require
from helpers import ServerTest
from test_connect import EXISTING

CN = os.environ.get("OCP_E2E_CN", "")


class ContinueAfterConnect(ServerTest):
    def setUp(self):
        require(bool(CN) and os.access(CN, os.X_OK), "the Continue CLI (cn) is not installed",
                "set OCP_E2E_CN to npm's @continuedev/cli, as .ci/run does")
        super().setUp()
        path = os.path.join(self.home, ".continue", "config.yaml")
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:  # the owner's own config, with a local model listed first
            f.write(EXISTING[".continue/config.yaml"])
        self.work = os.path.join(self.tmp, "project")
        os.makedirs(self.work)

    def test_cn_print_answers_through_ocp(self):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = ocp_connect.main([f"127.0.0.1:{self.port}"], {"HOME": self.home, "PATH": os.environ["PATH"]},
                                    "linux")
        self.assertEqual(code, 0, out.getvalue())
        done = subprocess.run([CN, "-p", "say hi"], cwd=self.work, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, env={"HOME": self.home, "PATH": os.environ["PATH"]})
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("Echo: say hi", done.stdout)
