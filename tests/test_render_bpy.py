"""Real Blender renders of the fixture assets (tiny: 64x64, few samples and views).

The key proof: mesh vertices, read independently of Blender and normalised with the scale
and offset stored in the shard, projected with the stored cameras and field of view, land
on the rendered alpha mask (the two bounding boxes agree within 1.5 px on every view).
"""

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("bpy")

from mvdiff.cameras import intrinsics_from_fov  # noqa: E402
from mvdiff.render.config import RenderConfig  # noqa: E402
from mvdiff.render.runner import render_objects  # noqa: E402
from mvdiff.render.shards import Manifest, check_shard  # noqa: E402

ASSETS = Path(__file__).parent / "fixtures" / "assets"
TINY = dict(views=4, resolution=64, samples=4, workers=2, timeout=60.0)
PASSES = dict(depth=True, normal=True)


# --- independent readers of the fixture meshes, in Blender's z-up world ------------------
def obj_vertices(path: Path) -> np.ndarray:
    v = np.array([[float(x) for x in ln.split()[1:4]] for ln in path.read_text().splitlines()
                  if ln.startswith("v ")])  # fmt: skip
    return np.stack([v[:, 0], -v[:, 2], v[:, 1]], axis=1)  # OBJ (-z fwd, y up) -> z up


def _quat_matrix(x, y, z, w) -> np.ndarray:
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])  # fmt: skip


def glb_vertices(path: Path) -> np.ndarray:
    data = path.read_bytes()
    json_len = struct.unpack_from("<I", data, 12)[0]
    gltf = json.loads(data[20 : 20 + json_len])
    binary = data[20 + json_len + 8 :]

    def node_matrix(node):
        if "matrix" in node:
            return np.array(node["matrix"], dtype=np.float64).reshape(4, 4).T  # column-major
        m = np.eye(4)
        m[:3, :3] = _quat_matrix(*node.get("rotation", [0, 0, 0, 1])) * node.get("scale", [1, 1, 1])
        m[:3, 3] = node.get("translation", [0, 0, 0])
        return m

    points = []

    def visit(index, parent):
        node = gltf["nodes"][index]
        world = parent @ node_matrix(node)
        if "mesh" in node:
            for prim in gltf["meshes"][node["mesh"]]["primitives"]:
                acc = gltf["accessors"][prim["attributes"]["POSITION"]]
                view = gltf["bufferViews"][acc["bufferView"]]
                start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
                stride = view.get("byteStride", 12)
                raw = np.frombuffer(binary, np.uint8, acc["count"] * stride, start)
                p = raw.reshape(acc["count"], stride)[:, :12].copy().view(np.float32)
                points.append(p.astype(np.float64) @ world[:3, :3].T + world[:3, 3])
        for child in node.get("children", []):
            visit(child, world)

    for root in gltf["scenes"][gltf.get("scene", 0)]["nodes"]:
        visit(root, np.eye(4))
    p = np.concatenate(points)
    return np.stack([p[:, 0], -p[:, 2], p[:, 1]], axis=1)  # glTF y up -> z up


def read_shards(folder: Path) -> dict:
    samples = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, suffix = m.name.partition(".")
                samples.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    return samples


def project(points, c2w, fov_deg, res):
    """World points [N, 3] -> pixel coords [N, 2] (x right, y down) of an OpenGL camera."""
    w2c = np.linalg.inv(c2w.astype(np.float64))
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]  # camera frame: looks down -z, +y up
    k = intrinsics_from_fov(fov_deg, res)
    u = k[0, 2] + k[0, 0] * cam[:, 0] / -cam[:, 2]
    v = k[1, 2] - k[1, 1] * cam[:, 1] / -cam[:, 2]  # image rows grow downwards
    return np.stack([u, v], axis=1)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("render")
    cfg = RenderConfig(inputs=[str(ASSETS)], output=str(out), **TINY, **PASSES)
    summary = render_objects(cfg, progress=False)
    return out, summary


def test_renders_every_asset_into_a_valid_shard(rendered):
    out, summary = rendered
    assert summary["done"] == 4 and summary["failed"] == 0 and summary["views"] == 16
    assert not list(out.glob("*.tmp"))
    reports = [check_shard(p) for p in sorted(out.glob("*.tar"))]
    assert sum(r["samples"] for r in reports) == 4 and all(r["errors"] == [] for r in reports)
    manifest = Manifest(out / "manifest.jsonl")
    assert all(manifest.done(u) for u in ["BoxTextured", "capsule", "monkey", "rabbit"])


