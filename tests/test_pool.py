"""The warm pool: idle CLIs kept per spawn configuration and key, reset with /clear, and
conversations that go on in the CLI that holds them (only the new turns are sent)."""

import json
import re
import threading
import time
import unittest
from unittest import mock

import ocp
from helpers import ServerTest, directive, pid_alive, wait_until

ADMIN = "ocp_admin_" + "a" * 32
RECALL = directive(recall=True)


def said(body) -> str:
    return body["choices"][0]["message"]["content"]


class PoolTest(ServerTest):
    env = {"OCP_POOL": "1", "OCP_ADMIN_KEY": ADMIN, "OCP_POOL_SPARE_AFTER": "1"}  # a spare after any use (the
    # default waits for a configuration's second use: SparesForShapesThatRecur)

    def setUp(self):
        super().setUp()
        self.pool = self.server.runner.pool

    def snapshot(self):
        return self.pool.snapshot()

    def admin(self, method, path, body=None):
        return self.request(method, path, body, headers={"Authorization": f"Bearer {ADMIN}"})

    def settled(self, warm=None, conversations=None):
        """Wait until no warm CLI is starting and the pool holds what is expected."""
        def done():
            s = self.snapshot()
            return (not s["starting"] and (warm is None or s["warm"] == warm)
                    and (conversations is None or s["conversations"] == conversations))
        wait_until(done)
        return self.snapshot()

    def converse(self, *texts, **params):
        """A conversation of user `texts`, each sent with the history so far; return the answers."""
        messages, answers = [], []
        for text in texts:
            messages.append({"role": "user", "content": text})
            status, _, body = self.chat(messages=list(messages), **params)
            self.assertEqual(status, 200, body)
            answers.append(said(body))
            messages.append({"role": "assistant", "content": said(body)})
            self.settled()
        return answers

    def run_of(self, pid):
        return [r for r in self.runs() if r["pid"] == pid][0]


class WarmClis(PoolTest):
    def test_a_repeated_request_shape_gets_a_warm_cli_cleared_before_use(self):
        status, _, body = self.chat("first conversation")
        self.assertEqual((status, said(body)), (200, "Echo: first conversation"))
        self.assertEqual(self.settled(warm=1, conversations=1)["misses"], 1)
        self.assertEqual(len(self.runs()), 2, "the request's CLI, and one spawned after its use")
        spare = self.runs()[1]["pid"]
        status, _, body = self.chat("second conversation " + RECALL)
        self.assertEqual(said(body), "Recall: second conversation", "a new conversation: nothing before it")
        self.assertEqual(self.snapshot()["hits"]["warm"], 1)
        used = [r for r in self.runs() if any("second" in b.get("text", "") for b in r.get("stdin_blocks", []))]
        self.assertEqual(len(used), 1)
        self.assertEqual(used[0]["clears"], 1, "warmed with /clear before it was lent")
        self.assertEqual([b["text"] for b in used[0]["stdin_blocks"]], ["/clear", "second conversation " + RECALL])
        self.assertEqual(used[0]["pid"], spare)
        self.settled()
        self.assertEqual(self.server.runner.slots.snapshot()["running"], 0, "a pooled CLI holds no slot")

    def test_a_new_conversation_resets_a_cli_that_held_another(self):
        with mock.patch.object(self.pool, "replenish"):  # no warm spare: the holder is all there is
            self.converse("the password is swordfish")
            status, _, body = self.chat("who am I? " + RECALL)
        self.assertEqual(said(body), "Recall: who am I?")
        self.assertEqual(len(self.runs()), 1, "one CLI served both conversations")
        self.assertEqual(self.snapshot()["hits"]["reset"], 1)
        self.assertEqual(self.runs()[0]["clears"], 1)

    def test_pool_off_starts_a_cli_for_every_request_and_keeps_none(self):
        self.server.config = self.server.runner.config = ocp.dataclasses.replace(self.server.config, pool=False)
        self.chat("one")
        self.chat("two")
        wait_until(lambda: self.server.runner.live() == [])
        self.assertEqual(len(self.runs()), 2)
        self.assertEqual(self.snapshot()["warm"] + self.snapshot()["conversations"], 0)
        runner = self.server.runner
        self.assertEqual(runner.leases_made, runner.leases_ended)

    def test_a_pooled_cli_that_died_is_replaced_and_the_request_answered(self):
        with mock.patch.object(self.pool, "replenish"):
            self.chat("first")
            (held,) = self.server.runner.live()
            ocp.os.kill(held["pid"], 9)
            wait_until(lambda: not pid_alive(held["pid"]))
            status, _, body = self.chat("second")
        self.assertEqual((status, said(body)), (200, "Echo: second"))
        self.assertEqual(len(self.runs()), 2)

    def test_a_cli_grown_too_big_is_not_kept(self):
        with mock.patch.object(self.pool, "replenish"):
            self.converse("one")
            with mock.patch.object(ocp, "POOL_MAX_CLI_MB", 1.0):  # (the fake CLI: ~12 MiB)
                self.converse("two")
            wait_until(lambda: self.server.runner.live() == [])
            self.converse("three")
        self.assertEqual(len(self.runs()), 2)
        self.assertEqual(self.runs()[0]["ended"], "exit 0", "released: stdin closed, it exited by itself")

    def test_sessions_metrics_and_health_show_the_pool(self):
        self.chat("hello")
        self.settled(warm=1, conversations=1)
        status, _, body = self.admin("GET", "/sessions")
        self.assertEqual(sorted(s["state"] for s in body["data"]), ["conversation", "warm"])
        _, _, text = self.admin("GET", "/metrics")
        for line in ('ocp_pool_processes{state="warm"} 1', 'ocp_pool_processes{state="conversation"} 1',
                     "ocp_pool_misses_total 1", 'ocp_pool_hits_total{kind="continued"} 0', "ocp_pool_spawns_total 1"):
            self.assertIn(line, text)
        rss = [line for line in text.splitlines() if line.startswith("ocp_pool_rss_bytes ")]
        self.assertGreater(float(rss[0].split()[1]), 1 << 20)
        _, _, health = self.admin("GET", "/health")
        self.assertEqual(health["detail"]["pool"]["warm"], 1)
        status, _, body = self.admin("DELETE", "/sessions")
        self.assertEqual(body["pooled"], 2)
        wait_until(lambda: self.server.runner.live() == [])


