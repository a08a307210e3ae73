#!/usr/bin/env python3
"""Sharing fairly (not a test): one key's unusual or hostile requests against the owner's.

    python3 bench/sharing.py --claude PATH [--json] [--connections 1100]

Starts `ocp.py serve` in multi mode (the owner's admin key, two member keys) with the
real CLI (PATH, or OCP_E2E_CLAUDE) against the fake Anthropic API of tests/e2e, then:

  structured   a member sends 8 tool rounds whose follow-ups ask for JSON (each answer
               is no JSON: the retry runs); then ocp_in_flight, and how long the
               owner's next request takes
  parks        the owner parks a tool round, a member parks 30 more in a burst; is the
               owner's round still resumed in its own CLI (no new spawn)
  flood        N idle keyless connections holding half-sent requests; the owner's
               /health times (median of 10) and the daemon's CPU over 5 s — with the
               default cap, then with OCP_MAX_CONNECTIONS=512 (what 1,024 open files give)
  memory       a 30-request mixed load (plain chats with varied system prompts,
               conversations, tool rounds left parked) with the pool on, a 600 MiB
               budget and 4 slots; the largest total RSS of running, parked and pooled
               CLIs (sampled every 0.2 s) against the README's rule
"""

import http.client
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from bench import free_port, real_cli_args, real_cli_parser, report, rss_kib  # noqa: E402
from e2e.fake_anthropic import FakeAnthropic, Reply  # noqa: E402

ADMIN = "ocp_admin_key_for_the_sharing_bench"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
BUDGET_MB, SLOTS = 600, 4


def respond(body):
    """A tool call when the client offered tools and no result came back yet; else a short text."""
    text = json.dumps(body.get("messages", [])[-1:])
    if body.get("tools") and any(t.get("name", "").startswith("mcp__ocp__") for t in body["tools"]) \
            and '"tool_result"' not in text and "[tool call " not in text:
        return Reply(text="", tool_uses=[{"name": "mcp__ocp__get_weather", "input": {"city": "Oslo"}}])
    return Reply(text="It is cold in Oslo today.", deltas=3)


class Daemon:
    def __init__(self, claude, upstream, **settings):
        self.tmp = tempfile.mkdtemp(prefix="ocp-bench-sharing-")
        self.port = free_port()
        env = {"PATH": os.environ["PATH"], "HOME": self.tmp, "OCP_HOME": os.path.join(self.tmp, "ocp"),
               "CLAUDE_BIN": claude, "CLAUDE_PROXY_PORT": str(self.port), "OCP_LOG_LEVEL": "WARNING",
               "OCP_ADMIN_KEY": ADMIN, "CLAUDE_AUTH_MODE": "multi", "OCP_UPSTREAM_BASE_URL": upstream.url,
               "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-bench"}
        env.update({k: str(v) for k, v in settings.items()})
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ocp.py"), "serve"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                if self.call("GET", "/health", key=ADMIN)[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        self.keys = {name: self.call("POST", "/api/keys", {"name": name}, ADMIN)[1]["key"] for name in ("anna", "ben")}
        self.keys["owner"] = ADMIN

    def call(self, method, path, body=None, key="", timeout=120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Authorization": f"Bearer {key}", "Content-Type": "application/json"} if key else {})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data.decode()

    def chat(self, who, messages, **params):
        return self.call("POST", "/v1/chat/completions", dict({"model": "sonnet", "messages": messages}, **params),
                         self.keys[who])

    def gauge(self, name):
        text = self.call("GET", "/metrics", key=ADMIN)[1]
        return [line for line in text.splitlines() if line.startswith(name)]

    def sessions(self):
        return self.call("GET", "/sessions", key=ADMIN)[1]["data"]

    def cpu_ticks(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def tool_round(daemon, who, text, **params):
    messages = [{"role": "user", "content": text}]
    status, reply = daemon.chat(who, messages, tools=TOOLS, **params)
    assert status == 200 and reply["choices"][0]["finish_reason"] == "tool_calls", reply
    message = reply["choices"][0]["message"]
    return messages + [message, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "cold"}]


def structured(daemon):
    statuses = []
    for number in range(8):
        follow = tool_round(daemon, "anna", f"weather {number}?", response_format={"type": "json_object"})
        statuses.append(daemon.chat("anna", follow, tools=TOOLS, response_format={"type": "json_object"})[0])
    time.sleep(0.5)
    in_flight = daemon.gauge("ocp_in_flight")
    started = time.perf_counter()
    status, _ = daemon.chat("owner", [{"role": "user", "content": "still there?"}])
    return {"follow_up_statuses": sorted(set(statuses)), "ocp_in_flight_after": in_flight,
            "owner_status": status, "owner_ms": round((time.perf_counter() - started) * 1000, 1)}


def parks(daemon):
    follow = tool_round(daemon, "owner", "owner's weather?")
    owner_pid = [s["pid"] for s in daemon.sessions() if s["parked"] and s["key"] == "admin"][0]
    started = time.perf_counter()
    for number in range(30):
        tool_round(daemon, "ben", f"ben's weather {number}?")
    burst_s = time.perf_counter() - started
    parked = [s for s in daemon.sessions() if s["parked"]]
    status, reply = daemon.chat("owner", follow, tools=TOOLS)
    resumed = [line for line in daemon.gauge("ocp_tool_rounds_total") if 'event="resumed"' in line]
    return {"ben_rounds": 30, "burst_s": round(burst_s, 1), "parked_after_burst": len(parked),
            "owner_park_alive_after_burst": owner_pid in [s["pid"] for s in parked],
            "owner_follow_up": (status, reply["choices"][0]["message"]["content"]), "resumed": resumed}


def flood(daemon, count):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 256)), hard))
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(sock)
    time.sleep(1)
    ticks = daemon.cpu_ticks()
    times = []
    started = time.time()
    for _ in range(10):
        begun = time.perf_counter()
        status, _ = daemon.call("GET", "/health", key=ADMIN, timeout=30)
        times.append(time.perf_counter() - begun)
        time.sleep(0.5)
    cpu = (daemon.cpu_ticks() - ticks) / os.sysconf("SC_CLK_TCK") / (time.time() - started)
    connections = daemon.call("GET", "/health", key=ADMIN)[1]["detail"].get("connections")
    for sock in socks:
        sock.close()
    return {"idle_keyless_connections": count, "owner_health_ms_median": round(statistics.median(times) * 1000, 1),
            "owner_health_ms_max": round(max(times) * 1000, 1), "daemon_cpu_pct_of_a_core": round(cpu * 100, 1),
            "connections": connections}


