"""OCP → the real claude CLI 2.1.330 → a fake Anthropic API: what the client got and what reached upstream."""

import base64
import time
import unittest

from helpers import content_of, pid_alive, wait_until
from e2e.base import PNG, RealCliTest
from e2e.fake_anthropic import Reply, unified_headers


def upstream_text(body) -> str:
    """All text the model was sent in one /v1/messages body (system and messages)."""
    texts = [b.get("text", "") for b in body.get("system") or [] if isinstance(b, dict)]
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
        else:
            texts += [b.get("text", "") for b in content if isinstance(b, dict)]
    return "\n".join(texts)


class Answers(RealCliTest):
    def test_plain_answer(self):
        self.upstream.script(Reply(text="Plain answer from upstream."))
        status, headers, body = self.chat("hello", model="sonnet")
        self.assertEqual(status, 200)
        self.assertEqual(body["choices"][0]["message"]["content"], "Plain answer from upstream.")
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")
        self.assertEqual(body["model"], "claude-sonnet-5-5")
        [sent] = self.upstream.messages()
        self.assertEqual(sent["model"], "claude-sonnet-5-5")
        self.assertIn("hello", upstream_text(sent))
        request = [r for r in self.upstream.requests if r["path"].startswith("/v1/messages")][0]
        headers = {k.lower(): v for k, v in request["headers"].items()}
        self.assertEqual(headers["authorization"], "Bearer sk-ant-oat01-fake-e2e-token")
        self.assertNotIn("x-api-key", headers, "subscription mode, never API billing")

    def test_streaming_arrives_incrementally(self):
        self.upstream.script(Reply(text="one two three four five six", deltas=6, pace_s=0.3))
        status, _, events = self.stream("count")
        self.assertEqual(status, 200)
        times = [t for t, e in events if isinstance(e, dict) and e["choices"]
                 and e["choices"][0]["delta"].get("content")]
        self.assertGreaterEqual(len(times), 4, "content came in several chunks")
        self.assertGreater(times[-1] - times[0], 1.0, "the first chunk reached the client long before the last")
        self.assertEqual(content_of(events), "one two three four five six")

    def test_usage_equals_the_upstream_counts(self):
        self.upstream.script(Reply(text="counted", input_tokens=1234, output_tokens=56, cache_read=1000,
                                   cache_creation=100))
        _, _, body = self.chat("count tokens")
        self.assertEqual(body["usage"], {"prompt_tokens": 2334, "completion_tokens": 56, "total_tokens": 2390,
                                         "prompt_tokens_details": {"cached_tokens": 1000}})
        _, _, events = self.stream("count tokens", stream_options={"include_usage": True})
        self.assertEqual(events[-2][1]["usage"]["prompt_tokens"], 2334)

    def test_thinking_becomes_reasoning_content(self):
        self.upstream.script(Reply(thinking="First I consider the question.", text="The answer."))
        body = self.chat("think")[2]
        message = body["choices"][0]["message"]
        self.assertEqual(message["reasoning_content"], "First I consider the question.")
        self.assertEqual(message["content"], "The answer.")
        _, _, events = self.stream("think")
        reasoning = "".join(e["choices"][0]["delta"].get("reasoning_content") or "" for _, e in events
                            if isinstance(e, dict) and e["choices"])
        self.assertEqual(reasoning, "First I consider the question.")

    def test_system_prompt_and_image_reach_the_model(self):
        self.chat(messages=[{"role": "system", "content": "You answer like a lighthouse keeper."},
                            {"role": "user", "content": [
                                {"type": "text", "text": "what is in this image?"},
                                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]}])
        [sent] = self.upstream.messages()
        system = " ".join(b["text"] for b in sent["system"])
        self.assertIn("You answer like a lighthouse keeper.", system)
        blocks = [b for m in sent["messages"] if isinstance(m["content"], list) for b in m["content"]]
        images = [b for b in blocks if b.get("type") == "image"]
        self.assertEqual(len(images), 1)
        self.assertEqual(base64.b64decode(images[0]["source"]["data"]), base64.b64decode(PNG))

    def test_no_tools_are_sent_upstream(self):
        self.chat("use a tool if you can")
        [sent] = self.upstream.messages()
        self.assertEqual(sent.get("tools") or [], [])

    def test_a_200kb_prompt(self):
        prompt = "lorem ipsum " * 17000 + "THE END"
        self.assertGreater(len(prompt), 200_000)
        status, _, _ = self.chat(prompt)
        self.assertEqual(status, 200)
        self.assertIn(prompt, upstream_text(self.upstream.messages()[0]))

    def test_max_tokens_gives_finish_reason_length(self):
        self.upstream.script(Reply(text="a long answer " * 20))
        status, _, body = self.chat("write a lot", max_tokens=5)
        self.assertEqual(status, 200)
        self.assertEqual(body["choices"][0]["finish_reason"], "length")
        self.assertEqual(body["choices"][0]["message"]["content"], ("a long answer " * 20)[:20])
        sent = self.upstream.messages()
        self.assertEqual(sent[0]["max_tokens"], 5)
        self.assertLess(len(sent), 4, "OCP ended the turn instead of letting the CLI continue")

    def test_multi_turn_history_reaches_the_model_as_framed_turns(self):
        self.chat(messages=[{"role": "user", "content": "my name is Ada"},
                            {"role": "assistant", "content": "Hello Ada."},
                            {"role": "user", "content": "what is my name?"}])
        text = upstream_text(self.upstream.messages()[0])
        self.assertIn("my name is Ada", text)
        self.assertIn('role="assistant">\nHello Ada.', text)


