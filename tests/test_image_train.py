"""Training the image-conditioned (ImageDream) mode: init from MVDream, reference views,
CFG drops, the reference-frame loss, and a tiny model trained from shards that samples from a
photo and drives image-to-3d."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mvdiff.config import load_config  # noqa: E402
from mvdiff.training.config import TrainConfig  # noqa: E402
from mvdiff.training.image_prompt import (  # noqa: E402
    ImagePromptConfig,
    add_image_prompt,
    draw_drops,
    split_reference,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny_cpu.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def imagedream_folder(tmp_path_factory):
    """tiny_image_components(0) saved as a pipeline folder (a tiny converted ImageDream)."""
    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.testing import tiny_image_components

    folder = tmp_path_factory.mktemp("imagedream") / "model"
    MVDreamPipeline(**tiny_image_components(0)).save_pretrained(folder)
    return folder


def image_config(shards, out, *overrides) -> TrainConfig:
    return load_config(
        TrainConfig,
        TINY,
        [
            f"output_dir={out}",
            f"data.mv_shards={shards}/mv/*.tar",
            f"data.shards_2d={shards}/2d/*.tar",
            "data.batch_size=1",
            "log_every=1",
            "image.enabled=true",
            "image.encoder=tiny",
            "image.num_tokens=4",
            *overrides,
        ],
    )


def _inputs(unet, seed=0, views=4, embed_dim=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(views, 4, 8, 8, generator=g)
    text = torch.randn(views, 77, 32, generator=g)
    camera = torch.randn(views, 16, generator=g)
    embeds = torch.randn(1, 5, embed_dim, generator=g)
    return x, text, camera, embeds


def test_image_prompt_from_mvdream_copies_or_zeroes_the_ip_projections():
    """MVDream weights kept; to_k_ip/to_v_ip = to_k/to_v (IP-Adapter init) or zero, and with
    zero the new model computes exactly the MVDream model's output."""
    from mvdiff.testing import tiny_unet

    mv = tiny_unet(0).eval()
    copy = add_image_prompt(mv, 4, 32, "copy").eval()
    assert copy.config.num_image_tokens == 4 and copy.image_proj is not None
    mv_sd, sd = mv.state_dict(), copy.state_dict()
    for k, v in mv_sd.items():
        assert torch.equal(sd[k], v), k
    ip = [k for k in sd if "_ip." in k]
    assert ip and all(torch.equal(sd[k], sd[k.replace("_ip.", ".")]) for k in ip)
    zero = add_image_prompt(mv, 4, 32, "zero").eval()
    x, text, camera, embeds = _inputs(mv)
    with torch.no_grad():
        want = mv(x, 10, text, camera=camera, num_views=4).sample
        got = zero(x, 10, text, camera=camera, num_views=4, image_embeds=embeds).sample
        moved = copy(x, 10, text, camera=camera, num_views=4, image_embeds=embeds).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (moved - want).abs().max() > 1e-4  # copies: the image branch is live from step 0


def test_extra_reference_view_is_a_render_not_among_the_targets(shards):
    """The loader's extra view is one of the object's renders, never a target; the targets
    keep the ring spacing."""
    from mvdiff.data.loader import DataConfig, build_loader

    cfg = DataConfig(mv_shards=f"{shards}/mv/*.tar", num_views=4, resolution=32,
                     batch_size=1, num_workers=0, shuffle_buffer=0)  # fmt: skip
    loader = build_loader(cfg, "mv", seed=0, epochs=1, extra_views=1)
    from mvdiff.data.multiview import MultiViewDecoder

    seen = 0
    for batch in loader:
        assert batch["pixels"].shape[1] == 5 and batch["camera"].shape[1] == 5
        split = split_reference(batch, 4, "extra", 0, 0, seen)
        assert split["pixels"].shape[1] == 4 and split["camera"].shape[1] == 4
        assert torch.equal(split["reference"], batch["pixels"][:, 4])
        seen += 1
    assert seen == 6
    # the decoder's choice: distinct views, the first 4 on the ring (2 renders apart of 8)
    import random

    from mvdiff.data.shards import open_shards, tar_samples

    dec = MultiViewDecoder(num_views=4, resolution=32, extra_views=1)
    urls = sorted(str(p) for p in (shards / "mv").glob("*.tar"))
    raws = list(tar_samples(open_shards({"url": u} for u in urls)))
    rng = random.Random(0)
    for raw in raws * 4:
        views = dec.decode(raw, rng)["views"]
        assert len(set(views)) == 5 and views[4] not in views[:4]
        assert sorted((b - a) % 8 for a, b in zip(views[:4], views[1:4] + views[:1])) == [2] * 4


