"""The typed training config (``train/configs/*.yaml`` + ``--set key=value``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mvdiff.data.loader import DataConfig

__all__ = [
    "CheckpointConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "ValidationConfig",
]


@dataclass
class ModelConfig:
    #: diffusers folder of Stable Diffusion (a zero-initialised camera MLP is added) or of a
    #: multi-view model (unet/ has the camera MLP); "tiny" = mvdiff.testing.tiny_components()
    pretrained: str = ""
    #: train the UNet with gradient checkpointing (less memory, ~30% slower)
    gradient_checkpointing: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    #: bitsandbytes AdamW8bit (an error when bitsandbytes is not installed)
    use_8bit_adam: bool = False
    warmup_steps: int = 1000
    #: learning-rate schedule after warm-up
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    #: the cosine / linear schedules end at lr * min_lr_ratio
    min_lr_ratio: float = 0.0
    #: gradient clipping by global norm; 0 = off
    max_grad_norm: float = 1.0


@dataclass
class CheckpointConfig:
    #: save an accelerate checkpoint every N optimizer steps (0 = only at the end)
    every: int = 1000
    #: keep the last N checkpoints
    keep: int = 3
    #: "" (start fresh), "latest" (newest checkpoint in output_dir/checkpoints) or a path
    resume: str = ""
    #: on resume, replay the data streams to the exact batch ("skip", exact but slow for long
    #: runs) or restart them with a new seed ("reseed", fast, not bit-identical)
    resume_data: Literal["skip", "reseed"] = "skip"


@dataclass
class ValidationConfig:
    #: sample a grid of views per prompt every N steps (0 = never); also at the end if > 0
    every: int = 0
    prompts: list[str] = field(default_factory=lambda: ["a teddy bear", "a red sports car"])
    num_views: int = 4
    elevation: float = 15.0
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0


@dataclass
class TrainConfig:
    output_dir: str = "runs/mvdream"
    seed: int = 0
    max_steps: int = 10000
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    #: exponential moving average of the UNet weights (exported instead of the raw weights)
    ema: bool = False
    ema_decay: float = 0.9999
    #: min-SNR-gamma loss weighting (e.g. 5.0); 0 = plain eps-MSE
    snr_gamma: float = 0.0
    #: offset noise strength (e.g. 0.05); 0 = off
    noise_offset: float = 0.0
    #: replace the caption by "" with this probability (classifier-free guidance)
    caption_dropout: float = 0.1
    #: a non-finite loss or gradient: stop the run with a message, or skip the step
    nan_policy: Literal["stop", "skip"] = "stop"
    #: with nan_policy=skip, stop after this many consecutive skipped steps
    max_nan_skips: int = 20
    log_every: int = 10
    #: write a diffusers-format model folder (output_dir/model) at the end
    export: bool = True
    #: testing aid: make the loss NaN at this optimizer step (-1 = never)
    debug_nan_step: int = -1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
