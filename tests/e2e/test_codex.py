"""The real Codex CLI (`codex exec`) through OCP's /v1/responses (AGENTS-SPEC §2), a scripted
model calling one of Codex's own tools. The model here is the fake CLI; Codex and its tool are real."""

import os
import subprocess

from e2e.base import ConnectedClientTest, require
from helpers import directive

CODEX = os.environ.get("OCP_E2E_CODEX", "")


class CodexThroughOcp(ConnectedClientTest):
    def setUp(self):
        require(bool(CODEX) and os.access(CODEX, os.X_OK), "the Codex CLI is not installed",
                "set OCP_E2E_CODEX to npm's @openai/codex, as .ci/run does")
        super().setUp()
        self.codex_home = os.path.join(self.home, ".codex")
        os.makedirs(self.codex_home)
        with open(os.path.join(self.codex_home, "config.toml"), "w") as f:  # the owner's own Codex setup
            f.write('model = "gpt-5"\n')
        self.connect()  # writes ~/.codex/ocp.config.toml: `codex -p ocp`
        self.work = self.project()

    def codex(self, prompt):
        env = {"HOME": self.home, "PATH": os.environ["PATH"]}
        with open(os.path.join(self.home, ".config", "ocp", "env")) as f:  # what a new shell has sourced
            for line in f:
                if line.startswith("export "):
                    name, _, value = line[7:].strip().partition("=")
                    env[name] = value.strip("'")
        return subprocess.run([CODEX, "exec", "-p", "ocp", "--skip-git-repo-check", prompt], cwd=self.work,
                              capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL, env=env)

    def test_codex_exec_answers(self):
        done = self.codex("say hi")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("Echo: say hi", done.stdout)

    def test_codex_runs_its_tool_and_answers_with_the_output(self):
        with open(os.path.join(self.work, "notes.txt"), "w") as f:
            f.write("buy milk")
        steer = directive(calls=[[{"name": "exec_command", "arguments": {"cmd": "cat notes.txt"}}]])
        done = self.codex("what is in notes.txt? " + steer)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("Done: ", done.stdout)
        self.assertIn("buy milk", done.stdout, "Codex ran cat and its output reached the model")
        self.assertEqual(self.server.parks.snapshot()["resumed"], 1, "Codex's function_call_output continued the CLI")
