#!/usr/bin/env python3
"""mypy with a baseline that may only shrink.

Runs mypy (settings in pyproject.toml) and compares its errors with .ci/mypy-baseline.txt by file, message and
code, not line number, so moving code does not count as a change. Fails on an error the baseline lacks (fix
it) and on a baseline entry mypy no longer reports (someone fixed one: `--update` writes the smaller baseline,
so it cannot grow back). `--update` refuses to add errors.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / ".ci" / "mypy-baseline.txt"
ERROR = re.compile(r"^(?P<file>[^:\s]+\.py):\d+(?::\d+)?: error: (?P<message>.*)$")


def current_errors() -> Counter[str]:
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 2: mypy itself failed (bad config, crash): nothing to compare
        sys.exit(f"mypy gate: mypy did not run (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    return Counter(f"{m['file']}: {m['message']}" for m in map(ERROR.match, done.stdout.splitlines()) if m)


def baseline() -> Counter[str]:
    lines = BASELINE.read_text().splitlines() if BASELINE.exists() else []
    return Counter(line for line in lines if line.strip() and not line.startswith("#"))


def write_baseline(errors: Counter[str]) -> None:
    header = "# mypy errors still allowed (.ci/mypy_gate.py): file: message [code]. It may only shrink.\n"
    BASELINE.write_text(header + "".join(f"{e}\n" for e in sorted(errors.elements())))


def main(argv: list[str]) -> int:
    now, allowed = current_errors(), baseline()
    new, fixed = now - allowed, allowed - now
    if new:
        print(f"mypy gate: FAILED, {sum(new.values())} new mypy error(s) the baseline does not allow "
              "(fix them; `python -m mypy` shows their lines):", file=sys.stderr)
        for error in sorted(new.elements()):
            print(f"  {error}", file=sys.stderr)
        return 1
    if fixed and "--update" not in argv:
        print(f"mypy gate: FAILED, {sum(fixed.values())} baseline error(s) are fixed: shrink the baseline with "
              "`python .ci/mypy_gate.py --update` and commit .ci/mypy-baseline.txt:", file=sys.stderr)
        for error in sorted(fixed.elements()):
            print(f"  {error}", file=sys.stderr)
        return 1
    if fixed:
        write_baseline(now)
        print(f"mypy gate: baseline shrunk by {sum(fixed.values())} to {sum(now.values())} error(s)")
        return 0
    print(f"mypy gate: ok, {sum(now.values())} known error(s) in the baseline, none new")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
