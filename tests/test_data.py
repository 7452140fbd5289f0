"""Readers, view selection, compositing, the 2D filter, shard lists and the mixer."""

from __future__ import annotations

import io
import json
import random
import tarfile

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from mvdiff.cameras import camera_vectors, orbit_c2w
from mvdiff.data import (
    BatchMixer,
    DataConfig,
    ImageTextDecoder,
    MultiViewDecoder,
    ShardStream,
    build_loader,
    composite,
    expand_urls,
    ring_views,
    write_multiview_sample,
)
from mvdiff.data.synthetic import write_synthetic_2d_shards, write_synthetic_mv_shards
from mvdiff.errors import UserError

NUM_RENDERED = 8
RES = 16


def _coded_object(uid: str, rotate: int = 0):
    """8 views whose pixels encode the view index; azimuths stored in a rotated order."""
    azimuths = (np.arange(NUM_RENDERED) * 45.0 + 10.0)[np.roll(np.arange(NUM_RENDERED), rotate)]
    c2w = orbit_c2w(np.full(NUM_RENDERED, 20.0), azimuths, 2.0).astype(np.float32)
    rgba = np.zeros((NUM_RENDERED, RES, RES, 4), np.uint8)
    for v in range(NUM_RENDERED):
        rgba[v, ..., 0] = 10 * v  # red channel = 10 x stored index
        rgba[v, ..., 3] = 255
        rgba[v, :6, :6, 3] = 0  # a transparent corner
    meta = {"caption": f"object {uid}", "azimuth_deg": azimuths.tolist()}
    return rgba, c2w, meta


def _write_shard(path, objects):
    with tarfile.open(path, "w") as tar:
        for uid, rgba, c2w, meta in objects:
            write_multiview_sample(tar, uid, rgba, c2w, meta)


@pytest.fixture
def coded_shard(tmp_path):
    path = tmp_path / "coded.tar"
    _write_shard(path, [(f"o{i}", *_coded_object(f"o{i}", rotate=i)) for i in range(3)])
    return str(path)


def _raw_samples(path):
    from mvdiff.data.shards import open_shards, tar_samples

    return list(tar_samples(open_shards([{"url": path}])))


def test_ring_selection_is_90_degrees_apart_with_matching_cameras_and_pixels(coded_shard):
    decoder = MultiViewDecoder(num_views=4, resolution=RES)
    rng = random.Random(0)
    starts = set()
    for raw in _raw_samples(coded_shard) * 5:
        meta = json.loads(raw["json"])
        out = decoder.decode(raw, rng)
        idx = out["views"]
        az = np.asarray(meta["azimuth_deg"])[idx]
        # consecutive selected views are 90 degrees apart in azimuth (ring order)
        np.testing.assert_allclose((np.diff(az) % 360), 90.0)
        starts.add(float(az[0]))
        # pixels come from the selected stored views (red = 10 x index), background white
        assert out["pixels"].shape == (4, 3, RES, RES) and out["pixels"].dtype == torch.uint8
        assert out["pixels"][:, 0, 8, 8].tolist() == [10 * i for i in idx]
        assert (out["pixels"][:, :, 0, 0] == 255).all()
        c2w = np.load(io.BytesIO(raw["cameras.npy"]))
        torch.testing.assert_close(out["camera"], camera_vectors(c2w[idx]))
        assert out["caption"] == f"object {raw['__key__']}, 3d asset"
    assert len(starts) > 2  # the start is random


def test_random_views_are_distinct(coded_shard):
    decoder = MultiViewDecoder(num_views=4, resolution=RES, views="random")
    out = decoder.decode(_raw_samples(coded_shard)[0], random.Random(1))
    assert len(set(out["views"])) == 4


def test_ring_views_uneven_ring():
    assert ring_views(32, 4, random.Random(3)) == [
        (s := ring_views(32, 4, random.Random(3))[0]),
        (s + 8) % 32,
        (s + 16) % 32,
        (s + 24) % 32,
    ]
    assert len(set(ring_views(6, 4, random.Random(0)))) == 4


