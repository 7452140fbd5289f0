"""The end of a training step: clip, optimizer step, loss-scaler bookkeeping, EMA placement.

With ``mixed_precision: fp16`` accelerate scales the loss with a ``GradScaler``. A scaled
gradient that overflows to inf/NaN is routine there (the scaler halves its scale and skips the
update), not a failure of the run. :func:`optimizer_step` therefore

* counts a non-finite gradient as *bad* (``nan_policy``) only without a scaler, or when the
  scale has already fallen below 1 (then the gradients are non-finite without scaling);
* with a scaler always calls ``optimizer.step()`` after clipping, so the scaler's step
  (skip or apply) and ``update()`` run and its per-step state is reset — skipping that call
  left the scaler "unscaled" and the next ``clip_grad_norm_`` raised
  "unscale_() has already been called on this optimizer since the last update()".

:func:`build_ema` and :func:`place_ema` keep the EMA weights next to the model (accelerate
reloads registered objects onto the CPU).
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass

log = logging.getLogger("mvdiff.train")

__all__ = [
    "StepOutcome",
    "accelerator_kwargs_handlers",
    "backward",
    "build_ema",
    "discard_step",
    "optimizer_step",
    "place_ema",
]


@dataclass
class StepOutcome:
    #: the optimizer changed the weights
    stepped: bool
    #: total gradient norm before clipping (NaN when clipping is off)
    grad_norm: float
    #: the loss scaler found inf/NaN gradients and skipped this update (fp16; routine)
    overflow: bool = False

    @property
    def bad(self) -> bool:
        """A non-finite gradient that ``nan_policy`` must handle."""
        return not self.stepped and not self.overflow


def _scaler(accelerator):
    scaler = getattr(accelerator, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _deepspeed_engine(accelerator):
    """The DeepSpeed engine of a DeepSpeed run, else None."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return None if wrapped is None else wrapped.engine


def backward(accelerator, loss, accumulation: int, last: bool) -> None:
    """Backward of one micro-step of ``accumulation``; ``last``: the one before the update.

    Under DeepSpeed the engine is driven directly: it divides the loss by its own
    ``gradient_accumulation_steps`` (set equal to ``accumulation`` by
    :func:`~mvdiff.training.sharded.configure_deepspeed`), reduces gradients only on ``last``,
    and its step waits for :func:`optimizer_step` (after the loop has checked the loss on every
    rank), where ``accelerator.backward`` would step inside every backward."""
    engine = _deepspeed_engine(accelerator)
    if engine is None:
        accelerator.backward(loss / accumulation)
        return
    engine.set_gradient_accumulation_boundary(is_boundary=last)
    engine.backward(loss)


def discard_step(accelerator, optimizer) -> None:
    """Drop the gradients of a step that will not be applied (non-finite loss)."""
    engine = _deepspeed_engine(accelerator)
    if engine is not None:  # the wrapped optimizer's zero_grad is a no-op under DeepSpeed
        engine.optimizer.zero_grad(set_to_none=True)
        engine.zero_grad()
        return
    optimizer.zero_grad(set_to_none=True)


def _deepspeed_step(engine, max_grad_norm: float) -> StepOutcome:
    """DeepSpeed clips (``gradient_clipping``), steps and zeroes in ``engine.step()``.

    Whether the update was applied: ``engine.was_step_applied()``. ZeRO-1/2 skip an update
    whose gradients are not finite on some rank themselves (every precision before DeepSpeed
    0.17.1; since then fp16, and bf16 with ``bf16.check_grad_overflow``, on by default). Only
    under fp16 with a dynamic loss scale is that skip the routine overflow (the scale drops);
    otherwise it is a non-finite gradient, for ``nan_policy`` (it used to count as an
    overflow, so a bf16 run skipped NaN steps without end). After a skip DeepSpeed's gradient
    norm is still the last applied step's (NaN here). A non-finite norm reads -1 (DeepSpeed
    masks it): without the check (fp32 since 0.17.1) that update has been applied — bad."""
    engine.step()
    applied = _step_applied(engine)
    if not applied:
        if _dynamic_fp16(engine):
            log.info("fp16 loss-scale overflow: DeepSpeed skipped the update")
            return StepOutcome(False, float("nan"), overflow=True)
        log.warning("DeepSpeed found non-finite gradients and skipped the update")
        return StepOutcome(False, float("nan"))  # nan_policy decides
    norm = engine.get_global_grad_norm()
    grad_norm = float("nan") if norm is None else float(norm)
    if norm is not None and not (math.isfinite(grad_norm) and grad_norm >= 0):
        log.error("DeepSpeed applied an update with non-finite gradients (no gradient check in "
                  "this precision): the weights may no longer be finite")  # fmt: skip
        return StepOutcome(False, float("nan"))
    return StepOutcome(True, grad_norm if max_grad_norm > 0 else float("nan"))


