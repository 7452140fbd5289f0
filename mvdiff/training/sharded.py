"""Full weights out of a sharded run: the one path validation, EMA and the export take.

Under DDP every rank holds the whole UNet. Under FSDP (``train/accelerate/fsdp.yaml``) or
DeepSpeed ZeRO-3 each rank holds a shard, the module's ``state_dict()`` on one rank is not the
model, and gathering it is a *collective*: every rank must call it, or the run hangs. So:

* :func:`full_state_dict` is called on **every** rank (EMA weights swapped in on every rank,
  each for its own shard), returns the gathered weights on the main process, ``None`` elsewhere;
* :func:`plain_copy` turns them into an ordinary (unsharded, unwrapped) module of the model's
  own class on the main process, which validation samples with and the export writes with
  ``save_pretrained`` — the same writer as under DDP, so both runs export the same folder;
* only the main process writes files.

DeepSpeed: :func:`configure_deepspeed` fills what ``accelerator.prepare`` cannot infer without
a dataloader (``train_micro_batch_size_per_gpu``) from the training config, and the
accumulation and clipping values the loop uses.
"""

from __future__ import annotations

import logging

import torch

from mvdiff.errors import UserError

log = logging.getLogger("mvdiff.train")

__all__ = [
    "configure_deepspeed",
    "engine_name",
    "full_state_dict",
    "is_deepspeed",
    "is_sharded",
    "plain_class",
    "plain_copy",
    "weights_checksum",
]


def engine_name(accelerator) -> str:
    """``"DEEPSPEED"``, ``"FSDP"``, ``"MULTI_GPU"``, ... (accelerate's distributed type)."""
    kind = getattr(accelerator, "distributed_type", "")
    return str(getattr(kind, "value", kind)).upper()


def is_deepspeed(accelerator) -> bool:
    return "DEEPSPEED" in engine_name(accelerator)


def is_sharded(accelerator) -> bool:
    """Whether a rank's copy of the trained module holds only a shard of its weights (FSDP,
    DeepSpeed ZeRO-3); ZeRO-2 shards only gradients and optimizer state."""
    if "FSDP" in engine_name(accelerator):
        return True
    if is_deepspeed(accelerator):
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        config = getattr(plugin, "deepspeed_config", None) or {}
        return int(config.get("zero_optimization", {}).get("stage", 0)) == 3
    return False


def full_state_dict(accelerator, model, ema=None, trainable=None) -> dict | None:
    """The whole model's weights (EMA weights in place of the trained ones when ``ema``).

    A collective under FSDP / ZeRO-3: call on every rank. Returns CPU tensors (copies, so a
    later optimizer step or ``ema.restore`` does not change them) on the main process and
    ``None`` on the others."""
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)  # every rank: its own shard
    try:
        state = accelerator.get_state_dict(model, unwrap=True)
        if not accelerator.is_main_process:
            return None
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    finally:
        if ema is not None:
            ema.restore(trainable)


def plain_class(module: torch.nn.Module) -> type:
    """The model's own class: FSDP2 swaps in a subclass (``FSDP<Class>``) of it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return type(module)
    for cls in type(module).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls
    return type(module)


def plain_copy(accelerator, model, state: dict, into=None, device=None):
    """On the main process: an unsharded module of ``model``'s class holding ``state`` (reusing
    ``into`` when given, e.g. the copy of the previous validation), on ``device`` (default: the
    accelerator's). Needs a diffusers model
    (``from_config``); its buffers are those of the class's own initialisation."""
    base = accelerator.unwrap_model(model)
    if into is None:
        cls = plain_class(base)
        if not hasattr(cls, "from_config"):
            raise UserError(
                f"sharded training (FSDP / ZeRO-3) of a {cls.__name__} is not supported: "
                "use DDP (train/accelerate/ddp_8gpu.yaml)"
            )
        into = cls.from_config(base.config)
    into.load_state_dict(state, strict=True)
    return into.to(accelerator.device if device is None else device)


def weights_checksum(model: torch.nn.Module) -> float:
    """A float fingerprint of the weights held by this rank (its shard under FSDP2)."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(model.parameters()):
        local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor's own shard
        total += (local.detach().double().cpu() * (1.0 + 1e-3 * (i % 97))).sum()
    return float(total)


def configure_deepspeed(accelerator, micro_batch_size: int, accumulation: int,
                        max_grad_norm: float) -> None:  # fmt: skip
    """Before ``accelerator.prepare`` under DeepSpeed: the values it would otherwise infer from a
    dataloader the trainer does not pass (``train_micro_batch_size_per_gpu``), and the
    accumulation / clipping of the training config (an explicit, different value in the
    DeepSpeed config is an error naming both). No effect without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if not is_deepspeed(accelerator) or plugin is None:
        return
    config = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(accumulation),
        "gradient_clipping": float(max_grad_norm),
    }
    source = {
        "train_micro_batch_size_per_gpu": "data.batch_size",
        "gradient_accumulation_steps": "gradient_accumulation_steps",
        "gradient_clipping": "optim.max_grad_norm",
    }
    for key, value in wanted.items():
        current = config.get(key, "auto")
        if current in (None, "auto"):
            config[key] = value
        elif float(current) != float(value):
            raise UserError(
                f"the DeepSpeed config sets {key}={current} but the training config's "
                f"{source[key]} is {value}: set them equal (or {key}: auto)"
            )
    log.info("DeepSpeed: micro-batch %d per GPU, accumulation %d, clipping %g",
             wanted["train_micro_batch_size_per_gpu"], accumulation, max_grad_norm)  # fmt: skip
