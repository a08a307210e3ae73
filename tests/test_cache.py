"""Response cache and singleflight: one CLI run for identical requests, hits free of quota."""

import json
import os
import threading
import unittest

import ocp
from helpers import ServerTest, TempHome, content_of, directive, pid_alive, wait_until

ADMIN = "ocp_admin_key_for_cache_tests_00000"


class CacheKeys(unittest.TestCase):
    MODELS = ocp.Models.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models.json"))

    def key(self, owner="k1", **body):
        body.setdefault("model", "sonnet")
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
        request = ocp.parse_chat_request(body, self.MODELS, ocp.Config())
        return ocp.cache_key(ocp.dataclasses.replace(request, owner=owner))

    def test_same_question_same_key(self):
        self.assertEqual(self.key(), self.key(stream=True, stream_options={"include_usage": True}, user="x"))
        self.assertEqual(self.key(), self.key(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]))
        self.assertEqual(self.key(model="claude-sonnet-5-5"), self.key(model="sonnet"))

    def test_everything_that_changes_the_answer_changes_the_key(self):
        base = self.key()
        for variant in (self.key(owner="k2"), self.key(model="opus"), self.key(stop="x"), self.key(max_tokens=5),
                        self.key(reasoning_effort="high"), self.key(temperature=0.3),
                        self.key(response_format={"type": "json_object"}),
                        self.key(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])):
            self.assertNotEqual(variant, base)

    def test_bypass_rules(self):
        cases = [({"messages": [{"role": "user", "content": [{"type": "text", "text": "x",
                                                              "cache_control": {"type": "ephemeral"}}]}]},
                  "cache_control"),
                 ({"messages": [], "tools": [{"type": "function"}]}, "tools"),
                 ({"messages": [], "session_id": "abc"}, "session"),
                 ({"messages": [], "metadata": {"conversation_id": "c"}}, "session"),
                 ({"messages": [{"role": "user", "content": "x"}]}, "")]
        for body, reason in cases:
            with self.subTest(reason):
                self.assertEqual(ocp.cache_bypass(body), reason)


class CacheStoreBounds(TempHome):
    def setUp(self):
        super().setUp()
        os.makedirs(self.ocp_home)
        self.store = ocp.Store(os.path.join(self.ocp_home, "ocp.db"))
        self.addCleanup(self.store.close)
        self.answer = {"content": "x" * 100, "reasoning": "", "refusal": None, "finish_reason": "stop",
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
                                 "prompt_tokens_details": {"cached_tokens": 0}}}

    def put(self, digest, now, entries=100, size=10 ** 6):
        self.store.cache_put(digest, "o", "m", self.answer, now, 60, entries, size)

    def test_least_recently_used_goes_first(self):
        self.put("a", 1000, entries=2)
        self.put("b", 1001, entries=2)
        self.store.cache_get("a", 1002)  # a is now more recent than b
        self.put("c", 1003, entries=2)
        self.assertIsNotNone(self.store.cache_get("a", 1004))
        self.assertIsNone(self.store.cache_get("b", 1004))
        self.assertEqual(self.store.cache_totals(1004)["entries"], 2)

    def test_bytes_bound(self):
        one = len(json.dumps(self.answer))
        for i, digest in enumerate("abc"):
            self.put(digest, 1000 + i, size=2 * one + 10)
        self.assertEqual(self.store.cache_totals(1010)["entries"], 2)
        self.assertLessEqual(self.store.cache_totals(1010)["bytes"], 2 * one + 10)

    def test_expired_rows_are_not_served_and_are_reaped(self):
        self.put("a", 1000)
        self.assertIsNone(self.store.cache_get("a", 1061))
        self.assertEqual(self.store.cache_totals(1061)["entries"], 0)


