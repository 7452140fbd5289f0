"""Load an MVDreamPipeline from what a user points at: a folder, a hub id or an official .pt.

* a diffusers-format folder (``model_index.json``) -> ``MVDreamPipeline.from_pretrained``;
* an official checkpoint (``.pt`` / ``.ckpt`` / ``.safetensors``) -> converted once with
  :func:`mvdiff.convert.convert_mvdream_checkpoint` into a cache folder keyed by the file's
  path, size and modification time (and the original config), then loaded from there;
* anything else that looks like ``org/name`` -> the Hugging Face hub (when online);
* a LoRA adapter folder written by ``mvdiff dreambooth --lora`` (diffusers' LoRA format:
  ``pytorch_lora_weights.safetensors``, keys ``unet.*``, the ``LoraConfig`` in its metadata,
  so ``pipe.load_lora_weights(DIR)`` / ``pipe.fuse_lora()`` work; plus ``mvdiff_adapter.json``,
  which records the base model) -> the base model, loaded as above, with the adapter fused
  into its UNet. ``lora=DIR`` applies an adapter on top of any ``model`` instead. Adapters
  written before (peft's ``adapter_config.json`` + ``adapter_model.safetensors``, format
  ``mvdiff-lora/1``) still load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from mvdiff.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".ckpt", ".pth", ".safetensors")
ADAPTER_META = "mvdiff_adapter.json"
ADAPTER_FORMAT = "diffusers-lora/1"
#: diffusers' LoRA weight file name (``save_lora_weights`` / ``load_lora_weights``)
ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
#: adapters written by mvdiff before it used diffusers' format: peft's files
PEFT_ADAPTER_FORMAT = "mvdiff-lora/1"
PEFT_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def dtype_kwargs(dtype) -> dict:
    """The keyword that sets the weights' dtype in diffusers' ``from_pretrained``: ``dtype``
    from diffusers 0.40 on (where ``torch_dtype`` is deprecated: a FutureWarning on every
    load), ``torch_dtype`` before (those versions do not know ``dtype``)."""
    import diffusers

    major, minor = (int(x) for x in re.findall(r"\d+", diffusers.__version__)[:2])
    return {"dtype" if (major, minor) >= (0, 40) else "torch_dtype": dtype}


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
    log=logger.info,
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
    """ "checkpoint" | "folder" | "adapter" | "hub" for a ``--model`` value, or a one-line UserError.

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
        if (path / ADAPTER_META).is_file():
            return "adapter"
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
    log=logger.info,
    lora: str | None = None,
):
    """``(MVDreamPipeline, info)`` for a folder, an official checkpoint, a hub id or a LoRA
    adapter folder (its base model + the adapter); ``lora`` = an adapter folder to apply on
    top of ``model``.

    ``info`` records where the weights came from: ``kind`` (folder | checkpoint | hub |
    adapter), ``folder`` and a ``fingerprint`` of it (folders and checkpoints), ``adapter``.
    """
    if model != "tiny" and model_kind(model) == "adapter":
        if lora:
            raise UserError(f"--model {model} is itself an adapter; give its base with --lora")
        meta = read_adapter_meta(model)
        base = meta["base_model"]
        if base != "tiny":
            try:
                model_kind(base)
            except UserError:
                raise UserError(
                    f"--model {model}: the adapter's base model {base} is not available; "
                    f"use --model BASE --lora {model}"
                ) from None
        pipe, info = load_pipeline(base, torch_dtype, original_config, cache_dir, log, lora=model)
        return pipe, {**info, "model": model, "kind": "adapter", "base_model": base}
    pipe, info = _load_base(model, torch_dtype, original_config, cache_dir, log)
    if lora:
        info["adapter"] = apply_lora_adapter(pipe.unet, lora, base_info=info, log=log)
    return pipe, info


def _load_base(model, torch_dtype, original_config, cache_dir, log):
    import torch

    from mvdiff.pipelines.pipeline_mvdream import MVDreamPipeline

    torch_dtype = torch_dtype or torch.float32
    if model == "tiny":  # the base of adapters trained on mvdiff.testing.tiny_components()
        from mvdiff.testing import tiny_components

        pipe = MVDreamPipeline(**tiny_components(0))  # float32
        if torch_dtype != torch.float32:  # diffusers logs a warning on any .to(dtype)
            pipe = pipe.to(dtype=torch_dtype)
        return pipe, {"model": "tiny", "kind": "tiny"}
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
            pipe = MVDreamPipeline.from_pretrained(model, **dtype_kwargs(torch_dtype))
        except Exception as e:  # noqa: BLE001 - offline, unknown id, gated ...
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise UserError(
                f"--model {model}: no such local folder, and the hub did not give it ({first})"
            ) from None
        return pipe, info
    info["fingerprint"] = fingerprint(folder)
    try:
        pipe = MVDreamPipeline.from_pretrained(str(folder), **dtype_kwargs(torch_dtype))
    except (OSError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"--model {model}: cannot load the pipeline ({first})") from None
    return pipe, info


# ---- LoRA adapters (mvdiff dreambooth --lora) -----------------------------------------------


