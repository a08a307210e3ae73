"""ocp_connect.py against a running OCP, in a temporary HOME that already holds each tool's config."""

import contextlib
import io
import json
import os
import stat
import subprocess
import sys
import urllib.request

import ocp_connect
from helpers import ROOT, ServerTest

ADMIN = "ocp_admin_key_for_connect_tests0000"

EXISTING = {
    ".bashrc": "export PATH=$PATH:/opt/bin\nalias ll='ls -l'\n",
    ".zshrc": "setopt autocd\n",
    ".config/fish/config.fish": "set -x EDITOR vim\n",
    ".continue/config.yaml": ("name: Mine\nversion: 1.0.0\nschema: v1\nmodels:\n  - name: Local llama\n"
                              "    provider: ollama\n    model: llama3\ncontext:\n  - provider: code\n"),
    ".config/opencode/opencode.json": json.dumps({"$schema": "https://opencode.ai/config.json", "theme": "dark",
                                                  "provider": {"other": {"npm": "x"}}}, indent=4) + "\n",
    ".aider.conf.yml": "dark-mode: true\nmodel: gpt-4o\n",
    ".config/io.datasette.llm/extra-openai-models.yaml": "- model_id: local\n  model_name: mistral\n",
    ".config/io.datasette.llm/keys.json": json.dumps({"openai": "sk-mine"}),
    ".openclaw/openclaw.json": json.dumps({"gateway": {"port": 18789},
                                           "models": {"providers": {"other": {"baseUrl": "http://x"}}}}),
    ".openclaw/agents/main/agent/auth-profiles.json": json.dumps({"version": 1, "profiles": {
        "anthropic:default": {"type": "api_key", "provider": "anthropic", "key": "sk-ant-mine"}}}),
}


