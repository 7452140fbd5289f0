"""README's two set-up commands and CI stay in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    head = text.split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", head, flags=re.S)


def test_readme_has_two_setup_commands_first():
    blocks = _readme_commands()
    assert len(blocks) == 2, blocks
    quickstart, tests = blocks
    assert (
        quickstart.startswith("pip install torch==2.13.0 && ") and "mvdiff quickstart" in quickstart
    )
    assert tests.startswith("pip install torch==2.13.0 && ") and "pytest" in tests


def test_ci_runs_readme_test_command():
    tests = _readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci
