"""Where objects come from: local files/folders, Objaverse (through the ``objaverse``
package pointed at any mirror of its layout), and captions.

An object is a dict ``{"uid", "path" | "fetch", "source", "caption", "license"}``; uids never
contain dots (they are webdataset keys).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import os
import re
import socket
import stat
from pathlib import Path

from mvdiff.errors import UserError

EXTENSIONS = (".glb", ".gltf", ".obj", ".fbx", ".ply", ".stl")


def safe_uid(name: str) -> str:
    """A webdataset-safe key: letters, digits, '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "object"


def caption_from_name(name: str, tags=()) -> str:
    """Fallback caption: the object's name (separators to spaces) plus up to 5 tags."""
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)  # CamelCase -> Camel Case
    words = re.sub(r"[_\-.]+", " ", words).strip()
    tags = [t for t in tags if t and t.lower() not in words.lower()][:5]
    return ", ".join([words] + list(tags)) if words else ", ".join(tags)


def load_captions(path: str) -> dict[str, str]:
    """``uid,caption`` rows (Cap3D layout, header optional)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--captions {path}: file does not exist")
    out = {}
    try:
        with open(p, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.reader(f)):
                if not row:
                    continue
                if len(row) < 2:
                    raise UserError(f"--captions {path}: line {i + 1} is not 'uid,caption'")
                if i == 0 and row[0].strip().lower() == "uid":
                    continue
                out[row[0].strip()] = ",".join(row[1:]).strip()
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        raise UserError(f"--captions {path}: not a readable UTF-8 CSV ({e})") from None
    return out


def printable(text: str) -> str:
    """``text`` with control characters (a newline in a file name) escaped: one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def unusable(path: Path) -> str:
    """Why the asset file ``path`` cannot be rendered, or "" if it can be read: a symlink
    loop, a dangling symlink, something that is not a regular file (a folder, a FIFO that
    would block the importer), or a file that cannot be opened."""
    try:
        st = path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        if path.is_symlink():
            return f"dangling symlink (-> {os.readlink(path)})"
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return ""


# Keywords of a .mtl file whose last word names a texture file (options come before it).
_MTL_MAPS = ("map_", "bump", "disp", "decal", "refl", "norm")


def _referenced(path: Path) -> list[str]:
    """The file names an asset refers to: an .obj's ``mtllib`` files (and their texture maps),
    a .gltf's buffer and image URIs. Other formats are self-contained (or embed textures)."""
    import json
    import urllib.parse

    def lines(p: Path) -> list[str]:
        try:
            return p.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []

    suffix = path.suffix.lower()
    names: list[str] = []
    if suffix == ".obj":
        for line in lines(path):
            if line.startswith("mtllib "):
                rest = line[len("mtllib ") :].strip()
                # one name with spaces, or several names
                mtls = [rest] if (path.parent / rest).is_file() else rest.split()
                for mtl in mtls:
                    names.append(mtl)
                    for m in lines(path.parent / mtl):
                        words = m.strip().split()
                        if len(words) > 1 and words[0].lower().startswith(_MTL_MAPS):
                            names.append(str(Path(mtl).parent / words[-1]))
    elif suffix == ".gltf":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        for item in [*doc.get("buffers", []), *doc.get("images", [])]:
            uri = item.get("uri", "") if isinstance(item, dict) else ""
            if uri and not uri.startswith("data:") and "://" not in uri:
                names.append(urllib.parse.unquote(uri))
    return names


def asset_files(path: str | Path) -> tuple[str, dict[str, bytes]]:
    """An asset and the files it refers to, as bytes to render it on a machine that cannot
    see ``path`` (the Ray backend ships them through the object store): ``(main, files)``
    with ``files`` keyed by paths relative to a common folder and ``main`` the asset's key.
    A referenced file that is missing or absolute is left out (the importer would miss it
    here too)."""
    main = Path(path).resolve()
    found = [main]
    for name in _referenced(main):
        if os.path.isabs(name) or "\\" in name:
            continue
        p = (main.parent / name).resolve()
        if p.is_file() and p not in found:
            found.append(p)
    root = Path(os.path.commonpath([str(p.parent) for p in found]))
    files = {str(p.relative_to(root)): p.read_bytes() for p in found}
    return str(main.relative_to(root)), files


def local_objects(inputs: list[str]) -> list[dict]:
    """Files (or every supported file under folders), each with a unique uid from its stem.

    A file that cannot be read (:func:`unusable`) is still an object, with an ``"error"``: the
    runner records it as failed with that reason while the others render.
    """
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in EXTENSIONS)
        elif os.path.lexists(p):
            if p.suffix.lower() not in EXTENSIONS:
                why = unusable(p)
                raise UserError(
                    f"input {item}: {why}"
                    if why
                    else f"input {item}: unsupported file type (expected {', '.join(EXTENSIONS)})"
                )
            files.append(p)
        else:
            raise UserError(f"input {item}: no such file or folder")
    objects, seen = [], set()
    for f in files:
        error = unusable(f)
        path = f.absolute() if error else f.resolve()
        uid = safe_uid(f.stem)
        if uid in seen:  # same stem in two folders: disambiguate by the path
            uid = f"{uid}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        seen.add(uid)
        obj = {"uid": uid, "path": str(path), "source": "local",
               "caption": caption_from_name(f.stem), "license": ""}  # fmt: skip
        if error:
            obj["error"] = f"{error}: {printable(str(path))}"
        objects.append(obj)
    return objects


