#!/usr/bin/env python3
"""The warm pool with the real claude CLI (not a test): cold vs warm vs continued.

    python3 bench/pool.py --claude PATH [--runs 20] [--lengths 1,10,50,200] [--cost-runs 5] [--json]

Starts two `ocp.py serve` daemons side by side on the real CLI (PATH, or OCP_E2E_CLAUDE),
both against the fake Anthropic API of tests/e2e answering at once: one with OCP_POOL=0
(every request spawns: "cold"), one with the pool on. Requests alternate between them,
one at a time, and each waits until the pool's background spawn is over, so the
figures come from one run on one machine state:

  ttft        time from sending a streamed request to its first content chunk, median
              of --runs: cold (pool off, a new conversation), warm (pool on, a new
              conversation of the same shape: a warm spare or a /clear-ed CLI), continued
              (pool on, the follow-up of the previous answer); at c=1 and c=4
  cpu         each daemon's own CPU time (user + system) per request of each kind (a mean:
              the kernel counts it in 10 ms ticks)
  rss         the pool's idle CLIs: resident memory each, and the default budget
  length      the next request of a conversation of 1, 10, 50 and 200 turns: time to
              first chunk and daemon CPU, pool off (the history re-rendered and sent to
              a new CLI) vs continued (only the new turn), median of --cost-runs
"""

import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)
import ocp  # noqa: E402
from bench import cpu_seconds, free_port, real_cli_args, real_cli_parser, report, rss_kib  # noqa: E402
from e2e.fake_anthropic import FakeAnthropic, Reply  # noqa: E402

ADMIN = "ocp_admin_key_for_the_pool_bench_00"
SYSTEM = "You are a helpful assistant."


class Daemon:
    def __init__(self, claude, upstream, tmp, pool, extra_env=None):
        self.port = free_port()
        env = {"PATH": os.environ["PATH"], "HOME": tmp, "OCP_HOME": os.path.join(tmp, "ocp"), "CLAUDE_BIN": claude,
               "CLAUDE_PROXY_PORT": str(self.port), "OCP_LOG_LEVEL": "WARNING", "OCP_ADMIN_KEY": ADMIN,
               "OCP_UPSTREAM_BASE_URL": upstream.url, "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-bench",
               "OCP_POOL": "1" if pool else "0", "CLAUDE_MAX_CONCURRENT": "8"}
        env.update(extra_env or {})
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ocp.py"), "serve"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while self.get("/health") is None:
            if time.monotonic() > deadline:
                raise SystemExit("the daemon did not start")
            time.sleep(0.1)

    def get(self, path):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            conn.request("GET", path, headers={"Authorization": f"Bearer {ADMIN}"})
            body = json.loads(conn.getresponse().read())
            conn.close()
            return body
        except OSError:
            return None

    def pool(self):
        return self.get("/health")["detail"]["pool"]

    def settle(self):
        """Wait until no warm CLI is starting (its spawn would load the machine under a measurement)."""
        while self.pool()["starting"]:
            time.sleep(0.02)
        time.sleep(0.05)

    def stream(self, messages, system=SYSTEM):
        """Stream one completion; return (seconds to the first content chunk, the answer's text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        body = {"model": "sonnet", "stream": True, "messages": [{"role": "system", "content": system}] + messages}
        started = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
        first, text = None, []
        response = conn.getresponse()
        if response.status != 200:
            raise SystemExit(f"HTTP {response.status}: {response.read()[:300]!r}")
        for line in response:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if piece:
                    first = first or time.perf_counter() - started
                    text.append(piece)
        conn.close()
        return first, "".join(text)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


class Conversation:
    """One conversation's messages, extended by each answer."""

    counter = 0

    def __init__(self, daemon):
        self.daemon, self.messages = daemon, []
        Conversation.counter += 1
        self.name = f"c{Conversation.counter}"

    def say(self, text=None):
        self.messages.append({"role": "user", "content": text or f"{self.name} turn {len(self.messages) // 2}"})
        seconds, answer = self.daemon.stream(self.messages)
        self.messages.append({"role": "assistant", "content": answer})
        return seconds