def test_target_reference_and_2d_self_conditioning():
    pixels = torch.arange(2 * 4 * 3 * 2 * 2, dtype=torch.uint8).reshape(2, 4, 3, 2, 2)
    batch = {"pixels": pixels, "camera": torch.zeros(2, 4, 16), "caption": ["a", "b"]}
    out = split_reference(batch, 4, "target", seed=0, rank=0, index=7)
    assert out["pixels"].shape == (2, 4, 3, 2, 2)
    picks = [
        next(v for v in range(4) if torch.equal(out["reference"][i], pixels[i, v]))
        for i in range(2)
    ]
    again = split_reference(batch, 4, "target", seed=0, rank=0, index=7)
    assert torch.equal(again["reference"], out["reference"])  # a function of (seed, rank, step)
    assert len(
        {
            tuple(split_reference(batch, 4, "target", 0, 0, i)["reference"][0].flatten().tolist())
            for i in range(40)
        }  # fmt: skip
    ) == 4 and picks[0] in range(4)
    flat = {"pixels": pixels[:, :1], "camera": None, "caption": ["a", "b"]}
    assert torch.equal(split_reference(flat, 4, "extra", 0, 0, 0)["reference"], pixels[:, 0])


def test_cfg_drops_rates_and_nesting():
    cfg = ImagePromptConfig(drop_image=0.2, drop_reference=0.1, drop_all=0.05)
    n = 4000
    drops = draw_drops(cfg, n, seed=0, rank=0, index=3)
    text, image, ref = (np.array(drops[k]) for k in ("text", "image", "reference"))
    assert abs(text.mean() - 0.05) < 0.015
    assert abs(image.mean() - (1 - 0.95 * 0.8)) < 0.02
    assert abs(ref.mean() - (1 - 0.95 * 0.8 * 0.9)) < 0.02
    assert not (text & ~image).any() and not (image & ~ref).any()  # drop_all drops everything
    assert drops == draw_drops(cfg, n, seed=0, rank=0, index=3)
    assert drops != draw_drops(cfg, n, seed=0, rank=1, index=3)
    none = draw_drops(ImagePromptConfig(drop_image=0, drop_reference=0, drop_all=0), 50, 0, 0, 0)
    assert not any(none["text"] + none["image"] + none["reference"])


