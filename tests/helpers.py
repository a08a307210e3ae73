"""Shared test fixtures: a temp OCP_HOME, a real server on port 0, the fake CLI's run log."""

import atexit
import glob
import http.client
import json
import logging
import marshal
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import unittest

import ocp

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
FAKE_CLAUDE = os.path.join(TESTS, "fake_claude.py")
FIXTURES = os.path.join(TESTS, "fixtures", "claude-cli-2.1.330")  # the real CLI's recorded output



def fake_claude_launcher() -> str:
    """The fake CLI as OCP starts it in tests: a launcher that runs its code compiled once per
    test run, with this interpreter. The suite spawns it ~550 times; run as a script it is looked
    up on PATH (`env python3`) and compiled anew each time (scripts never get a .pyc, nor does
    anything under PYTHONDONTWRITEBYTECODE), ~10 ms of its ~35 ms start."""
    folder = tempfile.mkdtemp(prefix="ocp-fake-claude-")
    atexit.register(shutil.rmtree, folder, True)
    code = os.path.join(folder, "fake_claude.code")
    with open(FAKE_CLAUDE, encoding="utf-8") as f:
        compiled = compile(f.read(), FAKE_CLAUDE, "exec")
    with open(code, "wb") as f:
        marshal.dump(compiled, f)
    run = (f"import marshal, sys; sys.argv[0] = {FAKE_CLAUDE!r}; "
           f"exec(marshal.load(open({code!r}, 'rb')), {{'__name__': '__main__', '__file__': {FAKE_CLAUDE!r}}})")
    path = os.path.join(folder, "claude")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S -c {shlex.quote(run)} "$@"\n')
    os.chmod(path, 0o755)
    return path


FAKE_CLAUDE_BIN = fake_claude_launcher()

logging.getLogger("ocp").addHandler(logging.NullHandler())
logging.getLogger("ocp").propagate = False


def directive(**steer) -> str:
    """Return the prompt text that steers the fake CLI."""
    return "<<fake " + json.dumps(steer) + ">>"


def named_events(text):
    """An SSE body with named events as [(event name, parsed data)]."""
    out = []
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def wait_until(predicate, timeout=10.0, interval=0.02):
    """Poll `predicate` until it is true; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class TempHome(unittest.TestCase):
    """A private HOME and OCP_HOME for each test; nothing touches the real ~."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ocp-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.home = os.path.join(self.tmp, "home")
        self.ocp_home = os.path.join(self.tmp, "ocp")
        self.runs_dir = os.path.join(self.tmp, "runs")
        for path in (self.home, self.runs_dir):
            os.makedirs(path)

    def environ(self, **extra) -> dict:
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": self.home,
               "OCP_HOME": self.ocp_home, "CLAUDE_BIN": FAKE_CLAUDE_BIN,
               "FAKE_CLAUDE_LOG": self.runs_dir, "CLAUDE_PROXY_PORT": "0",
               "OCP_POOL": "0"}  # the warm pool is tested on its own (test_pool.py)
        env.update({k: str(v) for k, v in extra.items()})
        return {k: v for k, v in env.items() if v != ""}

    def runs(self) -> list:
        """Return the fake CLI's run records, oldest first."""
        records = []
        for path in glob.glob(os.path.join(self.runs_dir, "*.json")):
            with open(path) as f:
                records.append(json.load(f))
        return sorted(records, key=lambda r: r["started"])

    def live_fake_pids(self) -> list:
        pids = []
        for record in self.runs():
            for pid in (record["pid"], record.get("grandchild")):
                if pid and pid_alive(pid):
                    pids.append(pid)
        return pids

    def kill_leftovers(self):
        for pid in self.live_fake_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class ServerTest(TempHome):
    """A real OCP server on port 0 in a thread, driving tests/fake_claude.py."""

    env: dict = {}

    def setUp(self):
        super().setUp()
        self.addCleanup(self.kill_leftovers)
        self.start_server(**self.server_env())

    def server_env(self) -> dict:
        return dict(self.env)

    def start_server(self, wall=None, **extra):
        self.config = ocp.load_config(self.environ(**extra))
        self.models = ocp.Models.load(os.path.join(ROOT, "models.json"))
        runner = ocp.Runner(self.config)
        runner.prepare()
        kwargs = {"wall": wall} if wall else {}
        self.server = ocp.Server(self.config, self.models, runner, **kwargs)
        self.port = self.server.server_address[1]
        thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.002},
                                  daemon=True)
        thread.start()
        self.addCleanup(self.server.runner.keeper.close)
        # (cleanups run last first) pooled and parked CLIs are reaped before the keeper goes: an
        # unreaped one is a zombie of this process, which the keeper would signal until it gives up
        self.addCleanup(self.server.runner.pool.close)
        self.addCleanup(self.server.parks.close)
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.addCleanup(self.server.runner.cancel_all)
        return self.server

    def settle(self):
        """Wait for the CLIs OCP reaps after their answer went out (Runner.retire_later) and for
        their run directories to go: what a test reads about a finished run is then final."""
        wait_until(lambda: self.server.runner.reaping == 0)
        self.server.runner.sweeper.drain()

    def runs(self) -> list:
        """The fake CLI's run records once finished runs are reaped (their records are final)."""
        self.settle()
        return super().runs()

    def connection(self, timeout=30) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        self.addCleanup(conn.close)
        return conn

    def request(self, method, path, body=None, headers=None, raw=None):
        """Send one request; return (status, headers, parsed JSON or text)."""
        conn = self.connection()
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        payload = response.read()
        try:
            parsed = json.loads(payload)
        except ValueError:
            parsed = payload.decode("utf-8", "replace")
        return response.status, response.headers, parsed

    def chat(self, content=None, messages=None, **params):
        body = {"model": params.pop("model", "sonnet"),
                "messages": messages or [{"role": "user", "content": content}]}
        body.update(params)
        return self.request("POST", "/v1/chat/completions", body)

    def stream(self, content=None, messages=None, **params):
        """POST a streaming chat; return (status, headers, [(arrival time, event)])."""
        body = {"model": params.pop("model", "sonnet"), "stream": True,
                "messages": messages or [{"role": "user", "content": content}]}
        body.update(params)
        conn = self.connection()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body))
        response = conn.getresponse()
        if response.status != 200:
            return response.status, response.headers, json.loads(response.read())
        events = []
        for raw in response:
            line = raw.decode("utf-8").rstrip("\n")
            if line.startswith("data: "):
                data = line[6:]
                events.append((time.monotonic(), data if data == "[DONE]" else json.loads(data)))
            elif line.startswith(":"):
                events.append((time.monotonic(), line))
        return response.status, response.headers, events

    def open_raw(self, body: dict, key: str = "") -> socket.socket:
        """Send a chat request on a bare socket (for hang-ups); return the socket."""
        data = json.dumps(body).encode()
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.addCleanup(sock.close)
        auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\n" + auth + b"Content-Length: " + str(len(data)).encode() +
                     b"\r\n\r\n" + data)
        return sock


def content_of(events) -> str:
    return "".join((e["choices"][0]["delta"].get("content") or "") for _, e in events
                   if isinstance(e, dict) and e.get("choices"))
