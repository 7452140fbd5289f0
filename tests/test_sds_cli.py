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


def test_text_to_3d_ref_views_reconstructs_a_shard_sample(tmp_path, tiny_folder):
    """`--ref-views SHARD --sds-weight 0`: plain multi-view reconstruction from a shard in our
    schema (8 posed RGBA views of the analytic test object); held-out PSNR above 24 dB."""
    import tarfile

    from mvdiff.data.shards import write_multiview_sample
    from mvdiff.sds.field import FieldConfig, RadianceField
    from mvdiff.sds.oracle import ReferenceObject
    from mvdiff.sds.render import render
    from tests.test_sds_recon import heldout_psnr, ring

    gt = ReferenceObject()
    c2w, fov = ring([15.0] * 4 + [40.0] * 4, [0, 90, 180, 270, 45, 135, 225, 315])
    with torch.no_grad():
        out = render(gt, c2w, fov, 32, 64, background=torch.zeros(3))
    alpha = out["opacity"]
    rgba = torch.cat([out["rgb"] / alpha.clamp(min=1e-6), alpha], 1).clamp(0, 1)
    rgba8 = rgba.permute(0, 2, 3, 1).numpy()  # (V, 4, H, W) -> (V, H, W, 4)
    rgba8 = (rgba8 * 255 + 0.5).astype(np.uint8)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        write_multiview_sample(tar, "obj0", rgba8, c2w.numpy(), {"fov_deg": [fov] * 8})
    run = tmp_path / "run"
    argv = ["text-to-3d", "--model", str(tiny_folder), "--prompt", "a thing", "--output",
            str(run), "--fast", "--steps", "60", "--lr", "0.05", "--mesh-resolution", "24",
            "--samples", "32", "--ref-views", str(shard), "--sds-weight", "0"]  # fmt: skip
    assert main(argv) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    field = RadianceField(FieldConfig(**state["config"]["field"]))
    field.load_state_dict(state["field"])
    end = heldout_psnr(field, gt)
    print(f"--ref-views reconstruction (60 steps): held-out PSNR {end:.1f} dB")
    assert end > 24.0


def test_text_to_3d_config_file_and_overrides(tmp_path):
    from mvdiff.cli import build_parser
    from mvdiff.commands.text_to_3d import resolve_config
    from mvdiff.errors import UserError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 123\nsds:\n  guidance_scale: 30\n  rescale: 0.7\nfield:\n  hidden: 16\n")
    base = ["text-to-3d", "--model", "m", "--prompt", "a corgi", "--output", "o", "--fast"]
    parser = build_parser()
    c = resolve_config(parser.parse_args([*base, "--config", str(cfg)]))
    assert (c.steps, c.sds.guidance_scale, c.sds.rescale, c.field.hidden) == (123, 30, 0.7, 16)
    assert c.render_size == 32  # from the fast preset
    args = [*base, "--config", str(cfg), "--set", "sds.guidance_scale=10", "--guidance", "20"]
    c = resolve_config(parser.parse_args(args))
    assert c.sds.guidance_scale == 20  # flags beat --set, which beats the file
    c = resolve_config(parser.parse_args([*base, "--set", "field.resolutions=[8, 16]"]))
    assert c.field.resolutions == [8, 16]
    for bad in ("sds.nope=1", "nope=1", "field=3", "steps", "steps=many"):
        with pytest.raises(UserError):
            resolve_config(parser.parse_args([*base, "--set", bad]))
    with pytest.raises(UserError, match="no such file"):
        resolve_config(parser.parse_args([*base, "--config", str(tmp_path / "missing.yaml")]))
    cfg.write_text("sds:\n  bogus: 1\n")
    with pytest.raises(UserError, match="bogus"):
        resolve_config(parser.parse_args([*base, "--config", str(cfg)]))
