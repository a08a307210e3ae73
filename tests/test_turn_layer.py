"""The seams of the turn layer: CLI leases that outlive one exchange, and wire formats plugged
into a route without touching the Turn or the runner."""

import json
import socket
import threading
import time
from unittest import mock

import ocp
from helpers import ServerTest, directive, pid_alive, wait_until


def drain(iterator):
    """Run a generator that yields while it waits (a slot, a heartbeat) to its end."""
    return [item for item in iterator]


class Leases(ServerTest):
    env = {"CLAUDE_MAX_CONCURRENT": "1"}

    def lease(self, request_id="lease-test", cancelled=lambda: False):
        job = ocp.Job("claude-sonnet-5-5", "sys", (), request_id=request_id, owner="tests")
        return self.server.runner.lease(job, cancelled)

    def exchange(self, lease, text):
        """One exchange; return its events (heartbeats left out)."""
        return [e for e in lease.exchange(({"type": "text", "text": text},)) if e is not ocp.HEARTBEAT]

    def test_one_process_carries_two_exchanges_each_read_until_its_result(self):
        lease = self.lease()
        drain(lease.acquire())
        first = self.exchange(lease, "first")
        self.assertEqual(first[-1]["type"], "result")  # it stops at the result: the CLI still runs
        self.assertEqual(first[-1]["result"], "Echo: first")
        self.assertTrue(pid_alive(lease.proc.pid))
        self.assertIsNone(lease.proc.popen.poll())
        second = self.exchange(lease, "second")
        self.assertEqual(second[-1]["result"], "Echo: second")
        self.assertEqual([e["type"] for e in second].count("result"), 1)
        pid = lease.proc.pid
        self.assertTrue(lease.release())
        self.assertFalse(lease.release())  # exactly once
        self.assertFalse(lease.kill())
        self.assertEqual(lease.proc.popen.returncode, 0)  # stdin closed: it exited by itself
        run = self.runs()[-1]
        self.assertEqual((run["pid"], run["turns"], run["ended"]), (pid, 2, "exit 0"))
        self.assertEqual(self.server.runner.live(), [])
        self.assertEqual(self.server.runner.slots.snapshot()["running"], 0)

    def test_a_parked_process_gives_its_slot_to_the_next_request(self):
        lease = self.lease()
        drain(lease.acquire())
        self.exchange(lease, "round one")
        lease.park()
        self.assertEqual(self.server.runner.slots.snapshot()["running"], 0)
        status, _, body = self.chat("meanwhile")  # the only slot serves someone else
        self.assertEqual((status, body["choices"][0]["message"]["content"]), (200, "Echo: meanwhile"))
        drain(lease.resume())
        self.assertEqual(self.exchange(lease, "round two")[-1]["result"], "Echo: round two")
        lease.release()
        self.assertEqual(self.server.runner.slots.snapshot()["running"], 0)

    def test_control_requests_are_answered_on_stdin(self):
        lease = self.lease()
        drain(lease.acquire())
        events = self.exchange(lease, "x " + directive(control="can_use_tool"))
        self.assertNotIn("control_request", [e["type"] for e in events])  # routed, not forwarded
        lease.release()
        responses = self.runs()[-1]["control_responses"]
        self.assertEqual(responses, [{"type": "control_response", "response": {
            "subtype": "error", "request_id": "req_fake_1", "error": "unsupported"}}])

    def test_a_custom_control_handler_gets_them(self):
        seen = []

        def handler(proc, event):
            seen.append(event["request"]["subtype"])
            proc.send(ocp.control_response(event["request_id"], {"ok": True}))

        job = ocp.Job("claude-sonnet-5-5", "sys", (), request_id="ctl", owner="tests")
        lease = self.server.runner.lease(job, on_control=handler)
        drain(lease.acquire())
        self.exchange(lease, "x " + directive(control="mcp_message"))
        lease.release()
        self.assertEqual(seen, ["mcp_message"])
        self.assertEqual(self.runs()[-1]["control_responses"][0]["response"]["response"], {"ok": True})

    def test_a_cancelled_lease_raises_and_its_process_is_killed(self):
        lease = self.lease()
        drain(lease.acquire())
        threading.Timer(0.3, lease.cancel, args=("client",)).start()
        with self.assertRaises(ocp.ClientGone):
            self.exchange(lease, "x " + directive(hang=True, ignore_term=True))
        self.server.runner.kill_grace_s = lease.proc.grace_s = 0.2
        pid = lease.proc.pid
        self.assertTrue(lease.kill())
        self.assertFalse(pid_alive(pid))

    def test_a_lease_given_up_while_queued_ends_once_without_a_process(self):
        holder = self.lease("holder")
        drain(holder.acquire())
        gone = threading.Event()
        waiter = self.lease("waiter", cancelled=gone.is_set)
        threading.Timer(0.3, gone.set).start()
        with self.assertRaises(ocp.ClientGone):
            drain(waiter.acquire())
        self.assertIsNone(waiter.proc)
        self.assertTrue(waiter.kill())
        holder.release()
        runner = self.server.runner
        self.assertEqual((runner.leases_made, runner.leases_ended), (2, 2))
        self.assertEqual(runner.slots.snapshot(), {"running": 0, "queued": 0, "limit": 1})

    def test_every_lease_of_every_kind_of_request_ends_exactly_once(self):
        cases = [directive(text="ok"), directive(error="overloaded"), directive(crash=3),
                 directive(text="abcdef", deltas=3), directive(error="plan_limit")]
        for text in cases[:4]:
            self.chat("x " + text)
        self.chat("x " + directive(text="cut here STOP and not this"), stop=["STOP"])
        self.chat("x " + directive(text="a" * 400), max_tokens=5)
        self.stream("x " + directive(text="streamed", deltas=4))
        self.chat('x ' + directive(texts=["nope", '{"a": 1}']), response_format={"type": "json_object"})
        sock = self.open_raw({"model": "sonnet", "messages": [{"role": "user", "content": "x " + directive(hang=True)}]})
        wait_until(lambda: self.server.runner.live())
        sock.close()
        runner = self.server.runner
        wait_until(lambda: runner.leases_made == runner.leases_ended and not runner.live())
        self.assertEqual(runner.leases_made, 10)
        self.assertEqual(runner.slots.snapshot()["running"], 0)