class Conversations(PoolTest):
    def test_a_follow_up_sends_only_its_new_turn_to_the_cli_holding_the_conversation(self):
        answers = self.converse("my name is Ada", "and I like tea", "what do you know? " + RECALL)
        self.assertEqual(answers[-1], "Recall: my name is Ada | and I like tea | what do you know?")
        (run,) = [r for r in self.runs() if r.get("stdin_blocks") and "Ada" in r["stdin_blocks"][0]["text"]]
        self.assertEqual([b["text"] for b in run["stdin_blocks"]],
                         ["my name is Ada", "and I like tea", "what do you know? " + RECALL],
                         "no history re-sent, no turn markers")
        self.assertEqual(self.snapshot()["hits"]["continued"], 2)

    def test_an_edited_history_is_not_continued_and_goes_as_text(self):
        self.converse("my name is Ada")
        messages = [{"role": "user", "content": "my name is Ada"},
                    {"role": "assistant", "content": "Your name is Grace."},  # not what was answered
                    {"role": "user", "content": "who? " + RECALL}]
        status, _, body = self.chat(messages=messages)
        self.assertEqual(status, 200)
        self.assertIn("Your name is Grace.", said(body), "the whole history, as the client sent it")
        self.assertIn('role="assistant"', said(body))
        self.assertEqual(self.snapshot()["hits"]["continued"], 0)
        self.assertEqual(self.snapshot()["conversations"], 2, "the original conversation's CLI is still there")

    def test_another_model_system_or_tool_set_is_not_continued(self):
        self.converse("hello")
        base = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Echo: hello"},
                {"role": "user", "content": "again " + RECALL}]
        for change in ({"model": "opus"}, {"messages": [{"role": "system", "content": "Be brief."}] + base},
                       {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}):
            status, _, body = self.chat(messages=change.pop("messages", base), **change)
            self.assertEqual(status, 200, body)
            self.assertIn('role="assistant"', said(body), f"{change}: the history went as text")
            self.settled()
        self.assertEqual(self.snapshot()["hits"]["continued"], 0)

    def test_a_continued_turn_is_billed_for_itself_not_the_cli_total(self):
        self.converse("one", "two", "three")
        rows = self.server.store.usage_rows(None, None, 0, 2 ** 40, 10)
        self.assertEqual([round(r["cost_usd"], 6) for r in rows], [0.017952] * 3)

    def test_a_client_that_leaves_mid_answer_ends_the_cli_and_the_next_follow_up_has_everything(self):
        with mock.patch.object(self.pool, "replenish"):
            self.converse("my name is Ada")
            (held,) = self.server.runner.live()
            messages = [{"role": "user", "content": "my name is Ada"},
                        {"role": "assistant", "content": "Echo: my name is Ada"},
                        {"role": "user", "content": "slowly " + directive(text="x" * 40, deltas=40, pace_ms=50)}]
            sock = self.open_raw({"model": "sonnet", "stream": True, "messages": messages})
            wait_until(lambda: any("slowly" in b.get("text", "") for b in self.run_of(held["pid"])["stdin_blocks"]))
            sock.close()
            wait_until(lambda: not pid_alive(held["pid"]))
            status, _, body = self.chat(messages=messages[:2] + [{"role": "user", "content": "who? " + RECALL}])
        self.assertEqual(status, 200)
        self.assertIn("my name is Ada", said(body))
        self.assertIn('role="assistant"', said(body), "its CLI was gone: the history went as text")

    def test_after_the_owner_s_login_changed_a_conversation_goes_on_in_a_new_cli(self):
        def login(token):
            ocp.os.makedirs(ocp.os.path.join(self.home, ".claude"), exist_ok=True)
            with open(ocp.os.path.join(self.home, ".claude", ".credentials.json"), "w") as f:
                json.dump({"claudeAiOauth": {"accessToken": token, "expiresAt": (time.time() + 86400) * 1000}}, f)
        login("sk-ant-oat01-first")
        self.converse("my name is Ada")
        login("sk-ant-oat01-refreshed")  # the owner's CLI refreshed it: the held CLI still has the old one
        status, _, body = self.chat(messages=[{"role": "user", "content": "my name is Ada"},
                                              {"role": "assistant", "content": "Echo: my name is Ada"},
                                              {"role": "user", "content": "who? " + RECALL}])
        self.assertEqual(status, 200)
        self.assertIn('role="assistant"', said(body), "a new CLI, on the new login, with the history as text")
        self.assertEqual(self.snapshot()["hits"]["continued"], 0)

    def test_the_anthropic_and_responses_routes_continue_too(self):
        headers = {"x-api-key": "any", "anthropic-version": "2023-06-01"}
        first = {"model": "sonnet", "max_tokens": 100, "messages": [{"role": "user", "content": "I am Ada"}]}
        status, _, body = self.request("POST", "/v1/messages", first, headers)
        self.assertEqual(status, 200, body)
        self.settled()
        follow = dict(first, messages=first["messages"] + [
            {"role": "assistant", "content": body["content"]},
            {"role": "user", "content": [{"type": "text", "text": "who? " + RECALL}]}])
        status, _, body = self.request("POST", "/v1/messages", follow, headers)
        self.assertEqual(body["content"][0]["text"], "Recall: I am Ada | who?")
        self.settled()
        status, _, body = self.request("POST", "/v1/responses", {"model": "sonnet", "input": "I am Bo"})
        self.assertEqual(status, 200, body)
        self.settled()
        status, _, body = self.request("POST", "/v1/responses", {"model": "sonnet", "input": [
            {"role": "user", "content": "I am Bo"}, body["output"][0],
            {"role": "user", "content": "who? " + RECALL}]})
        self.assertEqual(body["output"][0]["content"][0]["text"], "Recall: I am Bo | who?")
        self.assertEqual(self.snapshot()["hits"]["continued"], 2)


