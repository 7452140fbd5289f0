"""Faults and hostile inputs of ``mvdiff render`` and ``mvdiff shard-info``: what the user gets.

Each test name is a promise: entry point, the bad input or fault, what happens. Rendering runs
the stand-in worker (tests/fixtures/render/fake_worker.py, the real worker protocol without
Blender), in real ``mvdiff`` subprocesses where a signal or a full disk is involved.
"""

import errno
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvdiff.cli import main
from mvdiff.render import pool
from mvdiff.render.config import RenderConfig
from mvdiff.render.runner import render_objects
from mvdiff.render.shards import Manifest, check_shard

FAKE_WORKER = Path(__file__).parent / "fixtures" / "render" / "fake_worker.py"
ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# `mvdiff ARGS` in a subprocess, its render workers replaced by the stand-in.
RUN_CLI = (
    "import sys; from mvdiff.render import pool; "
    f"pool.WORKER_COMMAND = (sys.executable, {str(FAKE_WORKER)!r}); "
    "from mvdiff.cli import main; sys.exit(main(sys.argv[1:]))"
)


def mvdiff_cmd(*args) -> list[str]:
    return [sys.executable, "-c", RUN_CLI, *map(str, args)]


def assets(folder: Path, *names: str, content: str = "x") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(content)
    return folder


def attempts(path: Path) -> int:
    log = Path(str(path) + ".attempts")
    return len(log.read_text().split()) if log.exists() else 0


def shard_keys(folder: Path) -> list[str]:
    """Sample keys of every final shard, each shard checked against the schema first."""
    keys = []
    for shard in sorted(folder.glob("*.tar")):
        report = check_shard(shard)
        assert report["errors"] == [], report
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".json")]
    return keys


# --- render inputs ----------------------------------------------------------------------
def test_render_records_unreadable_inputs_as_failed_and_renders_the_rest(tmp_path, monkeypatch):
    """`mvdiff render FOLDER` whose folder holds a symlink loop, a dangling symlink, a FIFO,
    a file that cannot be read, a folder named like an asset and a file name with a newline,
    plus an explicit symlink-loop
    argument: the good assets render, each bad one is a `failed` manifest line with its
    reason (no traceback, no importer blocked on a FIFO); a rerun retries only those."""
    monkeypatch.setattr(pool, "WORKER_COMMAND", (sys.executable, str(FAKE_WORKER)))
    inputs = assets(tmp_path / "in", "ok1.glb", "ok2.glb", "ok\nnewline.glb")
    (inputs / "loop.glb").symlink_to("loop.glb")
    (inputs / "dangling.glb").symlink_to("gone.glb")
    os.mkfifo(inputs / "fifo.glb")
    (inputs / "eio.glb").symlink_to("/proc/self/mem")  # a regular file whose read fails (EIO)
    (inputs / "folder.glb").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cycle.obj").symlink_to(tmp_path / "other" / "cycle.obj")
    out = tmp_path / "out"
    cfg = RenderConfig(inputs=[str(inputs), str(tmp_path / "other" / "cycle.obj")],
                       output=str(out), views=2, resolution=16, workers=1, timeout=10.0)  # fmt: skip
    summary = render_objects(cfg, progress=False)
    assert (summary["done"], summary["failed"]) == (3, 6), summary
    records = Manifest(out / "manifest.jsonl").records
    assert all(records[u]["status"] == "done" for u in ["ok1", "ok2", "ok_newline"])
    reasons = {u: r["reason"] for u, r in records.items() if r["status"] == "failed"}
    assert reasons["loop"].startswith("symlink loop") and reasons["cycle"].startswith("symlink")
    assert reasons["dangling"].startswith("dangling symlink")
    assert reasons["fifo"].startswith("not a regular file")
    assert reasons["folder"].startswith("not a regular file")
    assert reasons["eio"].startswith("cannot be read")
    assert all("\n" not in r for r in reasons.values())
    assert sorted(shard_keys(out)) == ["ok1", "ok2", "ok_newline"]
    # The importer never saw the bad ones; a rerun skips the done ones.
    assert attempts(inputs / "ok1.glb") == 1
    (inputs / "dangling.glb").unlink()
    (inputs / "dangling.glb").write_text("now here")
    again = render_objects(cfg, progress=False)
    assert (again["skipped"], again["done"], again["failed"]) == (3, 1, 5), again
    assert attempts(inputs / "ok1.glb") == 1


