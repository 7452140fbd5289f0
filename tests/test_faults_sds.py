"""Faults and hostile inputs of ``mvdiff text-to-3d``: what the user gets.

Each test name is a promise: entry point, the bad input or fault, what happens. Runs are
plain reconstructions (``--sds-weight 0 --ref-views SHARD``: no model needed), a few steps
at 32² on the CPU.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mvdiff.cli import main
from tests.test_faults_render import (  # noqa: F401 (small_disk is a fixture)
    HOSTILE_SAMPLES,
    bomb_png,
    npy,
    sample_members,
    small_disk,
    with_json,
    write_shard,
)

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def argv(shard: Path, out: Path, steps: int = 2, *extra) -> list[str]:
    return ["text-to-3d", "--ref-views", str(shard), "--sds-weight", "0", "--output", str(out),
            "--fast", "--steps", str(steps), "--mesh-resolution", "16", "--samples", "8",
            "--no-progress", *map(str, extra)]  # fmt: skip


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ref")
    return write_shard(folder / "ref.tar", {"obj": sample_members("obj", views=4, res=32)})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shard) -> Path:
    """The checkpoint.pt of a finished 2-step run."""
    out = tmp_path_factory.mktemp("run")
    assert main(argv(shard, out)) == 0
    return out / "checkpoint.pt"


# --- checkpoints ------------------------------------------------------------------------
class Exploit:
    """Pickles to a call of os.system: what a planted checkpoint would run when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tampered(kind: str, checkpoint: Path, folder: Path) -> None:
    """Write ``folder/checkpoint.pt``: the good one spoiled in the way ``kind`` says."""
    state = torch.load(checkpoint, weights_only=True)
    target = folder / "checkpoint.pt"
    if kind == "code":
        torch.save({**state, "config": Exploit(folder / "PWNED")}, target)
    elif kind == "truncated":
        data = checkpoint.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif kind == "not a checkpoint":
        target.write_bytes(b"hello, I am text\n")
    elif kind == "a list":
        torch.save([1, 2, 3], target)
    elif kind == "keys missing":
        torch.save({"step": 2}, target)
    elif kind == "step is text":
        torch.save({**state, "step": "2"}, target)
    elif kind == "wrong shapes":
        field = {k: torch.zeros(3) for k in state["field"]}
        torch.save({**state, "field": field}, target)
    elif kind == "non-finite weights":
        field = {k: torch.full_like(t, float("nan")) for k, t in state["field"].items()}
        torch.save({**state, "field": field}, target)
    elif kind == "bad occupancy":
        torch.save({**state, "occupancy": torch.zeros(2, 2)}, target)
    elif kind == "bad optimizer":
        torch.save({**state, "optimizer": {"state": {}, "param_groups": []}}, target)
    elif kind == "bad generator":
        torch.save({**state, "generator": torch.zeros(3, dtype=torch.uint8)}, target)


CHECKPOINT_FAULTS = {  # kind -> words of the one-line error
    "code": "refused",
    "truncated": "not a readable checkpoint",
    "not a checkpoint": "not a readable checkpoint",
    "a list": "not a text-to-3d checkpoint",
    "keys missing": "lacks",
    "step is text": "step",
    "wrong shapes": "does not fit",
    "non-finite weights": "not finite",
    "bad occupancy": "occupancy",
    "bad optimizer": "does not fit",
    "bad generator": "does not fit",
}


