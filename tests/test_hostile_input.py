"""Hostile and broken input: body framing lies, a fuzz battery over every route, log forging.

Every request here must get a response below 500 in the route's own shape; none
may close the connection without answering or buffer a body past the cap.
"""

import concurrent.futures
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import unittest

import ocp
from helpers import ServerTest, wait_until

WRONG_VALUES = (None, True, False, 0, -1, 1.5, 10 ** 30, "", "x", "\u00b2", [], [1], ["x"], {}, {"a": 1},
                [{"a": 1}], "\ud800")
CHAT_FIELDS = ("model", "messages", "stream", "stream_options", "stop", "max_tokens", "max_completion_tokens",
               "reasoning_effort", "response_format", "user", "n", "tools", "tool_choice", "temperature",
               "top_p", "seed", "logprobs", "top_logprobs", "function_call", "functions", "presence_penalty")
MESSAGE_SHAPES = (
    5, "hi", [], None, [5], [{}], [{"role": "user"}], [{"role": "robot", "content": "x"}],
    [{"role": "user", "content": 5}], [{"role": "user", "content": [5]}],
    [{"role": "user", "content": [{"type": "video"}]}], [{"role": "user", "content": [{"type": "text"}]}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/html;base64,AAAA"}}]}],
    [{"role": "assistant", "content": "x", "tool_calls": 5}, {"role": "user", "content": "y"}],
    [{"role": "assistant", "content": "x", "tool_calls": [{"function": "f"}]}, {"role": "user", "content": "y"}],
    [{"role": "assistant", "content": None, "tool_calls": [5]}, {"role": "user", "content": "y"}],
    [{"role": "assistant", "tool_calls": [{"function": {"name": 5}}]}, {"role": "user", "content": "y"}],
    [{"role": "user", "content": "\ud800"}], [{"role": "user", "content": "a\u0000b\u2028c"}],
    [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "system", "content": "only a system message"}],
    [{"role": "user", "content": "x", "\ud800": 1}],
)
BAD_JSON = (b"", b" ", b"{", b"}", b"nul", b"[1,]", b'{"a":1}x', b'{"a":1,}', b"\xff\xfe{}", b"\xef\xbb\xbf{}",
            b'{"a": NaN}', b'{"a": Infinity}', b'{"a": 1e99999}', b'"string"', b"42", b"[]", b"null",
            b"[" * 100_000, b'{"a":' * 50_000, b"[" * 70 + b"]" * 70, b'{"\\ud800": 1}', b'"\\udfff"',
            b'{"model": "sonnet", "messages": "\\ud83d"}', "{\"a\": \"\u00e9\"}".encode("latin-1"),
            b'{"a": "\x00"}', b"\x00" * 64,
            b'{"model": "sonnet", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}')  # raw CESU surrogate


def raw_exchange(port, data, read_timeout=10.0):
    """Send raw bytes; return (status or None, response bytes). None means no response.

    Reads one response: to its Content-Length, or to the close for a stream.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=read_timeout)
    response = b""
    try:
        sock.sendall(data)
        while True:
            head, sep, body = response.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length: *([0-9]+)", head) if sep else None
            if length and len(body) >= int(length.group(1)):
                break
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            response += chunk
    except OSError:
        pass  # the server may refuse the rest of a hostile request: what it answered counts
    finally:
        sock.close()
    if not response.startswith(b"HTTP/1."):
        return None, response
    return int(response.split(b" ", 2)[1]), response


def post(path, body, headers=b""):
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n"
            + headers + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


ADMIN = "ocp_admin_key_for_tests_0000000000"


def responses_on_one_connection(port, data, quiet_s=0.2):
    """Send raw bytes; return every status line that comes back before the connection goes
    quiet (or closes)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    received = b""
    try:
        sock.sendall(data)
        sock.settimeout(quiet_s)
        while True:
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
    return re.findall(rb"HTTP/1\.1 (\d{3})", received)


