"""Write a diffusers-format model folder loadable by ``MVDreamPipeline.from_pretrained``::

model/  model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = ["export_pipeline_folder"]


def export_pipeline_folder(
    out_dir: str | Path, unet, vae, text_encoder, tokenizer, scheduler
) -> Path:
    """Save the five components (safetensors) and ``model_index.json``; atomic via rename."""
    import diffusers

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
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
