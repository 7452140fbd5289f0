"""Shard lists and shard streams: globs, brace patterns and fsspec URLs -> tar member dicts.

Everything here is an explicit ``webdataset`` pipeline stage (a generator over dicts), seeded
from ``(seed, rank, worker, epoch)`` so that a stream is reproducible given the seed and the
rank, which is what exact resume needs.

* :func:`expand_urls` turns ``"shards/mv-{000..009}.tar"``, ``"shards/*.tar"``,
  ``"s3://bucket/mv-*.tar"`` or a list / ``::``-separated string of those into URLs.
* :class:`ShardStream` yields ``{"url": ...}`` dicts: split by node (rank) and DataLoader worker,
  shuffled per epoch, finite or endless; or resampled with replacement (endless).
* :func:`open_shards` opens each URL (local path, ``pipe:`` command or any fsspec URL).
* :func:`tar_samples` groups tar members into samples ``{"__key__", "__url__", ext: bytes}``.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import random
import tarfile
from collections.abc import Iterable, Iterator

import numpy as np
import webdataset as wds
from braceexpand import braceexpand

from mvdiff.errors import UserError
from mvdiff.shards import MultiViewSample, iter_tar_members, split_member_name, write_members

__all__ = [
    "ShardStream",
    "expand_urls",
    "iter_tar_members",
    "make_seed",
    "open_shards",
    "tar_samples",
    "worker_info",
    "write_multiview_sample",
]


def make_seed(*parts) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python runs)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def expand_urls(spec: str | Iterable[str], what: str = "shards") -> list[str]:
    """Shard URLs from globs, brace patterns, fsspec URLs, lists or ``::``-separated strings.

    Local patterns that match nothing are an error naming the pattern (``what`` names the
    config key in the message).
    """
    items = spec.split("::") if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        if item.startswith("pipe:"):
            urls.extend(braceexpand(item))
            continue
        remote = []  # this item's remote URLs without wildcards: checked below, all at once
        for pattern in braceexpand(item):
            if _is_remote(pattern) or pattern.startswith("file://"):
                if any(c in pattern for c in "*?["):
                    fs, path = _url_to_fs(pattern, what)
                    try:
                        matched = sorted(fs.glob(path))
                    except Exception as e:  # noqa: BLE001 - no server, no access, ...
                        raise UserError(
                            f"{what}: cannot list {pattern!r} ({_one_line(e)})"
                        ) from None
                    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
                    matched = [p if "://" in p else f"{protocol}://{p}" for p in matched]
                    if not matched:
                        raise UserError(f"{what}: {pattern!r} matches no files")
                    urls.extend(matched)
                else:
                    remote.append(pattern)
                    urls.append(pattern)
            elif any(c in pattern for c in "*?["):
                matched = sorted(glob.glob(os.path.expanduser(pattern)))
                if not matched:
                    raise UserError(f"{what}: {pattern!r} matches no files")
                urls.extend(matched)
            else:
                path = os.path.expanduser(pattern)
                if not os.path.exists(path):
                    raise UserError(f"{what}: {pattern!r} does not exist")
                urls.append(path)
        _check_remote(remote, item, what)
    if not urls:
        raise UserError(f"{what}: no shards given")
    return urls


def _one_line(e: Exception) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def _url_to_fs(url: str, what: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs: pip install 'mvdiff[cloud]'
        raise UserError(f"{what}: {url!r}: {_one_line(e)}") from None


def _check_remote(urls: list[str], pattern: str, what: str) -> None:
    """Every URL of a remote brace pattern exists: one listing per folder, so that a pattern
    that matches nothing, a wrong bucket or an unreachable endpoint is a one-line error now
    instead of a stream of failed opens. HTTP(S) URLs cannot be listed and are not checked,
    nor are ``file://`` ones (they fail at once when opened)."""
    folders: dict[str, set[str]] = {}
    checked, missing = 0, []
    for url in urls:
        fs, path = _url_to_fs(url, what)
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        if {"http", "https", "file", "local"} & set(protocols):
            continue  # not listable / opened (and failing) fast by the loader
        parent, _, name = path.rstrip("/").rpartition("/")
        if parent not in folders:
            try:
                names = fs.ls(parent, detail=False)
                folders[parent] = {p.rstrip("/").rpartition("/")[2] for p in names}
            except FileNotFoundError:
                folders[parent] = set()
            except Exception as e:  # noqa: BLE001 - no server, no access, no such bucket, ...
                raise UserError(f"{what}: cannot read {url!r} ({_one_line(e)})") from None
        checked += 1
        if name not in folders[parent]:
            missing.append(url)
    if missing and len(missing) == checked:
        raise UserError(f"{what}: {pattern!r} matches no files")
    if missing:
        raise UserError(f"{what}: {missing[0]!r} does not exist ({len(missing)} missing)")


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker, (0, 1) outside one."""
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardStream:
    """Shard URLs for this rank and worker, as ``{"url": url}`` dicts.

    ``resample=False``: each epoch shuffles the list (same order on every rank), takes every
    ``world_size``-th shard for this rank and every ``num_workers``-th of those for this
    worker; ``epochs=None`` repeats forever. With fewer shards than ``world_size x workers``
    the shards are shared round-robin by sample position instead of skipped (see
    ``samples_split``), so no rank or worker starves.

    ``resample=True``: draws shards with replacement forever from a generator seeded with
    ``(seed, rank, worker)`` — the endless stream for large datasets.
    """

    def __init__(
        self,
        urls: list[str],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        resample: bool = False,
        epochs: int | None = None,
        shuffle: bool = True,
    ):
        if not urls:
            raise UserError("no shards given")
        self.urls = list(urls)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.resample, self.epochs, self.shuffle = resample, epochs, shuffle

    def split_size(self) -> tuple[int, int]:
        """(this stream's index, number of streams) over ranks x workers."""
        worker, num_workers = worker_info()
        return self.rank * num_workers + worker, self.world_size * num_workers

    @property
    def samples_split(self) -> tuple[int, int] | None:
        """(index, count) to split *samples* by when there are too few shards, else None."""
        index, count = self.split_size()
        if self.resample or len(self.urls) >= count:
            return None
        return index, count

    def __iter__(self) -> Iterator[dict]:
        index, count = self.split_size()
        worker, _ = worker_info()
        if self.resample:
            rng = random.Random(make_seed("resample", self.seed, self.rank, worker))
            while True:
                yield {"url": rng.choice(self.urls)}
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            urls = list(self.urls)
            if self.shuffle:
                random.Random(make_seed("shards", self.seed, epoch)).shuffle(urls)
            if len(urls) >= count:
                urls = urls[index::count]
            for url in urls:
                yield {"url": url}
            epoch += 1


def open_shards(data: Iterable[dict], handler=wds.warn_and_continue) -> Iterator[dict]:
    """``{"url"}`` -> ``{"url", "stream"}`` for local paths, ``pipe:`` commands and fsspec URLs."""
    for sample in data:
        url = sample["url"]
        try:
            if url.startswith("pipe:"):
                stream = wds.gopen(url, "rb")
            elif "://" in url:
                import fsspec

                stream = fsspec.open(url, "rb").open()
            else:
                stream = open(url, "rb")
            yield {**sample, "stream": stream}
        except Exception as exn:  # noqa: BLE001 - a missing shard is logged and skipped
            exn.args = exn.args + (url,)
            if handler(exn):
                continue
            break


def tar_members(data: Iterable[dict], handler=wds.warn_and_continue) -> Iterator[dict]:
    """Opened shards -> ``{"fname", "data", "__url__"}`` per tar member (webdataset's format)."""
    for source in data:
        url = source.get("url", "?")
        stream = source["stream"]
        try:
            for name, blob in iter_tar_members(stream, url):
                if name.startswith("__") or "/__" in name:
                    continue
                yield {"fname": name, "data": blob, "__url__": url}
        except Exception as exn:  # noqa: BLE001 - a broken shard is logged and skipped
            exn.args = exn.args + (url,)
            if not handler(exn):
                break
        finally:
            with contextlib.suppress(Exception):
                stream.close()


def tar_samples(data: Iterable[dict], handler=wds.warn_and_continue) -> Iterator[dict]:
    """Opened shards -> samples ``{"__key__", "__url__", "<ext>": bytes}`` (webdataset grouping).

    Grouped shard by shard: a sample never spans two shards, even when a shard follows itself
    (one shard per reader, or a resampled draw) and its last key is also its first."""
    for source in data:
        yield from group_by_keys(tar_members([source], handler=handler), handler=handler)


def group_by_keys(members: Iterable[dict], handler=wds.reraise_exception) -> Iterator[dict]:
    """Consecutive ``{"fname", "data", "__url__"}`` members sharing a key -> one sample
    ``{"__key__", "__url__", "<suffix>": bytes}`` (webdataset's rule: the key ends at the
    first dot of the file name; suffixes lower-cased; a name without a dot is skipped). A
    member twice in a sample is a ``ValueError`` given to ``handler``."""
    current = None
    for member in members:
        try:
            fname = member["fname"]
            if "." not in fname.rpartition("/")[2]:
                continue
            key, suffix = split_member_name(fname)
            suffix = suffix.lower()
            if current is None or key != current["__key__"]:
                if current is not None and len(current) > 2:
                    yield current
                current = {"__key__": key, "__url__": member["__url__"]}
            if suffix in current:
                raise ValueError(f"{fname}: duplicate file name in tar file")
            current[suffix] = member["data"]
        except Exception as exn:  # noqa: BLE001 - the handler decides (warn and skip, or raise)
            exn.args = exn.args + (member.get("__url__"),)
            if handler(exn):
                continue
            break
    if current is not None and len(current) > 2:
        yield current


def split_samples(data: Iterable[dict], split: tuple[int, int] | None) -> Iterator[dict]:
    """Keep every ``count``-th sample starting at ``index`` (used only when shards are few)."""
    if split is None:
        yield from data
        return
    index, count = split
    for i, sample in enumerate(data):
        if i % count == index:
            yield sample


def write_multiview_sample(
    sink: tarfile.TarFile | wds.TarWriter,
    uid: str,
    rgba: np.ndarray,
    c2w: np.ndarray,
    meta: dict,
) -> None:
    """Write one object in the multi-view schema (docs/design.md §3) to an open tar / ``TarWriter``.

    ``rgba`` is uint8 ``[V, H, W, 4]`` (straight alpha), ``c2w`` float ``[V, 4, 4]``, ``meta``
    the JSON fields beyond ``schema``, ``uid``, ``num_views`` and ``resolution`` (filled in,
    unchecked: tests write broken samples with it). :class:`mvdiff.shards.MultiViewSample`
    encodes it.
    """
    if "." in uid:
        raise ValueError(f"uid {uid!r} must not contain dots")
    members = MultiViewSample.from_arrays(uid, rgba, c2w, meta).members()
    if isinstance(sink, wds.TarWriter):
        sink.write({"__key__": uid, **members})
        return
    write_members(sink, uid, members)
