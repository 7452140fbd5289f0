"""The training loop, top to bottom (``train/train.py`` and ``mvdiff train`` call :func:`train`).

Runs the same on one CPU process and under ``accelerate launch`` on N GPUs / nodes (DDP; the
DeepSpeed / FSDP configs in ``train/`` work too). Reproducibility: every random draw of step
``i`` on rank ``r`` (caption dropout, VAE posterior sample, noise, timesteps, the 2D/multi-view
choice of the batch) comes from a generator seeded with ``(seed, r, i)``, the data streams are
seeded per rank and worker, and the learning rate is a pure function of the step — so
"N steps" and "N/2 steps, kill, ``--resume latest``, N/2 steps" give the same weights.

What is trained on, the loss terms beyond the denoising loss, and what is exported come from
a *task* (:mod:`mvdiff.training.tasks`): joint multi-view + 2D training
(:class:`~mvdiff.training.tasks.JointTask`) or MVDreamBooth
(:class:`~mvdiff.training.tasks.DreamBoothTask`), chosen by the config's type
(:func:`~mvdiff.training.tasks.task_for`) unless the caller passes one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from mvdiff.accel import enable_tf32, frozen_dtype, mixed_precision_choice
from mvdiff.config import save_config
from mvdiff.data.shards import make_seed
from mvdiff.errors import UserError
from mvdiff.training.checkpoint import find_checkpoint, resume_checkpoint, save_checkpoint
from mvdiff.training.components import (
    freeze,
    load_components,
    noise_scheduler_from,
    sampling_scheduler,
)
from mvdiff.training.config import OptimConfig, TrainConfig
from mvdiff.training.interrupt import StopSignals, TrainingInterrupted
from mvdiff.training.sharded import configure_deepspeed, is_sharded, weights_checksum
from mvdiff.training.stepping import (
    accelerator_kwargs_handlers,
    backward,
    build_ema,
    discard_step,
    optimizer_step,
    place_ema,
)
from mvdiff.training.tasks import Run, Task, task_for
from mvdiff.training.trackers import tracker_config, tracker_names
from mvdiff.training.validation import run_validation

log = logging.getLogger("mvdiff.train")

__all__ = ["NonFiniteLossError", "TrainingInterrupted", "base_lr", "learning_rate", "train"]


class NonFiniteLossError(UserError):
    """The loss or the gradient became NaN/inf and ``nan_policy`` says stop."""


def base_lr(cfg: TrainConfig) -> float:
    """The peak learning rate of ``cfg``'s task (``optim.lr``; ``dreambooth.lora.lr`` when
    training a LoRA adapter)."""
    return task_for(cfg).base_lr(cfg)


def learning_rate(step: int, cfg: TrainConfig, lr: float | None = None) -> float:
    """Linear warm-up, then constant / cosine / linear decay from ``lr`` (default
    :func:`base_lr`) to ``lr * min_lr_ratio`` at ``max_steps``."""
    o = cfg.optim
    lr = base_lr(cfg) if lr is None else lr
    if step < o.warmup_steps:
        return lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.max_steps - o.warmup_steps))
    floor = lr * o.min_lr_ratio
    if o.schedule == "cosine":
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr + (floor - lr) * progress


def build_optimizer(params, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW over ``params`` as ``optim`` says: torch's (fused unless ``optim.fused`` is
    false) or bitsandbytes' 8-bit one."""
    kwargs = dict(lr=lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, eps=optim.eps)
    if optim.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optim.use_8bit_adam=true needs `pip install bitsandbytes`") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=optim.fused or None, **kwargs)


def config_summary(cfg, path: Path, task: Task | None = None) -> str:
    """One line of the settings that matter most, and where the full config is (``path``)."""
    task = task_for(cfg) if task is None else task
    d = cfg.data
    line = (
        f"config {path}: model {cfg.model.pretrained}, {cfg.max_steps} steps, batch "
        f"{d.batch_size} x {d.num_views} views at {d.resolution}px, lr {cfg.optim.lr:g}, "
        f"mixed precision {cfg.mixed_precision}, predicting {cfg.prediction_type}"
    )
    ablations = [f"attention {cfg.model.attention}"] * (cfg.model.attention != "joint")
    ablations += ["no camera"] * (not cfg.model.camera)
    return "; ".join([line, *ablations, task.describe(cfg)])


