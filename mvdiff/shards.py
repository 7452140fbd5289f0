"""The multi-view sample (docs/design.md §3): its member names, schema version, decoding and
tar reading/writing, in one place.

Every writer (the renderer, ``data.synthetic``, ``write_multiview_sample``, benchmarks) and
every reader (``shard-info``, the training decoder, ``--ref-views``, eval ground truth)
goes through this module, so the format is spelled once:

* :func:`view_member` names a view's member (``rgba.000.png``, ``depth.000.png``, ...),
  :data:`SCHEMA` is the version in ``KEY.json``, :data:`META_FIELDS` the fields it holds.
* :class:`MultiViewSample` is one object: ``uid``, ``meta`` (the JSON), ``c2w`` and the
  encoded view PNGs; :meth:`MultiViewSample.members` encodes it, :meth:`MultiViewSample.decode`
  reads it back -- ``strict=True`` checks everything ``mvdiff shard-info`` checks (all meta
  fields, member names, float32 cameras, every image decoded), ``strict=False`` (readers) only
  what a reader needs without decoding an image. Problems are :class:`SampleInvalid`.
* :func:`write_members` / :func:`write_tar` write samples (any member dict, 2D shards too) to
  a tar; :func:`read_tar` reads a shard grouped by key and refuses a truncated one;
  :func:`iter_tar_members` / :func:`iter_tar_samples` stream a tar sequentially.

Only numpy, PIL and the standard library: the lowest floor of the package.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mvdiff.prompts import CAPTION_SUFFIX

__all__ = [
    "CAPTION_SUFFIX",
    "DEPTH_MODES",
    "MEMBER_RE",
    "META_FIELDS",
    "NORMAL_MODES",
    "PER_VIEW_FIELDS",
    "SCHEMA",
    "MultiViewSample",
    "SampleInvalid",
    "check_cameras",
    "encode_png",
    "iter_tar_members",
    "iter_tar_samples",
    "read_metadata",
    "read_tar",
    "view_member",
    "write_members",
    "write_tar",
]

#: The version written to (and required in) ``KEY.json``'s ``schema`` field.
SCHEMA = 1
META_FIELDS = (
    "schema", "uid", "caption", "source", "license", "num_views", "resolution", "engine",
    "samples", "fov_deg", "elevation_deg", "azimuth_deg", "distance", "normalization",
)  # fmt: skip
PER_VIEW_FIELDS = ("fov_deg", "elevation_deg", "azimuth_deg", "distance")
VIEW_KINDS = ("rgba", "depth", "normal")
MEMBER_RE = re.compile(r"^(json|cameras\.npy|(rgba|depth|normal)\.(\d{3})\.(png|exr))$")
DEPTH_MODES = ("I;16", "I;16B", "I")
NORMAL_MODES = ("RGB",)


def view_member(kind: str, v: int) -> str:
    """The member name (after ``KEY.``) of view ``v``'s ``kind`` image: ``rgba.007.png``."""
    if kind not in VIEW_KINDS:
        raise ValueError(f"view kind {kind!r} is not one of {VIEW_KINDS}")
    return f"{kind}.{v:03d}.png"


class SampleInvalid(ValueError):
    """A sample that breaks the schema; the message says how (one line)."""


# --- checks ---------------------------------------------------------------------------------
def check_cameras(c2w: np.ndarray, num_views: int) -> None:
    """``c2w`` is ``[num_views, 4, 4]`` finite rigid transforms (docs/design.md §4)."""
    if c2w.shape != (num_views, 4, 4):
        raise SampleInvalid(f"cameras have shape {c2w.shape}, expected ({num_views}, 4, 4)")
    if not np.isfinite(c2w).all():
        raise SampleInvalid("cameras are not finite")
    if np.abs(c2w[:, 3] - np.array([0, 0, 0, 1])).max() > 1e-6:
        raise SampleInvalid("cameras: bottom row is not [0, 0, 0, 1]")
    rot = c2w[:, :3, :3].astype(np.float64)
    if np.abs(rot.transpose(0, 2, 1) @ rot - np.eye(3)).max() > 1e-3:
        raise SampleInvalid("cameras: rotation is not orthonormal")