def _step_applied(engine) -> bool:
    """``engine.was_step_applied()`` (DeepSpeed >= 0.5.4); before it, the optimizer's flag."""
    if hasattr(engine, "was_step_applied"):
        return bool(engine.was_step_applied())
    return not bool(getattr(engine.optimizer, "overflow", False))


def _dynamic_fp16(engine) -> bool:
    """fp16 with a dynamic loss scale (``fp16.loss_scale: 0``, DeepSpeed's default; the
    setting reads 0 under bf16 too, hence both tests)."""
    return bool(engine.fp16_enabled()) and bool(engine.dynamic_loss_scale())


def optimizer_step(accelerator, optimizer, parameters, max_grad_norm: float) -> StepOutcome:
    """Clip (when ``max_grad_norm > 0``), step and zero the gradients; see module docstring."""
    engine = _deepspeed_engine(accelerator)
    if engine is not None:
        return _deepspeed_step(engine, max_grad_norm)
    scaler = _scaler(accelerator)
    grad_norm = float("nan")
    if max_grad_norm > 0:
        # unscales first when there is a scaler; inf/NaN when the scaled gradients overflowed
        grad_norm = float(accelerator.clip_grad_norm_(parameters, max_grad_norm))
    if scaler is None:
        if max_grad_norm > 0 and not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            return StepOutcome(False, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome(True, grad_norm)
    # the scaler decides: it skips the update on inf/NaN gradients and then updates its scale.
    # Whether it skipped: the clipped norm says so (the scaler's own test: any inf/NaN); without
    # clipping, a fall of the scale does. Not ``optimizer.step_was_skipped``: with a fused
    # AdamW (``_step_supports_amp_scaling``) the scaler always calls the optimizer's step,
    # which skips internally, and accelerate reports every step as taken.
    scale_before = float(scaler.get_scale()) if max_grad_norm <= 0 else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scale_before is None:
        skipped = not math.isfinite(grad_norm)
        scale = float(scaler.get_scale()) if skipped else None
    else:
        scale = float(scaler.get_scale())
        skipped = scale < scale_before
    if not skipped:
        return StepOutcome(True, grad_norm)
    log.info("fp16 loss-scale overflow: update skipped, loss scale now %g", scale)
    # below 1 the gradients are non-finite even unscaled: a real failure, for nan_policy
    return StepOutcome(False, grad_norm, overflow=scale >= 1.0)


def accelerator_kwargs_handlers() -> list:
    """accelerate handlers of the trainer: DDP with ``gradient_as_bucket_view`` (gradients
    live in DDP's all-reduce buckets instead of a second copy: 4 bytes/parameter less, 3.2
    GiB for an SD-2.1-size UNet, and one copy less per step)."""
    from accelerate.utils import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(gradient_as_bucket_view=True)]


def build_ema(parameters, decay: float):
    """diffusers' ``EMAModel`` over ``parameters``, with its ``foreach`` update (one fused
    kernel per step instead of one small update per tensor) where this diffusers has it and
    the parameters are plain tensors (FSDP2's sharded ``DTensor`` has no ``_foreach_copy_``,
    which ``copy_to`` / ``restore`` use)."""
    from diffusers.training_utils import EMAModel

    parameters = list(parameters)
    kwargs = {}
    if "foreach" in inspect.signature(EMAModel.__init__).parameters:
        kwargs["foreach"] = not any(_is_dtensor(p) for p in parameters)
    return EMAModel(parameters, decay=decay, **kwargs)


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def place_ema(ema, parameters) -> None:
    """Move the EMA shadow weights onto the device of the parameters they follow.

    ``accelerator.load_state`` restores registered objects from CPU tensors; on a GPU the
    first ``ema.step`` would then mix devices."""
    params = list(parameters)
    if len(params) != len(ema.shadow_params):
        raise ValueError(
            f"EMA holds {len(ema.shadow_params)} tensors, the model {len(params)} trainable ones"
        )
    ema.shadow_params = [
        s.to(device=p.device) if s.device != p.device else s
        for s, p in zip(ema.shadow_params, params, strict=True)
    ]
