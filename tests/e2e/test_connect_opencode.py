"""The real opencode CLI answers through OCP right after ocp_connect.py, with no flag or manual fix."""

import contextlib
import io
import os
import subprocess

import ocp_connect
from e2e.base import require
from helpers import ServerTest

OPENCODE = os.environ.get("OCP_E2E_OPENCODE", "")


class OpencodeAfterConnect(ServerTest):
    def setUp(self):
        require(bool(OPENCODE) and os.access(OPENCODE, os.X_OK), "the opencode CLI is not installed",
                "set OCP_E2E_OPENCODE to npm's opencode-ai, as .ci/run does")
        super().setUp()
        os.makedirs(os.path.join(self.home, ".config", "opencode"))  # opencode was set up on this machine
        self.work = os.path.join(self.tmp, "project")
        os.makedirs(self.work)

    def test_opencode_run_answers_through_ocp(self):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = ocp_connect.main([f"127.0.0.1:{self.port}"], {"HOME": self.home, "PATH": os.environ["PATH"]},
                                    "linux")
        self.assertEqual(code, 0, out.getvalue())
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
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = ocp_connect.main([f"127.0.0.1:{self.port}", "--default"],
                                    {"HOME": self.home, "PATH": os.environ["PATH"]}, "linux")
        self.assertEqual(code, 0, out.getvalue())
        env = {"HOME": self.home, "PATH": os.environ["PATH"],
               "XDG_CACHE_HOME": os.environ.get("OCP_E2E_OPENCODE_CACHE", os.path.join(self.tmp, "cache"))}
        done = subprocess.run([OPENCODE, "run", "say hi by default"], cwd=self.work, env=env,
                              capture_output=True, text=True, timeout=240)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("Echo:", done.stdout)
        self.assertIn("claude-sonnet-5-5", done.stdout + done.stderr)
