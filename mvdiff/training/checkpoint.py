"""Training checkpoints: ``output_dir/checkpoints/step-0000100/``, keep the last N.

A checkpoint holds only tensors and JSON, so that resuming never runs code from a file:

* ``model.safetensors``     the trainable UNet (LoRA included), unwrapped
* ``optimizer.pt``          ``optimizer.state_dict()``, read back with ``torch.load(weights_only=True)``
* ``ema.safetensors``       the EMA shadow weights (+ its counters as JSON metadata), if EMA is on;
  under FSDP / ZeRO-3 ``ema_rank<r>.safetensors``, each rank's EMA of its own shard
* ``rng_state_<rank>.json`` Python / numpy / torch random states of each process
* ``trainer_state.json``    step, run bookkeeping, the fp16 loss-scaler state and the size of
  every file above (a truncated file is detected before anything is loaded); written last

accelerate's ``save_state`` / ``load_state`` are not used for this (they unpickle registered
objects and RNG files); only DeepSpeed / FSDP / Megatron runs, whose sharded states those
engines own, go through them.

A checkpoint is written into ``tmp-step-…`` and renamed when complete, so a run killed while
saving never leaves a half checkpoint that ``--resume latest`` would pick up; a failed write
(disk full) removes the partial folder and keeps the older checkpoints. ``--resume latest``
skips checkpoints that cannot be read, saying which, and resumes from the newest intact one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from mvdiff.errors import UserError
from mvdiff.training.sharded import is_sharded

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "find_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_trainer_state",
    "resume_checkpoint",
    "save_checkpoint",
]

_NAME = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
EMA_FILE = "ema.safetensors"
FORMAT = "mvdiff-checkpoint-1"


class CheckpointError(UserError):
    """A checkpoint that cannot be read or written; the message names the folder and file."""


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def find_checkpoint(resume: str, output_dir: str | Path) -> Path | None:
    """``""`` -> None; ``"latest"`` -> newest checkpoint or None; a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE})")
    return path


def read_trainer_state(path: str | Path) -> dict:
    try:
        state = json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/{STATE_FILE}: unreadable ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}/{STATE_FILE}: no step count")
    return state


def _sharded_engine(accelerator) -> bool:
    """DeepSpeed / FSDP / Megatron own their (sharded) model and optimizer states."""
    kind = str(getattr(accelerator, "distributed_type", "")).upper()
    return any(name in kind for name in ("DEEPSPEED", "FSDP", "MEGATRON"))


# ---- random states as JSON -------------------------------------------------------------------