def at_once(calls):
    """Run the callables together; return their results."""
    results = [None] * len(calls)

    def run(i):
        results[i] = calls[i]()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def measured(daemon, fn):
    """(result of fn, the daemon's CPU seconds spent meanwhile)."""
    before = cpu_seconds(daemon.proc.pid)
    result = fn()
    return result, cpu_seconds(daemon.proc.pid) - before


def ms(values):
    return round(statistics.median(values) * 1000, 1)


def mean_ms(values):
    """CPU time is counted in clock ticks (10 ms): a mean over many requests, not a median."""
    return round(statistics.mean(values) * 1000, 2)


def ttft(cold, pool, runs, width):
    """Cold, warm and continued rounds of `width` concurrent requests, alternating."""
    times = {"cold": [], "warm": [], "continued": []}
    cpu = {"cold": [], "warm": [], "continued": []}
    talks = [Conversation(pool) for _ in range(width)]
    for talk in talks:
        talk.say()
        pool.settle()
    for _ in range(runs):
        for kind in ("cold", "warm", "continued"):
            daemon = cold if kind == "cold" else pool
            if kind == "continued":
                calls = [talk.say for talk in talks]
            else:
                calls = [Conversation(daemon).say for _ in range(width)]
            seconds, spent = measured(daemon, lambda: at_once(calls))
            times[kind] += seconds
            cpu[kind] += [spent / width] * width
            pool.settle()
    return {kind: ms(values) for kind, values in times.items()}, {kind: mean_ms(v) for kind, v in cpu.items()}


def lengths(cold, pool, sizes, runs):
    """The next request of conversations of each size: pool off (whole history) vs continued."""
    rows = {}
    for size in sizes:
        talk = Conversation(pool)
        for _ in range(size):
            talk.say()
        pool.settle()
        off, on, off_cpu, on_cpu = [], [], [], []
        for _ in range(runs):
            history = talk.messages + [{"role": "user", "content": f"{talk.name} once more"}]
            (seconds, _), spent = measured(cold, lambda: cold.stream(history))
            off.append(seconds)
            off_cpu.append(spent)
            seconds, spent = measured(pool, talk.say)
            on.append(seconds)
            on_cpu.append(spent)
            pool.settle()
        rows[size] = {"off_ttft_ms": ms(off), "continued_ttft_ms": ms(on),
                      "off_cpu_ms": mean_ms(off_cpu), "continued_cpu_ms": mean_ms(on_cpu)}
    return rows


def pool_rss(pool):
    pids = [s["pid"] for s in pool.get("/sessions")["data"] if s["state"] in ("warm", "conversation")]
    each = [rss_kib(pid) / 1024 for pid in pids]
    return {"pooled_clis": len(each), "rss_mib_each_median": round(statistics.median(each), 1) if each else None,
            "rss_mib_total": round(sum(each), 1)}


def main():
    parser = real_cli_parser(__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--lengths", default="1,10,50,200")
    parser.add_argument("--cost-runs", type=int, default=5)
    args = real_cli_args(parser, "pool.py")
    upstream = FakeAnthropic()
    upstream.responder = lambda body: Reply(text="Fine, thanks.", deltas=2)
    tmp = tempfile.mkdtemp(prefix="ocp-bench-pool-")
    cold = Daemon(args.claude, upstream, os.path.join(tmp, "cold"), pool=False)
    pool = Daemon(args.claude, upstream, os.path.join(tmp, "pool"), pool=True)
    try:
        results = {"runs": args.runs}
        for width in (1, 4):
            times, cpu = ttft(cold, pool, args.runs, width)
            results[f"c{width}_ttft_ms"] = times
            results[f"c{width}_ratio_to_cold"] = {k: round(times[k] / times["cold"], 3) for k in ("warm", "continued")}
            results[f"c{width}_daemon_cpu_ms_per_request"] = cpu
        results["pool"] = dict(pool_rss(pool), **{k: v for k, v in pool.pool().items() if k in ("hits", "misses",
                                                                                             "budget_mb")})
        results["default_budget_mb"] = {f"{gb}GB": ocp.default_pool_mb(gb * 1024) for gb in (1, 4, 16)}
        results["length"] = lengths(cold, pool, [int(n) for n in args.lengths.split(",")], args.cost_runs)
    finally:
        cold.stop()
        pool.stop()
        upstream.close()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, args.json)


if __name__ == "__main__":
    main()
