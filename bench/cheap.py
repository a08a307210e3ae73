#!/usr/bin/env python3
"""Cheap routes against the server they run on (not a test): GET /v1/models and /health.

    python3 bench/cheap.py [--rounds 7] [--requests 400] [--json]

Starts `ocp.py serve` (auth mode none, its default log level INFO: the access log is on, as a
user runs it) and a bare stdlib `ThreadingHTTPServer` (HTTP/1.1, keep-alive) that answers the
same paths with the same bytes (TCP_NODELAY, as OCP: without it every answer waits ~40 ms for
a delayed ACK), then alternates rounds against the two: in each, `c`
keep-alive connections (c=1, c=8) send --requests requests between them. The figure is OCP's
requests a second over the bare server's, the median of the rounds' ratios (same run,
alternating: this machine is noisy), with OCP's CPU per request.
"""

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import ROOT, cpu_seconds, free_port  # noqa: E402

BARE = r'''
import socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
BODIES = {path: open(name, "rb").read() for path, name in zip(sys.argv[2::2], sys.argv[3::2])}

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as OCP: no Nagle wait

    def do_GET(self):
        body = BODIES[self.path]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''


def wait_port(port):
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing answered on port {port}")


def fetch(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    return conn.getresponse().read()


def rate(port, path, connections, requests):
    """Requests a second for `requests` GETs of `path` over `connections` keep-alive connections."""
    per = requests // connections
    ready = threading.Barrier(connections + 1)

    def work():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.connect()
        ready.wait()
        for _ in range(per):
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"bench: {path} answered {response.status}")
        conn.close()

    threads = [threading.Thread(target=work) for _ in range(connections)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return per * connections / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="ocp-bench-cheap-")
    ocp_port, bare_port = free_port(), free_port()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": tmp, "OCP_HOME": os.path.join(tmp, "ocp"),
           "CLAUDE_BIN": os.path.join(ROOT, "tests", "fake_claude.py"), "CLAUDE_PROXY_PORT": str(ocp_port)}
    daemon = subprocess.Popen([sys.executable, os.path.join(ROOT, "ocp.py"), "serve"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bare = None
    try:
        wait_port(ocp_port)
        paths = ("/v1/models", "/health")
        files = []
        for path in paths:
            name = os.path.join(tmp, path.strip("/").replace("/", "_"))
            with open(name, "wb") as f:
                f.write(fetch(ocp_port, path))
            files += [path, name]
        bare = subprocess.Popen([sys.executable, "-c", BARE, str(bare_port)] + files)
        wait_port(bare_port)
        results = {}
        for path in paths:
            for connections in (1, 8):
                rate(ocp_port, path, connections, args.requests // 4)  # warm both
                rate(bare_port, path, connections, args.requests // 4)
                ratios, ocp_rates, bare_rates, cpu = [], [], [], []
                for _ in range(args.rounds):
                    before = cpu_seconds(daemon.pid)
                    ocp_rates.append(rate(ocp_port, path, connections, args.requests))
                    cpu.append((cpu_seconds(daemon.pid) - before) / args.requests)
                    bare_rates.append(rate(bare_port, path, connections, args.requests))
                    ratios.append(ocp_rates[-1] / bare_rates[-1])
                results[f"{path} c={connections}"] = {
                    "ratio": round(statistics.median(ratios), 3), "ocp_rps": round(statistics.median(ocp_rates)),
                    "bare_rps": round(statistics.median(bare_rates)),
                    "ocp_cpu_ms_per_request": round(statistics.median(cpu) * 1000, 3)}
    finally:
        daemon.terminate()
        daemon.wait(timeout=15)
        if bare is not None:
            bare.kill()
            bare.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, figures in results.items():
            print(f"{name:18} {figures['ratio']:.3f}x the bare server  ({figures['ocp_rps']} vs {figures['bare_rps']} "
                  f"req/s; OCP {figures['ocp_cpu_ms_per_request']} ms CPU a request)")


if __name__ == "__main__":
    main()