def test_composite_straight_alpha():
    rgba = np.array([[[200, 100, 0, 0], [200, 100, 0, 255], [200, 100, 0, 128]]], np.uint8)
    out = composite(rgba, np.array([255, 255, 255], np.uint8))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [200, 100, 0]
    expected = [(c * 128 + 255 * 127 + 127) // 255 for c in (200, 100, 0)]
    assert out[0, 2].tolist() == expected
    black = composite(rgba, np.zeros(3, np.uint8))
    assert black[0, 0].tolist() == [0, 0, 0]


def test_random_grey_background_and_resize(coded_shard):
    decoder = MultiViewDecoder(num_views=2, resolution=8, background="random_grey")
    greys = set()
    for i, raw in enumerate(_raw_samples(coded_shard)):
        out = decoder.decode(raw, random.Random(i))
        assert out["pixels"].shape == (2, 3, 8, 8)
        corner = out["pixels"][0, :, 0, 0]
        assert corner[0] == corner[1] == corner[2]  # grey
        greys.add(int(corner[0]))
    assert len(greys) > 1


def test_corrupt_png_and_missing_view_are_skipped_and_counted(tmp_path):
    good = [(f"g{i}", *_coded_object(f"g{i}")) for i in range(2)]
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        write_multiview_sample(tar, *good[0])
        # an object whose PNGs are all garbage, and one that lacks views 4..7
        rgba, c2w, meta = _coded_object("bad")
        members = {"json": json.dumps({"schema": 1, "num_views": 8, **meta}).encode()}
        buf = io.BytesIO()
        np.save(buf, c2w)
        members["cameras.npy"] = buf.getvalue()
        for name, data in [("corrupt", b"\x89PNG not really"), ("missing", None)]:
            for ext, blob in members.items():
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
            for v in range(8 if data else 4):
                blob = data or _png(rgba[v])
                info = tarfile.TarInfo(f"{name}.rgba.{v:03d}.png")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        write_multiview_sample(tar, *good[1])
    cfg = DataConfig(mv_shards=str(path), num_views=4, resolution=RES, batch_size=1, num_workers=0)
    # "missing" lacks half the ring: every 4-view ring selection needs one of its absent views
    batches = list(build_loader(cfg, "mv", epochs=1, drop_last=False))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == ["g0", "g1"]
    assert sum(b["skipped"] for b in batches) == 2


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _raw_2d(arr, fmt="PNG", caption="a cat"):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return {
        "__key__": "k",
        fmt.lower().replace("jpeg", "jpg"): buf.getvalue(),
        "txt": caption.encode(),
    }


def test_2d_min_size_filter_center_crop_and_alpha():
    # 60 wide x 40 high: left 10 columns red, right 10 columns blue, middle green
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :10] = (255, 0, 0)
    img[:, 10:50] = (0, 255, 0)
    img[:, 50:] = (0, 0, 255)
    dec = ImageTextDecoder(resolution=20, min_size=41)
    assert dec.decode(_raw_2d(img), random.Random(0)) is None  # shorter side 40 < 41
    dec = ImageTextDecoder(resolution=20, min_size=40)
    out = dec.decode(_raw_2d(img), random.Random(0))
    assert out["pixels"].shape == (1, 3, 20, 20) and out["camera"] is None
    assert out["caption"] == "a cat"
    # centre crop keeps only the green middle
    assert (out["pixels"][0, 1] > 200).all() and (out["pixels"][0, 0] < 30).all()
    # random crops reach the red or blue border for some draws
    dec = ImageTextDecoder(resolution=20, crop="random")
    reds = [dec.decode(_raw_2d(img), random.Random(s))["pixels"][0, 0, 10, 0] for s in range(20)]
    assert max(reds) > 200
    # transparent pixels go white
    rgba = np.zeros((32, 32, 4), np.uint8)
    out = ImageTextDecoder(resolution=8).decode(_raw_2d(rgba), random.Random(0))
    assert (out["pixels"] == 255).all()


