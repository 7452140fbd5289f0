"""``mvdiff quickstart``: README's first command, end to end, at its default settings.

The slow tests share ONE run (the session fixture ``quickstart_run`` in conftest.py, also
used by tests/test_readme.py). They check by colour, not by eye, that the trained model
draws what the prompt names: the sampled views of the vocabulary prompts show the named
colour in the large majority of views, and the text-to-3D mesh has the named colour. The
colour check here is written independently of :mod:`mvdiff.eval.vocabulary` (median colour
of the non-white pixels, nearest of the four vocabulary colours).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mvdiff.render.procedural import COLOURS, SHAPES, VOCABULARY_COLOURS

ROOT = Path(__file__).resolve().parents[1]
PALETTE = {c: np.array(COLOURS[c], dtype=np.float64) for c in VOCABULARY_COLOURS}


def nearest_colour(pixels: np.ndarray) -> str | None:
    """Median colour of the pixels (0-255, ``[..., 3]``) farther than 60 from white ->
    nearest vocabulary colour; None when fewer than 3% of them are."""
    px = pixels.reshape(-1, 3).astype(np.float64)
    fg = px[np.linalg.norm(255.0 - px, axis=1) > 60]
    if len(fg) < 0.03 * len(px):
        return None
    median = np.median(fg, axis=0)
    return min(PALETTE, key=lambda c: np.linalg.norm(PALETTE[c] - median))


def named(prompt: str):
    m = re.fullmatch(r"a (\w+) (\w+)", prompt)
    return (m.group(1), m.group(2)) if m and m.group(1) in PALETTE else None


def _quickstart(out: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mvdiff.cli", "quickstart", "--output", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})  # fmt: skip


@pytest.fixture(scope="module")
def run(quickstart_run):
    proc = quickstart_run.proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"quickstart (default settings) took {quickstart_run.seconds:.1f} s")
    summary = json.loads((quickstart_run.out / "summary.json").read_text())
    return quickstart_run, summary


def at(qs, path: str) -> Path:
    """A path of summary.json (relative to the folder the quickstart ran in, as given)."""
    return qs.cwd / path


@pytest.mark.slow
def test_quickstart_stages_and_files(run):
    from PIL import Image

    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.render.shards import check_shard

    qs, summary = run
    out, stdout = qs.out, qs.proc.stdout
    for stage in ("render", "photos", "train", "sample", "text3d", "report"):
        assert f"{stage}: done in" in stdout, stage
    assert "quickstart finished in" in stdout

    # multi-view shards: the 16 procedural objects and the 4 bundled assets, schema 1 holds
    shards = sorted((out / "renders").glob("mv-*.tar"))
    assert [s.resolve() for s in shards] == [
        at(qs, s).resolve() for s in summary["render"]["shards"]
    ]
    reports = [check_shard(s) for s in shards]
    assert all(not r["errors"] for r in reports), reports
    assert sum(r["samples"] for r in reports) == 20
    assert sorted(p.stem for p in (out / "objects").glob("*.ply")) == sorted(
        f"{c}_{s}" for c in VOCABULARY_COLOURS for s in SHAPES
    )

    # the 2D shard: single views of every object + the real photos, all decodable
    with tarfile.open(out / "photos/00000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    keys = sorted({name.split(".")[0] for name in members})
    assert len(keys) == summary["photos"]["images"] == 20 + summary["photos"]["photos"]
    for key in keys:
        image = next(v for k, v in members.items() if k.startswith(key) and k[-3:] != "txt"
                     and not k.endswith("json"))  # fmt: skip
        Image.open(io.BytesIO(image)).convert("RGB").load()
        assert members[f"{key}.txt"].decode().strip()

    # training with the shipped trainer: the pixel-space x0 model, exported and loadable
    log = [json.loads(line) for line in (out / "train/log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == summary["train"]["steps"] == 1000
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]  # it learned something
    pipe = MVDreamPipeline.from_pretrained(at(qs, summary["train"]["model"]))
    assert pipe.scheduler.config.prediction_type == "sample"
    assert type(pipe.vae).__name__ == "PixelUnshuffleAutoencoder"

    # the page: prompt, views, turntable, mesh preview and renders side by side, figures
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img[^>]* src="([^"]+)"', page)
    for src in sources:
        Image.open(out / src).load()
    for rec in summary["sample"]["prompts"]:
        assert f"“{rec['prompt']}”" in page
        for key in ("views_x4", "turntable", "renders"):
            assert os.path.relpath(at(qs, rec[key]).resolve(), out.resolve()) in sources, (
                rec["prompt"],
                key,
            )
    assert (
        os.path.relpath(at(qs, summary["text3d"]["mesh_preview"]).resolve(), out.resolve())
        in sources
    )
    shown, total = summary["sample"]["colour_views_shown"], summary["sample"]["colour_views"]
    assert f"{shown} of {total} sampled views show the named colour" in " ".join(page.split())
    assert "silhouette IoU" in page
    links = re.findall(r'href="([^"]+)"', page)
    assert all((out / link).is_file() for link in links), links
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))


@pytest.mark.slow
def test_sampled_views_show_the_named_colour(run):
    """The large majority of the sampled views of vocabulary prompts show the named colour,
    and each prompt at least half of its views (the test's own colour check)."""
    from PIL import Image

    qs, summary = run
    hits, total, lines = 0, 0, []
    for rec in summary["sample"]["prompts"]:
        colour_shape = named(rec["prompt"])
        if colour_shape is None:
            continue
        views = [at(qs, v) for v in rec["views"]]
        seen = [nearest_colour(np.asarray(Image.open(v).convert("RGB"))) for v in views]
        ok = sum(s == colour_shape[0] for s in seen)
        lines.append(f"{rec['prompt']}: {seen}")
        assert ok >= 2, lines
        hits, total = hits + ok, total + len(seen)
    assert total >= 16, lines
    assert hits >= 0.8 * total, lines
    # the quickstart's own figure (mvdiff.eval.vocabulary) agrees
    assert summary["sample"]["colour_views_shown"] >= 0.75 * summary["sample"]["colour_views"]


@pytest.mark.slow
def test_text_to_3d_mesh_has_the_named_colour(run):
    """The mesh of text-to-3D with the trained prior: its vertex colours and its preview
    (rendered by the renderer of the real objects) show the prompt's colour."""
    import trimesh
    from PIL import Image

    qs, summary = run
    t3d = summary["text3d"]
    colour, _ = named(t3d["prompt"])
    mesh = trimesh.load(at(qs, t3d["mesh"]).with_suffix(".ply"), process=False)
    assert len(mesh.vertices) == t3d["vertices"] > 0 and len(mesh.faces) > 0
    vertex_rgb = np.asarray(mesh.visual.vertex_colors)[:, :3]
    assert nearest_colour(vertex_rgb) == colour
    preview = np.asarray(Image.open(at(qs, t3d["mesh_preview"])).convert("RGB"))
    assert nearest_colour(preview) == colour
    assert t3d["mesh_agreement"]["colour"] == colour
    assert Image.open(at(qs, t3d["turntable"])).n_frames > 1


@pytest.mark.slow
def test_quickstart_resumes_and_refuses_other_settings(run, tmp_path):
    """A re-run with the same settings skips every finished stage; other settings into the
    same folder are refused with one line, nothing touched."""
    qs, _ = run
    out = qs.out
    before = (out / "summary.json").read_text()
    again = _quickstart(out)
    assert again.returncode == 0, again.stderr[-2000:]
    for stage in ("render", "photos", "train", "sample", "text3d"):
        assert f"{stage}: already done, skipped" in again.stdout
    assert json.loads((out / "summary.json").read_text())["train"] == json.loads(before)["train"]
    other = _quickstart(out, "train.max_steps=13")
    assert other.returncode == 2
    assert other.stderr.strip().count("\n") == 0
    assert "different settings" in other.stderr


# ---- fast ------------------------------------------------------------------------------------
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
    for bad, name in (("render.views=6", "render.views"), ("render.colours=[pink]", "pink"),
                      ("train.patch=3", "train.patch"), ("sample.prompts=[]", "sample.prompts"),
                      ("train.resolution=12", "train.resolution")):  # fmt: skip
        assert main(["quickstart", "--output", str(tmp_path / "b"), "--set", bad]) == 2, bad
        assert name in capsys.readouterr().err, bad
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("x")
    assert main(["quickstart", "--output", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err or "bpy" in err  # refused either way, mine.txt untouched
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["mine.txt"]


def test_a_pixel_space_model_folder_loads_in_a_fresh_process(tmp_path):
    """The quickstart's model (pixel-space vae/) loads with MVDreamPipeline.from_pretrained
    in a new process, as `mvdiff sample --model outputs/quickstart/train/model` does (diffusers
    loads components only from modules already imported)."""
    from mvdiff.testing import tiny_pixel_components
    from mvdiff.training.export import export_pipeline_folder

    folder = export_pipeline_folder(tmp_path / "model", **tiny_pixel_components(0))
    code = ("import sys; from mvdiff.pipelines import MVDreamPipeline; "
            "p = MVDreamPipeline.from_pretrained(sys.argv[1]); print(type(p.vae).__name__)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "PixelUnshuffleAutoencoder"


def test_vocabulary_objects_are_the_named_shapes_in_the_named_colours(tmp_path):
    import trimesh

    from mvdiff.render.procedural import write_vocabulary

    captions = write_vocabulary(tmp_path)
    assert len(captions) == 16 and captions["red_cube"] == "a red cube"
    extents = {}
    for uid, caption in captions.items():
        colour, shape = named(caption)
        mesh = trimesh.load(tmp_path / f"{uid}.ply", process=False)
        rgb = np.unique(np.asarray(mesh.visual.vertex_colors)[:, :3], axis=0)
        assert rgb.tolist() == [list(COLOURS[colour])], uid
        extents[shape] = mesh.extents.round(2).tolist()
        if shape == "cone":  # a point at the top: the top cap is one vertex
            top = mesh.vertices[mesh.vertices[:, 2] > 0.49]
            assert np.allclose(top[:, :2], 0)
    assert extents["cube"] == [1.0, 1.0, 1.0] and extents["sphere"] == [1.0, 1.0, 1.0]
    assert extents["cylinder"] == [0.8, 0.8, 1.0]


def test_colour_and_silhouette_agreement_measures():
    """mvdiff.eval.vocabulary on drawn views: a red square on white shows red, not blue; an
    empty view shows nothing; silhouette IoU and the shape read follow the masks."""
    import torch

    from mvdiff.eval.vocabulary import shape_read, shows_colour, silhouette_iou

    palette = {c: COLOURS[c] for c in VOCABULARY_COLOURS}
    views = torch.ones(4, 3, 16, 16)
    mask = torch.zeros(4, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    red = torch.tensor(COLOURS["red"]).float()[:, None, None] / 255
    views[:3] = torch.where(mask[:3] > 0, red, views[:3])  # view 3 stays empty (white)
    assert shows_colour(views, "red", palette) == [True, True, True, False]
    assert shows_colour(views, "blue", palette) == [False] * 4
    assert silhouette_iou(views[:3], mask[:3]) == [1.0, 1.0, 1.0]
    disc = torch.zeros_like(mask)
    disc[..., 6:10, 6:10] = 1
    assert silhouette_iou(views[:1], disc[:1]) == [0.25]
    read, scores = shape_read(views[:3], {"cube": mask[:3], "sphere": disc[:3]})
    assert read == "cube" and scores["cube"] == 1.0
