"""Samples, shards and the manifest (docs/design.md §3): what makes a run trustworthy and resumable.

Durability protocol (one writer: the main process):

1. A sample is validated (:func:`build_sample`) before a byte of it is written.
2. Its members are appended to the open shard ``PREFIX-NNNNNN.tar.tmp``, flushed and fsynced.
3. Only then a ``done`` line naming the final shard and the sample's end offset is appended
   to ``manifest.jsonl`` (flushed and fsynced).
4. A full shard gets its end-of-archive blocks and is renamed to ``PREFIX-NNNNNN.tar``.

On start-up (:meth:`ShardWriter.recover`) every leftover ``.tar.tmp`` is cut back to the end
of its last sample recorded in the manifest, closed and renamed; bytes past that point (a
sample whose manifest line never made it) are dropped and that object renders again. So
``kill -9`` at any moment loses only the objects in flight, and no sample is ever written
twice or left truncated.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mvdiff.io import save_image
from mvdiff.shards import (  # noqa: F401 - the schema lives in mvdiff.shards; re-exported here
    DEPTH_MODES,
    MEMBER_RE,
    META_FIELDS,
    NORMAL_MODES,
    PER_VIEW_FIELDS,
    SCHEMA,
    MultiViewSample,
    SampleInvalid,
    check_cameras,
    check_pass_png,
    check_rgba_png,
    read_tar,
    view_member,
    write_members,
)

MANIFEST = "manifest.jsonl"


# --- manifest ---------------------------------------------------------------------------
class Manifest:
    """Append-only JSON lines: ``{"uid", "source", "status", "shard", "reason", "seconds"}``.

    The last line of a uid wins, except that ``done`` is final unless a later ``lost`` line
    voids it (its sample went missing from an unclosed shard). A torn last line (``kill -9``
    mid-write) is ignored and cut off before appending; so are lines that are not a record
    (hand edits, a line torn by a full disk). An append that fails (disk full) is cut back
    off, so the file never holds half a line.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.exists():
            data = self.path.read_bytes()
            good = data[: data.rfind(b"\n") + 1]
            if len(good) != len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(len(good))
            for line in good.decode(errors="replace").splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not _is_record(rec):
                    continue
                if not self.done(rec["uid"]) or rec["status"] == "lost":
                    self.records[rec["uid"]] = rec
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab", buffering=0)

    def done(self, uid: str) -> bool:
        return self.records.get(uid, {}).get("status") == "done"

    def append(self, rec: dict) -> None:
        """Append one line, fsynced; on failure (``OSError``) the file is as it was before."""
        data = memoryview((json.dumps(rec) + "\n").encode())
        fd = self._f.fileno()
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[self._f.write(data) :]
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
        if not self.done(rec["uid"]) or rec["status"] == "lost":
            self.records[rec["uid"]] = rec

    def counts(self) -> dict:
        out = {"done": 0, "failed": 0}
        for rec in self.records.values():
            out[rec["status"]] = out.get(rec["status"], 0) + 1
        return out

    def close(self) -> None:
        self._f.close()


def _is_record(rec) -> bool:
    """A manifest line this version understands (a ``done`` one names its shard and end)."""
    if not (isinstance(rec, dict) and isinstance(rec.get("uid"), str)):
        return False
    if rec.get("status") == "done":
        return isinstance(rec.get("shard"), str) and isinstance(rec.get("end", 0), int)
    return isinstance(rec.get("status"), str)


# --- samples ----------------------------------------------------------------------------
def spherical_from_c2w(c2w: np.ndarray) -> tuple[list, list, list]:
    """(elevation_deg, azimuth_deg, distance) of camera centres ``c2w[:, :3, 3]`` (docs/design.md §4)."""
    t = np.asarray(c2w, dtype=np.float64)[:, :3, 3]  # [V, 3] camera centres, z-up world
    distance = np.linalg.norm(t, axis=1)
    elevation = np.degrees(np.arcsin(np.clip(t[:, 2] / np.maximum(distance, 1e-12), -1, 1)))
    azimuth = np.degrees(np.arctan2(t[:, 0], -t[:, 1])) % 360.0  # 0 on -y, ccw from +z
    return elevation.tolist(), azimuth.tolist(), distance.tolist()


