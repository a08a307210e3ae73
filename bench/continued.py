#!/usr/bin/env python3
"""A continued turn through OCP against the CLI itself (not a test).

    python3 bench/continued.py --claude PATH [--pairs 12] [--json]

The real CLI (PATH, or OCP_E2E_CLAUDE) against the fake Anthropic API of tests/e2e answering at
once. Pairs alternate:

  raw   the CLI started with OCP's flags (claude_argv) and environment essentials, turn 1 on its
        stdin read to its `result`, 200 ms idle (as a pooled CLI between a client's turns), then
        turn 2: the time from writing turn 2 to its first text delta on stdout
  ocp   a pool-on daemon (no warm spares, at most 2 kept CLIs: the same load beside the turn
        as the raw side's): a streamed chat, then (after the same 200 ms) its follow-up, which
        continues in the pooled CLI that answered it: the time from sending the follow-up to
        its first content chunk

and the figure is OCP's median minus the raw median, with the median of the paired differences
(same run: this machine is noisy). The issue's target: within 5 ms.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from pool import SYSTEM, Conversation, Daemon, ms  # noqa: E402  (puts tests/ and the checkout on the path)
from bench import real_cli_args, real_cli_parser, report  # noqa: E402
from e2e.fake_anthropic import FakeAnthropic, Reply  # noqa: E402
import ocp  # noqa: E402

IDLE_S = 0.2  # between turn 1's answer and turn 2, on both sides: right after a result the CLI is still busy


def raw_turn_two(claude, upstream_url, home):
    """Seconds from writing turn 2 on the stdin of the CLI that answered turn 1 to its first text delta."""
    job = ocp.Job("claude-sonnet-5-5", SYSTEM, ())
    argv = ocp.claude_argv(claude, job, ("--system-prompt", SYSTEM))
    env = {"PATH": os.environ["PATH"], "HOME": home, "ANTHROPIC_BASE_URL": upstream_url,
           "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-bench", "DISABLE_AUTO_COMPACT": "1",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, cwd=home, start_new_session=True)
    try:
        proc.stdin.write(ocp.stdin_line(({"type": "text", "text": "turn one"},)))
        proc.stdin.flush()
        for line in proc.stdout:
            if b'"result"' in line and json.loads(line).get("type") == "result":  # (its keys come in any order)
                break
        time.sleep(IDLE_S)  # idle, as a pooled CLI is between a client's turns
        started = time.perf_counter()
        proc.stdin.write(ocp.stdin_line(({"type": "text", "text": "turn two"},)))
        proc.stdin.flush()
        for line in proc.stdout:
            if b'"text_delta"' in line:
                return time.perf_counter() - started
        raise SystemExit("bench: the CLI answered turn 2 with no text")
    finally:
        proc.kill()
        proc.wait()


def main():
    parser = real_cli_parser(__doc__)
    parser.add_argument("--pairs", type=int, default=12)
    args = real_cli_args(parser, "continued.py")
    upstream = FakeAnthropic()
    upstream.responder = lambda body: Reply(text="Fine, thanks.", deltas=2)
    tmp = tempfile.mkdtemp(prefix="ocp-bench-continued-")
    home = os.path.join(tmp, "raw")
    os.makedirs(home)
    # No warm spares and few kept CLIs: the raw side has one CLI at a time, and a spare warming up
    # (or twenty idle CLIs) beside the measured turn would measure the machine's load, not OCP
    daemon = Daemon(args.claude, upstream, os.path.join(tmp, "pool"), pool=True,
                    extra_env={"OCP_POOL_SPARE_AFTER": "0", "OCP_POOL_MAX_CLIS": "2"})
    try:
        raw, through, gaps = [], [], []
        for _ in range(2):  # warm both sides
            raw_turn_two(args.claude, upstream.url, home)
            Conversation(daemon).say()
        for _ in range(args.pairs):
            raw.append(raw_turn_two(args.claude, upstream.url, home))
            talk = Conversation(daemon)
            talk.say()
            answered = time.monotonic()
            daemon.settle()
            time.sleep(max(0.0, IDLE_S - (time.monotonic() - answered)))  # the same idle as the raw CLI's
            through.append(talk.say())
            daemon.settle()
            gaps.append(through[-1] - raw[-1])
        results = {"pairs": args.pairs, "raw_turn2_first_delta_ms": ms(raw), "ocp_continued_first_chunk_ms": ms(through),
                   "gap_ms": round(ms(through) - ms(raw), 1), "paired_gap_median_ms": ms(gaps),
                   "continued_hits": daemon.pool()["hits"]["continued"]}
    finally:
        daemon.stop()
        upstream.close()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, args.json)


if __name__ == "__main__":
    main()
