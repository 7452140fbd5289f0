"""`mvdiff sample` end to end on tiny pipelines: a saved folder and an official-layout .pt."""

import json
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import yaml

from mvdiff.cameras import get_camera
from mvdiff.cli import main
from mvdiff.pipelines import MVDreamPipeline
from mvdiff.testing import tiny_components
from tests.conftest import FULLSIZE_KEYS

FAST = ["--height", "64", "--width", "64", "--steps", "3"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    MVDreamPipeline(**tiny_components(0)).save_pretrained(folder)
    return folder


def pixels(path):
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def test_sample_writes_everything_and_settings_replay_it(tmp_path, tiny_folder):
    out = tmp_path / "out"
    argv = ["sample", "--model", str(tiny_folder), "--prompt", "a corgi", "--output", str(out)]
    assert main(argv + FAST + ["--seed", "5", "--azimuth-start", "90"]) == 0

    names = [f"view_{v:02d}.png" for v in range(4)]
    for name in names + ["grid.png", "turntable.gif", "cameras.json", "settings.json"]:
        assert (out / name).is_file(), name
    assert not list(out.glob(".*tmp"))  # no temporary files left behind
    assert pixels(out / "view_00.png").shape == (64, 64, 3)
    grid = pixels(out / "grid.png")
    assert grid.shape == (64, 4 * 64, 3)
    assert np.array_equal(grid[:, 64:128], pixels(out / "view_01.png"))
    gif = PIL.Image.open(out / "turntable.gif")
    assert gif.n_frames == 4

    cameras = json.loads((out / "cameras.json").read_text())
    assert [v["azimuth_deg"] for v in cameras["views"]] == [90, 180, 270, 360]
    vectors = torch.tensor([v["camera_vector"] for v in cameras["views"]])
    torch.testing.assert_close(vectors, get_camera(4, 15, 90))
    c2w = torch.tensor([v["c2w"] for v in cameras["views"]], dtype=torch.float32)
    torch.testing.assert_close(c2w.reshape(4, 16), vectors)

    settings = json.loads((out / "settings.json").read_text())
    s = settings["settings"]
    assert (s["seed"], s["scheduler"], s["steps"], s["guidance"]) == (5, "ddim", 3, 7.5)
    assert (s["device"], s["dtype"], s["prompt_suffix"]) == ("cpu", "float32", ", 3d asset")
    assert settings["model"]["kind"] == "folder" and settings["model"]["fingerprint"]
    assert {"mvdiff", "torch", "diffusers", "transformers"} <= set(settings["versions"])

    # Replaying settings.json gives the same images; a flag next to --settings overrides it.
    again = tmp_path / "again"
    assert main(["sample", "--settings", str(out / "settings.json"), "--output", str(again)]) == 0
    for name in names:
        assert np.array_equal(pixels(out / name), pixels(again / name)), name
    other = tmp_path / "other"
    assert main(["sample", "--settings", str(out / "settings.json"), "--output", str(other),
                 "--seed", "6"]) == 0  # fmt: skip
    assert not np.array_equal(pixels(out / "view_00.png"), pixels(other / "view_00.png"))

    # The CLI's images are the pipeline's images for the recorded settings.
    pipe = MVDreamPipeline.from_pretrained(str(tiny_folder))
    pipe.set_progress_bar_config(disable=True)
    direct = pipe("a corgi", height=64, width=64, num_inference_steps=3, azimuth_start=90,
                  generator=torch.Generator().manual_seed(5)).images  # fmt: skip
    assert np.array_equal(np.asarray(direct[2]), pixels(out / "view_02.png"))


def test_2d_mode_and_dpm(tmp_path, tiny_folder):
    out = tmp_path / "out"
    argv = ["sample", "--model", str(tiny_folder), "--prompt", "a corgi", "--output", str(out),
            "--num-views", "1", "--scheduler", "dpm"]  # fmt: skip
    assert main(argv + FAST) == 0
    assert (out / "view_00.png").is_file() and not (out / "view_01.png").exists()
    assert json.loads((out / "cameras.json").read_text())["views"][0]["camera_vector"] is None
    assert json.loads((out / "settings.json").read_text())["settings"]["scheduler"] == "dpm"


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--prompt", "  "], "--prompt"),
        (["--prompt", "x", "--num-views", "0"], "--num-views"),
        (["--prompt", "x", "--num-views", "500"], "--num-views"),
        (["--prompt", "x", "--azimuth-span", "400"], "--azimuth-span"),
        (["--prompt", "x", "--height", "100"], "--height"),
        (["--prompt", "x", "--width", "7"], "--width"),
        (["--prompt", "x", "--scheduler", "plms9"], "--scheduler"),
        (["--prompt", "x", "--dtype", "float8"], "--dtype"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, tiny_folder, capsys, extra, flag):
    argv = ["sample", "--model", str(tiny_folder), "--output", str(tmp_path / "o")] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert flag in err and "\n" not in err and err.startswith("mvdiff sample: error:")


def test_bad_model_and_existing_output(tmp_path, tiny_folder, capsys):
    out = tmp_path / "o"
    assert (
        main(["sample", "--model", str(tmp_path / "nope"), "--prompt", "x", "--output", str(out)])
        == 2
    )
    assert "--model" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert (
        main(["sample", "--model", str(tmp_path / "empty"), "--prompt", "x", "--output", str(out)])
        == 2
    )
    assert "model_index.json" in capsys.readouterr().err
    (tmp_path / "w.bin").write_bytes(b"x")
    assert (
        main(["sample", "--model", str(tmp_path / "w.bin"), "--prompt", "x", "--output", str(out)])
        == 2
    )
    assert "--model" in capsys.readouterr().err
    out.mkdir()
    (out / "settings.json").write_text("{}")
    assert main(["sample", "--model", str(tiny_folder), "--prompt", "x", "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_entry_point_exit_status_and_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "mvdiff.cli", "sample", "--model", str(tmp_path / "missing"),
         "--prompt", "x", "--output", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "--model" in res.stderr


# ----------------------------------------------------------------------------- official .pt


def _rand(shape, g):
    return torch.randn(shape, generator=g) * 0.02


@pytest.fixture(scope="module")
def tiny_official_runnable(tmp_path_factory, reference, reference_unet_sd):
    """An official-layout checkpoint that runs end to end: the reference UNet (context width
    32), the VAE with the real key names at 1/4 width, a 3-layer OpenCLIP text tower of width 32
    and the schedule buffers; plus its official-style YAML."""
    tensors, meta = reference
    g = torch.Generator().manual_seed(0)
    sd = {f"model.diffusion_model.{k}": v for k, v in reference_unet_sd.items()}
    for line in FULLSIZE_KEYS.read_text().splitlines():
        if line.startswith("first_stage_model."):
            key, shape = line.split("\t")
            dims = [int(d) for d in re.findall(r"\d+", shape)]
            sd[key] = _rand(tuple(d // 4 if d % 128 == 0 else d for d in dims), g)
    width, te = 32, {}
    te["positional_embedding"] = _rand((77, width), g)
    te["token_embedding.weight"] = _rand((49408, width), g)
    te["ln_final.weight"] = torch.ones(width)
    te["ln_final.bias"] = torch.zeros(width)
    te["text_projection"] = _rand((width, width), g)
    te["logit_scale"] = torch.tensor(4.6)
    for i in range(3):
        p = f"transformer.resblocks.{i}."
        for name, shape in {
            "ln_1.weight": (width,), "ln_1.bias": (width,), "ln_2.weight": (width,),
            "ln_2.bias": (width,), "attn.in_proj_weight": (3 * width, width),
            "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width),
            "attn.out_proj.bias": (width,), "mlp.c_fc.weight": (4 * width, width),
            "mlp.c_fc.bias": (4 * width,), "mlp.c_proj.weight": (width, 4 * width),
            "mlp.c_proj.bias": (width,),
        }.items():  # fmt: skip
            te[p + name] = _rand(shape, g) * 10 + (
                1.0 if name.startswith("ln_") and "weight" in name else 0.0
            )
    sd.update({f"cond_stage_model.model.{k}": v for k, v in te.items()})
    sd.update({k[len("checkpoint.") :]: v for k, v in tensors.items()
               if k.startswith("checkpoint.") and "diffusion_model" not in k})  # fmt: skip
    root = tmp_path_factory.mktemp("official")
    ckpt = root / "tiny-4view.pt"
    torch.save(sd, ckpt)
    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)  # fmt: skip
    config = {"model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "unet_config": {"params": meta["unet_config_official_names"]},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": ddconfig}},
        "cond_stage_config": {"target": "mvdream.ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"},
    }}}  # fmt: skip
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return ckpt, cfg


def test_sample_from_an_official_checkpoint_converts_once(tmp_path, tiny_official_runnable, capsys):
    ckpt, cfg = tiny_official_runnable
    cache = tmp_path / "cache"
    base = ["sample", "--model", str(ckpt), "--original-config", str(cfg), "--cache-dir",
            str(cache), "--prompt", "a corgi"] + FAST  # fmt: skip
    assert main(base + ["--output", str(tmp_path / "a")]) == 0
    first = capsys.readouterr().out
    assert "converting" in first
    (folder,) = (cache / "converted").iterdir()
    assert (folder / "model_index.json").is_file() and (folder / "unet").is_dir()
    assert main(base + ["--output", str(tmp_path / "b")]) == 0
    assert "using the cached conversion" in capsys.readouterr().out
    for v in range(4):
        name = f"view_{v:02d}.png"
        assert np.array_equal(pixels(tmp_path / "a" / name), pixels(tmp_path / "b" / name))
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert settings["model"]["kind"] == "checkpoint"
    assert settings["settings"]["original_config"] == str(cfg)