# --- Objaverse --------------------------------------------------------------------------
OBJAVERSE_HOST = "https://huggingface.co/datasets/allenai/objaverse/resolve/main/"


class _MirrorRequest:
    """Stands in for ``urllib.request`` inside the ``objaverse`` module: rewrites its
    hard-coded Hugging Face URLs to the mirror (http(s):// or file:// base)."""

    def __init__(self, mirror: str):
        self.mirror = mirror.rstrip("/") + "/"

    def urlretrieve(self, url, filename=None, *args, **kwargs):
        import urllib.request

        if url.startswith(OBJAVERSE_HOST):
            url = self.mirror + url[len(OBJAVERSE_HOST) :]
        return urllib.request.urlretrieve(url, filename, *args, **kwargs)


class _MirrorUrllib:
    def __init__(self, mirror: str):
        self.request = _MirrorRequest(mirror)


def objaverse_module(mirror: str = "", cache: str = ""):
    """The ``objaverse`` package, pointed at ``mirror`` and ``cache`` (module globals)."""
    try:
        import objaverse
    except ImportError:
        raise UserError(
            "Objaverse sources need the objaverse package: pip install objaverse"
        ) from None
    if cache:
        objaverse.BASE_PATH = str(Path(cache).expanduser())
        objaverse._VERSIONED_PATH = str(Path(cache).expanduser() / "hf-objaverse-v1")
    if mirror:
        objaverse.urllib = _MirrorUrllib(mirror)
    return objaverse


class ObjaverseFetch:
    """Picklable download step run by the render slot (so downloads overlap rendering)."""

    def __init__(self, uid: str, mirror: str, cache: str):
        self.uid, self.mirror, self.cache = uid, mirror, cache

    def __call__(self) -> str:
        if socket.getdefaulttimeout() is None:
            socket.setdefaulttimeout(120)  # urlretrieve has no timeout of its own
        objaverse = objaverse_module(self.mirror, self.cache)
        with contextlib.redirect_stdout(io.StringIO()):
            paths = objaverse.load_objects([self.uid], download_processes=1)
        if self.uid not in paths:
            raise FileNotFoundError(f"uid {self.uid} is not in the Objaverse object list")
        return paths[self.uid]


def objaverse_objects(uids: list[str], lvis: list[str], mirror: str, cache: str) -> list[dict]:
    objaverse = objaverse_module(mirror, cache)
    wanted: list[str] = []
    for item in uids:
        p = Path(item)
        if p.is_file():
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as e:
                raise UserError(
                    f"--objaverse-uids {item}: not a readable list of uids ({e})"
                ) from None
            wanted += [ln.strip() for ln in text.splitlines() if ln.strip()]
        else:
            wanted.append(item)
    if lvis:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                annotations = objaverse.load_lvis_annotations()
        except OSError as e:
            raise UserError(f"--objaverse-lvis: cannot load the LVIS annotations ({e})") from None
        for category in lvis:
            if category not in annotations:
                raise UserError(f"--objaverse-lvis {category!r}: no such LVIS category")
            wanted += annotations[category]
    wanted = list(dict.fromkeys(u.removesuffix(".glb") for u in wanted))
    if not wanted:
        return []
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            paths = set(objaverse.load_uids())
            meta = objaverse.load_annotations([u for u in wanted if u in paths])
    except OSError as e:
        raise UserError(
            f"Objaverse metadata unavailable from {mirror or OBJAVERSE_HOST} ({e})"
        ) from None
    objects = []
    for uid in wanted:
        if uid not in paths:
            raise UserError(f"--objaverse-uids: {uid!r} is not an Objaverse uid")
        info = meta.get(uid, {})
        tags = [t.get("name", "") for t in info.get("tags", [])]
        objects.append({
            "uid": safe_uid(uid),
            "fetch": ObjaverseFetch(uid, mirror, cache),
            "source": f"objaverse:{uid}",
            "caption": caption_from_name(info.get("name", ""), tags),
            "license": info.get("license", ""),
        })  # fmt: skip
    return objects


def discover(cfg) -> list[dict]:
    """Every object the config asks for, captions applied, in a stable order."""
    local = [i for i in cfg.inputs if not i.startswith("objaverse:")]
    uids = list(cfg.objaverse_uids) + [
        i[len("objaverse:") :] for i in cfg.inputs if i.startswith("objaverse:")
    ]
    objects = local_objects(local)
    if uids or cfg.objaverse_lvis:
        objects += objaverse_objects(
            uids, cfg.objaverse_lvis, cfg.objaverse_mirror, cfg.objaverse_cache
        )
    if cfg.captions:
        captions = load_captions(cfg.captions)
        for obj in objects:
            uid = (
                obj["source"].split(":", 1)[1]
                if obj["source"].startswith("objaverse:")
                else obj["uid"]
            )
            obj["caption"] = captions.get(uid, obj["caption"])
    seen = set()
    for obj in objects:
        if obj["uid"] in seen:
            raise UserError(f"two inputs map to the same uid {obj['uid']!r}")
        seen.add(obj["uid"])
    return objects