@pytest.mark.parametrize("uid", ["BoxTextured", "capsule", "monkey", "rabbit"])
def test_projected_vertices_land_on_the_alpha_mask(rendered, uid):
    out, _ = rendered
    sample = read_shards(out)[uid]
    meta = json.loads(sample["json"])
    c2w = np.load(io.BytesIO(sample["cameras.npy"]))
    assert c2w.dtype == np.float32 and c2w.shape == (4, 4, 4)
    path = next(ASSETS.glob(f"{uid}.*[bj]"))  # .glb or .obj
    points = glb_vertices(path) if path.suffix == ".glb" else obj_vertices(path)
    norm = meta["normalization"]
    points = points * norm["scale"] + np.array(norm["offset"])  # p_norm = s * p + offset
    lo, hi = points.min(0), points.max(0)
    assert np.allclose((lo + hi) / 2, 0, atol=1e-4) and abs((hi - lo).max() - 1) < 1e-4
    res = meta["resolution"]
    for v in range(meta["num_views"]):
        alpha = np.asarray(Image.open(io.BytesIO(sample[f"rgba.{v:03d}.png"])))[..., 3]
        rows, cols = np.nonzero(alpha >= 128)
        mask_box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        uv = project(points, c2w[v], meta["fov_deg"][v], res)
        proj_box = np.concatenate([uv.min(0), uv.max(0)]).clip(0, res)
        assert np.abs(mask_box - proj_box).max() <= 1.5, (uid, v, mask_box, proj_box)


@pytest.mark.parametrize("uid", ["monkey", "rabbit"])
def test_depth_and_normal_passes_agree_with_the_geometry(rendered, uid):
    out, _ = rendered
    sample = read_shards(out)[uid]
    meta = json.loads(sample["json"])
    c2w = np.load(io.BytesIO(sample["cameras.npy"])).astype(np.float64)
    path = next(ASSETS.glob(f"{uid}.*[bj]"))
    points = glb_vertices(path) if path.suffix == ".glb" else obj_vertices(path)
    points = points * meta["normalization"]["scale"] + np.array(meta["normalization"]["offset"])
    for v in range(meta["num_views"]):
        alpha = np.asarray(Image.open(io.BytesIO(sample[f"rgba.{v:03d}.png"])))[..., 3]
        depth = np.asarray(Image.open(io.BytesIO(sample[f"depth.{v:03d}.png"]))) / 1000.0
        normal = np.asarray(Image.open(io.BytesIO(sample[f"normal.{v:03d}.png"]))) / 127.5 - 1
        solid = alpha == 255
        assert (depth[alpha == 0] == 0).all() and (depth[solid] > 0).all()
        # Planar depth = -z of the camera frame; the nearest surface is the nearest vertex.
        w2c = np.linalg.inv(c2w[v])
        z = -(points @ w2c[:3, :3].T + w2c[:3, 3])[:, 2]
        assert abs(depth[solid].min() - z.min()) < 0.03, (uid, v, depth[solid].min(), z.min())
        assert depth[solid].max() <= z.max() + 0.01
        # World-space normals: unit length (pixels straddling creases average a few), and
        # facing the camera on average.
        n = normal[solid]
        length = np.linalg.norm(n, axis=1)
        assert np.median(length) > 0.97 and (length > 0.8).mean() > 0.9
        to_camera = c2w[v, :3, 3] / np.linalg.norm(c2w[v, :3, 3])
        assert (n @ to_camera).mean() > 0.3


def test_cameras_follow_the_convention(rendered):
    out, _ = rendered
    for uid, sample in read_shards(out).items():
        meta = json.loads(sample["json"])
        c2w = np.load(io.BytesIO(sample["cameras.npy"])).astype(np.float64)
        centres = c2w[:, :3, 3]
        # Cameras look at the origin down their -z axis; +y is up (positive world z).
        forward = -c2w[:, :3, 2]
        assert np.allclose(forward, -centres / np.linalg.norm(centres, axis=1)[:, None], atol=1e-5)
        assert (c2w[:, 2, 1] > 0).all()
        el = np.degrees(np.arcsin(centres[:, 2] / np.linalg.norm(centres, axis=1)))
        az = np.degrees(np.arctan2(centres[:, 0], -centres[:, 1])) % 360
        assert np.allclose(el, meta["elevation_deg"], atol=1e-3), uid
        assert np.allclose(az, meta["azimuth_deg"], atol=1e-3), uid
        assert 0 <= meta["elevation_deg"][0] <= 30 and 15 <= meta["fov_deg"][0] <= 60
        steps = np.diff(np.sort(meta["azimuth_deg"]))
        assert np.allclose(steps, 90, atol=1e-3)


