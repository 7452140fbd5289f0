"""Data: the multi-view shard schema (docs/design.md §3), 2D img2dataset shards, readers and the mixer.

Readers are explicit ``webdataset`` pipelines (:mod:`mvdiff.data.loader`); the mixer
(:class:`BatchMixer`) makes a fraction ``p_2d`` of the batches 2D.
"""

from mvdiff.data.image2d import ImageTextDecoder
from mvdiff.data.loader import DataConfig, ShardDataset, batch_samples, build_loader, collate
from mvdiff.data.mixer import BatchMixer
from mvdiff.data.multiview import MultiViewDecoder, SampleError, composite, ring_views
from mvdiff.data.shards import ShardStream, expand_urls, make_seed, write_multiview_sample

__all__ = [
    "BatchMixer",
    "DataConfig",
    "ImageTextDecoder",
    "MultiViewDecoder",
    "SampleError",
    "ShardDataset",
    "ShardStream",
    "batch_samples",
    "build_loader",
    "collate",
    "composite",
    "expand_urls",
    "make_seed",
    "ring_views",
    "write_multiview_sample",
]