class KeyedPool(PoolTest):
    """(no tests) Keys in multi mode, every pooled CLI measured at 100 MiB."""

    env = {"OCP_POOL": "1", "CLAUDE_AUTH_MODE": "multi", "OCP_ADMIN_KEY": ADMIN, "OCP_POOL_MAX_MB": "450",
           "OCP_POOL_SPARE_AFTER": "1"}

    def setUp(self):
        patcher = mock.patch.object(ocp, "rss_mb", return_value=100.0)  # four pooled CLIs fit in 450 MiB
        patcher.start()
        self.addCleanup(patcher.stop)
        super().setUp()

    def key(self, name):
        status, _, body = self.request("POST", "/api/keys", {"name": name},
                                       headers={"Authorization": f"Bearer {ADMIN}"})
        self.assertEqual(status, 201, body)
        return body["key"]

    def ask(self, secret, messages, model="sonnet"):
        status, _, body = self.request("POST", "/v1/chat/completions", {"model": model, "messages": messages},
                                       headers={"Authorization": f"Bearer {secret}"})
        self.assertEqual(status, 200, body)
        self.settled()
        return said(body)


class Keys(KeyedPool):
    def test_two_keys_and_two_conversations_interleaved_never_see_each_other(self):
        keys = {"alice": self.key("alice"), "bob": self.key("bob")}
        talks = {(who, n): [] for who in keys for n in (1, 2)}
        secrets_ = {who_n: f"secret-{who_n[0]}-{who_n[1]}" for who_n in talks}
        for step in range(3):  # every conversation, in turn, three times
            for (who, n), messages in talks.items():
                text = f"{secrets_[(who, n)]} step {step} " + RECALL
                messages.append({"role": "user", "content": text})
                answer = self.ask(keys[who], messages)
                messages.append({"role": "assistant", "content": answer})
                for other, mark in secrets_.items():
                    if other != (who, n):
                        self.assertNotIn(mark, answer, f"{other}'s words reached {(who, n)}")
                for earlier in range(step + 1):  # continued or sent again as text, it is all there
                    self.assertIn(f"{secrets_[(who, n)]} step {earlier}", answer)
        for who, secret in keys.items():  # new conversations: they get spares or /clear-ed holders
            for n in range(3):
                answer = self.ask(secret, [{"role": "user", "content": f"fresh {who} {n} " + RECALL}])
                self.assertEqual(answer, f"Recall: fresh {who} {n}")
        hits = self.snapshot()["hits"]
        self.assertGreater(hits["continued"], 0, hits)
        self.assertGreater(hits["reset"], 0, hits)
        self.assertGreater(hits["warm"], 0, hits)
        for record in self.runs():
            owners = {name for name in keys if any(f"secret-{name}" in b.get("text", "")
                                                   for b in record.get("stdin_blocks", []))}
            self.assertLessEqual(len(owners), 1, f"one CLI served {owners}")

    def test_the_budget_ends_the_least_recently_used(self):
        secret = self.key("alice")
        self.server.runner.config = ocp.dataclasses.replace(self.server.config, pool_max_mb=250)  # two CLIs
        with mock.patch.object(self.pool, "replenish"):
            for model in ("sonnet", "opus", "haiku"):  # three spawn configurations: none can take another's CLI
                self.ask(secret, [{"role": "user", "content": f"conversation {model}"}], model)
        self.assertEqual((self.snapshot()["conversations"], self.snapshot()["evictions"]["budget"]), (2, 1))
        first = self.runs()[0]
        wait_until(lambda: not pid_alive(first["pid"]))
        answer = self.ask(secret, [{"role": "user", "content": "conversation sonnet"},
                                   {"role": "assistant", "content": "Echo: conversation sonnet"},
                                   {"role": "user", "content": "and? " + RECALL}])
        self.assertIn('role="assistant"', answer, "its CLI was evicted: the history went as text")


