"""Draw README's camera-convention figure: ``docs/cameras.png``.

    pip install -e ".[render,docs]"
    python docs/make_camera_figure.py            # renders docs/cameras.png (~1 CPU-minute)

Left: the world seen from +z (top view) with the four MVDream cameras at elevation 15°,
azimuths 0/90/180/270 — azimuth 0 on the -y axis (Blender's front view), counter-clockwise.
Middle: one camera from the side, its OpenGL frame (looks down -z, +y up) and the elevation.
Right: the bundled monkey rendered by ``mvdiff render`` at exactly these cameras, each image
labelled with the azimuth and with the camera vector's translation read back from the shard.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from mvdiff.cameras import orbit_c2w  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "tests" / "fixtures" / "assets" / "monkey.glb"
AZIMUTHS, ELEVATION, FOV = (0, 90, 180, 270), 15.0, 40.0


def render_views(tmp: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(RGBA image, c2w) for each azimuth, through the real ``mvdiff render`` command."""
    out = tmp / "shards"
    cmd = [sys.executable, "-m", "mvdiff.cli", "render", str(ASSET), "--output", str(out),
           "--rig", "fixed", "--views", "4", "--resolution", "192", "--samples", "32",
           "--workers", "1", "--quiet", "--set", f"elevations=[{ELEVATION}]",
           "--set", f"azimuths={list(AZIMUTHS)}", "--set", f"fov={FOV}"]  # fmt: skip
    subprocess.run(cmd, check=True)
    members = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    c2ws = np.load(io.BytesIO(next(v for k, v in members.items() if k.endswith(".cameras.npy"))))
    pngs = sorted(k for k in members if ".rgba." in k)  # KEY.rgba.000.png ... (shard schema)
    images = [np.asarray(Image.open(io.BytesIO(members[k])).convert("RGBA")) for k in pngs]
    return list(zip(images, c2ws))


def top_view(ax) -> None:
    ax.set_title("top view (from +z)")
    ax.add_patch(plt.Rectangle((-0.5, -0.5), 1, 1, fill=False, ls="--", color="0.6"))
    ax.text(0, 0, "object\n(unit box)", ha="center", va="center", fontsize=7, color="0.4")
    for az in AZIMUTHS:
        c2w = orbit_c2w(ELEVATION, az, distance=2.2)
        pos, forward = c2w[:3, 3], -c2w[:3, 2]
        ax.plot(*pos[:2], "o", color="C1")
        ax.annotate("", xy=pos[:2] + 0.5 * forward[:2], xytext=pos[:2],
                    arrowprops=dict(arrowstyle="->", color="C1"))  # fmt: skip
        ax.text(pos[0] * 1.22, pos[1] * 1.22, f"az {az}°", ha="center", va="center", fontsize=8)
    # from azimuth 0 (-y) towards azimuth 90 (+x): counter-clockwise seen from +z
    ax.annotate("", xy=(1.55, -0.75), xytext=(0.75, -1.55),
                arrowprops=dict(arrowstyle="->", color="C0", connectionstyle="arc3,rad=0.35"))  # fmt: skip
    ax.text(1.3, -1.55, "azimuth\nincreases", fontsize=7, color="C0")
    for vec, name in (((1, 0), "+x"), ((0, 1), "+y")):
        ax.annotate("", xy=vec, xytext=(0, 0), arrowprops=dict(arrowstyle="->", color="k"))
        ax.text(vec[0] * 1.12, vec[1] * 1.12, name, ha="center", va="center")
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_aspect("equal")
    ax.axis("off")


def side_view(ax) -> None:
    ax.set_title("side view: elevation, camera frame")
    c2w = orbit_c2w(ELEVATION, 0, distance=2.2)
    # plot the y-z plane, seen from +x: horizontal = -y (towards the az-0 camera), vertical = z
    pos = np.array([-c2w[1, 3], c2w[2, 3]])
    ax.plot([0, pos[0]], [0, pos[1]], ":", color="0.5")
    ax.plot([0, 2.4], [0, 0], color="0.7")
    ax.text(1.4, 0.12, f"elevation {ELEVATION:.0f}°", fontsize=8)
    ax.plot(*pos, "o", color="C1")
    for col, name, color in ((2, "+z_cam (looks down −z)", "C3"), (1, "+y_cam (up)", "C2")):
        d = np.array([-c2w[1, col], c2w[2, col]]) * 0.6
        ax.annotate("", xy=pos + d, xytext=pos, arrowprops=dict(arrowstyle="->", color=color))
        ax.text(*(pos + d * 1.25), name, fontsize=7, color=color, ha="center")
    ax.annotate("", xy=(0, 1), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color="k"))
    ax.text(0.05, 1.05, "+z (world up)")
    ax.text(2.45, -0.15, "−y", fontsize=8)
    ax.set_xlim(-0.8, 3.2)
    ax.set_ylim(-0.6, 1.9)
    ax.set_aspect("equal")
    ax.axis("off")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        views = render_views(Path(tmp))
    fig = plt.figure(figsize=(13, 4.2), dpi=110)
    grid = fig.add_gridspec(2, 5, width_ratios=[1.3, 1.3, 0.65, 0.65, 0.05])
    top_view(fig.add_subplot(grid[:, 0]))
    side_view(fig.add_subplot(grid[:, 1]))
    for i, (img, c2w) in enumerate(views):
        ax = fig.add_subplot(grid[i // 2, 2 + i % 2])
        alpha = img[..., 3:] / 255.0  # straight alpha, composited over grey to show the edges
        ax.imshow((img[..., :3] * alpha + 128 * (1 - alpha)).astype(np.uint8))
        t = c2w[:3, 3] / np.linalg.norm(c2w[:3, 3])
        ax.set_title(f"az {AZIMUTHS[i]}°  t̂=({t[0]:+.2f},{t[1]:+.2f},{t[2]:+.2f})", fontsize=7)
        ax.axis("off")
    fig.suptitle(
        "mvdiff cameras: Blender world (z up); OpenGL camera frame; c2w stored; "
        "azimuth 0 on −y, counter-clockwise — the official MVDream get_camera convention",
        fontsize=9,
    )
    out = ROOT / "docs" / "cameras.png"
    tmp_out = out.with_name("cameras.tmp.png")
    fig.savefig(tmp_out, bbox_inches="tight")
    tmp_out.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