def check_rgba_png(data: bytes, resolution: int, where: str) -> np.ndarray:
    """Decode an RGBA PNG and check its size; returns the alpha channel (uint8 [H, W])."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                raise SampleInvalid(f"{where}: not a PNG ({im.format})")
            if im.mode != "RGBA":
                raise SampleInvalid(f"{where}: mode {im.mode}, expected RGBA")
            if im.size != (resolution, resolution):
                raise SampleInvalid(f"{where}: size {im.size}, expected {resolution}x{resolution}")
            return np.asarray(im)[..., 3]
    except SampleInvalid:
        raise
    except Exception as e:
        raise SampleInvalid(f"{where}: unreadable PNG ({e})") from None


def check_pass_png(data: bytes, resolution: int, where: str, modes: tuple) -> None:
    """Decode a depth/normal PNG and check its mode and size."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            ok = im.format == "PNG" and im.mode in modes and im.size == (resolution, resolution)
            mode, size = im.mode, im.size
    except Exception as e:
        raise SampleInvalid(f"{where}: unreadable PNG ({e})") from None
    if not ok:
        raise SampleInvalid(f"{where}: mode {mode} size {size}, expected {modes[0]} {resolution}^2")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _numbers(values, n: int) -> bool:
    """``values`` is a list of ``n`` finite numbers."""
    return (
        isinstance(values, list) and len(values) == n
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                for x in values)
    )  # fmt: skip


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of a uint8 ``[H, W]`` / ``[H, W, 3|4]`` array (fast compression)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