def test_reference_frame_loss_covers_the_targets_only():
    """diffusion_loss with reference_latents: F = V + 1 frames, the last one zero-camera with
    the object's timestep; what the UNet predicts there does not change the loss."""
    from diffusers import DDPMScheduler

    from mvdiff.training.loss import diffusion_loss

    calls = []

    class Spy(torch.nn.Module):
        def __init__(self, ref_value):
            super().__init__()
            self.ref_value = ref_value

        def forward(self, x, t, text, camera=None, num_views=1, image_embeds=None,
                    reference_latents=None):  # fmt: skip
            calls.append(dict(x=x, t=t, camera=camera, num_views=num_views,
                              embeds=image_embeds, ref=reference_latents))  # fmt: skip
            out = torch.zeros_like(x).reshape(2, num_views, *x.shape[1:])
            out[:, -1] = self.ref_value  # (B, F, C, h, w): the reference frame's prediction
            return type("O", (), {"sample": out.reshape(x.shape)})

    sched = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(8, 4, 4, 4)
    text = torch.randn(2, 77, 32)
    camera = torch.randn(8, 16)
    embeds, ref = torch.randn(2, 5, 32), torch.randn(2, 4, 4, 4)
    losses = [
        diffusion_loss(
            Spy(v),
            sched,
            latents,
            text,
            camera,
            4,
            torch.Generator().manual_seed(0),
            image_embeds=embeds,
            reference_latents=ref,
        )  # fmt: skip
        for v in (0.0, 100.0)
    ]
    assert torch.equal(losses[0], losses[1])
    plain = diffusion_loss(Spy(0.0), sched, latents, text, camera, 4,
                           torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(losses[0], plain)  # same noise and timesteps on the targets
    c = calls[0]
    assert c["num_views"] == 5 and c["x"].shape == (10, 4, 4, 4)
    assert not c["camera"].reshape(2, 5, 16)[:, 4].any()
    torch.testing.assert_close(c["camera"].reshape(2, 5, 16)[:, :4], camera.reshape(2, 4, 16))
    t = c["t"].reshape(2, 5)
    assert (t == t[:, :1]).all() and c["embeds"] is embeds and c["ref"] is ref


def test_image_mode_refuses_what_it_cannot_do(shards, tmp_path):
    from mvdiff.errors import UserError
    from mvdiff.training.trainer import train

    cfg = image_config(shards, tmp_path / "b", f"image.encoder={tmp_path}", "max_steps=1")
    with pytest.raises(UserError, match=r"image.encoder=.*no image_encoder/"):
        train(cfg)


def _photo(path: Path) -> Path:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[14:30, 12:28] = [220, 40, 30, 255]
    rgba[34:50, 34:50] = [30, 60, 220, 255]
    PIL.Image.fromarray(rgba).save(path)
    return path


@pytest.mark.slow
def test_tiny_image_model_trains_resumes_samples_and_lifts_to_3d(shards, tmp_path, capsys):
    """From the tiny MVDream model: image mode on 3D + 2D shards, resume is exact, the
    exported folder samples from a photo (`mvdiff sample --image`) and drives image-to-3d
    (`mvdiff text-to-3d --image`), which writes a mesh."""
    from safetensors.torch import load_file

    from mvdiff.cli import main
    from mvdiff.models import MultiViewUNet2DConditionModel
    from mvdiff.training.trainer import train

    common = ["max_steps=4", "checkpoint.every=2", "checkpoint.keep=5", "data.p_2d=0.4",
              "optim.lr=3e-3", "image.drop_image=0.3", "image.drop_all=0.2"]  # fmt: skip
    full = train(image_config(shards, tmp_path / "a", *common))
    assert full["steps"] == 4 and np.isfinite(full["final_loss"])
    logs = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert 0 < sum(r["frac_2d_batches"] for r in logs) < len(logs)  # 2D and 3D batches
    # 2 steps, then --resume latest for 2 more: the same weights as 4 straight
    train(image_config(shards, tmp_path / "b", *common, "max_steps=2", "export=false"))
    resumed = train(image_config(shards, tmp_path / "b", *common, "checkpoint.resume=latest"))
    a = load_file(str(tmp_path / "a/checkpoints/step-0000004/model.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/step-0000004/model.safetensors"))
    assert any("image_proj" in k for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed["rank_checksums"] == full[
        "rank_checksums"]  # fmt: skip

    model = tmp_path / "a" / "model"
    unet = MultiViewUNet2DConditionModel.from_pretrained(model / "unet")
    assert unet.config.num_image_tokens == 4
    start = add_image_prompt(__import__("mvdiff.testing").testing.tiny_unet(0), 4, 32)
    moved = [k for k, v in start.state_dict().items()
             if k.startswith("image_proj.") and not torch.equal(v, unet.state_dict()[k])]  # fmt: skip
    assert moved  # the resampler was trained

    photo = _photo(tmp_path / "photo.png")
    samples = tmp_path / "samples"
    argv = ["sample", "--model", str(model), "--image", str(photo), "--height", "32",
            "--width", "32", "--steps", "2", "--output", str(samples)]  # fmt: skip
    assert main(argv) == 0
    for name in ("view_00.png", "view_03.png", "input.png", "grid.png"):
        assert (samples / name).is_file(), name

    out = tmp_path / "to3d"
    argv = ["text-to-3d", "--image", str(photo), "--model", str(model), "--output", str(out),
            "--fast", "--steps", "2", "--samples", "8", "--mesh-resolution", "16",
            "--set", "turntable_frames=4", "--set", "render_size=16",
            "--set", "render_size_late=16", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["t"] is not None  # the prior was used
    assert (out / "mesh.glb").is_file() and (out / "mesh.obj").is_file()


def test_shipped_imagedream_config_parses():
    cfg = load_config(TrainConfig, ROOT / "train" / "configs" / "imagedream_sd21.yaml")
    assert cfg.image.enabled and cfg.image.num_tokens == 16 and cfg.image.reference == "extra"
    assert TrainConfig().image.enabled is False  # text training is unchanged by default


@pytest.mark.slow
def test_imagedream_folder_starts_image_mode_and_text_mode_keeps_the_tower(
    shards, tmp_path, imagedream_folder
):
    """An ImageDream folder: image mode uses its own resampler and tower (no new weights);
    plain text training of it exports a folder that still has the tower (sample --image)."""
    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.testing import tiny_image_components
    from mvdiff.training.trainer import train

    folder = imagedream_folder
    parts = tiny_image_components(0)
    for mode in ("image", "text"):
        overrides = [f"model.pretrained={folder}", "max_steps=1", "checkpoint.every=0",
                     "image.encoder=", "data.p_2d=0"]  # fmt: skip
        if mode == "text":
            overrides.append("image.enabled=false")
        train(image_config(shards, tmp_path / mode, *overrides))
        model = tmp_path / mode / "model"
        index = json.loads((model / "model_index.json").read_text())
        assert {"image_encoder", "feature_extractor"} <= set(index), mode
        pipe = MVDreamPipeline.from_pretrained(model)
        assert pipe.has_image_prompt and pipe.unet.config.num_image_tokens == 4
        tower = pipe.image_encoder.state_dict()
        assert all(torch.equal(v, tower[k]) for k, v in parts["image_encoder"].state_dict().items())


@pytest.mark.slow
def test_image_mode_in_two_processes_keeps_identical_weights(shards, tmp_path):
    """accelerate launch, 2 CPU processes (DDP): every new parameter is used on every step
    (zero image tokens when dropped), the ranks stay in sync."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "mvdiff.cli", "train", "--config", str(TINY), "--max-steps", "3",
           "--output-dir", str(out)]  # fmt: skip
    for o in [f"data.mv_shards={shards}/mv/*.tar", f"data.shards_2d={shards}/2d/*.tar",
              "data.batch_size=1", "data.p_2d=0.5", "log_every=1", "checkpoint.every=0",
              "image.enabled=true", "image.encoder=tiny", "image.num_tokens=4",
              "image.drop_image=0.5"]:  # fmt: skip
        cmd += ["--set", o]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1"}  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rank_checksums"]) == 2 and summary["ranks_in_sync"], summary
    assert (out / "model" / "image_encoder").is_dir()


@pytest.mark.slow
def test_dreambooth_lora_on_an_imagedream_folder_keeps_sample_image(imagedream_folder, tmp_path):
    """MVDreamBooth with LoRA from an ImageDream folder: the adapter loads on its base, which
    still samples from a photo."""
    from mvdiff.pipelines.loading import load_pipeline
    from mvdiff.training.config import DreamBoothTrainConfig
    from mvdiff.training.trainer import train

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        _photo(photos / f"p{i}.png")
    cfg = load_config(
        DreamBoothTrainConfig,
        ROOT / "train" / "configs" / "dreambooth_tiny_cpu.yaml",
        [f"model.pretrained={imagedream_folder}", f"dreambooth.images={photos}",
         "dreambooth.prompt=a photo of sks block", f"output_dir={tmp_path / 'db'}",
         "max_steps=2", "checkpoint.every=0", "validation.every=0",
         "dreambooth.lora.enabled=true", "dreambooth.prior.enabled=false"],
    )  # fmt: skip
    summary = train(cfg)
    pipe, info = load_pipeline(summary["adapter"], log=lambda m: None)
    assert info["kind"] == "adapter" and pipe.has_image_prompt
    images = pipe("a photo of sks block", image=PIL.Image.open(photos / "p0.png"), height=32,
                  width=32, num_inference_steps=2, output_type="np").images  # fmt: skip
    assert images.shape == (4, 32, 32, 3) and np.isfinite(images).all()


def test_task_for_the_image_mode():
    """image.enabled selects the image task (its summary line says so); DreamBooth refuses it."""
    from mvdiff.errors import UserError
    from mvdiff.training.config import DreamBoothTrainConfig
    from mvdiff.training.tasks import ImageTask, JointTask, task_for

    cfg = load_config(TrainConfig, TINY, ["image.enabled=true", "data.mv_shards=x.tar"])
    task = task_for(cfg)
    assert isinstance(task, ImageTask)
    assert "image prompt: reference extra, frame on" in task.describe(cfg)
    assert type(task_for(TrainConfig())) is JointTask
    cfg.model.camera = False
    with pytest.raises(UserError, match="model.camera"):
        task.check(cfg)
    db = DreamBoothTrainConfig()
    db.image.enabled = True
    with pytest.raises(UserError, match="DreamBooth"):
        task_for(db)
