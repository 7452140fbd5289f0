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


#: held-out PSNR of `--ref-views` reconstructions (60 steps, 32²); seen ~30 / ~28 dB
REF_SHARD_PSNR = 24.0
REF_FOLDER_PSNR = 22.0


def read_obj(path):
    rows = path.read_text().splitlines()
    v = np.array([[float(x) for x in r.split()[1:4]] for r in rows if r.startswith("v ")])
    f = np.array([[int(x.split("/")[0]) - 1 for x in r.split()[1:]] for r in rows
                  if r.startswith("f ")])  # fmt: skip  # "f v/vt ..." with a texture
    return v, f


def test_text_to_3d_writes_outputs_and_resumes(tmp_path, tiny_folder, capsys):
    out = tmp_path / "run"
    argv = ["text-to-3d", "--model", str(tiny_folder), "--prompt", "a corgi", "--output",
            str(out), "--fast", "--steps", "3", "--mesh-resolution", "24", "--samples", "16"]  # fmt: skip
    assert main(argv) == 0
    for name in ("checkpoint.pt", "views.png", "mesh.glb", "mesh.obj", "mesh.ply", "config.json"):
        assert (out / name).exists(), name
    for v in range(4):
        assert (out / f"view_{v:02d}.png").exists()
    assert not list(out.glob("*.tmp"))
    import trimesh

    glb = trimesh.load(out / "mesh.glb")
    (mesh,) = glb.geometry.values()
    assert len(mesh.faces) > 0 and mesh.visual.kind == "texture"  # UV atlas + baked albedo
    from PIL import Image

    with Image.open(out / "turntable.gif") as gif:
        assert gif.n_frames == 12 and gif.size == (64, 64)
    v, f = read_obj(out / "mesh.obj")
    assert len(f) > 0 and f.max() < len(v)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3
    assert json.loads((out / "config.json").read_text())["prompt"] == "a corgi"

    # Resume: continues from step 3 to 5 and changes the field.
    before = {k: t.clone() for k, t in state["field"].items()}
    argv[argv.index("--steps") + 1] = "5"
    assert main([*argv, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    state = torch.load(out / "checkpoint.pt", weights_only=True)
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
    end = heldout_psnr(load_field(run), gt)
    print(f"--ref-views shard reconstruction (60 steps): held-out PSNR {end:.1f} dB")
    assert end > REF_SHARD_PSNR


def load_field(run):
    from mvdiff.sds.field import FieldConfig, RadianceField

    state = torch.load(run / "checkpoint.pt", weights_only=True)
    field = RadianceField(FieldConfig(**state["config"]["field"]))
    field.load_state_dict(state["field"])
    return field


def test_text_to_3d_ref_views_reconstructs_an_mvdiff_sample_folder(tmp_path, capsys):
    """`--ref-views FOLDER` with what `mvdiff sample` writes (RGB view_XX.png on a white
    background, cameras.json with unit-distance c2w and no fov): the 4 views of the analytic
    object at elevation 15; no --model needed with --sds-weight 0. The mask comes from the
    background colour; held-out PSNR (other elevations and azimuths) above REF_FOLDER_PSNR."""
    from PIL import Image

    from mvdiff.commands.sample import SampleSettings, cameras_record
    from mvdiff.sds.oracle import ReferenceObject
    from mvdiff.sds.ref_views import load_sample_folder
    from mvdiff.sds.render import render
    from tests.test_sds_recon import heldout_psnr

    folder = tmp_path / "sample"
    folder.mkdir()
    settings = SampleSettings(model="m", prompt="a thing", num_views=4, height=32, width=32)
    record = cameras_record(settings, torch.zeros(4, 16))
    (folder / "cameras.json").write_text(json.dumps(record))
    c2w = torch.tensor([v["c2w"] for v in record["views"]], dtype=torch.float32)
    c2w[:, :3, 3] *= (3**0.5 / 2) / np.sin(np.radians(20.0))  # the loader's framing distance
    gt = ReferenceObject()
    with torch.no_grad():
        rgb = render(gt, c2w, 40.0, 32, 64, background=torch.ones(3))["rgb"]
    arr = (rgb.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(
        np.uint8
    )  # (V, 3, H, W) -> (V, H, W, 3)
    for v, view in enumerate(record["views"]):
        Image.fromarray(arr[v]).save(folder / view["file"])

    views = load_sample_folder(folder)
    assert not views["has_alpha"] and torch.allclose(views["background"], torch.ones(3), atol=0.01)
    torch.testing.assert_close(views["c2w"], c2w)
    alpha = views["rgba"][:, 3]
    assert alpha[:, 0, 0].max() == 0 and alpha[:, 16, 16].min() == 1  # empty corner, solid centre

    run = tmp_path / "run"
    argv = ["text-to-3d", "--prompt", "a thing", "--output", str(run), "--fast", "--steps", "60",
            "--lr", "0.05", "--mesh-resolution", "24", "--samples", "32", "--ref-views",
            str(folder), "--sds-weight", "0", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "mask estimated" in capsys.readouterr().out
    end = heldout_psnr(load_field(run), gt, background=torch.ones(3))
    print(f"--ref-views sample-folder reconstruction (60 steps): held-out PSNR {end:.1f} dB")
    assert end > REF_FOLDER_PSNR


def test_text_to_3d_ref_views_errors(tmp_path, capsys):
    base = ["text-to-3d", "--prompt", "x", "--output", str(tmp_path / "o"), "--sds-weight", "0"]
    assert main([*base, "--ref-views", str(tmp_path / "nope")]) == 2
    assert "--ref-views" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*base, "--ref-views", str(tmp_path / "empty")]) == 2
    assert "cameras.json" in capsys.readouterr().err
    assert main(["text-to-3d", "--prompt", "x", "--output", str(tmp_path / "o")]) == 2
    assert "--model" in capsys.readouterr().err


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


def test_text_to_3d_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["text-to-3d", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--output", "--steps", "--fast", "--config", "--set",
                 "--resume", "--ref-views", "--sds-weight", "--shading", "--background",
                 "--ref-mask", "--guidance", "--rescale", "--form", "mesh.glb"):  # fmt: skip
        assert flag in text, flag


def test_text_to_3d_env_background_random_shading_and_resume(tmp_path, tiny_folder):
    """The optional background MLP and random shading run in the loop, are checkpointed and
    resume (shading_probs without albedo so that lambertian/textureless are drawn)."""
    out = tmp_path / "run"
    argv = ["text-to-3d", "--model", str(tiny_folder), "--prompt", "a corgi", "--output",
            str(out), "--fast", "--steps", "2", "--mesh-resolution", "16", "--samples", "8",
            "--render-size", "16", "--background", "env", "--shading", "random",
            "--set", "shading_probs=[0, 1, 1]", "--set", "turntable_frames=2",
            "--set", "render_size_late=16", "--set", "background.random_prob=0",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    env = {k: v.clone() for k, v in state["background"].items()}
    assert any(k.startswith("env.") for k in env)
    assert json.loads((out / "config.json").read_text())["background"]["mode"] == "env"
    argv[argv.index("--steps") + 1] = "4"
    assert main([*argv, "--resume"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    assert any(not torch.equal(env[k], state["background"][k]) for k in env)  # env trained
    # Resuming with another field or background is a one-line error, not a state-dict trace.
    assert main([*argv, "--resume", "--background", "solid"]) == 2
    assert main([*argv, "--resume", "--set", "field.hidden=8"]) == 2


def test_text_to_3d_shipped_configs_load():
    from pathlib import Path

    from mvdiff.cli import build_parser
    from mvdiff.commands.text_to_3d import resolve_config
    from mvdiff.sds.config import TextTo3DConfig

    root = Path(__file__).resolve().parents[1] / "infer" / "configs"
    parser = build_parser()
    base = ["text-to-3d", "--model", "m", "--prompt", "a corgi", "--output", "o", "--config"]
    gpu = resolve_config(parser.parse_args([*base, str(root / "text_to_3d.yaml")]))
    assert gpu == TextTo3DConfig(prompt="a corgi")  # the file spells out the defaults
    recon = resolve_config(
        parser.parse_args([*base, str(root / "reconstruct_cpu.yaml"), "--ref-views", str(root)])
    )
    want = TextTo3DConfig.reconstruction(prompt="a corgi", ref_views=str(root), save_every=100)
    assert recon == want  # ... and the reconstruction preset