@pytest.mark.parametrize("kind", list(CHECKPOINT_FAULTS))
def test_text_to_3d_resume_refuses_a_tampered_checkpoint_in_one_line(
    tmp_path, shard, checkpoint, capsys, kind
):
    """`mvdiff text-to-3d --resume` from a planted pickle that would run code, a truncated
    file, another file, or a checkpoint of the wrong structure, shapes or values: exit 2 and
    one line naming the checkpoint; nothing in it runs, and the file is left as it was."""
    tampered(kind, checkpoint, tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert main([*argv(shard, tmp_path, 3), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "checkpoint.pt" in err[0] and CHECKPOINT_FAULTS[kind] in err[0], err
    assert not (tmp_path / "PWNED").exists(), "the checkpoint ran code"
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


# --- reference views --------------------------------------------------------------------
def ref_sample(**changes) -> dict[str, bytes]:
    return {**sample_members("s"), **changes}


def cameras(change) -> dict[str, bytes]:
    """Sample "s" with its cameras ``[2, 4, 4]`` passed through ``change``."""
    members = sample_members("s")
    c2w = np.load(io.BytesIO(members["cameras.npy"]))
    return {**members, "cameras.npy": npy(change(c2w))}


def shear(c2w):
    c2w[:, 0, 1] = 1.0
    return c2w


def infinite_x(c2w):
    c2w[1, 0, 3] = np.inf
    return c2w


REF_FAULTS = {  # case -> (members of sample "s", words of the one-line error)
    "infinite camera": (cameras(infinite_x), "not finite"),
    "nan cameras": (cameras(lambda c: c * np.nan), "not finite"),
    "pickled cameras": (HOSTILE_SAMPLES["pickled cameras"][0], "cameras.npy"),
    "cameras of another shape": (cameras(lambda c: c[0]), "shape"),
    "sheared camera": (cameras(shear), "orthonormal"),
    "a view missing": ({k: v for k, v in sample_members("s").items() if k != "rgba.001.png"},
                       "rgba.001.png"),
    "json is a list": (HOSTILE_SAMPLES["json is a list"][0], "num_views"),
    "json is not utf-8": (HOSTILE_SAMPLES["json is not utf-8"][0], "bad .json"),
    "infinite fov": (with_json(fov_deg=[float("inf"), 40.0]), "fields of view"),
    "png is text": (HOSTILE_SAMPLES["png is text"][0], "rgba.001.png: not a readable image"),
    "decompression bomb": (ref_sample(**{"rgba.000.png": bomb_png()}), "rgba.000.png"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REF_FAULTS))
def test_text_to_3d_refuses_bad_reference_views_in_one_line(tmp_path, capsys, case):
    """`mvdiff text-to-3d --ref-views SHARD` whose sample has non-finite, pickled, misshapen
    or non-rigid cameras, a missing view, a JSON that is not an object, a bad field of view,
    a PNG that is not an image or a decompression bomb: exit 2, one line naming the shard and
    the sample, before any optimisation."""
    members, words = REF_FAULTS[case]
    bad = write_shard(tmp_path / "bad.tar", {"s": members})
    assert main(argv(bad, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{bad}: sample s" in err[0] and words in err[0], err
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_text_to_3d_refuses_a_sample_folder_with_non_finite_cameras(tmp_path, capsys):
    """`mvdiff text-to-3d --ref-views FOLDER` (an `mvdiff sample` output) whose cameras.json
    holds a NaN, or whose views are not objects: exit 2, one line naming cameras.json."""
    from PIL import Image

    folder = tmp_path / "sample"
    folder.mkdir()
    Image.new("RGB", (16, 16), (255, 255, 255)).save(folder / "view_00.png")
    c2w = np.eye(4)
    c2w[2, 3] = float("nan")
    views = [{"index": 0, "file": "view_00.png", "c2w": json.loads(json.dumps(c2w.tolist()))}]
    (folder / "cameras.json").write_text(json.dumps({"views": views}))
    assert main(argv(folder, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cameras.json: view 0: camera is not finite" in err[0], err
    (folder / "cameras.json").write_text(json.dumps({"views": [1, 2]}))
    assert main(argv(folder, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "list of objects" in err[0], err


# --- signals ----------------------------------------------------------------------------
def test_text_to_3d_sigterm_exits_143_keeps_the_last_checkpoint_and_resumes(tmp_path, shard):
    """SIGTERM to `mvdiff text-to-3d` mid-run: exit 143, one line naming the checkpoint kept
    (the last periodic one, intact, no `.tmp` left); `--resume` continues from it."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mvdiff.cli", *argv(shard, out, 100000, "--save-every", "2")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    ckpt = out / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not ckpt.exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.5)  # mid-step, perhaps mid-save
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mvdiff text-to-3d: terminated (SIGTERM)")
    assert "checkpoint.pt (step " in lines[0] and "--resume" in lines[0], lines
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    step = torch.load(ckpt, weights_only=True)["step"]
    assert f"(step {step})" in lines[0] and step >= 2
    assert main([*argv(shard, out, step + 2), "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == step


# --- disk full --------------------------------------------------------------------------
def test_text_to_3d_disk_full_is_one_line_keeps_the_last_checkpoint_and_resumes(
    tmp_path,
    shard,
    small_disk,  # noqa: F811 (a fixture)
):
    """`mvdiff text-to-3d` whose output fills up while saving a checkpoint: exit 2 and one
    line (`cannot write`), no `.tmp` left behind, the previous checkpoint (if one fitted)
    intact; after making room, `--resume` finishes the run."""
    disk = small_disk(10 * 1024 * 1024)  # one checkpoint (~7 MB) fits, a second copy not
    out = disk.folder / "run"
    cmd = [sys.executable, "-m", "mvdiff.cli", *argv(shard, out, 3, "--save-every", "1")]
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300,
                         preexec_fn=disk.preexec)  # fmt: skip
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0], run.stderr
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    if (out / "checkpoint.pt").exists():
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    disk.grow()
    assert main([*argv(shard, out, 3, "--save-every", "1"), "--resume"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


def test_text_to_3d_output_that_is_a_file_is_one_line(tmp_path, shard, capsys):
    """`mvdiff text-to-3d --output FILE`: exit 2, one line naming --output."""
    (tmp_path / "afile").write_text("x")
    assert main(argv(shard, tmp_path / "afile")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output" in err[0] and "not a folder" in err[0], err


def test_text_to_3d_config_file_that_is_not_text_is_one_line(tmp_path, shard, capsys):
    """`mvdiff text-to-3d --config FILE` whose bytes are not UTF-8: exit 2, one line."""
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    assert main([*argv(shard, tmp_path / "out"), "--config", str(binary)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--config {binary}: not valid YAML" in err[0], err