class FairShares(KeyedPool):
    """The pool's budget is shared: a member's flood of varied system prompts ends its own CLIs,
    not the owner's kept conversation; a low key's CLI never pushes out a high key's."""

    def test_a_members_flood_leaves_the_owners_conversation_in_its_cli(self):
        ben = self.key("ben")
        mine = [{"role": "user", "content": "my name is Ada"}]
        mine.append({"role": "assistant", "content": self.ask(ADMIN, mine)})
        with mock.patch.object(self.pool, "replenish"):
            for number in range(8):
                self.ask(ben, [{"role": "system", "content": f"You are helper {number}."},
                               {"role": "user", "content": "hi"}])
        self.assertLessEqual(self.snapshot()["conversations"], 4)
        mine.append({"role": "user", "content": "who? " + RECALL})
        self.assertEqual(self.ask(ADMIN, mine), "Recall: my name is Ada | who?", "continued in its own CLI")

    def test_a_members_cli_does_not_push_out_the_owners(self):
        self.server.runner.config = ocp.dataclasses.replace(self.server.config, pool_max_mb=150)  # one CLI
        member = self.key("member")  # normal priority; the owner is high
        with mock.patch.object(self.pool, "replenish"):
            self.ask(ADMIN, [{"role": "user", "content": "owner's"}])
            self.ask(member, [{"role": "user", "content": "member's"}])
        (kept,) = [w for w in self.pool._entries]
        self.assertEqual(kept.lease.job.priority, "high")


