#!/usr/bin/env python3
"""Client tool calling with the real claude CLI (not a test): parked vs fallback.

    python3 bench/tools.py --claude PATH [--runs 10] [--json]

Starts `ocp.py serve` with the real CLI (PATH, or OCP_E2E_CLAUDE) against the fake
Anthropic API of tests/e2e, scripted to call a tool first and answer once a result
came back, then for each run:

  parked    the client's tool-result request continues the parked CLI: time from
            sending it to the first content chunk of the continuation (stream)
  fallback  the same request naming a call no CLI waits on: a fresh CLI with the
            history as text; the same time
  rss       the resident memory of one parked CLI (its whole process group)

Figures are medians over --runs rounds; the two kinds alternate.
"""

import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from bench import free_port, real_cli_args, real_cli_parser, report, rss_kib  # noqa: E402
from e2e.fake_anthropic import FakeAnthropic, Reply  # noqa: E402

ADMIN = "ocp_admin_key_for_the_tools_bench_0"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def respond(body):
    """A tool call first; the answer once a result came back (a tool_result block when the
    parked CLI continued, the labelled text of the history when a fresh one replays it)."""
    last = [m for m in body.get("messages", []) if m.get("role") != "system"][-1].get("content")
    if json.dumps(last).count('"tool_result"') or "[tool call " in json.dumps(last):
        return Reply(text="It is cold in Oslo today.", deltas=4)
    return Reply(text="", tool_uses=[{"name": "mcp__ocp__get_weather", "input": {"city": "Oslo"}}])


def call(port, body, path="/v1/chat/completions", method="POST"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(method, path, json.dumps(body) if body else None,
                 {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return json.loads(data)


def first_chunk(port, body):
    """Seconds from sending `body` (streamed) to the first content delta."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(dict(body, stream=True)),
                 {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})  # the same owner
    first = None
    for line in conn.getresponse():
        if first is None and line.startswith(b"data: {") and b'"content": "' in line and b'"content": ""' not in line:
            first = time.perf_counter() - started
    conn.close()
    return first


def group_rss_kib(pgid):
    total = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getpgid(int(pid)) == pgid:
                    total += rss_kib(int(pid))
            except (OSError, IndexError):
                pass
    return total


def main():
    parser = real_cli_parser(__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = real_cli_args(parser, "tools.py")
    upstream = FakeAnthropic()
    upstream.responder = respond
    tmp = tempfile.mkdtemp(prefix="ocp-bench-tools-")
    port = free_port()
    env = {"PATH": os.environ["PATH"], "HOME": tmp, "OCP_HOME": os.path.join(tmp, "ocp"), "CLAUDE_BIN": args.claude,
           "CLAUDE_PROXY_PORT": str(port), "OCP_LOG_LEVEL": "WARNING", "OCP_ADMIN_KEY": ADMIN,
           "OCP_UPSTREAM_BASE_URL": upstream.url, "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-bench"}
    daemon = subprocess.Popen([sys.executable, os.path.join(ROOT, "ocp.py"), "serve"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        parked, fallback, rss = [], [], []
        for number in range(args.runs):
            for kind in ("parked", "fallback"):
                messages = [{"role": "user", "content": f"weather {number} {kind}?"}]
                reply = call(port, {"model": "sonnet", "messages": messages, "tools": TOOLS})
                tool_call = reply["choices"][0]["message"]["tool_calls"][0]
                if kind == "parked" and not rss:
                    pid = [s for s in call(port, None, "/sessions", "GET")["data"] if s["parked"]][0]["pid"]
                    rss.append(group_rss_kib(pid))
                if kind == "fallback":
                    tool_call = dict(tool_call, id="call_nobody_waits_" + str(number))
                follow = messages + [{"role": "assistant", "content": None, "tool_calls": [tool_call]},
                                     {"role": "tool", "tool_call_id": tool_call["id"], "content": "cold"}]
                seconds = first_chunk(port, {"model": "sonnet", "messages": follow, "tools": TOOLS})
                (parked if kind == "parked" else fallback).append(seconds)
            call(port, None, "/sessions", "DELETE")  # the fallback round left its first CLI parked
        results = {"parked_ms": round(statistics.median(parked) * 1000, 1),
                   "fallback_ms": round(statistics.median(fallback) * 1000, 1),
                   "ratio": round(statistics.median(fallback) / statistics.median(parked), 1),
                   "parked_cli_rss_mib": round(rss[0] / 1024, 1), "runs": args.runs}
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        upstream.close()
    report(results, args.json)


if __name__ == "__main__":
    main()
