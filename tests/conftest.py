import json
import os
from pathlib import Path

import pytest
import torch

from tests.scripts import load_script

# Tests never touch a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
# Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP threads
# that spin-wait for each other make torch up to 10x slower. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "reference" / "mvdream_tiny_sd21.safetensors"
FULLSIZE_KEYS = FIXTURES / "reference" / "mvdream_sd21_fullsize_keys.txt"
ASSETS = FIXTURES / "assets"


@pytest.fixture(scope="session")
def reference():
    """Official MVDream reference vectors: (tensors, metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(REFERENCE))
    with safe_open(str(REFERENCE), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return tensors, meta


@pytest.fixture(scope="session")
def reference_unet_sd(reference):
    """The tiny official UNet state dict (official key names, no prefix)."""
    tensors, _ = reference
    prefix = "checkpoint.model.diffusion_model."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.fixture
def objaverse_mirror(tmp_path, monkeypatch):
    """A tiny Objaverse mirror served from loopback only: (base_url, cache_dir)."""
    module = load_script(FIXTURES / "render" / "objaverse_mirror.py", "render_objaverse_mirror")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with module.serve_objaverse_mirror(tmp_path) as (url, cache):
        yield url, cache


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """README's first command, ``mvdiff quickstart --output outputs/quickstart``, as written
    (default settings), run once per session in a fresh folder and shared by
    tests/test_quickstart.py and tests/test_readme.py: (cwd, out, proc, seconds)."""
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    pytest.importorskip("bpy")
    cwd = tmp_path_factory.mktemp("quickstart")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mvdiff.cli", "quickstart", "--output", "outputs/quickstart"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    return SimpleNamespace(cwd=cwd, out=cwd / "outputs" / "quickstart", proc=proc,
                           seconds=seconds)  # fmt: skip
