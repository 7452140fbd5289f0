"""Worker processes and the two backends that drive them.

:class:`WorkerHandle` owns one ``mvdiff.render.worker`` process (its own session, so its own
process group). It sends a job, waits for the answer up to the per-object timeout, and on a
timeout kills the whole group; a crash or a kill ends as a failed answer, never an exception.
The worker is restarted lazily and recycled every ``recycle_every`` objects.

A backend runs :func:`run_job` on its slots and hands back ``concurrent.futures.Future``\\ s:

* :class:`LocalBackend` -- one thread per slot, each with its own worker process.
* :class:`RayBackend`   -- one Ray actor per slot (``num_cpus = threads_per_worker``) holding
  a worker process on whichever machine Ray placed it. A local asset travels to it as bytes
  (the file and those it refers to, through Ray's object store), so the machines of a cluster
  need no shared folder; results travel back as bytes. An actor lost with its machine is
  replaced wherever the cluster has room, and its object goes back to the queue.

Either way the main process alone validates samples and writes shards and the manifest.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding `mvdiff/`
#: How a worker process starts (the options JSON is appended). Tests swap in a stand-in that
#: speaks the same protocol without Blender (tests/fixtures/render/fake_worker.py).
DEFAULT_WORKER_COMMAND = (sys.executable, "-m", "mvdiff.render.worker")
WORKER_COMMAND = DEFAULT_WORKER_COMMAND


def worker_options(cfg) -> dict:
    """The part of a :class:`RenderConfig` a worker needs to set its scene up."""
    return {
        "engine": cfg.engine,
        "resolution": cfg.resolution,
        "samples": cfg.samples,
        "denoise": cfg.denoise,
        "denoise_quality": cfg.denoise_quality,
        "denoise_passes": cfg.denoise_passes,
        "denoise_prefilter": cfg.denoise_prefilter,
        "noise_threshold": cfg.noise_threshold,
        "adaptive_min_samples": cfg.adaptive_min_samples,
        "max_bounces": cfg.max_bounces,
        "world_strength": cfg.world_strength,
        "sun_strength": cfg.sun_strength,
        "threads": cfg.threads_per_worker,
        "tuned": cfg.tuned,
        "depth": cfg.depth,
        "normal": cfg.normal,
    }


class WorkerHandle:
    def __init__(self, opts: dict, timeout: float, startup_timeout: float, recycle_every: int):
        self.opts = opts
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self.recycle_every = recycle_every
        self.proc: subprocess.Popen | None = None
        self.served = 0
        self.starts = 0
        self._buf = b""

    # --- process management -----------------------------------------------------------
    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [*WORKER_COMMAND, json.dumps(self.opts)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,  # own process group: killpg takes every child with it
            env=env,
        )
        self.served = 0
        self.starts += 1
        self._buf = b""
        msg = self._read(self.startup_timeout)
        if not (msg and msg.get("ready")):
            why = "timed out" if msg is None and self.proc.poll() is None else "crashed"
            tail = self.log_tail()
            self.kill()
            raise RuntimeError(f"render worker {why} during start-up: {tail}")

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        """Ask the worker to exit (EOF on stdin); kill it if it does not within 5 s."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def log_tail(self, n: int = 300) -> str:
        try:
            self._log.seek(0, os.SEEK_END)
            size = self._log.tell()
            self._log.seek(max(0, size - 4000))
            lines = [
                ln for ln in self._log.read().decode(errors="replace").splitlines() if ln.strip()
            ]
        except (OSError, AttributeError):
            return ""
        return " | ".join(lines[-3:])[-n:]

    def _read(self, timeout: float) -> dict | None:
        """One JSON line from the protocol pipe; None on timeout or EOF."""
        fd = self.proc.stdout.fileno()
        self._eof = False
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self._eof = True
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    # --- one object -------------------------------------------------------------------
    def render(self, job: dict) -> dict:
        """Render one job; always returns an answer dict (see ``worker.py``)."""
        if self.proc is not None and self.served >= self.recycle_every:
            self.close()
        if self.proc is None:
            try:
                self._start()
            except RuntimeError as e:
                return {"uid": job["uid"], "ok": False, "reason": str(e), "retry": True}
        self.served += 1
        t0 = time.monotonic()
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            pass  # the read below sees the dead worker
        answer = self._read(self.timeout)
        if answer is None:
            if self._eof:  # the worker died: give it a moment to report its exit status
                try:
                    code = self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = "?"
                reason = f"worker crashed (exit {code}): {self.log_tail()}"
            else:
                reason = f"timeout: no result after {self.timeout:g} s (worker killed)"
            self.kill()
            return {
                "uid": job["uid"],
                "ok": False,
                "reason": reason,
                "retry": True,
                "seconds": time.monotonic() - t0,
            }
        return answer


