"""Atomic accelerate checkpoints: ``output_dir/checkpoints/step-0000100/``, keep the last N.

A checkpoint is written by ``accelerator.save_state`` into ``tmp-step-…`` and renamed when
complete, so a run killed while saving never leaves a half checkpoint that ``--resume latest``
would pick up. ``trainer_state.json`` inside holds the step and run bookkeeping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from mvdiff.errors import UserError

__all__ = ["find_checkpoint", "list_checkpoints", "save_checkpoint", "read_trainer_state"]

_NAME = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


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
    return json.loads((Path(path) / STATE_FILE).read_text())


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, keep: int) -> Path:
    """Save model/optimizer/RNG/registered objects + ``state``; call on every process."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f"tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
