"""Radiance field, renderer and SDS guidance (issue 7): fast unit tests."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mvdiff.cameras import camera_vectors, orbit_c2w, sample_sds_group
from mvdiff.sds.field import FieldConfig, RadianceField
from mvdiff.sds.guidance import MultiViewSDS, SDSConfig, timestep_bounds
from mvdiff.sds.oracle import ReferenceObject
from mvdiff.sds.render import OccupancyGrid, camera_rays, ray_box, render
from mvdiff.testing import tiny_components


def small_field(seed=0):
    torch.manual_seed(seed)
    return RadianceField(FieldConfig(resolutions=[8, 16], hidden=16))


def test_rays_follow_camera_convention():
    # Camera at azimuth 0 / elevation 0 sits on -y and looks at the origin along +y;
    # image right is world +x and image up is world +z.
    c2w = torch.from_numpy(orbit_c2w(np.array([0.0]), np.array([0.0]), 3.0)).float()
    o, d = camera_rays(c2w, 60.0, 4)
    assert torch.allclose(o[0, 0, 0], torch.tensor([0.0, -3.0, 0.0]), atol=1e-6)
    centre = F.normalize(d[0, 1:3, 1:3].mean(dim=(0, 1)), dim=0)  # (2, 2, 3) -> (3,)
    assert torch.allclose(centre, torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert d[0, :, -1, 0].min() > 0 and d[0, :, 0, 0].max() < 0  # right column looks to +x
    assert d[0, 0, :, 2].min() > 0 and d[0, -1, :, 2].max() < 0  # top row looks up (+z)
    # Corner pixel centre at fov 60: tan(30°) * (1 - 1/4) / 1 in both axes.
    k = math.tan(math.radians(30)) * 0.75
    expect = F.normalize(torch.tensor([-k, 1.0, k]), dim=0)
    assert torch.allclose(d[0, 0, 0], expect, atol=1e-6)


def test_ray_box_near_far_and_misses():
    o = torch.tensor([[0.0, -3.0, 0.0], [0.0, -3.0, 2.0]])
    d = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    near, far, hit = ray_box(o, d, 0.5)
    assert hit.tolist() == [True, False]
    assert torch.allclose(near[0], torch.tensor(2.5)) and torch.allclose(far[0], torch.tensor(3.5))


def test_blob_init_renders_centred_opaque_disc():
    field = small_field()
    c2w = torch.from_numpy(orbit_c2w(np.array([15.0]), np.array([30.0]), 2.0)).float()
    with torch.no_grad():
        out = render(field, c2w, 40.0, 32, num_samples=64, background=torch.zeros(3))
    op = out["opacity"][0, 0]
    assert op[16, 16] > 0.99 and op[0, 0] < 0.05 and op[-1, -1] < 0.05
    # Depth of the centre pixel is about distance - blob radius (density centred blob).
    assert 2.0 - 0.45 < float(out["depth"][0, 0, 16, 16]) < 2.0 - 0.2
    # Background colour black -> empty corners are black.
    assert float(out["rgb"][0, :, 0, 0].abs().max()) < 0.05


def test_render_matches_analytic_transmittance():
    # A constant-density field: opacity along a ray = 1 - exp(-sigma * chord length).
    class Constant(torch.nn.Module):
        bound = 0.5

        def forward(self, x):
            return torch.full((x.shape[0],), 2.0), torch.full((x.shape[0], 3), 0.25)

    c2w = torch.from_numpy(orbit_c2w(np.array([0.0]), np.array([0.0]), 3.0)).float()
    with torch.no_grad():
        out = render(Constant(), c2w, 10.0, 5, num_samples=32, background=torch.ones(3))
    expect = 1 - math.exp(-2.0 * 1.0)  # centre ray crosses the unit cube: chord 1
    assert abs(float(out["opacity"][0, 0, 2, 2]) - expect) < 1e-4
    rgb = float(out["rgb"][0, 0, 2, 2])
    assert abs(rgb - (0.25 * expect + (1 - expect))) < 1e-4


def test_occupancy_skips_empty_space_without_changing_the_image():
    gt = ReferenceObject()
    field = small_field()
    # Fit nothing: compare the reference object with and without an occupancy grid.
    occ = OccupancyGrid(gt.bound, 16, threshold=0.01)
    occ.values = None
    frac = occ.update(gt, torch.Generator().manual_seed(0))
    assert 0.05 < frac < 0.6
    g = sample_sds_group(torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = render(gt, g["c2w"], g["fov_deg"], 24, 32)
        fast = render(gt, g["c2w"], g["fov_deg"], 24, 32, occupancy=occ)
    assert fast["num_evaluated"] < 0.6 * full["num_evaluated"]
    assert float((full["rgb"] - fast["rgb"]).abs().max()) < 2e-2
    assert field.density(torch.zeros(1, 3)) > 10  # the blob initialisation


def test_packed_compositing_equals_the_dense_path_with_gradients():
    """render(..., packed=True) composites only the samples the occupancy grid keeps: the
    same images, opacity, depth, normals and field gradients as the dense [rays, samples]
    path, with stratified samples drawn from the same generator."""
    field = small_field(1)
    occ = OccupancyGrid(field.bound, 16, threshold=5.0)
    occ.update(field, torch.Generator().manual_seed(0))
    assert 0.0 < float(occ.occupied.float().mean()) < 0.9  # some cells are skipped
    g = sample_sds_group(torch.Generator().manual_seed(3))
    light = F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    outs, grads = [], []
    for packed in (False, True):
        field.zero_grad()
        out = render(
            field, g["c2w"], g["fov_deg"], 12, 24, stratified=True, occupancy=occ,
            generator=torch.Generator().manual_seed(5), return_normals=True,
            shading="lambertian", light=light, background=torch.tensor([0.2, 0.4, 0.6]),
            packed=packed,
        )  # fmt: skip
        (out["rgb"] * torch.linspace(0, 1, 12)).sum().backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in field.parameters()])
    dense, packed = outs
    assert packed["num_evaluated"] == dense["num_evaluated"]
    assert float(dense["opacity"].amax()) > 0.5
    for key in ("rgb", "opacity", "depth", "normal"):
        torch.testing.assert_close(packed[key], dense[key], atol=1e-5, rtol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


def _aten_ops(fn) -> set[str]:
    """Names of the aten operators ``fn()`` runs (torch.profiler, CPU activity)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_sample_selection_with_a_fixed_budget_needs_no_host_read():
    """On an accelerator the occupancy grid selects samples with ``nonzero_static`` and a
    budget sized at ``update`` (issue 24: ``nonzero`` made the host wait every render). Forced
    on here: once a count exists, a packed render runs no ``nonzero`` (nor a boolean index,
    which runs one) and gives the images and gradients of the ``nonzero`` path; a budget that
    proves too small is grown at the next update and counted."""
    field = small_field(1)
    occ = OccupancyGrid(field.bound, 16, threshold=5.0)
    occ.static_budget = True
    occ.update(field, torch.Generator().manual_seed(0))
    g = sample_sds_group(torch.Generator().manual_seed(3))

    def run():
        field.zero_grad()
        out = render(
            field, g["c2w"], g["fov_deg"], 12, 24, stratified=True, occupancy=occ,
            generator=torch.Generator().manual_seed(5), return_normals=True, packed=True,
            background=torch.tensor([0.2, 0.4, 0.6]),
        )  # fmt: skip
        (out["rgb"] * torch.linspace(0, 1, 12)).sum().backward()
        return out, [p.grad.clone() for p in field.parameters()]

    exact, exact_grads = run()  # no budget yet: nonzero, and the count is recorded
    assert occ.budget is None
    occ.update(field, torch.Generator().manual_seed(0))
    assert occ.budget is not None and occ.budget >= exact["num_evaluated"]
    results = []
    ops = _aten_ops(lambda: results.append(run()))
    assert "aten::nonzero" not in ops and "aten::nonzero_static" in ops
    budgeted, grads = results[0]
    assert budgeted["num_evaluated"] == occ.budget
    for key in ("rgb", "opacity", "depth", "normal"):
        torch.testing.assert_close(budgeted[key], exact[key], atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, exact_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)

    occ.budget = exact["num_evaluated"] // 2  # too small: the last rays lose samples ...
    short, _ = run()
    assert float((short["opacity"] - exact["opacity"]).abs().amax()) > 1e-3
    occ.update(field, torch.Generator().manual_seed(0))  # ... until the next update grows it
    assert occ.overflows == 1 and occ.budget >= exact["num_evaluated"]


