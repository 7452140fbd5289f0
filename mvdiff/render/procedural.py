"""Procedural objects: cubes, spheres, cylinders and cones in a few flat colours, as PLY.

A vocabulary of objects a tiny model can learn on a CPU in minutes ("a red cube", "a blue
cone", ...): the quickstart (:mod:`mvdiff.quickstart`) and the learning check
(``benchmarks/learning_check.py``) write them, render them with
:func:`mvdiff.render.runner.render_objects` (the PLY importer reads the per-vertex colours,
no material needed) and train on the renders.

Meshes are finely divided triangle soups around the origin (z up, about one unit across) with
one flat colour per triangle, so that a side of an object can be painted in a second colour
(:func:`accent_mask`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "COLOURS",
    "SHAPES",
    "VOCABULARY_COLOURS",
    "accent_mask",
    "mesh_triangles",
    "object_mesh",
    "vocabulary_caption",
    "write_object",
    "write_ply",
    "write_vocabulary",
]

SHAPES = ("cube", "sphere", "cylinder", "cone")
#: flat colours (sRGB, 0-255) objects are painted in
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 190),
    "black": (30, 30, 30),
}
#: the colours of the quickstart's vocabulary ("a {colour} {shape}")
VOCABULARY_COLOURS = ("red", "green", "blue", "yellow")


def _grid_quads(n: int) -> np.ndarray:
    """Unit-square grid ``[n*n, 4, 2]`` of quads (counter-clockwise) on [-0.5, 0.5]^2."""
    t = np.linspace(-0.5, 0.5, n + 1)
    quads = []
    for i in range(n):
        for j in range(n):
            quads.append([(t[i], t[j]), (t[i + 1], t[j]), (t[i + 1], t[j + 1]), (t[i], t[j + 1])])
    return np.asarray(quads)


def _triangulate(quads: np.ndarray) -> np.ndarray:
    """``[Q, 4, 3]`` quads -> ``[2Q, 3, 3]`` triangles."""
    return np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])


def mesh_triangles(shape: str) -> np.ndarray:
    """Triangles ``[T, 3, 3]`` of a primitive around the origin (z up), finely divided so that
    per-face colours can draw patterns."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    if shape == "cube":
        g = _grid_quads(8)
        u, v = g[..., 0], g[..., 1]
        h = np.full_like(u, 0.5)
        faces = [np.stack(x, -1) for x in ((u, v, h), (v, u, -h), (h, u, v), (-h, v, u),
                                           (v, h, u), (u, -h, v))]  # fmt: skip
        return _triangulate(np.concatenate(faces))
    lon = np.linspace(0, 2 * np.pi, 33)
    if shape == "sphere":
        lat = np.linspace(-np.pi / 2, np.pi / 2, 17)

        def p(a, b):
            return (0.5 * np.cos(b) * np.cos(a), 0.5 * np.cos(b) * np.sin(a), 0.5 * np.sin(b))

        quads = [[p(lon[i], lat[j]), p(lon[i + 1], lat[j]), p(lon[i + 1], lat[j + 1]),
                  p(lon[i], lat[j + 1])] for i in range(32) for j in range(16)]  # fmt: skip
        return _triangulate(np.asarray(quads))
    # cylinder / cone: side bands + caps
    zs = np.linspace(-0.5, 0.5, 11)
    top_r = 0.4 if shape == "cylinder" else 0.0

    def r(z):
        return 0.4 + (top_r - 0.4) * (z + 0.5)

    def q(a, z):
        return (r(z) * np.cos(a), r(z) * np.sin(a), z)

    quads = [[q(lon[i], zs[k]), q(lon[i + 1], zs[k]), q(lon[i + 1], zs[k + 1]), q(lon[i], zs[k + 1])]
             for i in range(32) for k in range(10)]  # fmt: skip
    tris = list(_triangulate(np.asarray(quads)))
    for z, rad in ((-0.5, 0.4), (0.5, top_r)):
        if rad > 0:
            for i in range(32):
                tris.append([(0, 0, z), q(lon[i + 1], z), q(lon[i], z)])
    return np.asarray(tris, dtype=np.float64)


def accent_mask(centroids: np.ndarray, side: str) -> np.ndarray:
    """Triangles (by centroid ``[T, 3]``) on one side of an object: ``front`` (-y, what
    azimuth 0 sees), ``right`` (+x, azimuth 90), ``back`` (+y) or ``left`` (-x)."""
    x, y = centroids[:, 0], centroids[:, 1]
    if side == "front":
        return y < -0.12
    if side == "right":
        return x > 0.12
    if side == "back":
        return y > 0.12
    if side == "left":
        return x < -0.12
    raise ValueError(f"unknown side {side!r}; known: front, right, back, left")


def write_ply(path: Path, tris: np.ndarray, colours: np.ndarray) -> None:
    """Binary PLY with 3 unshared vertices per triangle (flat per-face colours ``[T, 3]``)."""
    n = len(tris)
    vert = np.zeros(n * 3, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                  ("red", "u1"), ("green", "u1"), ("blue", "u1")])  # fmt: skip
    flat = tris.reshape(-1, 3)  # (T, 3, 3) -> (3T, 3)
    vert["x"], vert["y"], vert["z"] = flat[:, 0], flat[:, 1], flat[:, 2]
    rgb = np.repeat(colours, 3, axis=0)  # (T, 3) -> (3T, 3)
    vert["red"], vert["green"], vert["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    faces = np.zeros(n, dtype=[("n", "u1"), ("i", "<i4", (3,))])
    faces["n"] = 3
    faces["i"] = np.arange(n * 3).reshape(n, 3)  # (3T,) -> (T, 3)
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {n * 3}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        f"element face {n}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    path.write_bytes(header.encode() + vert.tobytes() + faces.tobytes())


def object_mesh(shape: str, colour: str, accent: str = "", side: str = "",
                stretch: float = 1.0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(triangles ``[T, 3, 3]``, per-face colours ``[T, 3]`` uint8) of ``shape`` painted
    ``colour``, with ``side`` painted ``accent`` when both are given, stretched ``stretch``
    times along x (> 1: the front is a long side)."""
    for name in (colour, accent):
        if name and name not in COLOURS:
            raise ValueError(f"unknown colour {name!r}; known: {list(COLOURS)}")
    tris = mesh_triangles(shape)
    mask = np.zeros(len(tris), dtype=bool)
    if accent and side:
        mask = accent_mask(tris.mean(axis=1), side)
    tris = tris * np.array([stretch, 1.0, 1.0])  # elongate along x
    colours = np.where(mask[:, None], COLOURS[accent or colour], COLOURS[colour])
    return tris, colours.astype(np.uint8)


def write_object(path: Path, shape: str, colour: str, accent: str = "", side: str = "",
                 stretch: float = 1.0) -> None:  # fmt: skip
    """:func:`object_mesh` written as a PLY file."""
    write_ply(Path(path), *object_mesh(shape, colour, accent, side, stretch))


def vocabulary_caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def write_vocabulary(folder: Path, colours=VOCABULARY_COLOURS, shapes=SHAPES) -> dict[str, str]:
    """One PLY per (colour, shape) in ``folder`` (``{colour}_{shape}.ply``), plain colours;
    returns ``{uid: caption}`` ("a red cube", ...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    captions = {}
    for shape in shapes:
        for colour in colours:
            uid = f"{colour}_{shape}"
            write_object(folder / f"{uid}.ply", shape, colour)
            captions[uid] = vocabulary_caption(colour, shape)
    return captions
