"""The YAML ocp_connect.py writes, read back by a real YAML parser (PyYAML, test-only)."""

import contextlib
import io
import os

import ocp_connect
from e2e.base import require
from helpers import ServerTest
from test_connect import seed_existing_configs

try:
    import yaml
except ImportError:  # checked in setUp: skip on a bare machine, fail under OCP_E2E=1
    yaml = None


class ConnectedYamlParses(ServerTest):
    def setUp(self):
        require(yaml is not None, "pyyaml is not installed", "run the suite with a python that has pyyaml, as .ci/run does")
        super().setUp()
        seed_existing_configs(self.home)
        with contextlib.redirect_stdout(io.StringIO()):
            code = ocp_connect.main([f"127.0.0.1:{self.port}"], {"HOME": self.home, "PATH": ""}, "linux")
        self.assertEqual(code, 0)

    def load(self, name):
        with open(os.path.join(self.home, name)) as f:
            return yaml.safe_load(f)

    def test_continue_aider_and_llm(self):
        api = f"http://127.0.0.1:{self.port}/v1"
        continue_config = self.load(".continue/config.yaml")
        names = [m["name"] for m in continue_config["models"]]
        self.assertEqual(names[-1], "Local llama")
        self.assertIn("OCP claude-sonnet-5-5", names)
        self.assertEqual(continue_config["context"], [{"provider": "code"}])
        ocp_model = [m for m in continue_config["models"] if m["name"] == "OCP claude-sonnet-5-5"][0]
        self.assertEqual((ocp_model["provider"], ocp_model["apiBase"]), ("openai", api))
        self.assertEqual(self.load(".aider.conf.yml"), {"dark-mode": True, "model": "gpt-4o"}, "aider's own, untouched")
        settings = self.load(".aider.model.settings.yml")
        self.assertIn({"name": "hosted_vllm/claude-sonnet-5-5", "edit_format": "diff", "use_repo_map": True,
                       "extra_params": {"api_base": api, "api_key": "ocp-no-key-needed"}}, settings)
        llm = self.load(".config/io.datasette.llm/extra-openai-models.yaml")
        self.assertEqual(llm[0], {"model_id": "local", "model_name": "mistral"})
        self.assertIn({"model_id": "ocp-claude-sonnet-5-5", "model_name": "claude-sonnet-5-5", "api_base": api,
                       "api_key_name": "ocp", "supports_schema": True, "vision": True}, llm)
