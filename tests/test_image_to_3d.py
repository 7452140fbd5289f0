"""`mvdiff image-to-3d`: a photo as a posed front view + image-conditioned multi-view SDS."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from mvdiff.cli import main
from mvdiff.pipelines import MVDreamPipeline
from mvdiff.testing import tiny_components, tiny_image_components

#: reference-view PSNR / mask IoU after 60 photo-only steps at 32² (seen 30.9 dB / 0.993;
#: an untrained field: ~8 dB / 0.13)
REF_PSNR = 22.0
REF_IOU = 0.8


def two_blocks(size=64, alpha=True):
    """A red block at the upper left, a blue one at the lower right; RGBA (transparent
    elsewhere) or RGB on white."""
    rgba = np.zeros((size, size, 4), np.uint8)
    if not alpha:
        rgba[...] = 255
    s = size / 64
    rgba[int(14 * s) : int(30 * s), int(12 * s) : int(28 * s)] = [220, 40, 30, 255]
    rgba[int(34 * s) : int(50 * s), int(34 * s) : int(50 * s)] = [30, 60, 220, 255]
    return PIL.Image.fromarray(rgba if alpha else rgba[..., :3])


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagedream") / "model"
    MVDreamPipeline(**tiny_image_components(0)).save_pretrained(folder)
    return folder


def load_field(run):
    from mvdiff.sds.field import FieldConfig, RadianceField

    state = torch.load(run / "checkpoint.pt", weights_only=True)
    field = RadianceField(FieldConfig(**state["config"]["field"]))
    field.load_state_dict(state["field"])
    return field


@torch.no_grad()
def density_map(field, n=24):
    """Density summed along y (the front camera's viewing axis) on an (x, z) grid:
    ``[z, x]`` with row 0 at the top (+z) and column 0 at the left (-x)."""
    b = float(field.bound)
    lin = torch.linspace(-b, b, n)
    x, y, z = torch.meshgrid(lin, lin, lin, indexing="ij")
    pts = torch.stack([x, y, z], -1).reshape(-1, 3)  # (n, n, n, 3) -> (n^3, 3)
    sigma, _ = field(pts)
    s = sigma.reshape(n, n, n).sum(1)  # (x, y, z) -> (x, z)
    return s.T.flip(0)  # (x, z) -> (z, x) -> top row is +z


def test_photo_only_fits_the_reference_view_in_the_camera_convention(tmp_path, capsys):
    """--sds-weight 0: the render at the front camera matches the photo (PSNR, mask IoU in
    summary.json), and the field puts the photo's upper-left block at -x, +z (azimuth 0 looks
    along +y from -y, +z up: the convention of mvdiff.cameras)."""
    photo = tmp_path / "photo.png"
    two_blocks().save(photo)
    out = tmp_path / "run"
    argv = ["image-to-3d", str(photo), "--output", str(out), "--sds-weight", "0", "--fast",
            "--steps", "60", "--lr", "0.05", "--samples", "32", "--mesh-resolution", "24",
            "--set", "turntable_frames=4", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "reference view PSNR" in printed
    for name in ("mesh.glb", "mesh.obj", "mesh.ply", "turntable.gif", "views.png", "view_03.png",
                 "input.png", "reference.png", "checkpoint.pt", "config.json", "summary.json"):  # fmt: skip
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    print(f"photo-only fit: PSNR {summary['reference_psnr']} dB IoU {summary['reference_iou']}")
    assert summary["reference_psnr"] > REF_PSNR and summary["reference_iou"] > REF_IOU
    m = density_map(load_field(out))
    h = m.shape[0] // 2
    upper_left, upper_right = m[:h, :h].sum(), m[:h, h:].sum()
    lower_left, lower_right = m[h:, :h].sum(), m[h:, h:].sum()
    assert upper_left > 3 * max(upper_right, lower_left)
    assert lower_right > 3 * max(upper_right, lower_left)


def test_sds_calls_the_prior_with_the_photo(tmp_path, monkeypatch):
    """The SDS UNet call: 4 views + a zero-camera reference frame; the conditional half gets
    the photo's vision-tower tokens and VAE latent, the unconditional half zeros."""
    from mvdiff.sds.image_to_3d import ImageTo3DConfig, image_to_3d, load_photo

    torch.set_num_threads(1)
    pipe = MVDreamPipeline(**tiny_image_components(0))
    photo = tmp_path / "photo.png"
    two_blocks().save(photo)
    calls = []
    forward = pipe.unet.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    config = ImageTo3DConfig.fast(steps=2, samples=8, mesh_resolution=16, turntable_frames=4)
    summary = image_to_3d(pipe, config, photo, tmp_path / "run", progress=False, log=lambda m: 0)
    assert len(calls) == 2 and summary["t"] is not None
    kw = calls[0]
    assert kw["num_views"] == 5
    cam = kw["camera"]  # (2 halves * 5 frames, 16)
    assert cam.shape == (10, 16) and not cam[4].any() and not cam[9].any()
    assert cam[:4].abs().sum(1).min() > 0 and torch.equal(cam[:5], cam[5:])
    embeds, ref = kw["image_embeds"], kw["reference_latents"]
    assert embeds.shape == (2, 5, 32) and ref.shape == (2, 4, 8, 8)
    assert embeds[0].abs().max() > 0 and not embeds[1].any()  # cond: the photo; uncond: zeros
    assert ref[0].abs().max() > 0 and not ref[1].any()
    framed = load_photo(photo, config.ref_object_fraction)["array"]  # (64, 64, 4)
    image = pipe.composite_image(PIL.Image.fromarray(framed), 1.0)
    want, _ = pipe.encode_image([image], 64, 64)
    torch.testing.assert_close(embeds[:1], want)