def train(cfg: TrainConfig, task: Task | None = None) -> dict:
    """Train a multi-view UNet as configured; returns a summary dict (also in summary.json).

    ``task`` (:mod:`mvdiff.training.tasks`): what to train on and export; default
    :func:`~mvdiff.training.tasks.task_for` ``(cfg)``. SIGTERM / SIGINT stop it after the
    current step with a checkpoint (:class:`~mvdiff.training.interrupt.TrainingInterrupted`,
    see that module)."""
    with StopSignals() as stop, _caller_rng_restored():
        return _train(cfg, task_for(cfg) if task is None else task, stop)


@contextlib.contextmanager
def _caller_rng_restored():
    """The run seeds the global RNGs (``accelerate.utils.set_seed``: identical initial weights
    of anything created on every rank); the caller's Python, NumPy and torch states are put
    back afterwards, so calling ``train()`` from a program leaves its randomness alone."""
    py, np_state = random.getstate(), np.random.get_state()
    cuda = range(torch.cuda.device_count()) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


class _Window:
    """Sums over the steps since the last log line (reduced over ranks when logged)."""

    KEYS = ("loss", "n", "images", "skipped", "n2d", "nb")

    def __init__(self, terms: tuple[str, ...]):
        self.terms = terms
        self.sums = dict.fromkeys((*self.KEYS, *terms), 0.0)
        self.data_s, self.t0 = 0.0, time.perf_counter()

    def add(self, **values) -> None:
        for k, v in values.items():
            self.sums[k] += v


