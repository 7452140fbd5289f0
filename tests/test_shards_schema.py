"""The multi-view sample has one owner (mvdiff/shards.py): every writer and reader goes
through it, and its names, the caption suffix and the framing distance are spelled once."""

from __future__ import annotations

import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mvdiff.shards import (
    CAPTION_SUFFIX,
    SCHEMA,
    MultiViewSample,
    SampleInvalid,
    iter_tar_samples,
    read_tar,
    view_member,
    write_tar,
)

REPO = Path(__file__).resolve().parents[1]


def synthetic(uid="obj0", views=4, res=16, seed=0) -> MultiViewSample:
    from mvdiff.data.synthetic import synthetic_object

    rgba, c2w, meta = synthetic_object(np.random.default_rng(seed), views, res)
    return MultiViewSample.from_arrays(uid, rgba, c2w, meta)


def test_round_trip_through_a_tar_strict_and_lenient(tmp_path):
    """from_arrays -> members -> write_tar -> read_tar / iter_tar_samples -> decode gives the
    same sample back; the strict decode is what shard-info accepts."""
    from mvdiff.render.shards import check_shard

    a, b = synthetic("a"), synthetic("b", seed=1)
    shard = write_tar(tmp_path / "mv-000000.tar", [(s.uid, s.members()) for s in (a, b)])
    assert not list(tmp_path.glob("*.tmp"))
    assert check_shard(shard) == {"path": shard, "samples": 2, "views": 8, "errors": []}
    grouped = read_tar(shard)
    with open(shard, "rb") as f:
        streamed = dict(iter_tar_samples(f))
    assert grouped == streamed and list(grouped) == ["a", "b"]
    for s in (a, b):
        assert view_member("rgba", 3) in grouped[s.uid]
        for strict in (True, False):
            back = MultiViewSample.decode(s.uid, grouped[s.uid], strict=strict)
            assert back.meta == s.meta and back.meta["schema"] == SCHEMA
            assert back.rgba == s.rgba and np.array_equal(back.c2w, s.c2w)
            assert back.image(2).mode == "RGBA" and back.image(2).size == (16, 16)


def test_strict_and_lenient_differ_where_the_callers_need_them_to(tmp_path):
    """A sample lacking a metadata field (`license`) and carrying an extra member: the strict
    decode (shard-info) refuses it; the lenient one (training, --ref-views) reads it. A
    missing view or a bad schema version is refused by both."""
    from mvdiff.data.multiview import MultiViewDecoder
    from mvdiff.sds.ref_views import load_shard_sample

    s = synthetic("s")
    del s.meta["license"]
    members = {**s.members(), "notes.txt": b"hello"}
    with pytest.raises(SampleInvalid, match="lacks"):
        MultiViewSample.decode("s", members, strict=True)
    assert MultiViewSample.decode("s", members).num_views == 4
    out = MultiViewDecoder(num_views=4, resolution=16).decode(
        {"__key__": "s", **members}, random.Random(0)
    )
    assert tuple(out["pixels"].shape) == (4, 3, 16, 16)
    assert out["caption"].endswith(CAPTION_SUFFIX)
    shard = write_tar(tmp_path / "s.tar", [("s", members)])
    assert load_shard_sample(shard)["rgba"].shape == (4, 4, 16, 16)

    members = synthetic("s").members()
    no_view = {k: v for k, v in members.items() if k != view_member("rgba", 1)}
    bad_schema = {**members, "json": json.dumps({**s.meta, "license": "", "schema": 2}).encode()}
    for broken, words in ((no_view, "rgba.001.png"), (bad_schema, "schema")):
        for strict in (True, False):
            with pytest.raises(SampleInvalid, match=words):
                MultiViewSample.decode("s", broken, strict=strict)


def test_write_tar_leaves_nothing_half_written(tmp_path):
    def samples():
        yield "a", synthetic("a").members()
        raise RuntimeError("the writer died")

    with pytest.raises(RuntimeError):
        write_tar(tmp_path / "x.tar", samples())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="must not contain"):
        write_tar(tmp_path / "y.tar", [("a.b", {"json": b"{}"})])
    assert list(tmp_path.iterdir()) == []


def test_truncated_tar_is_refused_by_both_readers(tmp_path):
    shard = write_tar(tmp_path / "t.tar", [("a", synthetic("a").members())])
    data = Path(shard).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(tarfile.ReadError):
        read_tar(cut)
    with open(cut, "rb") as f, pytest.raises(tarfile.ReadError):
        list(iter_tar_samples(f))


def _python_sources():
    for folder in ("mvdiff", "benchmarks", "data_prep", "infer", "train"):
        for path in sorted((REPO / folder).rglob("*.py")):
            yield path, path.read_text()


@pytest.mark.parametrize(
    "pattern, owner",
    [
        (r"\.\{[a-z_]*:03d\}\.png", "mvdiff/shards.py"),  # member names (rgba.000.png)
        (r"""[=:(]\s*["'], 3d asset["']""", "mvdiff/prompts.py"),  # the caption / prompt suffix
        (r"sqrt\(3\) / 2\) / math\.sin", "mvdiff/cameras.py"),  # framing distance
        (r"tarfile\.TarInfo\(", "mvdiff/shards.py"),  # tar writing
    ],
)
def test_contract_spelled_once(pattern, owner):
    """Each piece of the shard contract is written in exactly one module (its owner)."""
    found = sorted(
        str(path.relative_to(REPO))
        for path, text in _python_sources()
        if re.search(pattern, text) and "test" not in path.name
    )
    assert found == [owner], found


def test_shards_are_opened_only_by_their_owners():
    """Tars are read and written by mvdiff/shards.py; besides it only the renderer's durable
    append-mode writer (render/shards.py: ShardWriter) and the quickstart's photo shard (which
    writes its members with mvdiff.shards.write_members) open one."""
    found = sorted(
        str(path.relative_to(REPO))
        for path, text in _python_sources()
        if "tarfile.open(" in text and "test" not in path.name
    )
    assert found == ["mvdiff/quickstart.py", "mvdiff/render/shards.py", "mvdiff/shards.py"]