class LeaseInvariants(ServerTest):
    """A lease's life cannot be got wrong: it resumes only while it lives, and a slot it took
    comes back whatever state it is in."""

    env = {"CLAUDE_MAX_CONCURRENT": "1"}

    def lease(self, request_id="inv", cancelled=lambda: False):
        job = ocp.Job("claude-sonnet-5-5", "sys", (), request_id=request_id, owner="tests")
        return self.server.runner.lease(job, cancelled)

    def test_an_ended_lease_cannot_be_resumed(self):
        lease = self.lease()
        drain(lease.acquire())
        lease.park()
        self.assertTrue(lease.kill())
        with self.assertRaises(ocp.LeaseEnded):
            drain(lease.resume())
        self.assertEqual(self.server.runner.slots.snapshot()["running"], 0)
        self.assertEqual(self.server.runner.slots.leaked(), 0)

    def test_a_released_lease_cannot_be_resumed_either(self):
        lease = self.lease()
        drain(lease.acquire())
        lease.release()
        with self.assertRaises(ocp.LeaseEnded):
            drain(lease.resume())
        self.assertEqual(self.server.runner.slots.snapshot()["running"], 0)

    def test_a_slot_taken_by_an_ended_lease_is_given_back_when_it_ends_again(self):
        lease = self.lease()
        drain(lease.acquire())
        lease.ended = "killed"  # a path that marked it ended without retiring it (the old bug's state)
        self.assertEqual(self.server.runner.slots.leaked(), 1)
        self.assertEqual(self.server.health()["status"], "degraded")
        self.assertIn("1 CLI slot", self.server.health()["reason"])
        self.assertFalse(lease.kill())  # already ended: but the slot comes back
        self.assertEqual(self.server.runner.slots.snapshot()["running"], 0)
        self.assertEqual(self.server.health()["status"], "ok")
        lease.proc.close()

    def test_a_lease_ended_while_it_waits_in_line_gives_back_the_slot_it_is_handed(self):
        holder = self.lease("holder")
        drain(holder.acquire())
        waiter = self.lease("waiter")
        errors = []

        def wait():
            try:
                drain(waiter.acquire())
            except ocp.LeaseEnded as e:
                errors.append(e)
        thread = threading.Thread(target=wait)
        thread.start()
        wait_until(lambda: self.server.runner.slots.snapshot()["queued"] == 1)
        waiter.kill()  # e.g. shutdown or DELETE /sessions while it waits
        holder.release()  # the slot is handed to the waiter, which has ended
        thread.join(5)
        self.assertEqual(len(errors), 1)
        self.assertEqual(self.server.runner.slots.snapshot(), {"running": 0, "queued": 0, "limit": 1})

    def test_releasing_a_slot_twice_gives_back_one(self):
        slots = ocp.Slots(2, 2)
        a, b = object(), object()
        for holder in (a, b):
            drain(slots.waiting(time.monotonic() + 5, lambda: False, holder=holder))
        self.assertTrue(slots.release(a))
        self.assertFalse(slots.release(a))
        self.assertEqual(slots.snapshot()["running"], 1)
        self.assertTrue(slots.release(b))
        self.assertEqual(slots.snapshot()["running"], 0)