def test_image_to_3d_end_to_end_with_the_prior_and_depth(tmp_path, image_folder):
    """The command with a tiny ImageDream folder, an RGB photo on white and a depth map."""
    photo = tmp_path / "photo.png"
    two_blocks(48, alpha=False).save(photo)
    depth = tmp_path / "depth.png"
    ramp = np.linspace(0, 255, 48).round().astype(np.uint8)
    PIL.Image.fromarray(np.tile(ramp, (48, 1))).save(depth)  # disparity rising to the right
    out = tmp_path / "run"
    argv = ["image-to-3d", str(photo), "--model", str(image_folder), "--output", str(out),
            "--prompt", "two blocks", "--fast", "--steps", "3", "--samples", "16",
            "--mesh-resolution", "24", "--depth", str(depth), "--elevation", "10", "--fov", "35",
            "--set", "turntable_frames=4", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["loss"]) and summary["t"] is not None
    config = json.loads((out / "config.json").read_text())
    assert config["ref_elevation_deg"] == 10 and config["ref_fov_deg"] == 35
    assert config["prompt"] == "two blocks"
    assert config["sds"]["guidance_scale"] == 5.0  # ImageDream's, not MVDream's 50
    assert (out / "mesh.glb").is_file() and not list(out.glob(".*.tmp"))


def test_photo_framing(tmp_path):
    """The object is cropped, scaled to ref_object_fraction of the frame and centred (RGBA:
    transparent around it; RGB: the border colour); None pads the photo to a square as is;
    a depth map gets the same framing."""
    from mvdiff.sds.image_to_3d import load_depth, load_photo

    rgba = np.zeros((40, 80, 4), np.uint8)
    rgba[4:14, 6:26] = [200, 50, 40, 255]  # a 10 x 20 object at the upper left
    PIL.Image.fromarray(rgba).save(tmp_path / "a.png")
    depth = np.zeros((40, 80), np.uint16)
    depth[4:14, 6:26] = 1000
    PIL.Image.fromarray(depth).save(tmp_path / "d.png")

    def box(alpha):
        rows, cols = (alpha > 0.5).any(1).nonzero()[:, 0], (alpha > 0.5).any(0).nonzero()[:, 0]
        return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1

    photo = load_photo(tmp_path / "a.png", 0.5)
    x = photo["rgba"]
    assert x.shape == (1, 4, 80, 80) and photo["array"].shape == (80, 80, 4)
    assert box(x[0, 3]) == (30, 20, 50, 60)  # 20 x 40 = half of 80 on the longer side, centred
    torch.testing.assert_close(x[0, :3, 40, 40], torch.tensor([200, 50, 40]) / 255.0)
    d = load_depth(tmp_path / "d.png", photo)
    assert d.shape == (1, 1, 80, 80) and box(d[0, 0] / 1000) == (30, 20, 50, 60)

    kept = load_photo(tmp_path / "a.png", None)["rgba"]
    assert box(kept[0, 3]) == (24, 6, 34, 26)  # padded by 20 rows above, nothing moved

    rgb = np.full((40, 40, 3), 250, np.uint8)
    rgb[2:12, 2:12] = [10, 20, 200]
    PIL.Image.fromarray(rgb).save(tmp_path / "b.png")
    photo = load_photo(tmp_path / "b.png", 0.5)
    assert not photo["has_alpha"] and box(photo["rgba"][0, 3]) == (10, 10, 30, 30)
    assert photo["array"][0, 0].tolist() == [250, 250, 250]  # the border colour around it


