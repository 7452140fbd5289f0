"""Newcomer frictions (issue 22): quiet runs (no diffusers warnings on every run) and a
one-line config summary instead of the full config dump, the full config kept in the
output folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny_cpu.yaml"
ASSETS = Path(__file__).parent / "fixtures" / "assets"
NOISE = ("FutureWarning", "kept in float32", "DeprecationWarning")


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _mvdiff(*argv, timeout=300):
    res = subprocess.run([sys.executable, "-m", "mvdiff.cli", *map(str, argv)], env=_env(),
                         capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def model_and_shards(tmp_path_factory):
    """A tiny multi-view model folder (tiny_components saved) and one small 3D shard."""
    from mvdiff.data.synthetic import write_synthetic_mv_shards
    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.testing import tiny_components

    root = tmp_path_factory.mktemp("frictions")
    MVDreamPipeline(**tiny_components(0)).save_pretrained(root / "model")
    write_synthetic_mv_shards(root / "mv", num_shards=1, objects_per_shard=2, num_views=4,
                              resolution=32)  # fmt: skip
    return root / "model", root / "mv"


def test_train_and_sample_are_quiet_and_summarise_the_config(model_and_shards, tmp_path):
    """`mvdiff train` and `mvdiff sample` on a model folder (the from_pretrained paths):
    no diffusers FutureWarning (deprecated torch_dtype) nor its empty "should be kept in
    float32: []" warning (.to(dtype) on the VAE); train prints one summary line naming the
    saved config.yaml, not the whole config."""
    model, shards = model_and_shards
    out = tmp_path / "train"
    res = _mvdiff("train", "--config", TINY, "--max-steps", "1", "--set", f"output_dir={out}",
                  "--set", f"model.pretrained={model}", "--set", f"data.mv_shards={shards}/*.tar",
                  "--set", "data.p_2d=0", "--set", "checkpoint.every=0",
                  "--set", "export=false")  # fmt: skip
    said = res.stdout + res.stderr
    assert not [n for n in NOISE if n in said], said[-3000:]
    # the full config is in the output folder; the output names it in one line
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["shuffle_buffer"] == 16 and saved["max_steps"] == 1
    assert "shuffle_buffer" not in said and "weight_decay" not in said, said[-3000:]
    summary = [line for line in said.splitlines() if str(out / "config.yaml") in line]
    assert len(summary) == 1 and "1 steps" in summary[0] and str(model) in summary[0]

    res = _mvdiff("sample", "--model", model, "--prompt", "a cat", "--output",
                  tmp_path / "sample", "--height", "32", "--width", "32", "--steps", "2")  # fmt: skip
    said = res.stdout + res.stderr
    assert not [n for n in NOISE if n in said], said[-3000:]
    assert (tmp_path / "sample" / "view_03.png").is_file()


def test_tiny_and_plain_sd_loads_are_quiet(model_and_shards, tmp_path):
    """The tiny base of README's DreamBooth try-out (load_pipeline("tiny")) and a plain SD
    folder given a camera MLP (load_components): no "kept in float32" warning either."""
    model, _ = model_and_shards
    script = f"""
from diffusers import UNet2DConditionModel
from mvdiff.pipelines.loading import load_pipeline
from mvdiff.testing import tiny_components, tiny_unet
from mvdiff.training.components import load_components
load_pipeline("tiny", log=print)
parts, sd = tiny_components(), {str(tmp_path / "sd")!r}
for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
    parts[name].save_pretrained(sd + "/" + name)
UNet2DConditionModel.from_config(tiny_unet(camera=False).config).save_pretrained(sd + "/unet")
assert load_components(sd).source == "sd"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
    said = res.stdout + res.stderr
    assert not [n for n in NOISE if n in said], said[-3000:]


def test_render_prints_a_summary_not_the_config(tmp_path, capsys):
    """`mvdiff render` prints one line (rig, views, resolution, engine, where the full config
    is), not the ~60-line config; the full config is saved next to the shards."""
    pytest.importorskip("bpy")
    from mvdiff.cli import main

    out = tmp_path / "r"
    assert main(["render", str(ASSETS / "monkey.glb"), "-o", str(out), "--views", "2",
                 "--resolution", "32", "--engine", "BLENDER_WORKBENCH", "--workers", "1",
                 "--timeout", "120"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "denoise_prefilter" not in printed and "shard_max_bytes" not in printed, printed
    first = printed.splitlines()[0]
    assert "2 views" in first and f"{out}/render_config.yaml" in first, first
    saved = yaml.safe_load((out / "render_config.yaml").read_text())
    assert saved["views"] == 2 and saved["denoise_prefilter"] == "FAST"
