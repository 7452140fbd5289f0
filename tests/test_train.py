"""Training: loss falls, exact resume, NaN handling, export, model loading, CLI, 2 processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mvdiff.config import load_config  # noqa: E402
from mvdiff.training.config import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny_cpu.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_config(shards, out, *overrides) -> TrainConfig:
    return load_config(
        TrainConfig,
        TINY,
        [
            f"output_dir={out}",
            f"data.mv_shards={shards}/mv/*.tar",
            f"data.shards_2d={shards}/2d/*.tar",
            "data.batch_size=1",
            "data.p_2d=0.3",
            "log_every=1",
            *overrides,
        ],
    )


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_learning_rate_schedule():
    from mvdiff.training.trainer import learning_rate

    cfg = load_config(TrainConfig, None, ["optim.lr=1.0", "optim.warmup_steps=10",
                                         "optim.schedule=cosine", "max_steps=110"])  # fmt: skip
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.5)
    assert learning_rate(110, cfg) == pytest.approx(0.0, abs=1e-12)


def test_one_timestep_per_object_shared_by_views():
    from mvdiff.testing import tiny_components
    from mvdiff.training.components import noise_scheduler_from
    from mvdiff.training.loss import diffusion_loss

    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x, t, text, camera=None, num_views=1):
            seen.update(t=t.clone(), text=text.clone(), camera=camera, num_views=num_views)
            return type("Out", (), {"sample": torch.zeros_like(x)})

    sched = noise_scheduler_from(tiny_components()["scheduler"])
    latents = torch.randn(3 * 4, 4, 4, 4)  # 3 objects x 4 views
    text = torch.randn(3, 7, 32)
    g = torch.Generator().manual_seed(0)
    diffusion_loss(Spy(), sched, latents, text, torch.zeros(12, 16), 4, g)
    t = seen["t"].reshape(3, 4)  # (B*V,) -> (B, V)
    assert (t == t[:, :1]).all() and len(set(t[:, 0].tolist())) > 1
    assert torch.equal(seen["text"][4:8], text[1:2].expand(4, 7, 32))


def test_start_from_plain_sd_folder_adds_zero_camera_mlp(tmp_path):
    from diffusers import UNet2DConditionModel

    from mvdiff.testing import tiny_components, tiny_unet
    from mvdiff.training.components import load_components

    parts = tiny_components()
    plain = tiny_unet(camera=False)
    assert plain.class_embedding is None
    folder = tmp_path / "sd"
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        parts[name].save_pretrained(folder / name)
    UNet2DConditionModel.from_config(plain.config).save_pretrained(folder / "unet")
    (folder / "model_index.json").write_text("{}")
    loaded = load_components(str(folder))
    assert loaded.source == "sd"
    mlp = loaded.unet.class_embedding
    assert mlp is not None and mlp.linear_2.weight.abs().max() == 0
    parts["unet"].save_pretrained(folder / "unet")  # now a multi-view UNet folder
    assert load_components(str(folder)).source == "multiview"


def _eval_loss(unet, batch_seed=123) -> float:
    """eps-MSE on a fixed batch (fixed noise and timesteps) of the synthetic data."""
    from mvdiff.testing import tiny_components
    from mvdiff.training.components import noise_scheduler_from
    from mvdiff.training.loss import diffusion_loss, encode_images, encode_prompts

    parts = tiny_components()
    g = torch.Generator().manual_seed(batch_seed)
    pixels = torch.full((2, 4, 3, 32, 32), 255, dtype=torch.uint8)
    pixels[:, :, 0, 8:24, 8:24] = 220  # a reddish square on white, like the synthetic balls
    pixels[:, :, 1:, 8:24, 8:24] = 30
    with torch.no_grad():
        latents = encode_images(parts["vae"], pixels, g)
        text = encode_prompts(parts["tokenizer"], parts["text_encoder"], ["a red ball"] * 2)
        cam = torch.zeros(8, 16)
        return float(diffusion_loss(unet.eval(), noise_scheduler_from(parts["scheduler"]),
                                    latents, text, cam, 4, g))  # fmt: skip


def test_loss_falls_and_export_loads(shards, tmp_path):
    from mvdiff.models import MultiViewUNet2DConditionModel
    from mvdiff.testing import tiny_components
    from mvdiff.training.trainer import train

    cfg = tiny_config(shards, tmp_path / "run", "max_steps=8", "optim.lr=3e-3", "data.p_2d=0.5",
                      "validation.every=8", "validation.steps=2", "checkpoint.every=0")  # fmt: skip
    summary = train(cfg)
    assert summary["steps"] == 8 and summary["ranks_in_sync"]
    model = tmp_path / "run" / "model"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert (model / sub).exists(), sub
    trained = MultiViewUNet2DConditionModel.from_pretrained(model / "unet")
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    AutoencoderKL.from_pretrained(model / "vae")
    CLIPTextModel.from_pretrained(model / "text_encoder")
    CLIPTokenizer.from_pretrained(model / "tokenizer")
    DDIMScheduler.from_pretrained(model / "scheduler")
    before, after = _eval_loss(tiny_components()["unet"]), _eval_loss(trained)
    assert after < 0.85 * before, (before, after)
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "samples_per_s", "data_wait_frac"} <= set(logs[-1])
    assert 0 < sum(r["frac_2d_batches"] for r in logs) < len(logs)  # both kinds of batches
    assert (tmp_path / "run" / "samples" / "step-0000008.png").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))  # TensorBoard
    try:
        from mvdiff.pipelines import MVDreamPipeline
    except ImportError:
        return
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_mvdream", "MVDreamPipeline"]
    try:
        pipe = MVDreamPipeline.from_pretrained(model)
    except ValueError as e:  # the pipeline package is still landing; components load above
        pytest.xfail(f"MVDreamPipeline.from_pretrained failed: {e}"[:300])
    assert isinstance(pipe.unet, MultiViewUNet2DConditionModel)


def _env(**extra):
    # same thread count as this process: CPU reductions depend on it (bit-exactness)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **extra}
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return env


def test_resume_is_exact_after_kill(shards, tmp_path):
    """4 steps straight == 2 steps, SIGKILL, resume latest, 2 more: bit-identical weights."""
    from mvdiff.training.trainer import train

    common = ["max_steps=4", "checkpoint.every=2", "checkpoint.keep=5", "ema=true",
              "ema_decay=0.9", "optim.schedule=cosine", "export=false"]  # fmt: skip
    straight = train(tiny_config(shards, tmp_path / "a", *common))
    assert straight["steps"] == 4

    # run b: killed (SIGKILL) as soon as its step-2 checkpoint exists
    cmd = [sys.executable, str(ROOT / "train" / "train.py"), "--config", str(TINY)]
    for o in [f"output_dir={tmp_path / 'b'}", f"data.mv_shards={shards}/mv/*.tar",
              f"data.shards_2d={shards}/2d/*.tar", "data.batch_size=1", "data.p_2d=0.3",
              "log_every=1", *common, "max_steps=400"]:  # fmt: skip
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt2 = tmp_path / "b" / "checkpoints" / "step-0000002" / "trainer_state.json"
    deadline = time.time() + 240
    while not ckpt2.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt2.exists(), proc.stderr.read().decode()[-2000:]
    # max_steps=400 above only keeps it running; the LR schedule must match run a, so resume
    # with max_steps=4 (the schedule is a pure function of step and max_steps)
    resumed = train(tiny_config(shards, tmp_path / "b", *common, "checkpoint.resume=latest"))
    assert resumed["steps"] == 4
    a = _weights(tmp_path / "a" / "checkpoints" / "step-0000004")
    b = _weights(tmp_path / "b" / "checkpoints" / "step-0000004")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight["rank_checksums"] == resumed["rank_checksums"]


def test_nan_loss_stops_cleanly_or_skips(shards, tmp_path):
    from mvdiff.training.trainer import NonFiniteLossError, train

    cfg = tiny_config(shards, tmp_path / "stop", "max_steps=5", "checkpoint.every=2",
                      "debug_nan_step=3", "export=false")  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="step 3.*step-0000002"):
        train(cfg)
    ckpts = sorted(p.name for p in (tmp_path / "stop" / "checkpoints").iterdir())
    assert ckpts == ["step-0000002"]
    assert all(
        torch.isfinite(v).all() for v in _weights(tmp_path / "stop/checkpoints" / ckpts[0]).values()
    )

    # also exercises accumulation, gradient checkpointing, min-SNR weighting and offset noise
    cfg = tiny_config(shards, tmp_path / "skip", "max_steps=5", "checkpoint.every=0",
                      "debug_nan_step=3", "nan_policy=skip", "export=false",
                      "gradient_accumulation_steps=2", "model.gradient_checkpointing=true",
                      "snr_gamma=5.0", "noise_offset=0.05")  # fmt: skip
    summary = train(cfg)
    assert summary["nan_skips"] == 1 and math.isfinite(summary["final_loss"])
    weights = _weights(tmp_path / "skip" / "checkpoints" / "step-0000005")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_cli_errors_are_one_line(tmp_path, capsys):
    from mvdiff.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 3\n")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert main(["train", "--config", str(bad)]) == 2
    assert main(["train", "--config", str(TINY), "--set", "nope=1"]) == 2
    no_data = ["--set", "data.mv_shards="]  # the tiny config names the quickstart's renders
    assert (
        main(["train", "--config", str(TINY), "--output-dir", str(tmp_path / "o"), *no_data]) == 2
    )
    missing = ["--set", f"data.mv_shards={tmp_path}/none-*.tar"]
    assert main(["train", "--config", str(TINY), *missing]) == 2
    assert "none-*.tar" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_keep_identical_weights(shards, tmp_path):
    out = tmp_path / "ddp"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mvdiff.cli", "train",
           "--config", str(TINY), "--max-steps", "3", "--output-dir", str(out)]  # fmt: skip
    for o in [f"data.mv_shards={shards}/mv/*.tar", f"data.shards_2d={shards}/2d/*.tar",
              "data.batch_size=1", "data.p_2d=0.5", "log_every=1", "checkpoint.every=0"]:  # fmt: skip
        cmd += ["--set", o]
    res = subprocess.run(
        cmd,
        env=_env(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rank_checksums"]) == 2 and summary["ranks_in_sync"], summary
    assert (out / "model" / "unet").is_dir()


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "mvdream_sd21.yaml"])
def test_shipped_configs_parse(name):
    cfg = load_config(TrainConfig, ROOT / "train" / "configs" / name)
    assert cfg.data.num_views == 4 and cfg.data.p_2d == pytest.approx(0.3)
    if name.startswith("mvdream"):
        assert (cfg.data.resolution, cfg.mixed_precision) == (256, "bf16")
        assert cfg.data.caption_suffix == ", 3d asset"
    import yaml

    for acc in (ROOT / "train" / "accelerate").glob("*.yaml"):
        assert "distributed_type" in yaml.safe_load(acc.read_text()), acc


def test_build_optimizer_honours_fused():
    """``optim.fused`` picks torch's fused AdamW (the default) or torch's own default; the
    update is the same either way."""
    from mvdiff.training.config import OptimConfig
    from mvdiff.training.trainer import build_optimizer

    results = {}
    for fused in (True, False):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 64))
        opt = build_optimizer([p], OptimConfig(fused=fused, weight_decay=0.01), lr=0.1)
        assert bool(opt.defaults["fused"]) is fused
        for _ in range(3):
            p.grad = torch.cos(p.detach() * 3)
            opt.step()
        results[fused] = p.detach().clone()
    assert torch.allclose(results[True], results[False], atol=1e-6)
    assert not torch.allclose(results[True], torch.linspace(-1, 1, 64))