def test_stl_and_ply_render(tmp_path):
    # A tetrahedron written as ASCII STL and ASCII PLY (vertices in z-up, no axis change).
    verts = np.array([[0, 0, 0], [2, 0, 0], [0, 1, 0], [0, 0, 0.5]], dtype=float)
    faces = [(0, 2, 1), (0, 1, 3), (0, 3, 2), (1, 2, 3)]
    stl = ["solid t"]
    for f in faces:
        stl += ["facet normal 0 0 0", "outer loop"]
        stl += [f"vertex {x} {y} {z}" for x, y, z in verts[list(f)]]
        stl += ["endloop", "endfacet"]
    (tmp_path / "tetra_stl.stl").write_text("\n".join(stl + ["endsolid t", ""]))
    ply = ["ply", "format ascii 1.0", "element vertex 4", "property float x", "property float y",
           "property float z", "element face 4", "property list uchar int vertex_indices",
           "end_header"]  # fmt: skip
    ply += [" ".join(map(str, v)) for v in verts] + [f"3 {a} {b} {c}" for a, b, c in faces]
    (tmp_path / "tetra_ply.ply").write_text("\n".join(ply + [""]))
    out = tmp_path / "out"
    cfg = RenderConfig(inputs=[str(tmp_path)], output=str(out), **{**TINY, "views": 2})
    assert render_objects(cfg, progress=False)["done"] == 2
    for uid, sample in read_shards(out).items():
        meta = json.loads(sample["json"])
        assert meta["normalization"]["scale"] == pytest.approx(0.5, rel=1e-5), uid  # longest side 2
        assert np.allclose(meta["normalization"]["offset"], [-0.5, -0.25, -0.125], atol=1e-5)


