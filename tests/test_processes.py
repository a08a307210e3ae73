"""CLI process lifetime under load: hang-ups, timeouts, the queue, shutdown."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
import unittest
import weakref

import ocp
from helpers import ServerTest, TempHome, directive, pid_alive, wait_until

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

    def test_a_client_that_sent_more_than_its_body_is_still_seen_leaving(self):
        extras = {"a trailing CRLF": b"\r\n", "a pipelined request": b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"}
        for name, extra in extras.items():
            for stream in (False, True):
                with self.subTest(name, stream=stream):
                    before = len(self.runs())
                    sock = self.open_raw(dict(HANG, stream=stream))
                    sock.sendall(extra)
                    run = wait_until(lambda: len(self.runs()) > before and self.runs()[-1])
                    sock.close()
                    wait_until(lambda: not pid_alive(run["pid"]), timeout=5)

    def test_a_process_ignoring_sigterm_is_killed(self):
        self.server.runner.kill_grace_s = 0.3
        sock = self.open_raw({"model": "opus", "messages": [
            {"role": "user", "content": "x " + directive(hang=True, ignore_term=True)}]})
        run = started_runs(self, 1)[0]
        sock.close()
        wait_until(lambda: not pid_alive(run["pid"]), timeout=5)


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
        queued = self.open_raw(dict(HANG, stream=True, messages=[{"role": "user", "content": "queued"}]))
        reader = queued.makefile("rb")
        self.addCleanup(reader.close)
        self.assertIn(b" 200 ", reader.readline())
        lines = []
        while lines.count(b": keepalive\n") < 3:  # several heartbeat intervals spent in the line
            lines.append(reader.readline())
            self.assertNotIn(b"Echo", lines[-1])
        self.assertEqual(self.server.runner.slots.snapshot()["queued"], 1)
        first.close()
        rest = b"".join(iter(reader.readline, b""))
        deltas = [json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                  for line in rest.split(b"\n") if line.startswith(b"data: {")]
        self.assertEqual("".join(deltas), "Echo: queued")
        self.assertTrue(rest.rstrip().endswith(b"data: [DONE]"))


class SlowAndIdleClients(ServerTest):
    env = {"OCP_SOCKET_TIMEOUT": "1"}

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


class AnsweredBeforeTheCliExits(ServerTest):
    """The answer goes out when the CLI's result is in; its exit (~50 ms for the real CLI) is
    waited for off the request's path, and its slot is kept until then."""

    env = {"CLAUDE_MAX_CONCURRENT": "1", "CLAUDE_MAX_QUEUE": "0"}
    SLOW_EXIT = directive(exit_after_ms=600)

    def test_the_answer_goes_out_while_the_cli_exits(self):
        status, _, body = self.chat("hi " + self.SLOW_EXIT)
        self.assertEqual((status, body["choices"][0]["finish_reason"]), (200, "stop"))
        run = TempHome.runs(self)[-1]  # (as it is now, not waiting for the reap)
        self.assertTrue(pid_alive(run["pid"]), "answered while its CLI was still exiting")
        self.assertEqual(self.server.runner.slots.snapshot()["running"], 1, "its slot is kept until it exits")
        self.assertEqual(self.server.health(admin=True)["status"], "ok", "a CLI that is exiting is no leaked slot")
        self.settle()
        self.assertEqual((pid_alive(run["pid"]), self.runs()[-1]["ended"]), (False, "exit 0"))
        self.assertEqual(self.server.runner.slots.snapshot()["running"], 0)
        self.assertFalse([n for n in os.listdir(os.path.join(self.ocp_home, "spawn")) if n.startswith("run-")])

    def test_a_stream_ends_while_the_cli_exits(self):
        status, _, events = self.stream("hi " + self.SLOW_EXIT)
        self.assertEqual((status, events[-1][1]), (200, "[DONE]"))
        self.assertTrue(pid_alive(TempHome.runs(self)[-1]["pid"]))

    def test_asking_again_at_once_waits_for_the_exiting_cli_not_refused(self):
        """CLAUDE_MAX_QUEUE=0 and one slot: the next request waits for the slot of a CLI that has
        answered and is only exiting, rather than a 429 for a line that is full."""
        self.assertEqual(self.chat("one " + self.SLOW_EXIT)[0], 200)
        status, _, body = self.chat("two")
        self.assertEqual(status, 200, body)
        self.assertEqual(self.runs()[0]["ended"], "exit 0")


