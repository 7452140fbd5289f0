"""Write a model folder with ``MVDreamPipeline.save_pretrained`` (diffusers' writer; the folder
carries the pipeline and UNet code, see :mod:`mvdiff.pipelines.folders`)::

model/  model_index.json  pipeline_mvdream.py  unet/ (unet_mv.py)  vae/  text_encoder/  tokenizer/
        scheduler/  [image_encoder/  feature_extractor/]   (image-prompt models: sample --image)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mvdiff.errors import UserError

__all__ = ["export_pipeline_folder", "export_trained"]


def export_pipeline_folder(
    out_dir: str | Path, unet, vae, text_encoder, tokenizer, scheduler, **optional
) -> Path:
    """Save the five components (safetensors), ``model_index.json`` and the shipped code;
    atomic via rename. ``optional``: the pipeline's optional components (``image_encoder``,
    ``feature_extractor`` of an ImageDream model); None ones are left out.

    A failed write (disk full) removes the partial ``.tmp`` folder and is a one-line
    :class:`~mvdiff.errors.UserError` (the final training checkpoint is already on disk)."""
    from safetensors import SafetensorError

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    try:
        return _export(out_dir, tmp, unet, vae, text_encoder, tokenizer, scheduler, optional)
    except (OSError, RuntimeError, SafetensorError) as e:  # disk full, quota, permissions
        shutil.rmtree(tmp, ignore_errors=True)
        text = str(e).strip().splitlines()
        reason = e.strerror if isinstance(e, OSError) and e.strerror else text[-1] if text else e
        raise UserError(
            f"could not write the model folder {out_dir} ({reason}); removed the partial folder"
        ) from None


def _export(out_dir: Path, tmp: Path, unet, vae, text_encoder, tokenizer, scheduler,
            optional: dict) -> Path:  # fmt: skip
    from mvdiff.pipelines.pipeline_mvdream import MVDreamPipeline

    shutil.rmtree(tmp, ignore_errors=True)
    extra = {k: v for k, v in optional.items() if v is not None}
    pipe = MVDreamPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                           scheduler=scheduler, **extra)  # fmt: skip
    pipe.save_pretrained(tmp, safe_serialization=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def export_trained(accelerator, unet, vae, text_encoder, tokenizer, scheduler, out_dir,
                   ema=None, trainable=None, **optional) -> Path | None:  # fmt: skip
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
            out_dir, plain, vae.float(), text_encoder.float(), tokenizer, scheduler, **optional
        )  # optional: image_encoder / feature_extractor (see export_pipeline_folder)
    accelerator.wait_for_everyone()
    return path
