"""``render_objects``: objects -> rendered, validated samples -> shards + manifest.

The main process owns the manifest and the shard writer; a backend (local process pool or
Ray) renders. Re-running the same command skips what the manifest says is done, retries what
failed, and recovers shards a killed run left open (see :mod:`mvdiff.render.shards`).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import fcntl
import hashlib
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from mvdiff.config import load_config, save_config
from mvdiff.errors import UserError, interrupts_deferred
from mvdiff.render.config import RenderConfig
from mvdiff.render.rigs import make_rig
from mvdiff.render.shards import MANIFEST, Manifest, SampleInvalid, ShardWriter, build_sample
from mvdiff.render.sources import discover

log = logging.getLogger(__name__)


class _Output:
    """A local folder, or an fsspec URL staged through a local work folder."""

    def __init__(self, cfg: RenderConfig):
        self.url = cfg.output
        self.remote = "://" in cfg.output and not cfg.output.startswith("file://")
        if not self.remote:
            self.local = Path(cfg.output.removeprefix("file://"))
            self.fs = None
            try:
                self.local.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"--output {cfg.output}: cannot create the folder ({e})") from None
            return
        import fsspec

        try:
            self.fs, self.root = fsspec.core.url_to_fs(cfg.output)
        except (ImportError, ValueError) as e:
            raise UserError(f"--output {cfg.output}: {e}") from None
        digest = hashlib.sha1(cfg.output.encode()).hexdigest()[:16]
        self.local = Path(cfg.work_dir or Path.home() / ".cache/mvdiff/render" / digest)
        self.local.mkdir(parents=True, exist_ok=True)
        remote_manifest = f"{self.root}/{MANIFEST}"
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            if not (self.local / MANIFEST).exists() and self.fs.exists(remote_manifest):
                self.fs.get_file(remote_manifest, str(self.local / MANIFEST))
        except Exception as e:  # noqa: BLE001 - no server, no access, no such bucket, ...
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            raise UserError(f"--output {cfg.output}: cannot use it ({msg})") from None

    def publish(self, shard: Path) -> None:
        """After a shard is closed: upload it (temp name, then move) and the manifest."""
        if not self.remote:
            return
        tmp = f"{self.root}/{shard.name}.tmp"
        self.fs.put_file(str(shard), tmp)
        self.fs.mv(tmp, f"{self.root}/{shard.name}")
        self.fs.put_file(str(self.local / MANIFEST), f"{self.root}/{MANIFEST}")

    def sync(self, prefix: str) -> None:
        """On start-up: publish the closed shards of the work folder that the output lacks (a
        run killed between closing a shard and its upload), then the manifest. Before this,
        the output's manifest never names a shard it does not hold, and after it neither."""
        if not self.remote:
            return
        try:
            listing = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:  # object stores: a prefix exists once it holds an object
            listing = []
        remote = {p.rstrip("/").rpartition("/")[2]: p for p in listing}
        for shard in sorted(self.local.glob(f"{prefix}-*.tar")):
            if shard.name not in remote or self.fs.size(remote[shard.name]) != shard.stat().st_size:
                self.publish(shard)
        if (self.local / MANIFEST).exists():
            self.fs.put_file(str(self.local / MANIFEST), f"{self.root}/{MANIFEST}")

    def finish(self, cfg) -> None:
        if self.remote:
            self.fs.put_file(str(self.local / MANIFEST), f"{self.root}/{MANIFEST}")
            with self.fs.open(f"{self.root}/render_config.yaml", "w") as f:
                f.write(Path(self.local / "render_config.yaml").read_text())


# Fields that change what a sample looks like. A resumed run must not mix recipes in one output.
RECIPE_FIELDS = (
    "rig", "views", "elevation_range", "fov_range", "distance_factor_range", "elevations",
    "azimuths", "fov", "distance_factor", "seed", "resolution", "engine", "samples", "denoise",
    "denoise_quality", "denoise_passes", "denoise_prefilter", "noise_threshold",
    "adaptive_min_samples", "max_bounces", "tuned", "world_strength", "sun_strength", "depth",
    "normal",
)  # fmt: skip


def _check_same_recipe(cfg: RenderConfig, saved: Path, manifest: Manifest) -> None:
    """Refuse to add samples rendered with another recipe to an output that holds some."""
    if not saved.is_file() or not manifest.counts().get("done"):
        return
    try:
        old = load_config(RenderConfig, saved).validate()
    except UserError:
        return  # written by another version: nothing reliable to compare with

    def norm(v):
        return [float(x) for x in v] if isinstance(v, (list, tuple)) else v

    changed = [f"{name} {norm(getattr(old, name))} -> {norm(getattr(cfg, name))}"
               for name in RECIPE_FIELDS if norm(getattr(old, name)) != norm(getattr(cfg, name))]  # fmt: skip
    if changed:
        raise UserError(
            f"--output {cfg.output}: holds samples rendered with other settings "
            f"({'; '.join(changed[:3])}); resume with the same settings or use a new output"
        )


