"""README's two set-up commands and CI stay in step."""

import re
from pathlib import Path

import pytest

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


def test_extras_put_each_requirement_where_it_is_needed():
    """numpy<2 only with bpy (render), TensorBoard in `train`, S3/GCS in `cloud` (installed by
    the render image), the S3 test server in `dev`; the torch range admits 2.15."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core, extras = project["dependencies"], project["optional-dependencies"]
    numpy = [r for r in core if r.startswith("numpy")]
    assert numpy and "<2" not in numpy[0], numpy
    assert any(r.startswith("numpy") and "<2" in r for r in extras["render"])
    torch = next(r for r in core if r.startswith("torch"))
    hi = tuple(int(x) for x in re.search(r"<([\d.]+)", torch).group(1).split("."))
    assert hi > (2, 15), torch
    assert any(r.startswith("tensorboard") for r in extras["train"])
    assert {r.split(">")[0] for r in extras["cloud"]} == {"s3fs", "gcsfs"}
    assert any(r.startswith("moto[server]") for r in extras["dev"])
    dev_self = next(r for r in extras["dev"] if r.startswith("mvdiff["))
    assert {"train", "cloud"} <= set(dev_self[7:-1].split(","))
    render_image = (ROOT / "docker" / "Dockerfile.render").read_text()
    assert re.search(r'pip install .*-e "\.\[[^\]]*\bcloud\b', render_image)