class SlotsWhileTheCliExits(unittest.TestCase):
    def test_a_finishing_holder_lets_one_more_wait_and_is_no_leak(self):
        slots, first = ocp.Slots(1, 0), types.SimpleNamespace(ended="")
        for _ in slots.waiting(time.monotonic() + 5, lambda: False, holder=first):
            pass
        with self.assertRaises(ocp.ApiError):  # the line is 0 long: a busy slot refuses
            for _ in slots.waiting(time.monotonic() + 5, lambda: False):
                pass
        first.ended = "released"
        self.assertEqual(slots.leaked(), 1, "an ended holder keeping its slot")
        slots.finishing(first)
        self.assertEqual(slots.leaked(), 0, "one being reaped is no leak")
        second = types.SimpleNamespace(ended="")
        waiter = slots.waiting(time.monotonic() + 5, lambda: False, tick_s=0.05, holder=second)
        next(waiter)  # in line, although the line is 0 long
        self.assertEqual(slots.snapshot()["queued"], 1)
        slots.release(first)
        self.assertEqual(list(waiter), [])
        self.assertEqual(slots.snapshot(), {"running": 1, "queued": 0, "limit": 1})
        with self.assertRaises(ocp.ApiError):  # nothing is finishing now: refused again
            for _ in slots.waiting(time.monotonic() + 5, lambda: False):
                pass


class Task:
    """Something a task holds (a lease, a socket): weakly referable."""


class KeptWorkerThreads(unittest.TestCase):
    def test_an_idle_worker_takes_the_next_task_and_a_busy_one_never_delays_it(self):
        workers = ocp.Workers("test-worker", idle_max=1, idle_s=5)
        ran, gate = [], threading.Event()
        workers.run(lambda: ran.append(threading.get_ident()))
        wait_until(lambda: ran and workers.idle() == 1)
        workers.run(gate.wait, 10)  # the idle worker takes it and is busy now
        wait_until(lambda: workers.idle() == 0)
        workers.run(lambda: ran.append(threading.get_ident()))  # no idle worker: a new thread, at once
        wait_until(lambda: len(ran) == 2)
        self.assertNotEqual(ran[0], ran[1])
        gate.set()
        wait_until(lambda: workers.idle() == 1)  # one stays (idle_max), the other ends

    def test_a_failing_task_is_logged_and_the_worker_goes_on(self):
        workers = ocp.Workers("test-worker", idle_max=1, idle_s=5)
        with self.assertLogs("ocp", "ERROR"):
            workers.run(lambda: 1 / 0)
            wait_until(lambda: workers.idle() == 1)
        done = threading.Event()
        workers.run(done.set)
        self.assertTrue(done.wait(5))

    def test_an_idle_worker_keeps_nothing_of_its_last_task(self):
        workers, task = ocp.Workers("test-worker", idle_max=1, idle_s=5), Task()
        gone = threading.Event()
        weakref.finalize(task, gone.set)
        workers.run(lambda t: None, task)
        wait_until(lambda: workers.idle() == 1)
        del task
        self.assertTrue(gone.wait(5), "the idle worker still held its last task's argument")

    def test_an_idle_worker_ends_after_idle_s(self):
        workers = ocp.Workers("test-worker", idle_max=4, idle_s=0.1)
        workers.run(lambda: None)
        wait_until(lambda: workers.idle() == 1)
        wait_until(lambda: workers.idle() == 0)


class RunDirectoriesAndUsage(TempHome):
    def test_a_run_directory_goes_whatever_the_cli_left_in_it(self):
        for left in ((), ("tmp/image.png",), ("tmp/deep/er/file",)):
            path = os.path.join(self.tmp, "run-x")
            os.makedirs(os.path.join(path, "tmp"))
            for name in ("child", "system-prompt.txt") + left:
                os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
                open(os.path.join(path, name), "w").close()
            ocp.remove_run_dir(path)
            self.assertFalse(os.path.exists(path), left)
        ocp.remove_run_dir(os.path.join(self.tmp, "never-made"))  # (no error)

    def test_usage_adds_every_field(self):
        names = [f.name for f in dataclasses.fields(ocp.Usage)]
        one = ocp.Usage(*range(1, len(names) + 1))
        self.assertEqual(dataclasses.astuple(one + one), tuple(2 * n for n in range(1, len(names) + 1)))


class HangupWatch(unittest.TestCase):
    def test_a_close_is_seen_for_a_watched_socket_only_even_on_a_reused_fd(self):
        hangups, seen = ocp.Hangups(), []
        first, first_peer = socket.socketpair()
        with hangups.watch(first, lambda: seen.append("first")):
            pass
        fd = first.fileno()
        first.close()
        first_peer.close()
        second, second_peer = socket.socketpair()  # likely the same fd number again
        self.addCleanup(second.close)
        with hangups.watch(second, lambda: seen.append(("second", second.fileno() == fd))):
            second_peer.close()
            wait_until(lambda: seen)
        self.assertEqual([s[0] for s in seen], ["second"])