def test_2d_loader_counts_filtered_and_corrupt(tmp_path):
    paths = write_synthetic_2d_shards(tmp_path, 1, 6, size=(48, 40))
    small = write_synthetic_2d_shards(tmp_path, 1, 3, size=(30, 20), prefix="small")
    with tarfile.open(tmp_path / "corrupt.tar", "w") as tar:
        for ext, blob in [("jpg", b"garbage"), ("txt", b"x")]:
            info = tarfile.TarInfo(f"bad.{ext}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    cfg = DataConfig(
        shards_2d="::".join(paths + small + [str(tmp_path / "corrupt.tar")]),
        resolution=16,
        min_size_2d=32,
        batch_size_2d=2,
        num_workers=0,
    )
    batches = list(build_loader(cfg, "2d", epochs=1, drop_last=False))
    assert sum(len(b["key"]) for b in batches) == 6
    assert sum(b["filtered"] for b in batches) == 3
    assert sum(b["skipped"] for b in batches) == 1
    assert all(b["num_views"] == 1 and b["camera"] is None for b in batches)


def test_expand_urls(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i:03d}.tar").write_bytes(b"")
    brace = expand_urls(str(tmp_path / "s-{000..002}.tar"))
    assert brace == [str(tmp_path / f"s-{i:03d}.tar") for i in range(3)]
    assert expand_urls(str(tmp_path / "s-*.tar")) == brace
    assert expand_urls(f"{brace[0]}::{brace[1]}") == brace[:2]
    fs = expand_urls(f"file://{tmp_path}/s-*.tar")
    assert len(fs) == 3 and all(u.startswith("file://") for u in fs)
    mem = fsspec.filesystem("memory")
    for i in range(2):
        mem.pipe(f"/expand-test/x-{i}.tar", b"")
    urls = expand_urls("memory://expand-test/x-{0..1}.tar")
    assert urls == ["memory://expand-test/x-0.tar", "memory://expand-test/x-1.tar"]
    # remote brace patterns are checked with one listing: nothing / some missing is named
    with pytest.raises(UserError, match="matches no files"):
        expand_urls("memory://expand-test/y-{0..1}.tar")
    with pytest.raises(UserError, match="x-2.tar' does not exist"):
        expand_urls("memory://expand-test/x-{0..2}.tar")
    with pytest.raises(UserError, match="nothing-"):
        expand_urls(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(UserError, match="missing.tar"):
        expand_urls(str(tmp_path / "missing.tar"))


def test_fsspec_url_reads(tmp_path):
    write_synthetic_mv_shards(tmp_path, 1, 2, num_views=4, resolution=16)
    cfg = DataConfig(mv_shards=f"file://{tmp_path}/mv-*.tar", resolution=16, num_workers=0)
    assert len(list(build_loader(cfg, "mv", epochs=1))) == 2


def test_a_one_sample_shard_read_twice_in_a_row_is_two_samples(tmp_path):
    """One shard per reader (2 DataLoader workers, 2 shards) or a resampled draw repeats a
    shard back to back; with one sample per shard, its last key is its first (was: grouped
    into one sample with duplicate members, skipped, "no usable sample")."""
    from mvdiff.data.shards import open_shards, tar_samples

    write_synthetic_mv_shards(tmp_path, 1, 1, num_views=4, resolution=16)
    url = str(next(tmp_path.glob("mv-*.tar")))
    samples = list(tar_samples(open_shards([{"url": url}, {"url": url}])))
    assert len(samples) == 2 and samples[0]["__key__"] == samples[1]["__key__"]
    assert samples[0].keys() == samples[1].keys()


def test_shard_split_by_rank_is_a_partition():
    urls = [f"s{i}" for i in range(8)]
    seen = []
    for rank in range(2):
        stream = ShardStream(urls, seed=1, rank=rank, world_size=2, epochs=1)
        seen.append([d["url"] for d in stream])
    assert len(seen[0]) == len(seen[1]) == 4
    assert sorted(seen[0] + seen[1]) == sorted(urls)
    resampled = ShardStream(urls, seed=1, rank=0, world_size=2, resample=True)
    it = iter(resampled)
    assert all(next(it)["url"] in urls for _ in range(20))  # endless


def test_loader_deterministic_with_workers_and_split_by_rank(tmp_path):
    write_synthetic_mv_shards(tmp_path, 4, 3, num_views=8, resolution=16)
    cfg = DataConfig(
        mv_shards=str(tmp_path / "mv-*.tar"), resolution=16, num_workers=2, shuffle_buffer=4
    )

    def run(rank):
        loader = build_loader(cfg, "mv", seed=7, rank=rank, world_size=2, epochs=1)
        return [(b["key"][0], b["camera"]) for b in loader]

    a, b, other = run(0), run(0), run(1)
    assert [k for k, _ in a] == [k for k, _ in b]
    for (_, ca), (_, cb) in zip(a, b):
        torch.testing.assert_close(ca, cb)  # same random views
    assert len(a) == 6 and len(other) == 6
    assert not {k for k, _ in a} & {k for k, _ in other}


def _counter(tag):
    i = 0
    while True:
        yield {"tag": tag, "i": i}
        i += 1


def test_mixer_fraction_determinism_and_fast_forward():
    def take(n, **kw):
        mixer = BatchMixer(_counter("mv"), _counter("2d"), **kw)
        it = iter(mixer)
        return [next(it) for _ in range(n)]

    seq = take(2000, p_2d=0.3, seed=5, rank=0)
    frac = sum(b["tag"] == "2d" for b in seq) / len(seq)
    assert 0.26 < frac < 0.34
    assert seq == take(2000, p_2d=0.3, seed=5, rank=0)
    assert [b["tag"] for b in seq[:50]] != [b["tag"] for b in take(50, p_2d=0.3, seed=5, rank=1)]
    # resuming at batch 700 continues exactly where the straight run was
    assert take(100, p_2d=0.3, seed=5, rank=0, start=700) == seq[700:800]
    assert all(b["tag"] == "mv" for b in take(20, p_2d=0.0))
    only_2d = BatchMixer(None, _counter("2d"), p_2d=0.3)
    assert next(iter(only_2d))["tag"] == "2d"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path, fmt):
    from mvdiff.data.shards import iter_tar_members

    path = tmp_path / "t.tar"
    names = ["a.txt", "sub/" + "e" * 90 + "/x.png", "empty.txt"]
    if fmt != tarfile.USTAR_FORMAT:  # USTAR cannot hold a long name without a "/"
        names.insert(1, "d" * 120 + ".json")
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            blob = bytes(range(i * 7 % 256)) * (i + 1) if name != "empty.txt" else b""
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with open(path, "rb") as f:
        ours = list(iter_tar_members(f))
    with tarfile.open(path) as tar:
        ref = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert ours == ref
    # cut short anywhere, even exactly after a member (no end-of-archive marker): the whole
    # members before the cut are read, then an error says it is truncated
    member_end = 512  # the first member, a.txt, is empty: one header block
    for cut in (member_end, member_end + 100, 300):
        got = []
        with pytest.raises(tarfile.ReadError, match="truncated"):
            for member in iter_tar_members(io.BytesIO(path.read_bytes()[:cut])):
                got.append(member)
        assert got == ref[: 1 if cut >= member_end else 0]
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF  # corrupt the first header
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(raw))))


def test_few_shards_are_split_by_sample(tmp_path):
    """One shard, two ranks: each rank reads every other sample instead of one rank starving."""
    write_synthetic_mv_shards(tmp_path, 1, 6, num_views=4, resolution=16)
    cfg = DataConfig(mv_shards=str(tmp_path / "mv-*.tar"), resolution=16, num_workers=0,
                     shuffle_buffer=0)  # fmt: skip
    keys = [
        [k for b in build_loader(cfg, "mv", rank=r, world_size=2, epochs=1) for k in b["key"]]
        for r in range(2)
    ]
    assert len(keys[0]) == len(keys[1]) == 3
    assert sorted(keys[0] + keys[1]) == [f"obj0000x{i:04d}" for i in range(6)]
