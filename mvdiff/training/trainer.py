"""The training loop, top to bottom (``train/train.py`` and ``mvdiff train`` call :func:`train`).

Runs the same on one CPU process and under ``accelerate launch`` on N GPUs / nodes (DDP; the
DeepSpeed / FSDP configs in ``train/`` work too). Reproducibility: every random draw of step
``i`` on rank ``r`` (caption dropout, VAE posterior sample, noise, timesteps, the 2D/multi-view
choice of the batch) comes from a generator seeded with ``(seed, r, i)``, the data streams are
seeded per rank and worker, and the learning rate is a pure function of the step — so
"N steps" and "N/2 steps, kill, ``--resume latest``, N/2 steps" give the same weights.

MVDreamBooth is a mode of this loop, chosen by the config type
(:class:`~mvdiff.training.config.DreamBoothTrainConfig`, which has a ``dreambooth`` section):
the batches come from the subject photos (2D mode) instead of the shards, the loss gains the
prior-preservation and parameter-preservation terms, LoRA optionally replaces full
fine-tuning, and the export is the adapter or the model folder. The pieces live in
:mod:`mvdiff.training.dreambooth`.
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

import torch

from mvdiff.accel import enable_tf32
from mvdiff.config import save_config
from mvdiff.data.loader import build_loader
from mvdiff.data.mixer import BatchMixer
from mvdiff.data.shards import expand_urls, make_seed
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
from mvdiff.training.loss import diffusion_loss, encode_images, encode_prompts
from mvdiff.training.stepping import (
    accelerator_kwargs_handlers,
    build_ema,
    optimizer_step,
    place_ema,
)

log = logging.getLogger("mvdiff.train")

__all__ = ["NonFiniteLossError", "TrainingInterrupted", "base_lr", "learning_rate", "train"]

#: extra loss terms logged in MVDreamBooth mode
TERMS = ("instance_loss", "prior_loss", "preservation")


class NonFiniteLossError(UserError):
    """The loss or the gradient became NaN/inf and ``nan_policy`` says stop."""


def base_lr(cfg: TrainConfig) -> float:
    """``optim.lr``, or ``dreambooth.lora.lr`` when training a LoRA adapter."""
    db = getattr(cfg, "dreambooth", None)
    return db.lora.lr if db is not None and db.lora.enabled else cfg.optim.lr


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant / cosine / linear decay to ``lr * min_lr_ratio``."""
    o = cfg.optim
    lr = base_lr(cfg)
    if step < o.warmup_steps:
        return lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.max_steps - o.warmup_steps))
    floor = lr * o.min_lr_ratio
    if o.schedule == "cosine":
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr + (floor - lr) * progress


