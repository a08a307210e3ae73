"""ocp_connect.py on a machine whose owner already uses OpenAI through llm: the real `llm` CLI.

The owner's own OpenAI endpoint is a capture server standing in for OpenAI; after
connect, llm's OpenAI models still go there with the owner's key, OCP never sees
that key, and llm's new ocp-* models answer through OCP.
"""

import http.server
import json
import os
import subprocess
import sys
import threading

from e2e.base import ConnectedClientTest, require

LLM = os.path.join(os.path.dirname(sys.executable), "llm")
USERS_OPENAI_KEY = "sk-users-own-openai-key-0123456789"


class Capture(http.server.ThreadingHTTPServer):
    """Records every request; answers like OpenAI's chat completions (not streamed)."""

    def __init__(self):
        self.seen = []
        super().__init__(("127.0.0.1", 0), CaptureHandler)


class CaptureHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append({"path": self.path, "auth": self.headers.get("Authorization", ""),
                                 "body": json.loads(body or b"{}")})
        answer = json.dumps({"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "from the owner's OpenAI"}}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


class AnOwnerWhoAlreadyUsesOpenAI(ConnectedClientTest):
    def setUp(self):
        require(os.access(LLM, os.X_OK), "the llm CLI is not installed", "pip install llm, as .ci/run does")
        super().setUp()
        self.openai = Capture()
        threading.Thread(target=self.openai.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.addCleanup(self.openai.server_close)
        self.addCleanup(self.openai.shutdown)
        with open(os.path.join(self.home, ".bashrc"), "w") as f:
            f.write(f"export OPENAI_BASE_URL=http://127.0.0.1:{self.openai.server_address[1]}/v1\n")
        self.llm("keys", "set", "openai", "--value", USERS_OPENAI_KEY)
        self.ocp_seen = []
        handler_class = self.server.RequestHandlerClass
        original = handler_class.dispatch

        def recording(handler):  # what reaches OCP, key included
            self.ocp_seen.append(handler.headers.get("Authorization", "") + handler.headers.get("x-api-key", ""))
            original(handler)
        for method in ("do_GET", "do_POST"):
            setattr(handler_class, method, recording)
            self.addCleanup(setattr, handler_class, method, original)

    def llm(self, *args):
        """Run llm as the owner's login shell would: .bashrc (and what connect added) first."""
        command = " ".join(["exec", LLM] + [f"'{a}'" for a in args])
        done = subprocess.run(["bash", "-c", f". ~/.bashrc; {command}"], capture_output=True, text=True, timeout=120,
                              env={"HOME": self.home, "PATH": os.environ.get("PATH", "")})
        return done.returncode, done.stdout + done.stderr

    def test_connect_keeps_the_owners_openai_and_adds_ocp(self):
        self.connect()
        code, output = self.llm("-m", "gpt-4o-mini", "--no-stream", "hello")
        self.assertEqual(code, 0, output)
        self.assertIn("from the owner's OpenAI", output)
        self.assertEqual([s["auth"] for s in self.openai.seen], [f"Bearer {USERS_OPENAI_KEY}"],
                         "the owner's OpenAI requests still go where they went, with their key")
        code, output = self.llm("-m", "ocp-claude-sonnet-5-5", "--no-stream", "hello OCP")
        self.assertEqual(code, 0, output)
        self.assertIn("Echo: hello OCP", output)
        self.assertTrue(self.ocp_seen)
        self.assertFalse([seen for seen in self.ocp_seen if USERS_OPENAI_KEY in seen], "OCP never saw the owner's key")
        self.assertEqual(len(self.openai.seen), 1)

    def test_default_makes_ocp_llms_default_model_until_uninstall(self):
        owners_default = self.llm("models", "default")[1].strip()
        self.connect("--default")
        self.assertEqual(self.llm("models", "default")[1].strip(), "ocp-claude-sonnet-5-5")
        code, output = self.llm("--no-stream", "hello default")
        self.assertEqual((code, "Echo: hello default" in output), (0, True), output)
        self.connect("--uninstall")
        self.assertEqual(self.llm("models", "default")[1].strip(), owners_default, "llm's own default again")
