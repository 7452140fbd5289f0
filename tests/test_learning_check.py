"""benchmarks/learning_check.py's parts: the procedural objects, the schedule, the config.

The whole experiment runs (``--quick``) in tests/test_eval.py::test_learning_check_quick.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mvdiff.errors import UserError
from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lc():
    return load_script(REPO / "benchmarks" / "learning_check.py", "learning_check")


def read_ply_vertices(path: Path) -> np.ndarray:
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    n = int(next(line.split()[2] for line in data[:end].decode().splitlines()
                 if line.startswith("element vertex")))  # fmt: skip
    return np.frombuffer(data[end : end + n * 15], dtype=[("xyz", "<f4", 3), ("rgb", "u1", 3)])


def read_ply_colours(path: Path) -> set[tuple[int, int, int]]:
    return {tuple(int(c) for c in rgb) for rgb in read_ply_vertices(path)["rgb"]}


def test_captions_leave_the_shape_open(lc, tmp_path):
    """Default: 64 objects, 16 captions naming colour and marked side; the 4 objects that
    share a caption are the 4 shapes, in the caption's colour with a black side; the first 16
    objects have 16 different captions (the evaluation set)."""
    cfg = lc.LearningCheckConfig().validate()
    captions = lc.make_objects(cfg, tmp_path)
    assert len(captions) == 64 and len(list(tmp_path.glob("*.ply"))) == 64
    counts = Counter(captions.values())
    assert len(counts) == 16 and set(counts.values()) == {4}
    assert len(set(list(captions.values())[:16])) == 16
    caption = "a red object with a marked front"
    uids = [u for u, c in captions.items() if c == caption]
    for u in uids:
        assert read_ply_colours(tmp_path / f"{u}.ply") == {lc.COLOURS["red"], lc.COLOURS["black"]}
    # four different shapes: the meshes differ in triangle count or extent
    sizes = {(tmp_path / f"{u}.ply").stat().st_size for u in uids}
    assert len(sizes) >= 3  # cube / sphere / cylinder / cone (cylinder and cone may tie)


def test_other_captions(lc, tmp_path):
    shape_named = lc.LearningCheckConfig(hidden="colour").validate()
    captions = lc.make_objects(shape_named, tmp_path / "colour")
    assert all(c.split()[1] in lc.SHAPES for c in captions.values())
    assert len(set(captions.values())) == 16
    named = lc.LearningCheckConfig(hidden="none", accent="", objects=20).validate()
    captions = lc.make_objects(named, tmp_path / "none")
    assert len(set(captions.values())) == 20  # every caption fixes one object


def test_one_marked_side(lc, tmp_path):
    """``sides=[front]``: every object marked on its front, 4 shapes x 4 colours."""
    cfg = lc.LearningCheckConfig(sides=["front"], objects=16).validate()
    captions = lc.make_objects(cfg, tmp_path)
    assert len(captions) == 16 and len(set(captions.values())) == 4
    assert all(c.endswith("with a marked front") for c in captions.values())


def test_stretch_elongates_along_x_and_keeps_the_marked_side(lc, tmp_path):
    """``stretch=2``: every object twice as long (x) as deep (y); the front (-y) is still the
    marked side, now a long one."""
    cfg = lc.LearningCheckConfig(stretch=2.0, sides=["front"], objects=16).validate()
    lc.make_objects(cfg, tmp_path)
    for ply in sorted(tmp_path.glob("*.ply")):
        v = read_ply_vertices(ply)
        extent = v["xyz"].max(axis=0) - v["xyz"].min(axis=0)
        assert extent[0] == pytest.approx(2 * extent[1], rel=1e-4), ply.name
        black = v["xyz"][(v["rgb"] == lc.COLOURS["black"]).all(axis=1)]
        assert len(black) and (black[:, 1] <= 0).all(), ply.name  # caps touch y = 0


def test_cosine_learning_rate(lc, tmp_path):
    """The shipped trainer's schedule, as learning_check configures it: linear warm-up, then
    a cosine to 0 at the last step (or constant)."""
    from mvdiff.training.trainer import learning_rate

    def rates(**kw):
        cfg = lc.LearningCheckConfig(steps=100, warmup=10, lr=1.0, **kw)
        tcfg = lc.train_config(cfg, "full", 0, ["a.tar"], "b.tar", tmp_path, tmp_path / "run")
        return [learning_rate(s, tcfg) for s in range(100)]

    cosine = rates()
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:]))
    assert cosine[-1] < 0.001
    assert rates(lr_schedule="constant")[99] == 1.0


def test_variants_are_the_trainers_ablation_switches(lc, tmp_path):
    cfg = lc.LearningCheckConfig()
    models = {v: lc.train_config(cfg, v, 1, ["a.tar"], "b.tar", tmp_path, tmp_path).model
              for v in lc.VARIANTS}  # fmt: skip
    assert (models["full"].attention, models["full"].camera) == ("joint", True)
    assert (models["no_3d_attention"].attention, models["no_3d_attention"].camera) == (
        "per_view", True)  # fmt: skip
    assert (models["no_camera"].attention, models["no_camera"].camera) == ("joint", False)
    tcfg = lc.train_config(cfg, "full", 1, ["a.tar"], "b.tar", tmp_path, tmp_path)
    assert tcfg.prediction_type == cfg.prediction == "sample"
    assert (tcfg.optim.weight_decay, tcfg.optim.schedule, tcfg.data.p_2d) == (0.0, "cosine", 0.3)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden", "size", "hidden must be"),
        ("lr_schedule", "linear", "lr_schedule must be"),
        ("palette", ["red", "teal"], "unknown colours ['teal']"),
        ("accent", "white", "unknown colours ['white']"),
        ("variants", ["full", "tiny"], "variants: unknown"),
        ("sides", ["top"], "sides must be"),
        ("objects", 65, "only 64 different objects"),
        ("stretch", 0.0, "stretch must be"),
        ("holdout", "none", "holdout must be"),
    ],
)
def test_bad_config_names_the_field(lc, field, value, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        lc.LearningCheckConfig(**{field: value}).validate()


def test_work_dir_that_is_a_file(lc, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        lc.LearningCheckConfig(work_dir=str(tmp_path / "f")).validate()
