"""The openai Python SDK drives OCP, which drives the real claude CLI against the fake upstream."""

import base64
import unittest

from e2e.base import PNG, OpenAIClientTest
from e2e.fake_anthropic import Reply

try:
    import openai
    import pydantic
except ImportError:  # checked in setUpClass: skip on a bare machine, fail under OCP_E2E=1
    openai = pydantic = None


class OpenAIClient(OpenAIClientTest):
    def test_create(self):
        self.upstream.script(Reply(text="Hi from the SDK path."))
        completion = self.client.chat.completions.create(
            model="sonnet", messages=[{"role": "user", "content": "hello"}])
        self.assertEqual(completion.choices[0].message.content, "Hi from the SDK path.")
        self.assertEqual(completion.choices[0].finish_reason, "stop")
        self.assertEqual(completion.model, "claude-sonnet-5-5")
        self.assertEqual(completion.usage.prompt_tokens, 321)

    def test_stream_with_usage(self):
        self.upstream.script(Reply(text="streamed through the SDK", deltas=4, pace_s=0.05))
        stream = self.client.chat.completions.create(
            model="opus", messages=[{"role": "user", "content": "stream"}], stream=True,
            stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, "streamed through the SDK")
        self.assertGreaterEqual(sum(1 for c in chunks if c.choices and c.choices[0].delta.content), 3)
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.prompt_tokens, 321)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        self.assertEqual(finishes, ["stop"])

    def test_parse_with_a_json_schema(self):
        class Person(pydantic.BaseModel):
            name: str
            age: int

        self.upstream.script(Reply(text='{"name": "Ada", "age": 36}'))
        completion = self.client.chat.completions.parse(
            model="sonnet", messages=[{"role": "user", "content": "who wrote the first program?"}],
            response_format=Person)
        person = completion.choices[0].message.parsed
        self.assertEqual((person.name, person.age), ("Ada", 36))
        system = " ".join(b["text"] for b in self.upstream.messages()[0]["system"])
        self.assertIn('"age"', system, "the schema reached the model")

    def test_an_image_part(self):
        self.client.chat.completions.create(model="haiku", messages=[{"role": "user", "content": [
            {"type": "text", "text": "describe"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]}])
        blocks = [b for m in self.upstream.messages()[0]["messages"] if isinstance(m["content"], list)
                  for b in m["content"]]
        [image] = [b for b in blocks if b.get("type") == "image"]
        self.assertEqual(base64.b64decode(image["source"]["data"]), base64.b64decode(PNG))

    def test_models(self):
        ids = [m.id for m in self.client.models.list()]
        self.assertIn("claude-opus-5-5", ids)
        self.assertEqual(self.client.models.retrieve("sonnet").id, "claude-sonnet-5-5")
        with self.assertRaises(openai.NotFoundError):
            self.client.models.retrieve("gpt-5")

    def test_errors_surface_as_sdk_exceptions(self):
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.chat.completions.create(model="sonnet", n=3, messages=[{"role": "user", "content": "x"}])
        self.assertEqual(caught.exception.code, "unsupported_parameter")


if __name__ == "__main__":
    unittest.main()