class UpstreamFailures(RealCliTest):
    def test_plan_limit_is_429_to_the_reset_then_answered_locally(self):
        reset = int(time.time()) + 7200
        self.upstream.script(Reply(status=429, error_type="rate_limit_error", error_message="limit reached",
                                   unified=unified_headers(status="rejected", claim="five_hour", reset=reset,
                                                           five_hour=1.0)))
        status, headers, body = self.chat("hello")
        self.assertEqual((status, body["error"]["code"]), (429, "usage_limit_reached"))
        self.assertAlmostEqual(int(headers["Retry-After"]), reset - time.time(), delta=30)
        self.assertEqual(headers["x-should-retry"], "false")
        calls = len(self.upstream.messages())
        status, headers, body = self.chat("and again")
        self.assertEqual((status, body["error"]["code"]), (429, "usage_limit_reached"))
        self.assertEqual(len(self.upstream.messages()), calls, "answered locally, no CLI run reached upstream")
        self.assertIn("without calling Claude", body["error"]["message"])

    def test_transient_upstream_errors(self):
        cases = [(429, "rate_limit_error", 429, "upstream_rate_limited"),
                 (529, "overloaded_error", 502, "overloaded"),
                 (500, "api_error", 502, "server_error")]
        for upstream_status, kind, status, code in cases:
            with self.subTest(upstream_status):
                self.upstream.script(Reply(status=upstream_status, error_type=kind, error_message="try later",
                                           headers={"retry-after": "0"}))
                got, headers, body = self.chat("hello")
                self.assertEqual((got, body["error"]["code"]), (status, code))
                if status == 429:
                    self.assertIn("Retry-After", headers)
                self.assertNotIn("127.0.0.1", body["error"]["message"].replace("<path>", ""))

    def test_401_is_503_naming_setup_token(self):
        self.upstream.script(Reply(status=401, error_type="authentication_error",
                                   error_message="OAuth token has expired."))
        status, _, body = self.chat("hello")
        self.assertEqual((status, body["error"]["type"]), (503, "upstream_auth_error"))
        self.assertIn("claude setup-token", body["error"]["message"])

    def test_a_dropped_connection_mid_stream_gives_the_text_once(self):
        text = "This answer is cut off by a dropped connection."
        self.upstream.script(Reply(text=text, deltas=6, drop_after=3), Reply(text=text))
        status, _, events = self.stream("hello")
        self.assertEqual(status, 200)
        self.assertEqual(content_of(events), text)
        self.assertGreaterEqual(len(self.upstream.messages()), 2, "the CLI retried upstream")
        body = self.chat("hello")[2]
        self.assertEqual(body["choices"][0]["message"]["content"], text)

    def test_a_client_disconnect_ends_the_cli_process(self):
        self.upstream.script(Reply(text="slow " * 40, deltas=40, pace_s=0.25))
        sock = self.open_raw({"model": "sonnet", "stream": True,
                              "messages": [{"role": "user", "content": "talk slowly"}]})
        received = b""
        while b'"content": "slow' not in received:
            received += sock.recv(4096)
        [pid] = self.live_cli_pids()
        sock.close()
        wait_until(lambda: not pid_alive(pid), timeout=10)
        wait_until(lambda: self.server.runner.live() == [], timeout=10)


if __name__ == "__main__":
    unittest.main()