def _processes_with(arg: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arg.encode() in cmdline:
            found.append(pid)
    return found


def test_workers_are_recycled():
    from mvdiff.render.pool import WorkerHandle, run_job, worker_options
    from mvdiff.render.rigs import make_rig

    cfg = RenderConfig(output="unused", **{**TINY, "views": 1, "resolution": 16, "samples": 1})
    handle = WorkerHandle(worker_options(cfg), timeout=60, startup_timeout=120, recycle_every=2)
    rig = make_rig(cfg, "x")
    job = {"uid": "x", "path": str(ASSETS / "monkey.glb"), "c2w": rig["c2w"].tolist(),
           "fov_deg": rig["fov_deg"]}  # fmt: skip
    pids = []
    for _ in range(3):
        assert run_job(handle, job)["ok"]
        pids.append(handle.proc.pid)
    handle.close()
    assert handle.starts == 2 and pids[0] == pids[1] != pids[2]


def test_a_one_thread_worker_uses_one_core():
    """Blender sizes its task scheduler to the CPUs visible at start-up; a worker that saw them
    all kept an idle scheduler thread spinning beside its one render thread (CPU = 2x wall)."""
    from mvdiff.render.pool import WorkerHandle, run_job, worker_options
    from mvdiff.render.rigs import make_rig

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to show a second busy thread")
    cfg = RenderConfig(output="unused", views=4, resolution=128, samples=32)
    assert cfg.threads_per_worker == 1
    handle = WorkerHandle(worker_options(cfg), timeout=120, startup_timeout=120, recycle_every=5)
    rig = make_rig(cfg, "monkey")
    job = {"uid": "monkey", "path": str(ASSETS / "monkey.glb"), "c2w": rig["c2w"].tolist(),
           "fov_deg": rig["fov_deg"]}  # fmt: skip
    answer = run_job(handle, job)
    handle.close()
    assert answer["ok"], answer
    cpu, wall = sum(answer["view_cpu"]), sum(answer["view_wall"])
    assert cpu / wall < 1.3, f"{cpu:.2f} CPU-s in {wall:.2f} s wall: more than one busy thread"


def test_broken_assets_fail_with_a_reason_while_others_render(tmp_path, monkeypatch):
    bad = tmp_path / "inputs"
    bad.mkdir()
    data = (ASSETS / "BoxTextured.glb").read_bytes()
    (bad / "truncated.glb").write_bytes(data[: len(data) // 2])
    (bad / "text.glb").write_text("this is not a glTF file\n")
    (bad / "empty.gltf").write_text(
        '{"asset": {"version": "2.0"}, "scenes": [{"nodes": []}], "scene": 0}'
    )
    shutil.copy(ASSETS / "rabbit.obj", bad / "hangs.obj")
    shutil.copy(ASSETS / "monkey.glb", bad / "monkey.glb")
    monkeypatch.setenv("MVDIFF_RENDER_TEST_HANG", "hangs.obj")  # the worker sleeps on it
    out = tmp_path / "out"
    cfg = RenderConfig(
        inputs=[str(bad)],
        output=str(out),
        **{**TINY, "timeout": 15.0, "retries": 0, "recycle_every": 2},
    )
    summary = render_objects(cfg, progress=False)
    assert summary["done"] == 1 and summary["failed"] == 4
    records = Manifest(out / "manifest.jsonl").records
    assert records["monkey"]["status"] == "done"
    for uid in ["truncated", "text", "empty", "hangs"]:
        assert records[uid]["status"] == "failed" and records[uid]["reason"], records[uid]
    assert "timeout" in records["hangs"]["reason"]
    assert not _processes_with("86399"), "the hanging worker's child outlived the kill"
    assert "empty scene" in records["empty"]["reason"]
    assert [check_shard(p)["samples"] for p in out.glob("*.tar")] == [1]
    # Re-running the same command skips what is done and retries what failed.
    monkeypatch.delenv("MVDIFF_RENDER_TEST_HANG")
    again = render_objects(cfg, progress=False)
    assert again["skipped"] == 1 and again["done"] == 1 and again["failed"] == 3
    records = Manifest(out / "manifest.jsonl").records
    assert records["hangs"]["status"] == "done" and records["text"]["status"] == "failed"
    assert sum(check_shard(p)["samples"] for p in out.glob("*.tar")) == 2


ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}


def cli(args):
    return [sys.executable, "-m", "mvdiff.cli", "render", *args]


@pytest.mark.slow
def test_kill_9_then_resume_renders_every_object_exactly_once(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(3):  # 11 objects: the 4 fixtures twice, all but the capsule once more
        for name in ["monkey.glb", "BoxTextured.glb", "rabbit.obj", "rabbit.mtl"] + (
            ["capsule.obj", "capsule.mtl", "capsule0.jpg"] if i < 2 else []
        ):
            (inputs / f"set{i}").mkdir(exist_ok=True)
            shutil.copy(ASSETS / name, inputs / f"set{i}" / name)
    out = tmp_path / "out"
    args = [str(inputs), "--output", str(out), "--views", "2", "--resolution", "32",
            "--samples", "2", "--workers", "1", "--shard-max-samples", "3", "-q"]  # fmt: skip
    proc = subprocess.Popen(cli(args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_text().count('"done"') >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)  # mid-run: one shard closed, one open, one in flight
    proc.wait()
    assert list(out.glob("*.tar.tmp"))
    done = subprocess.run(cli(args), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["skipped"] >= 4 and summary["failed"] == 0
    keys = []
    for shard in sorted(out.glob("*.tar")):
        report = check_shard(shard)
        assert report["errors"] == [], report
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".json")]
    assert len(keys) == 11 and len(set(keys)) == 11
    assert not list(out.glob("*.tmp"))
    records = Manifest(manifest).records
    assert sorted(records) == sorted(keys) and all(r["status"] == "done" for r in records.values())


def test_render_at_the_cameras_of_a_sample_is_eval_ground_truth(tmp_path, capsys):
    """`mvdiff render ASSET --cameras-from SAMPLE_DIR` renders the cameras of an `mvdiff
    sample` folder (here a non-default rig: elevation 10, first azimuth 30) into a one-sample
    shard that `mvdiff eval --gt` matches view for view; ground truth at other cameras is an
    error that names --cameras-from."""
    from mvdiff.cli import main
    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.testing import tiny_components

    MVDreamPipeline(**tiny_components(0)).save_pretrained(tmp_path / "model")
    sample = tmp_path / "sample"
    assert main(["sample", "--model", str(tmp_path / "model"), "--prompt", "a monkey",
                 "--output", str(sample), "--height", "32", "--width", "32", "--steps", "1",
                 "--elevation", "10", "--azimuth-start", "30"]) == 0  # fmt: skip
    cheap = ["--resolution", "32", "--engine", "BLENDER_WORKBENCH", "--workers", "1", "-q"]
    gt = tmp_path / "gt"
    assert main(["render", str(ASSETS / "monkey.glb"), "--cameras-from", str(sample),
                 "--output", str(gt), *cheap]) == 0  # fmt: skip
    (meta,) = [json.loads(s["json"]) for s in read_shards(gt).values()]
    assert np.allclose(meta["azimuth_deg"], [30, 120, 210, 300], atol=1e-3)
    assert np.allclose(meta["elevation_deg"], 10, atol=1e-3)
    capsys.readouterr()
    ev = ["eval", str(sample), "--recon-steps", "1", "--holdout", "none"]
    assert main([*ev, "--gt", str(gt / "mv-000000.tar"), "--output", str(tmp_path / "e")]) == 0
    record = json.loads((tmp_path / "e" / "results.json").read_text())["samples"][0]["gt"]
    assert record["views"] == [0, 1, 2, 3] and max(record["angle_deg"]) < 0.01, record
    # the default (turntable) cameras are not the sample's: the error says how to render them
    other = tmp_path / "other"
    assert main(["render", str(ASSETS / "monkey.glb"), "--rig", "orbit", "--views", "4",
                 "--output", str(other), *cheap]) == 0  # fmt: skip
    capsys.readouterr()
    assert main([*ev, "--gt", str(other / "mv-000000.tar"), "--output", str(tmp_path / "f")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("mvdiff eval: error")]
    assert len(err) == 1 and f"--cameras-from {sample} --output" in err[0], err