def build_sample(obj: dict, answer: dict, cfg) -> dict[str, bytes]:
    """Validate a worker's answer for object ``obj`` and return the shard members.

    Every view must be present, decode as an RGBA PNG of the right size and have some
    non-zero alpha; cameras must be proper rigid transforms.
    """
    num_views = len(answer["fov_deg"])
    files = answer["files"]
    passes = {"depth": [], "normal": []}
    for v in range(num_views):
        name = view_member("rgba", v)
        if name not in files:
            raise SampleInvalid(f"view {v} is missing")
        alpha = check_rgba_png(files[name], cfg.resolution, f"view {v}")
        if alpha.max() == 0:
            raise SampleInvalid(f"view {v} is empty (alpha is zero everywhere)")
        for kind, wanted, modes in (
            ("depth", cfg.depth, DEPTH_MODES),
            ("normal", cfg.normal, NORMAL_MODES),
        ):
            if wanted:
                name = view_member(kind, v)
                if name not in files:
                    raise SampleInvalid(f"view {v}: {kind} pass is missing")
                check_pass_png(files[name], cfg.resolution, f"view {v} {kind}", modes)
                passes[kind].append(files[name])
    c2w = np.asarray(answer["c2w"], dtype=np.float32)  # [V, 4, 4] as Blender used them
    check_cameras(c2w, num_views)
    elevation, azimuth, distance = spherical_from_c2w(c2w)
    meta = {
        "schema": SCHEMA,
        "uid": obj["uid"],
        "caption": obj.get("caption", ""),
        "source": obj.get("source", ""),
        "license": obj.get("license", ""),
        "num_views": num_views,
        "resolution": cfg.resolution,
        "engine": cfg.engine,
        "samples": cfg.samples,
        "fov_deg": [float(x) for x in answer["fov_deg"]],
        "elevation_deg": elevation,
        "azimuth_deg": azimuth,
        "distance": distance,
        "normalization": {"scale": float(answer["scale"]), "offset": list(answer["offset"])},
    }
    rgba = [files[view_member("rgba", v)] for v in range(num_views)]
    sample = MultiViewSample(obj["uid"], meta, c2w, rgba, passes["depth"], passes["normal"])
    return sample.members()