def seed_existing_configs(home):
    """Each tool's config as its owner left it."""
    for name, text in EXISTING.items():
        path = os.path.join(home, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


class ConnectAClient(ServerTest):
    env = {"CLAUDE_AUTH_MODE": "multi", "OCP_ADMIN_KEY": ADMIN}

    def setUp(self):
        super().setUp()
        self.key = self.request("POST", "/api/keys", {"name": "laptop"},
                                headers={"Authorization": f"Bearer {ADMIN}"})[2]["key"]
        seed_existing_configs(self.home)
        self.server_url = f"127.0.0.1:{self.port}"

    def connect(self, *args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = ocp_connect.main(list(args), {"HOME": self.home, "PATH": ""}, platform="linux")
        return code, out.getvalue() + err.getvalue()

    def read(self, name):
        with open(os.path.join(self.home, name)) as f:
            return f.read()

    def snapshot(self):
        """Every file under HOME (dotfiles included) and its bytes."""
        files = {}
        for folder, _, names in os.walk(self.home):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, self.home)] = f.read()
        return files

    def test_configures_everything_and_keeps_what_was_there(self):
        code, out = self.connect(self.server_url, "--key", self.key)
        self.assertEqual(code, 0, out)
        api = f"http://127.0.0.1:{self.port}/v1"
        env = self.read(".config/ocp/env")
        self.assertIn(f"export OCP_BASE_URL='{api}'", env)
        self.assertIn(f"export OCP_API_KEY='{self.key}'", env)
        self.assertNotIn("OPENAI", env, "no global OpenAI settings without --shell-env")
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.home, ".config/ocp/env")).st_mode), 0o600)
        for rc in (".bashrc", ".zshrc"):
            self.assertTrue(self.read(rc).startswith(EXISTING[rc]))
            self.assertIn('. "$HOME/.config/ocp/env"', self.read(rc))
        self.assertIn('source "$HOME/.config/ocp/env.fish"', self.read(".config/fish/config.fish"))
        self.assertEqual(self.read(".config/environment.d/ocp.conf"), f"OCP_BASE_URL={api}\nOCP_API_KEY={self.key}\n")

        continue_yaml = self.read(".continue/config.yaml")
        self.assertIn("models:\n  # >>> ocp >>>\n  - name: OCP claude-sonnet-5-5\n    provider: openai\n", continue_yaml)
        self.assertIn(f"    apiBase: {api}\n", continue_yaml)
        self.assertIn("  - name: Local llama\n    provider: ollama\n    model: llama3\ncontext:\n  - provider: code\n",
                      continue_yaml)

        opencode = json.loads(self.read(".config/opencode/opencode.json"))
        self.assertEqual((opencode["theme"], opencode["provider"]["other"]), ("dark", {"npm": "x"}))
        self.assertEqual(opencode["provider"]["ocp"]["npm"], "@ai-sdk/openai-compatible")
        self.assertEqual(opencode["provider"]["ocp"]["options"], {"baseURL": api, "apiKey": self.key})
        self.assertEqual(len(opencode["provider"]["ocp"]["models"]), len(self.models.models), "every model")

        self.assertEqual(self.read(".aider.conf.yml"), EXISTING[".aider.conf.yml"], "aider's own settings untouched")
        settings = self.read(".aider.model.settings.yml")
        self.assertIn(f'- name: hosted_vllm/claude-sonnet-5-5\n  edit_format: diff\n  use_repo_map: true\n  extra_params:\n'
                      f'    api_base: "{api}"\n    api_key: "{self.key}"\n', settings)
        metadata = json.loads(self.read(".aider.model.metadata.json"))["hosted_vllm/claude-sonnet-5-5"]
        self.assertEqual((metadata["max_input_tokens"], metadata["litellm_provider"]), (1000000, "hosted_vllm"))

        llm = self.read(".config/io.datasette.llm/extra-openai-models.yaml")
        self.assertTrue(llm.startswith(EXISTING[".config/io.datasette.llm/extra-openai-models.yaml"]))
        self.assertIn("- model_id: ocp-claude-sonnet-5-5\n  model_name: claude-sonnet-5-5\n", llm)
        self.assertIn("  supports_schema: true\n  vision: true\n", llm)
        self.assertEqual(json.loads(self.read(".config/io.datasette.llm/keys.json")),
                         {"openai": "sk-mine", "ocp": self.key})

        claw = json.loads(self.read(".openclaw/openclaw.json"))
        self.assertEqual(claw["gateway"], {"port": 18789})
        self.assertEqual(claw["models"]["providers"]["other"], {"baseUrl": "http://x"})
        self.assertEqual(claw["models"]["providers"]["ocp"]["api"], "openai-completions")
        self.assertIn("ocp/claude-sonnet-5-5", claw["agents"]["defaults"]["models"])
        self.assertEqual(claw["models"]["providers"]["ocp"]["apiKey"], self.key)
        self.assertEqual(self.read(".openclaw/agents/main/agent/auth-profiles.json"),
                         EXISTING[".openclaw/agents/main/agent/auth-profiles.json"],
                         "no legacy JSON profile: OpenClaw 2026.9 would demand a migration for it")
        self.assertIn("Cursor", out)
        self.assertIn("public https URL", out)

    def test_a_second_run_changes_nothing_and_uninstall_restores_every_byte(self):
        before = self.snapshot()
        self.assertIn(".bashrc", before)
        self.assertIn(".aider.conf.yml", before)
        self.assertEqual(self.connect(self.server_url, "--key", self.key)[0], 0)
        after_first = self.snapshot()
        code, out = self.connect(self.server_url, "--key", self.key, "--json")
        self.assertEqual(code, 0, out)
        self.assertEqual({c["action"] for c in json.loads(out)["changes"]}, {"unchanged"})
        self.assertEqual(self.snapshot(), after_first, "no write and no new backup")
        code, out = self.connect("--uninstall")
        self.assertEqual(code, 0, out)
        self.assertEqual(self.snapshot(), before, "every original back, byte for byte, and nothing left over")

    def test_the_users_own_openai_settings_stay_theirs(self):
        with open(os.path.join(self.home, ".bashrc"), "a") as f:
            f.write("export OPENAI_API_KEY=sk-users-own\n")
        self.assertEqual(self.connect(self.server_url, "--key", self.key)[0], 0)
        for path, text in self.snapshot().items():
            self.assertNotIn(b"OPENAI_BASE_URL", text, path)
        shell = subprocess.run(["bash", "-c", ". ~/.bashrc; env"], capture_output=True, text=True,
                               env={"HOME": self.home, "PATH": os.environ["PATH"]})
        env = dict(line.split("=", 1) for line in shell.stdout.splitlines() if "=" in line)
        self.assertEqual(env.get("OPENAI_API_KEY"), "sk-users-own")
        self.assertNotIn("OPENAI_BASE_URL", env)
        self.assertEqual((env["OCP_BASE_URL"], env["OCP_API_KEY"]), (f"http://{self.server_url}/v1", self.key))
        self.assertEqual(json.loads(self.read(".config/io.datasette.llm/keys.json"))["openai"], "sk-mine")

    def test_shell_env_is_refused_over_openai_settings_of_ones_own(self):
        before = self.snapshot()
        code, out = self.connect(self.server_url, "--key", self.key, "--shell-env")
        self.assertEqual(code, 1)
        self.assertIn("llm stores an OpenAI key", out)
        self.assertIn("--force", out)
        self.assertEqual(self.snapshot(), before, "nothing written")
        code, out = self.connect(self.server_url, "--key", self.key, "--shell-env", "--force")
        self.assertEqual(code, 0, out)
        self.assertIn(f"export OPENAI_API_KEY='{self.key}'", self.read(".config/ocp/env"))

    def test_uninstall_keeps_every_later_edit(self):
        self.assertEqual(self.connect(self.server_url, "--key", self.key)[0], 0)
        with open(os.path.join(self.home, ".bashrc"), "a") as f:
            f.write("alias gs='git status'\n")
        continue_yaml = self.read(".continue/config.yaml").replace("context:\n", "context:\n  - provider: diff\n")
        with open(os.path.join(self.home, ".continue/config.yaml"), "w") as f:
            f.write(continue_yaml)
        opencode = json.loads(self.read(".config/opencode/opencode.json"))
        opencode["theme"] = "light"
        with open(os.path.join(self.home, ".config/opencode/opencode.json"), "w") as f:
            json.dump(opencode, f)
        code, out = self.connect("--uninstall")
        self.assertEqual(code, 0, out)
        self.assertEqual(self.read(".bashrc"), EXISTING[".bashrc"] + "alias gs='git status'\n")
        self.assertEqual(self.read(".continue/config.yaml"),
                         EXISTING[".continue/config.yaml"].replace("context:\n", "context:\n  - provider: diff\n"))
        opencode = json.loads(self.read(".config/opencode/opencode.json"))
        self.assertEqual(opencode, dict(json.loads(EXISTING[".config/opencode/opencode.json"]), theme="light"))
        self.assertEqual(self.read(".zshrc"), EXISTING[".zshrc"], "an untouched file: byte for byte")
        leftovers = [p for p in self.snapshot() if "ocp" in p.lower() and "openclaw" not in p]
        self.assertEqual(leftovers, [], "no backup, env file or manifest left")

    def test_default_makes_ocp_the_default_and_uninstall_gives_the_owners_back(self):
        path = os.path.join(self.home, ".config/opencode/opencode.json")
        with open(path, "w") as f:
            json.dump(dict(json.loads(EXISTING[".config/opencode/opencode.json"]), model="anthropic/claude-x"), f)
        self.assertEqual(self.connect(self.server_url, "--key", self.key)[0], 0)
        self.assertEqual(json.loads(self.read(".config/opencode/opencode.json"))["model"], "anthropic/claude-x",
                         "not without --default")
        self.assertEqual(self.connect(self.server_url, "--key", self.key, "--default")[0], 0)
        self.assertEqual(self.connect(self.server_url, "--key", self.key, "--default")[0], 0)  # twice: same result
        self.assertEqual(json.loads(self.read(".config/opencode/opencode.json"))["model"], "ocp/claude-sonnet-5-5")
        self.assertEqual(self.read(".config/io.datasette.llm/default_model.txt"), "ocp-claude-sonnet-5-5")
        with open(path) as f:
            edited = dict(json.load(f), theme="light")
        with open(path, "w") as f:
            json.dump(edited, f)
        self.assertEqual(self.connect("--uninstall")[0], 0)
        opencode = json.loads(self.read(".config/opencode/opencode.json"))
        self.assertEqual((opencode["model"], opencode["theme"], "ocp" in opencode["provider"]),
                         ("anthropic/claude-x", "light", False))
        self.assertFalse(os.path.exists(os.path.join(self.home, ".config/io.datasette.llm/default_model.txt")))

    def test_a_legacy_openclaw_profile_an_older_connect_wrote_is_repaired_for_good(self):
        path = os.path.join(self.home, ".openclaw/agents/main/agent/auth-profiles.json")
        legacy = json.loads(EXISTING[".openclaw/agents/main/agent/auth-profiles.json"])
        legacy["profiles"]["ocp:default"] = {"type": "api_key", "provider": "ocp", "key": self.key}
        with open(path, "w") as f:
            json.dump(legacy, f)
        self.assertEqual(self.connect(self.server_url, "--key", self.key)[0], 0)
        self.assertEqual(set(json.loads(self.read(".openclaw/agents/main/agent/auth-profiles.json"))["profiles"]),
                         {"anthropic:default"})
        self.assertEqual(self.connect("--uninstall")[0], 0)
        self.assertEqual(set(json.loads(self.read(".openclaw/agents/main/agent/auth-profiles.json"))["profiles"]),
                         {"anthropic:default"}, "uninstall does not bring the blocking profile back")

    def test_dry_run_writes_nothing(self):
        before = self.snapshot()
        code, out = self.connect(self.server_url, "--key", self.key, "--dry-run")
        self.assertEqual(code, 0, out)
        self.assertIn("would create", out)
        self.assertIn("would update", out)
        self.assertIn("+++ " + os.path.join(self.home, ".bashrc"), out)
        self.assertIn('+[ -f "$HOME/.config/ocp/env" ] && . "$HOME/.config/ocp/env"', out)
        self.assertEqual(self.snapshot(), before)

    def test_verify_makes_a_real_round_trip(self):
        self.connect(self.server_url, "--key", self.key)
        runs = len(self.runs())
        code, out = self.connect("--verify")
        self.assertEqual(code, 0, out)
        self.assertIn("answered 'Echo: Reply with one word: ready'", out)
        self.assertEqual(len(self.runs()), runs + 3, "chat completions, and what Codex and Claude Code speak")

    def test_a_refused_key_and_an_unknown_server(self):
        code, out = self.connect(self.server_url, "--key", "ocp_" + "q" * 32)
        self.assertEqual(code, 1)
        self.assertIn("refused that key", out)
        code, out = self.connect(self.server_url)
        self.assertEqual(code, 1)
        self.assertIn("needs a key", out)
        code, out = self.connect("127.0.0.1:1")
        self.assertEqual(code, 1)
        self.assertIn("cannot reach", out)

    def test_served_and_piped_into_python(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/connect.py") as response:
            script = response.read()
        with open(os.path.join(ROOT, "ocp_connect.py"), "rb") as f:
            self.assertEqual(script, f.read())
        done = subprocess.run([sys.executable, "-", self.server_url, "--key", self.key, "--dry-run"], input=script,
                              capture_output=True, env={"HOME": self.home, "PATH": ""}, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(b"would create", done.stdout)


class AdvertisedGuestKey(ServerTest):
    env = {"CLAUDE_AUTH_MODE": "multi", "PROXY_ANONYMOUS_KEY": "ocp_guest_key_connect", "PROXY_ADVERTISE_ANON_KEY": "1"}

    def test_no_key_needed_when_the_server_advertises_one(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = ocp_connect.main([f"127.0.0.1:{self.port}", "--json"], {"HOME": self.home, "PATH": ""}, "linux")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out.getvalue())["key_source"], "advertised by the server")
        with open(os.path.join(self.home, ".config", "ocp", "env")) as f:
            self.assertIn("ocp_guest_key_connect", f.read())


class ConnectCodexAndClaudeCode(ServerTest):
    """Codex gets a profile file of its own; Claude Code its ANTHROPIC_* settings, never over
    a login or key of the owner's own; --uninstall leaves each as the owner left it since."""

    def setUp(self):
        super().setUp()
        for name, text in ((".codex/config.toml", 'model = "gpt-5"\n\n[tui]\nnotifications = true\n'),
                           (".claude/settings.json", json.dumps({"theme": "dark"}) + "\n")):
            os.makedirs(os.path.dirname(os.path.join(self.home, name)), exist_ok=True)
            with open(os.path.join(self.home, name), "w") as f:
                f.write(text)

    def connect(self, *args, environ=None):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = ocp_connect.main(list(args), dict({"HOME": self.home, "PATH": ""}, **(environ or {})), "linux")
        return code, out.getvalue()

    def read(self, name):
        with open(os.path.join(self.home, name)) as f:
            return f.read()

    def test_codex_and_claude_code_are_configured_and_uninstalled_exactly(self):
        code, out = self.connect(f"127.0.0.1:{self.port}")
        self.assertEqual(code, 0, out)
        self.assertEqual(self.read(".codex/config.toml"), 'model = "gpt-5"\n\n[tui]\nnotifications = true\n')
        codex = self.read(".codex/ocp.config.toml")
        self.assertIn('model_provider = "ocp"', codex)
        self.assertIn(f'base_url = "http://127.0.0.1:{self.port}/v1"', codex)
        self.assertIn('wire_api = "responses"', codex)
        self.assertIn('env_key = "OCP_API_KEY"', codex)
        self.assertIn("codex -p ocp", out)
        catalog_path = os.path.join(self.home, ".codex", "ocp-models.json")
        self.assertIn(f"model_catalog_json = {json.dumps(catalog_path)}", codex, "Codex knows OCP's models")
        catalog = {m["slug"]: m for m in json.loads(self.read(".codex/ocp-models.json"))["models"]}
        self.assertEqual(set(catalog), {m.id for m in self.server.models.models})
        self.assertEqual(catalog["claude-sonnet-4-6"]["context_window"], 200000)
        self.assertEqual([e["effort"] for e in catalog["claude-sonnet-5-5"]["supported_reasoning_levels"]],
                         ["low", "medium", "high", "xhigh"])
        settings = json.loads(self.read(".claude/settings.json"))
        self.assertEqual(settings["env"]["ANTHROPIC_BASE_URL"], f"http://127.0.0.1:{self.port}")
        self.assertEqual(settings["theme"], "dark")
        code, out = self.connect(f"localhost:{self.port}")  # again: its own earlier entries are no owner's setting
        self.assertNotIn("Claude Code: not configured", out)
        self.assertEqual(json.loads(self.read(".claude/settings.json"))["env"]["ANTHROPIC_BASE_URL"],
                         f"http://localhost:{self.port}")
        with open(os.path.join(self.home, ".codex/config.toml"), "a") as f:
            f.write("\n[projects.x]\ntrust_level = \"trusted\"\n")  # the owner's later edit
        code, out = self.connect("--uninstall")
        self.assertEqual(code, 0, out)
        self.assertEqual(self.read(".codex/config.toml"),
                         'model = "gpt-5"\n\n[tui]\nnotifications = true\n\n[projects.x]\ntrust_level = "trusted"\n')
        self.assertFalse(os.path.exists(os.path.join(self.home, ".codex", "ocp.config.toml")))
        self.assertFalse(os.path.exists(catalog_path))
        self.assertEqual(json.loads(self.read(".claude/settings.json")), {"theme": "dark"})

    def test_claude_code_with_a_login_of_its_own_is_left_alone_unless_forced(self):
        with open(os.path.join(self.home, ".claude", ".credentials.json"), "w") as f:
            f.write("{}")
        code, out = self.connect(f"127.0.0.1:{self.port}")
        self.assertEqual(code, 0, out)
        self.assertNotIn("env", json.loads(self.read(".claude/settings.json")))
        self.assertIn("Claude Code: not configured", out)
        code, out = self.connect(f"127.0.0.1:{self.port}", "--force")
        self.assertIn("ANTHROPIC_AUTH_TOKEN", json.loads(self.read(".claude/settings.json"))["env"])
