"""The evaluation report: ``results.json``, one PNG strip per sample (generated views, the
reconstruction's renders at the same cameras, ground truth when given) and ``report.html``
(plus ``report.png``: every strip stacked). Files are written atomically (:mod:`mvdiff.io`)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import torch

from mvdiff.io import save_image, write_text

__all__ = ["json_safe", "strip_image", "write_json", "write_report"]

TILE = 128  # pixels per view in the strips (nearest-neighbour upscaling of small views)


def json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(json_safe(data), indent=1, allow_nan=False) + "\n")


def _tiles(images: torch.Tensor, tile: int) -> np.ndarray:
    """``[V, 3, H, W]`` in [0, 1] -> uint8 ``[tile, V*tile, 3]`` (views side by side)."""
    import torch.nn.functional as F

    x = F.interpolate(images.float().clamp(0, 1), size=(tile, tile), mode="nearest")
    x = (x * 255).round().to(torch.uint8)
    x = x.permute(2, 0, 3, 1)  # (V, 3, T, T) -> (T, V, T, 3)
    return x.reshape(tile, -1, 3).numpy()  # (T, V, T, 3) -> (T, V*T, 3)


def strip_image(rows: list[tuple[str, torch.Tensor]], tile: int = TILE):
    """A PIL image: one labelled row per ``(label, images [V, 3, H, W])``."""
    from PIL import Image, ImageDraw

    label_w = 110
    width = label_w + max(r[1].shape[0] for r in rows) * tile
    im = Image.new("RGB", (width, tile * len(rows)), "white")
    draw = ImageDraw.Draw(im)
    for i, (label, images) in enumerate(rows):
        im.paste(Image.fromarray(_tiles(images, tile)), (label_w, i * tile))
        draw.text((6, i * tile + tile // 2 - 6), label, fill="black")
    return im


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else str(x)
    return html.escape(str(x))


def write_report(out: Path, results: dict, strips: dict[str, list]) -> dict:
    """Write results.json, strips/NAME.png, report.png and report.html into ``out``.

    ``strips`` maps a sample name to its rows (see :func:`strip_image`). Returns the paths.
    """
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": str(out / "results.json"), "html": str(out / "report.html")}
    images = {}
    for name, rows in strips.items():
        im = strip_image(rows)
        p = out / "strips" / f"{name}.png"
        save_image(p, im)
        images[name] = im
    if images:
        ims = list(images.values())[:32]
        sheet = Image.new("RGB", (max(i.width for i in ims), sum(i.height for i in ims)), "white")
        y = 0
        for i in ims:
            sheet.paste(i, (0, y))
            y += i.height
        save_image(out / "report.png", sheet)
        paths["png"] = str(out / "report.png")
    write_json(out / "results.json", results)

    s = results.get("summary", {})
    summary_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_fmt(v, 4)}</td></tr>" for k, v in s.items()
    )
    body = []
    for rec in results.get("samples", []):
        cons, gt, clip = rec.get("consistency") or {}, rec.get("gt") or {}, rec.get("clip_score")
        cells = [
            f"consistency PSNR {_fmt(cons.get('psnr'))} dB",
            f"held-out PSNR {_fmt(cons.get('psnr_holdout'))} dB",
            f"held-out silhouette IoU {_fmt(cons.get('iou_holdout'), 3)}",
        ]
        if gt:
            of = gt.get("candidates", 1)
            closest = f" (closest of {of}: {html.escape(str(gt.get('uid')))})" if of > 1 else ""
            cells.append(
                f"GT PSNR {_fmt(gt.get('psnr'))} dB, SSIM {_fmt(gt.get('ssim'), 3)}{closest}"
            )
        if clip is not None:
            cells.append(f"CLIP score {_fmt(clip.get('mean'))}")
        name = rec["name"]
        img = f'<img class="px" src="strips/{html.escape(name)}.png" alt="{html.escape(name)}">'
        body.append(
            f"<h3>{html.escape(name)} — “{html.escape(rec.get('prompt', ''))}”</h3>"
            f"<p>{' · '.join(cells)}</p>{img if name in images else ''}"
        )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mvdiff eval</title>
<style>body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; }}
img.px {{ image-rendering: pixelated; max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; }} td {{ border: 1px solid #ccc; padding: 3px 8px; }}</style>
</head><body>
<h1>mvdiff eval</h1>
<p>Rows of each strip: the generated views; the renders of one radiance field fitted to
them at their cameras (reconstruction consistency); the ground truth at the same cameras when
given. Full numbers: <a href="results.json">results.json</a>.</p>
<h2>Summary</h2><table>{summary_rows}</table>
<h2>Samples</h2>
{"".join(body)}
</body></html>
"""
    write_text(out / "report.html", page)
    return paths
