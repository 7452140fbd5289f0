"""Files that are never seen half-written: write under a temporary name in the same folder,
then rename onto the final name (atomic on POSIX); on error the temporary file is removed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "save_image", "write_json", "write_text"]

_IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "gif": "GIF", "webp": "WEBP"}


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)``, then rename ``tmp_path`` onto ``path`` (parents are made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent) + "\n")


def save_image(path: str | Path, image, **save_kwargs) -> Path:
    """Save a PIL image; the format comes from the file name's suffix."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in _IMAGE_FORMATS:
        raise ValueError(f"{path}: image format must be one of {sorted(_IMAGE_FORMATS)}")
    return atomic_write(path, lambda p: image.save(p, format=_IMAGE_FORMATS[suffix], **save_kwargs))