def _train(cfg: TrainConfig, task: Task, stop: StopSignals) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    # ---- setup: check the data first (cheap), accelerator, output folder, resolved config ----
    warnings = task.check(cfg)
    out = Path(cfg.output_dir)
    trackers = tracker_names(cfg.report_to)
    accelerator = Accelerator(
        mixed_precision=mixed_precision_choice(cfg.mixed_precision),
        kwargs_handlers=accelerator_kwargs_handlers(),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    world = accelerator.num_processes
    enable_tf32(accelerator.device)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    if accelerator.is_main_process:
        log.info("%s", config_summary(cfg, out / "config.yaml", task))
    set_seed(cfg.seed)  # initial weights of anything created below are the same on all ranks
    for warning in warnings:
        log.warning("%s", warning)

    # ---- model: trainable multi-view UNet, frozen VAE + text encoder ------------------------
    frozen = frozen_dtype(accelerator.mixed_precision)  # the config's or the launcher's
    parts = load_components(cfg.model.pretrained, vae_dtype=frozen,  # VAE: no .to(dtype)
                            camera=cfg.model.camera, attention=cfg.model.attention)  # fmt: skip
    freeze(parts.vae).to(accelerator.device)
    freeze(parts.text_encoder).to(accelerator.device, dtype=frozen)
    noise_scheduler = noise_scheduler_from(parts.scheduler, cfg.prediction_type)  # DDPM
    run = Run(cfg, accelerator, out, parts, noise_scheduler)
    task.setup(run)  # with the starting model: class images, LoRA ...
    # the model's sampling scheduler from now on (validation, export) predicts what we train
    was = parts.scheduler.config.get("prediction_type")
    if was != cfg.prediction_type:
        log.warning("model.pretrained's scheduler has prediction_type=%s; training (and "
                    "exporting) prediction_type=%s", was, cfg.prediction_type)  # fmt: skip
    parts.scheduler = sampling_scheduler(parts.scheduler, cfg.prediction_type)
    unet = parts.unet
    unet.train()
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    log.info("model: %s (%s), %.2fM trainable parameters", cfg.model.pretrained, parts.source,
             sum(p.numel() for p in unet.parameters() if p.requires_grad) / 1e6)  # fmt: skip

    # ---- optimizer (lr is set every step from learning_rate(step)) -------------------------
    peak_lr = task.base_lr(cfg)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim, peak_lr)
    configure_deepspeed(accelerator, cfg.data.batch_size, cfg.gradient_accumulation_steps,
                        cfg.optim.max_grad_norm)  # fmt: skip
    unet, optimizer = accelerator.prepare(unet, optimizer)
    run.unet = unet
    run.trainable = trainable = [p for p in run.model.parameters() if p.requires_grad]
    task.start(run)  # the starting weights, before a resume
    ema = None
    if cfg.ema:
        ema = build_ema(trainable, cfg.ema_decay)  # saved by save_checkpoint (safetensors)

    # ---- resume ---------------------------------------------------------------------------
    start_step, nan_skips_total, skipped_total = 0, 0, 0
    ckpt, state = resume_checkpoint(accelerator, cfg.checkpoint.resume, out, unet, optimizer, ema)
    if ckpt is not None:
        if ema is not None:
            place_ema(ema, trainable)  # next to the model whatever device it was loaded to
        start_step, nan_skips_total = int(state["step"]), int(state.get("nan_skips", 0))
        log.info("resumed from %s at step %d", ckpt, start_step)
    elif cfg.checkpoint.resume == "latest":
        log.info("--resume latest: no checkpoint in %s/checkpoints, starting fresh", out)
    run.start_step = start_step

    # ---- data: this rank's batches, from the task ------------------------------------------
    accum = cfg.gradient_accumulation_steps
    batches = task.batches(run)
    val_prompts = task.validation_prompts(cfg)
    terms = task.terms

    def save(step):
        save_checkpoint(accelerator, out, step, {"nan_skips": nan_skips_total},
                        keep=cfg.checkpoint.keep, model=unet, optimizer=optimizer, ema=ema)  # fmt: skip

    # ---- the loop ---------------------------------------------------------------------------
    step = saved_step = start_step
    consecutive_nan, overflow_skips = 0, 0
    window = _Window(terms)
    last_loss = float("nan")
    bar = tqdm(
        total=cfg.max_steps, initial=start_step, desc="train",
        disable=not accelerator.is_main_process, dynamic_ncols=True,
    )  # fmt: skip
    stop.on_exit.append(bar.close)  # also on errors: the message gets a line of its own
    tracker_started = False
    if trackers:
        accelerator.init_trackers("mvdiff", config=tracker_config(cfg))
        tracker_started = True
    val_copy = None  # FSDP / ZeRO-3: the main process's unsharded UNet for validation
    while step < cfg.max_steps:
        if (signum := stop.requested(accelerator)) is not None:  # SIGTERM / Ctrl-C
            if step > saved_step:
                saved_step = step
                save(step)
            last = find_checkpoint("latest", out)
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(signum).name} at step {step}; "
                + (f"resume from {last} with --resume latest" if last else "no checkpoint yet"),
                signum,
            )
        lr = learning_rate(step, cfg, peak_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # -- forward + backward over the micro-batches of this step --
        micro_losses, micro_terms = [], []  # device tensors: read once per step, below
        for micro in range(accum):
            index = step * accum + micro
            gen = torch.Generator().manual_seed(make_seed("step", cfg.seed, run.rank, index))
            t_data = time.perf_counter()
            batch = next(batches)
            window.data_s += time.perf_counter() - t_data
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(unet)
            with sync:
                loss, extra = task.loss(run, batch, index, gen)
                if step == cfg.debug_nan_step:
                    loss = loss * float("nan")
                # No host sync between forward and backward: every rank runs backward on
                # every micro-step (so DDP never waits for a rank that skipped one), and a
                # non-finite loss on any rank drops the whole step once it is read, below.
                backward(accelerator, loss, accum, last=micro == accum - 1)
            micro_losses.append(loss.detach().float().reshape(1))
            if terms:  # (len(terms),), 0 for a term this micro-batch has not
                zero = loss.new_zeros(()).float()
                micro_terms.append(torch.stack([extra.get(n, zero).float() for n in terms]))
            b, v = batch["pixels"].shape[:2]
            window.add(images=b * v, skipped=int(batch.get("skipped", 0)),
                       n2d=int(batch["camera"] is None), nb=1)  # fmt: skip

        # -- one host read per step: is the loss finite on every rank, its value --
        local = torch.cat(micro_losses)  # (accum,)
        finite = torch.isfinite(local).all().float().reshape(1)
        head = [accelerator.reduce(finite, reduction="sum"), local.mean().reshape(1)]
        if micro_terms:  # (accum, len(terms)) -> (len(terms),)
            head.append(torch.stack(micro_terms).mean(0))
        values = torch.cat([h.to(local.device) for h in head]).tolist()
        bad, step_loss = values[0] < world, values[1]
        step_terms = dict(zip(terms, values[2:], strict=False))

        # -- optimizer step: clip + step; an fp16 loss-scale overflow skips it, is not bad --
        grad_norm, overflow = float("nan"), False
        if not bad:
            outcome = optimizer_step(accelerator, optimizer, unet.parameters(),
                                     cfg.optim.max_grad_norm)  # fmt: skip
            grad_norm, overflow, bad = outcome.grad_norm, outcome.overflow, outcome.bad
        if overflow:
            overflow_skips += 1
        elif bad:
            discard_step(accelerator, optimizer)
            what = f"non-finite loss or gradient at step {step}"
            if cfg.nan_policy == "stop":
                last = find_checkpoint("latest", out)
                raise NonFiniteLossError(
                    f"{what}; stopping (train.nan_policy=stop). No checkpoint was written for "
                    f"this step; the last good one is {last or 'none'}. Lower optim.lr, or set "
                    "nan_policy=skip"
                )
            consecutive_nan += 1
            nan_skips_total += 1
            log.warning("%s: skipped (%d in a row)", what, consecutive_nan)
            if consecutive_nan > cfg.max_nan_skips:
                raise NonFiniteLossError(f"{what}: {consecutive_nan} non-finite steps in a row")
        else:
            consecutive_nan = 0
            if ema is not None:
                ema.step(trainable)
            last_loss = step_loss
            window.add(loss=step_loss, n=1, **step_terms)
        step += 1
        bar.update(1)

        # ---- logging ------------------------------------------------------------------------
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            seconds = time.perf_counter() - window.t0
            keys = list(window.sums)
            stats = torch.tensor([window.sums[k] for k in keys], dtype=torch.float64,
                                 device=accelerator.device)  # fmt: skip
            sums = dict(zip(keys, accelerator.reduce(stats, reduction="sum").tolist()))
            skipped_total += int(sums["skipped"])  # bad samples skipped by the decoders
            logs = {
                "loss": sums["loss"] / max(1.0, sums["n"]),
                "lr": lr,
                "grad_norm": grad_norm,
                "samples_per_s": sums["images"] / max(seconds, 1e-9),
                "data_wait_frac": window.data_s / max(seconds, 1e-9),
                "skipped_samples": sums["skipped"],
                "frac_2d_batches": sums["n2d"] / max(1.0, sums["nb"]),
                "nan_skips": nan_skips_total,
                "overflow_skips": overflow_skips,
                **{name: sums[name] / max(1.0, sums["n"]) for name in terms},
                **task.log_values(run),
            }
            if tracker_started:
                accelerator.log(logs, step=step)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}",
                            ips=f"{logs['samples_per_s']:.1f}")  # fmt: skip
            if accelerator.is_main_process:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(_json_safe({"step": step, **logs}), allow_nan=False) + "\n")
            window = _Window(terms)

        # ---- checkpoint -----------------------------------------------------------------------
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.max_steps:
            save(step)
            saved_step = step

        # ---- validation samples ---------------------------------------------------------------
        if cfg.validation.every and (step % cfg.validation.every == 0 or step == cfg.max_steps):
            # every rank: gathering the weights is a collective under FSDP / ZeRO-3
            _, val_copy = run_validation(accelerator, unet, parts, cfg, val_prompts, step, out,
                                         vae=parts.vae, text_encoder=parts.text_encoder, ema=ema,
                                         trainable=trainable, cache=val_copy)  # fmt: skip
    bar.close()

    # ---- the end: ranks in sync?, export (the task's result) -----------------------------------
    checksums = accelerator.gather(  # of this rank's shard under FSDP
        torch.tensor([weights_checksum(run.model)], dtype=torch.float64, device=accelerator.device)
    ).tolist()
    summary = {
        "steps": step,
        "final_loss": last_loss,
        "rank_checksums": checksums,
        # sharded engines hold a different shard on each rank: not comparable (null)
        "ranks_in_sync": None if is_sharded(accelerator) else len(set(checksums)) == 1,
        "nan_skips": nan_skips_total,
        "skipped_samples": skipped_total,
        "overflow_skips": overflow_skips,
        "peak_gib": _peak_gib(accelerator.device),  # this process's, GPU only
        **task.summary(run),
    }
    if cfg.export:  # every rank (gathering is a collective under FSDP), the EMA weights in
        if ema is not None:
            ema.store(trainable)
            ema.copy_to(trainable)
        try:
            summary.update(task.export(run))
        finally:
            if ema is not None:
                ema.restore(trainable)
    if accelerator.is_main_process:
        summary = _json_safe(summary)  # valid JSON: a loss that never came is null, not NaN
        (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
        log.info("done: %s", json.dumps(summary))
    accelerator.wait_for_everyone()
    if tracker_started:
        accelerator.end_training()  # also tears down the process group: nothing collective after
    return summary


def _peak_gib(device) -> float | None:
    """Peak GPU memory allocated by this process on ``device`` (GiB); None on the CPU."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def _json_safe(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN / Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
