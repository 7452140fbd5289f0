"""Synthetic shards in the real formats, for tests, benchmarks and the quickstart.

:func:`write_synthetic_mv_shards` writes objects in the multi-view schema (docs/design.md §3): a
coloured ellipse per object seen from a ring of cameras (MVDream rig), whose position in the
image follows the azimuth. :func:`write_synthetic_2d_shards` writes img2dataset-layout shards
(``KEY.jpg|png`` + ``KEY.txt`` + ``KEY.json``). Shards are written to a temporary name and
renamed when closed, like the real writers.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from mvdiff.cameras import sample_mvdream_render_rig
from mvdiff.shards import MultiViewSample, write_tar

__all__ = ["synthetic_object", "write_synthetic_2d_shards", "write_synthetic_mv_shards"]

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink"]
_RGB = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (140, 40, 200),
    "orange": (250, 140, 20),
    "cyan": (30, 210, 220),
    "pink": (250, 120, 180),
}


def synthetic_object(
    rng: np.random.Generator, num_views: int = 32, resolution: int = 256, textured: bool = False
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(rgba uint8 [V, H, W, 4], c2w float32 [V, 4, 4], meta) of one synthetic object.

    ``textured`` adds per-pixel noise so that PNGs compress (and decode) like real renders.
    """
    rig = sample_mvdream_render_rig(rng, num_views=num_views)
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    rgb = np.array(_RGB[colour], dtype=np.uint8)
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float32) / resolution - 0.5
    rx, ry = rng.uniform(0.15, 0.3), rng.uniform(0.15, 0.3)
    rgba = np.zeros((num_views, resolution, resolution, 4), np.uint8)
    for v, az in enumerate(rig["azimuth_deg"]):
        cx = 0.2 * np.sin(np.radians(az))
        inside = ((xx - cx) / rx) ** 2 + (yy / ry) ** 2 <= 1.0
        shade = (0.6 + 0.4 * np.cos(np.radians(az))) * rgb
        if textured:
            noise = rng.integers(-24, 25, (int(inside.sum()), 3))
            rgba[v][inside, :3] = np.clip(shade + noise, 0, 255).astype(np.uint8)
        else:
            rgba[v][inside, :3] = shade.astype(np.uint8)
        rgba[v][inside, 3] = 255
    meta = {
        "caption": f"a {colour} ball",
        "source": "synthetic",
        "license": "CC0-1.0",
        "engine": "synthetic",
        "samples": 0,
        "fov_deg": rig["fov_deg"],
        "elevation_deg": rig["elevation_deg"],
        "azimuth_deg": rig["azimuth_deg"],
        "distance": rig["distance"],
        "normalization": {"scale": 1.0, "offset": [0.0, 0.0, 0.0]},
    }
    return rgba, rig["c2w"].astype(np.float32), meta


def write_synthetic_mv_shards(
    out_dir: str | Path,
    num_shards: int = 2,
    objects_per_shard: int = 4,
    num_views: int = 32,
    resolution: int = 256,
    seed: int = 0,
    prefix: str = "mv",
    textured: bool = False,
) -> list[str]:
    """Write ``num_shards`` multi-view shards; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(num_shards):
        samples = []
        for i in range(objects_per_shard):
            rgba, c2w, meta = synthetic_object(rng, num_views, resolution, textured)
            uid = f"obj{s:04d}x{i:04d}"
            samples.append((uid, MultiViewSample.from_arrays(uid, rgba, c2w, meta).members()))
        paths.append(write_tar(out_dir / f"{prefix}-{s:06d}.tar", samples))
    return paths


def write_synthetic_2d_shards(
    out_dir: str | Path,
    num_shards: int = 1,
    images_per_shard: int = 8,
    size: tuple[int, int] = (320, 256),
    seed: int = 0,
    fmt: str = "jpg",
    prefix: str = "",
) -> list[str]:
    """Write img2dataset-layout shards (``{prefix}00000.tar`` …); returns their paths."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(num_shards):
        samples = []
        for i in range(images_per_shard):
            key = f"{s:05d}{i:04d}"
            colour = COLOURS[int(rng.integers(len(COLOURS)))]
            w, h = size
            img = np.full((h, w, 3), 255, np.uint8)
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            img[y0 : y0 + h // 3, x0 : x0 + w // 3] = _RGB[colour]
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG" if fmt == "jpg" else fmt.upper())
            members = {
                fmt: buf.getvalue(),
                "txt": f"a {colour} square".encode(),
                "json": json.dumps({"key": key, "width": w, "height": h}).encode(),
            }
            samples.append((key, members))
        paths.append(write_tar(out_dir / f"{prefix}{s:05d}.tar", samples))
    return paths