def _lock(folder: Path):
    """One run per output folder: a second concurrent run would corrupt the shards."""
    try:
        f = open(folder / ".render.lock", "w")
    except OSError as e:
        raise UserError(f"--output {folder}: cannot write there ({e.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError(f"--output {folder}: another mvdiff render is writing there") from None
    return f


def _make_backend(cfg: RenderConfig, num_objects: int):
    workers = cfg.workers or max(1, (os.cpu_count() or 1) // cfg.threads_per_worker)
    if cfg.backend == "ray":
        from mvdiff.render.pool import RayBackend

        return RayBackend(cfg, min(workers, num_objects) if cfg.workers else 0)
    from mvdiff.render import pool

    if pool.WORKER_COMMAND == pool.DEFAULT_WORKER_COMMAND and not importlib.util.find_spec("bpy"):
        raise UserError("rendering needs Blender's bpy (Python 3.11): pip install 'mvdiff[render]'")
    return pool.LocalBackend(cfg, min(workers, num_objects))


def _write_error(cfg: RenderConfig, e: OSError, done: int) -> UserError:
    return UserError(
        f"--output {cfg.output}: cannot write ({e.strerror or e}); the run stopped, the {done} "
        "objects it rendered are kept; make room and run the same command to resume"
    )


def _close(writer, backend, manifest, lock, bar, abort: bool) -> bool:
    """Close the open shard (if that fails, e.g. disk full, its ``.tmp`` stays for the next
    run to close), stop the workers, release the output; True if the shard was closed."""
    bar.close()
    try:
        writer.close_shard()
        closed = True
    except OSError:
        closed = False
    backend.close(abort=abort)
    manifest.close()
    lock.close()
    return closed


def render_objects(cfg: RenderConfig, progress: bool = True) -> dict:
    """Render every object of ``cfg`` not yet done; return a summary dict."""
    cfg.validate()
    t_start = time.monotonic()
    objects = discover(cfg)
    if not objects:
        raise UserError("no objects to render (give files, folders or Objaverse uids)")
    out = _Output(cfg)
    lock = _lock(out.local)
    try:
        manifest = Manifest(out.local / MANIFEST)
    except (OSError, UnicodeError) as e:
        lock.close()
        raise UserError(f"--output {cfg.output}: cannot use its {MANIFEST} ({e})") from None
    try:
        _check_same_recipe(cfg, out.local / "render_config.yaml", manifest)
        save_config(cfg, out.local / "render_config.yaml")
        writer = ShardWriter(
            out.local, manifest, cfg.shard_prefix, cfg.shard_max_samples, cfg.shard_max_bytes,
            on_close=out.publish,
        )  # fmt: skip
        out.sync(cfg.shard_prefix)
    except (UserError, OSError) as e:
        manifest.close()
        lock.close()
        if isinstance(e, OSError):
            raise _write_error(cfg, e, 0) from None
        raise
    todo = [o for o in objects if not manifest.done(o["uid"])]
    if cfg.limit:
        todo = todo[: cfg.limit]
    summary = {"objects": len(objects), "skipped": len(objects) - len(todo), "done": 0,
               "failed": 0, "views": 0, "recovered_shards": writer.recovered}  # fmt: skip
    try:
        for obj in [o for o in todo if o.get("error")]:  # unreadable inputs: failed, not rendered
            manifest.append({"uid": obj["uid"], "source": obj.get("source", ""), "seconds": 0.0,
                             "status": "failed", "shard": "", "reason": obj["error"]})  # fmt: skip
            summary["failed"] += 1
            if progress:
                tqdm.write(f"failed {obj['uid']}: {obj['error']}", file=sys.stderr)
    except OSError as e:
        manifest.close()
        lock.close()
        raise _write_error(cfg, e, 0) from None
    todo = [o for o in todo if not o.get("error")]
    if not todo:
        manifest.close()
        lock.close()
        summary.update(seconds=time.monotonic() - t_start, output=cfg.output)
        return summary

    backend = _make_backend(cfg, len(todo))
    queue = collections.deque((obj, 0) for obj in todo)
    in_flight: dict[cf.Future, tuple[int, dict, int]] = {}
    free: list[int] = []  # slots that can take a job (a Ray actor once it has a place)
    # objects/s always as a rate (tqdm would flip to s/obj below 1/s), views/s, failures, ETA
    bar = tqdm(total=len(todo), unit="obj", disable=not progress, dynamic_ncols=True,
               desc="render", smoothing=0.1, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
               "[{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")  # fmt: skip
    t_render = time.monotonic()
    try:
        while queue or in_flight:
            free += backend.started()
            if queue and not free and not in_flight:  # no slot yet, or every one was lost
                deadline = time.monotonic() + cfg.startup_timeout
                while not free and time.monotonic() < deadline:
                    free += backend.started(timeout=max(0.1, deadline - time.monotonic()))
                if not free:
                    why = f" (last: {backend.why})" if getattr(backend, "why", "") else ""
                    raise UserError(
                        f"--backend {cfg.backend}: no render worker could start within "
                        f"{cfg.startup_timeout:g} s{why} (--set startup_timeout=...; a Ray "
                        f"cluster without free CPUs?); the {summary['done']} objects rendered "
                        "are kept, the same command resumes"
                    )
            while free and queue:
                obj, attempt = queue.popleft()
                rig = make_rig(cfg, obj["uid"])
                job = {"uid": obj["uid"], "path": obj.get("path", ""),
                       "c2w": rig["c2w"].tolist(), "fov_deg": rig["fov_deg"]}  # fmt: skip
                if "fetch" in obj:
                    job["fetch"] = obj["fetch"]
                slot = free.pop()
                in_flight[backend.submit(slot, job)] = (slot, obj, attempt)
            # while an actor waits for a place, look again every second
            finished, _ = cf.wait(list(in_flight), timeout=1.0 if backend.starting else None,
                                  return_when=cf.FIRST_COMPLETED)  # fmt: skip
            for fut in finished:
                slot, obj, attempt = in_flight.pop(fut)
                try:
                    answer = fut.result()
                    free.append(slot)
                except Exception as e:  # a lost Ray actor (its node died), a bug in a thread
                    reason = " ".join(f"{type(e).__name__}: {e}".split())[:500]
                    answer = {"ok": False, "retry": True, "reason": reason}
                    log.warning("render slot %d lost while rendering %s (%s)", slot, obj["uid"],
                                reason[:200])  # fmt: skip
                    if backend.reset(slot):
                        free.append(slot)
                record = {"uid": obj["uid"], "source": obj.get("source", ""),
                          "seconds": round(float(answer.get("seconds", 0.0)), 3)}  # fmt: skip
                if answer.get("node"):  # Ray: where it ran ({"id", "host", "ip", "resources"})
                    record["node"] = answer["node"]
                if answer.get("ok"):
                    try:
                        members = build_sample(obj, answer, cfg)
                    except SampleInvalid as e:
                        answer = {"ok": False, "retry": True, "reason": f"invalid output: {e}"}
                if answer.get("ok"):
                    with interrupts_deferred():  # the sample, its manifest line and the count
                        try:
                            writer.write(obj["uid"], members, {**record, "reason": ""})
                        except OSError as e:  # disk full, output folder gone, ...
                            raise _write_error(cfg, e, summary["done"]) from None
                        summary["done"] += 1
                        summary["views"] += len(answer["fov_deg"])
                elif answer.get("retry") and attempt < cfg.retries:
                    queue.append((obj, attempt + 1))
                    continue
                else:
                    reason = answer.get("reason", "unknown")
                    try:
                        manifest.append(
                            {**record, "status": "failed", "shard": "", "reason": reason}
                        )
                    except OSError as e:
                        raise _write_error(cfg, e, summary["done"]) from None
                    summary["failed"] += 1
                    if progress:
                        tqdm.write(f"failed {obj['uid']}: {reason}", file=sys.stderr)
                bar.update(1)
                elapsed = max(time.monotonic() - t_render, 1e-6)
                bar.set_postfix_str(
                    f"{summary['views'] / elapsed:.2f} views/s, {summary['failed']} failed"
                )
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (mvdiff.errors.Terminated)
        closed = _close(writer, backend, manifest, lock, bar, abort=True)
        kept = "are saved" if closed else "are recorded (the open shard is closed on the next run)"
        e.args = (f"the {summary['done']} objects rendered by this run {kept} in {cfg.output}, "
                  f"{len(in_flight)} in flight abandoned; the same command resumes",)  # fmt: skip
        raise
    except BaseException:
        _close(writer, backend, manifest, lock, bar, abort=bool(in_flight))
        raise
    if not _close(writer, backend, manifest, lock, bar, abort=False):
        raise UserError(f"--output {cfg.output}: cannot close the last shard (disk full?); "
                        "the same command closes it and resumes")  # fmt: skip
    out.finish(cfg)
    if out.remote:
        for shard in out.local.glob(f"{cfg.shard_prefix}-*.tar"):
            shard.unlink()  # uploaded; the manifest in the work folder keeps the state
    summary.update(seconds=round(time.monotonic() - t_start, 3), output=cfg.output)
    return summary