class PlainText(ocp.Encoder):
    """A wire format of the test's own: the answer as text/plain, errors as 'error: …' lines."""

    @staticmethod
    def error_body(error, request_id=""):
        return {"plain_error": error.message}

    def write(self, kind, value):
        if kind == ocp.TEXT:
            self.parts = getattr(self, "parts", []) + [value]
        elif kind == ocp.DONE:
            if value.error is not None:
                raise value.error
            self.settle(value)
            text = "".join(getattr(self, "parts", [])) + f"\n[{value.finish}, {value.usage.output} tokens]"
            self.out.send_body(200, text.encode(), "text/plain; charset=utf-8")


class NamedEvents(ocp.EventStream):
    """A streamed format of the test's own, with named SSE events and its own heartbeat."""

    heartbeat_frame = b"event: ping\ndata: {}\n\n"
    error_body = staticmethod(PlainText.error_body)

    def opening(self):
        self.frame({"model": self.request.model.id}, "start")

    def write(self, kind, value):
        if kind == ocp.TEXT:
            self.start()
            self.frame({"text": value}, "delta")
        elif kind == ocp.PING:
            self.heartbeat()
        elif kind == ocp.DONE:
            if value.error is not None:
                return self.fail(value)
            self.settle(value)
            self.frame({"finish": value.finish}, "done")

    def error_frames(self, error):
        self.frame(self.error_body(error), "error")


def parse_plain(body, models, config):
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        raise ocp.bad_request("send {\"prompt\": \"...\"}", "prompt")
    return ocp.TurnRequest(model=models.resolve(body.get("model", "sonnet"), config.default_model),
                           turns=({"role": "user", "content": [{"type": "text", "text": body["prompt"]}]},),
                           stream=body.get("stream") is True)


