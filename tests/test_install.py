"""install.sh in a temporary HOME and prefix, with stand-in systemctl and crontab on a private PATH."""

import json
import os
import shutil
import stat
import subprocess
import sys

from helpers import ROOT, TempHome

INSTALL = os.path.join(ROOT, "install.sh")
TOOLS = ("sh", "cp", "mv", "mkdir", "chmod", "rm", "rmdir", "sed", "grep", "cat", "dirname", "id", "uname",
         "tail", "env", "head")


class InstallScript(TempHome):
    def setUp(self):
        super().setUp()
        self.bin = os.path.join(self.tmp, "path")  # the only PATH the script sees
        os.makedirs(self.bin)
        for tool in TOOLS:
            found = shutil.which(tool)
            if found:
                os.symlink(found, os.path.join(self.bin, tool))
        os.symlink(sys.executable, os.path.join(self.bin, "python3"))
        self.prefix = os.path.join(self.tmp, "prefix")
        self.bindir = os.path.join(self.tmp, "bin")
        self.calls = os.path.join(self.tmp, "calls.log")
        self.env_file = os.path.join(self.home, ".config", "ocp", "ocp.env")
        self.unit = os.path.join(self.home, ".config", "systemd", "user", "ocp.service")

    def fake(self, name, body):
        path = os.path.join(self.bin, name)
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\necho \"{name} $*\" >> {self.calls}\n{body}\n")
        os.chmod(path, 0o755)

    def install(self, *args, stdin=None):
        command = ["sh", "-s", "--"] if stdin else ["sh", INSTALL]
        done = subprocess.run(command + ["--prefix", self.prefix, "--bin-dir", self.bindir] + list(args),
                              capture_output=True, text=True, input=stdin, timeout=60,
                              env={"HOME": self.home, "PATH": self.bin})
        return done.returncode, done.stdout + done.stderr

    def calls_made(self):
        try:
            with open(self.calls) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def test_dry_run_writes_nothing(self):
        self.fake("systemctl", "exit 0")
        code, out = self.install("--bind", "0.0.0.0", "--auth-mode", "multi", "--dry-run")
        self.assertEqual(code, 0, out)
        self.assertIn(f"+ cp {ROOT}/ocp.py {self.prefix}/ocp.py.new", out)
        self.assertIn(f"+ write {self.unit}", out)
        self.assertFalse(os.path.exists(self.prefix))
        self.assertEqual(os.listdir(self.home), [])
        self.assertEqual([c for c in self.calls_made() if "show-environment" not in c], [])

    def test_systemd_user_service_and_env_file(self):
        self.fake("systemctl", "exit 0")
        code, out = self.install("--bind", "0.0.0.0", "--port", "4567", "--auth-mode", "multi")
        self.assertEqual(code, 0, out)
        for name in ("ocp.py", "models.json", "dashboard.html"):
            self.assertTrue(os.path.exists(os.path.join(self.prefix, name)))
        with open(self.unit) as f:
            unit = f.read()
        self.assertIn(f"EnvironmentFile={self.env_file}", unit)
        self.assertIn(f"ExecStart={os.path.join(self.bin, 'python3')} {self.prefix}/ocp.py serve", unit)
        self.assertNotIn("CLAUDE_BIND", unit, "settings live in the env file, not the unit")
        self.assertIn("LimitNOFILE=65536", unit, "room for many connections (the default is 1,024)")
        self.assertNotIn("network-online", unit, "a user manager has no network-online.target")
        self.assertEqual(stat.S_IMODE(os.stat(self.env_file).st_mode), 0o600)
        with open(self.env_file) as f:
            env = f.read()
        self.assertIn("CLAUDE_BIND='0.0.0.0'", env)
        self.assertIn("CLAUDE_PROXY_PORT='4567'", env)
        self.assertIn("CLAUDE_AUTH_MODE='multi'", env)
        self.assertIn(["systemctl --user daemon-reload", "systemctl --user enable --now ocp.service"],
                      [self.calls_made()[i:i + 2] for i in range(len(self.calls_made()))])
        self.assertIn("loginctl enable-linger", out)
        self.assertIn("claude setup-token", out)
        with open(os.path.join(self.bindir, "ocp")) as f:
            self.assertIn("OCP_COMMAND=ocp", f.read(), "so hints name `ocp`, not ocp.py")
        wrapper = subprocess.run([os.path.join(self.bindir, "ocp"), "settings", "--json"], capture_output=True,
                                 text=True, env={"HOME": self.home, "PATH": self.bin}, timeout=30)
        self.assertEqual(json.loads(wrapper.stdout)["maxConcurrent"]["value"], 8, wrapper.stderr)

    def test_idempotent_and_keeps_the_owners_lines(self):
        self.fake("systemctl", "exit 0")
        self.install("--auth-mode", "shared")
        with open(self.env_file, "a") as f:
            f.write("CLAUDE_CODE_OAUTH_TOKEN='sk-ant-oat01-mine'\n")
        with open(self.env_file) as f:
            shared_key = [l for l in f if l.startswith("PROXY_API_KEY=")]
        self.assertEqual(len(shared_key), 1)
        code, out = self.install("--auth-mode", "shared", "--port", "4000")
        self.assertEqual(code, 0, out)
        with open(self.env_file) as f:
            env = f.read()
        self.assertIn("CLAUDE_CODE_OAUTH_TOKEN='sk-ant-oat01-mine'", env)
        self.assertEqual(env.count("PROXY_API_KEY="), 1)
        self.assertIn(shared_key[0], env, "the shared key is not replaced")
        self.assertEqual(env.count("CLAUDE_AUTH_MODE="), 1)

    def test_without_systemctl_it_says_so_and_uses_cron(self):
        crontab = os.path.join(self.tmp, "crontab.txt")
        self.fake("crontab", f'if [ "$1" = "-l" ]; then cat {crontab} 2>/dev/null; else cat > {crontab}; fi')
        code, out = self.install()
        self.assertEqual(code, 0, out)
        self.assertIn("systemctl is not available", out)
        with open(crontab) as f:
            entries = f.read()
        self.assertIn(f"@reboot /bin/sh -c 'set -a; . \"{self.env_file}\"", entries)
        self.assertIn(f"*/5 * * * * /bin/sh -c 'set -a; . \"{self.env_file}\"", entries,
                      "a crashed OCP comes back within 5 minutes")
        code, out = self.install()
        with open(crontab) as f:
            entries = f.read()
        self.assertEqual((entries.count("@reboot"), entries.count("*/5 ")), (1, 1), "once however often it runs")

    def test_piped_into_sh(self):
        self.fake("systemctl", "exit 0")
        with open(INSTALL) as f:
            code, out = self.install("--source", ROOT, "--bind", "0.0.0.0", stdin=f.read())
        self.assertEqual(code, 0, out)
        self.assertTrue(os.path.exists(os.path.join(self.prefix, "ocp.py")))

    def test_uninstall_removes_what_it_installed(self):
        self.fake("systemctl", "exit 0")
        self.install()
        code, out = self.install("--uninstall")
        self.assertEqual(code, 0, out)
        for path in (self.unit, self.env_file, os.path.join(self.bindir, "ocp"), self.prefix):
            self.assertFalse(os.path.exists(path), path)
        self.assertIn("systemctl --user disable --now ocp.service", self.calls_made())

    def test_bad_flags(self):
        for args in (["--port", "http"], ["--port", "70000"], ["--auth-mode", "open"], ["--colour"]):
            with self.subTest(args):
                code, out = self.install(*args)
                self.assertEqual(code, 2)
                self.assertIn("install.sh:", out)