# --- shards -----------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Writes samples to ``DIR/PREFIX-NNNNNN.tar`` (atomically, see the module docstring).

    ``on_close(path)`` is called after each shard is renamed (e.g. to upload it).
    """

    def __init__(self, folder, manifest: Manifest, prefix="mv", max_samples=256,
                 max_bytes=1 << 30, on_close=None):  # fmt: skip
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest = manifest
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.on_close = on_close
        self.recovered = self.recover()
        self.index = self._next_index()
        self.tar = None
        self.count = 0

    def _shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def _next_index(self) -> int:
        pattern = re.compile(rf"^{re.escape(self.prefix)}-(\d+)\.tar(\.tmp)?$")
        names = [p.name for p in self.folder.iterdir()]
        names += [r.get("shard", "") for r in self.manifest.records.values()]  # uploaded ones
        found = [int(m.group(1)) for name in names if (m := pattern.match(name))]
        return max(found, default=-1) + 1

    def recover(self) -> list[str]:
        """Close the ``.tar.tmp`` shards a killed run left behind; return the shards kept.

        Each is cut back to the end of its last sample with a ``done`` line. A ``.tmp`` shorter
        than its recorded samples (the tail lost, e.g. by a crashed disk) is never padded with
        zeros: the samples missing from it get a ``lost`` manifest line and render again.
        """
        recorded: dict[str, list[tuple[int, str]]] = {}
        for rec in self.manifest.records.values():
            if rec.get("status") == "done" and "end" in rec:
                recorded.setdefault(rec["shard"], []).append((int(rec["end"]), rec["uid"]))
        kept = []
        for tmp in sorted(self.folder.glob(f"{self.prefix}-*.tar.tmp")):
            final = tmp.name[: -len(".tmp")]
            size = tmp.stat().st_size
            samples = recorded.get(final, [])
            for _, uid in sorted(s for s in samples if s[0] > size):
                self.manifest.append({"uid": uid, "source": "", "status": "lost", "shard": final,
                                      "reason": f"missing from {tmp.name} ({size} bytes) on resume"})  # fmt: skip
            end = max((e for e, _ in samples if e <= size), default=0)
            if end == 0:
                tmp.unlink()
                continue
            with open(tmp, "r+b") as f:
                f.truncate(end)  # drop a sample whose manifest line never made it
                f.seek(end)
                f.write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / final)
            kept.append(final)
            if self.on_close:
                self.on_close(self.folder / final)
        if kept:
            _fsync_dir(self.folder)
        return kept

    def _open(self) -> None:
        self.tmp_path = self.folder / (self._shard_name(self.index) + ".tmp")
        self._file = open(self.tmp_path, "wb")
        self.tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self.committed = 0  # end offset of the last sample whose manifest line is written

    def write(self, key: str, members: dict[str, bytes], record: dict) -> str:
        """Append one sample, then its ``done`` manifest line; return the shard name.

        If anything fails or interrupts it (disk full, Ctrl-C, SIGTERM), the open shard is cut
        back to its last recorded sample and the exception propagates: the sample is simply
        not written.
        """
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self.tar is None:
            self._open()
        now = time.time()
        shard = self._shard_name(self.index)
        try:
            write_members(self.tar, key, members, mtime=now)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.manifest.append(
                {**record, "status": "done", "shard": shard, "end": self.tar.offset}
            )
        except BaseException:
            self._rollback()
            raise
        self.committed = self.tar.offset
        self.count += 1
        if self.count >= self.max_samples or self.tar.offset >= self.max_bytes:
            self.close_shard()
        return shard

    def _rollback(self) -> None:
        """Cut the open shard back to the end of its last recorded sample."""
        with contextlib.suppress(OSError, ValueError):
            self._file.flush()
        with contextlib.suppress(OSError, ValueError):
            self._file.seek(self.committed)
            self._file.truncate()
            self.tar.offset = self.committed

    def close_shard(self) -> None:
        """Close the open shard: its recorded samples, the end-of-archive blocks, renamed to
        the final name. With no recorded sample the ``.tmp`` is removed. If this fails (disk
        full), the ``.tmp`` stays for :meth:`recover` and the ``OSError`` propagates."""
        if self.tar is None:
            return
        tar, self.tar = self.tar, None
        try:
            if self.count == 0:
                self._file.close()
                self.tmp_path.unlink(missing_ok=True)
                return
            self._file.seek(self.committed)  # a sample cut off by an error ends here
            self._file.truncate()
            self._file.write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            tar.closed = True  # its file is ours; tarfile must never write to it again
            self._file.close()
        final = self.folder / self._shard_name(self.index)
        os.replace(self.tmp_path, final)
        _fsync_dir(self.folder)
        self.index += 1
        if self.on_close:
            self.on_close(final)


# --- inspection ---------------------------------------------------------------------------
def check_sample(key: str, members: dict[str, bytes]) -> dict:
    """Check one sample against the schema (strict); return its metadata or raise SampleInvalid."""
    return MultiViewSample.decode(key, members, strict=True).meta


def check_shard(path) -> dict:
    """Counts and schema problems of one shard: ``{"path", "samples", "views", "errors"}``."""
    report = {"path": str(path), "samples": 0, "views": 0, "errors": []}
    try:
        samples = read_tar(path, report["errors"])
    except (tarfile.TarError, OSError, SampleInvalid) as e:
        report["errors"].append(f"unreadable tar ({e})")
        return report
    for key, members in samples.items():
        try:
            meta = check_sample(key, members)
        except SampleInvalid as e:
            report["errors"].append(f"{key}: {e}")
            continue
        except Exception as e:  # anything a hostile sample provokes is a problem of the sample
            report["errors"].append(f"{key}: malformed sample ({type(e).__name__}: {e})")
            continue
        report["samples"] += 1
        report["views"] += meta["num_views"]
    return report


def contact_sheet(paths, out_path, max_samples=8, max_views=8, tile=128) -> int:
    """A PNG grid: one row per valid sample (up to ``max_samples``), views over a
    checkerboard; samples that fail :func:`check_sample` and unreadable shards are left out.

    The checkerboard is mid-grey (100/140): a white object under the white world (pixels
    ~210-245) and a black one both stand out from it, where a light one hid white objects."""
    rows = []
    for path in paths:
        try:
            samples = read_tar(path, [])
        except (tarfile.TarError, OSError, SampleInvalid):
            continue
        for key, members in samples.items():
            try:
                sample = MultiViewSample.decode(key, members, strict=True)
            except Exception:  # reported by check_shard; never decoded here
                continue
            rows.append([sample.image(v) for v in range(min(sample.num_views, max_views))])
            if len(rows) >= max_samples:
                break
        if len(rows) >= max_samples:
            break
    cols = max((len(r) for r in rows), default=1)
    sheet = Image.new("RGB", (cols * tile, max(1, len(rows)) * tile), (120, 120, 120))
    yy, xx = np.mgrid[:tile, :tile]
    checker = np.where(((yy // 16 + xx // 16) % 2)[..., None] == 0, 140, 100).astype(np.uint8)
    checker = Image.fromarray(np.repeat(checker, 3, axis=2))
    for r, row in enumerate(rows):
        for c, view in enumerate(row):
            im = view.resize((tile, tile))
            cell = checker.copy()
            cell.paste(im, (0, 0), im)
            sheet.paste(cell, (c * tile, r * tile))
    save_image(out_path, sheet)
    return len(rows)
