#!/usr/bin/env python3
"""Benchmarks for OCP (not tests): overhead, time to first chunk, memory, /v1/models rate.

    python3 bench/bench.py [--runs 30] [--json]

Starts `ocp.py serve` as its own process on a free port with tests/fake_claude.py
as the CLI, a throwaway OCP_HOME and the warm pool off (bench/pool.py measures the
pool with the real CLI), then measures:

  overhead   OCP's latency for a non-streaming completion minus the fake CLI run
             alone (same argv and stdin) until it exits: rounds alternate the two, and the
             figure is the median of the paired differences over --runs rounds, at c=1 and
             c=8; overhead_c1_to_result_ms is the stricter figure against the fake's result
             line (OCP answers then, and waits for the CLI's exit off the request's path)
  cpu        the daemon's own CPU time (user + system) per completion
  ttfc       streaming: time to the first content chunk through OCP minus the
             fake CLI's own time to its first text delta
  rss        the daemon's resident memory idle, and after the load above
  models     GET /v1/models requests per second over keep-alive connections
"""

import argparse
import http.client
import json
import os
import shutil
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
FAKE = os.path.join(ROOT, "tests", "fake_claude.py")
sys.path.insert(0, ROOT)
import ocp  # noqa: E402  (the bench measures this checkout's ocp.py)

BODY = {"model": "sonnet", "messages": [{"role": "user", "content": "benchmark prompt"}]}


def real_cli_parser(doc):
    """The argument parser of a benchmark that runs the real claude CLI: --claude PATH, --json."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--claude", default=os.environ.get("OCP_E2E_CLAUDE", ""))
    parser.add_argument("--json", action="store_true")
    return parser


def real_cli_args(parser, script):
    """Parse; exit with the reason when no real claude CLI was named."""
    args = parser.parse_args()
    if not args.claude:
        raise SystemExit(f"bench/{script} needs the real claude CLI: --claude PATH (or OCP_E2E_CLAUDE)")
    return args


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Daemon:
    def __init__(self, tmp):
        self.port = free_port()
        env = {"PATH": os.environ.get("PATH", ""), "HOME": os.path.join(tmp, "home"),
               "OCP_HOME": os.path.join(tmp, "ocp"), "CLAUDE_BIN": FAKE,
               "CLAUDE_PROXY_PORT": str(self.port), "OCP_LOG_LEVEL": "WARNING",
               "CLAUDE_MAX_CONCURRENT": "8", "CLAUDE_MAX_QUEUE": "64",
               "OCP_POOL": "0"}  # OCP's cost around a CLI it starts; bench/pool.py measures the pool
        os.makedirs(env["HOME"], exist_ok=True)
        self.env = env
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ocp.py"), "serve"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("bench: the daemon did not start")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=15)


def post(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body))
    response = conn.getresponse()
    response.read()
    elapsed = time.perf_counter() - started
    conn.close()
    if response.status != 200:
        raise SystemExit(f"bench: OCP answered {response.status}")
    return elapsed


def first_chunk(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(dict(body, stream=True)))
    response = conn.getresponse()
    first = None
    for line in response:
        if first is None and line.startswith(b"data: {") and b'"content": "' in line and b'"content": ""' not in line:
            first = time.perf_counter() - started
    conn.close()
    return first


def fake_alone(env, body, stream_first=False, results=None):
    """Run the fake CLI as OCP would (argv, stdin); return its wall time or time to first delta
    (and append the time to its result line to `results`)."""
    config = ocp.Config(home=env["OCP_HOME"])
    request = ocp.parse_chat_request(body, ocp.Models.load(os.path.join(ROOT, "models.json")), config)
    system, blocks = ocp.messages_to_input(request, config, b"k" * 32)
    job = ocp.Job(request.model.id, system, blocks)
    argv = ocp.claude_argv(FAKE, job, ("--system-prompt", system))
    child_env = dict(env)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env,
                            start_new_session=True)
    proc.stdin.write(ocp.stdin_line(job.blocks))
    proc.stdin.close()
    first = None
    for line in proc.stdout:
        if first is None and b'"text_delta"' in line:
            first = time.perf_counter() - started
        if results is not None and line.startswith(b'{"type": "result"'):
            results.append(time.perf_counter() - started)
    proc.wait()
    return first if stream_first else time.perf_counter() - started


def cpu_seconds(pid):
    """User + system CPU time the process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def paired(ocp_round, fake_round, rounds):
    """Alternate OCP and bare-CLI rounds; return (median OCP, median CLI, median difference,
    OCP's times)."""
    ocp_times, fake_times = [], []
    for _ in range(rounds):
        ocp_times.append(ocp_round())
        fake_times.append(fake_round())
    differences = [a - b for a, b in zip(ocp_times, fake_times)]
    return statistics.median(ocp_times), statistics.median(fake_times), statistics.median(differences), ocp_times


