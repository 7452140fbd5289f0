"""Render pipeline pieces that need no Blender: rigs, samples, shards, manifest, sources, CLI."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvdiff.cameras import orbit_c2w
from mvdiff.cli import build_parser, main
from mvdiff.commands.render import build_config
from mvdiff.config import load_config
from mvdiff.render.config import FLAG_FIELDS, RenderConfig, field_flag
from mvdiff.render.rigs import make_rig
from mvdiff.render.shards import (
    Manifest,
    SampleInvalid,
    ShardWriter,
    build_sample,
    check_shard,
    contact_sheet,
    spherical_from_c2w,
)
from mvdiff.render.sources import discover, load_captions, local_objects, safe_uid

ASSETS = Path(__file__).parent / "fixtures" / "assets"


def fake_answer(num_views=3, res=16, empty_view=None, color=(200, 100, 50)):
    """A worker answer as if an object had been rendered: PNG bytes + cameras."""
    c2w = orbit_c2w([10.0] * num_views, np.arange(num_views) * 120.0, 2.0)
    files = {}
    for v in range(num_views):
        rgba = np.zeros((res, res, 4), np.uint8)
        if v != empty_view:
            rgba[4:12, 4:12] = (*color, 255)
        buf = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
        files[f"rgba.{v:03d}.png"] = buf.getvalue()
    return {"ok": True, "c2w": c2w.tolist(), "fov_deg": [40.0] * num_views, "scale": 0.5,
            "offset": [0.0, 0.0, -0.1], "files": files}  # fmt: skip


def test_mvdream_rig_is_deterministic_per_uid_and_follows_the_recipe():
    cfg = RenderConfig(output="x")
    a, b, c = make_rig(cfg, "uid_a"), make_rig(cfg, "uid_a"), make_rig(cfg, "uid_b")
    assert np.array_equal(a["c2w"], b["c2w"]) and not np.allclose(a["c2w"], c["c2w"])
    assert a["c2w"].shape == (32, 4, 4)
    assert len(set(a["fov_deg"])) == 1 and 15 <= a["fov_deg"][0] <= 60
    assert len(set(a["elevation_deg"])) == 1 and 0 <= a["elevation_deg"][0] <= 30
    steps = np.diff(np.sort(a["azimuth_deg"]))
    assert np.allclose(steps, 360 / 32)
    # Camera centres read back from the matrices give the rig's spherical parameters.
    el, az, dist = spherical_from_c2w(a["c2w"])
    assert np.allclose(el, a["elevation_deg"]) and np.allclose(dist, a["distance"])
    assert np.allclose(np.sort(az), np.sort(a["azimuth_deg"]))


def test_orbit_rig_azimuth_zero_is_on_minus_y_and_counter_clockwise():
    cfg = RenderConfig(output="x", rig="orbit", views=4, elevations=[0.0])
    rig = make_rig(cfg, "x")
    centres = rig["c2w"][:, :3, 3]
    assert centres[0, 1] < 0 and abs(centres[0, 0]) < 1e-9  # azimuth 0: on -y
    assert centres[1, 0] > 0 and abs(centres[1, 1]) < 1e-9  # azimuth 90: on +x (ccw from +z)
    # OpenGL frame: the camera looks down its -z axis, at the origin.
    forward = -rig["c2w"][:, :3, 2]
    assert np.allclose(forward, -centres / np.linalg.norm(centres, axis=1, keepdims=True))


def test_fixed_rig_puts_cameras_at_the_listed_angles():
    cfg = RenderConfig(output="x", rig="fixed", views=3, elevations=[0.0, 30.0, -10.0],
                       azimuths=[0.0, 45.0, 300.0], fov=30.0, distance_factor=1.2).validate()  # fmt: skip
    rig = make_rig(cfg, "any")
    el, az, dist = spherical_from_c2w(rig["c2w"])
    assert np.allclose(el, [0, 30, -10]) and np.allclose(az, [0, 45, 300])
    assert np.allclose(dist, rig["distance"]) and rig["fov_deg"] == [30.0] * 3
    # The unit cube's bounding sphere just fits a 30 degree frame at distance factor 1.
    assert np.allclose(dist, 1.2 * (3**0.5 / 2) / np.sin(np.radians(15)))
    forward = -rig["c2w"][:, :3, 2]
    centres = rig["c2w"][:, :3, 3]
    assert np.allclose(forward, -centres / np.linalg.norm(centres, axis=1, keepdims=True))
    # One elevation for all views also works; the rig does not depend on the uid.
    one = RenderConfig(output="x", rig="fixed", views=2, elevations=[10.0], azimuths=[0.0, 180.0])
    assert np.allclose(spherical_from_c2w(make_rig(one, "a")["c2w"])[0], 10)
    assert np.array_equal(make_rig(one, "a")["c2w"], make_rig(one, "b")["c2w"])


def test_orbit_rig_is_a_turntable():
    cfg = RenderConfig(output="x", rig="orbit", views=8, elevations=[25.0]).validate()
    el, az, _ = spherical_from_c2w(make_rig(cfg, "x")["c2w"])
    assert np.allclose(el, 25) and np.allclose(az, np.arange(8) * 45.0)


def test_config_errors_name_the_field():
    with pytest.raises(Exception, match="--views"):
        RenderConfig(output="x", views=0).validate()
    with pytest.raises(Exception, match=r"--set azimuths=\[\.\.\.\]"):
        RenderConfig(output="x", rig="fixed", views=2, azimuths=[0.0]).validate()
    with pytest.raises(Exception, match=r"--set elevations=\.\.\."):
        RenderConfig(output="x", rig="orbit", views=2, elevations=[1.0, 2.0, 3.0]).validate()
    with pytest.raises(Exception, match="--output"):
        RenderConfig().validate()


def test_build_sample_validates_before_writing():
    cfg = RenderConfig(output="x", resolution=16)
    obj = {"uid": "a", "caption": "a thing", "source": "local", "license": ""}
    members = build_sample(obj, fake_answer(), cfg)
    meta = json.loads(members["json"])
    assert meta["schema"] == 1 and meta["num_views"] == 3 and len(meta["azimuth_deg"]) == 3
    assert np.allclose(meta["azimuth_deg"], [0, 120, 240]) and np.allclose(
        meta["elevation_deg"], 10
    )
    assert np.load(io.BytesIO(members["cameras.npy"])).dtype == np.float32
    with pytest.raises(SampleInvalid, match="view 1 is empty"):
        build_sample(obj, fake_answer(empty_view=1), cfg)
    missing = fake_answer()
    del missing["files"]["rgba.002.png"]
    with pytest.raises(SampleInvalid, match="view 2 is missing"):
        build_sample(obj, missing, cfg)
    with pytest.raises(SampleInvalid, match="size"):
        build_sample(obj, fake_answer(res=8), cfg)


def write_samples(folder, uids, max_samples=2):
    cfg = RenderConfig(output="x", resolution=16)
    manifest = Manifest(Path(folder) / "manifest.jsonl")
    writer = ShardWriter(folder, manifest, max_samples=max_samples)
    for uid in uids:
        writer.write(
            uid, build_sample({"uid": uid}, fake_answer(), cfg), {"uid": uid, "source": ""}
        )
    return writer, manifest


def keys_in(folder):
    keys = []
    for shard in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".json")]
    return keys


def test_shards_are_atomic_and_recovered_after_a_crash(tmp_path):
    writer, manifest = write_samples(tmp_path, ["a", "b", "c"], max_samples=2)
    # "a", "b" are in a closed shard; "c" sits in an open .tmp shard (as after kill -9).
    assert sorted(p.name for p in tmp_path.glob("mv-*")) == ["mv-000000.tar", "mv-000001.tar.tmp"]
    # Simulate a crash after a sample's bytes were written but before its manifest line.
    tmp = tmp_path / "mv-000001.tar.tmp"
    writer._file.write(b"garbage of a half-written sample" * 100)
    writer._file.flush()
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"uid": "torn')  # a torn manifest line
    manifest2 = Manifest(tmp_path / "manifest.jsonl")
    assert manifest2.done("c") and not manifest2.done("torn")
    writer2 = ShardWriter(tmp_path, manifest2, max_samples=2)
    assert writer2.recovered == ["mv-000001.tar"] and not tmp.exists()
    assert writer2.index == 2
    assert keys_in(tmp_path) == ["a", "b", "c"]
    for shard in tmp_path.glob("*.tar"):
        report = check_shard(shard)
        assert report["errors"] == [], report
    # A .tmp shard with nothing recorded in the manifest is removed.
    (tmp_path / "mv-000005.tar.tmp").write_bytes(b"x" * 1000)
    ShardWriter(tmp_path, Manifest(tmp_path / "manifest.jsonl"))
    assert not (tmp_path / "mv-000005.tar.tmp").exists()


def test_check_shard_reports_schema_problems(tmp_path):
    write_samples(tmp_path, ["a"], max_samples=1)
    good = tmp_path / "mv-000000.tar"
    bad = tmp_path / "bad.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name.endswith(".json"):
                meta = json.loads(data)
                meta["num_views"] = 4
                data = json.dumps(meta).encode()
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    assert check_shard(good)["errors"] == []
    errors = check_shard(bad)["errors"]
    assert errors and "a:" in errors[0]
    assert contact_sheet([good], tmp_path / "sheet.png") == 1
    assert Image.open(tmp_path / "sheet.png").size[0] > 0


def test_contact_sheet_shows_white_and_black_objects(tmp_path):
    """A white object (as the white monkey renders: ~215-240) and a black one both differ
    clearly from the checkerboard behind them."""
    cfg = RenderConfig(output="x", resolution=16)
    writer = ShardWriter(tmp_path, Manifest(tmp_path / "manifest.jsonl"), max_samples=2)
    for uid, color in (("white", (220, 220, 220)), ("black", (20, 20, 20))):
        sample = build_sample({"uid": uid}, fake_answer(color=color), cfg)
        writer.write(uid, sample, {"uid": uid, "source": ""})
    writer.close_shard()
    assert main(["shard-info", str(tmp_path), "--contact-sheet", str(tmp_path / "s.png")]) == 0
    sheet = np.asarray(Image.open(tmp_path / "s.png").convert("L"), dtype=np.float64)
    for row in range(2):  # the object: pixels 4:12 of 16 -> 32:96 of a 128 tile (inner part)
        tile = sheet[row * 128 : (row + 1) * 128, :128]  # (128, 128) first view of the row
        obj = tile[40:88, 40:88]
        background = np.concatenate([tile[:24].ravel(), tile[104:].ravel()])
        gap = np.abs(obj.mean() - background[:, None]).min()
        assert gap > 60, (row, obj.mean(), np.unique(background))


def test_shard_info_cli(tmp_path, capsys):
    write_samples(tmp_path / "ok", ["a", "b", "c"], max_samples=2)[0].close_shard()
    sheet = tmp_path / "sheet.png"
    assert main(["shard-info", str(tmp_path / "ok"), "--json", "--contact-sheet", str(sheet)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["shards"], report["samples"], report["views"], report["errors"]) == (2, 3, 9, 0)
    assert report["contact_sheet_rows"] == 3 and Image.open(sheet).size == (3 * 128, 3 * 128)
    # A truncated shard is reported (exit status 1), with the problem named.
    good = tmp_path / "ok" / "mv-000000.tar"
    (tmp_path / "cut.tar").write_bytes(good.read_bytes()[:1500])
    assert main(["shard-info", str(tmp_path / "cut.tar"), str(good)]) == 1
    out = capsys.readouterr().out
    assert "cut.tar" in out and "problem" in out and "total: 2 shards" in out


def test_local_sources_and_captions(tmp_path):
    objs = local_objects([str(ASSETS)])
    assert sorted(o["uid"] for o in objs) == ["BoxTextured", "capsule", "monkey", "rabbit"]
    assert safe_uid("a.b c") == "a_b_c"
    csv = tmp_path / "captions.csv"
    csv.write_text('monkey,"a monkey head, grey"\nrabbit,a pink rabbit\n')
    assert load_captions(str(csv))["monkey"] == "a monkey head, grey"
    cfg = RenderConfig(output="x", inputs=[str(ASSETS / "monkey.glb")], captions=str(csv))
    assert discover(cfg)[0]["caption"] == "a monkey head, grey"
    # Objects the CSV does not name keep the fallback built from the file name.
    cfg = RenderConfig(output="x", inputs=[str(ASSETS)], captions=str(csv))
    captions = {o["uid"]: o["caption"] for o in discover(cfg)}
    assert captions["BoxTextured"] == "Box Textured" and captions["rabbit"] == "a pink rabbit"
    with pytest.raises(Exception, match="--captions .*nope.csv"):
        discover(
            RenderConfig(output="x", inputs=[str(ASSETS)], captions=str(tmp_path / "nope.csv"))
        )


def test_objaverse_through_a_loopback_mirror(objaverse_mirror, tmp_path):
    pytest.importorskip("objaverse")
    mirror, cache = objaverse_mirror
    cfg = RenderConfig(output="x", objaverse_lvis=["crate"], objaverse_mirror=mirror,
                       objaverse_cache=cache)  # fmt: skip
    objs = discover(cfg)
    assert [o["uid"] for o in objs] == ["0a1b2c", "9f8e7d"]
    assert objs[0]["caption"] == "Box 0, crate"  # name + the tags not already in it
    assert objs[0]["license"] == "by" and objs[0]["source"] == "objaverse:0a1b2c"
    path = objs[0]["fetch"]()
    assert os.path.getsize(path) == os.path.getsize(ASSETS / "BoxTextured.glb")
    assert path.startswith(cache)
    with pytest.raises(Exception, match="no such LVIS category"):
        discover(RenderConfig(output="x", objaverse_lvis=["nope"], objaverse_mirror=mirror,
                              objaverse_cache=cache))  # fmt: skip
    # By uid: on the command line (objaverse:UID), as a list, or a file of uids; captions
    # from a Cap3D-layout CSV keyed by Objaverse uid, the name + tags fallback otherwise.
    uid_file = tmp_path / "uids.txt"
    uid_file.write_text("9f8e7d\n\n")
    captions = tmp_path / "cap3d.csv"
    captions.write_text("uid,caption\n9f8e7d,a wooden crate with metal corners\n")
    cfg = RenderConfig(output="x", inputs=["objaverse:0a1b2c"], objaverse_uids=[str(uid_file)],
                       captions=str(captions), objaverse_mirror=mirror, objaverse_cache=cache)  # fmt: skip
    objs = discover(cfg)
    assert [(o["uid"], o["caption"]) for o in objs] == [
        ("9f8e7d", "a wooden crate with metal corners"), ("0a1b2c", "Box 0, crate")]  # fmt: skip
    with pytest.raises(Exception, match="--objaverse-uids: 'ffffff' is not an Objaverse uid"):
        discover(RenderConfig(output="x", objaverse_uids=["ffffff"], objaverse_mirror=mirror,
                              objaverse_cache=cache))  # fmt: skip


def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    assert main(["render", str(tmp_path / "missing.glb"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.glb" in err
    assert main(["render", str(ASSETS), "--output", str(tmp_path / "o"), "--views", "0", "-q"]) == 2
    assert "--views" in capsys.readouterr().err
    assert main(["render", str(ASSETS / "README.md"), "--output", str(tmp_path / "o")]) == 2
    assert "README.md" in capsys.readouterr().err
    assert main(["shard-info", str(tmp_path / "nothing.tar")]) == 2
    with pytest.raises(SystemExit):
        main(["render", "--help"])


def test_fixed_rig_error_names_a_setting_that_works(tmp_path, capsys):
    """The error of `--rig fixed` without azimuths names how to give them (there is no
    --azimuths flag), and its example, pasted back, gets past the check."""
    out = str(tmp_path / "o")
    assert main(["render", str(ASSETS), "-o", out, "--rig", "fixed", "--views", "2", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--set azimuths=[0,180]" in err, err
    assert "--azimuths" not in err.replace("--set azimuths", "")
    # Every flag an error can name (a field with its own flag) is a real `mvdiff render` flag.
    render = build_parser()._subparsers._group_actions[0].choices["render"]
    flags = {s for a in render._actions for s in a.option_strings}
    for name in FLAG_FIELDS:
        assert field_flag(name) in flags, name
    assert field_flag("azimuths") == "--set azimuths=..." and "--azimuths" not in flags
    args = build_parser().parse_args(["render", str(ASSETS), "-o", out, "--rig", "fixed",
                                      "--views", "2", "--set", "azimuths=[0,180]"])  # fmt: skip
    assert build_config(args).azimuths == [0.0, 180.0]


def test_cameras_from_bad_inputs_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["render", str(ASSETS), "-o", out, "--cameras-from", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--cameras-from" in err and "cameras.json" in err
    (tmp_path / "cameras.json").write_text('{"views": [{"c2w": "x"}]}')
    assert main(["render", str(ASSETS), "-o", out, "--cameras-from", str(tmp_path)]) == 2
    assert "not a readable cameras.json" in capsys.readouterr().err
    c2w = orbit_c2w([10.0, 10.0], [30.0, 210.0], 1.0).tolist()
    (tmp_path / "cameras.json").write_text(json.dumps({"views": [{"c2w": m} for m in c2w]}))
    assert main(["render", str(ASSETS), "-o", out, "--cameras-from", str(tmp_path),
                 "--rig", "orbit"]) == 2  # fmt: skip
    assert "leave out --rig/--views" in capsys.readouterr().err
    args = build_parser().parse_args(["render", str(ASSETS), "-o", out, "--cameras-from",
                                      str(tmp_path)])  # fmt: skip
    cfg = build_config(args)
    assert cfg.rig == "fixed" and cfg.views == 2 and np.allclose(cfg.azimuths, [30, 210])
    assert np.allclose(cfg.elevations, 10)


@pytest.mark.parametrize("name", ["render_mvdream", "render_objaverse_lvis", "render_turntable"])
def test_data_prep_render_configs_load(name):
    path = Path(__file__).parents[1] / "data_prep" / "configs" / f"{name}.yaml"
    cfg = load_config(RenderConfig, path, ["output=/tmp/x"]).validate()
    assert cfg.resolution == 256
    if name == "render_mvdream":
        assert cfg == RenderConfig(output="/tmp/x").validate()  # the file spells the defaults
