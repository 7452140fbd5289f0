"""The job machinery without Blender: a stand-in worker (tests/fixtures/render/fake_worker.py)
speaks the worker protocol, so timeouts, process-group kills, restarts, recycling, retries,
validation, shard limits, the manifest, the progress bar, fsspec output and exit statuses are
checked in seconds."""

import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

from mvdiff.cli import main
from mvdiff.render import pool
from mvdiff.render.config import RenderConfig
from mvdiff.render.pool import WorkerHandle, run_job, worker_options
from mvdiff.render.rigs import make_rig
from mvdiff.render.runner import render_objects
from mvdiff.render.shards import Manifest, check_shard
from tests.scripts import load_script

FAKE_WORKER = Path(__file__).parent / "fixtures" / "render" / "fake_worker.py"
FAST = dict(views=3, resolution=16, workers=2, timeout=10.0, startup_timeout=30.0)


@pytest.fixture(autouse=True)
def fake_worker(monkeypatch):
    monkeypatch.setattr(pool, "WORKER_COMMAND", (sys.executable, str(FAKE_WORKER)))


def assets(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"not read by the fake worker")
    return folder


def attempts(path: Path) -> int:
    log = Path(str(path) + ".attempts")
    return len(log.read_text().split()) if log.exists() else 0


def _alive(arg: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if arg.encode() in cmdline and state != "Z":
            found.append(pid)
    return found


def job_for(path: Path, cfg: RenderConfig) -> dict:
    rig = make_rig(cfg, path.stem)
    return {"uid": path.stem, "path": str(path), "c2w": rig["c2w"].tolist(),
            "fov_deg": rig["fov_deg"]}  # fmt: skip


def test_timeout_kills_the_whole_process_group_and_the_worker_restarts(tmp_path):
    cfg = RenderConfig(output="unused", **FAST)
    folder = assets(tmp_path, "hang.glb", "ok.glb")
    handle = WorkerHandle(worker_options(cfg), timeout=1.5, startup_timeout=30, recycle_every=50)
    answer = run_job(handle, job_for(folder / "hang.glb", cfg))
    assert not answer["ok"] and answer["retry"] and "timeout" in answer["reason"]
    assert handle.proc is None and not _alive("86398"), "the hanging job's child survived"
    answer = run_job(handle, job_for(folder / "ok.glb", cfg))
    assert answer["ok"] and sorted(answer["files"]) == [f"rgba.{v:03d}.png" for v in range(3)]
    assert handle.starts == 2
    handle.close()


def test_a_crash_is_a_failed_answer_and_the_worker_restarts(tmp_path):
    cfg = RenderConfig(output="unused", **FAST)
    folder = assets(tmp_path, "crash.glb", "ok.glb")
    handle = WorkerHandle(worker_options(cfg), timeout=10, startup_timeout=30, recycle_every=50)
    answer = run_job(handle, job_for(folder / "crash.glb", cfg))
    assert not answer["ok"] and answer["retry"] and "exit 7" in answer["reason"]
    assert run_job(handle, job_for(folder / "ok.glb", cfg))["ok"] and handle.starts == 2
    handle.close()


def test_workers_are_recycled_every_n_objects(tmp_path):
    cfg = RenderConfig(output="unused", **FAST)
    folder = assets(tmp_path, "ok.glb")
    handle = WorkerHandle(worker_options(cfg), timeout=10, startup_timeout=30, recycle_every=2)
    pids = [run_job(handle, job_for(folder / "ok.glb", cfg))["pid"] for _ in range(5)]
    handle.close()
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] and handle.starts == 3


