"""Training recipes: prediction_type targets, the ablation switches (model.attention,
model.camera), the pixel-space autoencoder, and a pixel-space folder trained with the shipped
trainer and sampled with the pipeline (what benchmarks/learning_check.py and the quickstart run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mvdiff.config import load_config  # noqa: E402
from mvdiff.training.config import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny_cpu.yaml"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Echo(torch.nn.Module):
    """A UNet stand-in that outputs a fixed tensor and records its inputs."""

    def __init__(self, out):
        super().__init__()
        self.out, self.seen = out, {}

    def forward(self, x, t, text, camera=None, num_views=1):
        self.seen.update(x=x, t=t)
        return type("Out", (), {"sample": self.out})


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_loss_target_follows_prediction_type(kind):
    """The loss is zero exactly when the UNet outputs the target diffusers names `kind`."""
    from mvdiff.testing import ddim_scheduler
    from mvdiff.training.components import noise_scheduler_from
    from mvdiff.training.loss import diffusion_loss

    sched = noise_scheduler_from(ddim_scheduler(), kind)
    assert sched.config.prediction_type == kind
    latents = torch.randn(2 * 4, 4, 4, 4)  # 2 objects x 4 views
    text = torch.randn(2, 7, 32)
    # the draws diffusion_loss makes from a generator with this seed: noise, then timesteps
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g).repeat_interleave(4)  # (B,) -> (B*V,)
    target = {
        "epsilon": noise,
        "v_prediction": sched.get_velocity(latents, noise, t),
        "sample": latents,
    }
    for name, out in target.items():
        loss = diffusion_loss(Echo(out), sched, latents, text, None, 4,
                              torch.Generator().manual_seed(3))  # fmt: skip
        assert (float(loss) < 1e-12) == (name == kind), (name, float(loss))


def test_min_snr_weights_per_prediction_type():
    from mvdiff.testing import ddim_scheduler
    from mvdiff.training.components import noise_scheduler_from
    from mvdiff.training.loss import min_snr_weights

    sched = noise_scheduler_from(ddim_scheduler())
    t = torch.tensor([10, 500, 990])
    a = sched.alphas_cumprod[t]
    snr = a / (1 - a)
    clipped = snr.clamp(max=5.0)
    for kind, want in (("epsilon", clipped / snr), ("v_prediction", clipped / (snr + 1)),
                       ("sample", clipped)):  # fmt: skip
        torch.testing.assert_close(min_snr_weights(sched, t, 5.0, kind), want)
    with pytest.raises(ValueError):
        min_snr_weights(sched, t, 5.0, "x0")


def test_pixel_autoencoder_is_exact_and_loads_as_a_vae(tmp_path):
    from mvdiff.models.pixel_vae import PixelUnshuffleAutoencoder
    from mvdiff.training.loss import encode_images

    vae = PixelUnshuffleAutoencoder(patch=4)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 4  # the pipeline's scale factor
    pixels = torch.randint(0, 256, (2, 3, 3, 16, 16), dtype=torch.uint8)  # (B, V, 3, H, W)
    latents = encode_images(vae, pixels, torch.Generator().manual_seed(0))
    assert latents.shape == (6, 48, 4, 4)
    white = encode_images(vae, torch.full((1, 1, 3, 8, 8), 255, dtype=torch.uint8),
                          torch.Generator())  # fmt: skip
    assert white.abs().max() == 0  # white_zero: the background is 0
    back = vae.decode(latents).sample  # [-1, 1]
    x = pixels.reshape(6, 3, 16, 16).float() / 127.5 - 1  # (B, V, ...) -> (B*V, ...)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-6)
    vae.save_pretrained(tmp_path / "vae")
    again = PixelUnshuffleAutoencoder.from_pretrained(tmp_path / "vae")
    assert again.config.patch == 4 and again.config.latent_channels == 48
    with pytest.raises(ValueError, match="power of two"):
        PixelUnshuffleAutoencoder(patch=3)


def test_per_view_attention_ignores_the_other_views():
    """joint: a view's output depends on the other views; per_view: each view of a 4-view
    batch comes out as it does alone (same weights)."""
    from mvdiff.testing import tiny_unet
    from mvdiff.training.components import configure_unet

    unet = tiny_unet(0).eval()
    x = torch.randn(4, 4, 8, 8)
    text = torch.randn(4, 77, 32)
    cam = torch.randn(4, 16)
    t = torch.full((4,), 500)

    def run(model, views):
        return model(x, t, text, camera=cam, num_views=views).sample

    with torch.no_grad():
        joint4, joint1 = run(unet, 4), run(unet, 1)
        assert (joint4 - joint1).abs().max() > 1e-4
        per_view = configure_unet(unet, attention="per_view")
        assert per_view.config.view_attention == "per_view"
        torch.testing.assert_close(run(per_view, 4), joint1)


def test_camera_false_removes_the_camera_mlp_and_keeps_the_rest():
    from mvdiff.testing import tiny_unet
    from mvdiff.training.components import configure_unet

    unet = tiny_unet(0)
    kept = {k: v.clone() for k, v in unet.state_dict().items() if "class_embedding" not in k}
    plain = configure_unet(unet, camera=False)
    assert plain.class_embedding is None
    state = plain.state_dict()
    assert set(state) == set(kept) and all(torch.equal(state[k], kept[k]) for k in kept)
    again = configure_unet(plain, camera=True)  # added back: zero-initialised
    assert again.class_embedding.linear_2.weight.abs().max() == 0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from mvdiff.data.synthetic import write_synthetic_2d_shards, write_synthetic_mv_shards

    root = tmp_path_factory.mktemp("shards")
    write_synthetic_mv_shards(root / "mv", num_shards=1, objects_per_shard=3, num_views=8,
                              resolution=16)  # fmt: skip
    write_synthetic_2d_shards(root / "2d", num_shards=1, images_per_shard=6, size=(20, 18))
    return root


@pytest.fixture(scope="module")
def pixel_folder(tmp_path_factory):
    from mvdiff.testing import tiny_pixel_components
    from mvdiff.training.export import export_pipeline_folder

    parts = tiny_pixel_components(0, patch=2)
    folder = tmp_path_factory.mktemp("pixel") / "model"
    export_pipeline_folder(folder, parts["unet"], parts["vae"], parts["text_encoder"],
                           parts["tokenizer"], parts["scheduler"])  # fmt: skip
    return folder


def test_pixel_folder_trains_with_ablations_and_samples(shards, pixel_folder, tmp_path):
    """A pixel-space folder trains with the shipped trainer (x0 target, per-view attention,
    no camera, cosine schedule) and its export samples with the pipeline as trained."""
    from diffusers import DDIMScheduler

    from mvdiff.models import MultiViewUNet2DConditionModel
    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.training.trainer import train

    out = tmp_path / "run"
    cfg = load_config(TrainConfig, TINY, [
        f"output_dir={out}", f"model.pretrained={pixel_folder}", "model.attention=per_view",
        "model.camera=false", "prediction_type=sample", "optim.schedule=cosine",
        f"data.mv_shards={shards}/mv/*.tar", f"data.shards_2d={shards}/2d/*.tar",
        "data.resolution=16", "data.min_size_2d=16", "data.batch_size=1", "max_steps=4",
        "optim.warmup_steps=1",
        "checkpoint.every=0", "log_every=1",
    ])  # fmt: skip
    summary = train(cfg)
    assert summary["steps"] == 4 and summary["final_loss"] is not None
    model = Path(summary["model"])
    unet = MultiViewUNet2DConditionModel.from_pretrained(model / "unet")
    assert unet.class_embedding is None and unet.config.view_attention == "per_view"
    assert DDIMScheduler.from_pretrained(model / "scheduler").config.prediction_type == "sample"
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    assert vae_config["_class_name"] == "PixelUnshuffleAutoencoder"
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert logs[-1]["lr"] < logs[0]["lr"]  # cosine decay

    pipe = MVDreamPipeline.from_pretrained(model)
    assert pipe.scheduler.config.prediction_type == "sample"
    assert pipe.unet.config.view_attention == "per_view" and not pipe.has_camera_mlp
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red ball", num_views=4, height=16, width=16, num_inference_steps=2,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (4, 3, 16, 16) and torch.isfinite(images).all()

    # trained again from its own export, it stays a no-camera, per-view, pixel-space model
    from mvdiff.training.components import load_components

    parts = load_components(str(model), camera=False, attention="per_view")
    assert parts.source == "multiview" and parts.unet.class_embedding is None
    assert type(parts.vae).__name__ == "PixelUnshuffleAutoencoder"