class CacheOn(ServerTest):
    env = {"CLAUDE_CACHE_TTL": "60000", "OCP_ADMIN_KEY": ADMIN, "CLAUDE_AUTH_MODE": "multi"}

    def setUp(self):
        super().setUp()
        self.now = 1_800_000_000.0
        self.server.wall = lambda: self.now
        status, _, body = self.request("POST", "/api/keys", {"name": "kid", "daily": 2},
                                       headers={"Authorization": f"Bearer {ADMIN}"})
        self.key = body["key"]

    def ask(self, content, key=None, **params):
        body = dict({"model": "sonnet", "messages": [{"role": "user", "content": content}]}, **params)
        return self.request("POST", "/v1/chat/completions", body,
                            headers={"Authorization": f"Bearer {key or self.key}"})

    def test_a_repeat_comes_from_the_cache_free_of_quota(self):
        status, headers, first = self.ask("cache me")
        self.assertEqual((status, headers["x-ocp-cache"]), (200, "miss"))
        for _ in range(3):
            status, headers, again = self.ask("cache me")
            self.assertEqual((status, headers["x-ocp-cache"]), (200, "hit"))
            self.assertEqual(again["choices"][0]["message"], first["choices"][0]["message"])
            self.assertNotEqual(again["id"], first["id"])
        self.assertEqual(len(self.runs()), 1)
        self.assertEqual(self.ask("something else")[0], 200)
        self.assertEqual(self.ask("a third thing")[0], 429, "two misses spent the daily quota of 2; hits did not")
        rows = self.server.store.usage_rows(None, None, 0, 2 ** 40, 20)
        self.assertEqual(sorted(r["status"] for r in rows), ["cached", "cached", "cached", "ok", "ok", "refused"])

    def test_a_streamed_hit_replays_as_sse(self):
        self.ask("x " + directive(text="a streamed answer that is long enough to be split", thinking="hm"))
        conn = self.connection()
        conn.request("POST", "/v1/chat/completions", json.dumps({"model": "sonnet", "stream": True,
                     "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "x " + directive(
                         text="a streamed answer that is long enough to be split", thinking="hm")}]}),
                     {"Authorization": f"Bearer {self.key}"})
        response = conn.getresponse()
        self.assertEqual(response.headers["x-ocp-cache"], "hit")
        events = [json.loads(line[6:]) for line in response.read().decode().splitlines()
                  if line.startswith("data: {")]
        pieces = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
        self.assertEqual("".join(p or "" for p in pieces), "a streamed answer that is long enough to be split")
        self.assertGreater(len([p for p in pieces if p]), 1)
        self.assertEqual(events[1]["choices"][0]["delta"], {"reasoning_content": "hm"})
        self.assertEqual(events[-1]["usage"]["prompt_tokens"], 4408)
        self.assertEqual(len(self.runs()), 1)

    def test_what_is_never_cached(self):
        cases = [("error", {"content_extra": directive(error="overloaded")}),
                 ("truncated", {"max_tokens": 5, "content_extra": directive(text="z" * 200)}),
                 ("cache_control", {"messages": [{"role": "user", "content": [
                     {"type": "text", "text": "cc", "cache_control": {"type": "ephemeral"}}]}]}),
                 ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]})]
        for name, extra in cases:
            with self.subTest(name):
                runs = len(self.runs())
                content = name + " " + extra.pop("content_extra", "")
                with_admin = ADMIN
                self.ask(content, with_admin, **extra)
                self.ask(content, with_admin, **extra)
                self.assertEqual(len(self.runs()), runs + 2)

    def test_each_caller_has_its_own_entries(self):
        self.ask("same question")
        self.ask("same question", ADMIN)
        self.assertEqual(len(self.runs()), 2)

    def test_entries_expire(self):
        self.ask("short lived")
        self.now += 61
        status, headers, _ = self.ask("short lived")
        self.assertEqual(headers["x-ocp-cache"], "miss")
        self.assertEqual(len(self.runs()), 2)

    def test_stats_and_clear_are_admin_routes(self):
        self.ask("one")
        self.ask("one")
        self.assertEqual(self.request("GET", "/cache/stats", headers={"Authorization": f"Bearer {self.key}"})[0], 403)
        status, _, stats = self.request("GET", "/cache/stats", headers={"Authorization": f"Bearer {ADMIN}"})
        self.assertEqual((status, stats["entries"], stats["hits"], stats["misses"], stats["enabled"]),
                         (200, 1, 1, 1, True))
        status, _, body = self.request("DELETE", "/cache", headers={"Authorization": f"Bearer {ADMIN}"})
        self.assertEqual((status, body["cleared"]), (200, 1))
        self.assertEqual(self.ask("one")[1]["x-ocp-cache"], "miss")


