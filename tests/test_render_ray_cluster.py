"""Ray across machines, simulated on this one: a head node and a worker node started with
``ray start`` (each with its own resources, temp dir and ports; the worker node in a mount
namespace where the input folder is an empty tmpfs, when this machine allows ``unshare``),
then ``mvdiff render --backend ray`` as a user runs it (``RAY_ADDRESS``). The objects spread
over both nodes, the worker node renders assets it cannot see (their bytes travel through
Ray's object store), and when the worker node is killed mid-run (SIGKILL to its process
group: raylet, agents, actors) the run still ends with every object rendered exactly once.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mvdiff.errors import UserError
from mvdiff.render.config import RenderConfig
from mvdiff.render.runner import render_objects
from mvdiff.render.shards import Manifest, check_shard
from mvdiff.render.sources import asset_files

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "fixtures" / "assets"


def test_asset_files_bundle_what_an_asset_refers_to(tmp_path):
    """An .obj ships with its .mtl and textures, a .gltf with its buffers and images (not its
    data: URIs), a texture in a sibling folder under a common root; a missing one is left out."""
    main, files = asset_files(ASSETS / "capsule.obj")
    assert main == "capsule.obj" and sorted(files) == ["capsule.mtl", "capsule.obj", "capsule0.jpg"]
    assert files["capsule0.jpg"] == (ASSETS / "capsule0.jpg").read_bytes()
    (tmp_path / "model").mkdir()
    (tmp_path / "tex").mkdir()
    (tmp_path / "tex" / "wood grain.png").write_bytes(b"png")
    (tmp_path / "model" / "mesh.bin").write_bytes(b"bin")
    doc = {"buffers": [{"uri": "mesh.bin"}, {"uri": "data:application/octet-stream;base64,AA=="}],
           "images": [{"uri": "../tex/wood%20grain.png"}, {"uri": "gone.png"}]}  # fmt: skip
    (tmp_path / "model" / "scene.gltf").write_text(json.dumps(doc))
    main, files = asset_files(tmp_path / "model" / "scene.gltf")
    assert main == "model/scene.gltf"
    assert sorted(files) == ["model/mesh.bin", "model/scene.gltf", "tex/wood grain.png"]
    assert asset_files(ASSETS / "monkey.glb")[1].keys() == {"monkey.glb"}


@pytest.mark.slow
def test_a_ray_cluster_without_room_for_a_worker_is_a_one_line_error(tmp_path):
    """Actors that no node can place (2 CPUs each on a 1-CPU cluster) take no jobs: the run
    stops within --set startup_timeout with one line that says so, instead of waiting forever."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        cfg = RenderConfig(inputs=[str(ASSETS / "monkey.glb")], output=str(tmp_path / "out"),
                           backend="ray", workers=1, threads_per_worker=2, startup_timeout=3.0,
                           views=1, resolution=16, samples=1)  # fmt: skip
        t0 = time.monotonic()
        with pytest.raises(UserError, match=r"^--backend ray: no render worker could start "
                           r"within 3 s .* the same command resumes$") as e:  # fmt: skip
            render_objects(cfg, progress=False)
        assert "\n" not in str(e.value) and time.monotonic() - t0 < 60
        assert Manifest(tmp_path / "out" / "manifest.jsonl").records == {}
    finally:
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports() -> list[str]:
    """Every port a node listens on, free ones: two nodes share this machine (and others may
    run Ray here), so none of Ray's fixed defaults."""
    flags = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]  # fmt: skip
    return [x for flag in flags for x in (flag, str(_free_port()))]


def _can_hide(folder: Path) -> bool:
    """Whether a process may get a mount namespace where ``folder`` is an empty tmpfs."""
    if not shutil.which("unshare"):
        return False
    (folder / "probe").write_text("x")
    try:
        probe = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs tmpfs "$0" && test ! -e "$0/probe"', str(folder)],
            capture_output=True, timeout=10,
        )  # fmt: skip
        return probe.returncode == 0
    finally:
        (folder / "probe").unlink()


def _stop(proc: subprocess.Popen) -> None:
    """Stop one node: what its ``ray start --block`` started, and nothing else. Its processes
    keep the session it was started in (Ray's workers get their own process groups)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=3)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        pid, sid = map(int, line.split())
        if sid == proc.pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait(timeout=10)


def _start_cluster(base: Path, env: dict, inputs: Path, hidden: bool, nodes: dict) -> int:
    """Start the head and the worker node (into ``nodes``, so that the caller stops what
    started); return the head's port. RuntimeError with the log if a node does not start."""
    port = _free_port()
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
              "--include-log-monitor", "false", "--block"]  # fmt: skip
    head_cmd = ["ray", "start", "--head", "--port", str(port), "--resources", '{"nodeA": 1}',
                "--temp-dir", str(base / "a"), "--include-dashboard", "false",
                "--dashboard-port", str(_free_port()),
                "--ray-client-server-port", str(_free_port()), *_ports(), *common]  # fmt: skip
    worker_cmd = ["ray", "start", "--address", f"127.0.0.1:{port}", "--resources",
                  '{"nodeB": 1}', "--temp-dir", str(base / "b"), *_ports(), *common]  # fmt: skip
    if hidden:  # the worker node's own view of the file system: no inputs folder content
        worker_cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                      'mount -t tmpfs tmpfs "$0" && shift && exec "$@"', str(inputs), "--",
                      *worker_cmd]  # fmt: skip
    deadline = time.monotonic() + 90

    def started(name: str, ready) -> None:
        while not ready():
            if nodes[name].poll() is not None or time.monotonic() > deadline:
                tail = (base / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"ray {name} node did not start: {tail}")
            time.sleep(0.2)

    def listens() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    base.mkdir()
    for name, cmd in (("head", head_cmd), ("worker", worker_cmd)):
        with open(base / f"{name}.log", "wb") as f:
            nodes[name] = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                           start_new_session=True)  # fmt: skip
        if name == "head":  # the worker node joins once the head's GCS listens
            started(name, listens)
    for name in nodes:
        log = base / f"{name}.log"
        started(name, lambda log=log: b"Ray runtime started" in log.read_bytes())
    return port


