"""The real Codex CLI (`codex exec`) through OCP's /v1/responses (AGENTS-SPEC §2), a scripted
model calling one of Codex's own tools. The model here is the fake CLI; Codex and its tool are real."""

import json
import os
import subprocess

from e2e.base import ConnectedClientTest, RealCliTest, require
from e2e.fake_anthropic import Reply
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
        self.assertNotIn("Model metadata", done.stdout + done.stderr, "Codex knows OCP's models (ocp-models.json)")

    def test_codex_knows_every_model_ocp_lists(self):
        for model in ("claude-opus-5-5", "claude-sonnet-4-6", "claude-haiku-4-5-20251001"):
            env = {"HOME": self.home, "PATH": os.environ["PATH"]}
            with open(os.path.join(self.home, ".config", "ocp", "env")) as f:
                for line in f:
                    if line.startswith("export "):
                        name, _, value = line[7:].strip().partition("=")
                        env[name] = value.strip("'")
            done = subprocess.run([CODEX, "exec", "-p", "ocp", "-m", model, "--skip-git-repo-check", "say hi"],
                                  cwd=self.work, capture_output=True, text=True, timeout=180,
                                  stdin=subprocess.DEVNULL, env=env)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            self.assertNotIn("Model metadata", done.stdout + done.stderr, model)

    def test_codex_runs_its_tool_and_answers_with_the_output(self):
        with open(os.path.join(self.work, "notes.txt"), "w") as f:
            f.write("buy milk")
        steer = directive(calls=[[{"name": "exec_command", "arguments": {"cmd": "cat notes.txt"}}]])
        done = self.codex("what is in notes.txt? " + steer)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("Done: ", done.stdout)
        self.assertIn("buy milk", done.stdout, "Codex ran cat and its output reached the model")
        self.assertEqual(self.server.parks.snapshot()["resumed"], 1, "Codex's function_call_output continued the CLI")


class CodexWithTheRealCli(RealCliTest):
    """`codex exec` through OCP driving the real claude CLI: the scripted upstream model calls
    Codex's exec_command, Codex runs it, the output goes back into the same parked CLI."""

    def setUp(self):
        require(bool(CODEX) and os.access(CODEX, os.X_OK), "the Codex CLI is not installed",
                "set OCP_E2E_CODEX to npm's @openai/codex, as .ci/run does")
        super().setUp()

    def test_codex_exec_runs_its_tool_and_answers(self):
        work = os.path.join(self.tmp, "project")
        os.makedirs(work)
        with open(os.path.join(work, "notes.txt"), "w") as f:
            f.write("call the plumber")
        codex_home = os.path.join(self.tmp, "codex-home")
        os.makedirs(codex_home)
        with open(os.path.join(codex_home, "ocp.config.toml"), "w") as f:  # as ocp_connect.py writes it
            f.write(f'model_provider = "ocp"\nmodel = "claude-sonnet-5-5"\n\n[model_providers.ocp]\nname = "OCP"\n'
                    f'base_url = "http://127.0.0.1:{self.port}/v1"\nenv_key = "OCP_API_KEY"\nwire_api = "responses"\n')

        def respond(body):
            results = [b for m in body.get("messages", []) if isinstance(m.get("content"), list)
                       for b in m["content"] if isinstance(b, dict) and b.get("type") == "tool_result"]
            if results:
                return Reply(text="Your note says: " + json.dumps(results[-1].get("content")))
            return Reply(text="", tool_uses=[{"name": "mcp__ocp__exec_command", "input": {"cmd": "cat notes.txt"}}])
        self.upstream.responder = respond
        done = subprocess.run([CODEX, "exec", "-p", "ocp", "--skip-git-repo-check", "What does notes.txt say?"],
                              cwd=work, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
                              env={"HOME": os.path.join(self.tmp, "home"), "CODEX_HOME": codex_home,
                                   "PATH": os.environ["PATH"], "OCP_API_KEY": "ocp-key-for-codex"})
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("Your note says:", done.stdout)
        self.assertIn("call the plumber", done.stdout, "Codex ran the command and its output reached the model")
        self.assertEqual(self.server.runner.leases_made, 1, self.server.parks.snapshot())  # one parked CLI for both rounds
