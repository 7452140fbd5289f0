"""MVDreamBooth: loss terms, training effects, LoRA round trip, class-image cache, input
checks and the CLI end to end (tiny model, three real photos of a cat)."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from mvdiff.config import load_config
from mvdiff.errors import UserError
from mvdiff.training.config import DreamBoothTrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_DB = ROOT / "train" / "configs" / "dreambooth_tiny_cpu.yaml"
PHOTOS = ROOT / "mvdiff" / "resources" / "photos"
PROMPT = "a photo of sks cat"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """tiny_components() saved as a pipeline folder: the model to personalise."""
    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.testing import tiny_components

    folder = tmp_path_factory.mktemp("base") / "model"
    MVDreamPipeline(**tiny_components(0)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three photos of the same (real) cat: two crops and a mirrored, rescaled crop."""
    folder = tmp_path_factory.mktemp("photos")
    cat = PIL.Image.open(PHOTOS / "chelsea.jpg").convert("RGB")  # 192 x 128
    cat.crop((0, 0, 128, 128)).save(folder / "cat_left.jpg")
    cat.crop((64, 0, 192, 128)).save(folder / "cat_right.png")
    flipped = cat.crop((30, 8, 150, 128)).transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    flipped.resize((100, 100)).save(folder / "cat_mirror.jpg")
    return folder


def db_config(base, photos, out, *overrides) -> DreamBoothTrainConfig:
    return load_config(
        DreamBoothTrainConfig,
        TINY_DB,
        [
            f"model.pretrained={base}",
            f"dreambooth.images={photos}",
            f"dreambooth.prompt={PROMPT}",
            f"output_dir={out}",
            "log_every=1",
            "validation.every=0",
            *overrides,
        ],
    )


def _unet_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- loss terms -------------------------------------------------------------------------


def test_param_preservation_value_and_gradient_by_hand():
    from mvdiff.training.dreambooth import ParamAnchor, param_preservation

    theta = [
        torch.tensor([[0.5, -1.0], [2.0, 0.0]], requires_grad=True),
        torch.tensor([0.1, 0.2, 0.3], requires_grad=True),
    ]
    theta0 = [torch.tensor([[0.0, -1.0], [3.0, 1.0]]), torch.tensor([0.1, 0.0, 1.0])]
    lam, n = 2.0, 7
    # |theta - theta0| = 0.5, 0, 1, 1 | 0, 0.2, 0.7 -> sum 3.4, mean over 7 elements
    value = param_preservation(theta, theta0, lam)
    assert float(value.detach()) == pytest.approx(lam * 3.4 / n)
    value.backward()
    # d/dtheta lam * mean|theta - theta0| = lam * sign(theta - theta0) / N (0 where equal)
    by_hand = [
        torch.tensor([[1.0, 0.0], [-1.0, -1.0]]) * lam / n,
        torch.tensor([0.0, 1.0, -1.0]) * lam / n,
    ]
    for p, g in zip(theta, by_hand):
        torch.testing.assert_close(p.grad, g)

    # the same as plain autograd through abs() on random values
    torch.manual_seed(0)
    a = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    b = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    anchors = [x.detach() + 0.1 * torch.randn_like(x) for x in a]
    param_preservation(a, anchors, 0.7).backward()
    for x, y in zip(b, a):
        x.data.copy_(y.data)
    plain = 0.7 * torch.cat([(x - y).abs().flatten() for x, y in zip(b, anchors)]).mean()
    plain.backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)

    # ParamAnchor: theta_0 is a copy taken at construction; frozen parameters are left out
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    live = torch.nn.Parameter(torch.zeros(4))
    anchor = ParamAnchor([frozen, live])
    assert anchor.numel == 4 and float(anchor.loss(1.0).detach()) == 0.0
    with torch.no_grad():
        live += torch.tensor([1.0, -1.0, 0.0, 2.0])
    assert float(anchor.loss(1.0).detach()) == pytest.approx(1.0)
    assert anchor.distance() == pytest.approx(1.0)


