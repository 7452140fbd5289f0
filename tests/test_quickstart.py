"""``mvdiff quickstart``: the README's first command, end to end, with a reduced budget."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

# A reduced budget: same stages, same code paths, fewer pixels, views and steps.
SMALL = [
    "render.views=4", "render.resolution=32", "render.samples=4",
    "train.max_steps=12", "train.log_every=2", "train.checkpoint_every=6",
    "sample.steps=3", "sample.resolution=16", "text3d.steps=4",
]  # fmt: skip


def _quickstart(out: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mvdiff.cli", "quickstart", "--output", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    pytest.importorskip("bpy")
    from PIL import Image

    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.render.shards import check_shard

    out = tmp_path / "qs"
    t0 = time.monotonic()
    proc = _quickstart(out, *SMALL)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"quickstart (reduced budget) took {seconds:.1f} s")
    for stage in ("render", "photos", "train", "sample", "text3d", "report"):
        assert f"{stage}: done in" in proc.stdout, stage
    assert "quickstart finished in" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())

    # multi-view shards: every bundled asset rendered, schema 1 holds
    shards = sorted((out / "renders").glob("mv-*.tar"))
    assert shards and [str(s) for s in shards] == summary["render"]["shards"]
    reports = [check_shard(s) for s in shards]
    assert all(not r["errors"] for r in reports), reports
    assert sum(r["samples"] for r in reports) == 4  # BoxTextured, monkey, capsule, rabbit
    assert sum(r["views"] for r in reports) == 16
    manifest = [
        json.loads(line) for line in (out / "renders/manifest.jsonl").read_text().splitlines()
    ]
    assert {m["status"] for m in manifest} == {"done"}

    # the 2D shard: img2dataset layout, real photos that decode, non-empty captions
    with tarfile.open(out / "photos/00000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    keys = sorted({name.split(".")[0] for name in members})
    assert len(keys) == summary["photos"]["images"] >= 4
    for key in keys:
        Image.open(io.BytesIO(members[f"{key}.jpg"])).convert("RGB").load()
        assert members[f"{key}.txt"].decode().strip()
        assert json.loads(members[f"{key}.json"])["key"] == key

    # training: the joint run saw both kinds of batches; the exported folder loads
    log = [json.loads(line) for line in (out / "train/log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 12
    assert all(rec["loss"] == rec["loss"] for rec in log)  # finite
    assert (out / "train/config.yaml").is_file()
    pipe = MVDreamPipeline.from_pretrained(summary["train"]["model"])
    assert pipe.unet.config.class_embed_type == "projection"

    # samples: 4 views of the prompt
    views = sorted((out / "samples").glob("view_*.png"))
    assert len(views) == 4
    for v in views:
        assert Image.open(v).size == (16, 16)

    # text-to-3D: a mesh with vertices and faces, views and a turntable
    t3d = summary["text3d"]
    mesh = Path(t3d["mesh"]).read_text().splitlines()
    assert sum(line.startswith("v ") for line in mesh) == t3d["vertices"] > 0
    assert sum(line.startswith("f ") for line in mesh) == t3d["faces"] > 0
    assert Image.open(t3d["turntable"]).n_frames > 1

    # the page references existing, loadable images; the config was saved
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert {"renders.png", "loss.png", "samples.png", "text_to_3d/views.png",
            "text_to_3d/turntable.gif"} <= set(sources)  # fmt: skip
    for src in sources:
        Image.open(out / src).load()
    links = re.findall(r'href="([^"]+)"', page)
    assert all((out / link).is_file() for link in links), links
    assert (out / "quickstart_config.yaml").is_file()
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))

    # a re-run with the same settings resumes: every finished stage is skipped
    again = _quickstart(out, *SMALL)
    assert again.returncode == 0, again.stderr[-2000:]
    for stage in ("render", "photos", "train", "sample", "text3d"):
        assert f"{stage}: already done, skipped" in again.stdout
    assert (out / "index.html").is_file()

    # other settings into the same folder: refused with one line, nothing touched
    other = _quickstart(out, *SMALL, "train.max_steps=13")
    assert other.returncode == 2
    assert other.stderr.strip().count("\n") == 0
    assert "different settings" in other.stderr


def test_quickstart_without_bpy_says_how_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    from mvdiff.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bpy" else real(name, *a)
    )
    assert main(["quickstart", "--output", str(tmp_path / "qs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert 'pip install -e ".[render]"' in err
    assert not (tmp_path / "qs").exists()  # nothing written before the check


def test_quickstart_bad_settings_are_one_line_errors(tmp_path, capsys):
    from mvdiff.cli import main

    assert main(["quickstart", "--output", str(tmp_path / "a"), "--set", "train.nope=1"]) == 2
    assert "unknown key" in capsys.readouterr().err
    code = main(["quickstart", "--output", str(tmp_path / "b"), "--set", "render.views=2"])
    assert code == 2
    assert "render.views" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("x")
    assert main(["quickstart", "--output", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err or "bpy" in err  # refused either way, mine.txt untouched
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["mine.txt"]