# --- the sample -------------------------------------------------------------------------------
@dataclass
class MultiViewSample:
    """One object in the multi-view schema (docs/design.md §3).

    ``meta`` is the ``KEY.json`` object; ``c2w`` the camera-to-world matrices (float32
    ``[V, 4, 4]``); ``rgba`` one encoded RGBA PNG per view; ``depth`` / ``normal`` the optional
    passes (one PNG per view, or empty). Images stay encoded: a reader decodes only the views
    it uses (:meth:`image`).
    """

    uid: str
    meta: dict
    c2w: np.ndarray
    rgba: list[bytes]
    depth: list[bytes] = field(default_factory=list)
    normal: list[bytes] = field(default_factory=list)

    @property
    def num_views(self) -> int:
        return len(self.rgba)

    @classmethod
    def from_arrays(cls, uid: str, rgba: np.ndarray, c2w: np.ndarray, meta: dict):
        """A sample from uint8 RGBA views ``[V, H, W, 4]`` (straight alpha) and ``c2w``
        ``[V, 4, 4]``; ``schema``, ``uid``, ``num_views`` and ``resolution`` are filled into
        ``meta`` (the caller's other fields are kept as given, unchecked)."""
        rgba = np.asarray(rgba)
        header = {"schema": SCHEMA, "uid": uid, "num_views": int(rgba.shape[0]),
                  "resolution": int(rgba.shape[1])}  # fmt: skip
        return cls(
            uid=uid,
            meta={**header, **meta},
            c2w=np.asarray(c2w, dtype=np.float32),
            rgba=[encode_png(view) for view in rgba],
        )

    def members(self) -> dict[str, bytes]:
        """The tar members of this sample (names after ``KEY.``) in schema order."""
        if "." in self.uid or "/" in self.uid:
            raise ValueError(f"uid {self.uid!r} must not contain '.' or '/'")
        out = {"json": json.dumps(self.meta).encode(), "cameras.npy": _npy(self.c2w)}
        for v, data in enumerate(self.rgba):
            out[view_member("rgba", v)] = data
            if self.depth:
                out[view_member("depth", v)] = self.depth[v]
            if self.normal:
                out[view_member("normal", v)] = self.normal[v]
        return out

    def image(self, v: int):
        """View ``v`` as a loaded RGBA ``PIL.Image`` (SampleInvalid if it does not decode)."""
        from PIL import Image

        name = view_member("rgba", v)
        try:
            with Image.open(io.BytesIO(self.rgba[v])) as im:
                im = im.convert("RGBA") if im.mode != "RGBA" else im
                im.load()
                return im
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds on corrupt files
            raise SampleInvalid(f"corrupt {name} ({type(e).__name__}: {e})") from None

    @classmethod
    def decode(cls, key: str, members: dict[str, bytes], strict: bool = False):
        """Read a sample from its tar members (names after ``KEY.``).

        ``strict=True``: everything ``mvdiff shard-info`` checks -- all :data:`META_FIELDS`,
        ``schema == SCHEMA``, ``uid == key``, per-view fields, known member names only,
        float32 cameras that are rigid transforms, every view (and depth/normal pass) an
        image of the right mode and size, no view beyond ``num_views``.

        ``strict=False`` (readers): a JSON object whose ``schema`` is :data:`SCHEMA` if
        present, ``num_views`` (default: the number of cameras), numeric ``cameras.npy`` of
        shape ``[num_views, 4, 4]`` that are finite rigid transforms, finite azimuths if
        given, and every ``rgba`` view present; no image is decoded.
        """
        if "json" not in members:
            raise SampleInvalid("no .json member")
        try:
            meta = json.loads(members["json"])
        except ValueError as e:  # not JSON, or not UTF-8
            raise SampleInvalid(f"bad .json ({e})") from None
        if not isinstance(meta, dict):
            raise SampleInvalid(
                f".json is a {type(meta).__name__}, expected an object (num_views, fov_deg, ...)"
            )
        if strict:
            return cls._decode_strict(key, members, meta)
        if meta.get("schema", SCHEMA) != SCHEMA:
            raise SampleInvalid(f"unsupported schema {meta.get('schema')!r}")
        if "cameras.npy" not in members:
            raise SampleInvalid("no .cameras.npy member")
        c2w = _load_cameras(members["cameras.npy"])
        if c2w.dtype.kind not in "fiu":
            raise SampleInvalid(f"cameras.npy has dtype {c2w.dtype}, expected float32")
        try:
            num_views = int(meta.get("num_views", c2w.shape[0] if c2w.ndim else 0))
        except (TypeError, ValueError):
            raise SampleInvalid(f"bad num_views {meta.get('num_views')!r}") from None
        if num_views < 1:
            raise SampleInvalid(f"num_views must be a positive integer, got {num_views}")
        if c2w.shape != (num_views, 4, 4):
            raise SampleInvalid(f"cameras.npy has shape {c2w.shape}, expected ({num_views}, 4, 4)")
        check_cameras(c2w, num_views)
        azimuths = meta.get("azimuth_deg")
        if isinstance(azimuths, list) and not all(
            isinstance(a, (int, float)) and np.isfinite(a) for a in azimuths
        ):
            raise SampleInvalid("azimuth_deg holds non-finite or non-numeric values")
        names = [view_member("rgba", v) for v in range(num_views)]
        missing = [n for n in names if n not in members]
        if missing:
            raise SampleInvalid(
                f"missing view(s) {', '.join(missing[:3])} ({len(missing)} of {num_views})"
            )
        return cls(key, meta, c2w, [members[n] for n in names], *_passes(members, num_views))

    @classmethod
    def _decode_strict(cls, key: str, members: dict[str, bytes], meta: dict):
        missing = [f for f in META_FIELDS if f not in meta]
        if missing:
            raise SampleInvalid(f".json lacks {missing}")
        if meta["schema"] != SCHEMA:
            raise SampleInvalid(f"schema {meta['schema']!r}, expected {SCHEMA}")
        if meta["uid"] != key:
            raise SampleInvalid(f"uid {meta['uid']!r} differs from the key")
        num_views, res = meta["num_views"], meta["resolution"]
        for name, value in (("num_views", num_views), ("resolution", res)):
            if not _is_int(value) or value < 1:
                raise SampleInvalid(f"{name} must be a positive integer, got {value!r}")
        for name in PER_VIEW_FIELDS:
            if not _numbers(meta[name], num_views):
                raise SampleInvalid(f"{name} must hold {num_views} finite numbers")
        norm = meta["normalization"]
        if not (
            isinstance(norm, dict) and _numbers([norm.get("scale")], 1)
            and _numbers(norm.get("offset"), 3)
        ):  # fmt: skip
            raise SampleInvalid("normalization must be {scale, offset[3]}")
        for name in members:
            if not MEMBER_RE.match(name):
                raise SampleInvalid(f"unexpected member {key}.{name}")
        c2w = _load_cameras(members.get("cameras.npy", b""))
        if c2w.dtype != np.float32:
            raise SampleInvalid(f"cameras.npy is {c2w.dtype}, expected float32")
        check_cameras(c2w, num_views)
        for v in range(num_views):
            name = view_member("rgba", v)
            if name not in members:
                raise SampleInvalid(f"{name} is missing")
            check_rgba_png(members[name], res, name)
        for name, data in members.items():
            if name.startswith("depth.") and name.endswith(".png"):
                check_pass_png(data, res, name, DEPTH_MODES)
            elif name.startswith("normal.") and name.endswith(".png"):
                check_pass_png(data, res, name, NORMAL_MODES)
        extra = [
            n
            for n in members
            if n.split(".")[0] in VIEW_KINDS and int(n.split(".")[1]) >= num_views
        ]
        if extra:
            raise SampleInvalid(f"more views than num_views: {extra}")
        rgba = [members[view_member("rgba", v)] for v in range(num_views)]
        return cls(key, meta, c2w, rgba, *_passes(members, num_views))


