"""ocp.py update: a release served over HTTP on loopback, checked against its SHA-256 manifest."""

import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

from helpers import FAKE_CLAUDE, ROOT, TempHome, connectable, free_port, wait_until
from test_cli import run_main

SHIPPED = ("ocp.py", "models.json", "dashboard.html")


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class Update(TempHome):
    def setUp(self):
        super().setUp()
        self.installed = os.path.join(self.tmp, "installed")
        self.release = os.path.join(self.tmp, "release")
        for folder in (self.installed, self.release):
            os.makedirs(folder)
            for name in SHIPPED:
                shutil.copy(os.path.join(ROOT, name), folder)
        self.original = self.read(self.installed, "ocp.py")
        self.make_release(self.read(self.release, "ocp.py").replace(b'__version__ = "0.1.0"', b'__version__ = "0.2.0"'))
        handler = functools.partial(QuietFiles, directory=self.release)
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        self.addCleanup(self.http.server_close)
        self.addCleanup(self.http.shutdown)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.port = free_port()

    def read(self, folder, name):
        with open(os.path.join(folder, name), "rb") as f:
            return f.read()

    def make_release(self, ocp_source):
        with open(os.path.join(self.release, "ocp.py"), "wb") as f:
            f.write(ocp_source)
        code, _, err = run_main(["manifest", self.release], self.environ())  # (in process: no compile of ocp.py)
        self.assertEqual(code, 0, err)

    def update(self, *args, **env):
        env = dict(self.environ(OCP_UPDATE_URL=self.url, CLAUDE_PROXY_PORT=str(self.port)), **env)
        done = subprocess.run([sys.executable, os.path.join(self.installed, "ocp.py"), "update"] + list(args),
                              capture_output=True, text=True, env=env, timeout=60)
        return done.returncode, done.stdout + done.stderr

    def test_the_manifest_carries_the_releases_version_not_the_running_one(self):
        code, out, _ = run_main(["manifest", self.release], self.environ())  # this 0.1.0 writes 0.2.0's
        self.assertIn("version 0.2.0", out)
        with open(os.path.join(self.release, "manifest.json")) as f:
            self.assertEqual(json.load(f)["version"], "0.2.0")

    def test_check_apply_and_roll_back(self):
        code, out = self.update("--check")
        self.assertEqual(code, 0, out)
        self.assertIn("installed 0.1.0, available 0.2.0: changed ocp.py", out)
        code, out = self.update()
        self.assertEqual(code, 0, out)
        self.assertIn(b'__version__ = "0.2.0"', self.read(self.installed, "ocp.py"))
        self.assertEqual(self.read(os.path.join(self.installed, ".previous"), "ocp.py"), self.original)
        self.assertIn("No OCP service is installed", out)
        self.assertIn("Already up to date", self.update()[1])
        code, out = self.update("--rollback")
        self.assertEqual(code, 0, out)
        self.assertEqual(self.read(self.installed, "ocp.py"), self.original)

    def test_a_corrupted_file_is_refused(self):
        with open(os.path.join(self.release, "dashboard.html"), "ab") as f:
            f.write(b"<!-- tampered -->")
        code, out = self.update()
        self.assertEqual(code, 1)
        self.assertIn("dashboard.html does not match its SHA-256", out)
        self.assertEqual(self.read(self.installed, "ocp.py"), self.original, "nothing was replaced")
        self.assertFalse(os.path.exists(os.path.join(self.installed, ".previous")))

    def test_an_unhealthy_new_version_is_rolled_back(self):
        serve = b"def cmd_serve(args: argparse.Namespace, config: Config) -> int:\n"
        broken = self.read(self.release, "ocp.py").replace(serve, serve + b"    raise SystemExit(3)  # a bad release\n")
        self.assertIn(b"a bad release", broken)
        self.make_release(broken)
        pidfile = os.path.join(self.tmp, "daemon.pid")
        bin_dir = os.path.join(self.tmp, "bin")
        os.makedirs(bin_dir)
        with open(os.path.join(bin_dir, "systemctl"), "w") as f:  # "restart" = start ocp.py serve anew
            f.write(f"#!/bin/sh\n[ -f {pidfile} ] && kill $(cat {pidfile}) 2>/dev/null; sleep 0.05\n"
                    f"{sys.executable} {self.installed}/ocp.py serve >/dev/null 2>&1 &\necho $! > {pidfile}\n")
        os.chmod(os.path.join(bin_dir, "systemctl"), 0o755)
        unit = os.path.join(self.home, ".config", "systemd", "user")
        os.makedirs(unit)
        open(os.path.join(unit, "ocp.service"), "w").close()
        self.addCleanup(self.stop_daemon, pidfile)
        path = bin_dir + os.pathsep + os.environ.get("PATH", "")
        code, out = self.update(PATH=path, OCP_UPDATE_HEALTH_WAIT_S="0.8", CLAUDE_BIN=FAKE_CLAUDE)
        self.assertEqual(code, 1, out)
        self.assertIn("did not come up healthy: rolling back", out)
        self.assertEqual(self.read(self.installed, "ocp.py"), self.original)
        wait_until(lambda: connectable(self.port), timeout=10)  # the old version is serving again

    def stop_daemon(self, pidfile):
        try:
            with open(pidfile) as f:
                os.kill(int(f.read()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