def run_job(handle: WorkerHandle, job: dict) -> dict:
    """Render ``job`` with ``handle`` into a temporary folder; return the answer + file bytes.

    ``job["fetch"]`` (optional) is called first to resolve the asset path (downloads);
    ``job["asset"]`` (optional, ``{"main", "files"}`` from
    :func:`mvdiff.render.sources.asset_files`) is written to a temporary folder of this
    machine and rendered from there instead of ``job["path"]``.
    """
    job = dict(job)
    out_dir = tempfile.mkdtemp(prefix="mvdiff-render-")
    asset_dir = None
    t0 = time.monotonic()
    try:
        asset = job.pop("asset", None)
        if asset is not None:
            asset_dir = tempfile.mkdtemp(prefix="mvdiff-asset-")
            for name, data in asset["files"].items():  # relative paths without '..'
                dest = Path(asset_dir, name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
            job["path"] = str(Path(asset_dir, asset["main"]))
        fetch = job.pop("fetch", None)
        if fetch is not None:
            try:
                job["path"] = fetch()
            except Exception as e:
                return {
                    "uid": job["uid"],
                    "ok": False,
                    "retry": True,
                    "reason": f"download failed: {type(e).__name__}: {e}"[:500],
                }
        job["out_dir"] = out_dir
        answer = handle.render(job)
        files = {}
        if answer.get("ok"):
            for name in sorted(os.listdir(out_dir)):
                files[name] = Path(out_dir, name).read_bytes()
        answer["files"] = files
        answer["wall"] = time.monotonic() - t0
        return answer
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        if asset_dir is not None:
            shutil.rmtree(asset_dir, ignore_errors=True)


class LocalBackend:
    """``workers`` slots on this machine; each slot is a thread driving one worker process."""

    def __init__(self, cfg, workers: int):
        opts = worker_options(cfg)
        self.handles = [
            WorkerHandle(opts, cfg.timeout, cfg.startup_timeout, cfg.recycle_every)
            for _ in range(workers)
        ]
        self.pools = [
            cf.ThreadPoolExecutor(1, thread_name_prefix=f"render{i}") for i in range(workers)
        ]
        self._fresh = list(range(workers))

    @property
    def num_slots(self) -> int:
        return len(self.handles)

    def submit(self, slot: int, job: dict) -> cf.Future:
        return self.pools[slot].submit(run_job, self.handles[slot], job)

    #: True while a slot waits for its worker to be placed (never here: workers start lazily).
    starting = False

    def started(self, timeout: float = 0.0) -> list[int]:
        """The slots that can take jobs and were not named before: all of them, once."""
        fresh, self._fresh = self._fresh, []
        return fresh

    def reset(self, slot: int) -> bool:
        """After a job of ``slot`` raised: the next job starts a fresh worker. True: the slot
        can take a job now."""
        self.handles[slot].kill()
        return True

    def close(self, abort: bool = False) -> None:
        """Stop the workers; ``abort`` (objects still in flight, e.g. Ctrl-C) kills them first."""
        if abort:
            for handle in self.handles:
                handle.kill()
        for pool in self.pools:
            pool.shutdown(wait=True, cancel_futures=True)
        for handle in self.handles:
            handle.close()


class RayBackend:
    """``workers`` Ray actors, each holding one worker process (``ray`` extra)."""

    def __init__(self, cfg, workers: int):
        try:
            import ray
        except ImportError:
            from mvdiff.errors import UserError

            raise UserError("--backend ray needs Ray: pip install 'mvdiff[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            kwargs = {"address": cfg.ray_address} if cfg.ray_address else {}
            ray.init(
                **kwargs,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"PYTHONPATH": PACKAGE_ROOT}},
            )
        if workers == 0:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // cfg.threads_per_worker)
        self._actor_cls = ray.remote(num_cpus=cfg.threads_per_worker)(_RenderActor)
        self._args = (worker_options(cfg), cfg.timeout, cfg.startup_timeout, cfg.recycle_every)
        self.actors: list = [None] * workers
        self._starting: dict[int, object] = {}  # slot -> ObjectRef of its new actor's node()
        self.why = ""  # why the last actor that died before it started did
        for slot in range(workers):
            self._start(slot)

    @property
    def num_slots(self) -> int:
        return len(self.actors)

    @property
    def starting(self) -> bool:
        """True while an actor waits to be placed (a cluster may have no room for it yet)."""
        return bool(self._starting)

    def _start(self, slot: int) -> None:
        self.actors[slot] = self._actor_cls.remote(*self._args)
        self._starting[slot] = self.actors[slot].node.remote()

    def started(self, timeout: float = 0.0) -> list[int]:
        """The slots whose actor has started since the last call, waiting up to ``timeout`` s
        for one. Only these take jobs: a job never waits on an actor that has no place (its
        node is gone, the others are full) while other actors could render it."""
        if not self._starting:
            return []
        refs = list(self._starting.values())
        ready, _ = self.ray.wait(refs, num_returns=1 if timeout else len(refs), timeout=timeout)
        back = []
        for slot, ref in list(self._starting.items()):
            if ref in ready:
                del self._starting[slot]
                try:
                    self.ray.get(ref)
                    back.append(slot)
                except Exception as e:  # it died before it started (no mvdiff there?): again
                    self.why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
                    self.reset(slot)
        return back

    def submit(self, slot: int, job: dict) -> cf.Future:
        if job.get("path") and "fetch" not in job:  # a local file: ship it, not its path
            from mvdiff.render.sources import asset_files

            try:
                main, files = asset_files(job["path"])
            except OSError as e:  # gone or unreadable since it was found
                fut: cf.Future = cf.Future()
                fut.set_result({"uid": job["uid"], "ok": False, "retry": False,
                                "reason": f"cannot be read ({e.strerror or e}): {job['path']}"})  # fmt: skip
                return fut
            job = {**job, "asset": {"main": main, "files": files}}
        return self.actors[slot].render.remote(job).future()

    def reset(self, slot: int) -> bool:
        """Replace the actor of ``slot`` after it died (its process, or its whole node). Ray
        places the new one wherever there is room, maybe never: the slot takes jobs again once
        :meth:`started` names it. Returns False (not usable yet)."""
        try:
            self.ray.kill(self.actors[slot])
        except Exception:
            pass
        self._start(slot)
        return False

    def close(self, abort: bool = False) -> None:
        """Stop the actors; ``abort`` (objects in flight: Ctrl-C, SIGTERM, an error) kills
        them at once (a graceful close would wait behind the object an actor renders; its
        worker process exits when it sees its parent gone). Replacements not placed yet are
        killed (a graceful close would wait for a place)."""
        for slot, actor in enumerate(self.actors):
            if not abort and slot not in self._starting:
                try:
                    self.ray.get(actor.close.remote(), timeout=30)
                except Exception:
                    pass
            self.ray.kill(actor)


class _RenderActor:
    def __init__(self, opts, timeout, startup_timeout, recycle_every):
        import socket

        import ray

        self.handle = WorkerHandle(opts, timeout, startup_timeout, recycle_every)
        node_id = ray.get_runtime_context().get_node_id()
        resources = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id), {})
        builtin = ("CPU", "GPU", "memory", "object_store_memory")
        self._node = {
            "id": node_id,
            "host": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(),
            # the node's own resources (`ray start --resources`): which machine, to a person
            "resources": sorted(k for k in resources if k not in builtin and ":" not in k),
        }

    def node(self) -> dict:
        """Where this actor runs: ``{"id", "host", "ip", "resources"}``."""
        return self._node

    def render(self, job: dict) -> dict:
        return {**run_job(self.handle, job), "node": self._node}

    def close(self) -> None:
        self.handle.close()