@pytest.fixture
def ray_cluster(tmp_path):
    """A head node (1 CPU, resource ``nodeA``) and a worker node (1 CPU, ``nodeB``), each with
    its own temp dir, joined by token authentication; ``inputs`` is hidden from the worker node
    when ``hidden``. Yields a namespace with ``address``, ``env`` (for a driver), the nodes.
    Ray gives a node 30 s to register: on a loaded machine that may pass, so a second try."""
    pytest.importorskip("ray")
    if not shutil.which("ray"):
        pytest.skip("the ray command is not on PATH")
    # Ray's socket paths live under the temp dir and must stay under 108 bytes: a short one
    base = Path(tempfile.mkdtemp(prefix="mvray", dir="/tmp"))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))  # fmt: skip
    hidden = _can_hide(inputs)
    nodes: dict[str, subprocess.Popen] = {}
    try:
        for attempt in range(2):
            try:
                port = _start_cluster(base / f"t{attempt}", env, inputs, hidden, nodes)
                break
            except RuntimeError as e:
                for proc in reversed(list(nodes.values())):
                    _stop(proc)
                nodes.clear()
                if attempt:
                    pytest.fail(str(e))
        yield SimpleNamespace(address=f"127.0.0.1:{port}", env=env, inputs=inputs,
                              hidden=hidden, head=nodes["head"], worker=nodes["worker"])  # fmt: skip
    finally:
        for proc in reversed(list(nodes.values())):
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


def _done_on(manifest: Path, resource: str) -> int:
    if not manifest.exists():
        return 0
    lines = manifest.read_text().splitlines()
    records = [json.loads(x) for x in lines if x.endswith("}")]
    return sum(
        r["status"] == "done" and resource in r.get("node", {}).get("resources", [])
        for r in records
    )


@pytest.mark.slow
def test_two_nodes_render_every_object_exactly_once_when_one_dies(ray_cluster, tmp_path):
    pytest.importorskip("bpy")
    inputs = ray_cluster.inputs
    for name in ["monkey.glb", "BoxTextured.glb", "rabbit.obj", "rabbit.mtl", "capsule.obj",
                 "capsule.mtl", "capsule0.jpg"]:  # fmt: skip
        shutil.copy(ASSETS / name, inputs / name)
    for copy in "23":  # 12 objects: enough for both nodes to join before the queue runs dry
        for name in ["monkey.glb", "BoxTextured.glb", "rabbit.obj", "capsule.obj"]:
            shutil.copy(ASSETS / name, inputs / name.replace(".", f"{copy}."))
    uids = sorted(p.stem for p in inputs.iterdir() if p.suffix in (".glb", ".obj"))
    if ray_cluster.hidden:  # the worker node sees an empty folder where the inputs are
        assert not Path(f"/proc/{ray_cluster.worker.pid}/root{inputs}/monkey.glb").exists()
        assert (inputs / "monkey.glb").exists()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mvdiff.cli", "render", str(inputs), "--output", str(out),
           "--backend", "ray", "--workers", "2", "--views", "4", "--resolution", "64",
           "--samples", "4", "--retries", "2", "--shard-max-samples", "3", "-q",
           "--set", "startup_timeout=60"]  # fmt: skip
    env = dict(ray_cluster.env, RAY_ADDRESS=ray_cluster.address)
    log = tmp_path / "render.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        manifest = out / "manifest.jsonl"
        deadline = time.monotonic() + 150
        while _done_on(manifest, "nodeB") < 1:  # the worker node has rendered an object
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        os.killpg(ray_cluster.worker.pid, signal.SIGKILL)  # the machine dies mid-run
        left = len(uids) - manifest.read_text().count('"done"')
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["done"] == len(uids) and summary["failed"] == 0, summary
    # with 2+ objects left at the kill, the worker node had one in flight (or was sent one)
    assert left >= 2, f"the worker node joined too late to die mid-run ({left} left)"
    assert "lost while rendering" in text, text[-3000:]
    records = Manifest(manifest).records
    assert sorted(records) == uids and all(r["status"] == "done" for r in records.values())
    assert _done_on(manifest, "nodeA") >= 1 and _done_on(manifest, "nodeB") >= 1
    keys = []
    for shard in sorted(out.glob("*.tar")):
        report = check_shard(shard)
        assert report["errors"] == [], report
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".json")]
    assert sorted(keys) == uids  # each object once: none missing, none twice
    # the same command again: everything is done (no cluster needed to know that)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["skipped"] == len(uids)
