"""The typed training config (``train/configs/*.yaml`` + ``--set key=value``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mvdiff.data.loader import DataConfig

__all__ = [
    "CheckpointConfig",
    "DreamBoothConfig",
    "DreamBoothTrainConfig",
    "LoraSettings",
    "ModelConfig",
    "OptimConfig",
    "PriorConfig",
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
    #: self-attention across views: "joint" (MVDream: all views of an object attend to each
    #: other) or "per_view" (the ablation: the same UNet, attention within each view); saved
    #: in the exported unet/config.json (view_attention), so sampling uses the same model
    attention: Literal["joint", "per_view"] = "joint"
    #: the camera MLP: true (added zero-initialised to a plain SD UNet, kept on a multi-view
    #: one) or false (the ablation: no camera MLP, camera=None in training and sampling)
    camera: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    #: bitsandbytes AdamW8bit (an error when bitsandbytes is not installed)
    use_8bit_adam: bool = False
    #: torch's fused AdamW (one kernel over all parameters, the same update): on CPU about
    #: 6x faster optimizer steps than torch's default per-parameter loop
    #: (benchmarks/bench_train.py --optimizers); false = torch's default
    fused: bool = True
    warmup_steps: int = 1000
    #: learning-rate schedule after warm-up
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    #: the cosine / linear schedules end at lr * min_lr_ratio
    min_lr_ratio: float = 0.0
    #: gradient clipping by global norm; 0 = off
    max_grad_norm: float = 1.0

    LIMITS: ClassVar[dict] = {"lr": ">0", "betas": "[0,1)", "weight_decay": ">=0", "eps": ">0",
                              "warmup_steps": ">=0", "min_lr_ratio": "[0,1]",
                              "max_grad_norm": ">=0"}  # fmt: skip


@dataclass
class CheckpointConfig:
    #: save a checkpoint (tensors + JSON, see training/checkpoint.py) every N optimizer steps
    #: (0 = only at the end)
    every: int = 1000
    #: keep the last N checkpoints
    keep: int = 3
    #: "" (start fresh), "latest" (newest checkpoint in output_dir/checkpoints) or a path
    resume: str = ""
    #: on resume, replay the data streams to the exact batch ("skip", exact but slow for long
    #: runs) or restart them with a new seed ("reseed", fast, not bit-identical)
    resume_data: Literal["skip", "reseed"] = "skip"

    LIMITS: ClassVar[dict] = {"every": ">=0", "keep": ">=0"}


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

    LIMITS: ClassVar[dict] = {"every": ">=0", "num_views": ">=1", "steps": ">=1",
                              "guidance_scale": ">=0"}  # fmt: skip


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
    #: what the UNet learns to output, as diffusers' schedulers name it: "epsilon" (the
    #: noise), "v_prediction" or "sample" (the clean latents x0); the loss target, and the
    #: prediction_type of the exported scheduler (so the pipeline samples with it)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    #: min-SNR-gamma loss weighting (e.g. 5.0), for any prediction_type; 0 = plain MSE
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

    LIMITS: ClassVar[dict] = {"max_steps": ">=1", "gradient_accumulation_steps": ">=1",
                              "ema_decay": "[0,1]", "snr_gamma": ">=0", "noise_offset": ">=0",
                              "caption_dropout": "[0,1]", "max_nan_skips": ">=0",
                              "log_every": ">=1", "debug_nan_step": ">=-1"}  # fmt: skip


# ---- MVDreamBooth (docs/design.md §6): the same loop, photos instead of shards ---------------------


@dataclass
class PriorConfig:
    """Prior preservation: class objects generated once by the starting model (multi-view)."""

    enabled: bool = False
    #: "" = the instance prompt without the identifier ("a photo of sks dog" -> "a photo of dog")
    class_prompt: str = ""
    #: appended to the class prompt for generation and training (the multi-view caption style)
    prompt_suffix: str = ", 3d asset"
    #: class objects to generate (each num_views images); cached and reused across runs
    num_objects: int = 25
    num_views: int = 4
    elevation: float = 15.0
    steps: int = 50
    guidance_scale: float = 7.5
    #: class objects per training step
    batch_size: int = 1
    #: weight of the class (prior) loss
    weight: float = 1.0
    #: cache folder; "" = OUTPUT_DIR/class_images (a subfolder per model + settings)
    cache_dir: str = ""

    LIMITS: ClassVar[dict] = {"num_objects": ">=1", "num_views": ">=1", "steps": ">=1",
                              "guidance_scale": ">=0", "batch_size": ">=1", "weight": ">=0"}  # fmt: skip


@dataclass
class LoraSettings:
    """LoRA on the UNet through peft; only the adapter is saved (OUTPUT_DIR/adapter)."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 16.0
    #: learning rate of the adapter (replaces optim.lr when LoRA is on)
    lr: float = 1.0e-4

    LIMITS: ClassVar[dict] = {"rank": ">=1", "alpha": ">0", "lr": ">0"}
    #: module names (suffix match): every attention projection and the feed-forward layers
    target_modules: list[str] = field(
        default_factory=lambda: [
            "attn1.to_q",
            "attn1.to_k",
            "attn1.to_v",
            "attn1.to_out.0",
            "attn2.to_q",
            "attn2.to_k",
            "attn2.to_v",
            "attn2.to_out.0",
            "ff.net.0.proj",
            "ff.net.2",
        ]
    )


@dataclass
class DreamBoothConfig:
    #: folder of 3-10 photos of the subject (jpg/png/webp, any size); optional masks as
    #: NAME_mask.png next to NAME.jpg or masks/NAME.png (background becomes white)
    images: str = ""
    #: instance prompt containing the identifier, e.g. "a photo of sks dog"
    prompt: str = ""
    #: the rare token that names the subject; must appear as a word in the prompt
    identifier: str = "sks"
    #: lambda of the parameter-preservation term lambda * mean(|theta - theta_0|); 0 = off
    param_preservation: float = 1.0
    #: photo crop after resizing the shorter side to data.resolution
    crop: Literal["center", "random"] = "center"
    #: random horizontal flips of the photos
    flip: bool = True
    #: fewer photos than this is an error
    min_images: int = 3
    #: suffix of the validation prompt (the instance prompt rendered as 4 views)
    validation_suffix: str = ", 3d asset"

    LIMITS: ClassVar[dict] = {"param_preservation": ">=0", "min_images": ">=1"}

    prior: PriorConfig = field(default_factory=PriorConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DreamBoothTrainConfig(TrainConfig):
    """:class:`TrainConfig` with a ``dreambooth`` section and consumer-GPU defaults (one 24 GB
    card, SD-2.1-size model): ``mvdiff dreambooth`` / ``train/dreambooth.py``. The loop is
    :func:`mvdiff.training.trainer.train`; ``data`` only uses ``resolution`` and ``batch_size``
    (photos per step)."""

    output_dir: str = "runs/dreambooth"
    max_steps: int = 600
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    caption_dropout: float = 0.0
    log_every: int = 10
    model: ModelConfig = field(default_factory=lambda: ModelConfig(gradient_checkpointing=True))
    data: DataConfig = field(
        default_factory=lambda: DataConfig(resolution=256, batch_size=1, num_workers=0)
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1.0e-5, weight_decay=0.0, warmup_steps=0)
    )
    checkpoint: CheckpointConfig = field(
        default_factory=lambda: CheckpointConfig(every=200, keep=2)
    )
    validation: ValidationConfig = field(
        default_factory=lambda: ValidationConfig(every=200, prompts=[], steps=30)
    )
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
