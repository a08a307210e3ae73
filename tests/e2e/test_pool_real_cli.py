"""The warm pool with the real claude CLI 2.1.330 against the fake Anthropic API: warm spares,
conversations continued in their CLI, /clear between conversations — and what reaches upstream."""

import json
import time
from unittest import mock

from e2e.base import OpenAIClientTest
from e2e.fake_anthropic import Reply
from helpers import pid_alive, wait_until

IDLE_S = 60


def words(body) -> str:
    """Every text of an upstream request: system and messages."""
    return json.dumps([body.get("system"), body.get("messages")], ensure_ascii=False)


class PoolWithTheRealCli(OpenAIClientTest):
    env = {"OCP_POOL": "1", "OCP_POOL_SPARE_AFTER": "1"}  # a spare after any first use (default: the second)

    def setUp(self):
        super().setUp()
        self.addCleanup(self.server.runner.pool.close)
        self.pool = self.server.runner.pool

    def settled(self):
        wait_until(lambda: not self.pool.snapshot()["starting"], timeout=30)
        return self.pool.snapshot()

    def ask(self, messages):
        text = self.client.chat.completions.create(model="sonnet", messages=messages).choices[0].message.content
        self.settled()
        return text

    def test_continued_warm_and_reset_clis_send_upstream_only_their_own_conversation(self):
        self.upstream.script(Reply(text="Noted: PAPAYA."), Reply(text="It was PAPAYA."), Reply(text="Hi Bo."),
                             Reply(text="Filled."), Reply(text="Hello Cy."))
        first = [{"role": "user", "content": "Remember the code word PAPAYA."}]
        answer = self.ask(first)
        self.assertEqual(answer, "Noted: PAPAYA.")
        self.assertEqual(self.settled()["warm"], 1, "a warm spare after the first use")
        follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Which word?"}]
        self.assertEqual(self.ask(follow), "It was PAPAYA.")
        sent = self.upstream.messages()[-1]["messages"]
        user_texts = [block["text"] for m in sent if m["role"] == "user" for block in
                      (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}])
                      if "text" in block]
        self.assertIn("Remember the code word PAPAYA.", user_texts, "the first turn, as a real turn of its own")
        self.assertIn("Which word?", user_texts)
        self.assertIn({"role": "assistant", "content": [{"type": "text", "text": "Noted: PAPAYA."}]}, sent)
        self.assertNotIn("turn_", words(self.upstream.messages()[-1]), "no history re-sent as marked text")
        self.assertEqual(self.pool.snapshot()["hits"]["continued"], 1)

        self.assertEqual(self.ask([{"role": "user", "content": "I am Bo."}]), "Hi Bo.")
        self.assertEqual(self.pool.snapshot()["hits"]["warm"], 1)
        self.assertNotIn("PAPAYA", words(self.upstream.messages()[-1]), "the warm CLI knew nothing before")

        with mock.patch.object(self.pool, "replenish"):  # no more spares: after "filler" takes the last,
            self.assertEqual(self.ask([{"role": "user", "content": "filler"}]), "Filled.")
            self.assertEqual(self.ask([{"role": "user", "content": "I am Cy."}]), "Hello Cy.")  # a holder is cleared
        self.assertGreaterEqual(self.pool.snapshot()["hits"]["reset"], 1)
        last = words(self.upstream.messages()[-1])
        for other in ("PAPAYA", "Bo.", "filler"):
            self.assertNotIn(other, last, "nothing of an earlier conversation after /clear")
        posts = [r for r in self.upstream.requests if r["method"] == "POST"]
        self.assertEqual(len(posts), len(self.upstream.messages()), "every upstream call is a model call")

    def test_an_idle_pool_makes_no_upstream_request(self):
        self.ask([{"role": "user", "content": "hello"}])
        snapshot = self.settled()
        self.assertEqual((snapshot["warm"], snapshot["conversations"]), (1, 1))
        pids = [s["pid"] for s in self.server.runner.live()]
        before = len(self.upstream.requests)
        time.sleep(IDLE_S)
        self.assertEqual(len(self.upstream.requests), before, "an idle warm CLI called upstream")
        self.assertTrue(all(pid_alive(pid) for pid in pids))
        self.pool.close()
        wait_until(lambda: self.server.runner.live() == [], timeout=15)
        self.assertFalse([pid for pid in pids if pid_alive(pid)])