def _load_cameras(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)  # never unpickles
    except Exception as e:  # noqa: BLE001
        raise SampleInvalid(f"bad cameras.npy ({e})") from None


def _passes(members: dict[str, bytes], num_views: int) -> tuple[list[bytes], list[bytes]]:
    """The depth and normal PNGs, each all ``num_views`` of them or none."""
    out = []
    for kind in ("depth", "normal"):
        names = [view_member(kind, v) for v in range(num_views)]
        out.append([members[n] for n in names] if all(n in members for n in names) else [])
    return out[0], out[1]


# --- tar writing ------------------------------------------------------------------------------
def write_members(tar, key: str, members: dict[str, bytes], mtime: float = 0) -> None:
    """Append one sample's members as ``KEY.NAME`` files to an open ``tarfile`` (or anything
    with ``addfile(info, fileobj)``)."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
    for name, data in members.items():
        info = tarfile.TarInfo(f"{key}.{name}")
        info.size, info.mtime, info.mode = len(data), mtime, 0o644
        tar.addfile(info, io.BytesIO(data))


def write_tar(path: str | Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> str:
    """Write ``(key, members)`` samples as a USTAR shard at ``path``: written to
    ``PATH.tmp`` and renamed when complete, so no half-written shard is ever left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                write_members(tar, key, members)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return str(path)


# --- tar reading ------------------------------------------------------------------------------
def read_tar(path, errors: list | None = None) -> dict[str, dict[str, bytes]]:
    """Every regular member of a shard, grouped by sample key (``{key: {name: bytes}}``).

    A truncated shard -- a member cut short, or no end-of-archive blocks after the last
    member (a shard cut exactly between members reads "fine" with ``tarfile`` alone) -- raises
    ``tarfile.ReadError``; with an ``errors`` list the problem is appended there instead and
    the complete members before the cut are returned. A member twice is :class:`SampleInvalid`.
    """
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, suffix = info.name.partition(".")
                try:
                    data = tar.extractfile(info).read()
                except tarfile.ReadError:
                    data = b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"truncated: member {info.name} is cut short")
                sample = samples.setdefault(key, {})
                if suffix in sample:
                    raise SampleInvalid(f"duplicate member {info.name}")
                sample[suffix] = data
            end = tar.offset  # where the next header would start: the end-of-archive marker
        _check_end_of_archive(path, end)
    except (tarfile.TarError, SampleInvalid) as e:
        if errors is None or not samples:
            raise
        errors.append(str(e))
    return samples