class SessionsList(PoolTest):
    def test_pooled_clis_are_listed_as_warm_or_conversation_never_parked(self):
        self.chat("hello")
        self.settled(warm=1, conversations=1)
        status, _, body = self.admin("GET", "/sessions")
        self.assertEqual(status, 200)
        self.assertEqual(sorted((s["state"], s["parked"]) for s in body["data"]),
                         [("conversation", False), ("warm", False)])


class SparesForShapesThatRecur(PoolTest):
    """A warm spare is kept only for a configuration a key begins conversations with again
    (OCP_POOL_SPARE_AFTER, default 2): agents name their project in the system prompt."""

    env = {"OCP_POOL": "1", "OCP_ADMIN_KEY": ADMIN}

    def session(self, directory):
        """An agent's session: a title call never continued, and a main conversation of four turns."""
        system = f"You are a coding agent working in {directory}."
        title = [{"role": "system", "content": system + " Reply with a title."}, {"role": "user", "content": "fix it"}]
        self.assertEqual(self.chat(messages=title)[0], 200)
        self.settled()
        self.converse("step 0", "step 1", "step 2", "step 3", system_first=system)

    def converse(self, *texts, system_first=""):
        messages = [{"role": "system", "content": system_first}]
        for text in texts:
            messages.append({"role": "user", "content": text})
            status, _, body = self.chat(messages=list(messages))
            self.assertEqual(status, 200, body)
            messages.append({"role": "assistant", "content": said(body)})
            self.settled()

    def spares(self):
        text = self.admin("GET", "/metrics")[2]
        return {outcome: float(re.search(r'ocp_pool_spares_total\{outcome="%s"\} ([0-9.]+)' % outcome, text).group(1))
                for outcome in ("used", "unused")}

    def test_sessions_in_three_directories_start_no_spare(self):
        for directory in ("/src/a", "/src/b", "/src/c"):
            self.session(directory)
        pool = self.settled()
        self.assertEqual((pool["warm"], pool["spawned"], pool["hits"]["continued"]), (0, 0, 9))
        self.assertEqual(self.spares(), {"used": 0, "unused": 0})

    def test_a_project_that_comes_back_gets_its_spares_and_uses_them(self):
        self.session("/src/a")
        self.assertEqual(self.settled()["spawned"], 0)
        self.session("/src/a")  # its title and main configurations each begin a second conversation
        self.assertEqual(self.settled(warm=2)["spawned"], 2)
        self.session("/src/a")
        pool = self.settled()
        self.assertEqual((pool["hits"]["warm"], self.spares()["used"]), (2, 2))


class IdleTtl(PoolTest):
    env = {"OCP_POOL": "1", "OCP_POOL_IDLE_TTL": "300", "OCP_POOL_SPARE_AFTER": "1"}

    def test_idle_clis_end_after_the_ttl(self):
        self.chat("hello")
        wait_until(lambda: self.snapshot()["spawned"] == 1)  # the request's CLI is kept, a spare joins it
        wait_until(lambda: self.server.runner.live() == [], timeout=5)
        self.assertFalse([r["pid"] for r in self.runs() if pid_alive(r["pid"])])
        self.assertEqual(self.snapshot()["evictions"]["idle"], 2)


