"""The README's commands are the ones the project runs: its test command is exactly what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_readmes_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Two commands"):readme.index("## The embedded default")]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    test_command = next(b.strip() for b in blocks if "pytest" in b and b.strip().startswith("bash .ci/setup"))
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [test_command]
    assert "ruff check" in test_command  # the lint runs before the tests