def _rng_state() -> dict:
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [name, np_keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((int(version), tuple(int(k) for k in keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(name), np.asarray(np_keys, dtype=np.uint32), int(pos),
                         int(has_gauss), float(cached)))  # fmt: skip
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---- save -------------------------------------------------------------------------------------


def _write_own(accelerator, folder: Path, model, optimizer, ema) -> None:
    """This process's share of a checkpoint (main: weights, optimizer, EMA; all: RNG)."""
    from safetensors.torch import save_file, save_model

    if _sharded_engine(accelerator):
        accelerator.save_state(str(folder))
    elif accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(folder / MODEL_FILE))
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    if ema is not None and (accelerator.is_main_process or is_sharded(accelerator)):
        ema_state = ema.state_dict()
        shadow = ema_state.pop("shadow_params")
        # one tensor per trainable parameter, in parameter order (this rank's shard: FSDP2)
        tensors = {f"shadow.{i:05d}": _local(p).detach().contiguous().cpu()
                   for i, p in enumerate(shadow)}  # fmt: skip
        save_file(tensors, str(folder / _ema_file(accelerator)),
                  metadata={"ema": json.dumps(ema_state)})  # fmt: skip
    rank = accelerator.process_index
    (folder / f"rng_state_{rank}.json").write_text(json.dumps(_rng_state()))


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    state: dict,
    keep: int,
    model=None,
    optimizer=None,
    ema=None,
) -> Path:
    """Save weights / optimizer / EMA / RNG + ``state``; call on every process.

    A failed write (disk full, quota, permissions) removes the partial ``tmp-step-…`` folder,
    keeps every older checkpoint and raises :class:`CheckpointError` (one line) on all ranks.
    """
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f"tmp-step-{step:07d}"
    error = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        error = e
    accelerator.wait_for_everyone()
    if error is None and tmp.is_dir():
        from safetensors import SafetensorError

        try:
            _write_own(accelerator, tmp, model, optimizer, ema)
        # disk full (ENOSPC), file too large (EFBIG), quota, permissions; safetensors and
        # torch.save report the same failures as their own errors
        except (OSError, RuntimeError, SafetensorError) as e:
            error = e
    if not _all_ok(accelerator, error is None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        good = list_checkpoints(output_dir)
        reason = _reason(error) if error is not None else "failed on another rank"
        raise CheckpointError(
            f"could not write checkpoint {final} ({reason}); removed the partial folder, "
            f"the last good checkpoint is {good[-1] if good else 'none'}"
        )
    if accelerator.is_main_process:
        try:
            if accelerator.scaler is not None:  # fp16 loss scale: plain numbers
                (tmp / "scaler.json").write_text(json.dumps(accelerator.scaler.state_dict()))
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            record = {**state, "step": step, "format": FORMAT, "files": files}
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            error = e
            shutil.rmtree(tmp, ignore_errors=True)
    if not _all_ok(accelerator, error is None):
        good = list_checkpoints(output_dir)
        reason = _reason(error) if error is not None else "failed on rank 0"
        raise CheckpointError(
            f"could not write checkpoint {final} ({reason}); removed the partial folder, "
            f"the last good checkpoint is {good[-1] if good else 'none'}"
        )
    if accelerator.is_main_process:
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip().splitlines()
    return text[-1][:200] if text else type(error).__name__


def _all_ok(accelerator, ok: bool) -> bool:
    """Whether every rank succeeded (a collective: call on every process)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes


def _ema_file(accelerator) -> str:
    """Sharded engines: every rank keeps the EMA of its own shard."""
    if is_sharded(accelerator):
        return f"ema_rank{accelerator.process_index}.safetensors"
    return EMA_FILE


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of an FSDP2 ``DTensor``; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _like(loaded: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``loaded`` (this rank's part) placed like ``current`` (device, dtype, sharding)."""
    local = loaded.to(device=_local(current).device, dtype=current.dtype)
    if not hasattr(current, "to_local"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, current.device_mesh, current.placements, run_check=False,
                              shape=current.shape, stride=current.stride())  # fmt: skip


# ---- load -------------------------------------------------------------------------------------


def _read(path: Path, what: str):
    """Read one file of a checkpoint as tensors / JSON only; anything else -> CheckpointError."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            return load_file(str(path)), meta
        if path.suffix == ".json":
            return json.loads(path.read_text())
        # optimizer.pt (and legacy accelerate .bin / .pkl): tensors and plain containers only
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and zip raise many kinds
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: not readable as tensors ({what}; {type(e).__name__}: {text[:200]})"
        ) from None


def load_checkpoint(accelerator, path: str | Path, model, optimizer, ema=None) -> dict:
    """Restore weights / optimizer / EMA / RNG from ``path``; returns ``trainer_state.json``.

    Everything is read and checked before anything is applied; nothing is unpickled beyond
    tensors and plain containers. A damaged or foreign file raises :class:`CheckpointError`.
    """
    path = Path(path)
    state = read_trainer_state(path)
    legacy = state.get("format") != FORMAT  # written by accelerate's save_state (mvdiff < 0.x)
    for name, size in (state.get("files") or {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(
                f"{f}: {'missing' if not f.is_file() else 'truncated or changed'} "
                f"(trainer_state.json records {size} bytes)"
            )
    if _sharded_engine(accelerator):
        accelerator.load_state(str(path))
    else:
        weights, _ = _read(path / MODEL_FILE, "model weights")
        opt_file = path / ("optimizer.bin" if legacy else OPTIMIZER_FILE)
        opt_state = _read(opt_file, "optimizer state")
        if not isinstance(opt_state, dict) or "state" not in opt_state:
            raise CheckpointError(f"{opt_file}: not an optimizer state")
    ema_state = None
    if ema is not None:
        if legacy:
            ema_state = _read(path / "custom_checkpoint_0.pkl", "EMA state")
        else:
            tensors, meta = _read(path / _ema_file(accelerator), "EMA weights")
            try:
                ema_state = json.loads(meta.get("ema", ""))
            except ValueError:
                raise CheckpointError(f"{path / EMA_FILE}: no EMA metadata") from None
            ema_state["shadow_params"] = [tensors[k] for k in sorted(tensors)]
        shadow = ema_state.get("shadow_params") if isinstance(ema_state, dict) else None
        if not isinstance(shadow, list) or [tuple(t.shape) for t in shadow] != [
            tuple(_local(t).shape) for t in ema.shadow_params
        ]:
            raise CheckpointError(f"{path}: the EMA state does not match this model")
        # on the device and in the dtype (and sharding) of the live EMA weights
        ema_state["shadow_params"] = [
            _like(t, cur) for t, cur in zip(shadow, ema.shadow_params, strict=True)
        ]
    rng = None
    rng_file = path / f"rng_state_{accelerator.process_index}.json"
    if not legacy and rng_file.is_file():
        rng = _read(rng_file, "random state")
    scaler = None
    if accelerator.scaler is not None and (path / "scaler.json").is_file():
        scaler = _read(path / "scaler.json", "loss scaler")
    try:
        if not _sharded_engine(accelerator):
            missing, unexpected = _load_weights(accelerator.unwrap_model(model), weights)
            if missing or unexpected:
                raise ValueError(f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
            optimizer.load_state_dict(opt_state)
        if ema_state is not None:
            ema.load_state_dict(ema_state)
        if rng is not None:
            _set_rng_state(rng)
        if scaler is not None:
            accelerator.scaler.load_state_dict(scaler)
    except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: does not match this model/run ({text[:200]})") from None
    return state


def _load_weights(model: torch.nn.Module, weights: dict) -> tuple[list, list]:
    """``load_state_dict`` that tolerates tensors shared under several names (as saved by
    ``safetensors.torch.save_model``)."""
    result = model.load_state_dict(weights, strict=False)
    own = model.state_dict()
    # a name dropped by save_model because it shares storage with a saved one is fine
    missing = [k for k in result.missing_keys if not any(
        own[k].data_ptr() == own[j].data_ptr() for j in weights if j in own
    )]  # fmt: skip
    return missing, list(result.unexpected_keys)


def resume_checkpoint(accelerator, resume: str, output_dir: str | Path, model, optimizer,
                      ema=None) -> tuple[Path | None, dict]:  # fmt: skip
    """Resume as ``checkpoint.resume`` says: ``""`` -> nothing; a path -> that checkpoint or
    :class:`CheckpointError`; ``"latest"`` -> the newest checkpoint that loads, warning about
    each newer one that does not; :class:`CheckpointError` if there are some and none loads."""
    if not resume:
        return None, {}
    if resume != "latest":
        path = find_checkpoint(resume, output_dir)
        return path, load_checkpoint(accelerator, path, model, optimizer, ema)
    candidates = list_checkpoints(output_dir)[::-1]
    first_error = None
    for path in candidates:
        try:
            state = load_checkpoint(accelerator, path, model, optimizer, ema)
        except CheckpointError as e:
            first_error = first_error or e
            log.warning("--resume latest: skipping checkpoint %s: %s", path.name, e)
            continue
        if first_error is not None:
            log.warning("--resume latest: resuming from %s, the newest intact checkpoint", path)
        return path, state
    if first_error is not None:
        raise CheckpointError(
            f"--resume latest: none of the {len(candidates)} checkpoint(s) in "
            f"{Path(output_dir) / 'checkpoints'} can be read; newest: {first_error}"
        )
    return None, {}
