"""Write a diffusers-format model folder loadable by ``MVDreamPipeline.from_pretrained``::

model/  model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mvdiff.errors import UserError

__all__ = ["export_pipeline_folder", "export_trained"]


def export_pipeline_folder(
    out_dir: str | Path, unet, vae, text_encoder, tokenizer, scheduler
) -> Path:
    """Save the five components (safetensors) and ``model_index.json``; atomic via rename.

    A failed write (disk full) removes the partial ``.tmp`` folder and is a one-line
    :class:`~mvdiff.errors.UserError` (the final training checkpoint is already on disk)."""
    from safetensors import SafetensorError

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    try:
        return _export(out_dir, tmp, unet, vae, text_encoder, tokenizer, scheduler)
    except (OSError, RuntimeError, SafetensorError) as e:  # disk full, quota, permissions
        shutil.rmtree(tmp, ignore_errors=True)
        text = str(e).strip().splitlines()
        reason = e.strerror if isinstance(e, OSError) and e.strerror else text[-1] if text else e
        raise UserError(
            f"could not write the model folder {out_dir} ({reason}); removed the partial folder"
        ) from None


def _export(out_dir: Path, tmp: Path, unet, vae, text_encoder, tokenizer, scheduler) -> Path:
    import diffusers

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    scheduler.save_pretrained(tmp / "scheduler")

    def entry(obj):
        module = type(obj).__module__.split(".")[0]
        # like DiffusionPipeline.save_pretrained: the top package for diffusers/transformers,
        # the defining module otherwise
        library = module if module in ("diffusers", "transformers") else type(obj).__module__
        return [library, type(obj).__name__]

    index = {
        "_class_name": "MVDreamPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": entry(unet),
        "vae": entry(vae),
        "text_encoder": entry(text_encoder),
        "tokenizer": entry(tokenizer),
        "scheduler": entry(scheduler),
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def export_trained(accelerator, unet, vae, text_encoder, tokenizer, scheduler, out_dir,
                   ema=None, trainable=None) -> Path | None:  # fmt: skip
    """The end of training: call on **every** rank. Gathers the whole UNet (EMA weights when
    ``ema``; a collective under FSDP / ZeRO-3), and the main process writes the model folder
    from an ordinary copy of the UNet's own class — the same folder whatever the engine (DDP,
    FSDP, DeepSpeed) for the same weights. Returns the folder on the main process, else None."""
    from mvdiff.training.sharded import full_state_dict, plain_copy

    state = full_state_dict(accelerator, unet, ema, trainable)
    path = None
    if accelerator.is_main_process:
        plain = plain_copy(accelerator, unet, state, device="cpu")
        del state
        path = export_pipeline_folder(
            out_dir, plain, vae.float(), text_encoder.float(), tokenizer, scheduler
        )
    accelerator.wait_for_everyone()
    return path