def test_prompt_checks_and_class_prompt():
    from mvdiff.training.dreambooth import check_prompt, class_prompt_from

    check_prompt("a photo of sks dog", "sks")
    check_prompt("A SKS dog on a sofa", "sks")
    for prompt in ("a photo of a dog", "a photo of sksdog", ""):
        with pytest.raises(UserError, match="identifier|--prompt is required"):
            check_prompt(prompt, "sks")
    assert class_prompt_from("a photo of sks dog", "sks") == "a photo of dog"
    assert class_prompt_from("a Sks dog, sks", "sks") == "a dog,"


# ---- input checks -------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors(tmp_path, photos, base, capsys):
    from mvdiff.cli import main
    from mvdiff.training.dreambooth import load_photos

    two = tmp_path / "two"
    two.mkdir()
    for p in sorted(photos.iterdir())[:2]:
        (two / p.name).write_bytes(p.read_bytes())
    with pytest.raises(UserError, match="2 image.*at least 3"):
        load_photos(two, 32)

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in photos.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "zz_not_a_photo.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(UserError, match="zz_not_a_photo.jpg"):
        load_photos(broken, 32)

    # smaller than the training resolution: a warning naming the file, not an error
    found, warnings = load_photos(photos, 112)
    assert len(found) == 3 and all(min(p.image.size) == 112 for p in found)
    assert len(warnings) == 1 and "cat_mirror.jpg is 100x100" in warnings[0]

    # a mask turns the background white
    masked = tmp_path / "masked"
    masked.mkdir()
    for p in photos.iterdir():
        (masked / p.name).write_bytes(p.read_bytes())
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 32:96] = 255
    PIL.Image.fromarray(mask).save(masked / "cat_left_mask.png")
    found, _ = load_photos(masked, 32)
    left = np.asarray(next(p for p in found if p.name == "cat_left.jpg").image)
    assert (left[:4, :4] == 255).all() and not (left[14:18, 14:18] == 255).all()

    common = ["dreambooth", "--model", str(base), "--output", str(tmp_path / "o"),
              "--config", str(TINY_DB)]  # fmt: skip
    cases = [
        (["--images", str(two), "--prompt", PROMPT], "at least 3"),
        (["--images", str(broken), "--prompt", PROMPT], "zz_not_a_photo.jpg"),
        (["--images", str(photos), "--prompt", "a photo of a cat"], "identifier 'sks'"),
        (["--images", str(tmp_path / "nope"), "--prompt", PROMPT], "not a folder"),
        (["--images", str(photos)], "--prompt is required"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(common + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("mvdiff dreambooth: error:") and message in err, err
        assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # nothing is written before the inputs are checked
    with pytest.raises(SystemExit):
        main(["dreambooth", "--help"])


def test_shipped_configs_match_the_builtin_defaults():
    from mvdiff.config import config_to_dict

    shipped = load_config(DreamBoothTrainConfig, ROOT / "train" / "configs" / "dreambooth.yaml")
    assert config_to_dict(shipped) == config_to_dict(DreamBoothTrainConfig())
    assert shipped.mixed_precision == "bf16" and shipped.model.gradient_checkpointing
    assert shipped.dreambooth.param_preservation == 1.0 and shipped.data.resolution == 256
    tiny = load_config(DreamBoothTrainConfig, TINY_DB)
    assert tiny.mixed_precision == "no" and tiny.data.resolution == 32


# ---- training -------------------------------------------------------------------------------


def _instance_loss(unet, photos_dir, draws: int = 6) -> float:
    """eps-MSE of ``unet`` on the three photos with the instance prompt, 2D mode, with fixed
    noise and timesteps (averaged over ``draws`` draws)."""
    from mvdiff.testing import tiny_components
    from mvdiff.training.components import noise_scheduler_from
    from mvdiff.training.dreambooth import DreamBoothBatches, load_photos
    from mvdiff.training.loss import diffusion_loss, encode_images, encode_prompts

    parts = tiny_components()
    found, _ = load_photos(photos_dir, 32)
    batch = DreamBoothBatches(found, PROMPT, 32, 3, flip=False).batch(0)
    sched = noise_scheduler_from(parts["scheduler"])
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    with torch.no_grad():
        text = encode_prompts(parts["tokenizer"], parts["text_encoder"], batch["caption"])
        for _ in range(draws):
            latents = encode_images(parts["vae"], batch["pixels"], g)
            total += float(diffusion_loss(unet.eval(), sched, latents, text, None, 1, g))
    return total / draws


def test_short_run_lowers_the_instance_loss(base, photos, tmp_path):
    from mvdiff.models import MultiViewUNet2DConditionModel
    from mvdiff.pipelines.loading import load_pipeline
    from mvdiff.testing import tiny_components
    from mvdiff.training.trainer import train

    out = tmp_path / "run"
    summary = train(db_config(base, photos, out, "max_steps=10", "optim.lr=3e-3",
                              "checkpoint.every=0"))  # fmt: skip
    assert summary["steps"] == 10 and summary["model"] == str(out / "model")
    trained = MultiViewUNet2DConditionModel.from_pretrained(out / "model" / "unet")
    before = _instance_loss(tiny_components()["unet"], photos)
    after = _instance_loss(trained, photos)
    assert after < 0.8 * before, (before, after)
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"instance_loss", "preservation", "theta_distance"} <= set(logs[-1])
    assert logs[-1]["frac_2d_batches"] == 1.0  # the photos train in 2D mode
    saved = load_config(DreamBoothTrainConfig, out / "config.yaml")
    assert saved.dreambooth.prompt == PROMPT
    pipe, info = load_pipeline(str(out / "model"), log=lambda *_: None)
    assert info["kind"] == "folder" and isinstance(pipe.unet, MultiViewUNet2DConditionModel)


def test_preservation_keeps_weights_closer_to_the_start(base, photos, tmp_path):
    from mvdiff.testing import tiny_components
    from mvdiff.training.trainer import train

    start = tiny_components()["unet"].state_dict()

    def distance(lam) -> float:
        out = tmp_path / f"lam{lam}"
        # lambda is large here because the mean runs over ~2M elements of the tiny UNet and
        # AdamW normalises gradient sizes; the comparison is what matters
        train(db_config(base, photos, out, "max_steps=6", "optim.lr=3e-3", "export=false",
                        "checkpoint.every=0", f"dreambooth.param_preservation={lam}"))  # fmt: skip
        weights = _unet_weights(out / "checkpoints" / "step-0000006" / "model.safetensors")
        diffs = [(weights[k].float() - v.float()).abs().sum() for k, v in start.items()]
        return float(sum(diffs)) / sum(v.numel() for v in start.values())

    free, kept = distance(0.0), distance(3000.0)
    assert free > 0 and kept < 0.5 * free, (free, kept)


def test_resume_is_exact(base, photos, tmp_path):
    """4 steps straight == 2 steps + resume latest + 2 steps (photos, crops, flips, class
    objects and theta_0 included)."""
    from mvdiff.training.trainer import train

    common = ["export=false", "checkpoint.every=2", "checkpoint.keep=3", "dreambooth.crop=random",
              "dreambooth.param_preservation=100", "dreambooth.prior.enabled=true",
              f"dreambooth.prior.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    train(db_config(base, photos, tmp_path / "a", "max_steps=4", *common))
    train(db_config(base, photos, tmp_path / "b", "max_steps=2", *common))
    train(db_config(base, photos, tmp_path / "b", "max_steps=4", "checkpoint.resume=latest",
                    *common))  # fmt: skip
    a = _unet_weights(tmp_path / "a" / "checkpoints" / "step-0000004" / "model.safetensors")
    b = _unet_weights(tmp_path / "b" / "checkpoints" / "step-0000004" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_class_images_are_generated_once(base, photos, tmp_path, monkeypatch):
    from mvdiff.cameras import get_camera
    from mvdiff.training import dreambooth
    from mvdiff.training.trainer import train

    calls = []
    real = dreambooth.render_views

    def counting(*args, **kwargs):
        calls.append(kwargs["azimuth_start"])
        return real(*args, **kwargs)

    monkeypatch.setattr(dreambooth, "render_views", counting)
    cache = tmp_path / "cache"
    common = ["max_steps=2", "export=false", "checkpoint.every=0",
              "dreambooth.prior.enabled=true", f"dreambooth.prior.cache_dir={cache}",
              "dreambooth.prior.num_objects=2"]  # fmt: skip
    first = train(db_config(base, photos, tmp_path / "one", *common))
    assert len(calls) == 2 and first["class_images_generated"] == 2
    folder = Path(first["class_images"])
    files = sorted(folder.glob("obj-*"))
    assert [f.name for f in files] == ["obj-00000.json", "obj-00000.png", "obj-00001.json",
                                       "obj-00001.png"]  # fmt: skip
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    strip = np.asarray(PIL.Image.open(folder / "obj-00000.png"))
    assert strip.shape == (32, 4 * 32, 3)  # 4 views side by side
    record = json.loads((folder / "obj-00000.json").read_text())
    assert record["prompt"] == "a photo of cat, 3d asset"  # the identifier is dropped
    torch.testing.assert_close(torch.tensor(record["cameras"]),
                               get_camera(4, 15.0, calls[0]))  # fmt: skip
    logs = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().split("\n")
            if line]  # fmt: skip
    assert logs[-1]["prior_loss"] > 0

    second = train(db_config(base, photos, tmp_path / "two", *common))
    assert len(calls) == 2 and second["class_images_generated"] == 0
    assert second["class_images"] == first["class_images"]
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes

    # another class prompt is another cache entry
    train(db_config(base, photos, tmp_path / "three", *common,
                    "dreambooth.prior.class_prompt=a tabby cat"))  # fmt: skip
    assert len(calls) == 4


def test_lora_save_load_sample_round_trip(base, photos, tmp_path):
    from safetensors import safe_open

    from mvdiff.pipelines.loading import load_pipeline
    from mvdiff.training.trainer import train

    out = tmp_path / "lora"
    summary = train(db_config(base, photos, out, "max_steps=4", "checkpoint.every=0",
                              "dreambooth.lora.enabled=true", "validation.every=4",
                              "validation.steps=3"))  # fmt: skip
    adapter = Path(summary["adapter"])
    assert "model" not in summary and not (out / "model").exists()
    assert sorted(p.name for p in adapter.iterdir()) == [
        "mvdiff_adapter.json",
        "pytorch_lora_weights.safetensors",
    ]  # diffusers' LoRA format
    with safe_open(str(adapter / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and ".lora_" in k for k in keys)  # only the adapter
    size_adapter = (adapter / "pytorch_lora_weights.safetensors").stat().st_size
    size_unet = (base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size_adapter < size_unet / 5
    meta = json.loads((adapter / "mvdiff_adapter.json").read_text())
    assert meta["base_model"] == str(base.resolve()) and meta["prompt"] == PROMPT

    # what training rendered at its last step (validation: 4 views, seed 0, the prompt + suffix)
    produced = np.asarray(PIL.Image.open(out / "samples" / "step-0000004.png").convert("RGB"))

    def sample(pipe) -> np.ndarray:
        images = pipe(
            PROMPT + ", 3d asset",
            prompt_suffix="",
            num_views=4,
            elevation=15.0,
            height=32,
            width=32,
            num_inference_steps=3,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
        images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
        return np.concatenate(list(images), axis=1)  # (V, H, W, 3) -> (H, V*W, 3)

    quiet = dict(log=lambda *_: None)
    pipe, info = load_pipeline(str(adapter), **quiet)
    assert info["kind"] == "adapter" and info["adapter"]["merged"]
    loaded = sample(pipe)
    on_base, _ = load_pipeline(str(base), lora=str(adapter), **quiet)
    plain, _ = load_pipeline(str(base), **quiet)
    from_base = sample(on_base)
    original = sample(plain)
    diff = np.abs(loaded.astype(int) - produced.astype(int))
    assert diff.max() <= 2, diff.max()  # merged vs unmerged LoRA: rounding only
    assert np.array_equal(loaded, from_base)
    assert np.abs(original.astype(int) - produced.astype(int)).mean() > 3 * max(diff.mean(), 0.1)
    # the base pipeline is untouched by loading an adapter on another copy
    assert not any("lora" in n for n, _ in plain.unet.named_parameters())
    # diffusers' own LoRA API on the same folder: load_lora_weights (unfused), fuse_lora
    plain.load_lora_weights(str(adapter))
    assert any("lora" in n for n, _ in plain.unet.named_parameters())
    unfused = sample(plain)
    assert np.abs(unfused.astype(int) - produced.astype(int)).max() <= 2
    plain.fuse_lora()
    assert np.abs(sample(plain).astype(int) - loaded.astype(int)).max() <= 2


# ---- CLI ----------------------------------------------------------------------------------


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def test_cli_end_to_end_then_sample(base, photos, tmp_path, capsys, caplog):
    from mvdiff.cli import main

    out = tmp_path / "db"
    argv = ["dreambooth", "--config", str(TINY_DB), "--model", str(base), "--images",
            str(photos), "--prompt", PROMPT, "--output", str(out), "--lora", "--prior",
            "--steps", "4", "--set", "validation.every=4", "--set", "validation.steps=2"]  # fmt: skip
    caplog.set_level(logging.INFO)
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert f"wrote {out / 'adapter'}" in printed
    assert (out / "config.yaml").is_file() and (out / "samples" / "step-0000004.png").is_file()
    assert (out / "checkpoints" / "step-0000004").is_dir()
    # ONE follow-up command (printed, not also logged), and it runs as printed
    said = printed + captured.err + caplog.text
    assert said.count("mvdiff sample") == 1, said
    follow_up = shlex.split(printed.split("try: ", 1)[1].strip())
    assert follow_up[:2] == ["mvdiff", "sample"] and "--height" in follow_up

    sample = out / "sample"
    res = subprocess.run(
        [sys.executable, "-m", "mvdiff.cli", *follow_up[1:], "--steps", "3"],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LoRA" in res.stdout
    settings = json.loads((sample / "settings.json").read_text())
    assert settings["model"]["kind"] == "adapter"
    assert settings["model"]["folder"] == str(base.resolve())
    views = [np.asarray(PIL.Image.open(sample / f"view_{v:02d}.png")) for v in range(4)]
    assert all(v.shape == (32, 32, 3) for v in views)

    # --model BASE --lora ADAPTER is the same model
    again = tmp_path / "again"
    assert main(["sample", "--model", str(base), "--lora", str(out / "adapter"), "--prompt",
                 PROMPT, "--output", str(again), "--height", "32", "--width", "32",
                 "--steps", "3"]) == 0  # fmt: skip
    for v in range(4):
        assert np.array_equal(views[v], np.asarray(PIL.Image.open(again / f"view_{v:02d}.png")))

    # text-to-3d takes the adapter too (2 steps: loading and running, not quality)
    mesh = tmp_path / "t3d"
    assert main(["text-to-3d", "--model", str(out / "adapter"), "--prompt", "a sks cat",
                 "--output", str(mesh), "--fast", "--steps", "2", "--mesh-resolution", "16",
                 "--device", "cpu"]) == 0  # fmt: skip
    assert (mesh / "mesh.obj").is_file()

    # the entry script is the same command
    res = subprocess.run([sys.executable, str(ROOT / "train" / "dreambooth.py"), "--help"],
                         env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0 and "--lora" in res.stdout


def test_lora_on_a_bypassed_layer_is_an_error(base, photos, tmp_path):
    """A LoRA target that DreamBooth's 2D mode never calls (the camera MLP: no camera on the
    photos) would silently never train, so it is an error naming it."""
    from mvdiff.training.trainer import train

    cfg = db_config(base, photos, tmp_path / "bad", "max_steps=1", "export=false",
                    "checkpoint.every=0", "dreambooth.lora.enabled=true",
                    "dreambooth.lora.target_modules=[class_embedding.linear_1, attn2.to_q]")  # fmt: skip
    with pytest.raises(UserError, match="never get a gradient.*class_embedding.linear_1"):
        train(cfg)


def test_lora_on_self_attention_trains(base, photos, tmp_path):
    """The multi-view processor fuses q/k/v only for plain nn.Linear layers, so LoRA-wrapped
    self-attention projections are called and their adapters learn."""
    from safetensors.torch import load_file

    from mvdiff.training.trainer import train

    cfg = db_config(base, photos, tmp_path / "sa", "max_steps=2", "checkpoint.every=0",
                    "dreambooth.lora.enabled=true",
                    "dreambooth.lora.target_modules=[attn1.to_q, attn1.to_k, attn1.to_v]")  # fmt: skip
    summary = train(cfg)
    weights = load_file(str(Path(summary["adapter"]) / "pytorch_lora_weights.safetensors"))
    for proj in ("to_q", "to_k", "to_v"):
        b = [w for k, w in weights.items() if f"attn1.{proj}.lora_B" in k]
        assert b and any(w.abs().max() > 0 for w in b), proj  # B starts at 0: it trained
    defaults = type(cfg.dreambooth.lora)().target_modules
    assert {"attn1.to_q", "attn1.to_k", "attn1.to_v"} <= set(defaults)


def test_adapter_on_the_builtin_tiny_model(photos, tmp_path):
    """``--model tiny`` (README's CPU try-out): the adapter records "tiny" and loads on it."""
    from mvdiff.pipelines.loading import load_pipeline
    from mvdiff.training.trainer import train

    out = tmp_path / "t"
    cfg = db_config("tiny", photos, out, "max_steps=1", "checkpoint.every=0",
                    "dreambooth.lora.enabled=true")  # fmt: skip
    summary = train(cfg)
    assert json.loads((out / "adapter" / "mvdiff_adapter.json").read_text())["base_model"] == "tiny"
    pipe, info = load_pipeline(summary["adapter"], log=lambda *_: None)
    assert info["kind"] == "adapter" and info["base_model"] == "tiny"
    images = pipe("a sks cat", height=32, width=32, num_inference_steps=2, output_type="np")
    assert images.images.shape == (4, 32, 32, 3)


def test_readme_try_out_matches_the_printed_command_and_stays_in_one_folder():
    """README's tiny try-out ends with the very command `mvdiff dreambooth` prints, and
    writes only under tryout/ (not cat/, runs/, samples/ in the repository root)."""
    from mvdiff.cli import build_parser
    from mvdiff.commands.dreambooth import config_from_args, sample_command

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("Tiny CPU try-out")
    first = readme.index("```bash\n", start) + len("```bash\n")
    block = readme[first : readme.index("```", first)]
    lines = block.replace("\\\n", " ").splitlines()
    train = next(shlex.split(x) for x in lines if x.startswith("mvdiff dreambooth"))
    cfg = config_from_args(build_parser().parse_args(train[1:]))
    assert lines[-1] == sample_command(cfg, f"{cfg.output_dir}/adapter")
    paths = re.findall(r"(?:--images|--output) +(\S+)", block)
    paths += re.findall(r"(?:Path|save)\(f?'([^']+)'\)", block)
    assert len(paths) >= 5 and all(p.startswith("tryout/") for p in paths), paths
