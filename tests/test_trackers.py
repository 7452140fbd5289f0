"""Trackers (``report_to``) and the launcher's mixed precision: read back what was logged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mvdiff.config import load_config
from mvdiff.data.synthetic import write_synthetic_mv_shards
from mvdiff.errors import UserError
from mvdiff.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny_cpu.yaml"


def test_tensorboard_gets_scalars_and_validation_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mvdiff.training.trainer import train

    torch.set_num_threads(1)
    write_synthetic_mv_shards(tmp_path / "mv", num_shards=1, objects_per_shard=2, num_views=4,
                              resolution=32)  # fmt: skip
    cfg = load_config(TrainConfig, TINY, [
        f"output_dir={tmp_path / 'run'}", f"data.mv_shards={tmp_path}/mv/*.tar",
        "data.batch_size=1", "data.p_2d=0", "max_steps=2", "log_every=1", "report_to=tensorboard",
        "validation.every=2", "validation.steps=2", "validation.num_views=2",
        "checkpoint.every=0", "export=false",
    ])  # fmt: skip
    train(cfg)
    # the run's events (accelerate writes the hparams into a sub-folder of their own)
    folders = {p.parent for p in (tmp_path / "run" / "logs").rglob("events.out.tfevents.*")}
    runs = []
    for folder in sorted(folders):
        acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        runs.append(acc)
    (acc,) = [a for a in runs if a.Tags()["scalars"]]
    tags = acc.Tags()
    assert {"loss", "lr", "samples_per_s"} <= set(tags["scalars"]), tags
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert "validation" in tags["images"], tags
    (image,) = acc.Images("validation")
    assert image.step == 2 and (image.width, image.height) == (2 * 32, 32)


def test_report_to_none_and_missing_wandb(tmp_path, monkeypatch):
    import importlib.util

    from mvdiff.training.trackers import tracker_names

    assert tracker_names("none") == []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))  # fmt: skip
    with pytest.raises(UserError, match="report_to=wandb needs"):
        tracker_names("wandb")
    assert "wandb" not in tracker_names("all")


@pytest.mark.parametrize("config_value, launcher, expected", [
    ("auto", "bf16", "bf16"),  # accelerate launch --mixed_precision bf16 / the accelerate YAML
    ("auto", None, "no"),
    ("no", "bf16", "no"),  # an explicit config value wins (with a warning)
])  # fmt: skip
def test_mixed_precision_follows_the_launcher(monkeypatch, config_value, launcher, expected):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from mvdiff.accel import frozen_dtype, mixed_precision_choice

    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    AcceleratorState._reset_state(True)
    try:
        accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision_choice(config_value))
        assert accelerator.mixed_precision == expected
        assert frozen_dtype(accelerator.mixed_precision) == {
            "bf16": torch.bfloat16, "no": torch.float32}[expected]  # fmt: skip
    finally:
        AcceleratorState._reset_state(True)
