"""CLI process lifetime under load: hang-ups, timeouts, the queue, shutdown."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

from helpers import ROOT, ServerTest, TempHome, connectable, content_of, directive, free_port, pid_alive, wait_until

HANG = {"model": "sonnet", "messages": [{"role": "user", "content": "x " + directive(hang=True)}]}


def started_runs(test, count):
    return wait_until(lambda: len(test.runs()) >= count and test.runs())


class ClientHangsUp(ServerTest):
    def test_streaming_client_disconnect_kills_the_process_group(self):
        body = dict(HANG, stream=True)
        body["messages"] = [{"role": "user", "content": "x " + directive(text="a" * 50, deltas=50,
                                                                         pace_ms=100, grandchild=True)}]
        sock = self.open_raw(body)
        sock.recv(200)  # the stream has started
        run = started_runs(self, 1)[0]
        wait_until(lambda: self.runs()[0].get("grandchild"))
        grandchild = self.runs()[0]["grandchild"]
        sock.close()
        wait_until(lambda: not pid_alive(run["pid"]) and not pid_alive(grandchild), timeout=5)
        wait_until(lambda: self.server.runner.slots.snapshot()["running"] == 0)

    def test_non_streaming_client_disconnect_kills_the_process(self):
        sock = self.open_raw(HANG)
        run = started_runs(self, 1)[0]
        sock.close()
        wait_until(lambda: not pid_alive(run["pid"]), timeout=5)
        self.assertEqual(self.runs()[0]["ended"], "sigterm")
        wait_until(lambda: self.server.runner.live() == [])

    def test_a_process_ignoring_sigterm_is_killed(self):
        self.server.runner.kill_grace_s = 0.3
        sock = self.open_raw({"model": "opus", "messages": [
            {"role": "user", "content": "x " + directive(hang=True, ignore_term=True)}]})
        run = started_runs(self, 1)[0]
        sock.close()
        wait_until(lambda: not pid_alive(run["pid"]), timeout=5)

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


class Timeout(ServerTest):
    env = {"CLAUDE_TIMEOUT": "1000"}

    def test_504_and_the_process_is_killed(self):
        started = time.monotonic()
        status, _, body = self.chat("x " + directive(hang=True))
        self.assertEqual((status, body["error"]["type"]), (504, "timeout"))
        self.assertLess(time.monotonic() - started, 8)
        wait_until(lambda: not pid_alive(self.runs()[0]["pid"]))

    def test_a_stream_that_already_started_gets_an_in_band_timeout(self):
        status, _, events = self.stream("x " + directive(text="abc" * 10, deltas=30, pace_ms=100))
        self.assertEqual(status, 200)
        self.assertEqual(events[-2][1]["error"]["code"], "timeout")
        self.assertEqual(events[-1][1], "[DONE]")


class Queue(ServerTest):
    env = {"CLAUDE_MAX_CONCURRENT": "1", "CLAUDE_MAX_QUEUE": "1", "OCP_QUEUE_TIMEOUT": "800"}

    def test_beyond_the_queue_is_429_with_retry_after(self):
        first = self.open_raw(HANG)
        started_runs(self, 1)
        second = self.open_raw(HANG)
        wait_until(lambda: self.server.runner.slots.snapshot()["queued"] == 1)
        status, headers, body = self.chat("third")
        self.assertEqual((status, body["error"]["code"]), (429, "queue_full"))
        self.assertIn("Retry-After", headers)
        first.close()
        second.close()

    def test_waiting_past_the_queue_deadline_is_429(self):
        first = self.open_raw(HANG)
        started_runs(self, 1)
        started = time.monotonic()
        status, _, body = self.chat("waits")
        self.assertEqual((status, body["error"]["code"]), (429, "queue_full"))
        self.assertGreater(time.monotonic() - started, 0.7)
        first.close()

    def test_a_queued_client_that_hangs_up_leaves_the_queue(self):
        first = self.open_raw(HANG)
        started_runs(self, 1)
        queued = self.open_raw(HANG)
        wait_until(lambda: self.server.runner.slots.snapshot()["queued"] == 1)
        queued.close()
        wait_until(lambda: self.server.runner.slots.snapshot()["queued"] == 0, timeout=3)
        first.close()
        wait_until(lambda: self.server.runner.slots.snapshot()["running"] == 0)
        self.assertEqual(self.chat("next")[0], 200)
        self.assertEqual(len(self.runs()), 2, "the hung-up request never ran")

    def test_slots_are_served_in_order(self):
        self.server.runner.slots.max_queue = 5
        order = []
        first = self.open_raw(HANG)
        started_runs(self, 1)

        def ask(n):
            order.append(self.chat(f"req {n}")[2]["choices"][0]["message"]["content"])

        threads = []
        for n in range(3):
            threads.append(threading.Thread(target=ask, args=(n,)))
            threads[-1].start()
            wait_until(lambda: self.server.runner.slots.snapshot()["queued"] == n + 1)
        first.close()
        for thread in threads:
            thread.join(10)
        self.assertEqual(order, ["Echo: req 0", "Echo: req 1", "Echo: req 2"])


class HeartbeatsInTheQueue(ServerTest):
    env = {"CLAUDE_MAX_CONCURRENT": "1", "CLAUDE_HEARTBEAT_INTERVAL": "100"}

    def test_a_queued_stream_gets_keepalives_before_its_first_token(self):
        first = self.open_raw(HANG)
        started_runs(self, 1)
        results = []
        thread = threading.Thread(target=lambda: results.append(self.stream("queued")))
        thread.start()
        wait_until(lambda: self.server.runner.slots.snapshot()["queued"] == 1)
        time.sleep(0.5)  # let the queued request wait through several heartbeat intervals
        first.close()
        thread.join(10)
        status, _, events = results[0]
        first_content = next(i for i, (_, e) in enumerate(events)
                             if isinstance(e, dict) and e["choices"] and e["choices"][0]["delta"].get("content"))
        self.assertGreaterEqual([e for _, e in events[:first_content]].count(": keepalive"), 3)
        self.assertEqual(content_of(events), "Echo: queued")


class SlowAndIdleClients(ServerTest):
    env = {"OCP_SOCKET_TIMEOUT": "2"}

    def test_idle_sockets_and_a_slow_body_do_not_block_others(self):
        idle = [socket.create_connection(("127.0.0.1", self.port)) for _ in range(200)]
        slow = socket.create_connection(("127.0.0.1", self.port))
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")
        started = time.monotonic()
        status, _, body = self.chat("still served")
        self.assertEqual(status, 200)
        self.assertLess(time.monotonic() - started, 2)
        # the idle ones are closed by the server after the socket timeout
        idle[0].settimeout(5)
        self.assertEqual(idle[0].recv(10), b"")
        for sock in idle + [slow]:
            sock.close()


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