def _checksum(model: torch.nn.Module) -> float:
    """A float fingerprint of the weights (to compare ranks)."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(model.parameters()):
        total += (p.detach().double().cpu() * (1.0 + 1e-3 * (i % 97))).sum()
    return float(total)


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


def config_summary(cfg, path: Path) -> str:
    """One line of the settings that matter most, and where the full config is (``path``)."""
    d = cfg.data
    data = ", ".join(f"{k} {v}" for k, v in (("3D", d.mv_shards), ("2D", d.shards_2d)) if v)
    line = (
        f"config {path}: model {cfg.model.pretrained}, {cfg.max_steps} steps, batch "
        f"{d.batch_size} x {d.num_views} views at {d.resolution}px, lr {cfg.optim.lr:g}, "
        f"mixed precision {cfg.mixed_precision}"
    )
    db = getattr(cfg, "dreambooth", None)
    if db is not None:
        on = {True: "on", False: "off"}
        return (
            f"{line}; photos {db.images}, prompt {db.prompt!r}, LoRA {on[db.lora.enabled]}, "
            f"prior {on[db.prior.enabled]}"
        )
    return f"{line}; data: {data or 'none'}"


def train(cfg: TrainConfig) -> dict:
    """Train a multi-view UNet as configured; returns a summary dict (also in summary.json).

    SIGTERM / SIGINT stop it after the current step with a checkpoint
    (:class:`~mvdiff.training.interrupt.TrainingInterrupted`, see that module)."""
    with StopSignals() as stop:
        return _train(cfg, stop)


def _train(cfg: TrainConfig, stop: StopSignals) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    # ---- setup: check the data first (cheap), accelerator, output folder, resolved config ----
    db = getattr(cfg, "dreambooth", None)  # MVDreamBooth mode (DreamBoothTrainConfig)
    if db is not None:
        from mvdiff.training import dreambooth as dbm

        photos, photo_warnings = dbm.check_inputs(cfg)
    else:
        if not cfg.data.mv_shards and not cfg.data.shards_2d:
            raise UserError("no training data: set data.mv_shards and/or data.shards_2d")
        for key in ("mv_shards", "shards_2d"):
            if getattr(cfg.data, key):
                try:
                    expand_urls(getattr(cfg.data, key), f"data.{key}")  # names a missing file now
                except UserError as e:
                    if not cfg.data.missing_hint:
                        raise
                    raise UserError(f"{e}; {cfg.data.missing_hint}") from None
    out = Path(cfg.output_dir)
    tb = _tensorboard_available()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        kwargs_handlers=accelerator_kwargs_handlers(),
        log_with="tensorboard" if tb else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    enable_tf32(accelerator.device)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    if accelerator.is_main_process:
        log.info("%s", config_summary(cfg, out / "config.yaml"))
    set_seed(cfg.seed)  # initial weights of anything created below are the same on all ranks
    if db is not None:
        for warning in photo_warnings:
            log.warning("--images: %s", warning)
    elif cfg.data.p_2d > 0 and not cfg.data.shards_2d and cfg.data.mv_shards:
        log.warning("data.p_2d=%s but data.shards_2d is empty: training on 3D only", cfg.data.p_2d)

    # ---- model: trainable multi-view UNet, frozen VAE + text encoder ------------------------
    frozen_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        cfg.mixed_precision
    ]
    parts = load_components(cfg.model.pretrained, vae_dtype=frozen_dtype,  # VAE: no .to(dtype)
                            camera=cfg.model.camera, attention=cfg.model.attention)  # fmt: skip
    unet, vae, text_encoder, tokenizer = parts.unet, parts.vae, parts.text_encoder, parts.tokenizer
    noise_scheduler = noise_scheduler_from(parts.scheduler, cfg.prediction_type)
    freeze(vae).to(accelerator.device)
    freeze(text_encoder).to(accelerator.device, dtype=frozen_dtype)
    class_images, lora_config, class_generated = None, None, 0
    if db is not None and db.prior.enabled:
        # class objects from the *starting* model, generated once (main process) and cached
        unet.to(accelerator.device)
        class_images, class_generated = dbm.class_images_for(cfg, parts, accelerator, out)
    # the model's sampling scheduler from now on (validation, export) predicts what we train
    was = parts.scheduler.config.get("prediction_type")
    if was != cfg.prediction_type:
        log.warning("model.pretrained's scheduler has prediction_type=%s; training (and "
                    "exporting) prediction_type=%s", was, cfg.prediction_type)  # fmt: skip
    parts.scheduler = sampling_scheduler(parts.scheduler, cfg.prediction_type)
    if db is not None and db.lora.enabled:
        lora_config = dbm.add_lora(unet, db.lora)
    unet.train()
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    log.info("model: %s (%s), %.2fM trainable parameters", cfg.model.pretrained, parts.source,
             sum(p.numel() for p in unet.parameters() if p.requires_grad) / 1e6)  # fmt: skip

    # ---- optimizer (lr is set every step from learning_rate(step)) -------------------------
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim, base_lr(cfg))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    trainable = [p for p in accelerator.unwrap_model(unet).parameters() if p.requires_grad]
    # theta_0 for the parameter-preservation term: the starting weights (taken before a resume)
    anchor = None
    if db is not None and db.param_preservation > 0:
        anchor = dbm.ParamAnchor(trainable)
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

    # ---- data: multi-view + 2D streams for this rank, mixed per batch ----------------------
    accum = cfg.gradient_accumulation_steps
    if db is not None:
        # photos (2D) + class objects: batch i is a pure function of (seed, rank, i)
        batches = iter(dbm.DreamBoothBatches(
            photos, db.prompt, cfg.data.resolution, cfg.data.batch_size, crop=db.crop,
            flip=db.flip, seed=cfg.seed, rank=rank, prior=class_images,
            prior_batch_size=db.prior.batch_size, start=start_step * accum,
        ))  # fmt: skip
    else:
        data_seed = cfg.seed
        if start_step and cfg.checkpoint.resume_data == "reseed":
            data_seed = make_seed("reseed", cfg.seed, start_step)
        mv = build_loader(cfg.data, "mv", data_seed, rank, world) if cfg.data.mv_shards else None
        d2 = build_loader(cfg.data, "2d", data_seed, rank, world) if cfg.data.shards_2d else None
        if mv is None and d2 is None:
            raise UserError("no training data: set data.mv_shards and/or data.shards_2d")
        mixer = BatchMixer(
            mv,
            d2,
            p_2d=cfg.data.p_2d,
            seed=data_seed,
            rank=rank,
            start=start_step * accum if cfg.checkpoint.resume_data == "skip" else 0,
        )
        batches = iter(mixer)
    val_prompts = list(cfg.validation.prompts)
    if db is not None and not val_prompts:
        val_prompts = [db.prompt + db.validation_suffix]  # 4 views of the subject

    # ---- the loop ---------------------------------------------------------------------------
    step = saved_step = start_step
    consecutive_nan, overflow_skips = 0, 0
    window = {"loss": 0.0, "n": 0, "images": 0, "data_s": 0.0, "t0": time.perf_counter(),
              "skipped": 0, "n2d": 0, "nb": 0, **dict.fromkeys(TERMS, 0.0)}  # fmt: skip
    last_loss = float("nan")
    bar = tqdm(
        total=cfg.max_steps, initial=start_step, desc="train",
        disable=not accelerator.is_main_process, dynamic_ncols=True,
    )  # fmt: skip
    stop.on_exit.append(bar.close)  # also on errors: the message gets a line of its own
    tracker_started = False
    if tb:
        accelerator.init_trackers("mvdiff", config={"output_dir": str(out)})
        tracker_started = True
    while step < cfg.max_steps:
        if (signum := stop.requested(accelerator)) is not None:  # SIGTERM / Ctrl-C
            if step > saved_step:
                saved_step = step
                save_checkpoint(accelerator, out, step, {"nan_skips": nan_skips_total},
                                keep=cfg.checkpoint.keep, model=unet, optimizer=optimizer,
                                ema=ema)  # fmt: skip
            last = find_checkpoint("latest", out)
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(signum).name} at step {step}; "
                + (f"resume from {last} with --resume latest" if last else "no checkpoint yet"),
                signum,
            )
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        bad = False
        micro_losses, micro_terms = [], []  # device tensors: read once per step, below
        for micro in range(accum):
            index = step * accum + micro
            gen = torch.Generator().manual_seed(make_seed("step", cfg.seed, rank, index))
            t_data = time.perf_counter()
            batch = next(batches)
            window["data_s"] += time.perf_counter() - t_data
            b, v = batch["pixels"].shape[:2]
            captions = [
                "" if random.Random(make_seed("drop", cfg.seed, rank, index, i)).random()
                < cfg.caption_dropout else c
                for i, c in enumerate(batch["caption"])
            ]  # fmt: skip
            latents = encode_images(vae, batch["pixels"].to(accelerator.device), gen)
            text = encode_prompts(tokenizer, text_encoder, captions)
            camera = batch["camera"] if cfg.model.camera else None  # camera: false ablation
            if camera is not None:
                camera = camera.reshape(b * v, -1).to(accelerator.device)  # (B, V, 16) -> (B*V, 16)
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(unet)
            with sync, accelerator.autocast():
                loss = diffusion_loss(
                    unet, noise_scheduler, latents, text.float(), camera, v, gen,
                    snr_gamma=cfg.snr_gamma, noise_offset=cfg.noise_offset,
                )  # fmt: skip
                if camera is None:
                    # 2D batch: the camera MLP is skipped; a zero term keeps DDP's set of used
                    # parameters the same on every rank and step
                    mlp = accelerator.unwrap_model(unet).class_embedding
                    if mlp is not None:
                        loss = loss + 0.0 * sum(p.sum() for p in mlp.parameters())
                if db is not None:
                    terms = {"instance_loss": loss.detach()}
                    prior = batch.get("prior")
                    if prior is not None:  # class objects, multi-view with cameras
                        bp, vp = prior["pixels"].shape[:2]
                        prior_latents = encode_images(
                            vae, prior["pixels"].to(accelerator.device), gen
                        )
                        prior_text = encode_prompts(tokenizer, text_encoder, prior["caption"])
                        # (Bp, V, 16) -> (Bp*V, 16)
                        prior_camera = None
                        if cfg.model.camera:
                            prior_camera = (
                                prior["camera"].reshape(bp * vp, -1).to(accelerator.device)
                            )
                        prior_loss = diffusion_loss(
                            unet, noise_scheduler, prior_latents, prior_text.float(),
                            prior_camera, vp, gen, snr_gamma=cfg.snr_gamma,
                            noise_offset=cfg.noise_offset,
                        )  # fmt: skip
                        terms["prior_loss"] = prior_loss.detach()
                        loss = loss + db.prior.weight * prior_loss
                    if anchor is not None:  # lambda * mean(|theta - theta_0|)
                        preservation = anchor.loss(db.param_preservation)
                        terms["preservation"] = preservation.detach()
                        loss = loss + preservation
                if step == cfg.debug_nan_step:
                    loss = loss * float("nan")
                # No host sync between forward and backward: every rank runs backward on
                # every micro-step (so DDP never waits for a rank that skipped one), and a
                # non-finite loss on any rank drops the whole step once it is read, below.
                accelerator.backward(loss / accum)
            micro_losses.append(loss.detach().float().reshape(1))
            if db is not None:
                micro_terms.append(
                    torch.stack(
                        [
                            terms[n].float() if n in terms else loss.new_zeros(()).float()
                            for n in TERMS
                        ]
                    )  # fmt: skip
                )
            window["images"] += b * v
            window["skipped"] += int(batch.get("skipped", 0))
            window["n2d"] += int(batch["camera"] is None)
            window["nb"] += 1
        step_loss, step_terms = float("nan"), dict.fromkeys(TERMS, 0.0)
        if micro_losses:  # one host read per step: is the loss finite on every rank, its value
            local = torch.cat(micro_losses)  # (accum,)
            finite = torch.isfinite(local).all().float().reshape(1)
            head = [accelerator.reduce(finite, reduction="sum"), local.mean().reshape(1)]
            if micro_terms:  # (accum, len(TERMS)) -> (len(TERMS),)
                head.append(torch.stack(micro_terms).mean(0))
            values = torch.cat([h.to(local.device) for h in head]).tolist()
            bad = bad or values[0] < world
            step_loss = values[1]
            step_terms.update(zip(TERMS, values[2:], strict=False))
        grad_norm, overflow = float("nan"), False
        if not bad:  # clip + step; an fp16 loss-scale overflow skips the update, is not bad
            outcome = optimizer_step(accelerator, optimizer, unet.parameters(),
                                     cfg.optim.max_grad_norm)  # fmt: skip
            grad_norm, overflow, bad = outcome.grad_norm, outcome.overflow, outcome.bad
        if overflow:
            overflow_skips += 1
        elif bad:
            optimizer.zero_grad(set_to_none=True)
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
            window["loss"] += step_loss
            window["n"] += 1
            for name in TERMS:
                window[name] += step_terms[name]
        step += 1
        bar.update(1)

        # ---- logging ------------------------------------------------------------------------
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            seconds = time.perf_counter() - window["t0"]
            stats = torch.tensor(
                [window[k] for k in ("loss", "n", "images", "skipped", "n2d", "nb", *TERMS)],
                dtype=torch.float64,
                device=accelerator.device,
            )
            stats = accelerator.reduce(stats, reduction="sum").tolist()
            skipped_total += int(stats[3])  # bad samples skipped by the decoders (all ranks)
            logs = {
                "loss": stats[0] / max(1.0, stats[1]),
                "lr": lr,
                "grad_norm": grad_norm,
                "samples_per_s": stats[2] / max(seconds, 1e-9),
                "data_wait_frac": window["data_s"] / max(seconds, 1e-9),
                "skipped_samples": stats[3],
                "frac_2d_batches": stats[4] / max(1.0, stats[5]),
                "nan_skips": nan_skips_total,
                "overflow_skips": overflow_skips,
            }
            if db is not None:
                for i, name in enumerate(TERMS):
                    logs[name] = stats[6 + i] / max(1.0, stats[1])
                if anchor is not None:
                    logs["theta_distance"] = anchor.distance()  # mean(|theta - theta_0|)
            if tracker_started:
                accelerator.log(logs, step=step)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}",
                            ips=f"{logs['samples_per_s']:.1f}")  # fmt: skip
            if accelerator.is_main_process:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(_json_safe({"step": step, **logs}), allow_nan=False) + "\n")
            window = {"loss": 0.0, "n": 0, "images": 0, "data_s": 0.0,
                      "t0": time.perf_counter(), "skipped": 0, "n2d": 0, "nb": 0,
                      **dict.fromkeys(TERMS, 0.0)}  # fmt: skip

        # ---- checkpoint -----------------------------------------------------------------------
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.max_steps:
            save_checkpoint(accelerator, out, step, {"nan_skips": nan_skips_total},
                            keep=cfg.checkpoint.keep, model=unet, optimizer=optimizer,
                            ema=ema)  # fmt: skip
            saved_step = step

        # ---- validation samples ---------------------------------------------------------------
        if cfg.validation.every and (step % cfg.validation.every == 0 or step == cfg.max_steps):
            if accelerator.is_main_process:
                _validate(accelerator, unet, ema, trainable, parts, vae, text_encoder, cfg,
                          val_prompts, step, out)  # fmt: skip
            accelerator.wait_for_everyone()
    bar.close()

    # ---- the end: ranks in sync?, export a diffusers folder -------------------------------------
    base = accelerator.unwrap_model(unet)
    checksums = accelerator.gather(
        torch.tensor([_checksum(base)], dtype=torch.float64, device=accelerator.device)
    ).tolist()
    summary = {
        "steps": step,
        "final_loss": last_loss,
        "rank_checksums": checksums,
        "ranks_in_sync": len(set(checksums)) == 1,
        "nan_skips": nan_skips_total,
        "skipped_samples": skipped_total,
        "overflow_skips": overflow_skips,
    }
    if db is not None:
        summary["class_images_generated"] = class_generated
        if class_images is not None:
            summary["class_images"] = str(class_images.folder)
    if accelerator.is_main_process:
        if cfg.export:
            from mvdiff.training.export import export_pipeline_folder

            if ema is not None:
                ema.store(trainable)
                ema.copy_to(trainable)
            if lora_config is not None:  # only the adapter; it records its base model
                from mvdiff.pipelines.loading import save_lora_adapter

                save_lora_adapter(base, lora_config, out / "adapter", dbm.adapter_meta(cfg))
                summary["adapter"] = str(out / "adapter")
            else:
                export_pipeline_folder(
                    out / "model", base, vae.float(), text_encoder.float(), tokenizer,
                    parts.scheduler,
                )  # fmt: skip
                summary["model"] = str(out / "model")
            if ema is not None:
                ema.restore(trainable)
        summary = _json_safe(summary)  # valid JSON: a loss that never came is null, not NaN
        (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
        log.info("done: %s", json.dumps(summary))
    accelerator.wait_for_everyone()
    if tracker_started:
        accelerator.end_training()  # also tears down the process group: nothing collective after
    return summary


def _validate(accelerator, unet, ema, trainable, parts, vae, text_encoder, cfg, prompts, step,
              out):  # fmt: skip
    from PIL import Image

    from mvdiff.training.validation import validation_grid

    base = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    base.eval()
    try:
        with accelerator.autocast():
            grid = validation_grid(
                base, vae, text_encoder, parts.tokenizer, parts.scheduler,
                prompts, cfg.data.resolution, cfg.validation,
            )  # fmt: skip
    finally:
        base.train()
        if ema is not None:
            ema.restore(trainable)
    path = out / "samples" / f"step-{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    try:
        tracker = accelerator.get_tracker("tensorboard", unwrap=True)
        tracker.add_image("validation", grid, step, dataformats="HWC")
    except Exception:  # noqa: BLE001 - no tensorboard tracker: the PNG is enough
        pass


def _json_safe(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN / Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils import tensorboard as _  # noqa: F401
    except ImportError:
        return False
    return True