def test_image_to_3d_resumes(tmp_path, capsys):
    photo = tmp_path / "photo.png"
    two_blocks(32).save(photo)
    out = tmp_path / "run"
    argv = ["image-to-3d", str(photo), "--output", str(out), "--sds-weight", "0", "--fast",
            "--steps", "3", "--samples", "8", "--mesh-resolution", "16",
            "--set", "turntable_frames=2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    before = torch.load(out / "checkpoint.pt", weights_only=True)
    assert before["step"] == 3
    argv[argv.index("--steps") + 1] = "5"
    assert main([*argv, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    after = torch.load(out / "checkpoint.pt", weights_only=True)
    assert after["step"] == 5
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 3
    assert any(not torch.equal(before["field"][k], after["field"][k]) for k in before["field"])
    (out / "checkpoint.pt").write_bytes(b"junk")
    assert main([*argv, "--resume"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_config_file_set_and_flags(tmp_path):
    """Preset, then --config, then --set, then the flags (as text-to-3d)."""
    from mvdiff.sds.image_to_3d import ImageTo3DConfig

    photo = tmp_path / "photo.png"
    two_blocks(32).save(photo)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ref_elevation_deg: 7\nsds: {guidance_scale: 3}\nsamples: 12\n")
    out = tmp_path / "run"
    argv = ["image-to-3d", str(photo), "--output", str(out), "--sds-weight", "0", "--fast",
            "--steps", "1", "--config", str(cfg), "--set", "depth_weight=0.2", "--set",
            "samples=9", "--fov", "30", "--object-fraction", "0", "--mesh-resolution", "16",
            "--set", "turntable_frames=2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["ref_elevation_deg"] == 7 and saved["sds"]["guidance_scale"] == 3
    assert saved["depth_weight"] == 0.2 and saved["samples"] == 9 and saved["ref_fov_deg"] == 30
    assert saved["ref_object_fraction"] is None
    assert ImageTo3DConfig.from_dict(saved).ref_elevation_deg == 7


def test_image_to_3d_errors(tmp_path, capsys):
    text_folder = tmp_path / "text"
    MVDreamPipeline(**tiny_components(0)).save_pretrained(text_folder)
    photo = tmp_path / "photo.png"
    two_blocks().save(photo)
    out = tmp_path / "out"

    def err(*argv):
        assert main(["image-to-3d", *argv, "--output", str(out), "--fast", "--steps", "1"]) == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
        assert len(lines) == 1 and lines[0].startswith("mvdiff image-to-3d: error: ")
        return lines[0]

    assert "nope.png: no such photo" in err(str(tmp_path / "nope.png"), "--sds-weight", "0")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert "bad.png: not a readable image" in err(str(tmp_path / "bad.png"), "--sds-weight", "0")
    PIL.Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(tmp_path / "empty.png")
    assert "no object" in err(str(tmp_path / "empty.png"), "--sds-weight", "0")
    PIL.Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "plain.png")
    assert "no object" in err(str(tmp_path / "plain.png"), "--sds-weight", "0")
    line = err(str(photo), "--model", str(text_folder))
    assert "not an ImageDream model" in line and "convert an ImageDream checkpoint" in line
    assert "--model is required" in err(str(photo))
    assert "--depth" in err(str(photo), "--sds-weight", "0", "--depth", str(tmp_path / "no.png"))
    PIL.Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small.png")
    assert "photo's size" in err(
        str(photo), "--sds-weight", "0", "--depth", str(tmp_path / "small.png")
    )
    assert "unknown key" in err(str(photo), "--sds-weight", "0", "--set", "nope=1")
    assert "--fov" in err(str(photo), "--sds-weight", "0", "--fov", "200")
    assert not out.exists()


def test_depth_loss_is_scale_and_shift_invariant():
    """1 - Pearson: 0 for the rendered depth itself (any scale/shift), 2 for its negation;
    disparity maps count as negated depth; the gradient reaches the field."""
    from mvdiff.sds.image_to_3d import ImageTo3DConfig, depth_loss, reference_view
    from mvdiff.sds.loop import FitState
    from mvdiff.sds.ref_views import prepare_rays
    from mvdiff.sds.render import render_rays

    config = ImageTo3DConfig.fast(samples=16, ref_rays=0, depth_kind="depth")
    fit = FitState(config)
    photo = {"rgba": torch.ones(1, 4, 16, 16), "background": None, "has_alpha": True}
    rays = prepare_rays(reference_view(photo, config), 16)
    with torch.no_grad():
        fit.occupancy.update(fit.field, fit.generator)
        out = render_rays(fit.field, rays["o"], rays["d"], 16, stratified=True,
                          generator=torch.Generator().manual_seed(1), occupancy=fit.occupancy)  # fmt: skip
    own = (out["depth"] / out["opacity"].clamp(min=1e-3)).reshape(-1)  # (R, 1) -> (R,)
    hit = own > 0.1  # rays through some density
    own = own[hit]
    assert hit.sum() > 50 and own.std() > 0
    d = {"o": rays["o"][hit], "d": rays["d"][hit]}

    def loss(target, kind="depth"):
        config.depth_kind = kind
        fit.generator.manual_seed(1)
        return depth_loss(fit, {**d, "depth": target}, config)

    with torch.no_grad():
        assert float(loss(own)) < 0.05 and float(loss(3 * own + 5)) < 0.05
        assert float(loss(-own)) > 1.95 and float(loss(1 / own, "disparity")) < 0.2
    value = loss(-own)
    value.backward()
    grads = [p.grad for p in fit.field.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_interrupt_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """Ctrl-C mid-run: exit 130, the note names the kept checkpoint, --resume continues."""
    import mvdiff.sds.loop as loop

    photo = tmp_path / "photo.png"
    two_blocks(32).save(photo)
    out = tmp_path / "run"
    real = loop.train_step

    def interrupted(fit, config, step, **kw):
        if step == 3:
            raise KeyboardInterrupt
        return real(fit, config, step, **kw)

    monkeypatch.setattr(loop, "train_step", interrupted)
    argv = ["image-to-3d", str(photo), "--output", str(out), "--sds-weight", "0", "--fast",
            "--steps", "5", "--save-every", "2", "--samples", "8", "--mesh-resolution", "16",
            "--set", "turntable_frames=2", "--no-progress"]  # fmt: skip
    assert main(argv) == 130
    assert "checkpoint.pt (step 2) is kept" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (out / "summary.json").exists() and not list(out.glob(".*.tmp"))
    monkeypatch.setattr(loop, "train_step", real)
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 2


class ImageOracle:
    """An ImageDream-shaped oracle: rows whose object has the photo's image tokens and
    reference latent get the noise towards the ground-truth renders of the current cameras;
    rows with zero tokens (the unconditional half) get the noise towards grey."""

    def __init__(self, alphas_cumprod, sample_size, photo_latent):
        from types import SimpleNamespace

        self.ac = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
        self.config = SimpleNamespace(sample_size=sample_size)
        self.photo_latent, self.target, self.frames = photo_latent, None, []

    def __call__(self, sample, timestep, encoder_hidden_states=None, camera=None, num_views=1,
                 image_embeds=None, reference_latents=None):  # fmt: skip
        from types import SimpleNamespace

        objects = image_embeds.shape[0]  # both halves
        self.frames.append(num_views)
        n, c, h, w = sample.shape
        x0 = torch.zeros(objects, num_views, c, h, w)
        for k in range(objects):
            if image_embeds[k].any():
                torch.testing.assert_close(reference_latents[k : k + 1], self.photo_latent)
                assert not camera[(k + 1) * num_views - 1].any()  # the reference frame
                x0[k, : num_views - 1] = self.target
        x0 = x0.reshape(n, c, h, w)  # (objects, F, C, h, w) -> (objects*F, C, h, w)
        a = self.ac[torch.as_tensor(timestep).reshape(-1)].reshape(-1, 1, 1, 1)  # (N, 1, 1, 1)
        return SimpleNamespace(sample=(sample - a.sqrt() * x0) / (1 - a).sqrt())


def test_image_conditioned_sds_shapes_the_novel_views():
    """Photo at the front camera + image-conditioned SDS (an oracle prior that knows the object
    only through the conditional half) beats the photo alone on held-out views."""
    from mvdiff.sds.background import BackgroundConfig
    from mvdiff.sds.field import FieldConfig
    from mvdiff.sds.guidance import SDSConfig
    from mvdiff.sds.image_to_3d import ImageConditionedSDS, ImageTo3DConfig, reference_view
    from mvdiff.sds.loop import FitState, run_steps
    from mvdiff.sds.oracle import ReferenceObject
    from mvdiff.sds.ref_views import prepare_rays
    from mvdiff.sds.render import render
    from mvdiff.sds.text_to_3d import SDSTerm
    from mvdiff.testing import ddim_scheduler
    from tests.test_sds_recon import heldout_psnr

    res, samples, steps = 32, 32, 80
    gt = ReferenceObject()
    config = ImageTo3DConfig(
        steps=steps, render_size=res, render_size_late=res, samples=samples, lr=0.05, seed=1,
        occupancy_every=10, field=FieldConfig(resolutions=[12, 24, 48], hidden=32),
        sds=SDSConfig(guidance_scale=1.0, rescale=0.0, anneal_steps=steps), ref_rays=1024,
        background=BackgroundConfig(random_prob=0.5),
    )  # fmt: skip
    blank = {"rgba": torch.zeros(1, 4, res, res), "background": None, "has_alpha": True}
    view = reference_view(blank, config)
    with torch.no_grad():
        out = render(gt, view["c2w"], view["fov_deg"], res, 64, background=torch.zeros(3))
    a = out["opacity"]
    view["rgba"] = torch.cat([out["rgb"] / a.clamp(min=1e-6), a], 1).clamp(0, 1)  # (1, 4, r, r)
    rays = prepare_rays(view, res)
    ac = ddim_scheduler().alphas_cumprod
    photo_latent = view["rgba"][:, :3] * 2 - 1  # pixel space: the "VAE" is the identity

    def fit_psnr(with_sds: bool) -> float:
        oracle = ImageOracle(ac, res, photo_latent)
        guidance = ImageConditionedSDS(
            oracle, None, ac, config.sds, torch.ones(1, 4, 8), photo_latent
        )

        def point_oracle(group, background):
            with torch.no_grad():
                target = render(gt, group["c2w"], group["fov_deg"], res, samples,
                                background=background)  # fmt: skip
            oracle.target = target["rgb"] * 2 - 1

        no_text = torch.zeros(1, 1, 1)
        term = SDSTerm(guidance, no_text, no_text, use_camera=True, on_group=point_oracle)
        fit = FitState(config)
        run_steps(fit, config, 0, steps, sds=term if with_sds else None, rays=rays,
                  progress=False)  # fmt: skip
        assert oracle.frames == ([5] * steps if with_sds else [])
        return heldout_psnr(fit.field, gt)

    alone, prior = fit_psnr(False), fit_psnr(True)
    print(f"held-out PSNR: photo alone {alone:.1f} dB, photo + image-conditioned SDS {prior:.1f}")
    assert prior > alone + 3.0


def test_gaussians_representation(tmp_path, capsys):
    """representation=gaussians goes through the same interface (gaussians.ply besides the
    mesh); the depth loss is the field's only (one line)."""
    photo = tmp_path / "photo.png"
    two_blocks(32).save(photo)
    out = tmp_path / "run"
    argv = ["image-to-3d", str(photo), "--output", str(out), "--sds-weight", "0", "--fast",
            "--steps", "5", "--mesh-resolution", "16", "--set", "representation=gaussians",
            "--set", "turntable_frames=2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert (out / "gaussians.ply").is_file() and (out / "mesh.glb").is_file()
    assert 0 <= json.loads((out / "summary.json").read_text())["reference_iou"] <= 1
    depth = tmp_path / "d.png"
    PIL.Image.fromarray(np.zeros((32, 32), np.uint8)).save(depth)
    capsys.readouterr()
    assert main([*argv[:3], str(tmp_path / "o2"), *argv[4:], "--depth", str(depth)]) == 2
    assert "needs representation field" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_novel_views_use_imagedreams_camera_ranges(tmp_path, monkeypatch):
    """The SDS groups of image-to-3d are drawn from ImageDream's threestudio ranges
    (elevation [0, 5], fov [45, 50], relative radius [0.6, 0.75]: distance r / tan(fov/2)),
    text-to-3d keeps MVDream's."""
    import math

    from mvdiff.sds import text_to_3d as t3d
    from mvdiff.sds.image_to_3d import ImageTo3DConfig, image_to_3d
    from mvdiff.sds.text_to_3d import TextTo3DConfig

    config = ImageTo3DConfig.fast(steps=6, samples=8, mesh_resolution=16, turntable_frames=4)
    assert (config.sds_elevation_range, config.sds_fov_range) == ([0, 5], [45, 50])
    assert (config.sds_distance_mode, config.sds_distance_range) == ("relative", [0.6, 0.75])
    assert TextTo3DConfig().sds_fov_range == [15, 60]
    groups = []
    real = t3d.sample_sds_group

    def spy(*args, **kwargs):
        groups.append(real(*args, **kwargs))
        return groups[-1]

    monkeypatch.setattr(t3d, "sample_sds_group", spy)
    torch.set_num_threads(1)
    pipe = MVDreamPipeline(**tiny_image_components(0))
    photo = tmp_path / "photo.png"
    two_blocks().save(photo)
    image_to_3d(pipe, config, photo, tmp_path / "run", progress=False, log=lambda m: 0)
    assert len(groups) == 6
    for g in groups:
        elevation, fov = float(g["elevation_deg"][0]), float(g["fov_deg"][0])
        assert 0 <= elevation <= 5 and 45 <= fov <= 50
        r = g["c2w"][0, :3, 3].norm() * math.tan(math.radians(fov) / 2)
        assert 0.6 - 1e-5 <= float(r) <= 0.75 + 1e-5
    # a bad range is one line naming the key
    with pytest.raises(ValueError, match="sds_fov_range"):
        ImageTo3DConfig(sds_fov_range=[50, 45]).validate()


def test_text_to_3d_image_is_image_to_3d(tmp_path, capsys):
    """`mvdiff text-to-3d --image PHOTO ...` runs image-to-3d (its outputs, its flags)."""
    from mvdiff.commands.text_to_3d import image_alias

    assert image_alias(["text-to-3d", "--image", "p.png", "--fast"]) == [
        "image-to-3d", "p.png", "--fast"]  # fmt: skip
    assert image_alias(["text-to-3d", "--image=p.png"]) == ["image-to-3d", "p.png"]
    assert image_alias(["sample", "--image", "p.png"]) == ["sample", "--image", "p.png"]
    photo = tmp_path / "photo.png"
    two_blocks().save(photo)
    out = tmp_path / "run"
    argv = ["text-to-3d", "--output", str(out), "--image", str(photo), "--sds-weight", "0",
            "--fast", "--steps", "2", "--samples", "8", "--mesh-resolution", "16",
            "--elevation", "7", "--set", "turntable_frames=4", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "reference view PSNR" in capsys.readouterr().out
    assert (out / "input.png").is_file() and (out / "reference.png").is_file()
    assert json.loads((out / "config.json").read_text())["ref_elevation_deg"] == 7
    # a text-to-3d-only flag is refused by image-to-3d's parser
    with pytest.raises(SystemExit):
        main(["text-to-3d", "--image", str(photo), "--output", str(out), "--render-size", "32"])
    assert "unrecognized arguments: --render-size" in capsys.readouterr().err
