"""FBX, PLY, STL and animated assets (fixtures made by tests/fixtures/assets/make_fixtures.py).

Rendered once (64x64, 4 orbit views, 4 samples, one worker). The fixtures' geometry is known
from the numbers in make_fixtures.py, independently of Blender's importers, so the tests check
where every vertex must land, which frame of an animation was rendered, and the colours.
"""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("bpy")

from mvdiff.cameras import intrinsics_from_fov  # noqa: E402
from mvdiff.render.config import RenderConfig  # noqa: E402
from mvdiff.render.runner import render_objects  # noqa: E402
from mvdiff.render.shards import Manifest, check_shard  # noqa: E402
from tests.scripts import load_script  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
FORMATS = FIXTURES / "render" / "formats"
mf = load_script(FIXTURES / "assets" / "make_fixtures.py", "make_fixtures")

FILES = ["frustum.fbx", "frustum.ply", "frustum.stl", "lamp.glb", "spinner.glb", "spinner.fbx"]
UIDS = {"frustum.fbx": "frustum_fbx", "frustum.ply": "frustum_ply", "frustum.stl": "frustum_stl",
        "lamp.glb": "lamp_glb", "spinner.glb": "spinner_glb", "spinner.fbx": "spinner_fbx"}  # fmt: skip


def expected_points(uid: str) -> np.ndarray:
    """World vertices [8, 3] of the fixture as it must be rendered (animations: frame 0)."""
    if uid.startswith("frustum"):
        return mf.world_vertices(mf.STATIC_POSE)
    if uid == "lamp_glb":
        return mf.world_vertices(((0, 0, 0), (0, 0, 0), 1.0))
    return mf.world_vertices(mf.KEYS[0])


def linear_from_srgb(srgb_bytes):
    c = np.asarray(srgb_bytes, dtype=np.float64) / 255
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    inputs = root / "inputs"
    inputs.mkdir()
    for name in FILES:  # distinct stems: the uid is the file stem
        (inputs / UIDS[name]).with_suffix(Path(name).suffix).write_bytes(
            (FORMATS / name).read_bytes()
        )
    out = root / "out"
    cfg = RenderConfig(inputs=[str(inputs)], output=str(out), rig="orbit", views=4,
                       elevations=[20.0], fov=40.0, resolution=64, samples=4, workers=1,
                       timeout=60.0)  # fmt: skip
    summary = render_objects(cfg, progress=False)
    samples = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, suffix = m.name.partition(".")
                samples.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    return out, summary, samples


def test_fixtures_are_small_and_animation_moves():
    assert all((FORMATS / n).stat().st_size < 64_000 for n in FILES)
    # Frame 0 differs from every later key: a renderer showing another frame is caught.
    ref = mf.normalization(mf.world_vertices(mf.KEYS[0]))
    for frame in (1, 24):
        other = mf.normalization(mf.world_vertices(mf.KEYS[frame]))
        assert np.abs(other[1] - ref[1]).max() > 0.05 or abs(other[0] - ref[0]) > 0.05


def test_every_format_renders_into_a_valid_shard(rendered):
    out, summary, samples = rendered
    assert summary["done"] == 6 and summary["failed"] == 0, summary
    assert sorted(samples) == sorted(UIDS.values())
    reports = [check_shard(p) for p in out.glob("*.tar")]
    assert sum(r["samples"] for r in reports) == 6 and all(not r["errors"] for r in reports)
    assert all(Manifest(out / "manifest.jsonl").done(u) for u in UIDS.values())
    for sample in samples.values():
        meta = json.loads(sample["json"])
        # Turntable rig: azimuths from 0 (front, -y) in 90 degree steps, one elevation.
        assert np.allclose(meta["azimuth_deg"], [0, 90, 180, 270], atol=1e-3)
        assert np.allclose(meta["elevation_deg"], 20, atol=1e-3)
        # Depth and normals only on request.
        assert sorted(sample) == ["cameras.npy", "json"] + [f"rgba.{v:03d}.png" for v in range(4)]


