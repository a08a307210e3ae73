"""Print "<passed> <failed>" from a unittest log and its exit code."""

import re
import sys

text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
rc = int(sys.argv[2])
ran = re.findall(r"^Ran (\d+) tests?", text, re.M)
total = int(ran[-1]) if ran else 0
summary = re.findall(r"^(OK|FAILED)(?: \((.*)\))?$", text, re.M)
counts = dict(failures=0, errors=0, skipped=0, expected_failures=0, unexpected_successes=0)
if summary:
    for part in (summary[-1][1] or "").split(","):
        if "=" in part:
            key, value = part.strip().split("=")
            counts[key] = int(value)
failed = counts["failures"] + counts["errors"] + counts["unexpected_successes"]
if rc != 0 and failed == 0:
    failed = 1  # the runner itself failed (import error, crash): count it
print(max(0, total - failed - counts["skipped"] - counts["expected_failures"]), failed)