def test_retries_are_capped_and_only_valid_samples_enter_shards(tmp_path, capsys):
    folder = assets(tmp_path / "in", "ok1.glb", "ok2.glb", "ok3.glb", "flaky.glb", "crash.glb",
                    "empty.glb", "bad.glb")  # fmt: skip
    out = tmp_path / "out"
    cfg = RenderConfig(inputs=[str(folder)], output=str(out), retries=2, **FAST)
    summary = render_objects(cfg, progress=True)
    assert summary["done"] == 4 and summary["failed"] == 3 and summary["views"] == 12
    # crash and empty: 1 + 2 retries; bad (an asset error): no retry; flaky: once more.
    counts = {p.stem: attempts(p) for p in folder.glob("*.glb")}
    assert counts == {"ok1": 1, "ok2": 1, "ok3": 1, "flaky": 2, "crash": 3, "empty": 3, "bad": 1}
    records = Manifest(out / "manifest.jsonl").records
    assert (
        records["empty"]["reason"] == "invalid output: view 0 is empty (alpha is zero everywhere)"
    )
    assert records["crash"]["reason"].startswith("worker crashed (exit 7)")
    assert records["bad"]["reason"] == "import failed: not a glTF file"
    keys = []
    for shard in out.glob("*.tar"):
        assert check_shard(shard)["errors"] == []
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".json")]
    assert sorted(keys) == ["flaky", "ok1", "ok2", "ok3"]
    # Every manifest line has the documented fields (docs/design.md §3).
    for line in (out / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert {"uid", "source", "status", "shard", "reason", "seconds"} <= set(rec), rec
        assert (rec["status"] == "done") == bool(rec["shard"]) == (rec["reason"] == "")
    # The progress bar shows objects/s, views/s, failures and an ETA; failures are named.
    err = capsys.readouterr().err
    assert "obj/s" in err and "views/s" in err and "3 failed" in err and "<00:00" in err
    assert "failed crash: worker crashed" in err
    # Resume: done objects are skipped, failed ones retried (and fail again here).
    again = render_objects(cfg, progress=False)
    assert again["skipped"] == 4 and again["done"] == 0 and again["failed"] == 3
    assert attempts(folder / "ok1.glb") == 1 and attempts(folder / "bad.glb") == 2


def test_shards_respect_the_count_and_size_limits(tmp_path):
    folder = assets(tmp_path / "in", *[f"ok{i}.glb" for i in range(5)])
    by_count = render_objects(RenderConfig(inputs=[str(folder)], output=str(tmp_path / "a"),
                                           shard_max_samples=2, **FAST), progress=False)  # fmt: skip
    sizes = [check_shard(p)["samples"] for p in sorted((tmp_path / "a").glob("*.tar"))]
    assert by_count["done"] == 5 and sizes == [2, 2, 1]
    render_objects(RenderConfig(inputs=[str(folder)], output=str(tmp_path / "b"),
                                shard_max_bytes=1, **FAST), progress=False)  # fmt: skip
    sizes = [check_shard(p)["samples"] for p in sorted((tmp_path / "b").glob("*.tar"))]
    assert sizes == [1] * 5 and not list((tmp_path / "b").glob("*.tmp"))


def test_fsspec_output_url_and_resume(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    folder = assets(tmp_path / "in", "ok1.glb", "ok2.glb", "bad.glb")
    url = "memory://mvdiff-jobs-test/out"
    cfg = RenderConfig(inputs=[str(folder)], output=url, work_dir=str(tmp_path / "work"), **FAST)
    summary = render_objects(cfg, progress=False)
    assert summary["done"] == 2 and summary["failed"] == 1
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/mvdiff-jobs-test/out", detail=False))
    assert names == ["manifest.jsonl", "mv-000000.tar", "render_config.yaml"]
    assert not list((tmp_path / "work").glob("*.tar"))  # uploaded, then removed locally
    # A fresh work folder: the manifest is read back from the URL.
    again = RenderConfig(**{**cfg.__dict__, "work_dir": str(tmp_path / "work2")})
    assert render_objects(again, progress=False)["skipped"] == 2
    fs.rm("/mvdiff-jobs-test", recursive=True)


def test_cli_exit_status_0_with_failures_and_a_summary(tmp_path, capsys):
    folder = assets(tmp_path / "in", "ok.glb", "bad.glb")
    args = ["render", str(folder), "--output", str(tmp_path / "out"), "--views", "2",
            "--resolution", "16", "--workers", "1", "-q"]  # fmt: skip
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("rendered 1 objects (2 views), 1 failed, 0 already done")
    assert json.loads(lines[-1])["failed"] == 1
    assert main(args) == 0 and json.loads(capsys.readouterr().out.splitlines()[-1])["skipped"] == 1


def test_data_prep_render_script(tmp_path, capsys):
    script = load_script(Path(__file__).parents[1] / "data_prep" / "render.py", "data_prep_render")
    folder = assets(tmp_path / "in", "ok.glb")
    sets = [f"inputs=[{folder}]", f"output={tmp_path / 'out'}", "views=2", "resolution=16",
            "workers=1"]  # fmt: skip
    assert script.main([a for s in sets for a in ("--set", s)] + ["-q"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["done"] == 1
    assert script.main(["--set", "views=0", "--set", f"output={tmp_path}", "-q"]) == 2
    assert "--views" in capsys.readouterr().err


def test_resume_refuses_to_mix_recipes_in_one_output(tmp_path, capsys):
    folder = assets(tmp_path / "in", "ok1.glb", "ok2.glb")
    out = tmp_path / "out"
    args = ["render", str(folder), "--output", str(out), "--views", "2", "--resolution", "16",
            "--workers", "1", "--limit", "1", "-q"]  # fmt: skip
    assert main(args) == 0
    # Other views or resolution would put differently made samples next to the first one.
    assert main([*args[:4], "--views", "3", *args[6:]]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "views 2 -> 3" in err and len(err.strip().splitlines()) == 1
    # Settings that do not change the samples (workers, limit, retries) may change.
    assert main([*args[:-5], "--workers", "2", "--retries", "3", "-q"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["done"] == 1
