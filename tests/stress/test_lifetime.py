"""The stress suite: hundreds of aborted requests, daemon deaths under load.

Slow by nature (tens of seconds), so the README's test command skips it;
`.ci/run` runs it with OCP_STRESS=1:

    OCP_STRESS=1 python3 -m unittest discover -s tests/stress -t tests
"""

import glob
import http.client
import json
import os
import signal
import socket
import subprocess
import sqlite3
import sys
import time
import unittest

from helpers import ROOT, ServerTest, TempHome, connectable, directive, free_port, pid_alive, wait_until

STRESS = os.environ.get("OCP_STRESS") == "1"
stress = unittest.skipUnless(STRESS, "stress suite: set OCP_STRESS=1 (.ci/run does)")
ADMIN = "ocp_stress-admin-key-0123456789abcdefgh"
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




class Daemon(TempHome):
    """`ocp.py serve` as its own process, as a service manager runs it."""

    def start_daemon(self, **extra):
        port = free_port()
        env = dict(self.environ(**extra), CLAUDE_PROXY_PORT=str(port), PYTHONUNBUFFERED="1", OCP_ADMIN_KEY=ADMIN)
        log = open(os.path.join(self.tmp, "daemon.log"), "ab")
        self.addCleanup(log.close)
        daemon = subprocess.Popen([sys.executable, os.path.join(ROOT, "ocp.py"), "serve"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        self.addCleanup(daemon.wait)
        self.addCleanup(lambda: daemon.poll() is None and daemon.kill())
        self.addCleanup(self.kill_leftovers)
        wait_until(lambda: connectable(port))
        return daemon, port

    def hang(self, port, stream=False, n=0):
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.addCleanup(sock.close)
        body = json.dumps(dict(HANG, stream=stream, messages=[
            {"role": "user", "content": f"n{n} " + directive(hang=True)}])).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body)
        return sock

    def waiting_clis(self, count):
        return wait_until(lambda: [r for r in self.runs() if "stdin_blocks" in r][:count]
                          if len([r for r in self.runs() if "stdin_blocks" in r]) >= count else None)

    def run_dirs(self):
        spawn = os.path.join(self.ocp_home, "spawn")
        return [n for n in os.listdir(spawn) if n.startswith("run-")] if os.path.isdir(spawn) else []

    def pending_rows(self):
        db = sqlite3.connect(os.path.join(self.ocp_home, "ocp.db"))
        try:
            return db.execute("SELECT COUNT(*) FROM usage WHERE status = 'pending'").fetchone()[0]
        finally:
            db.close()


def children_of(pid):
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


@stress
class DaemonDeath(Daemon):
    def test_kill_9_leaves_no_cli_and_a_restart_no_pending_row(self):
        daemon, port = self.start_daemon(CLAUDE_MAX_CONCURRENT="4")
        for n in range(4):
            self.hang(port, stream=n % 2 == 0, n=n)
        runs = self.waiting_clis(4)
        daemon.kill()
        daemon.wait()
        wait_until(lambda: not any(pid_alive(r["pid"]) for r in runs), timeout=10)
        wait_until(lambda: self.run_dirs() == [], timeout=10)
        self.assertEqual(self.pending_rows(), 4, "the dead daemon could not settle them")
        daemon, port = self.start_daemon()
        self.assertEqual(self.pending_rows(), 0)
        daemon.terminate()
        self.assertEqual(daemon.wait(timeout=15), 0)

    @unittest.skipUnless(os.path.isdir("/proc/self"), "finds the keeper through /proc")
    def test_a_restart_ends_clis_whose_keeper_died_too(self):
        daemon, port = self.start_daemon(CLAUDE_MAX_CONCURRENT="4")
        for n in range(3):
            self.hang(port, n=n)
        runs = self.waiting_clis(3)
        keepers = [pid for pid in children_of(daemon.pid) if pid not in {r["pid"] for r in runs}]
        self.assertEqual(len(keepers), 1, keepers)
        os.kill(keepers[0], signal.SIGKILL)  # the OOM killer took both
        daemon.kill()
        daemon.wait()
        self.assertTrue(all(pid_alive(r["pid"]) for r in runs), "orphans, as before this fix")
        daemon, port = self.start_daemon()
        wait_until(lambda: not any(pid_alive(r["pid"]) for r in runs), timeout=10)
        self.assertEqual(self.run_dirs(), [])
        daemon.terminate()
        self.assertEqual(daemon.wait(timeout=15), 0)


@stress
class DaemonShutdown(Daemon):
    def test_sigterm_under_load_refuses_the_queue_and_leaves_nothing(self):
        daemon, port = self.start_daemon(CLAUDE_MAX_CONCURRENT="8", CLAUDE_MAX_QUEUE="8")
        running = [self.hang(port, stream=n % 2 == 0, n=n) for n in range(8)]
        runs = self.waiting_clis(8)
        queued = [self.hang(port, stream=n % 2 == 0, n=100 + n) for n in range(6)]
        wait_until(lambda: daemon_status(port).get("queued") == 6)
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        self.assertEqual(daemon.wait(timeout=20), 0)
        self.assertLess(time.monotonic() - started, 12)
        self.assertEqual(len(self.runs()), 8, "no queued request started a CLI")
        self.assertFalse([r["pid"] for r in runs if pid_alive(r["pid"])])
        for sock in running + queued:
            response = sock.makefile("rb").read()
            self.assertTrue(response, "every client got an answer")
            if b"text/event-stream" in response:
                self.assertIn(b'"code": "shutting_down"', response)
                self.assertTrue(response.rstrip().endswith(b"data: [DONE]"))
            else:
                self.assertIn(b" 503 ", response.split(b"\r\n")[0])
                self.assertIn(b'"code": "shutting_down"', response)
        self.assertEqual(self.run_dirs(), [])
        self.assertEqual(self.pending_rows(), 0)
        self.assertFalse(connectable(port))


@stress
class DaemonWithPool(Daemon):
    """Pooled CLIs (warm spares, held conversations) belong to the daemon: they end with it."""

    def pooled(self, port, count):
        """Ask `count` conversations; wait until the pool holds them and a spare (their pids)."""
        for n in range(count):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            conn.request("POST", "/v1/chat/completions", json.dumps(
                {"model": "sonnet", "messages": [{"role": "user", "content": f"hello {n}"}]}))
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
        return wait_until(lambda: [r["pid"] for r in self.runs() if pid_alive(r["pid"])]
                          if len([r for r in self.runs() if pid_alive(r["pid"])]) >= 2 else None, timeout=10)

    def test_sigterm_ends_every_pooled_cli(self):
        daemon, port = self.start_daemon(OCP_POOL="1", OCP_POOL_SPARE_AFTER="1")
        pids = self.pooled(port, 2)
        daemon.send_signal(signal.SIGTERM)
        self.assertEqual(daemon.wait(timeout=20), 0)
        self.assertFalse([pid for pid in pids if pid_alive(pid)])
        self.assertFalse([r["pid"] for r in self.runs() if pid_alive(r["pid"])])
        self.assertEqual(self.run_dirs(), [])

    def test_kill_9_ends_every_pooled_cli(self):
        daemon, port = self.start_daemon(OCP_POOL="1", OCP_POOL_SPARE_AFTER="1")
        pids = self.pooled(port, 2)
        daemon.kill()
        daemon.wait()
        wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout=10)
        wait_until(lambda: self.run_dirs() == [], timeout=10)


def daemon_status(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": "Bearer " + ADMIN})
        text = conn.getresponse().read().decode()
    except OSError:
        return {}
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith("ocp_queued "):
            return {"queued": int(float(line.split()[1]))}
    return {}


if __name__ == "__main__":
    unittest.main()
