"""Write a diffusers-format model folder loadable by ``MVDreamPipeline.from_pretrained``::

model/  model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/
        [image_encoder/  feature_extractor/]   (image-prompt models: ``mvdiff sample --image``)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mvdiff.errors import UserError

__all__ = ["export_pipeline_folder"]


def export_pipeline_folder(
    out_dir: str | Path, unet, vae, text_encoder, tokenizer, scheduler, **optional
) -> Path:
    """Save the five components (safetensors) and ``model_index.json``; atomic via rename.
    ``optional``: more components (``image_encoder``, ``feature_extractor``); None ones are
    left out.

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
    import diffusers

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    scheduler.save_pretrained(tmp / "scheduler")
    optional = {k: v for k, v in optional.items() if v is not None}
    for name, part in optional.items():
        kwargs = {"safe_serialization": True} if isinstance(part, torch.nn.Module) else {}
        part.save_pretrained(tmp / name, **kwargs)

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
        **{name: entry(part) for name, part in optional.items()},
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
