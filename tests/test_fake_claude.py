"""The fake CLI must print what the real CLI 2.1.330 prints (compared with the fixtures)."""

import json
import os
import subprocess
import sys
import unittest

from helpers import FAKE_CLAUDE_BIN, FIXTURES, directive

PARTIAL = ["-p", "--output-format", "stream-json", "--verbose", "--include-partial-messages"]
PLAIN = ["-p", "--output-format", "stream-json", "--verbose"]


def line_type(event):
    kind = event.get("type")
    if kind == "system":
        return "system/" + event.get("subtype", "")
    if kind == "stream_event":
        return "stream_event/" + event["event"]["type"]
    if kind == "result":
        return "result/" + event.get("subtype", "")
    return kind


def fake(args, prompt, oauth=False, extra_env=None):
    env = {"PATH": os.environ.get("PATH", "")}
    if oauth:
        env["CLAUDE_CODE_OAUTH_TOKEN"] = "fake-token"
    env.update(extra_env or {})
    done = subprocess.run([FAKE_CLAUDE_BIN] + args + [prompt], capture_output=True,
                          text=True, env=env, timeout=30)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, events


def fixture(name):
    with open(os.path.join(FIXTURES, name + ".jsonl")) as f:
        events = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(FIXTURES, name + ".meta.json")) as f:
        return json.load(f)["exit_code"], events


@unittest.skipUnless(os.path.isdir(FIXTURES), "shared fixtures not beside the checkout")
class FakeMatchesTheRealCli(unittest.TestCase):
    CASES = [
        # fixture, argv, steering, subscription mode
        ("partial_messages", PARTIAL, {"deltas": 6}, False),
        ("thinking_partial", PARTIAL, {"thinking": "The user wants me to think. Let me reason briefly.",
                                       "deltas": 3}, False),
        ("plain", PLAIN, {}, False),
        ("error_429", PLAIN, {"error": "rate_limit"}, False),
        ("error_401", PLAIN, {"error": "auth"}, False),
        ("error_500", PLAIN, {"error": "server_error"}, False),
        ("error_529", PLAIN, {"error": "overloaded"}, False),
        ("error_400", PLAIN, {"error": "prompt_too_long"}, False),
        ("no_credentials", PLAIN, {"error": "not_logged_in"}, False),
        ("oauth_rl_rejected_5h", PLAIN, {"error": "plan_limit"}, True),
        ("oauth_rl_allowed", PLAIN, {}, True),
        ("oauth_rl_allowed_partial", PARTIAL, {"deltas": 4}, True),
        ("oauth_rl_overage_in_use", PLAIN, {"overage": True}, True),
        ("disconnect_mid_stream", PARTIAL, {"drop": True, "deltas": 2}, False),
    ]

    def test_line_types_and_exit_codes(self):
        for name, args, steer, oauth in self.CASES:
            with self.subTest(name):
                want_code, want = fixture(name)
                code, got = fake(args, "hello " + directive(**steer), oauth)
                if name == "thinking_partial":  # the fixture's thinking deltas differ in count only
                    want = [e for e in want if line_type(e) != "system/thinking_tokens"]
                    got = [e for e in got if line_type(e) != "system/thinking_tokens"]
                    want = [line_type(e) for e in want]
                    got = [line_type(e) for e in got]
                    self.assertEqual(want.count("stream_event/content_block_start"),
                                     got.count("stream_event/content_block_start"))
                    self.assertEqual(want[-4:], got[-4:])
                    continue
                self.assertEqual([line_type(e) for e in got], [line_type(e) for e in want])
                self.assertEqual(code, want_code)

    def test_fields_are_the_real_cli_fields(self):
        for name, args, steer, oauth in self.CASES:
            with self.subTest(name):
                _, want = fixture(name)
                _, got = fake(args, "hello " + directive(**steer), oauth)
                real = {}
                for event in want:
                    real.setdefault(line_type(event), set()).update(event)
                for event in got:
                    kind = line_type(event)
                    if kind in real:
                        self.assertLessEqual(set(event), real[kind], kind)

    def test_error_lines_carry_the_real_error_fields(self):
        for name, steer, oauth in (("oauth_rl_rejected_5h", {"error": "plan_limit"}, True),
                                   ("error_429", {"error": "rate_limit"}, False)):
            with self.subTest(name):
                _, want = fixture(name)
                _, got = fake(PLAIN, "x " + directive(**steer), oauth)
                pick = lambda events: [(e.get("api_error_status"), e.get("api_error"), e.get("error"),
                                        e.get("api_error_params"))
                                       for e in events if e.get("type") == "assistant"]
                self.assertEqual(pick(got), pick(want))
                self.assertEqual([e["terminal_reason"] for e in got if e["type"] == "result"],
                                 [e["terminal_reason"] for e in want if e["type"] == "result"])


class FakeBehaviour(unittest.TestCase):
    def test_stream_json_needs_verbose_like_the_real_cli(self):
        code, events = fake(["-p", "--output-format", "stream-json"], "hi")
        self.assertEqual((code, events), (1, []))

    def test_max_output_tokens_continues_three_times_then_fails_like_the_real_cli(self):
        code, events = fake(PARTIAL + ["--max-turns", "1"], "x " + directive(text="a" * 100), False,
                            {"CLAUDE_CODE_MAX_OUTPUT_TOKENS": "5"})
        result = events[-1]
        self.assertEqual((code, result["subtype"], result["terminal_reason"], result["api_error"]),
                         (1, "success", "api_error", "max_output_tokens"))
        stops = [e["event"]["delta"]["stop_reason"] for e in events
                 if line_type(e) == "stream_event/message_delta"]
        self.assertEqual(stops, ["max_tokens"] * 4)
        self.assertEqual(sum(1 for e in events if e.get("isSynthetic")), 3)

    def test_a_continuation_that_fits_ends_normally(self):
        code, events = fake(PARTIAL, "x " + directive(text="a" * 30), False, {"CLAUDE_CODE_MAX_OUTPUT_TOKENS": "5"})
        self.assertEqual((code, events[-1]["is_error"]), (0, False))

    def test_a_directive_quoted_as_a_json_string_still_steers_it(self):  # opencode quotes some prompts
        quoted = json.dumps("x " + directive(text="steered"))[1:-1]
        code, events = fake(PARTIAL, quoted)
        self.assertEqual((code, events[-1]["result"]), (0, "steered"))

    def test_a_malformed_stdin_line_ends_it_like_the_real_cli(self):
        done = subprocess.run([FAKE_CLAUDE_BIN, "-p", "--output-format", "stream-json", "--verbose",
                               "--input-format", "stream-json"], input="{not json\n", capture_output=True,
                              text=True, timeout=30)
        self.assertEqual(done.returncode, 1)
        self.assertIn("Error parsing streaming input line", done.stderr)


if __name__ == "__main__":
    unittest.main()