def _check_end_of_archive(path, end: int) -> None:
    """Two zero blocks at ``end``, and only zeros (record padding) after them."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(end)
        marker = f.read(2 * tarfile.BLOCKSIZE)
        if len(marker) < 2 * tarfile.BLOCKSIZE or marker.count(0) != len(marker):
            what = "ends" if marker.count(0) == len(marker) else "has a damaged header"
            raise tarfile.ReadError(
                f"truncated: no end-of-archive marker after the last complete member at byte "
                f"{end} (the file {what} there, size {size})"
            )
        while chunk := f.read(1 << 20):
            if chunk.count(0) != len(chunk):
                raise tarfile.ReadError(f"bytes after the end-of-archive marker at byte {end}")


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def iter_tar_members(stream, url: str = "?") -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a tar stream, read sequentially.

    A lean replacement for ``tarfile`` (about 3x less CPU per member, which matters with 32+
    small PNGs per object): USTAR / GNU long names / PAX ``path`` records; checksums checked.
    A stream that ends anywhere but at the end-of-archive marker (a shard cut short, even
    exactly between two members) raises ``tarfile.ReadError`` after the whole members before
    the cut, so the loader's handler reports it instead of reading it as complete.
    """
    long_name = None
    while True:
        header = stream.read(512)
        if not header:
            raise tarfile.ReadError(
                f"{url}: truncated: ends without the end-of-archive marker (what followed is lost)"
            )
        if len(header) < 512:
            raise tarfile.ReadError(f"{url}: truncated tar header")
        if header.count(0) == 512:
            return
        try:
            stored = _octal(header[148:156])
            size = _octal(header[124:136])
        except ValueError:
            raise tarfile.ReadError(f"{url}: not a tar archive (unreadable header)") from None
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise tarfile.ReadError(f"{url}: bad tar header checksum")
        kind = header[156:157]
        data = stream.read(size)
        if len(data) < size:
            raise tarfile.ReadError(f"{url}: truncated tar member")
        if size % 512:
            stream.read(512 - size % 512)
        if kind == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode()
            continue
        if kind == b"x":  # PAX extended header: only the path matters here
            for record in data.decode("utf-8", "replace").splitlines():
                _, _, kv = record.partition(" ")
                if kv.startswith("path="):
                    long_name = kv[5:]
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode()
            if header[257:262] == b"ustar" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
        yield name, data


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/KEY.rgba.000.png"`` -> ``("dir/KEY", "rgba.000.png")`` (webdataset's rule: the
    key ends at the first dot of the file name)."""
    folder, _, base = name.rpartition("/")
    key, _, suffix = base.partition(".")
    return (f"{folder}/{key}" if folder else key), suffix


def read_metadata(path, uid: str | None = None, first: bool = False) -> dict[str, dict | None]:
    """``{key: KEY.json as a dict}`` of a shard (None where it is not a JSON object), read
    sequentially; with ``uid`` (or ``first``) it stops at that (the first) sample's JSON.
    Truncation and unreadable tars are ``tarfile.TarError``."""
    out: dict[str, dict | None] = {}
    with open(path, "rb") as f:
        for name, data in iter_tar_members(f, str(path)):
            key, suffix = split_member_name(name)
            if suffix != "json" or (uid is not None and key.rpartition("/")[2] != uid):
                continue
            try:
                meta = json.loads(data)
            except ValueError:
                meta = None
            out[key.rpartition("/")[2]] = meta if isinstance(meta, dict) else None
            if uid is not None or first:
                break
    return out


def iter_tar_samples(stream, url: str = "?") -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, members)`` of consecutive members sharing a key, read sequentially (a key
    that comes back later starts a new sample, as in webdataset). A duplicate member within
    a sample is :class:`SampleInvalid`; truncation is ``tarfile.ReadError`` as in
    :func:`iter_tar_members` (after the complete samples before it)."""
    key, members = None, {}
    for name, data in iter_tar_members(stream, url):
        k, suffix = split_member_name(name)
        if k != key:
            if key is not None:
                yield key, members
            key, members = k, {}
        if suffix in members:
            raise SampleInvalid(f"{url}: duplicate member {name}")
        members[suffix] = data
    if key is not None:
        yield key, members
