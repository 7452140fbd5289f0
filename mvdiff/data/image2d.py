"""2D image-text shards in img2dataset layout -> single-view training samples.

A sample ``KEY.jpg|png|webp`` + ``KEY.txt`` (+ optional ``KEY.json``) becomes::

    {"key", "pixels": uint8 [1, 3, H, W], "camera": None, "caption": str}

Images whose shorter side is below ``min_size`` are filtered out (counted, not decoded),
then a centre or random square crop is resized to the training resolution. Transparent
images are composited on white. Corrupt images are skipped and counted.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from mvdiff.data.multiview import SampleError, SkipCounter

__all__ = ["ImageTextDecoder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ImageTextDecoder:
    """Decode img2dataset samples (a webdataset pipeline stage); ``crop``: center | random."""

    def __init__(
        self,
        resolution: int = 256,
        min_size: int = 0,
        crop: str = "center",
        caption_suffix: str = "",
        seed: int = 0,
    ):
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        self.resolution, self.min_size, self.crop = resolution, min_size, crop
        self.caption_suffix = caption_suffix
        self.seed = seed
        self.skipped = SkipCounter()
        self.filtered = 0

    def decode(self, raw: dict, rng: random.Random) -> dict | None:
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            raise SampleError("no image member (jpg/png/webp)")
        try:
            im = Image.open(io.BytesIO(raw[ext]))
            width, height = im.size  # header only: cheap size filter before decoding
        except Exception as e:  # noqa: BLE001
            raise SampleError(f"corrupt .{ext} ({type(e).__name__}: {e})") from None
        if min(width, height) < self.min_size:
            return None
        try:
            im.load()
            if im.mode in ("RGBA", "LA", "P") and (im.mode != "P" or "transparency" in im.info):
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            im = im.convert("RGB")
        except Exception as e:  # noqa: BLE001
            raise SampleError(f"corrupt .{ext} ({type(e).__name__}: {e})") from None
        side = min(width, height)
        if self.crop == "center":
            left, top = (width - side) // 2, (height - side) // 2
        else:
            left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        im = im.resize(
            (self.resolution, self.resolution),
            Image.Resampling.BICUBIC,
            box=(left, top, left + side, top + side),
            reducing_gap=None if side <= 2 * self.resolution else 2.0,
        )
        pixels = np.asarray(im).transpose(2, 0, 1)[None]  # (H, W, 3) -> (1, 3, H, W)
        caption = raw.get("txt", b"")
        caption = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else caption
        return {
            "key": raw.get("__key__", "?"),
            "pixels": torch.from_numpy(np.ascontiguousarray(pixels)),
            "camera": None,
            "caption": caption.strip() + self.caption_suffix,
        }

    def __call__(self, data: Iterable[dict], stream_seed: int | None = None) -> Iterator[dict]:
        rng = random.Random(self.seed if stream_seed is None else stream_seed)
        for raw in data:
            try:
                sample = self.decode(raw, rng)
            except SampleError as e:
                self.skipped.add(f"{raw.get('__key__', '?')} ({raw.get('__url__', '?')})", str(e))
                yield {"__skipped__": True, "__reason__": str(e)}
                continue
            if sample is None:
                self.filtered += 1
                yield {"__filtered__": True,
                       "__reason__": f"image smaller than data.min_size_2d={self.min_size}"}  # fmt: skip
                continue
            yield sample