@pytest.mark.parametrize("uid", sorted(UIDS.values()))
def test_projected_vertices_land_on_the_alpha_mask(rendered, uid):
    _, _, samples = rendered
    meta = json.loads(samples[uid]["json"])
    c2w = np.load(io.BytesIO(samples[uid]["cameras.npy"])).astype(np.float64)
    scale, offset = mf.normalization(expected_points(uid))
    assert meta["normalization"]["scale"] == pytest.approx(scale, rel=1e-4)
    assert np.allclose(meta["normalization"]["offset"], offset, atol=1e-4)
    points = expected_points(uid) * scale + offset
    res = meta["resolution"]
    k = intrinsics_from_fov(meta["fov_deg"][0], res)
    for v in range(meta["num_views"]):
        alpha = np.asarray(Image.open(io.BytesIO(samples[uid][f"rgba.{v:03d}.png"])))[..., 3]
        rows, cols = np.nonzero(alpha >= 128)
        mask_box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        w2c = np.linalg.inv(c2w[v])
        cam = points @ w2c[:3, :3].T + w2c[:3, 3]  # camera frame, looking down -z
        u = k[0, 2] + k[0, 0] * cam[:, 0] / -cam[:, 2]
        w = k[1, 2] - k[1, 1] * cam[:, 1] / -cam[:, 2]  # image rows grow downwards
        proj_box = np.array([u.min(), w.min(), u.max(), w.max()]).clip(0, res)
        assert np.abs(mask_box - proj_box).max() <= 1.5, (uid, v, mask_box, proj_box)


@pytest.mark.parametrize("uid", ["spinner_glb", "spinner_fbx"])
def test_animated_assets_render_frame_0(rendered, uid):
    _, _, samples = rendered
    norm = json.loads(samples[uid]["json"])["normalization"]
    for frame, pose in mf.KEYS.items():
        scale, offset = mf.normalization(mf.world_vertices(pose))
        same = abs(norm["scale"] - scale) < 1e-4 and np.allclose(norm["offset"], offset, atol=1e-4)
        assert same == (frame == 0), (uid, frame, norm, scale, offset)


def _opaque_mean(sample) -> np.ndarray:
    """Mean linear RGB of the fully opaque pixels of each view, [V, 3]."""
    means = []
    for v in range(4):
        rgba = np.asarray(Image.open(io.BytesIO(sample[f"rgba.{v:03d}.png"])))
        means.append(linear_from_srgb(rgba[rgba[..., 3] == 255][:, :3]).mean(0))
    return np.array(means)


@pytest.mark.parametrize(
    "uid, albedo",
    [("frustum_fbx", mf.BASE_COLOR), ("spinner_glb", mf.BASE_COLOR),
     ("frustum_ply", linear_from_srgb(mf.VERTEX_COLOR)), ("lamp_glb", mf.BASE_COLOR)],
)  # fmt: skip
def test_standard_view_transform_even_light_and_colours(rendered, uid, albedo):
    # A convex object under a uniform white world of strength 1 reflects its albedo (plus the
    # Principled BSDF's ~4% specular layer): with the Standard view transform the pixels are
    # the sRGB encoding of that. Filmic or AgX would compress and desaturate them; a light
    # shipped with the asset (lamp_glb) would brighten one side.
    _, _, samples = rendered
    means = _opaque_mean(samples[uid])
    expected = np.asarray(albedo) + 0.035
    assert np.abs(means - expected).max() < 0.03, (uid, means.round(3), expected)
    assert np.ptp(means, axis=0).max() < 0.03, means.round(3)  # even lighting: views agree


def _render_one(tmp_path, name: str, **overrides) -> dict:
    """Render one fixture with the module's orbit rig (+ overrides); its shard members."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / name).write_bytes((FORMATS / name).read_bytes())
    cfg = RenderConfig(inputs=[str(inputs)], output=str(tmp_path / "out"), rig="orbit", views=4,
                       elevations=[20.0], fov=40.0, resolution=64, samples=4, workers=1,
                       timeout=60.0, **overrides)  # fmt: skip
    assert render_objects(cfg, progress=False)["done"] == 1
    (shard,) = (tmp_path / "out").glob("*.tar")
    assert check_shard(shard)["errors"] == []
    with tarfile.open(shard) as tar:
        return {m.name.partition(".")[2]: tar.extractfile(m).read() for m in tar}


def test_sun_option_lights_the_front(rendered, tmp_path):
    # sun_strength adds a sun from above-front (-y): the front view (azimuth 0) gets brighter,
    # the back view (azimuth 180) barely changes.
    _, _, samples = rendered
    without = _opaque_mean(samples["frustum_stl"]).mean(1)
    with_sun = _opaque_mean(_render_one(tmp_path, "frustum.stl", sun_strength=3.0)).mean(1)
    assert with_sun[0] > without[0] + 0.1, (with_sun, without)  # (clips at 1)
    assert with_sun[0] - without[0] > 2 * (with_sun[2] - without[2]), (with_sun, without)


def test_workbench_engine_option(tmp_path):
    sample = _render_one(tmp_path, "frustum.stl", engine="workbench")
    meta = json.loads(sample["json"])
    assert meta["engine"] == "BLENDER_WORKBENCH" and meta["num_views"] == 4
