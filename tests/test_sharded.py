"""Sharded training on 2 CPU processes (gloo): validation, EMA and the export take part on every
rank and write once, and an FSDP run exports the folder a DDP run exports for the same seed.

The worker (tests/fixtures/sharded/worker.py) drives the trainer's own functions
(:func:`run_validation`, :func:`export_trained`, :func:`build_ema`, :func:`optimizer_step`) on
a UNet that accelerate wrapped with FSDP2 (``fully_shard``) or DDP. A rank that skipped a
collective would leave the other waiting: the subprocess timeout turns that into a failure.

Both runs train 3 SGD steps with clipping on (every step clips: the norms are above 1) and EMA,
and export the same weights to float rounding (seen: 6e-8), with the same gradient norms: the
norm is of the whole model, not of a rank's shard. The worker feeds 8x8 latents. At 4x4 (the
32-px renders of ``tiny_cpu.yaml``) the tiny UNet's lowest level is 1x1 and its GroupNorms
normalise 2 values each, which turns float rounding into visible differences: the first step
agrees to 1.4e-7 (the forward is bit-equal; the backward sums the gradients of the skip
connections and of the time embedding in another order under FSDP2), the second step's
gradients then differ by 2%, and after 3 steps the exports by 1.4e-3. It is that amplification,
not the engine: a DDP run given the FSDP2 run's weights after the first step reproduces the
FSDP2 run's second-step loss bit for bit and its gradients to 1e-5.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "fixtures" / "sharded" / "worker.py"


def _run(mode: str, out: Path, *args: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", str(WORKER), mode, str(out), *args]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{mode}: the 2-process run hung (a rank skipped a collective)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _unet(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_fsdp_validation_ema_export_on_every_rank_equal_to_ddp(tmp_path):
    from safetensors.torch import load_file

    ddp = _run("ddp", tmp_path / "ddp", "1.0", "3")  # clip to 1.0, 3 steps
    fsdp = _run("fsdp", tmp_path / "fsdp", "1.0", "3")
    assert [r["sharded"] for r in ddp + fsdp] == [False, False, True, True]
    # the gradient norm (clipping's) is of the whole model on every rank, not of a shard
    norms = [r["grad_norms"] for r in ddp + fsdp]
    assert len(norms[0]) == 3 and min(norms[0]) > 1.0  # every step clips
    for other in norms[1:]:
        np.testing.assert_allclose(other, norms[0], rtol=1e-6)
    assert fsdp[0]["wrapper"].startswith("FSDP")
    # the EMA of every shard survives a checkpoint round trip; one EMA file per rank
    assert all(r["ema_restored"] for r in ddp + fsdp)
    assert ddp[0]["ema_files"] == ["ema.safetensors"]
    assert fsdp[0]["ema_files"] == ["ema_rank0.safetensors", "ema_rank1.safetensors"]
    # each rank holds a different shard; under DDP the same weights
    assert ddp[0]["checksum"] == ddp[1]["checksum"]
    assert fsdp[0]["checksum"] != fsdp[1]["checksum"]
    # only rank 0 samples, logs and writes
    for run in (ddp, fsdp):
        assert run[0]["grid"] == [32, 64, 3] and run[1]["grid"] is None
        assert run[0]["model"] and run[1]["model"] is None
    a, b = _unet(tmp_path / "ddp" / "model"), _unet(tmp_path / "fsdp" / "model")
    assert sorted(a) == sorted(b) and len(a) > 400  # whole model, plain names (no shards)
    for key in a:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    for name in ("model_index.json", "unet/config.json"):
        assert (tmp_path / "fsdp" / "model" / name).read_text() == (
            tmp_path / "ddp" / "model" / name
        ).read_text()
    index = json.loads((tmp_path / "fsdp" / "model" / "model_index.json").read_text())
    assert index["unet"][1] == "MultiViewUNet2DConditionModel"  # not FSDP's subclass
    # the export holds the EMA weights, not the raw ones (gathered the same way)
    raw = load_file(str(tmp_path / "fsdp" / "raw.safetensors"))
    assert max((raw[k] - b[k]).abs().max().item() for k in b) > 1e-4
    raw_ddp = load_file(str(tmp_path / "ddp" / "raw.safetensors"))
    for key in raw_ddp:
        torch.testing.assert_close(raw[key], raw_ddp[key], rtol=0, atol=1e-6, msg=key)
    # the validation grids sample the same (EMA) weights
    from PIL import Image

    grids = [np.asarray(Image.open(tmp_path / m / "samples" / "step-0000003.png"), dtype=int)
             for m in ("ddp", "fsdp")]  # fmt: skip
    assert np.abs(grids[0] - grids[1]).max() <= 2

    # the export reloads as a pipeline
    from mvdiff.pipelines import MVDreamPipeline

    pipe = MVDreamPipeline.from_pretrained(str(tmp_path / "fsdp" / "model"))
    torch.testing.assert_close(pipe.unet.state_dict()[sorted(b)[0]], b[sorted(b)[0]])


def test_deepspeed_gets_micro_batch_accumulation_and_clipping_from_the_config():
    """accelerate's own DeepSpeed plugin (as `accelerate launch` builds it from
    train/accelerate/deepspeed_zero2.yaml): ``prepare`` without a dataloader needs
    ``train_micro_batch_size_per_gpu``; the trainer fills it, a mismatch is one line."""
    from types import SimpleNamespace

    import yaml
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from mvdiff.errors import UserError
    from mvdiff.training.sharded import configure_deepspeed, is_sharded

    shipped = yaml.safe_load((ROOT / "train" / "accelerate" / "deepspeed_zero2.yaml").read_text())
    ds = shipped["deepspeed_config"]

    def accelerator():
        plugin = DeepSpeedPlugin(
            zero_stage=ds["zero_stage"],
            gradient_accumulation_steps=ds["gradient_accumulation_steps"],
            gradient_clipping=ds["gradient_clipping"],
        )
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                               state=SimpleNamespace(deepspeed_plugin=plugin))  # fmt: skip

    acc = accelerator()
    assert acc.state.deepspeed_plugin.is_auto("train_micro_batch_size_per_gpu")
    configure_deepspeed(acc, micro_batch_size=3, accumulation=1, max_grad_norm=1.0)
    config = acc.state.deepspeed_plugin.deepspeed_config
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert not acc.state.deepspeed_plugin.is_auto("train_micro_batch_size_per_gpu")
    assert (config["gradient_accumulation_steps"], config["gradient_clipping"]) == (1, 1.0)
    assert not is_sharded(acc)  # ZeRO-2: whole weights on every rank
    with pytest.raises(UserError, match="gradient_accumulation_steps=1 but the training"):
        configure_deepspeed(accelerator(), micro_batch_size=3, accumulation=4, max_grad_norm=1.0)
    with pytest.raises(UserError, match="optim.max_grad_norm is 0.5"):
        configure_deepspeed(accelerator(), micro_batch_size=3, accumulation=1, max_grad_norm=0.5)


class _Engine:
    """A stand-in for a DeepSpeed engine (not installed here) with the methods the trainer
    calls, as DeepSpeedEngine has them (0.5.4 to 0.18): ``step`` applies the update unless
    the gradients are not finite and it checks them (fp16; bf16 with
    ``bf16.check_grad_overflow``; every precision before 0.17.1), ``was_step_applied``,
    ``get_global_grad_norm`` (-1 for a non-finite norm, the last applied step's after a
    skip), ``fp16_enabled``, ``dynamic_loss_scale`` (``fp16.loss_scale == 0``: also under
    bf16), ``backward`` and ``set_gradient_accumulation_boundary``."""

    def __init__(self, precision="bf16", checks=True, finite=True, dynamic=True):
        from types import SimpleNamespace

        self.precision, self.checks, self.finite, self.dynamic = precision, checks, finite, dynamic
        self.optimizer = SimpleNamespace(
            overflow=False, zero_grad=lambda set_to_none: self.calls.append("optimizer.zero_grad")
        )
        self.norm, self.applied, self.updates, self.calls = 0.0, True, 0, []

    def step(self):
        self.optimizer.overflow = self.checks and not self.finite
        self.applied = not self.optimizer.overflow
        if self.applied:
            self.updates += 1
            self.norm = 2.5 if self.finite else -1.0

    def was_step_applied(self):
        return self.applied

    def get_global_grad_norm(self):
        return self.norm

    def fp16_enabled(self):
        return self.precision == "fp16"

    def dynamic_loss_scale(self):
        return self.dynamic

    def set_gradient_accumulation_boundary(self, is_boundary):
        self.calls.append(("boundary", is_boundary))

    def backward(self, loss):
        self.calls.append(("backward", float(loss)))

    def zero_grad(self):
        self.calls.append("zero_grad")


def _deepspeed_accelerator(engine):
    from types import SimpleNamespace

    return SimpleNamespace(deepspeed_engine_wrapped=SimpleNamespace(engine=engine))


@pytest.mark.parametrize(
    "engine, stepped, overflow, bad",
    [
        (_Engine("bf16"), True, False, False),
        # DeepSpeed skipped a non-finite bf16 step: nan_policy's, not a loss-scale overflow
        (_Engine("bf16", finite=False), False, False, True),
        (_Engine("fp16", finite=False), False, True, False),  # dynamic loss scale: routine
        (_Engine("fp16", finite=False, dynamic=False), False, False, True),  # static scale
        # no check (fp32 since DeepSpeed 0.17.1): applied, the norm reads -1
        (_Engine("no", checks=False, finite=False), False, False, True),
    ],
    ids=["bf16", "bf16-nan", "fp16-overflow", "fp16-static-nan", "fp32-nan-applied"],
)
def test_deepspeed_step_outcome_follows_the_engine(engine, stepped, overflow, bad):
    """What the trainer makes of DeepSpeed's step: the update applied or not
    (``was_step_applied``), routine fp16 overflow vs a non-finite gradient for nan_policy,
    the gradient norm (NaN unless an applied step's)."""
    import math

    from mvdiff.training.stepping import optimizer_step

    out = optimizer_step(_deepspeed_accelerator(engine), None, [], max_grad_norm=1.0)
    assert (out.stepped, out.overflow, out.bad) == (stepped, overflow, bad)
    assert engine.updates == (1 if engine.applied else 0)
    assert (out.grad_norm == 2.5) if stepped else math.isnan(out.grad_norm)


def test_deepspeed_backward_drives_the_engine_with_its_own_accumulation():
    """Under DeepSpeed the loss goes to ``engine.backward`` undivided (the engine divides by
    its gradient_accumulation_steps, set from the training config) and only the last
    micro-step is a boundary; discarding a step zeroes the engine's gradients."""
    from mvdiff.training.stepping import backward, discard_step

    engine = _Engine()
    acc = _deepspeed_accelerator(engine)
    for micro in range(3):
        backward(acc, torch.tensor(6.0), 3, last=micro == 2)
    assert engine.calls == [("boundary", False), ("backward", 6.0),
                            ("boundary", False), ("backward", 6.0),
                            ("boundary", True), ("backward", 6.0)]  # fmt: skip
    engine.calls.clear()
    discard_step(acc, None)
    assert engine.calls == ["optimizer.zero_grad", "zero_grad"] and engine.updates == 0