class OneRequestOneResponse(ServerTest):
    """A body a route never reads is not the connection's next request (request smuggling)."""

    env = {"CLAUDE_AUTH_MODE": "multi", "OCP_ADMIN_KEY": ADMIN}
    SMUGGLED = b"GET /api/keys HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + ADMIN.encode() + b"\r\n\r\n"

    def test_no_route_answers_a_request_hidden_in_a_body(self):
        key = self.server.store.add_key("victim", ocp.KeyPolicy(), time.time())[0]
        routes = [("GET", "/health"), ("GET", "/v1/models"), ("HEAD", "/api/hello"), ("GET", "/dashboard/me"),
                  ("GET", "/usage"), ("GET", "/sessions"), ("DELETE", f"/api/keys/{key.id}"),
                  ("DELETE", "/cache"), ("GET", "/metrics"), ("GET", "/nowhere"), ("PUT", "/health")]
        answers = {}

        def send(method, path):  # (all at once: each waits its quiet time for a second response)
            head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN}\r\n"
                    f"Content-Length: {len(self.SMUGGLED)}\r\n\r\n").encode()
            answers[method, path] = responses_on_one_connection(self.port, head + self.SMUGGLED)
        threads = [threading.Thread(target=send, args=route) for route in routes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(len(answers), len(routes))
        for (method, path), statuses in answers.items():
            with self.subTest(f"{method} {path}"):
                self.assertEqual(len(statuses), 1, statuses)

    def test_a_chunked_body_on_a_get_is_no_request_either(self):
        chunk = b"%x\r\n" % len(self.SMUGGLED) + self.SMUGGLED + b"\r\n0\r\n\r\n"
        statuses = responses_on_one_connection(
            self.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk)
        self.assertEqual(statuses, [b"200"])

    def test_the_next_real_request_on_the_connection_is_still_answered(self):
        body = b'{"ignored": true}'
        statuses = responses_on_one_connection(
            self.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertEqual(statuses, [b"200", b"200"])

    def test_a_body_over_the_cap_closes_the_connection(self):
        self.server.config = dataclasses.replace(self.server.config, max_body_bytes=1000)
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n\r\n"
        statuses = responses_on_one_connection(self.port, head + self.SMUGGLED + b"x" * (5000 - len(self.SMUGGLED)))
        self.assertEqual(statuses, [b"200"])


class BodyFraming(ServerTest):
    env = {"OCP_MAX_BODY_BYTES": "65536"}

    def test_a_negative_chunk_size_is_refused_before_anything_is_buffered(self):
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"-ffffffffffffffff\r\n")
        status, response = raw_exchange(self.port, head + b"a" * 200_000)
        self.assertEqual(status, 400, response[:200])
        self.assertIn(b"chunk size", response)

    def test_chunks_past_the_cap_are_413(self):
        body = b"".join(b"8000\r\n" + b"a" * 0x8000 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
        status, _ = raw_exchange(self.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                            b"Transfer-Encoding: chunked\r\n\r\n" + body)
        self.assertEqual(status, 413)

    def test_length_lies(self):
        cases = {
            "two different lengths": (b"Content-Length: 2\r\nContent-Length: 3\r\n", b"{}", 400),
            "a superscript digit": ("Content-Length: \u00b2\r\n".encode("utf-8"), b"{}", 400),
            "a sign": (b"Content-Length: +2\r\n", b"{}", 400),
            "hex": (b"Content-Length: 0x2\r\n", b"{}", 400),
            "a gzip transfer coding": (b"Transfer-Encoding: gzip\r\n", b"{}", 400),
            "chunked and a length": (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"2\r\n{}\r\n0\r\n\r\n", 400),
            "a chunk longer than it says": (b"Transfer-Encoding: chunked\r\n", b"1\r\n{}\r\n0\r\n\r\n", 400),
            "a chunk size in words": (b"Transfer-Encoding: chunked\r\n", b"two\r\n{}\r\n0\r\n\r\n", 400),
        }
        for name, (headers, body, expected) in cases.items():
            with self.subTest(name):
                data = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n" + body)
                status, response = raw_exchange(self.port, data)
                self.assertEqual(status, expected, response[:300])
                self.assertIn(b'"error"', response)

    def test_two_equal_lengths_are_one_length(self):
        body = json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode()
        data = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\nContent-Length: %d\r\n"
                b"\r\n" % (len(body), len(body)) + body)
        status, response = raw_exchange(self.port, data)
        self.assertEqual(status, 400)
        self.assertIn(b"Unknown model", response)

    def test_a_body_has_one_deadline_however_it_is_chunked(self):
        self.server.body_timeout_s = 0.6
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        started = time.monotonic()
        response = b""
        while b"\r\n\r\n" not in response and time.monotonic() - started < 4:
            try:  # one byte a chunk, each well inside the socket timeout
                sock.sendall(b"1\r\na\r\n")
            except OSError:
                break
            sock.settimeout(0.15)
            try:
                response += sock.recv(4096)
            except socket.timeout:
                pass
        self.assertTrue(response.startswith(b"HTTP/1.1 408"), response[:100])
        self.assertLess(time.monotonic() - started, 2)


class SlowHeaders(ServerTest):
    env = {"OCP_SOCKET_TIMEOUT": "1"}

    def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_deadline(self):
        socks = [socket.create_connection(("127.0.0.1", self.port), timeout=5) for _ in range(10)]
        started = time.monotonic()
        for sock in socks:
            self.addCleanup(sock.close)
            sock.sendall(b"GET /health HTTP/1.1\r\n")
        cut = set()
        while len(cut) < len(socks) and time.monotonic() - started < 5:
            for n, sock in enumerate(socks):
                if n in cut:
                    continue
                try:
                    sock.sendall(b"X")  # each byte well inside the per-read timeout
                    sock.settimeout(0.01)
                    if sock.recv(4096) is not None:
                        cut.add(n)
                except socket.timeout:
                    pass
                except OSError:
                    cut.add(n)
            time.sleep(0.1)  # the attacker's pace, not synchronisation
        self.assertEqual(len(cut), len(socks))
        self.assertLess(time.monotonic() - started, 3)


class FuzzBattery(ServerTest):
    """At least 150 malformed requests over every route: none ≥ 500, none unanswered."""

    env = {"OCP_ADMIN_KEY": "ocp_fuzz-admin-key-0123456789abcdefghij"}

    def setUp(self):
        super().setUp()
        self.pool = concurrent.futures.ThreadPoolExecutor(8)
        self.addCleanup(self.pool.shutdown)
        self.sent = []

    def send(self, label, data):
        self.sent.append((label, self.pool.submit(raw_exchange, self.port, data)))

    def chat_cases(self):
        valid = {"model": "sonnet", "messages": [{"role": "user", "content": "x"}]}
        for field in CHAT_FIELDS:
            for value in WRONG_VALUES:
                body = dict(valid, **{field: value})
                yield f"{field}={value!r}"[:60], json.dumps(body).encode()
        for messages in MESSAGE_SHAPES:
            yield f"messages={messages!r}"[:60], json.dumps(dict(valid, messages=messages)).encode()
        for raw in BAD_JSON:
            yield f"json {raw[:20]!r}", raw

    def test_no_response_is_5xx_and_every_request_is_answered(self):
        for label, body in self.chat_cases():
            self.send(label, post("/v1/chat/completions", body))
        routes = [("POST", "/api/keys"), ("PATCH", "/api/keys/1/quota"), ("PATCH", "/api/keys/\u00b2/quota"),
                  ("POST", "/dashboard/login"), ("PATCH", "/settings"), ("POST", "/dashboard/logout"),
                  ("DELETE", "/api/keys/\u00b2"), ("DELETE", "/sessions/%ff%fe"), ("POST", "/v1/models")]
        admin = b"Authorization: Bearer " + self.server.admin_key.encode() + b"\r\n"
        for method, path in routes:
            for raw in BAD_JSON[:12] + (b'{"name": "\\ud800"}', b'{"\\ud800": 1}', b'{"key": "\\ud800"}',
                                        b'{"daily": "\\u00b2"}', b'{"models": [5]}', b'{"timeout": [1]}'):
                data = post(path, raw, admin).replace(b"POST ", method.encode() + b" ", 1)
                self.send(f"{method} {path} {raw[:20]!r}", data)
        for query in ("hours=\u00b2", "limit=\u00b3", "n=\u00b9", "hours=-1", "since=x", "until=1e9", "all=maybe",
                      "hours=99999999999999999999999", "level=\ud800", "limit=%00"):
            for path in ("/api/usage", "/usage", "/logs"):
                target = (path + "?" + query).encode("utf-8", "surrogatepass")
                self.send(f"GET {path}?{query}", b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + admin + b"\r\n")
        for line in (b"GET / HTTP/1.1", b"BREW /pot HTTP/1.1", b"GET /health HTTP/9.9", b"GET",
                     b"\x00\x01\x02", b"GET /health HTTP/1.1\r\nHost: evil.example.com:1:2",
                     b"GET /" + b"a" * 70000 + b" HTTP/1.1", b"GET /health HTTP/1.1\r\nBad Header\r\nX: y"):
            self.send(f"line {line[:20]!r}", line + b"\r\n\r\n")
        self.results = [(label, *future.result()) for label, future in self.sent]
        self.assertGreaterEqual(len(self.results), 150)
        unanswered = [(label, response) for label, status, response in self.results if status is None]
        crashed = [(label, status, response[:300]) for label, status, response in self.results if status and status >= 500]
        self.assertEqual(unanswered, [])
        self.assertEqual(crashed, [])
        for label, status, response in self.results:
            if status != 200:
                body = response.split(b"\r\n\r\n", 1)[1]
                self.assertIn("error", json.loads(body), label)


class LogForging(ServerTest):
    def test_a_user_field_cannot_start_a_log_line(self):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(ocp.TextFormatter("%(levelname)s %(message)s"))
        ocp.log.addHandler(handler)
        self.addCleanup(ocp.log.removeHandler, handler)
        level = ocp.log.level
        ocp.log.setLevel(logging.INFO)
        self.addCleanup(ocp.log.setLevel, level)
        status, _, _ = self.chat("hi", user="u\n2099-01-01 00:00:00 ERROR forged\r\u2028x")
        self.assertEqual(status, 200)
        wait_until(lambda: "user=" in stream.getvalue())
        lines = stream.getvalue().splitlines()
        self.assertFalse([line for line in lines if line.startswith("2099")])
        self.assertTrue(any("user=u\\x0a2099" in line for line in lines))


RESPONSES_FIELDS = ("input", "instructions", "tools", "tool_choice", "max_output_tokens", "reasoning", "text",
                    "stream", "previous_response_id", "parallel_tool_calls")
MESSAGES_FIELDS = ("messages", "system", "tools", "tool_choice", "max_tokens", "stop_sequences", "thinking",
                   "output_config", "stream", "model")
ITEM_SHAPES = ([5], [None], [{"type": "function_call"}], [{"type": "function_call_output", "output": [5]}],
               [{"role": "user", "content": [{"type": "input_image"}]}], [{"role": "tool", "content": "x"}],
               [{"type": "item_reference", "id": "x"}], [{"role": "user", "content": {"a": 1}}])
BLOCK_SHAPES = ([{"role": "user", "content": [5]}], [{"role": "user", "content": [{"type": "image", "source": 5}]}],
                [{"role": "user", "content": [{"type": "tool_result", "content": [5]}]}],
                [{"role": "assistant", "content": [{"type": "tool_use", "name": 5}]}], [{"role": "x", "content": "y"}],
                [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user"}], ["x"])


class FuzzTheAgentRoutes(FuzzBattery):
    """The same battery on /v1/responses and /v1/messages: each answers in its own error shape."""

    def test_no_response_is_5xx_and_every_request_is_answered(self):
        responses = {"model": "sonnet", "input": "x"}
        messages = {"model": "claude-sonnet-5-5", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
        for path, valid, fields, shapes, key in (("/v1/responses", responses, RESPONSES_FIELDS, ITEM_SHAPES, "input"),
                                                 ("/v1/messages", messages, MESSAGES_FIELDS, BLOCK_SHAPES, "messages")):
            for field in fields:
                for value in WRONG_VALUES[::2]:  # every other one: most of them make a CLI run
                    self.send(f"{path} {field}={value!r}"[:70], post(path, json.dumps(dict(valid, **{field: value})).encode()))
            for shape in shapes:
                self.send(f"{path} {key}={shape!r}"[:70], post(path, json.dumps(dict(valid, **{key: shape})).encode()))
            for raw in BAD_JSON:
                self.send(f"{path} json {raw[:20]!r}", post(path, raw))
        self.send("count_tokens garbage", post("/v1/messages/count_tokens", b'{"messages": 5}'))
        results = [(label, *future.result()) for label, future in self.sent]
        self.assertGreaterEqual(len(results), 150)
        self.assertEqual([(label, r) for label, status, r in results if status is None], [])
        self.assertEqual([(label, status, r[:300]) for label, status, r in results if status and status >= 500], [])
        for label, status, response in results:
            if status != 200:
                body = json.loads(response.split(b"\r\n\r\n", 1)[1])
                if label.startswith("/v1/messages") or label.startswith("count_tokens"):
                    self.assertEqual(body["type"], "error", label)  # Anthropic's envelope
                    self.assertIn(body["error"]["type"], ("invalid_request_error", "not_found_error"), label)
                else:
                    self.assertIn("code", body["error"], label)  # OpenAI's


class BodyChecks(unittest.TestCase):
    """The quick check of every parsed body finds what the thorough one names."""

    def test_lone_surrogates_escaped_or_raw_and_deep_nesting_are_400s(self):
        for raw, code in ((b'{"a": ["x", "\\ud800"]}', "invalid_unicode"), (b'{"a": ["x", "\xed\xb0\x80"]}', "invalid_unicode"),
                          (b'{"\\udfff": 1}', "invalid_unicode"), (b"[" * 70 + b"]" * 70, "invalid_json")):
            with self.assertRaises(ocp.ApiError) as caught:
                ocp.parse_json_body(raw)
            self.assertEqual((caught.exception.status, caught.exception.code), (400, code), raw[:30])
        fine = b'{"a": "\\ud83d\\ude00 \xf0\x9f\x98\x80"}'  # a surrogate pair and real UTF-8 are fine
        self.assertEqual(ocp.parse_json_body(fine), {"a": "\U0001F600 \U0001F600"})


class ConnectionFlood(ServerTest):
    """A keyless client holding many half-sent requests cannot keep the owner out."""

    env = {"CLAUDE_AUTH_MODE": "multi", "OCP_ADMIN_KEY": ADMIN, "OCP_MAX_CONNECTIONS": "20"}

    def flood(self, count):
        socks = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
            socks.append(sock)
            self.addCleanup(sock.close)
        return socks

    def owner_health(self, conn=None):
        conn = conn or self.connection(timeout=5)
        started = time.monotonic()
        conn.request("GET", "/health", headers={"Authorization": f"Bearer {ADMIN}"})
        response = conn.getresponse()
        body = json.loads(response.read())
        return time.monotonic() - started, response.status, body

    def test_the_owner_is_answered_at_once_through_a_flood(self):
        self.flood(40)
        wait_until(lambda: self.server.connections.snapshot()["shed"] >= 20)
        elapsed, status, body = self.owner_health()
        self.assertEqual(status, 200)
        self.assertLess(elapsed, 2)
        self.assertLessEqual(self.server.connections.snapshot()["open"], 20)
        self.assertIn("detail", body, "the owner's key was read: the admin view")

    def test_a_keyed_keep_alive_connection_is_kept_over_keyless_newcomers(self):
        conn = self.connection(timeout=5)
        self.owner_health(conn)
        self.flood(40)
        _, status, _ = self.owner_health(conn)
        self.assertEqual(status, 200, "the same connection, still open")

    def test_the_newest_keyless_connections_are_the_ones_closed(self):
        socks = self.flood(25)  # five past the cap: each newcomer closes the newest before it
        for sock in socks[19:24]:
            sock.settimeout(2)
            try:
                self.assertEqual(sock.recv(1), b"")
            except ConnectionResetError:
                pass
        self.assertEqual(self.server.connections.snapshot()["shed"], 5)


class DescriptorsPastSelectsReach(unittest.TestCase):
    def test_a_cli_exit_is_waited_for_with_a_descriptor_past_1023(self):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 1200:
            self.skipTest("the hard open-files limit is below 1200")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        held = []
        self.addCleanup(lambda: [os.close(fd) for fd in held])
        while not held or held[-1] < 1030:
            held.append(os.open(os.devnull, os.O_RDONLY))
        scratch = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, scratch, True)
        proc = ocp.ClaudeProcess([sys.executable, "-c", "import time; time.sleep(0.2)"], dict(os.environ),
                                 scratch, scratch)
        self.assertEqual(proc.wait(5), 0)
        proc.close()


class OutOfDescriptors(ServerTest):
    env = {"OCP_MAX_CONNECTIONS": "20"}

    def test_accept_pauses_and_makes_room_instead_of_spinning(self):
        import errno
        import socketserver
        from unittest import mock
        idle = socket.create_connection(("127.0.0.1", self.port), timeout=5)  # a keyless connection that may go
        self.addCleanup(idle.close)
        wait_until(lambda: self.server.connections.snapshot()["open"] == 1)
        with mock.patch.object(socketserver.TCPServer, "get_request", side_effect=OSError(errno.EMFILE, "Too many")):
            started = time.monotonic()
            with self.assertRaises(OSError):
                self.server.get_request()
            self.assertGreaterEqual(time.monotonic() - started, 0.04, "a pause: the loop does not spin a core")
        self.assertEqual(self.server.connections.snapshot()["shed"], 1, "a connection that may go was closed")
        idle.settimeout(2)
        self.assertEqual(idle.recv(1), b"")


class KeyedConnectionFlood(ServerTest):
    """A member holding many idle keep-alive connections cannot keep the owner out either."""

    env = {"CLAUDE_AUTH_MODE": "multi", "OCP_ADMIN_KEY": ADMIN, "OCP_MAX_CONNECTIONS": "10"}

    def test_a_members_idle_connections_make_room_for_the_owner(self):
        member = self.server.store.add_key("member", ocp.KeyPolicy(), time.time())[1]
        held = []
        for _ in range(10):
            conn = self.connection(timeout=5)
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {member}"})
            conn.getresponse().read()
            held.append(conn)
        conn = self.connection(timeout=5)
        conn.request("GET", "/health", headers={"Authorization": f"Bearer {ADMIN}"})
        response = conn.getresponse()
        self.assertEqual((response.status, "detail" in json.loads(response.read())), (200, True))
        self.assertGreaterEqual(self.server.connections.snapshot()["shed"], 1)