def cli_rss_mib(daemon):
    """Total RSS of every live CLI's process group, by state."""
    totals = {}
    groups = {s["pid"]: s["state"] for s in daemon.sessions()}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                state = groups.get(os.getpgid(int(pid)))
            except OSError:
                continue
            if state:
                totals[state] = totals.get(state, 0) + rss_kib(int(pid)) / 1024
    return totals


def memory(daemon):
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                samples.append(cli_rss_mib(daemon))
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    def work(number):
        who = ("anna", "ben", "owner")[number % 3]
        kind = number % 3
        if kind == 0:
            daemon.chat(who, [{"role": "system", "content": f"You are helper {number}."},
                              {"role": "user", "content": "hi"}])
        elif kind == 1:
            tool_round(daemon, who, f"weather {number}?")  # left parked
        else:
            messages = [{"role": "user", "content": f"hello {number}"}]
            status, reply = daemon.chat(who, messages)
            messages += [reply["choices"][0]["message"], {"role": "user", "content": "and?"}]
            daemon.chat(who, messages)
    threads = [threading.Thread(target=work, args=(n,)) for n in range(30)]
    for batch in range(0, 30, 6):  # six at a time
        for thread in threads[batch:batch + 6]:
            thread.start()
        for thread in threads[batch:batch + 6]:
            thread.join()
    time.sleep(2)
    stop.set()
    sampler.join()
    per_cli = [v for s in samples for k, v in s.items() if k == "running"]
    kept = [sum(v for k, v in s.items() if k != "running") for s in samples]  # parked, waiting, pooled
    total = [sum(s.values()) for s in samples]
    running = max(per_cli or [0])
    return {"requests": 30, "samples": len(samples), "max_total_mib": round(max(total), 1),
            "max_idle_mib": round(max(kept), 1), "budget_mib": BUDGET_MB, "slots": SLOTS,
            "max_running_mib": round(running, 1),
            "rule": f"running <= {SLOTS} CLIs, idle (parked, waiting, pooled) <= {BUDGET_MB} MiB"}


def main():
    parser = real_cli_parser(__doc__)
    parser.add_argument("--connections", type=int, default=1100)
    args = real_cli_args(parser, "sharing.py")
    upstream = FakeAnthropic()
    upstream.responder = respond
    results = {}
    try:
        daemon = Daemon(args.claude, upstream, OCP_POOL="0")
        try:
            results["structured"] = structured(daemon)
            results["parks"] = parks(daemon)
            results["flood"] = flood(daemon, args.connections)
        finally:
            daemon.close()
        daemon = Daemon(args.claude, upstream, OCP_POOL="0", OCP_MAX_CONNECTIONS=512)  # as with 1,024 open files
        try:
            results["flood_past_the_cap"] = flood(daemon, args.connections)
        finally:
            daemon.close()
        daemon = Daemon(args.claude, upstream, OCP_POOL="1", OCP_POOL_MAX_MB=BUDGET_MB, CLAUDE_MAX_CONCURRENT=SLOTS,
                        CLAUDE_MAX_QUEUE=64)
        try:
            results["memory"] = memory(daemon)
        finally:
            daemon.close()
    finally:
        upstream.close()
    report(results, args.json)


if __name__ == "__main__":
    main()
