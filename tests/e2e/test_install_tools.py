"""install.sh checked by the tools CI installs: shellcheck, and systemd-analyze on the unit it writes."""

import os
import shutil
import subprocess
import unittest

from e2e.base import require
from helpers import ROOT, TempHome


class InstallScriptLint(unittest.TestCase):
    def test_shellcheck_is_clean(self):
        shellcheck = shutil.which("shellcheck")
        require(shellcheck is not None, "shellcheck is not installed", "apt-get install shellcheck, as .ci/run does")
        done = subprocess.run([shellcheck, "-s", "sh", os.path.join(ROOT, "install.sh")], capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stdout)


class GeneratedUnit(TempHome):
    def test_systemd_analyze_verify(self):
        analyze = shutil.which("systemd-analyze")
        require(analyze is not None, "systemd-analyze is not installed", "apt-get install systemd, as .ci/run does")
        fake_bin = os.path.join(self.tmp, "fakebin")
        os.makedirs(fake_bin)
        with open(os.path.join(fake_bin, "systemctl"), "w") as f:
            f.write("#!/bin/sh\nexit 0\n")  # lets install.sh write the unit without a running systemd
        os.chmod(os.path.join(fake_bin, "systemctl"), 0o755)
        prefix = os.path.join(self.tmp, "prefix")
        env = {"HOME": self.home, "PATH": fake_bin + os.pathsep + os.environ.get("PATH", "")}
        done = subprocess.run(["sh", os.path.join(ROOT, "install.sh"), "--prefix", prefix, "--bin-dir",
                               os.path.join(self.tmp, "bin")], capture_output=True, text=True, env=env, timeout=60)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        unit = os.path.join(self.home, ".config", "systemd", "user", "ocp.service")
        check = subprocess.run([analyze, "verify", unit], capture_output=True, text=True, timeout=60,
                               env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"))
        problems = [line for line in (check.stdout + check.stderr).splitlines() if "ocp.service" in line]
        self.assertEqual((check.returncode, problems), (0, []), check.stdout + check.stderr)


if __name__ == "__main__":
    unittest.main()
