"""Data loaders: explicit webdataset pipelines from shards to batches, one per data kind.

::

    ShardStream (split by rank + worker, shuffled / resampled)
      -> open_shards -> tar_samples -> shuffle buffer
      -> MultiViewDecoder | ImageTextDecoder -> batch_samples -> DataLoader(batch_size=None)

Every random choice is seeded from ``(seed, kind, rank, worker)``, so a loader yields the
same batches in the same order given the seed, the rank and the number of workers.
A batch is a dict::

    pixels   uint8 [B, V, 3, H, W]       (V = 1 for 2D batches)
    camera   float32 [B, V, 16] | None   (None for 2D batches)
    caption  list[str] (B)
    key      list[str] (B)
    num_views int
    skipped  int  samples skipped (corrupt / incomplete) since the previous batch of that worker
    filtered int  samples filtered out (2D minimum size) since the previous batch

A stream never waits forever on data it cannot use: a reader that goes through all of its
shards (twice, to cover the shuffle across epochs) without one usable sample, or that decodes
a long run of samples without one usable, stops with :class:`DataError` naming the data and
the last problem seen (shards that cannot be opened or are not tar archives, samples that
fail validation, images that do not decode).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import webdataset as wds

from mvdiff.data.image2d import ImageTextDecoder
from mvdiff.data.multiview import MultiViewDecoder
from mvdiff.data.shards import (
    ShardStream,
    expand_urls,
    make_seed,
    open_shards,
    split_samples,
    tar_samples,
    worker_info,
)
from mvdiff.errors import UserError
from mvdiff.shards import CAPTION_SUFFIX

log = logging.getLogger(__name__)

__all__ = [
    "DataConfig",
    "DataError",
    "ShardDataset",
    "batch_samples",
    "build_loader",
    "collate",
]


class DataError(UserError):
    """The training data yields no usable sample; the message names the data and the problem.

    Raised inside a DataLoader worker, it reaches the main process re-raised by torch as
    ``DataError("Caught DataError in DataLoader worker ...\n<traceback>")``: the constructor
    keeps only the original one-line message.
    """

    def __init__(self, message: str = ""):
        marker = "DataError: "
        if message.startswith("Caught DataError") and marker in message:
            message = message.rsplit(marker, 1)[1].strip().splitlines()[0]
        super().__init__(message)


class StreamGuard:
    """Watches one reader's pipeline (one rank x worker) and raises :class:`DataError`
    instead of letting it wait forever on data it cannot use.

    * :meth:`shards` wraps the shard URL stream: when ``2 * pass_len + 1`` shards in a row
      were opened without one sample passing ``check`` (every window of ``2n - 1`` draws
      holds a whole epoch of ``n`` shards, plus one for the sample still being grouped),
      the data is unusable.
    * :meth:`raw` runs the decoder's cheap ``check`` (before the shuffle buffer) and counts.
    * :meth:`decoded` counts decoded samples: ``max_bad`` skipped or filtered samples in a
      row (e.g. every PNG corrupt) also stop the stream.
    """

    def __init__(self, name: str, num_shards: int, resample: bool, check=None,
                 max_bad: int = 1000):  # fmt: skip
        self.name, self.check, self.max_bad = name, check, max_bad
        # resampling draws with replacement: ~10 draws per shard almost surely see them all
        self.pass_len = 10 * num_shards if resample else num_shards
        self.shards_since_good = 0
        self.read = self.usable = 0
        self.problem = "no samples in the shards"
        self.problems = 0

    def note(self, problem: str) -> None:
        self.problem = problem
        self.problems += 1
        if self.problems <= 5:
            log.warning("%s: %s", self.name, problem)

    def handler(self, exn: Exception) -> bool:
        """webdataset-style handler for shards that cannot be opened or read: note, continue."""
        args = [str(a) for a in exn.args]
        text = " ".join(args[:-1] if len(args) > 1 and args[-1] in " ".join(args[:-1]) else args)
        self.note(f"{type(exn).__name__}: {text}" if text else type(exn).__name__)
        return True

    def _fail(self, what: str) -> None:
        raise DataError(
            f"{self.name}: {what}; last problem: {self.problem} "
            f"({self.read} samples read, {self.usable} usable)"
        )

    def shards(self, urls: Iterable[dict]) -> Iterator[dict]:
        for item in urls:
            if self.shards_since_good > 2 * self.pass_len:
                self._fail(
                    f"no usable sample in {self.shards_since_good} shards in a row "
                    f"(every one of this reader's {self.pass_len} shard(s), twice)"
                )
            self.shards_since_good += 1
            yield item

    def raw(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            self.read += 1
            if self.check is not None:
                try:
                    self.check(sample)
                except ValueError as e:  # SampleError: skipped and counted downstream
                    self.note(
                        f"sample {sample.get('__key__', '?')} ({sample.get('__url__', '?')}): {e}"
                    )
                    yield {"__skipped__": True, "__reason__": str(e)}
                    continue
            self.usable += 1
            self.shards_since_good = 0
            yield sample

    def decoded(self, samples: Iterable[dict]) -> Iterator[dict]:
        bad = 0
        for sample in samples:
            if sample.get("__skipped__") or sample.get("__filtered__"):
                bad += 1
                if sample.get("__filtered__"):
                    self.problem = sample.get("__reason__", "sample filtered out")
                elif "__reason__" in sample:
                    self.problem = sample["__reason__"]
                if bad >= self.max_bad:
                    self._fail(f"{bad} samples in a row skipped or filtered out")
            else:
                bad = 0
            yield sample


@dataclass
class DataConfig:
    """Where the data comes from and how it is turned into batches (config key ``data``)."""

    #: multi-view shards (docs/design.md §3): glob, brace pattern, fsspec URL or ``::``-joined list
    mv_shards: str = ""
    #: 2D image-text shards in img2dataset layout; empty = no 2D data
    shards_2d: str = ""
    #: fraction of the *batches* that are 2D (num_views=1, no camera)
    p_2d: float = 0.3
    num_views: int = 4
    resolution: int = 256
    #: ring = views evenly spread over the rendered ring, random start; random = any views
    views: Literal["ring", "random"] = "ring"
    background: Literal["white", "black", "random_grey"] = "white"
    caption_suffix: str = CAPTION_SUFFIX
    #: 2D images whose shorter side is smaller are dropped
    min_size_2d: int = 256
    crop_2d: Literal["center", "random"] = "center"
    #: objects per multi-view batch (each has num_views images)
    batch_size: int = 1
    #: images per 2D batch; 0 = batch_size * num_views (the same number of images)
    batch_size_2d: int = 0
    shuffle_buffer: int = 500
    #: draw shards with replacement forever (large data) instead of epoch-wise splitting
    resample: bool = False
    num_workers: int = 2
    prefetch_factor: int = 2
    #: how to get the data, appended to the error when mv_shards / shards_2d name nothing
    #: there (e.g. the command that writes it: train/configs/tiny_cpu.yaml)
    missing_hint: str = ""

    LIMITS: ClassVar[dict] = {"p_2d": "[0,1]", "num_views": ">=1", "resolution": "%8",
                              "min_size_2d": ">=0", "batch_size": ">=1", "batch_size_2d": ">=0",
                              "shuffle_buffer": ">=0", "num_workers": ">=0",
                              "prefetch_factor": ">=1"}  # fmt: skip

    def images_per_2d_batch(self) -> int:
        return self.batch_size_2d or self.batch_size * self.num_views


def collate(samples: list[dict]) -> dict:
    """Stack decoded samples into a batch (all with the same number of views)."""
    cameras = [s["camera"] for s in samples]
    # np.stack: torch.stack of small uint8 tensors pays thread start-up costs on busy CPUs
    pixels = np.stack([np.asarray(s["pixels"]) for s in samples])  # B x (V,3,H,W) -> (B,V,3,H,W)
    return {
        "pixels": torch.from_numpy(pixels),
        "camera": None if cameras[0] is None else torch.stack(cameras),  # -> (B, V, 16)
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "num_views": int(samples[0]["pixels"].shape[0]),
    }


def batch_samples(data: Iterable[dict], batch_size: int, drop_last: bool = True) -> Iterator[dict]:
    """Group decoded samples into batches, counting the skip / filter markers between them."""
    buf: list[dict] = []
    skipped = filtered = 0
    pending = None  # held back one batch so that trailing skip counts are not lost
    for sample in data:
        if sample.get("__skipped__"):
            skipped += 1
            continue
        if sample.get("__filtered__"):
            filtered += 1
            continue
        buf.append(sample)
        if len(buf) == batch_size:
            if pending is not None:
                yield pending
            pending = {**collate(buf), "skipped": skipped, "filtered": filtered}
            buf, skipped, filtered = [], 0, 0
    if buf and not drop_last:
        if pending is not None:
            yield pending
        pending = {**collate(buf), "skipped": 0, "filtered": 0}
    if pending is not None:
        pending["skipped"] += skipped
        pending["filtered"] += filtered
        yield pending


class ShardDataset(torch.utils.data.IterableDataset):
    """The whole pipeline for one data kind (``"mv"`` or ``"2d"``) as an IterableDataset."""

    def __init__(
        self,
        kind: str,
        urls: list[str],
        decoder,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        resample: bool = False,
        epochs: int | None = None,
        shuffle_buffer: int = 500,
        drop_last: bool = True,
        name: str = "",
    ):
        super().__init__()
        self.name = name or f"{kind} shards"
        self.kind, self.urls, self.decoder = kind, urls, decoder
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.resample, self.epochs = resample, epochs
        self.shuffle_buffer, self.drop_last = shuffle_buffer, drop_last

    def __iter__(self) -> Iterator[dict]:
        worker, _ = worker_info()
        shards = ShardStream(
            self.urls,
            seed=make_seed(self.kind, self.seed),
            rank=self.rank,
            world_size=self.world_size,
            resample=self.resample,
            epochs=self.epochs,
        )
        index, count = shards.split_size()
        mine = (
            len(self.urls)
            if shards.samples_split or self.resample
            else len(self.urls[index::count])
        )
        guard = StreamGuard(
            self.name,
            mine,
            self.resample,
            check=getattr(self.decoder, "check", None),
            max_bad=max(1000, 2 * self.shuffle_buffer),
        )
        stream = open_shards(guard.shards(iter(shards)), handler=guard.handler)
        stream = tar_samples(stream, handler=guard.handler)
        stream = split_samples(stream, shards.samples_split)
        stream = guard.raw(stream)
        if self.shuffle_buffer > 1:
            shuffle = wds.shuffle(
                bufsize=self.shuffle_buffer,
                initial=min(100, self.shuffle_buffer),
                seed=make_seed("shuffle", self.kind, self.seed, self.rank, worker),
            )
            stream = shuffle(stream)
        stream = self.decoder(
            stream, stream_seed=make_seed("decode", self.kind, self.seed, self.rank, worker)
        )
        stream = guard.decoded(stream)
        yield from batch_samples(stream, self.batch_size, drop_last=self.drop_last)


def build_loader(
    cfg: DataConfig,
    kind: Literal["mv", "2d"],
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    epochs: int | None = None,
    num_workers: int | None = None,
    drop_last: bool = True,
    pin_memory: bool | None = None,
    extra_views: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader of batches of one kind from ``cfg`` (``epochs=None``: endless).
    ``pin_memory`` (default: when CUDA is available) puts batches in page-locked memory, so
    the copy to the GPU is a fast DMA. ``extra_views``: multi-view samples get that many more
    views after the ``num_views`` (:class:`MultiViewDecoder`)."""
    if kind == "mv":
        name = f"data.mv_shards={cfg.mv_shards}"
        urls = expand_urls(cfg.mv_shards, "data.mv_shards")
        decoder = MultiViewDecoder(
            num_views=cfg.num_views,
            resolution=cfg.resolution,
            views=cfg.views,
            background=cfg.background,
            caption_suffix=cfg.caption_suffix,
            extra_views=extra_views,
        )
        batch_size = cfg.batch_size
    elif kind == "2d":
        name = f"data.shards_2d={cfg.shards_2d}"
        urls = expand_urls(cfg.shards_2d, "data.shards_2d")
        decoder = ImageTextDecoder(
            resolution=cfg.resolution, min_size=cfg.min_size_2d, crop=cfg.crop_2d
        )
        batch_size = cfg.images_per_2d_batch()
    else:
        raise ValueError(f"kind must be 'mv' or '2d', got {kind!r}")
    dataset = ShardDataset(
        kind,
        urls,
        decoder,
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        resample=cfg.resample,
        epochs=epochs,
        shuffle_buffer=cfg.shuffle_buffer,
        drop_last=drop_last,
        name=name,
    )
    workers = cfg.num_workers if num_workers is None else num_workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )


def config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(DataConfig)]
