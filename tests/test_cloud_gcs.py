"""Cloud storage against a GCS API: gcp-storage-emulator on 127.0.0.1 (in-process, in memory),
gcsfs pointed at it with ``STORAGE_EMULATOR_HOST``. render -> gs:// -> train from a gs:// brace
pattern; a resumed render finds everything done in the bucket's manifest.

gcsfs' experimental zonal/HNS bucket probe speaks gRPC, which the emulator does not: it is
switched off (``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``), as on any plain bucket.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import GCS_BUCKET as BUCKET

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator.server")

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "fixtures" / "assets"
TINY = ROOT / "train" / "configs" / "tiny_cpu.yaml"


def _mvdiff(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mvdiff.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.slow
def test_render_to_gcs_train_from_gcs(gcs, tmp_path):
    pytest.importorskip("bpy")
    env, find, cat = gcs
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("monkey.glb", "BoxTextured.glb"):
        shutil.copy(ASSETS / name, inputs / name)
    url = f"gs://{BUCKET}/mv"
    render = ["render", str(inputs), "--output", url, "--work-dir", str(tmp_path / "work"),
              "--views", "4", "--resolution", "32", "--samples", "1", "--engine",
              "BLENDER_WORKBENCH", "--workers", "1", "--shard-max-samples", "1", "-q"]  # fmt: skip
    res = _mvdiff(env, *render)
    assert res.returncode == 0, res.stdout + res.stderr
    names = [p.rsplit("/", 1)[-1] for p in find(f"{BUCKET}/mv")]
    assert names == ["manifest.jsonl", "mv-000000.tar", "mv-000001.tar",
                     "render_config.yaml"], names  # fmt: skip
    local = tmp_path / "copy.tar"
    local.write_bytes(cat(f"{BUCKET}/mv/mv-000000.tar"))
    with tarfile.open(local) as tar:
        assert any(m.name.endswith(".json") for m in tar)

    # train from the bucket (brace pattern), checkpoints and outputs on local disk
    run = tmp_path / "run"
    res = _mvdiff(env, "train", "--config", str(TINY), "--output-dir", str(run),
                  "--set", f"data.mv_shards={url}/mv-{{000000..000001}}.tar",
                  "--set", "data.p_2d=0", "--set", "data.batch_size=1", "--set", "export=false",
                  "--set", "checkpoint.every=2", "--max-steps", "2")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert (run / "checkpoints" / "step-0000002").is_dir()

    # the same render from another machine (empty work folder): all done per the bucket
    res = _mvdiff(env, *render[:4], "--work-dir", str(tmp_path / "work2"), *render[6:])
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == 2 and summary["done"] == 0, summary
