"""``gaussians.ply`` in the layout of the original 3DGS release (Kerbl et al. 2023).

One ``vertex`` element, binary little endian, every property ``float``:
``x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 f_rest_0 .. f_rest_{3(K-1)-1} opacity scale_0 scale_1
scale_2 rot_0 rot_1 rot_2 rot_3`` with the release's conventions: ``opacity`` is the logit,
``scale_*`` the log of the standard deviations, ``rot_*`` the quaternion (w, x, y, z, not
normalised), ``f_dc_*`` the SH DC coefficient (``(rgb - 0.5) / 0.28209479177387814``),
``f_rest`` channel-major (all red coefficients, then green, then blue), normals zero.

Positions stay in mvdiff's world frame (z up, docs/design.md §4) — 3DGS viewers take the frame of
the scene they are given. Written with numpy (no extra dependency), read back by
:func:`load_gaussians_ply` or any 3DGS reader (``plyfile``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mvdiff.errors import UserError
from mvdiff.io import atomic_write

__all__ = ["gaussians_to_arrays", "load_gaussians_ply", "ply_property_names", "save_gaussians_ply"]


def ply_property_names(num_rest: int) -> list[str]:
    """The 3DGS vertex property names for ``num_rest`` f_rest coefficients (3 (K - 1))."""
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(num_rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def gaussians_to_arrays(model) -> np.ndarray:
    """``[N, P]`` float32 rows in :func:`ply_property_names` order from a
    :class:`~mvdiff.sds.gaussians.GaussianModel`."""
    with torch.no_grad():
        n = model.num
        sh = model.sh.detach().float().cpu()  # (N, K, 3)
        rest = (
            sh[:, 1:].permute(0, 2, 1).reshape(n, -1)
        )  # (N, K-1, 3) -> (N, 3, K-1) -> (N, 3(K-1))
        cols = [
            model.means.detach().float().cpu(),
            torch.zeros(n, 3),
            sh[:, 0],
            rest,
            model.opacity_logits.detach().float().cpu()[:, None],
            model.log_scales.detach().float().cpu(),
            model.quats.detach().float().cpu(),
        ]
        return torch.cat(cols, 1).numpy().astype("<f4")


def save_gaussians_ply(path, model) -> Path:
    """Write ``model`` to ``path`` (temporary name, then renamed)."""
    rows = gaussians_to_arrays(model)
    names = ply_property_names(rows.shape[1] - 17)
    header = "ply\nformat binary_little_endian 1.0\n"
    header += f"element vertex {rows.shape[0]}\n"
    header += "".join(f"property float {n}\n" for n in names)
    header += "end_header\n"
    data = header.encode("ascii") + np.ascontiguousarray(rows).tobytes()
    return atomic_write(Path(path), lambda p: p.write_bytes(data))


def load_gaussians_ply(path, config=None):
    """A :class:`~mvdiff.sds.gaussians.GaussianModel` from a 3DGS PLY (binary little endian,
    float properties as written by :func:`save_gaussians_ply` or the 3DGS release)."""
    from mvdiff.sds.gaussians import GaussianConfig, GaussianModel

    path = Path(path)
    raw = path.read_bytes()
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply\n") or end < 0:
        raise UserError(f"{path}: not a PLY file")
    lines = raw[:end].decode("ascii", "replace").splitlines()
    if "format binary_little_endian 1.0" not in lines:
        raise UserError(f"{path}: only binary little endian 3DGS PLY files are read")
    count, names = None, []
    for line in lines:
        parts = line.split()
        if parts[:2] == ["element", "vertex"]:
            count = int(parts[2])
        elif parts[:1] == ["element"] and count is not None:
            break
        elif parts[:1] == ["property"] and count is not None:
            if parts[1] != "float":
                raise UserError(f"{path}: property {parts[-1]} is {parts[1]}, expected float")
            names.append(parts[2])
    num_rest = sum(n.startswith("f_rest_") for n in names)
    if count is None or names != ply_property_names(num_rest):
        raise UserError(f"{path}: not the 3DGS vertex layout")
    k = num_rest // 3 + 1
    if k not in (1, 4):
        raise UserError(f"{path}: SH with {k} coefficients (degree 0 or 1 supported)")
    body = raw[end + len(b"end_header\n") :]
    rows = np.frombuffer(body, dtype="<f4", count=count * len(names)).reshape(count, len(names))
    t = torch.from_numpy(rows.copy())  # (N, P)
    cfg = config or GaussianConfig(sh_degree=0 if k == 1 else 1)
    model = GaussianModel(cfg, num=count)
    sh = torch.cat([t[:, 6:9, None], t[:, 9 : 9 + num_rest].reshape(count, 3, k - 1)], 2)
    state = {
        "means": t[:, 0:3],
        "sh": sh.permute(0, 2, 1),  # (N, 3, K) -> (N, K, 3)
        "opacity_logits": t[:, 9 + num_rest],
        "log_scales": t[:, 10 + num_rest : 13 + num_rest],
        "quats": t[:, 13 + num_rest : 17 + num_rest],
    }
    model.load_state_dict({k: v.contiguous() for k, v in state.items()})
    return model
