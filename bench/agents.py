#!/usr/bin/env python3
"""The warm pool after scripted agent sessions (not a test): what it keeps and what it used.

    python3 bench/agents.py --claude PATH [--sessions 3] [--turns 4] [--json]

Two pool-on daemons on the real CLI (PATH, or OCP_E2E_CLAUDE) against the fake Anthropic API
of tests/e2e: OCP's default (a warm spare only for a configuration the key has begun
conversations with OCP_POOL_SPARE_AFTER=2 times) and OCP_POOL_SPARE_AFTER=1 (a spare after
every new conversation: OCP before this setting). Each runs the same script, as opencode
does: --sessions sessions, each in its own project directory (the system prompt names it, as
agents' prompts do), each beginning with a title request (a fixed title prompt with the
user's first message; never continued) and then a main conversation of --turns turns, each
continuing the last. Then, once no spare is starting:

  pool       the CLIs it keeps (warm spares, held conversations) and their resident memory
  spares     started, taken by a request (used), ended untouched (unused), the hit rate
             (used / started), and the warm spares now waiting that were never used
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from pool import Daemon, pool_rss  # noqa: E402  (puts tests/ and the checkout on the path)
from bench import real_cli_args, real_cli_parser, report  # noqa: E402
from e2e.fake_anthropic import FakeAnthropic, Reply  # noqa: E402

TITLE = "You are a title generator. Reply with a title of at most 50 characters for the conversation."


def session(daemon, directory, turns):
    """One agent session: its title request, then its main conversation; first-chunk seconds."""
    system = f"You are an agent that edits code. Working directory: {directory}. Platform: linux."
    first = f"In {directory}: make the tests pass."
    daemon.stream([{"role": "user", "content": first}], system=TITLE)
    messages, times = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": first if turn == 0 else f"{directory} step {turn}"})
        seconds, answer = daemon.stream(messages, system=system)
        messages.append({"role": "assistant", "content": answer})
        times.append(seconds)
        daemon.settle()
    return times


def script(daemon, sessions, turns):
    new, continued = [], []
    for n in range(sessions):
        times = session(daemon, f"/home/user/project-{n + 1}", turns)
        new.append(times[0])
        continued += times[1:]
    daemon.settle()
    time.sleep(0.5)  # a spare that just started is measured before it is counted
    pool = daemon.pool()
    spares = pool["spares"]
    started = pool["spawned"]
    return {"pool": dict(pool_rss(daemon), warm=pool["warm"], conversations=pool["conversations"]),
            "spares": {"started": started, "used": spares.get("used", 0), "unused": spares.get("unused", 0),
                       "hit_rate": round(spares.get("used", 0) / started, 2) if started else None,
                       "waiting_never_used": pool["warm"]},
            "first_chunk_ms": {"new_conversation": round(statistics.median(new) * 1000, 1),
                               "continued": round(statistics.median(continued) * 1000, 1) if continued else None}}


def main():
    parser = real_cli_parser(__doc__)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--turns", type=int, default=4)
    args = real_cli_args(parser, "agents.py")
    upstream = FakeAnthropic()
    upstream.responder = lambda body: Reply(text="Done.", deltas=2)
    tmp = tempfile.mkdtemp(prefix="ocp-bench-agents-")
    results = {"sessions": args.sessions, "turns": args.turns}
    try:
        for name, after in (("default", None), ("spare_after_1", "1")):
            daemon = Daemon(args.claude, upstream, os.path.join(tmp, name), pool=True,
                            extra_env={"OCP_POOL_SPARE_AFTER": after} if after else {})
            try:
                results[name] = script(daemon, args.sessions, args.turns)
            finally:
                daemon.stop()
    finally:
        upstream.close()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, args.json)


if __name__ == "__main__":
    main()
