"""Anthropic's clients through OCP's /v1/messages, with the real claude CLI behind OCP: the
anthropic Python SDK, and Claude Code itself used as a client (AGENTS-SPEC §3)."""

import json
import os
import subprocess

from e2e.base import RealCliTest, require
from e2e.fake_anthropic import Reply

try:
    import anthropic
except ImportError:  # checked in setUpClass: skip on a bare machine, fail under OCP_E2E=1
    anthropic = None

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def tool_result_text(body):
    """The text of the tool_result in the last user message of an upstream request, or None."""
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user" and isinstance(message.get("content"), list):
            for block in message["content"]:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    content = block.get("content")
                    return content if isinstance(content, str) else " ".join(
                        c.get("text", "") for c in content or [] if isinstance(c, dict))
            return None
    return None


class AnthropicSdk(RealCliTest):
    @classmethod
    def setUpClass(cls):
        require(anthropic is not None, "the anthropic package is not installed",
                "run the suite with a python that has anthropic, as .ci/run does")
        super().setUpClass()

    def setUp(self):
        super().setUp()
        self.client = anthropic.Anthropic(api_key="not-needed", base_url=f"http://127.0.0.1:{self.port}",
                                          max_retries=0, timeout=90)
        self.addCleanup(self.client.close)

    def test_create_and_stream(self):
        self.upstream.script(Reply(text="Hello through Messages.", deltas=3))
        message = self.client.messages.create(model="claude-sonnet-5-5", max_tokens=256,
                                              messages=[{"role": "user", "content": "hi"}])
        self.assertEqual((message.content[0].text, message.stop_reason), ("Hello through Messages.", "end_turn"))
        self.assertEqual(message.usage.input_tokens, 321)
        with self.client.messages.stream(model="claude-sonnet-5-5", max_tokens=256,
                                         messages=[{"role": "user", "content": "hi"}]) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        self.assertEqual((text, final.stop_reason), ("Hello through Messages.", "end_turn"))

    def test_tools_create_and_stream_in_one_cli(self):
        def respond(body):
            result = tool_result_text(body)
            if result is not None:
                return Reply(text=f"The weather: {result}.")
            return Reply(text="", tool_uses=[{"name": "mcp__ocp__get_weather", "input": {"city": "Oslo"}}])
        self.upstream.responder = respond
        messages = [{"role": "user", "content": "Weather in Oslo?"}]
        first = self.client.messages.create(model="claude-sonnet-5-5", max_tokens=256, tools=[WEATHER], messages=messages)
        self.assertEqual(first.stop_reason, "tool_use")
        use = [b for b in first.content if b.type == "tool_use"][0]
        self.assertEqual((use.name, use.input), ("get_weather", {"city": "Oslo"}))
        messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "cold"}]}]
        with self.client.messages.stream(model="claude-sonnet-5-5", max_tokens=256, tools=[WEATHER],
                                         messages=messages) as stream:
            final = stream.get_final_message()
        self.assertEqual((final.content[0].text, final.stop_reason), ("The weather: cold.", "end_turn"))
        self.assertEqual(self.server.runner.leases_made, 1, "the follow-up continued the parked CLI")


class ClaudeCodeAsAClient(RealCliTest):
    """The real Claude Code CLI pointed at OCP (ANTHROPIC_BASE_URL), in a throw-away HOME."""

    def test_claude_p_reads_a_file_with_its_read_tool_through_ocp(self):
        work = os.path.join(self.tmp, "project")
        os.makedirs(work)
        notes = os.path.join(work, "notes.txt")
        with open(notes, "w") as f:
            f.write("the key is under the mat")

        def respond(body):
            result = tool_result_text(body)
            if result is not None:
                return Reply(text="The file says: " + ("the key is under the mat" if "under the mat" in result
                                                      else "(not read)"))
            return Reply(text="", tool_uses=[{"name": "mcp__ocp__Read", "input": {"file_path": notes}}])
        self.upstream.responder = respond
        home = os.path.join(self.tmp, "client-home")
        os.makedirs(home)
        env = {"HOME": home, "PATH": os.environ["PATH"], "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{self.port}",
               "ANTHROPIC_API_KEY": "ocp-client-key", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
               "DISABLE_AUTOUPDATER": "1"}
        done = subprocess.run([self.claude, "-p", "What does notes.txt say?", "--output-format", "text"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=180)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("The file says: the key is under the mat", done.stdout)
        self.assertEqual(self.server.parks.snapshot()["resumed"], 1, "Claude Code's tool result continued the CLI")
        tools = json.dumps([e for e in self.upstream.requests if e["path"].startswith("/v1/messages")][0]["body"]["tools"])
        self.assertIn("mcp__ocp__Read", tools, "Claude Code's own tools reached the model through OCP")


class ClaudeCodeConversationInThePool(RealCliTest):
    """Claude Code's second turn (`claude -p --continue`) sends its whole session again: with the
    warm pool, OCP recognises it and sends only the new message to the CLI that holds the first."""

    env = {"OCP_POOL": "1"}

    def test_a_continued_session_goes_on_in_the_same_cli(self):
        self.addCleanup(self.server.runner.pool.close)
        self.upstream.responder = lambda body: Reply(text="Noted." if "Which word" not in json.dumps(body)
                                                      else "The word was PAPAYA.")  # (runs under the fake's lock)
        work = os.path.join(self.tmp, "project")
        home = os.path.join(self.tmp, "client-home")
        os.makedirs(work)
        os.makedirs(home)
        env = {"HOME": home, "PATH": os.environ["PATH"], "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{self.port}",
               "ANTHROPIC_API_KEY": "ocp-client-key", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
               "DISABLE_AUTOUPDATER": "1"}
        for argv in (["-p", "Remember the word PAPAYA."], ["-p", "--continue", "Which word?"]):
            done = subprocess.run([self.claude, *argv, "--output-format", "text"], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            self.assertIn("PAPAYA" if "--continue" in argv else "Noted.", done.stdout)
        pool = self.server.runner.pool.snapshot()
        self.assertEqual(pool["hits"]["continued"], 1, pool)
        last = self.upstream.messages()[-1]["messages"]
        self.assertEqual(last[-2], {"role": "assistant", "content": [{"type": "text", "text": "Noted."}]},
                         "the first answer is a real turn of the CLI's conversation, not re-sent text")
        self.assertEqual([b["text"] for b in last[-1]["content"]], ["Which word?"], "only the new message was sent")
        self.assertEqual(json.dumps(last).count("Remember the word PAPAYA."), 1)