class Singleflight(ServerTest):
    env = {"CLAUDE_CACHE_TTL": "60000"}

    def test_eight_identical_requests_share_one_run(self):
        content = "x " + directive(text="one shared answer for everyone", deltas=6, pace_ms=80)
        results = []
        barrier = threading.Barrier(8)

        def plain():
            barrier.wait()
            results.append(("plain",) + self.chat(content)[::2])

        def streamed():
            barrier.wait()
            status, _, events = self.stream(content)
            results.append(("stream", status, content_of(events)))

        threads = [threading.Thread(target=f) for f in [plain] * 4 + [streamed] * 4]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        answers = [r[2]["choices"][0]["message"]["content"] if r[0] == "plain" else r[2] for r in results]
        self.assertEqual(answers, ["one shared answer for everyone"] * 8)
        self.assertEqual(len(self.runs()), 1)
        self.assertEqual(self.server.flights.snapshot()["shared"], 7)
        status, headers, _ = self.chat(content)
        self.assertEqual((status, headers["x-ocp-cache"]), (200, "hit"))
        self.assertEqual(len(self.runs()), 1)

    def test_the_run_goes_on_when_the_leader_leaves_but_others_wait(self):
        content = "x " + directive(text="slow shared answer " * 3, deltas=10, pace_ms=100)
        leader = self.open_raw({"model": "sonnet", "stream": True, "messages": [{"role": "user", "content": content}]})
        wait_until(lambda: self.runs())
        follower = []
        thread = threading.Thread(target=lambda: follower.append(self.chat(content)))
        thread.start()
        wait_until(lambda: self.server.flights.snapshot()["shared"] == 1)
        received = b""
        while b'"content": "slow' not in received:  # part of the answer reached the leader
            received += leader.recv(4096)
        leader.close()
        thread.join(30)
        status, headers, body = follower[0]
        self.assertEqual((status, headers["x-ocp-cache"]), (200, "shared"))
        self.assertEqual(body["choices"][0]["message"]["content"], "slow shared answer " * 3)
        self.assertEqual(self.runs()[0]["ended"], "exit 0", "the CLI was not killed")
        statuses = lambda: sorted(r["status"] for r in self.server.store.usage_rows(None, None, 0, 2 ** 40, 10))
        wait_until(lambda: "pending" not in statuses())
        self.assertEqual(statuses(), ["ok", "partial"], "the leader got part of its answer: it counts")

    def test_a_lone_leader_that_leaves_still_kills_the_run(self):
        sock = self.open_raw({"model": "sonnet", "messages": [{"role": "user", "content": "x " + directive(hang=True)}]})
        run = wait_until(lambda: self.runs() and self.runs()[0].get("stdin_blocks") and self.runs()[0])
        sock.close()
        wait_until(lambda: not pid_alive(run["pid"]), timeout=10)

    def test_when_the_leader_and_every_follower_leave_the_run_ends(self):
        for stream in (True, False):
            with self.subTest(stream=stream):
                body = {"model": "sonnet", "stream": stream, "messages": [
                    {"role": "user", "content": f"x {stream} " + directive(hang=True)}]}
                before = len(self.runs())
                leader = self.open_raw(body)
                run = wait_until(lambda: len(self.runs()) > before and self.runs()[-1])
                followers = [self.open_raw(body) for _ in range(2)]
                wait_until(lambda: self.server.flights.snapshot()["shared"] >= 2 * (1 + (not stream)))
                for sock in [leader] + followers:
                    sock.close()
                wait_until(lambda: not pid_alive(run["pid"]), timeout=10)

    def test_followers_get_the_leaders_error(self):
        content = "x " + directive(error="overloaded", slow_start_ms=300)
        results = []
        threads = [threading.Thread(target=lambda: results.append(self.chat(content)[0])) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(results, [502, 502, 502])
        self.assertEqual(len(self.runs()), 1)


if __name__ == "__main__":
    unittest.main()