def test_render_input_that_does_not_exist_is_one_line_even_with_a_newline_in_its_name(
    tmp_path, capsys
):
    """`mvdiff render MISSING` (its name holding a newline): exit 2, one line naming the
    input, the newline escaped."""
    missing = tmp_path / "no\npe.glb"
    assert main(["render", str(missing), "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no\\npe.glb: no such file or folder" in err[0], err


def test_render_resumes_past_a_damaged_manifest(tmp_path, monkeypatch):
    """`mvdiff render` resuming with a manifest.jsonl holding lines that are not records (a
    list, a string, a uid that is a number, a `done` line without a shard name, binary junk):
    those lines are ignored, the real records still count, the rest renders."""
    monkeypatch.setattr(pool, "WORKER_COMMAND", (sys.executable, str(FAKE_WORKER)))
    inputs = assets(tmp_path / "in", "ok1.glb", "ok2.glb")
    out = tmp_path / "out"
    cfg = RenderConfig(inputs=[str(inputs)], output=str(out), views=2, resolution=16, workers=1)
    render_objects(RenderConfig(**{**cfg.__dict__, "limit": 1}), progress=False)
    with open(out / "manifest.jsonl", "ab") as f:
        f.write(b'[1, 2]\n"text"\n{"uid": 5, "status": "done"}\n')
        f.write(b'{"uid": "ok2", "status": "done", "shard": 7}\n\xff\xfe junk\n{"uid"')
    summary = render_objects(cfg, progress=False)
    assert (summary["skipped"], summary["done"], summary["failed"]) == (1, 1, 0), summary
    assert sorted(shard_keys(out)) == ["ok1", "ok2"]


class InterruptedMembers(dict):
    """A sample's members whose writing is interrupted after the first member (a signal or a
    full disk arriving mid-sample)."""

    def __init__(self, members, exc):
        super().__init__(members)
        self.exc = exc

    def items(self):
        first = next(iter(super().items()))
        yield first
        raise self.exc


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left")])
def test_render_shard_writer_interrupted_mid_sample_leaves_no_trace_of_it(tmp_path, exc):
    """A sample whose writing is cut off (Ctrl-C, SIGTERM, disk full) is not in the shard the
    run then closes, nor in the manifest; the samples before it are intact."""
    from mvdiff.render.shards import ShardWriter

    manifest = Manifest(tmp_path / "manifest.jsonl")
    writer = ShardWriter(tmp_path, manifest, max_samples=10)
    for uid in "ab":
        writer.write(uid, sample_members(uid), {"uid": uid, "source": ""})
    with pytest.raises(type(exc)):
        writer.write("c", InterruptedMembers(sample_members("c"), exc), {"uid": "c"})
    writer.close_shard()
    manifest.close()
    assert shard_keys(tmp_path) == ["a", "b"] and not list(tmp_path.glob("*.tmp"))
    assert sorted(Manifest(tmp_path / "manifest.jsonl").records) == ["a", "b"]


def test_render_resume_never_pads_a_shard_whose_tail_was_lost(tmp_path):
    """Resuming after the tail of an unclosed shard was lost (the samples the manifest says
    are in it are not all there): the shard is closed after the last whole sample, the
    missing samples get a `lost` manifest line and render again, nothing is zero-padded."""
    from mvdiff.render.shards import ShardWriter

    manifest = Manifest(tmp_path / "manifest.jsonl")
    writer = ShardWriter(tmp_path, manifest, max_samples=10)
    for uid in "abc":
        writer.write(uid, sample_members(uid), {"uid": uid, "source": ""})
    ends = {r["uid"]: r["end"] for r in manifest.records.values()}
    manifest.close()
    tmp = tmp_path / "mv-000000.tar.tmp"
    with open(tmp, "r+b") as f:
        f.truncate(ends["b"] + 700)  # "c" half gone, as after a crash of the disk
    again = Manifest(tmp_path / "manifest.jsonl")
    assert ShardWriter(tmp_path, again).recovered == ["mv-000000.tar"]
    assert shard_keys(tmp_path) == ["a", "b"]
    assert again.done("a") and again.done("b") and not again.done("c")
    assert Manifest(tmp_path / "manifest.jsonl").records["c"]["status"] == "lost"


# --- signals ----------------------------------------------------------------------------
def test_render_sigterm_closes_shards_writes_the_manifest_exits_143_and_resumes(tmp_path):
    """SIGTERM to `mvdiff render` mid-run: the object in flight is abandoned (its worker
    killed), every finished object is in a closed, valid shard and in the manifest, no
    `.tmp` is left, exit status 143 with one line on stderr; the same command then renders
    only the abandoned object."""
    inputs = assets(tmp_path / "in", *[f"ok{i}.glb" for i in range(5)])
    slow = inputs / "slow.glb"
    slow.write_text("60")  # in flight when the signal comes
    out = tmp_path / "out"
    args = ["render", inputs, "-o", out, "--views", "2", "--resolution", "16", "--workers",
            "2", "--shard-max-samples", "3", "-q"]  # fmt: skip
    proc = subprocess.Popen(mvdiff_cmd(*args), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_text().count('"done"') == 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None and attempts(slow) == 1, proc.communicate()
    worker = int(Path(str(slow) + ".attempts").read_text().split()[0])
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mvdiff render: terminated (SIGTERM)"), stderr
    assert "5 objects" in lines[0] and "resumes" in lines[0]
    assert not list(out.glob("*.tmp")), "an unclosed shard was left"
    assert sorted(shard_keys(out)) == [f"ok{i}" for i in range(5)]
    assert sorted(Manifest(manifest).records) == [f"ok{i}" for i in range(5)]
    assert not Path(f"/proc/{worker}").exists(), "the worker of the abandoned object lives on"
    slow.write_text("0")
    done = subprocess.run(mvdiff_cmd(*args), env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["skipped"], summary["done"], summary["failed"]) == (5, 1, 0)
    assert sorted(shard_keys(out)) == sorted([f"ok{i}" for i in range(5)] + ["slow"])
    assert all(attempts(inputs / f"ok{i}.glb") == 1 for i in range(5))


def test_cli_sigterm_handler_lets_a_forked_child_die_as_before():
    """The `mvdiff` SIGTERM handler raises only in the process that installed it: a child
    forked from it (a DataLoader worker, a pool process) still dies by SIGTERM, quietly."""
    from mvdiff.cli import _terminated_handler

    handler = _terminated_handler(os.getpid())
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            signal.signal(signal.SIGTERM, handler)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status


def test_cli_sigterm_during_a_write_is_raised_when_the_write_is_done():
    """SIGTERM while a sample and its manifest line (or a checkpoint and its step) are being
    written is held until both are (`interrupts_deferred`), then raised as `Terminated`."""
    from mvdiff.cli import _terminated_handler
    from mvdiff.errors import Terminated, interrupts_deferred

    previous = signal.signal(signal.SIGTERM, _terminated_handler(os.getpid()))
    finished = []
    try:
        with pytest.raises(Terminated):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the handler has run by now
                finished.append("write")
                finished.append("bookkeeping")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert finished == ["write", "bookkeeping"]


@pytest.mark.slow
def test_render_sigterm_with_blender_workers_then_resume_renders_every_object_once(tmp_path):
    """The same with real Blender workers (`mvdiff render`, Workbench engine, 32²): SIGTERM
    after some objects are done -> exit 143, one line, valid closed shards, no `.tmp`; the
    same command renders the rest, every object exactly once."""
    pytest.importorskip("bpy")
    import shutil

    fixtures = Path(__file__).parent / "fixtures" / "assets"
    inputs = tmp_path / "in"
    for i in range(4):
        (inputs / f"set{i}").mkdir(parents=True)
        for name in ["monkey.glb", "BoxTextured.glb"]:
            shutil.copy(fixtures / name, inputs / f"set{i}" / name)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mvdiff.cli", "render", str(inputs), "-o", str(out),
            "--engine", "BLENDER_WORKBENCH", "--views", "2", "--resolution", "32",
            "--workers", "1", "--shard-max-samples", "3", "-q"]  # fmt: skip
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_text().count('"done"') >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mvdiff render: terminated (SIGTERM)"), stderr
    assert not list(out.glob("*.tmp"))
    first = shard_keys(out)
    assert len(first) >= 4 and sorted(first) == sorted(Manifest(manifest).records)
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["skipped"] == len(first)
    keys = shard_keys(out)
    assert len(keys) == 8 and len(set(keys)) == 8


# --- disk full --------------------------------------------------------------------------
class SmallDisk:
    """An output folder that fills up after about ``size`` bytes: a tmpfs of that size where
    this process may mount one (root), otherwise RLIMIT_FSIZE in the child process (a write
    past ``size / 3`` bytes of one file, so one shard, fails with EFBIG; SIGXFSZ ignored).
    ``grow()`` makes room."""

    def __init__(self, folder: Path, size: int):
        self.folder, self.size = folder, size
        folder.mkdir(parents=True)
        mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
        self.tmpfs = (
            os.geteuid() == 0 and subprocess.run(mount, capture_output=True).returncode == 0
        )
        self.limited = not self.tmpfs

    def preexec(self):
        if self.limited:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.size // 3, self.size // 3))

    def grow(self) -> None:
        if self.tmpfs:
            remount = ["mount", "-o", "remount,size=16m", str(self.folder)]
            subprocess.run(remount, check=True)
        self.limited = False

    def close(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    disks = []

    def make(size: int) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", size))
        return disks[-1]

    yield make
    for disk in disks:
        disk.close()


def test_render_disk_full_stops_with_one_line_keeps_what_is_done_and_resumes(tmp_path, small_disk):
    """`mvdiff render` whose output fills up mid-run: exit 2 and one line (`cannot write`),
    every final shard valid and every `done` line backed by a complete sample (the sample
    being written is cut off), no half-written manifest line; after making room, the same
    command renders the rest and every object ends in the shards exactly once."""
    disk = small_disk(48 * 1024)
    out = disk.folder / "out"
    names = [f"ok{i:02d}.glb" for i in range(14)]
    inputs = assets(tmp_path / "in", *names)
    args = ["render", inputs, "-o", out, "--views", "4", "--resolution", "64", "--workers",
            "1", "--shard-max-samples", "4", "-q"]  # fmt: skip
    run = subprocess.run(mvdiff_cmd(*args), env=ENV, capture_output=True, text=True,
                         timeout=120, preexec_fn=disk.preexec)  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] and "resume" in lines[0], run.stderr
    raw = (out / "manifest.jsonl").read_bytes()
    assert raw.endswith(b"\n") and all(json.loads(ln) for ln in raw.splitlines())
    records = Manifest(out / "manifest.jsonl").records
    assert 0 < len(records) < len(names)
    kept = shard_keys(out)
    assert set(kept) <= set(records)  # no final shard holds a sample the manifest lacks
    disk.grow()
    again = subprocess.run(mvdiff_cmd(*args), env=ENV, capture_output=True, text=True,
                           timeout=120, preexec_fn=disk.preexec)  # fmt: skip
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == len(records) and summary["failed"] == 0
    assert not list(out.glob("*.tmp"))
    keys = shard_keys(out)
    assert sorted(keys) == sorted(Path(n).stem for n in names)  # each exactly once
    assert all(r["status"] == "done" for r in Manifest(out / "manifest.jsonl").records.values())


# --- shard-info -------------------------------------------------------------------------
def png(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def sample_members(uid: str, views: int = 2, res: int = 16) -> dict[str, bytes]:
    """A valid schema-1 sample: an opaque square on every view, cameras on an orbit."""
    from mvdiff.cameras import orbit_c2w

    c2w = orbit_c2w(np.full(views, 10.0), np.arange(views) * 90.0, 2.0).astype(np.float32)
    rgba = np.zeros((res, res, 4), np.uint8)
    rgba[res // 4 : 3 * res // 4, res // 4 : 3 * res // 4] = (200, 80, 40, 255)
    meta = {"schema": 1, "uid": uid, "caption": "a box", "source": "test", "license": "",
            "num_views": views, "resolution": res, "engine": "CYCLES", "samples": 1,
            "fov_deg": [40.0] * views, "elevation_deg": [10.0] * views,
            "azimuth_deg": [90.0 * v for v in range(views)], "distance": [2.0] * views,
            "normalization": {"scale": 1.0, "offset": [0.0, 0.0, 0.0]}}  # fmt: skip
    buf = io.BytesIO()
    np.save(buf, c2w)
    members = {"json": json.dumps(meta).encode(), "cameras.npy": buf.getvalue()}
    members.update({f"rgba.{v:03d}.png": png(rgba) for v in range(views)})
    return members


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """A tar shard (Python's tarfile, as webdataset writes them) of ``{uid: members}``."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for uid, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{uid}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_shard_info_reports_a_shard_cut_at_any_point_as_truncated(tmp_path, capsys):
    """`mvdiff shard-info SHARD` on a shard cut anywhere before its end-of-archive marker --
    inside a header, inside a member, exactly between two samples, inside the marker -- says
    `truncated` and exits 1; the samples before the cut are still counted."""
    good = write_shard(tmp_path / "good.tar", {u: sample_members(u) for u in "abc"})
    assert check_shard(good)["errors"] == []
    data = good.read_bytes()
    with tarfile.open(good) as tar:
        members = tar.getmembers()
        end = tar.offset  # where the end-of-archive marker starts
    starts = [m.offset for m in members if m.name.endswith(".json")]  # of samples a, b, c
    cuts = sorted(set(range(512, end + 1024, 512)) | {end + 1, 700, starts[1] + 100})
    cut = tmp_path / "cut.tar"
    for n in cuts:
        cut.write_bytes(data[:n])
        report = check_shard(cut)
        assert any("truncated" in e for e in report["errors"]), (n, report)
    # Exactly at a sample boundary: two complete samples, reported as truncated (exit 1).
    cut.write_bytes(data[: starts[2]])
    assert main(["shard-info", str(cut)]) == 1
    out = capsys.readouterr().out
    assert "2 samples" in out and "truncated" in out and "ok" not in out.split("\n")[0]
    # The record padding after the marker is not data: a shard cut there is whole.
    cut.write_bytes(data[: end + 1024])
    assert check_shard(cut)["errors"] == []


def bomb_png() -> bytes:
    """A 16x16 PNG whose header declares 60000 x 60000 pixels (a decompression bomb)."""
    import struct
    import zlib

    data = bytearray(png(np.zeros((16, 16, 4), np.uint8)))
    ihdr = struct.pack(">II", 60000, 60000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def pickled_cameras() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"c2w": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def with_json(**changes) -> dict[str, bytes]:
    members = sample_members("s")
    meta = json.loads(members["json"])
    members["json"] = json.dumps({**meta, **changes}).encode()
    return members


NAN_CAMERAS = np.full((2, 4, 4), np.nan, np.float32)
HOSTILE_SAMPLES = {  # name -> (members of sample "s", words of the problem reported)
    "json is a list": ({**sample_members("s"), "json": b"[1, 2]"}, "expected an object"),
    "json is a number": ({**sample_members("s"), "json": b"7"}, "expected an object"),
    "json is not utf-8": ({**sample_members("s"), "json": b"\xff\xfe{"}, "bad .json"),
    "num_views is text": (with_json(num_views="2"), "num_views"),
    "num_views is huge": (with_json(num_views=10**12), "fov_deg"),
    "fov_deg is a number": (with_json(fov_deg=40), "fov_deg"),
    "offset is a number": (with_json(normalization={"scale": 1, "offset": 0}), "normalization"),
    "pickled cameras": ({**sample_members("s"), "cameras.npy": pickled_cameras()}, "cameras.npy"),
    "non-finite cameras": ({**sample_members("s"), "cameras.npy": npy(NAN_CAMERAS)}, "finite"),
    "png is text": ({**sample_members("s"), "rgba.001.png": b"not an image"}, "rgba.001.png"),
    "decompression bomb": ({**sample_members("s"), "rgba.000.png": bomb_png()}, "rgba.000.png"),
}


@pytest.mark.parametrize("case", list(HOSTILE_SAMPLES))
def test_shard_info_reports_hostile_samples_in_one_line_each(tmp_path, capsys, case):
    """`mvdiff shard-info` (and `--contact-sheet`) on a shard holding a hostile sample next to
    a good one: exit 1, the good sample counted, the bad one named with its problem on one
    line; nothing raises, nothing is unpickled, no huge image is decoded."""
    members, words = HOSTILE_SAMPLES[case]
    shard = write_shard(tmp_path / "mixed.tar", {"good": sample_members("good"), "s": members})
    sheet = tmp_path / "sheet.png"
    assert main(["shard-info", str(shard), "--contact-sheet", str(sheet)]) == 1
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[0].endswith("1 samples, 2 views, 1 problem(s)"), lines
    assert lines[1].startswith("  s: ") and words in lines[1], lines
    assert Image.open(sheet).size == (2 * 128, 128)  # the good sample only


# --- other hostile inputs -----------------------------------------------------------------
def test_render_unusable_output_captions_config_or_uid_list_are_one_line(tmp_path, capsys):
    """`mvdiff render` whose output folder cannot be written (its lock or manifest is a
    folder), or whose --captions, --config or --objaverse-uids file is not UTF-8: exit 2,
    one line naming the flag or file."""
    inputs = assets(tmp_path / "in", "ok.glb")
    for blocker in (".render.lock", "manifest.jsonl"):
        out = tmp_path / f"out-{blocker}"
        (out / blocker).mkdir(parents=True)
        assert main(["render", str(inputs), "-o", str(out), "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"mvdiff render: error: --output {out}"), err
    captions = tmp_path / "captions.csv"
    captions.write_bytes(b"uid,caption\n\xff\xfe,broken\n")
    assert main(["render", str(inputs), "-o", str(tmp_path / "o"), "--captions",
                 str(captions), "-q"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--captions" in err[0] and "UTF-8" in err[0], err
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    assert main(["render", str(inputs), "-o", str(tmp_path / "o"), "--config", str(binary)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--config {binary}: not valid YAML" in err[0], err
    uids = ["render", "-o", str(tmp_path / "o"), "--objaverse-uids", str(binary), "-q"]
    assert main(uids) == 2  # (or: the objaverse package is missing; one line either way)
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