class SlotsAtShutdown(unittest.TestCase):
    def test_closing_refuses_the_waiters_and_keeps_the_count(self):
        slots = ocp.Slots(1, 5)
        for _ in slots.waiting(time.monotonic() + 5, lambda: False):
            pass
        errors = []

        def wait_in_line():
            try:
                for _ in slots.waiting(time.monotonic() + 5, lambda: False):
                    pass
            except ocp.ApiError as e:
                errors.append(e.code)
        threads = [threading.Thread(target=wait_in_line) for _ in range(3)]
        for thread in threads:
            thread.start()
        wait_until(lambda: slots.snapshot()["queued"] == 3)
        self.assertEqual(slots.close(), 3)
        for thread in threads:
            thread.join(5)
        self.assertEqual(errors, ["shutting_down"] * 3)
        slots.release()
        self.assertEqual(slots.snapshot(), {"running": 0, "queued": 0, "limit": 1})
        with self.assertRaises(ocp.ApiError):
            for _ in slots.waiting(time.monotonic() + 5, lambda: False):
                pass


class SlotsWhenAWaiterStops(unittest.TestCase):
    def test_a_waiter_closed_while_it_waits_leaves_the_line(self):
        slots = ocp.Slots(1, 5)
        for _ in slots.waiting(time.monotonic() + 5, lambda: False):
            pass
        waiter = slots.waiting(time.monotonic() + 5, lambda: False, tick_s=0.05)
        next(waiter)  # in line, between two heartbeats
        self.assertEqual(slots.snapshot()["queued"], 1)
        waiter.close()  # its request left while a heartbeat was being written
        self.assertEqual(slots.snapshot(), {"running": 1, "queued": 0, "limit": 1})
        slots.release()
        self.assertEqual(slots.snapshot()["running"], 0)  # not handed to the one that left

    def test_a_slot_handed_to_a_waiter_that_stops_is_passed_on(self):
        slots = ocp.Slots(1, 5)
        for _ in slots.waiting(time.monotonic() + 5, lambda: False):
            pass
        waiter = slots.waiting(time.monotonic() + 5, lambda: False, tick_s=0.05)
        next(waiter)
        slots.release()  # handed over to the waiter while it is suspended
        waiter.close()
        self.assertEqual(slots.snapshot(), {"running": 0, "queued": 0, "limit": 1})


class LeftoversFromADeadDaemon(TempHome):
    """A run directory a dead daemon left names its CLI; a restart ends that process only."""

    def leftover(self, identity=None):
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        self.addCleanup(sleeper.wait)
        self.addCleanup(lambda: sleeper.poll() is None and sleeper.kill())
        run_dir = os.path.join(self.tmp, "run-x")
        os.makedirs(run_dir, exist_ok=True)
        real = ocp.process_identity(sleeper.pid)
        self.assertTrue(real)
        with open(os.path.join(run_dir, "child"), "w") as f:
            f.write(f"{sleeper.pid} {sleeper.pid} {real if identity is None else identity}")
        return sleeper, run_dir

    def test_the_very_process_is_ended(self):
        sleeper, run_dir = self.leftover()
        self.assertTrue(ocp.end_leftover(run_dir))
        self.assertEqual(sleeper.wait(timeout=5), -9)

    def test_a_reused_pid_is_left_alone(self):
        sleeper, run_dir = self.leftover(identity="start:12345")  # the pid now belongs to another process
        self.assertFalse(ocp.end_leftover(run_dir))
        self.assertIsNone(sleeper.poll())

    def test_the_keeper_ends_what_it_was_told_of_when_its_pipe_closes(self):
        sleeper, run_dir = self.leftover()
        keeper = ocp.Keeper()
        keeper.claim(run_dir)
        keeper.add(sleeper.pid)
        keeper._popen.stdin.close()  # as when OCP dies: the pipe's write end goes away
        self.assertEqual(sleeper.wait(timeout=10), -15)
        keeper._popen.wait(timeout=10)
        wait_until(lambda: not os.path.exists(run_dir))

    def test_a_reaped_run_whose_directory_was_not_removed_yet_leaves_none(self):
        """kill -9 between reaping a CLI and the sweeper removing its directory (or between making
        the directory and starting the CLI): the keeper still removes it; one let go it leaves be."""
        keeper = ocp.Keeper()
        pending, let_go = os.path.join(self.tmp, "run-pending"), os.path.join(self.tmp, "run-let-go")
        for path in (pending, let_go):
            keeper.claim(path)
            os.makedirs(os.path.join(path, "tmp"))
        keeper.let_go(let_go)  # as if removed, then a new run took the same name without telling
        keeper._popen.stdin.close()
        keeper._popen.wait(timeout=10)
        self.assertFalse(os.path.exists(pending))
        self.assertTrue(os.path.exists(let_go))

    def test_a_run_directory_is_claimed_before_it_exists_and_let_go_once_removed(self):
        runner = ocp.Runner(ocp.Config(home=self.tmp))
        told = []
        runner.keeper._tell = told.append
        os.makedirs(runner.config.spawn_dir, exist_ok=True)
        path = runner.make_run_dir("chatcmpl-1")
        self.assertEqual(told, ["d" + path])
        self.assertTrue(os.path.isdir(os.path.join(path, "tmp")))
        runner.sweeper.remove(path)
        runner.sweeper.drain()
        self.assertEqual(told, ["d" + path, "x" + path])
        self.assertFalse(os.path.exists(path))


if __name__ == "__main__":
    unittest.main()
