"""The coarse-to-fine mesh stage (issue 23, item 3): the differentiable rasteriser, the mesh
fit state's checkpoints, and ``mvdiff text-to-3d --refine`` on a bundled asset's renders.

Seen on the busy 2-core machine: see ``test_refine_improves_on_the_field_stage``.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mvdiff.cli import main

ASSETS = Path(__file__).parent / "fixtures" / "assets"
CONFIG = Path(__file__).parents[1] / "infer" / "configs" / "reconstruct_cpu.yaml"


def sphere(radius=0.4, subdivisions=3):
    import trimesh

    m = trimesh.creation.icosphere(subdivisions, radius=radius)
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces)


def cameras(n=4, dist=2.0):
    from mvdiff.cameras import orbit_c2w

    el = np.array([0.0, 30.0, -20.0, 10.0][:n])
    az = np.array([0.0, 90.0, 200.0, 300.0][:n])
    return torch.from_numpy(orbit_c2w(el, az, dist)).float()


def test_silhouettes_are_the_z_buffer_coverage_and_antialiased():
    """Hard coverage = the existing silhouette rasteriser's; the soft silhouette's area is the
    disc's (an unbiased antialiased edge), and its gradient moves the contour's vertices."""
    from mvdiff.sds.mesh_raster import render_mesh
    from mvdiff.sds.raster import mesh_silhouettes

    v, f = sphere(0.4, 4)
    v.requires_grad_(True)
    c2w, res = cameras(), 64
    uv = torch.zeros(len(v), 2)
    tex = torch.full((1, 3, 8, 8), 0.25)
    out = render_mesh(v, f, uv, tex, c2w, 40.0, res, background=torch.ones(3))
    sil = mesh_silhouettes(v.detach(), f, c2w, 40.0, res)
    hard = out["opacity"] > 0.5
    assert (hard == (sil > 0.5)).float().mean() > 0.998
    f_px = (res / 2) / math.tan(math.radians(20))
    disc = math.pi * (f_px * math.tan(math.asin(0.4 / 2.0))) ** 2
    area = float(out["opacity"].detach().sum()) / len(c2w)
    assert abs(area - disc) / disc < 0.01, (area, disc)
    assert abs(float(sil.sum()) / len(c2w) - disc) / disc < 0.03
    inside = out["rgb"][:, :, res // 2, res // 2]
    assert torch.allclose(inside, torch.full_like(inside, 0.25), atol=1e-5)
    out["opacity"].sum().backward()
    moved = v.grad.norm(dim=-1) > 0
    # only contour vertices get a gradient, and it points outwards (more area)
    assert 0 < int(moved.sum()) < len(v)
    assert float((v.grad[moved] * v.detach()[moved]).sum(-1).mean()) > 0


def test_silhouette_loss_grows_a_small_sphere_to_the_target():
    from mvdiff.sds.mesh_raster import render_mesh

    c2w, res = cameras(), 48
    tv, tf = sphere(0.4, 3)
    uv, tex = torch.zeros(len(tv), 2), torch.zeros(1, 3, 4, 4)
    with torch.no_grad():
        target = render_mesh(tv, tf, uv, tex, c2w, 40.0, res)["opacity"]
    v, f = sphere(0.3, 3)
    off = torch.zeros_like(v, requires_grad=True)
    opt = torch.optim.Adam([off], lr=0.01)
    losses = []
    for _ in range(25):
        out = render_mesh(v + off, f, uv, tex, c2w, 40.0, res)["opacity"]
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    from mvdiff.sds.recon import silhouette_iou

    with torch.no_grad():
        start = render_mesh(v, f, uv, tex, c2w, 40.0, res)["opacity"]
        end = render_mesh(v + off, f, uv, tex, c2w, 40.0, res)["opacity"]
    iou0, iou1 = silhouette_iou(start, target), silhouette_iou(end, target)
    print("losses", losses[0], losses[-1], "IoU", iou0, iou1)
    assert losses[-1] < 0.2 * losses[0]
    assert iou0 < 0.6 and iou1 > 0.9


def _base(tmp_path):
    """A small textured base mesh written and loaded as the mesh stage does."""
    from mvdiff.sds.mesh import export_mesh, to_trimesh
    from mvdiff.sds.mesh_fit import load_base_mesh

    v, f = sphere(0.35, 2)
    colors = (v.numpy() + 0.5).clip(0, 1)
    path = tmp_path / "ball.ply"
    export_mesh(to_trimesh(v.numpy(), f.numpy(), colors, y_up=False), path)
    return load_base_mesh(path, texture_size=64)


def test_refine_from_mesh_welds_bakes_and_checkpoints_resume_exactly(tmp_path):
    """An untextured mesh gets an atlas and its vertex colours baked; the fit state's
    checkpoint resumes to the very same offsets and colours as an uninterrupted run."""
    from mvdiff.sds.config import TextTo3DConfig
    from mvdiff.sds.loop import load_checkpoint, restore, run_steps, save_checkpoint
    from mvdiff.sds.mesh_fit import MeshFitState

    base = _base(tmp_path)
    assert len(base["verts"]) == 162 and len(base["faces"]) == 320  # welded over seams
    assert base["texture"].shape == (64, 64, 3) and base["texture"].std() > 0.05
    c2w = cameras()
    cfg = TextTo3DConfig.reconstruction(sds_weight=0.0)
    cfg.refine.steps = 4
    fit = MeshFitState(cfg, base)
    with torch.no_grad():
        shown = fit.render(c2w, 40.0, 32, background=torch.ones(3))
    rgba = torch.cat([shown["rgb"] * 0.9, shown["opacity"]], 1)  # (V, 4, H, W) darker target
    views = {"rgba": rgba, "c2w": c2w, "fov_deg": torch.full((4,), 40.0)}
    rays = fit.prepare_ref(views, 32)

    full = MeshFitState(cfg, base)
    run_steps(full, cfg, 0, 4, rays=rays, progress=False)
    part = MeshFitState(cfg, base)
    run_steps(part, cfg, 0, 2, rays=rays, progress=False)
    save_checkpoint(part, cfg, tmp_path / "ck.pt", 2)
    again = MeshFitState(cfg, base)
    assert restore(again, load_checkpoint(tmp_path / "ck.pt"), tmp_path / "ck.pt") == 2
    run_steps(again, cfg, 2, 4, rays=rays, progress=False)
    assert torch.equal(again.offsets, full.offsets) and full.offsets.abs().max() > 0
    for a, b in zip(again.levels, full.levels):
        assert torch.equal(a, b)
    assert float(full.levels[0].abs().max()) > 0  # the colours moved towards the darker target


@pytest.fixture(scope="module")
def monkey_shard(tmp_path_factory):
    pytest.importorskip("bpy")
    from mvdiff.render.config import RenderConfig
    from mvdiff.render.runner import render_objects

    root = tmp_path_factory.mktemp("mesh_refine")
    src = root / "assets"
    src.mkdir()
    shutil.copy(ASSETS / "monkey.glb", src)
    out = root / "shard"
    cfg = RenderConfig(inputs=[str(src)], output=str(out), views=16, resolution=64,
                       samples=8, workers=1, timeout=120.0)  # fmt: skip
    assert render_objects(cfg, progress=False)["done"] == 1
    (shard,) = sorted(out.glob("*.tar"))
    return shard


@pytest.mark.slow
def test_refine_improves_on_the_field_stage(monkey_shard, tmp_path):
    """Reconstruction of the monkey (16 views, 64², two held out), then ``--refine``: the
    refined mesh's silhouettes match the renders better than the extracted mesh's and its
    Chamfer distance to the source is smaller; summary.json has both stages' metrics and
    refined.glb is UV-textured (its own texture file beside the field stage's).

    Its held-out PSNR beats the field's (the issue's bar). Seen on the busy 2-core machine
    (100 field + 30 mesh steps): IoU 0.964 -> 0.969, Chamfer 0.01486 -> 0.01467; held-out
    PSNR field 40.23 dB, extracted mesh 39.58, refined 41.06 (with the old pixel filter of
    1 px, silhouette sigma 0.5 px and texture rate 0.02: refined 39.49, below the field).
    """
    import trimesh

    run = tmp_path / "run"
    argv = ["text-to-3d", "--ref-views", str(monkey_shard), "--sds-weight", "0", "--config",
            str(CONFIG), "--steps", "100", "--output", str(run), "--no-progress",
            "--ref-holdout", "3,11", "--ref-mesh", str(ASSETS / "monkey.glb"), "--refine",
            "--refine-steps", "30", "--set", "texture_size=256", "--set", "turntable_frames=2"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    field, stage = summary["metrics"], summary["refine"]
    mesh, refined = stage["metrics_mesh"], stage["metrics"]
    print("field", field, "mesh", mesh, "refined", refined, "seconds", summary["stage_seconds"])
    assert mesh["chamfer"] == field["chamfer"]  # the stage starts from the exported mesh
    assert refined["mesh_iou_ref"] > mesh["mesh_iou_ref"]
    assert refined["chamfer"] < mesh["chamfer"]
    assert refined["psnr_holdout"] > field["psnr_holdout"]  # the bar
    assert refined["psnr_holdout"] > 30 and refined["mesh_iou_ref"] >= 0.8
    assert summary["stage_seconds"]["refine_fit"] > 0
    scene = trimesh.load(run / "refined.glb")
    (tm,) = scene.geometry.values()
    assert isinstance(tm.visual, trimesh.visual.TextureVisuals)
    assert tm.visual.material.baseColorTexture.size == (256, 256)
    assert "map_Kd refined_albedo.png" in (run / "refined.mtl").read_text()
    assert (run / "mesh_albedo.png").is_file() and (run / "refined_albedo.png").is_file()


def test_refine_flags_are_one_line_errors(tmp_path, capsys):
    base = ["text-to-3d", "--sds-weight", "0", "--output", str(tmp_path / "run"), "--no-progress",
            "--ref-views", str(tmp_path)]  # fmt: skip
    assert main([*base, "--refine-from", str(tmp_path / "nope.glb")]) == 2
    assert "--refine-from" in capsys.readouterr().err
    assert main([*base, "--refine", "--refine-steps", "0"]) == 2
    assert "--refine-steps" in capsys.readouterr().err
    assert main([*base, "--refine", "--set", "refine.backend=x"]) == 2
    assert "refine.backend" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvdiffrast_visibility_matches_torch():
    pytest.importorskip("nvdiffrast")
    import nvdiffrast.torch as dr

    from mvdiff.sds.mesh_raster import render_mesh

    v, f = sphere(0.4, 4)
    v, f = v.cuda(), f.cuda()
    c2w, res = cameras().cuda(), 64
    uv = torch.rand(len(v), 2, generator=torch.Generator().manual_seed(0)).cuda()
    tex = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)).cuda()
    a = render_mesh(v, f, uv, tex, c2w, 40.0, res, backend="torch")
    ctx = dr.RasterizeCudaContext()
    b = render_mesh(v, f, uv, tex, c2w, 40.0, res, backend="nvdiffrast", ctx=ctx)
    assert (a["opacity"] - b["opacity"]).abs().max() < 1e-4
    assert ((a["rgb"] - b["rgb"]).abs() > 1e-3).float().mean() < 0.002  # ties may differ


@pytest.mark.slow
def test_refine_from_a_mesh_with_the_sds_prior_writes_and_resumes(tmp_path, capsys):
    """``--refine-from`` with the multi-view SDS prior (a tiny pipeline): the mesh stage alone,
    refined.glb UV-textured, its checkpoint resumed by ``--resume`` with more steps."""
    import trimesh

    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.testing import tiny_components

    model = tmp_path / "model"
    MVDreamPipeline(**tiny_components(0)).save_pretrained(model)
    from mvdiff.sds.mesh import export_mesh, to_trimesh

    v, f = sphere(0.35, 2)
    export_mesh(to_trimesh(v.numpy(), f.numpy(), (v.numpy() + 0.5).clip(0, 1)), tmp_path / "b.glb")
    out = tmp_path / "run"
    argv = ["text-to-3d", "--model", str(model), "--prompt", "a ball", "--output", str(out),
            "--fast", "--refine-from", str(tmp_path / "b.glb"), "--refine-steps", "2",
            "--shading", "random", "--no-progress", "--set", "refine.render_size=32",
            "--set", "texture_size=64"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["refine"]["steps"] == 2 and "fit" not in summary["stage_seconds"]
    assert not (out / "checkpoint.pt").exists() and not (out / "mesh.glb").exists()
    (mesh,) = trimesh.load(out / "refined.glb").geometry.values()
    assert mesh.visual.kind == "texture" and len(mesh.faces) == 320
    state = torch.load(out / "refine_checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["mesh"]["offsets"].abs().max() > 0
    argv[argv.index("--refine-steps") + 1] = "3"
    assert main([*argv, "--resume"]) == 0
    assert "resumed the mesh stage" in capsys.readouterr().out
    assert torch.load(out / "refine_checkpoint.pt", weights_only=True)["step"] == 3
    assert not list(out.glob("*.tmp"))