class PoolTools(PoolTest):
    WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}

    def test_a_warm_tool_cli_calls_tools_and_its_conversation_goes_on(self):
        tools = [self.WEATHER]
        self.chat("no tools needed", tools=tools)
        self.settled(warm=1)
        messages = [{"role": "user", "content": "weather? " + directive(
            calls=[[{"name": "get_weather", "arguments": {"city": "Oslo"}}]])}]
        status, _, body = self.chat(messages=messages, tools=tools)
        self.assertEqual(self.snapshot()["hits"]["warm"], 1)
        (call,) = body["choices"][0]["message"]["tool_calls"]
        messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": "rain"}]
        status, _, body = self.chat(messages=messages, tools=tools)
        self.assertEqual(said(body), "Done: rain")
        self.settled()
        messages += [{"role": "assistant", "content": "Done: rain"}, {"role": "user", "content": "thanks " + RECALL}]
        status, _, body = self.chat(messages=messages, tools=tools)
        self.assertTrue(said(body).startswith("Recall: weather?"), said(body))
        self.assertEqual(self.snapshot()["hits"]["continued"], 1)
        self.assertEqual(len(self.runs()), 3, "first request, warm spare (which did the rest), next spare")


class PoolUnits(unittest.TestCase):
    def test_the_default_budget_keeps_one_cli_on_a_pi_and_several_on_a_mac_mini(self):
        per_cli = ocp.POOL_RSS_GUESS_MB
        self.assertEqual([int(ocp.default_pool_mb(gb * 1024) // per_cli) for gb in (1, 4, 16)], [1, 2, 11])

    def test_followups(self):
        models = ocp.Models.load(ocp.os.path.join(ocp.HERE, "models.json"))
        config = ocp.Config()

        def parse(messages, **extra):
            return ocp.parse_chat_request(dict({"model": "sonnet", "messages": messages}, **extra), models, config)
        first = parse([{"role": "user", "content": "hi"}])
        tag = ocp.conversation_tag(first, ocp.history_digests(first.turns, 0)[1], " Echo: hi\n")
        follow = parse([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Echo: hi"},
                        {"role": "user", "content": "more"}, {"role": "user", "content": "and more"}])
        found = ocp.conversation_followup(follow)
        self.assertEqual(found.conversation, tag)
        self.assertEqual([t["content"][0]["text"] for t in found.new], ["more", "and more"])
        self.assertIsNone(ocp.conversation_followup(first))
        answered = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Echo: hi"}]
        self.assertIsNone(ocp.conversation_followup(parse(answered)), "no new turn: nothing to continue")
        self.assertNotEqual(ocp.conversation_followup(dataclasses_replace(follow, owner="7")).conversation, tag)
        self.assertIsNone(ocp.conversation_followup(parse(answered + [{"role": "user", "content": "x"}],
                                                          response_format={"type": "json_object"})))

    def test_spawn_keys_differ_by_key_and_login(self):
        job = ocp.Job("sonnet", "sys", (), account="1")
        login = ocp.Credentials("login", "token-a")
        key = ocp.spawn_key(job, login)
        self.assertNotEqual(key, ocp.spawn_key(dataclasses_replace(job, account="2"), login))
        self.assertNotEqual(key, ocp.spawn_key(job, ocp.Credentials("login", "token-b")))
        self.assertEqual(key, ocp.spawn_key(dataclasses_replace(job, blocks=({"type": "text", "text": "x"},),
                                                                request_id="other"), login))

    def test_no_warm_cli_is_spawned_while_the_plan_is_held(self):
        runner = ocp.Runner(ocp.Config(home="/nonexistent"))
        runner.pool.may_spawn = lambda model_id: False
        lease = runner.lease(ocp.Job("sonnet", "sys", ()))
        lease.key = "k"
        with mock.patch.object(ocp.threading, "Thread") as thread:
            runner.pool.replenish(lease)
            thread.assert_not_called()
            runner.pool.may_spawn = lambda model_id: True
            runner.pool.replenish(lease)
            thread.assert_called_once()


def dataclasses_replace(value, **changes):
    return ocp.dataclasses.replace(value, **changes)


if __name__ == "__main__":
    unittest.main()
