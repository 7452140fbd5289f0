import json
import os
from pathlib import Path

import pytest
import torch

from tests.scripts import load_script

# Tests never touch a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
# Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP threads
# that spin-wait for each other make torch up to 10x slower. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "reference" / "mvdream_tiny_sd21.safetensors"
FULLSIZE_KEYS = FIXTURES / "reference" / "mvdream_sd21_fullsize_keys.txt"
ASSETS = FIXTURES / "assets"


@pytest.fixture(scope="session")
def reference():
    """Official MVDream reference vectors: (tensors, metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(REFERENCE))
    with safe_open(str(REFERENCE), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return tensors, meta


@pytest.fixture(scope="session")
def reference_unet_sd(reference):
    """The tiny official UNet state dict (official key names, no prefix)."""
    tensors, _ = reference
    prefix = "checkpoint.model.diffusion_model."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.fixture
def objaverse_mirror(tmp_path, monkeypatch):
    """A tiny Objaverse mirror served from loopback only: (base_url, cache_dir)."""
    module = load_script(FIXTURES / "render" / "objaverse_mirror.py", "render_objaverse_mirror")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with module.serve_objaverse_mirror(tmp_path) as (url, cache):
        yield url, cache


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """README's first command, ``mvdiff quickstart --output outputs/quickstart``, as written
    (default settings), run once per session in a fresh folder and shared by
    tests/test_quickstart.py and tests/test_readme.py: (cwd, out, proc, seconds)."""
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    pytest.importorskip("bpy")
    cwd = tmp_path_factory.mktemp("quickstart")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mvdiff.cli", "quickstart", "--output", "outputs/quickstart"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    return SimpleNamespace(cwd=cwd, out=cwd / "outputs" / "quickstart", proc=proc,
                           seconds=seconds)  # fmt: skip


# ------------------------------------------------------------- training: threads and shards


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 OpenMP threads competing with other
    processes make tiny steps ~10x slower (spin-waiting), and 1 thread is what subprocesses
    get too (bit-exact resume needs equal thread counts). Modules that train take it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Synthetic training shards: ``mv/`` (2 shards x 3 objects x 8 views at 32 px) and
    ``2d/`` (1 shard of 12 images)."""
    from mvdiff.data.synthetic import write_synthetic_2d_shards, write_synthetic_mv_shards

    root = tmp_path_factory.mktemp("shards")
    write_synthetic_mv_shards(root / "mv", num_shards=2, objects_per_shard=3, num_views=8,
                              resolution=32)  # fmt: skip
    write_synthetic_2d_shards(root / "2d", num_shards=1, images_per_shard=12, size=(40, 36))
    return root


# ------------------------------------------------------------- cloud storage on loopback

S3_BUCKET = "mvdiff-test"
GCS_BUCKET = "mvdiff-gcs-test"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cloud_env(**extra) -> dict:
    """The environment of an mvdiff subprocess: this checkout, offline, one thread."""
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            **extra}  # fmt: skip


@pytest.fixture(scope="module")
def s3():
    """A real S3-compatible server (moto) on loopback with bucket :data:`S3_BUCKET`; yields
    (env that points a process at it, boto3 client)."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = _cloud_env(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        env.pop(key, None)
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=S3_BUCKET)
    yield env, client
    server.stop()


def _gcs_move_route(emulator):
    """GCS's ``objects.move`` (``POST .../b/B/o/SRC/moveTo/o/DST``), which the emulator lacks,
    as its own copy then delete. gcsfs' ``mv`` tries it first and takes the emulator's 501 as
    transient: 5 retries with exponential backoff (~33 s per rename) before it falls back to
    copy/delete itself, i.e. the same outcome."""
    from gcp_storage_emulator.handlers import objects

    def move(request, response, storage, *args, **kwargs):
        request.params["dest_bucket_name"] = request.params["bucket_name"]
        objects.copy(request, response, storage)
        if response.status == 200:  # HTTPStatus.OK; NOT_FOUND / conflicts pass through
            objects.delete(request, response, storage)

    regex = (rf"^{emulator.settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/"
             r"(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$")  # fmt: skip
    return regex, {"POST": move}


@pytest.fixture(scope="module")
def gcs():
    """A GCS-compatible server (gcp-storage-emulator, in memory) on loopback with bucket
    :data:`GCS_BUCKET`; yields (env for a process, ``find(prefix)``, ``cat(path)``), the
    last two run in a subprocess with that env."""
    import subprocess
    import sys

    emulator = pytest.importorskip("gcp_storage_emulator.server")
    port = free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    env = _cloud_env(
        STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}",
        FSSPEC_GCS_TOKEN="anon",  # fsspec's config from the environment: no credentials
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
    )
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    code = (
        "import fsspec, json, sys; fs = fsspec.filesystem('gs', token='anon'); "
        "print(json.dumps(fs.find(sys.argv[1])))"
    )

    def find(prefix: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", code, prefix], env=env, capture_output=True,
                             text=True, timeout=120, check=True)  # fmt: skip
        return sorted(json.loads(out.stdout))

    def cat(path: str) -> bytes:
        out = subprocess.run(
            [sys.executable, "-c", "import fsspec, sys; sys.stdout.buffer.write("
             "fsspec.filesystem('gs', token='anon').cat(sys.argv[1]))", path],
            env=env, capture_output=True, timeout=120, check=True,
        )  # fmt: skip
        return out.stdout

    handlers = emulator.HANDLERS  # the router reads this module global on every request
    emulator.HANDLERS = (_gcs_move_route(emulator), *handlers)
    try:
        yield env, find, cat
    finally:
        server.stop()
        emulator.HANDLERS = handlers  # the emulator module as it was
