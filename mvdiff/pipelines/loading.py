"""Load an MVDreamPipeline from what a user points at: a folder, a hub id or an official .pt.

* a diffusers-format folder (``model_index.json``) -> ``MVDreamPipeline.from_pretrained``;
* an official checkpoint (``.pt`` / ``.ckpt`` / ``.safetensors``) -> converted once with
  :func:`mvdiff.convert.convert_mvdream_checkpoint` into a cache folder keyed by the file's
  path, size and modification time (and the original config), then loaded from there;
* anything else that looks like ``org/name`` -> the Hugging Face hub (when online).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from mvdiff.errors import UserError

CHECKPOINT_SUFFIXES = (".pt", ".ckpt", ".pth", ".safetensors")


def default_cache_dir() -> Path:
    """``$MVDIFF_CACHE`` or ``$XDG_CACHE_HOME/mvdiff`` (``~/.cache/mvdiff``)."""
    if os.environ.get("MVDIFF_CACHE"):
        return Path(os.environ["MVDIFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mvdiff"


def _cache_key(checkpoint: Path, original_config: str | None) -> str:
    from mvdiff import __version__

    st = checkpoint.stat()
    config = original_config
    if original_config and Path(original_config).is_file():
        config = Path(original_config).read_text()
    blob = json.dumps([str(checkpoint.resolve()), st.st_size, st.st_mtime_ns, config, __version__])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def converted_folder(
    checkpoint: str | Path,
    original_config: str | None = None,
    cache_dir: str | Path | None = None,
    log=print,
) -> Path:
    """The diffusers folder of an official checkpoint, converting it on first use."""
    from mvdiff.convert import convert_mvdream_checkpoint

    checkpoint = Path(checkpoint)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = cache / "converted" / f"{checkpoint.stem}-{_cache_key(checkpoint, original_config)}"
    if (folder / "model_index.json").is_file():
        log(f"using the cached conversion {folder}")
        return folder
    log(f"converting {checkpoint} -> {folder} (once; cached)")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_mvdream_checkpoint(checkpoint, tmp, original_config=original_config)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same conversion first
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def fingerprint(folder: str | Path) -> str:
    """A cheap identity of a model folder: every file's path and size, and the JSON contents."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        if path.suffix == ".json":
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def model_kind(model: str) -> str:
    """ "checkpoint" | "folder" | "hub" for a ``--model`` value, or a one-line UserError.

    Cheap (no torch import), so that the command can fail fast on a wrong path.
    """
    path = Path(model)
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise UserError(
                f"--model {model}: a file must be an official checkpoint "
                f"({', '.join(CHECKPOINT_SUFFIXES)})"
            )
        return "checkpoint"
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"--model {model}: folder has no model_index.json (not a pipeline)")
        return "folder"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith("."):
        return "hub"
    raise UserError(f"--model {model}: no such folder or checkpoint")


def load_pipeline(
    model: str,
    torch_dtype=None,
    original_config: str | None = None,
    cache_dir: str | Path | None = None,
    log=print,
):
    """``(MVDreamPipeline, info)`` for a folder, an official checkpoint or a hub id.

    ``info`` records where the weights came from: ``kind`` (folder | checkpoint | hub),
    ``folder`` and a ``fingerprint`` of it (folders and checkpoints).
    """
    import torch

    from mvdiff.pipelines.pipeline_mvdream import MVDreamPipeline

    torch_dtype = torch_dtype or torch.float32
    kind = model_kind(model)
    info = {"model": model, "kind": kind}
    folder = None
    if kind == "checkpoint":
        folder = converted_folder(Path(model), original_config, cache_dir, log=log)
        info["folder"] = str(folder)
    elif kind == "folder":
        folder = Path(model)
        info["folder"] = str(folder.resolve())

    if folder is None:
        try:
            pipe = MVDreamPipeline.from_pretrained(model, torch_dtype=torch_dtype)
        except Exception as e:  # noqa: BLE001 - offline, unknown id, gated ...
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise UserError(
                f"--model {model}: no such local folder, and the hub did not give it ({first})"
            ) from None
        return pipe, info
    info["fingerprint"] = fingerprint(folder)
    try:
        pipe = MVDreamPipeline.from_pretrained(str(folder), torch_dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"--model {model}: cannot load the pipeline ({first})") from None
    return pipe, info
