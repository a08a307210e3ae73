"""The end-to-end base: OCP drives the real claude CLI against tests/e2e/fake_anthropic.py.

The suites run when OCP_E2E_CLAUDE names the pinned CLI (2.1.330); without it
they skip with a message, unless OCP_E2E=1 (CI), where a missing tool fails.
"""

import contextlib
import io
import os
import subprocess
import unittest

import ocp_connect
from helpers import ServerTest, pid_alive
from e2e.fake_anthropic import FakeAnthropic

try:
    import openai
except ImportError:  # checked in setUpClass: skip on a bare machine, fail under OCP_E2E=1
    openai = None

PINNED = "2.1.330"
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAE"
       "hQGAhKmMIQAAAABJRU5ErkJggg==")  # a 1x1 image
REQUIRED = os.environ.get("OCP_E2E") == "1"


def require(available: bool, what: str,
            how: str = "set OCP_E2E_CLAUDE to the pinned claude CLI, or run .ci/run") -> None:
    """Skip (or, under OCP_E2E=1, fail) when a tool the suite needs is missing."""
    if available:
        return
    message = f"{what} ({how})"
    if REQUIRED:
        raise AssertionError("OCP_E2E=1 but " + message)
    raise unittest.SkipTest(message)


def real_claude() -> str:
    path = os.environ.get("OCP_E2E_CLAUDE", "")
    require(bool(path) and os.access(path, os.X_OK), "the real claude CLI is not installed")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    require(version.startswith(PINNED), f"claude {version.strip()!r} is not the pinned {PINNED}")
    return path


class RealCliTest(ServerTest):
    """A real OCP server, the real claude CLI, a fake Anthropic upstream; subscription mode."""

    claude = ""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.claude = real_claude()

    def setUp(self):
        self.upstream = FakeAnthropic()
        self.addCleanup(self.upstream.close)
        super().setUp()
        self.server.runner.kill_grace_s = 2

    def server_env(self) -> dict:
        return dict(self.env, CLAUDE_BIN=self.claude, OCP_UPSTREAM_BASE_URL=self.upstream.url,
                    CLAUDE_CODE_OAUTH_TOKEN="sk-ant-oat01-fake-e2e-token", CLAUDE_CODE_MAX_RETRIES="1",
                    FAKE_CLAUDE_LOG="")

    def kill_leftovers(self):
        for entry in self.server.runner.live():
            if pid_alive(entry["pid"]):
                os.killpg(entry["pid"], 9)

    def live_cli_pids(self):
        return [e["pid"] for e in self.server.runner.live()]


class OpenAIClientTest(RealCliTest):
    """The real CLI behind OCP, driven by the openai Python SDK (`self.client`)."""

    @classmethod
    def setUpClass(cls):
        require(openai is not None, "the openai package is not installed",
                "run the suite with a python that has openai, as .ci/run does")
        super().setUpClass()

    def setUp(self):
        super().setUp()
        self.client = openai.OpenAI(api_key="not-needed", base_url=f"http://127.0.0.1:{self.port}/v1",
                                    max_retries=0, timeout=90)
        self.addCleanup(self.client.close)


class ConnectedClientTest(ServerTest):
    """A real client tool on a machine that ran ocp_connect.py against this server (fake CLI)."""

    def connect(self, *args, env=None):
        """Run ocp_connect.py SERVER ARGS… for this HOME; fail the test unless it exits 0."""
        env = env or {"HOME": self.home, "PATH": os.environ["PATH"]}
        server = [f"127.0.0.1:{self.port}"] if not args or args[0] != "--uninstall" else []
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = ocp_connect.main(server + list(args), env, "linux")
        self.assertEqual(code, 0, out.getvalue())

    def project(self) -> str:
        """An empty working directory for the tool."""
        path = os.path.join(self.tmp, "project")
        os.makedirs(path, exist_ok=True)
        return path