class PluggedEncoder(ServerTest):
    def setUp(self):
        super().setUp()
        self.server.turn_routes["/v1/plain"] = ocp.TurnRoute(parse_plain, PlainText, NamedEvents)

    def test_a_wire_format_plugs_into_a_route(self):
        status, headers, body = self.request("POST", "/v1/plain",
                                             {"prompt": "hi " + directive(text="Hello there", deltas=3)})
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "text/plain; charset=utf-8")
        self.assertEqual(body, "Hello there\n[end_turn, 2 tokens]")
        rows = self.server.store.usage_rows(None, None, 0, int(time.time()) + 10, 10)
        self.assertEqual([(r["status"], r["completion_tokens"]) for r in rows], [("ok", 2)])

    def test_its_errors_come_in_its_own_shape(self):
        status, _, body = self.request("POST", "/v1/plain", {"nothing": 1})
        self.assertEqual((status, body), (400, {"plain_error": 'send {"prompt": "..."}'}))
        status, _, body = self.request("POST", "/v1/plain", {"prompt": "x " + directive(error="overloaded")})
        self.assertEqual(status, 502)
        self.assertIn("overloaded", body["plain_error"])
        status, headers, _ = self.request("GET", "/v1/plain")
        self.assertEqual((status, headers["Allow"]), (405, "POST"))

    def test_a_streamed_format_names_its_events(self):
        status, headers, body = self.request("POST", "/v1/plain", {"stream": True, "prompt": "hi " + directive(
            text="abcdef", deltas=2, pace_ms=150)}, )
        self.assertEqual((status, headers["Content-Type"]), (200, "text/event-stream; charset=utf-8"))
        self.assertEqual(body, 'event: start\ndata: {"model": "claude-sonnet-5-5"}\n\n'
                               'event: delta\ndata: {"text": "abc"}\n\n'
                               'event: delta\ndata: {"text": "def"}\n\n'
                               'event: done\ndata: {"finish": "end_turn"}\n\n')

    def test_its_heartbeat_and_in_band_error(self):
        self.server.config = ocp.dataclasses.replace(self.server.config, heartbeat_ms=100)
        self.server.runner.apply(self.server.config)
        status, _, body = self.request("POST", "/v1/plain", {"stream": True, "prompt": "hi " + directive(
            slow_start_ms=350, error="overloaded")})
        self.assertEqual(status, 200)
        self.assertIn("event: ping\ndata: {}\n\n", body)
        self.assertTrue(body.endswith('"}\n\n') and "event: error\ndata: {\"plain_error\": " in body, body)


class SafeByConstruction(ServerTest):
    """A route nobody declared otherwise is the admin's; a streaming encoder that says nothing
    about delivery still has its hang-ups billed right."""

    ADMIN = "ocp_admin_key_for_the_turn_layer_00"
    env = {"CLAUDE_AUTH_MODE": "multi", "OCP_ADMIN_KEY": ADMIN}

    def test_a_new_route_is_admin_only_unless_declared(self):
        _, member = self.server.store.add_key("member", ocp.KeyPolicy(), time.time())
        answered = lambda h: h.send_json(200, {"ok": True})
        routes = {("GET", "/test/undeclared"): ocp.Route(answered),
                  ("GET", "/test/keyed"): ocp.Route(answered, ocp.KEYED),
                  ("GET", "/test/public"): ocp.Route(answered, ocp.PUBLIC)}
        with mock.patch.dict(ocp.ROUTES, routes):
            def status(path, key=None):
                return self.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})[0]
            self.assertEqual([status("/test/undeclared"), status("/test/undeclared", member),
                              status("/test/undeclared", self.ADMIN)], [401, 403, 200])
            self.assertEqual([status("/test/keyed"), status("/test/keyed", member)], [401, 200])
            self.assertEqual(status("/test/public"), 200)

    def test_every_admin_route_refuses_a_member_before_it_runs(self):
        _, member = self.server.store.add_key("member", ocp.KeyPolicy(), time.time())
        for (method, pattern), route in ocp.ROUTES.items():
            if route.access != "admin":
                continue
            with self.subTest(f"{method} {pattern}"):
                path = pattern.replace("*", "1")
                status, _, body = self.request(method, path, {} if method in ("POST", "PATCH") else None,
                                               headers={"Authorization": f"Bearer {member}"})
                self.assertEqual((status, body["error"]["code"]), (403, "admin_required"))
        self.assertIsNone(self.server.store.find_key("member").revoked_at, "nothing ran: the key was not revoked")

    def test_a_plugged_stream_that_leaves_mid_answer_is_billed_as_partial(self):
        self.server.turn_routes["/v1/plain"] = ocp.TurnRoute(parse_plain, PlainText, NamedEvents)
        data = json.dumps({"stream": True, "prompt": "hi " + directive(text="a" * 60, deltas=30, pace_ms=40)}).encode()
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.sendall(b"POST /v1/plain HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + self.ADMIN.encode()
                     + b"\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        received = b""
        while b"event: delta" not in received:
            received += sock.recv(4096)
        sock.close()
        wait_until(lambda: self.server.store.usage_rows(None, None, 0, 2 ** 40, 10)
                   and self.server.store.usage_rows(None, None, 0, 2 ** 40, 10)[0]["status"] != "pending")
        (row,) = self.server.store.usage_rows(None, None, 0, 2 ** 40, 10)
        self.assertEqual(row["status"], "partial", "the answer had begun to arrive")