def test_render_gradients_and_normals():
    field = small_field()
    g = sample_sds_group(torch.Generator().manual_seed(0))
    out = render(field, g["c2w"], g["fov_deg"], 8, 16, stratified=True, return_normals=True)
    out["rgb"].mean().backward()
    assert field.encoding.grids[0].grad.abs().sum() > 0
    assert field.color_head.weight.grad.abs().sum() > 0
    # Normals of the blob point outwards: along the view direction's opposite at the centre.
    n = out["normal"][:, :, 4, 4]  # (V, 3) world normals of the centre pixels
    to_cam = F.normalize(g["c2w"][:, :3, 3], dim=-1)
    assert (n * to_cam).sum(-1).min() > 0.5


def test_timestep_annealing():
    cfg = SDSConfig(anneal_steps=100)
    assert timestep_bounds(0, cfg) == (980, 980)
    assert timestep_bounds(100, cfg) == (20, 500)
    assert timestep_bounds(10**6, cfg) == (20, 500)
    lo, hi = timestep_bounds(50, cfg)
    assert lo == 500 and hi == 740


# --- guidance against a hand-written reference of the formulas ----------------------------


def reference_sds(unet, vae, ac, rgb, cond, uncond, camera, t, noise, scale, rescale, form):
    """Straight transcription of the formulas: separate cond/uncond calls, a loop per group."""
    z = F.interpolate(rgb, size=(64, 64), mode="bilinear", align_corners=False)
    z = vae.encode(z * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    a = ac[t]
    n, v = z.shape[0], 4
    zt = a.sqrt() * z.detach() + (1 - a).sqrt() * noise
    ts = torch.full((n,), t)
    with torch.no_grad():
        e_c = unet(zt, ts, cond.repeat(n, 1, 1), camera=camera, num_views=v).sample
        e_u = unet(zt, ts, uncond.repeat(n, 1, 1), camera=camera, num_views=v).sample
    grad = torch.zeros_like(z)
    loss = 0.0
    for b in range(n // v):
        sl = slice(b * v, (b + 1) * v)
        eps = e_u[sl] + scale * (e_c[sl] - e_u[sl])
        x0 = (zt[sl] - (1 - a).sqrt() * eps) / a.sqrt()
        if rescale:
            x0_c = (zt[sl] - (1 - a).sqrt() * e_c[sl]) / a.sqrt()
            x0 = rescale * x0 * (x0_c.std() + 1e-8) / (x0.std() + 1e-8) + (1 - rescale) * x0
        if form == "x0":
            g = z[sl].detach() - x0
        else:
            eps = (zt[sl] - a.sqrt() * x0) / (1 - a).sqrt()
            g = (1 - a) * (eps - noise[sl])
        grad[sl] = g / n
        loss = loss + 0.5 * float((g**2).sum()) / n
    (grad_rgb,) = torch.autograd.grad(z, rgb, grad)
    return loss, grad, grad_rgb


@pytest.fixture(scope="module")
def tiny():
    return tiny_components()


@pytest.mark.parametrize("form", ["x0", "eps"])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_matches_reference(tiny, form, rescale):
    unet, vae = tiny["unet"], tiny["vae"]
    ac = tiny["scheduler"].alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    groups = [sample_sds_group(gen) for _ in range(2)]
    camera = torch.cat([g["camera"] for g in groups])  # 2 x (4, 16) -> (8, 16)
    rgb = torch.rand(8, 3, 32, 32, generator=gen, requires_grad=True)
    cond, uncond = torch.randn(1, 7, 32, generator=gen), torch.randn(1, 7, 32, generator=gen)
    noise = torch.randn(8, 4, 8, 8, generator=gen)
    t = 600
    sds = MultiViewSDS(
        unet, vae, ac, SDSConfig(guidance_scale=50.0, rescale=rescale, form=form, vae_sample=False)
    )
    assert sds.resolution == 64
    out = sds(rgb, cond, uncond, camera, t=t, noise=noise)
    z = out["latents"]
    z.retain_grad()
    out["loss"].backward()
    rgb2 = rgb.detach().clone().requires_grad_(True)
    loss, grad, grad_rgb = reference_sds(
        unet, vae, ac, rgb2, cond, uncond, camera, t, noise, 50.0, rescale, form
    )
    assert abs(float(out["loss"].detach()) - loss) <= 1e-4 * abs(loss)
    # The batched (cond + uncond in one call) and separate UNet calls differ by float
    # rounding, which CFG scale 50 amplifies: compare relative to the gradient's size.
    torch.testing.assert_close(z.grad, grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()))
    tol = 1e-4 * float(grad_rgb.abs().max())
    torch.testing.assert_close(rgb.grad, grad_rgb, rtol=1e-4, atol=tol)
    assert grad.abs().max() > 0 and loss > 0
    assert camera_vectors(groups[0]["c2w"]).shape == (4, 16)


def test_guidance_rescale_changes_the_gradient(tiny):
    # Guard against a rescale that is silently a no-op (the reference test would then pass
    # for both settings with the same numbers).
    unet, vae, ac = tiny["unet"], tiny["vae"], tiny["scheduler"].alphas_cumprod
    gen = torch.Generator().manual_seed(1)
    g = sample_sds_group(gen)
    rgb = torch.rand(4, 3, 32, 32, generator=gen)
    cond, uncond = torch.randn(1, 7, 32, generator=gen), torch.randn(1, 7, 32, generator=gen)
    noise = torch.randn(4, 4, 8, 8, generator=gen)
    losses = []
    for r in (0.0, 0.7):
        sds = MultiViewSDS(unet, vae, ac, SDSConfig(rescale=r, vae_sample=False))
        losses.append(float(sds(rgb, cond, uncond, g["camera"], t=500, noise=noise)["loss"]))
    assert abs(losses[0] - losses[1]) > 1e-3 * losses[0]


def test_guidance_rejects_bad_input(tiny):
    ac = tiny["scheduler"].alphas_cumprod
    with pytest.raises(ValueError, match="form"):
        MultiViewSDS(tiny["unet"], tiny["vae"], ac, SDSConfig(form="v"))
    sds = MultiViewSDS(tiny["unet"], tiny["vae"], ac)
    with pytest.raises(ValueError, match="num_views"):
        sds(torch.rand(3, 3, 8, 8), torch.zeros(1, 7, 32), torch.zeros(1, 7, 32), None)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_guidance_reads_x0_and_v_models_as_the_noise_they_imply(tiny, prediction_type):
    """A prior that predicts x0 (``sample``) or v gives SDS the same noise, guided x0 and
    loss as the eps prior it is equivalent to (the quickstart's model predicts x0)."""
    ac = tiny["scheduler"].alphas_cumprod
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 4, 8, 8, generator=gen)
    noise = torch.randn(4, 4, 8, 8, generator=gen)
    t = 400
    a = ac[t]
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = {"epsilon": noise, "sample": x0,
              "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction_type]  # fmt: skip

    class Oracle(torch.nn.Module):  # knows the clean latents: outputs its target type
        def forward(self, x, ts, encoder_hidden_states=None, camera=None, num_views=4):
            from types import SimpleNamespace

            return SimpleNamespace(sample=target.repeat(x.shape[0] // 4, 1, 1, 1))

    sds = MultiViewSDS(Oracle(), None, ac, SDSConfig(rescale=0.0),
                       prediction_type=prediction_type)  # fmt: skip
    text = torch.zeros(1, 7, 32)
    eps_c, eps_u = sds.predict_noise(noisy, t, text, text, None, 4)
    assert torch.allclose(eps_c, noise, atol=1e-4) and torch.allclose(eps_u, noise, atol=1e-4)
    guided, _ = sds.guided_x0(noisy, t, eps_c, eps_u, 4)
    assert torch.allclose(guided, x0, atol=1e-4)
    with pytest.raises(ValueError, match="prediction_type"):
        MultiViewSDS(Oracle(), None, ac, prediction_type="x0")


# --- mesh export ---------------------------------------------------------------------------


def test_marching_tetrahedra_ellipsoid_is_closed_oriented_and_accurate():
    from mvdiff.sds.mesh import marching_tetrahedra

    r, b, axes = 40, 0.6, np.array([0.4, 0.25, 0.3])
    lin = np.linspace(-b, b, r)
    pts = np.stack(np.meshgrid(lin, lin, lin, indexing="ij"), -1)  # (R, R, R, 3)
    vals = -np.linalg.norm(pts / axes, axis=-1)  # inside where > -1
    v, f = marching_tetrahedra(vals, -1.0, b)
    q = np.linalg.norm(v / axes, axis=-1)
    assert np.abs(q - 1).max() < 0.01  # vertices on the surface
    edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    _, count = np.unique(np.sort(edges, 1), axis=0, return_counts=True)
    assert set(count.tolist()) == {2}  # closed: every edge shared by two triangles
    _, dcount = np.unique(edges, axis=0, return_counts=True)
    assert set(dcount.tolist()) == {1}  # consistently oriented
    tri = v[f].astype(np.float64)
    volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
    assert abs(volume / (4 / 3 * np.pi * axes.prod()) - 1) < 0.02  # positive: faces outwards


def test_extract_mesh_and_export_glb_obj_ply(tmp_path):
    import trimesh

    from mvdiff.sds.mesh import Z_UP_TO_Y_UP, export_mesh, extract_mesh, to_trimesh

    field = small_field()
    v, f, c = extract_mesh(field, resolution=24)
    assert len(f) > 100 and c.shape == v.shape and c.min() >= 0 and c.max() <= 1
    radius = np.linalg.norm(v, axis=1)
    # the centred blob, as far out as its rendered opacity reaches 0.5 (the chosen level)
    assert 0.15 < radius.mean() < 0.5 and radius.std() < 0.05
    c = np.random.default_rng(0).random(v.shape)  # distinct colours to check the round trip
    mesh = to_trimesh(v, f, c)
    want_rgb = np.clip(c * 255 + 0.5, 0, 255).astype(np.uint8)
    for name in ("m.glb", "m.obj", "m.ply"):
        path = export_mesh(mesh, tmp_path / name)
        back = trimesh.load(path, process=False)
        if isinstance(back, trimesh.Scene):
            (back,) = back.geometry.values()
        assert len(back.vertices) == len(v) and len(back.faces) == len(f), name
        np.testing.assert_allclose(back.vertices, v @ Z_UP_TO_Y_UP.T, atol=1e-5)  # +Y up
        assert back.visual.kind == "vertex", name
        got = np.asarray(back.visual.vertex_colors)[:, :3].astype(int)
        assert np.abs(got - want_rgb).max() <= 1, name
        assert back.is_watertight and back.volume > 0, name  # closed, faces outwards
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="format"):
        export_mesh(mesh, tmp_path / "m.stl")


# --- background and shading ----------------------------------------------------------------


def test_solid_background_random_augmentation():
    from mvdiff.sds.background import Background, BackgroundConfig

    bg = Background(BackgroundConfig(color=[0.0, 0.5, 1.0], random_prob=0.5))
    gen = torch.Generator().manual_seed(0)
    draws = [bg.sample(4, gen) for _ in range(40)]
    plain = [d for d in draws if torch.equal(d, torch.tensor([[0.0, 0.5, 1.0]] * 4))]
    assert 5 < len(plain) < 35  # about half the steps keep the configured colour
    rand = [d for d in draws if not torch.equal(d, torch.tensor([[0.0, 0.5, 1.0]] * 4))]
    assert all(torch.equal(d, d[:1].expand(4, 3)) for d in rand)  # one colour per view group
    per_ray = next(d for d in (bg.sample(64, gen, per_item=True) for _ in range(20)) if d.std() > 0)
    assert per_ray[:, 0].unique().numel() == 64  # independent colours per ray
    assert all(torch.equal(bg.sample(4, gen, training=False), plain[0]) for _ in range(10))


def test_environment_background_is_learnable_and_direction_dependent():
    from mvdiff.sds.background import Background, BackgroundConfig

    bg = Background(BackgroundConfig(mode="env", random_prob=0.0))
    env = bg.sample(4, torch.Generator().manual_seed(0))
    assert env is bg.env and callable(env)
    # Far from the object, the render is the environment map along each ray.
    empty = small_field()
    g = sample_sds_group(torch.Generator().manual_seed(0))
    out = render(empty, g["c2w"], g["fov_deg"], 8, 8, background=env)
    torch.nn.init.normal_(bg.env.mlp[2].weight, std=1.0)  # make it direction dependent
    out = render(empty, g["c2w"], g["fov_deg"], 8, 8, background=env)
    corner = out["rgb"][:, :, 0, 0]  # (V, 3) — empty space, pure background
    assert torch.allclose(corner, out["background"][:, :, 0, 0], atol=1e-3)
    assert out["background"].std(dim=(2, 3)).mean() > 1e-3  # varies across the image
    out["rgb"].mean().backward()
    assert bg.env.mlp[0].weight.grad.abs().sum() > 0  # trained with the field
    with pytest.raises(ValueError, match="mode"):
        Background(BackgroundConfig(mode="sky"))


def test_normals_of_a_blob_point_outwards():
    field = small_field()
    gen = torch.Generator().manual_seed(0)
    dirs = F.normalize(torch.randn(200, 3, generator=gen), dim=-1)
    pts = dirs * 0.3  # on a sphere inside the blob, where the density falls off outwards
    n = field.normals(pts)
    assert (n * dirs).sum(-1).min() > 0.9
    sigma, color, n2 = field.forward_with_normals(pts)
    s_ref, c_ref = field(pts)
    torch.testing.assert_close(n2, n)
    torch.testing.assert_close(sigma, s_ref)
    torch.testing.assert_close(color, c_ref)


def test_shading_changes_the_render_and_is_differentiable():
    from mvdiff.sds.render import sample_light

    field = small_field()
    gen = torch.Generator().manual_seed(0)
    g = sample_sds_group(gen)
    assert torch.allclose(sample_light(g["c2w"], gen).norm(dim=-1), torch.ones(4))
    light = sample_light(g["c2w"], gen, jitter=0.0)  # exactly towards each camera
    args = (field, g["c2w"], g["fov_deg"], 16, 24)
    with torch.no_grad():
        albedo = render(*args)
        lam = render(*args, shading="lambertian", light=light, ambient=0.2)
        flat = render(*args, shading="textureless", light=light, ambient=0.2)
        dark = render(*args, shading="lambertian", light=-light, ambient=0.2)
    fg = albedo["opacity"] > 0.99  # (V, 1, H, W) object pixels
    fg3 = fg.expand_as(albedo["rgb"])
    assert (albedo["rgb"] - lam["rgb"]).abs()[fg3].mean() > 0.02  # shading changes the image
    assert (lam["rgb"] <= albedo["rgb"] + 1e-5)[fg3].all()  # lambertian only darkens
    # Textureless is grey (white albedo), lit from the camera side brighter than from behind.
    grey = (
        flat["rgb"][fg3].reshape(3, -1) if False else flat["rgb"].permute(1, 0, 2, 3)[:, fg[:, 0]]
    )
    assert (grey.max(0).values - grey.min(0).values).max() < 1e-5
    assert lam["rgb"][fg3].mean() > dark["rgb"][fg3].mean() + 0.1
    # Lit from behind: the visible side gets the ambient term only.
    assert torch.allclose(dark["rgb"][fg3], 0.2 * albedo["rgb"][fg3], atol=0.03)
    # Gradients reach the geometry through the normals.
    field.zero_grad()
    out = render(*args, shading="textureless", light=light, stratified=True)
    out["rgb"][fg3].mean().backward()
    assert field.density_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="light"):
        render(*args, shading="lambertian")
    with pytest.raises(ValueError, match="shading"):
        render(*args, shading="phong", light=light)
