"""The user guide's examples marked ``<!-- run -->`` run as shown: each in a fresh interpreter, and the
lines of the output block that follows it (those naming no random controller id) appear in what it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"
BLOCK = re.compile(r"<!-- run -->\n```python\n(.*?)```\n(?:\n```text\n(.*?)```)?", re.S)
RANDOM_ID = re.compile(r"[0-9a-f]{8}\.[0-9a-f]{6}")  # controller ids differ from run to run


def examples() -> list[tuple[str, str, str]]:
    text = GUIDE.read_text()
    out = []
    for m in BLOCK.finditer(text):
        line = text[:m.start()].count("\n") + 1
        out.append((f"guide.md:{line}", m.group(1), m.group(2) or ""))
    return out


EXAMPLES = examples()


def test_the_guide_has_runnable_examples() -> None:
    assert len(EXAMPLES) >= 3


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("where", "code", "expected"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_guide_example_runs_as_shown(where: str, code: str, expected: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(GUIDE.parents[1])}
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=150, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"{where} failed:\n{res.stderr[-3000:]}"
    printed = res.stdout.splitlines()
    for line in expected.splitlines():
        if line.strip() and not RANDOM_ID.search(line):
            assert line in printed, f"{where}: expected {line!r} in the output:\n{res.stdout}"
