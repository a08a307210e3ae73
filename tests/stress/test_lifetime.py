"""The stress suite: hundreds of aborted requests, daemon deaths under load.

Slow by nature (tens of seconds), so the README's test command skips it;
`.ci/run` runs it with OCP_STRESS=1:

    OCP_STRESS=1 python3 -m unittest discover -s tests/stress -t tests
"""

import json
import os
import signal
import socket
import subprocess
import sys
import unittest

from helpers import ROOT, ServerTest, TempHome, connectable, directive, free_port, pid_alive, wait_until

STRESS = os.environ.get("OCP_STRESS") == "1"
stress = unittest.skipUnless(STRESS, "stress suite: set OCP_STRESS=1 (.ci/run does)")
HANG = {"model": "sonnet", "messages": [{"role": "user", "content": "x " + directive(hang=True)}]}


@stress
class ManyHangUps(ServerTest):
    def test_many_aborted_streams_and_abandoned_requests_leave_no_process(self):
        count = int(os.environ.get("OCP_ABORT_COUNT", "100"))
        batch = self.config.max_concurrent
        streaming = dict(HANG, stream=True)
        streaming["messages"] = [{"role": "user", "content": "x " + directive(text="b" * 40, deltas=40, pace_ms=50)}]
        for body in (streaming, HANG):
            for first in range(0, count, batch):
                size = min(batch, count - first)
                socks = [self.open_raw(body) for _ in range(size)]
                if body is streaming:
                    for sock in socks:
                        sock.recv(100)  # mid-answer
                else:
                    wait_until(lambda: sum(r["ended"] == "running" and "stdin_blocks" in r
                                           for r in self.runs()) == size)
                for sock in socks:
                    sock.close()
                wait_until(lambda: self.server.runner.live() == [], timeout=10)
        self.assertEqual(len(self.runs()), 2 * count)
        wait_until(lambda: self.live_fake_pids() == [], timeout=10)
        self.assertEqual(self.server.runner.slots.snapshot()["running"], 0)
        self.server.runner.sweeper.drain()
        self.assertEqual(sorted(os.listdir(os.path.join(self.ocp_home, "spawn"))), ["home", "work"])




@stress
class DaemonShutdown(TempHome):
    def test_sigterm_cancels_in_flight_runs_and_exits_0(self):
        env = dict(self.environ(), CLAUDE_PROXY_PORT="0", PYTHONUNBUFFERED="1")
        env["CLAUDE_PROXY_PORT"] = str(free_port())
        daemon = subprocess.Popen([sys.executable, os.path.join(ROOT, "ocp.py"), "serve"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: daemon.poll() is None and daemon.kill())
        port = int(env["CLAUDE_PROXY_PORT"])
        wait_until(lambda: connectable(port))
        sock = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(sock.close)
        body = json.dumps(HANG).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        run = wait_until(lambda: self.runs())[0]
        daemon.send_signal(signal.SIGTERM)
        self.assertEqual(daemon.wait(timeout=15), 0)
        self.assertFalse(pid_alive(run["pid"]))
        self.assertFalse(connectable(port))




if __name__ == "__main__":
    unittest.main()
