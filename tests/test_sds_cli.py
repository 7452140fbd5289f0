"""`mvdiff text-to-3d` end to end on a tiny saved pipeline: a few steps, outputs, resume."""

import json

import numpy as np
import pytest
import torch

from mvdiff.cli import main
from mvdiff.pipelines import MVDreamPipeline
from mvdiff.testing import tiny_components


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    MVDreamPipeline(**tiny_components(0)).save_pretrained(folder)
    return folder


def read_obj(path):
    rows = path.read_text().splitlines()
    v = np.array([[float(x) for x in r.split()[1:4]] for r in rows if r.startswith("v ")])
    f = np.array([[int(x) - 1 for x in r.split()[1:]] for r in rows if r.startswith("f ")])
    return v, f


def test_text_to_3d_writes_outputs_and_resumes(tmp_path, tiny_folder, capsys):
    out = tmp_path / "run"
    argv = ["text-to-3d", "--model", str(tiny_folder), "--prompt", "a corgi", "--output",
            str(out), "--fast", "--steps", "3", "--mesh-resolution", "24", "--samples", "16"]  # fmt: skip
    assert main(argv) == 0
    for name in ("checkpoint.pt", "views.png", "mesh.obj", "mesh.ply", "config.json"):
        assert (out / name).exists(), name
    from PIL import Image

    with Image.open(out / "turntable.gif") as gif:
        assert gif.n_frames == 12 and gif.size == (64, 64)
    v, f = read_obj(out / "mesh.obj")
    assert len(f) > 0 and f.max() < len(v)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3
    assert json.loads((out / "config.json").read_text())["prompt"] == "a corgi"

    # Resume: continues from step 3 to 5 and changes the field.
    before = {k: t.clone() for k, t in state["field"].items()}
    argv[argv.index("--steps") + 1] = "5"
    assert main([*argv, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 3 and np.isfinite(summary["loss"])
    assert any(not torch.equal(before[k], state["field"][k]) for k in before)


def test_text_to_3d_rejects_bad_input(tmp_path, tiny_folder, capsys):
    argv = ["text-to-3d", "--model", str(tiny_folder), "--prompt", " ", "--output", str(tmp_path)]
    assert main(argv) == 2
    assert "--prompt" in capsys.readouterr().err
    argv = ["text-to-3d", "--model", str(tiny_folder), "--prompt", "x", "--output",
            str(tmp_path), "--rescale", "2"]  # fmt: skip
    assert main(argv) == 2