def concurrent(fn, workers, per_worker):
    results, lock = [], threading.Lock()

    def work():
        for _ in range(per_worker):
            value = fn()
            with lock:
                results.append(value)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def models_rate(port, seconds=3.0, workers=4):
    """GET /v1/models as fast as `workers` keep-alive connections can; return requests a second."""
    stop = time.monotonic() + seconds

    def work():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        n = 0
        while time.monotonic() < stop:
            conn.request("GET", "/v1/models")
            conn.getresponse().read()
            n += 1
        conn.close()
        return n

    return sum(concurrent(work, workers, 1)) / seconds


def ms(seconds):
    return round(seconds * 1000, 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="ocp-bench-")
    daemon = Daemon(tmp)
    try:
        time.sleep(0.5)
        results = {"rss_idle_mib": round(rss_kib(daemon.proc.pid) / 1024, 1)}
        for _ in range(3):  # warm caches on both sides
            post(daemon.port, BODY)
            fake_alone(daemon.env, BODY)
        cpu_before = cpu_seconds(daemon.proc.pid)
        to_result = []
        ocp_c1, fake_c1, overhead_c1, ocp_times = paired(lambda: post(daemon.port, BODY),
                                                         lambda: fake_alone(daemon.env, BODY, results=to_result),
                                                         args.runs)
        results["cpu_per_request_ms"] = ms((cpu_seconds(daemon.proc.pid) - cpu_before) / args.runs)
        ocp_c8, fake_c8, overhead_c8, _ = paired(
            lambda: statistics.median(concurrent(lambda: post(daemon.port, BODY), 8, 1)),
            lambda: statistics.median(concurrent(lambda: fake_alone(daemon.env, BODY), 8, 1)), args.runs)
        results.update(ocp_c1_ms=ms(ocp_c1), fake_c1_ms=ms(fake_c1), overhead_c1_ms=ms(overhead_c1),
                       fake_c1_to_result_ms=ms(statistics.median(to_result)),
                       overhead_c1_to_result_ms=ms(statistics.median(a - b for a, b in zip(ocp_times, to_result))),
                       ocp_c8_ms=ms(ocp_c8), fake_c8_ms=ms(fake_c8), overhead_c8_ms=ms(overhead_c8))
        slow = {"model": "sonnet", "messages": [{"role": "user", "content": "x <<fake " + json.dumps(
            {"text": "streamed answer in pieces", "deltas": 5, "pace_ms": 20}) + ">>"}]}
        ttfc_ocp, ttfc_fake, ttfc_overhead, _ = paired(lambda: first_chunk(daemon.port, slow),
                                                    lambda: fake_alone(daemon.env, slow, True), args.runs)
        results.update(ttfc_ocp_ms=ms(ttfc_ocp), ttfc_fake_ms=ms(ttfc_fake), ttfc_overhead_ms=ms(ttfc_overhead))
        concurrent(lambda: post(daemon.port, BODY), 8, 25)
        results["rss_after_load_mib"] = round(rss_kib(daemon.proc.pid) / 1024, 1)
        results["models_rps"] = round(models_rate(daemon.port))
        results["rss_after_models_mib"] = round(rss_kib(daemon.proc.pid) / 1024, 1)
    finally:
        daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, args.json)


def report(results, as_json):
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for name, value in results.items():
            print(f"{name:<22} {value}")


if __name__ == "__main__":
    main()