def read_adapter_meta(folder: str | Path) -> dict:
    """``mvdiff_adapter.json`` of an adapter folder; a folder with only diffusers' LoRA file
    (written by other tools) is an adapter without a recorded base (usable with ``--lora``)."""
    folder = Path(folder)
    path = folder / ADAPTER_META
    if not path.exists() and (folder / ADAPTER_WEIGHTS).is_file():
        return {"format": ADAPTER_FORMAT}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--lora {folder}: no readable {ADAPTER_META} ({e})") from None
    files = {ADAPTER_FORMAT: (ADAPTER_WEIGHTS,), PEFT_ADAPTER_FORMAT: PEFT_ADAPTER_FILES}
    if meta.get("format") not in files:
        raise UserError(f"{path}: unknown adapter format {meta.get('format')!r}")
    for name in files[meta["format"]]:
        if not (folder / name).is_file():
            raise UserError(f"--lora {folder}: {name} is missing")
    return meta


def save_lora_adapter(unet, lora_config, folder: str | Path, meta: dict) -> Path:
    """Write the LoRA weights of ``unet`` (peft layers) in diffusers' LoRA format
    (``save_lora_weights``: ``unet.``-prefixed keys, the ``peft.LoraConfig`` in the file's
    metadata) and ``mvdiff_adapter.json`` (``meta`` + format; ``meta["base_model"]`` names the
    base) into ``folder``, atomically (temporary folder, then rename)."""
    from peft import get_peft_model_state_dict

    from mvdiff.pipelines.pipeline_mvdream import MVDreamPipeline

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = get_peft_model_state_dict(unet)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    config = lora_config.to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}  # JSON
    MVDreamPipeline.save_lora_weights(
        str(tmp), unet_lora_layers=state, unet_lora_adapter_metadata=config,
        weight_name=ADAPTER_WEIGHTS, safe_serialization=True,
    )  # fmt: skip
    record = {"format": ADAPTER_FORMAT, **meta, "num_tensors": len(state)}
    (tmp / ADAPTER_META).write_text(json.dumps(record, indent=1) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def apply_lora_adapter(
    unet, folder: str | Path, merge: bool = True, base_info=None, log=logger.warning
):
    """Add the adapter in ``folder`` to ``unet`` (in place) and, with ``merge``, fuse it into
    the base weights and remove the LoRA layers (a plain UNet, base speed). Returns a record
    for ``info``. A base whose fingerprint differs from the one the adapter was trained on
    is loaded with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--lora {folder}: no such folder")
    meta = read_adapter_meta(folder)
    trained_on = meta.get("base_fingerprint")
    if base_info and trained_on and base_info.get("fingerprint") not in (None, trained_on):
        log(f"warning: {folder} was trained on another version of the base model "
            f"({meta.get('base_model')})")  # fmt: skip
    if meta["format"] == PEFT_ADAPTER_FORMAT:
        _apply_peft_adapter(unet, folder, merge)
    else:
        _apply_diffusers_lora(unet, folder, merge)
    return {"folder": str(folder.resolve()), "fingerprint": fingerprint(folder),
            "merged": merge, "base_model": meta.get("base_model")}  # fmt: skip


def _apply_diffusers_lora(unet, folder: Path, merge: bool) -> None:
    """diffusers' ``load_lora_adapter`` (and ``fuse_lora`` + ``unload_lora``), on weights read
    here with safetensors only (diffusers' reader would fall back to unpickling a ``.bin``)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = folder / ADAPTER_WEIGHTS
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            metadata = json.loads((f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY, "{}"))
    except Exception as e:  # noqa: BLE001 - safetensors / json parse errors: bad input
        text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"--lora {folder}: unreadable adapter ({text})") from None
    prefix = "unet."
    if not state or not all(k.startswith(prefix) for k in state):
        raise UserError(f"--lora {folder}: {ADAPTER_WEIGHTS} has no UNet LoRA weights (unet.*)")
    try:
        unet.load_lora_adapter(state, prefix="unet", metadata=metadata or None)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserError(
            f"--lora {folder}: does not fit this model ({str(e).splitlines()[0][:200]})"
        ) from None
    if merge:
        unet.fuse_lora()
        unet.unload_lora()


def _apply_peft_adapter(unet, folder: Path, merge: bool) -> None:
    """An adapter written by mvdiff before diffusers' format (peft's files)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    try:
        config = LoraConfig.from_pretrained(str(folder))
        state = load_file(str(folder / PEFT_ADAPTER_FILES[1]))
    except Exception as e:  # noqa: BLE001 - safetensors / json / peft parse errors: bad input
        text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"--lora {folder}: unreadable adapter ({text})") from None
    try:
        inject_adapter_in_model(config, unet)
        result = set_peft_model_state_dict(unet, state)
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(
            f"--lora {folder}: does not fit this model ({str(e).splitlines()[0][:200]})"
        ) from None
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise UserError(f"--lora {folder}: weights for no layer of this model: {unexpected[:3]}")
    if merge:
        import torch

        with torch.no_grad():
            for name, module in list(unet.named_modules()):
                if isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer"):
                    module.merge()
                    parent_name, _, child = name.rpartition(".")
                    parent = unet.get_submodule(parent_name) if parent_name else unet
                    setattr(parent, child, module.get_base_layer())
